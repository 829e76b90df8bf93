//! Reload (SIGHUP, console RELOAD, `POST /reload`): a valid file is applied to the running
//! process, an invalid one changes nothing and says why.

mod common;

use std::process::Command;

use common::raw::*;
use common::*;
use serde_json::Value;

/// A transaction listener and the admin API; `extra` goes into the config (users, pool,
/// limits, admin keys). Ports: (tx, admin).
fn config_for(cluster: &Cluster, tx: u16, admin: u16, extra: &str) -> String {
    pooled_config(
        cluster,
        &listener("tx", tx, "primary", "mode = \"transaction\""),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\nadmin_users = [\"{SUPERUSER}\"]\n{extra}"
        ),
    )
}

async fn post(admin: u16, path: &'static str, headers: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_with(admin, "POST", path, headers))
        .await
        .unwrap()
        .expect("the admin API answers")
}

/// Server connections of `user` on the primary, as PostgreSQL counts them (pgvane's health
/// check connection aside).
async fn backends_of(cluster: &Cluster, user: &str) -> i64 {
    let c = cluster.primary().connect().await;
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND application_name <> 'pgvane-health'";
    c.query_one(sql, &[&user]).await.unwrap().get(0)
}

/// Loads the primary with pgbench's tables, then runs `pgbench -c 8 -T 8` through `port`
/// in the background once called; the handle's output asserts no failed transaction.
async fn pgbench_through(cluster: &Cluster, port: u16) -> tokio::task::JoinHandle<()> {
    let pgbench = |args: Vec<String>| {
        Command::new(pg_bindir().join("pgbench"))
            .args(["-h", "127.0.0.1", "-U", SUPERUSER])
            .args(args)
            .env("PGPASSWORD", PASSWORD)
            .output()
            .unwrap()
    };
    let primary = cluster.primary().port.to_string();
    let args = |a: &str| a.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let init = pgbench(args(&format!("-p {primary} -i -s 1 -q postgres")));
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let run = tokio::task::spawn_blocking(move || {
        let out = pgbench(args(&format!("-p {port} -c 8 -j 2 -T 8 postgres")));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let failed = text
            .lines()
            .find_map(|l| l.strip_prefix("number of failed transactions: "))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_owned());
        assert_eq!(failed.as_deref(), Some("0"), "{text}");
    });
    eventually(PATIENCE, "pgbench running", || async {
        (backends_of(cluster, SUPERUSER).await >= 2).then_some(())
    })
    .await;
    run
}

/// Every DataRow's values, for searching.
fn show_rows(msgs: &[Msg]) -> String {
    format!("{:?}", table(msgs))
}

