//! The HTTP admin API: `/status` and `/metrics` through a failover and a split brain, and
//! PAUSE/RESUME per database.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

async fn status(admin: u16) -> Value {
    let (code, body) = http_async(admin, "GET", "/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Transaction listeners on databases `postgres` and `app`, plus the admin API.
async fn admin_cluster(replicas: usize) -> (Cluster, Pgvane, u16, u16) {
    let cluster = Cluster::start(replicas);
    create_app_db(&cluster).await;
    let (tx, admin) = (free_port(), free_port());
    let listeners = listener("tx", tx, "primary", "mode = \"transaction\"");
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[general]\nfailover_hold_timeout = \"30s\"\n"
    );
    let mut config = pooled_config(&cluster, &listeners, &extra);
    // pooled_config has its own [general]; keep one.
    config = config.replacen("[general]\nmax_client_conn = 2000\n", "", 1);
    config = config.replace("[general]\n", "[general]\nmax_client_conn = 2000\n");
    let pgvane = Pgvane::start(&config, &[tx, admin]);
    pgvane.wait_log("primary elected", PATIENCE).await;
    (cluster, pgvane, tx, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_follow_a_failover_and_a_split_brain() {
    let (cluster, pgvane, tx, admin) = admin_cluster(2).await;
    let s = status(admin).await;
    assert_eq!(s["election"]["primary"], "pg0", "{s:#}");
    assert_eq!(s["backends"][1]["serving"], "replica", "{s:#}");
    assert_eq!(
        metric(
            admin,
            "pgvane_backend_role{backend=\"pg0\",role=\"primary\"}"
        )
        .await,
        Some(1.0)
    );

    // Failover: the primary stops, a client is held, a replica is promoted.
    let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
    cluster.primary().stop();
    eventually(PATIENCE, "no primary", || async {
        (metric(admin, "pgvane_no_primary").await == Some(1.0)).then_some(())
    })
    .await;
    let held = tokio::spawn(async move { c.batch_execute("SELECT 1").await });
    eventually(PATIENCE, "a held client", || async {
        (metric(admin, "pgvane_held_clients").await == Some(1.0)).then_some(())
    })
    .await;
    cluster.nodes[1].promote();
    held.await.unwrap().expect("the held client proceeds");
    let s = status(admin).await;
    let f = &s["last_failover"];
    assert_eq!(f["previous"], "pg0", "{s:#}");
    assert_eq!(f["primary"], "pg1", "{s:#}");
    assert_eq!(f["clients_held"], 1, "{s:#}");
    assert!(f["no_primary_ms"].as_u64().unwrap() > 0, "{s:#}");
    assert_eq!(s["backends"][0]["role"], "down", "{s:#}");
    // The cause, not tokio-postgres' bare "error connecting to server" or "db error".
    let cause = s["backends"][0]["last_error"].as_str().unwrap();
    assert!(
        ["refused", "shutting down", "closed", "timed out"]
            .iter()
            .any(|c| cause.contains(c)),
        "{cause}"
    );
    let at = f["at"].as_str().expect("RFC 3339 time");
    humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("{at}: {e}"));
    // The old primary's pool went with the only client that logged in through it.
    eventually(PATIENCE, "the dead backend's pool freed", || async {
        let s = status(admin).await;
        let pools = s["pools"].as_array().unwrap().clone();
        pools.iter().all(|p| p["backend"] != "pg0").then_some(())
    })
    .await;
    assert_eq!(
        metric(admin, "pgvane_primary_changes_total").await,
        Some(1.0)
    );
    assert_eq!(
        metric(admin, "pgvane_failover_seconds_count").await,
        Some(1.0)
    );
    assert_eq!(metric(admin, "pgvane_held_total").await, Some(1.0));
    assert_eq!(
        metric(
            admin,
            "pgvane_backend_role_changes_total{backend=\"pg1\",from=\"replica\",to=\"primary\"}"
        )
        .await,
        Some(1.0)
    );

    // Split brain: pg2 (still following pg0's timeline) is promoted while pg1 is primary.
    // pg2 ends on timeline 2 as well, so neither is newer: writes are held.
    cluster.nodes[2].promote();
    eventually(PATIENCE, "an ambiguous election", || async {
        let s = status(admin).await;
        (s["election"]["state"] == "ambiguous").then_some(())
    })
    .await;
    assert_eq!(metric(admin, "pgvane_split_brain_total").await, Some(1.0));
    assert_eq!(metric(admin, "pgvane_no_primary").await, Some(1.0));
    drop(pgvane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_one_database_and_resume_releases_it() {
    let (_cluster, pgvane, tx, admin) = admin_cluster(0).await;
    let app = connect(tx, SUPERUSER, "app").await.unwrap();
    let other = connect(tx, SUPERUSER, "postgres").await.unwrap();
    app.batch_execute("SELECT 1").await.unwrap();

    let (code, body) = http_async(admin, "POST", "/pause?database=app").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"complete\": true"), "{body}");
    pgvane.wait_log("PAUSE complete", PATIENCE).await;

    let held = tokio::spawn(async move {
        app.batch_execute("INSERT INTO t VALUES (1, 'after resume')")
            .await
    });
    // Other databases go on.
    other.batch_execute("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "a paused database's transaction ran");
    assert_eq!(metric(admin, "pgvane_paused").await, Some(1.0));

    let (code, body) = http_async(admin, "POST", "/resume?database=app").await;
    assert_eq!(code, 200, "{body}");
    held.await
        .unwrap()
        .expect("held transaction runs after RESUME");
    assert_eq!(metric(admin, "pgvane_paused").await, Some(0.0));

    // RESUME of one database cannot lift a global PAUSE.
    let (code, _) = http_async(admin, "POST", "/pause").await;
    assert_eq!(code, 200);
    let (code, body) = http_async(admin, "POST", "/resume?database=app").await;
    assert_eq!(code, 409, "{body}");
    let (code, _) = http_async(admin, "POST", "/resume").await;
    assert_eq!(code, 200);
    other.batch_execute("SELECT 1").await.unwrap();

    let (code, _) = http_async(admin, "GET", "/nope").await;
    assert_eq!(code, 404);
    let (code, _) = http_async(admin, "GET", "/pause").await;
    assert_eq!(code, 405);
}
