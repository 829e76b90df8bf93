//! Backend maintenance: draining a backend (HAProxy's `set server state drain`) over the HTTP
//! API, the admin console and the config file, and the control endpoints' protection.

mod common;

use common::raw::*;
use common::*;
use serde_json::Value;

/// A session listener and a transaction listener, both to any backend (round robin), and
/// the admin API; `postgres` is an admin console user. Ports: (session, tx, admin).
fn start(cluster: &Cluster, backend_extra: &str, admin_extra: &str) -> (u16, u16, u16, Pgvane) {
    let (session, tx, admin) = (free_port(), free_port(), free_port());
    let listeners = listener("any", session, "any", "mode = \"session\"")
        + &listener("tx", tx, "any", "mode = \"transaction\"");
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\nadmin_users = [\"{SUPERUSER}\"]\n{admin_extra}\n"
    );
    let mut text = pooled_config(cluster, &listeners, &extra);
    if let Some(pg1) = cluster.nodes.get(1) {
        let entry = format!(
            "name = \"pg1\"\nhost = \"127.0.0.1\"\nport = {}\n",
            pg1.port
        );
        text = text.replace(&entry, &format!("{entry}{backend_extra}\n"));
    }
    let pgvane = Pgvane::start(&text, &[session, tx, admin]);
    (session, tx, admin, pgvane)
}

/// `/status`'s entry for backend `name`.
async fn backend_status(admin: u16, name: &str) -> Value {
    let (code, body) = http_async(admin, "GET", "/status").await;
    assert_eq!(code, 200, "{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no backend {name} in {body}"))
}

/// A session on the replica, opened through the round-robin `any` listener.
async fn session_on(port: u16, backend_port: u16) -> tokio_postgres::Client {
    for _ in 0..20 {
        let c = connect(port, SUPERUSER, "postgres").await.unwrap();
        if server_port(&c).await == backend_port {
            return c;
        }
    }
    panic!("no session reached port {backend_port}");
}

/// Drained over HTTP, the replica keeps its open session (and its transaction) while new
/// sessions and transactions all go to the primary; its pooled connection closes when the
/// session ends; the console's ENABLE BACKEND takes it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_finishes_its_work_and_takes_no_new() {
    let cluster = Cluster::start(1);
    cluster.wait_replicated().await;
    let (primary, replica) = (cluster.nodes[0].port, cluster.nodes[1].port);
    let (session, tx, admin, _pgvane) = start(&cluster, "", "");
    eventually(PATIENCE, "both backends routable", || async {
        let s = backend_status(admin, "pg1").await;
        (s["serving"] == "replica").then_some(())
    })
    .await;
    // Warm the transaction pool on the replica too.
    let mut ports = std::collections::HashSet::new();
    for _ in 0..4 {
        let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
        ports.insert(server_port(&c).await);
    }
    assert!(ports.contains(&replica), "{ports:?}");

    let on_replica = session_on(session, replica).await;
    on_replica.batch_execute("BEGIN").await.unwrap();
    let (code, body) = http_async(admin, "POST", "/drain?backend=pg1").await;
    assert_eq!(code, 200, "{body}");
    let drained = metric(admin, r#"pgvane_backend_draining{backend="pg1"}"#).await;
    assert_eq!(drained, Some(1.0));

    // The running session and its transaction go on where they are.
    assert_eq!(server_port(&on_replica).await, replica);
    on_replica.batch_execute("COMMIT").await.unwrap();
    // New sessions and transactions go to the primary only.
    for _ in 0..6 {
        let c = connect(session, SUPERUSER, "postgres").await.unwrap();
        assert_eq!(server_port(&c).await, primary);
    }
    let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
    for _ in 0..6 {
        assert_eq!(server_port(&c).await, primary);
    }
    let status = backend_status(admin, "pg1").await;
    assert_eq!(status["draining"], true, "{status}");
    assert_eq!(status["serving"], "replica", "{status}");
    // The session's connection is the only one left: the idle ones closed at the drain.
    assert_eq!(status["server_connections"], 1, "{status}");

    drop(on_replica);
    eventually(
        PATIENCE,
        "the drained backend's last connection closed",
        || async {
            let s = backend_status(admin, "pg1").await;
            (s["server_connections"] == 0).then_some(())
        },
    )
    .await;

    let (mut console, _) = RawClient::login(session, SUPERUSER, "pgbouncer").await;
    console.send(&query("ENABLE BACKEND pg1")).await;
    let enabled = console.until_ready().await;
    assert_eq!(show(&enabled), "C Z");
    console.send(&query("DRAIN BACKEND nosuch")).await;
    let unknown = console.until_ready().await;
    assert_eq!(
        unknown[0].field(b'C').as_deref(),
        Some("42704"),
        "{}",
        show(&unknown)
    );
    session_on(session, replica).await;
    let drained = metric(admin, r#"pgvane_backend_draining{backend="pg1"}"#).await;
    assert_eq!(drained, Some(0.0));
}

/// `drain = true` in the config: the backend is checked and shown, but serves nothing new
/// from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_drained_in_the_config_takes_no_sessions() {
    let cluster = Cluster::start(1);
    cluster.wait_replicated().await;
    let primary = cluster.nodes[0].port;
    let (session, _tx, admin, _pgvane) = start(&cluster, "drain = true", "");
    eventually(PATIENCE, "the replica checked", || async {
        let s = backend_status(admin, "pg1").await;
        (s["serving"] == "replica").then_some(())
    })
    .await;
    assert_eq!(backend_status(admin, "pg1").await["draining"], true);
    for _ in 0..6 {
        let c = connect(session, SUPERUSER, "postgres").await.unwrap();
        assert_eq!(server_port(&c).await, primary);
    }
}

/// With `admin.token` set, control requests need it as a bearer token; reads stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_endpoints_need_the_token_when_one_is_set() {
    let cluster = Cluster::start(0);
    let (_session, _tx, admin, _pgvane) = start(&cluster, "", "token = \"s3cret\"");
    let post = |path: &'static str, headers: &'static str| async move {
        tokio::task::spawn_blocking(move || http_with(admin, "POST", path, headers))
            .await
            .unwrap()
            .unwrap()
    };
    let (code, body) = post("/pause", "").await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = post("/pause", "Authorization: Bearer wrong\r\n").await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = post("/drain?backend=pg0", "Authorization: Bearer wrong\r\n").await;
    assert_eq!(code, 401, "{body}");
    assert_eq!(backend_status(admin, "pg0").await["draining"], false);
    let (code, body) = post("/pause", "Authorization: Bearer s3cret\r\n").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = post("/resume", "Authorization: Bearer s3cret\r\n").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_async(admin, "GET", "/status").await.0, 200);
    assert_eq!(http_async(admin, "GET", "/metrics").await.0, 200);
}