/// Writes `config` and reloads it over HTTP, which must apply it; returns the report.
async fn reload_with(pgvane: &Pgvane, admin: u16, config: &str) -> Value {
    pgvane.rewrite_config(config);
    let (code, body) = post(admin, "/reload", "").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn login_code(msgs: &[Msg]) -> Option<String> {
    msgs.last().and_then(|m| m.field(b'C'))
}

/// SIGHUP adds a user and shrinks the pool: the new user logs in, the old pool's
/// connections close as released and the new pool keeps to its size. An invalid file
/// changes nothing (HTTP 422 and a console ERROR saying why); a changed [health] is named as
/// needing a restart; limits and the admin token change with the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_users_pools_limits_and_the_admin_token() {
    let cluster = Cluster::start(0);
    create_role(&cluster, "app").await;
    let (tx, admin) = (free_port(), free_port());
    let first = config_for(&cluster, tx, admin, "");
    let pgvane = Pgvane::start(&first, &[tx, admin]);

    let (_, login) = RawClient::login(tx, "app", "postgres").await;
    assert_eq!(
        login_code(&login).as_deref(),
        Some("28P01"),
        "{}",
        show(&login)
    );
    // Five server connections for the superuser's pool.
    let clients: Vec<_> = futures_util::future::join_all((0..5).map(|_| async {
        let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
        c.batch_execute("BEGIN; SELECT pg_sleep(0.3); COMMIT")
            .await
            .unwrap();
        c
    }))
    .await;
    assert!(backends_of(&cluster, SUPERUSER).await >= 2);

    let second = config_for(
        &cluster,
        tx,
        admin,
        &format!("\n[pool]\ndefault_pool_size = 1\n\n[[user]]\nname = \"app\"\npassword = \"{PASSWORD}\"\n"),
    );
    pgvane.rewrite_config(&second);
    pgvane.signal("HUP");
    eventually(PATIENCE, "the reload applied", || async {
        let ok = metric(admin, r#"pgvane_reloads_total{result="ok"}"#).await;
        (ok == Some(1.0)).then_some(())
    })
    .await;
    let (mut app, login) = RawClient::login(tx, "app", "postgres").await;
    assert_eq!(login.last().map(|m| m.tag), Some(b'Z'), "{}", show(&login));
    app.send(&query("SELECT 1")).await;
    app.until_ready().await;
    // The open sessions go on, on the pool that replaced theirs: one connection now.
    for c in &clients {
        c.simple_query("SELECT 1").await.unwrap();
    }
    eventually(
        PATIENCE,
        "the retired pool's connections closed",
        || async { (backends_of(&cluster, SUPERUSER).await == 1).then_some(()) },
    )
    .await;
    let (mut console, _) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;
    console.send(&query("SHOW CONFIG")).await;
    let config = console.until_ready().await;
    let row = table(&config)
        .into_iter()
        .find(|r| r[0].as_deref() == Some("default_pool_size"))
        .unwrap();
    assert_eq!(
        row[1].as_deref(),
        Some("1"),
        "SHOW CONFIG shows what is in force"
    );

    // An invalid file: refused, nothing changed, the reason named.
    pgvane.rewrite_config(&second.replace("default_pool_size = 1", "default_pool_size = \"many\""));
    let (code, body) = post(admin, "/reload", "").await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("default_pool_size"), "{body}");
    console.send(&query("RELOAD")).await;
    let refused = console.until_ready().await;
    assert_eq!(
        refused[0].field(b'C').as_deref(),
        Some("F0000"),
        "{}",
        show(&refused)
    );
    let failed = metric(admin, r#"pgvane_reloads_total{result="failed"}"#).await;
    assert_eq!(failed, Some(2.0));
    app.send(&query("SELECT 1")).await;
    assert_eq!(show(&app.until_ready().await), "T D C Z");

    // A changed [health] restarts the checks with it; the pool change applies too.
    let third = second
        .replace("interval = \"200ms\"", "interval = \"300ms\"")
        .replace("[pool]\n", "[pool]\nmax_prepared_statements = 10\n");
    assert_ne!(third, second);
    let report = reload_with(&pgvane, admin, &third).await;
    assert_eq!(report["needs_restart"], serde_json::json!([]), "{report}");
    assert!(
        report["applied"].to_string().contains("[health]"),
        "{report}"
    );
    assert!(
        report["applied"].to_string().contains("pool settings"),
        "{report}"
    );

    // Limits and the token follow the file.
    let fourth = format!("{third}\n[limits]\nallow = [\"10.0.0.0/8\"]\n")
        .replace("admin_users = ", "token = \"s3cret\"\nadmin_users = ");
    reload_with(&pgvane, admin, &fourth).await;
    let (_, login) = RawClient::login(tx, SUPERUSER, "postgres").await;
    assert_eq!(
        login_code(&login).as_deref(),
        Some("28000"),
        "{}",
        show(&login)
    );
    pgvane.rewrite_config(&third);
    let (code, _) = post(admin, "/reload", "").await;
    assert_eq!(code, 401, "the token now in force is asked for");
    // SHOW CONFIG, open to stats_users, does not show the token.
    console.send(&query("SHOW CONFIG")).await;
    let shown = show_rows(&console.until_ready().await);
    assert!(
        shown.contains("<redacted>") && !shown.contains("s3cret"),
        "{shown}"
    );
    let (code, body) = post(admin, "/reload", "Authorization: Bearer s3cret\r\n").await;
    assert_eq!(code, 200, "{body}");
    let (_, login) = RawClient::login(tx, SUPERUSER, "postgres").await;
    assert_eq!(login.last().map(|m| m.tag), Some(b'Z'), "{}", show(&login));
}

/// A reload that shrinks the pool while pgbench runs through pgvane fails no transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_fails_no_transaction() {
    let cluster = Cluster::start(0);
    let (tx, admin) = (free_port(), free_port());
    let pgvane = Pgvane::start(&config_for(&cluster, tx, admin, ""), &[tx, admin]);
    let run = pgbench_through(&cluster, tx).await;
    // Mid-run: shrink the pool and change a timeout.
    let next = config_for(
        &cluster,
        tx,
        admin,
        "\n[pool]\ndefault_pool_size = 3\nquery_wait_timeout = \"100s\"\n",
    );
    reload_with(&pgvane, admin, &next).await;
    run.await.unwrap();
    eventually(PATIENCE, "the new pool keeps to its size", || async {
        (backends_of(&cluster, SUPERUSER).await <= 3).then_some(())
    })
    .await;
}

/// Listeners follow the file: one removed stops accepting while its open session goes on,
/// one added accepts, one changed serves its next clients the new way, and one moved to a
/// port that is taken is reported and keeps running where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_opens_closes_and_changes_listeners() {
    let cluster = Cluster::start(0);
    let (tx, rw, ro, admin) = (free_port(), free_port(), free_port(), free_port());
    let with = |listeners: String| {
        pooled_config(
            &cluster,
            &listeners,
            &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n"),
        )
    };
    let first = with(
        listener("tx", tx, "primary", "mode = \"transaction\"")
            + &listener("rw", rw, "primary", ""),
    );
    let pgvane = Pgvane::start(&first, &[tx, rw, admin]);
    let through_rw = connect(rw, SUPERUSER, "postgres").await.unwrap();
    // Transaction mode: a SET of an unreported parameter pins the session.
    let pinned = r#"pgvane_pinned_sessions"#;
    let via_tx = connect(tx, SUPERUSER, "postgres").await.unwrap();
    via_tx.batch_execute("SET work_mem = '7MB'").await.unwrap();
    assert_eq!(metric(admin, pinned).await, Some(1.0));
    drop(via_tx);
    eventually(PATIENCE, "the pinned session gone", || async {
        (metric(admin, pinned).await == Some(0.0)).then_some(())
    })
    .await;

    let second = with(
        listener("tx", tx, "primary", "mode = \"session\"")
            + &listener("ro", ro, "any", "mode = \"session\""),
    );
    let report = reload_with(&pgvane, admin, &second).await;
    let applied = report["applied"].to_string();
    for what in [
        "listener rw closed",
        "listener ro opened on",
        "listener tx changed",
    ] {
        assert!(applied.contains(what), "{what}: {report}");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", rw)).is_err());
    server_port(&through_rw).await;
    let via_ro = connect(ro, SUPERUSER, "postgres").await.unwrap();
    server_port(&via_ro).await;
    // Session mode now for new clients: the same SET pins nothing.
    let via_tx = connect(tx, SUPERUSER, "postgres").await.unwrap();
    via_tx.batch_execute("SET work_mem = '7MB'").await.unwrap();
    via_tx.simple_query("SELECT 1").await.unwrap();
    assert_eq!(metric(admin, pinned).await, Some(0.0));

    // Moved onto a port something else holds: reported, kept where it was.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let third = with(
        listener("tx", tx, "primary", "mode = \"session\"")
            + &listener("ro", taken_port, "any", "mode = \"session\""),
    );
    let report = reload_with(&pgvane, admin, &third).await;
    assert!(
        report["failed"].to_string().contains("listener ro"),
        "{report}"
    );
    connect(ro, SUPERUSER, "postgres").await.unwrap();
}

/// A reload adds a backend (and changes the pool size) while pgbench runs: no transaction
/// fails, the new backend is checked and serves its target; a second reload removes it,
/// and it leaves the routing table, `/status` and the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_backends_under_load() {
    let cluster = Cluster::start(1);
    cluster.wait_replicated().await;
    let replica = cluster.nodes[1].port;
    let (tx, ro, admin) = (free_port(), free_port(), free_port());
    let full = pooled_config(
        &cluster,
        &(listener("tx", tx, "primary", "mode = \"transaction\"")
            + &listener("ro", ro, "replica", "mode = \"session\"")),
        &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n"),
    );
    let pg1 = format!("\n[[backend]]\nname = \"pg1\"\nhost = \"127.0.0.1\"\nport = {replica}\n");
    assert!(full.contains(&pg1));
    let without_pg1 = full.replace(&pg1, "");
    let pgvane = Pgvane::start(&without_pg1, &[tx, ro, admin]);

    let run = pgbench_through(&cluster, tx).await;
    let report = reload_with(
        &pgvane,
        admin,
        &full.replace("[general]", "[pool]\ndefault_pool_size = 4\n\n[general]"),
    )
    .await;
    assert!(
        report["applied"].to_string().contains("backend pg1 added"),
        "{report}"
    );
    run.await.unwrap();

    // The added replica serves the replica listener once its checks rise.
    let on_replica = eventually(PATIENCE, "the added backend serves", || async {
        let c = connect(ro, SUPERUSER, "postgres").await.ok()?;
        (server_port(&c).await == replica).then_some(c)
    })
    .await;

    let report = reload_with(&pgvane, admin, &without_pg1).await;
    assert!(
        report["applied"]
            .to_string()
            .contains("backend pg1 removed"),
        "{report}"
    );
    // Its session ends with the backend (as at a role loss).
    eventually(PATIENCE, "the removed backend's session ended", || async {
        on_replica
            .simple_query("SELECT 1")
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let (_, status) = http_async(admin, "GET", "/status").await;
    assert!(!status.contains("\"pg1\""), "{status}");
    let (_, metrics) = http_async(admin, "GET", "/metrics").await;
    assert!(!metrics.contains("backend=\"pg1\",role"), "{metrics}");
}

/// `[health]` follows the file: checks with a wrong monitor password take the backend down,
/// the right one brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_restarts_the_health_checks_with_the_new_settings() {
    let cluster = Cluster::start(0);
    let (tx, admin) = (free_port(), free_port());
    let good = config_for(&cluster, tx, admin, "");
    let pgvane = Pgvane::start(&good, &[tx, admin]);
    let role = |r: &'static str| async move {
        metric(
            admin,
            &format!("pgvane_backend_role{{backend=\"pg0\",role=\"{r}\"}}"),
        )
        .await
    };
    eventually(PATIENCE, "the primary up", || async {
        (role("primary").await == Some(1.0)).then_some(())
    })
    .await;
    let bad = good.replacen(
        &format!("password = \"{PASSWORD}\""),
        "password = \"wrong\"",
        1,
    );
    assert_ne!(bad, good);
    reload_with(&pgvane, admin, &bad).await;
    eventually(PATIENCE, "checks failing with the new password", || async {
        (role("down").await == Some(1.0)).then_some(())
    })
    .await;
    reload_with(&pgvane, admin, &good).await;
    eventually(PATIENCE, "the primary back", || async {
        (role("primary").await == Some(1.0)).then_some(())
    })
    .await;
    connect(tx, SUPERUSER, "postgres").await.unwrap();
}
