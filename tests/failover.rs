//! Failover: the routing table follows a promotion, and sessions on a backend that lost its
//! role are shut down by pgvane.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn writes_follow_a_promotion_after_the_primary_crashes() {
    let cluster = Cluster::start(1);
    let rw = free_port();
    // interval x fall = 1.5 s is the budget the issue sets; the sessions pinned to the old
    // primary must be gone too.
    let health = "interval = \"500ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 3\n";
    let pgvane = Pgvane::start(
        &config(&cluster, health, &listener("rw", rw, "primary", "")),
        &[rw],
    );

    let pinned = connect(rw, SUPERUSER, "postgres").await.unwrap();
    pinned
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    cluster.wait_replicated().await;

    cluster.primary().kill();
    let new_primary = &cluster.nodes[1];
    new_primary.promote();
    let promoted = Instant::now();
    let elapsed = eventually(PATIENCE, "a write through pgvane", || async {
        let c = connect(rw, SUPERUSER, "postgres").await.ok()?;
        if let Err(e) = c.batch_execute("INSERT INTO t VALUES (1)").await {
            eprintln!("write failed: {e:?}");
            return None;
        }
        (try_server_port(&c).await? == new_primary.port).then(|| promoted.elapsed())
    })
    .await;
    eprintln!("promotion -> first write through pgvane: {elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(1500 + 1000),
        "took {elapsed:?}\n{}",
        pgvane.log()
    );
    assert!(
        pinned.simple_query("SELECT 1").await.is_err(),
        "session on the dead primary was cut"
    );
}

#[tokio::test]
async fn a_promoted_replica_fences_the_old_primary_and_its_sessions_are_cut() {
    let cluster = Cluster::start(1);
    let (rw, keep) = (free_port(), free_port());
    let health = "interval = \"200ms\"\nrise = 2\nfall = 3\n";
    let listeners = listener("rw", rw, "primary", "on_role_loss = \"shutdown-sessions\"")
        + &listener("keep", keep, "primary", "on_role_loss = \"keep\"");
    let pgvane = Pgvane::start(&config(&cluster, health, &listeners), &[rw, keep]);

    let old = cluster.primary();
    let cut = connect(rw, SUPERUSER, "postgres").await.unwrap();
    let kept = connect(keep, SUPERUSER, "postgres").await.unwrap();
    assert_eq!(server_port(&cut).await, old.port);
    cut.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    cluster.wait_replicated().await;

    // Split brain: the replica is promoted while the old primary keeps running, writable.
    let new = &cluster.nodes[1];
    new.promote();
    eventually(PATIENCE, "writes routed to the new primary", || async {
        let c = connect(rw, SUPERUSER, "postgres").await.ok()?;
        (try_server_port(&c).await? == new.port).then_some(())
    })
    .await;

    // The old primary is alive, so only pgvane can have closed this session.
    eventually(PATIENCE, "the pinned session to be cut", || async {
        cut.simple_query("SELECT 1").await.is_err().then_some(())
    })
    .await;
    // on_role_loss = "keep" leaves the session where it was.
    assert_eq!(server_port(&kept).await, old.port);

    // New writes through either listener land on the new primary only.
    for port in [rw, keep] {
        let c = connect(port, SUPERUSER, "postgres").await.unwrap();
        c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    }
    let count = |node: &PgNode| {
        let node_port = node.port;
        async move {
            let c = connect(node_port, SUPERUSER, "postgres").await.unwrap();
            c.query_one("SELECT count(*) FROM t", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count(new).await, 2);
    assert_eq!(count(old).await, 0);
    let log = pgvane.log();
    assert!(log.contains("fenced"), "{log}");
    assert!(log.contains("session shut down"), "{log}");
}

fn pooled_failover_config(cluster: &Cluster, port: u16, hold: &str) -> String {
    let health = "interval = \"500ms\"\nfast_interval = \"100ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 3\n";
    format!(
        "{}\n[general]\nfailover_hold_timeout = \"{hold}\"\n\n[[user]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n",
        config(cluster, health, &listener("tx", port, "primary", "mode = \"transaction\""))
    )
}

/// A cluster behind a transaction listener (hold 15 s), with the writers' table in place on
/// every node.
async fn writers_cluster(replicas: usize) -> (Cluster, u16, Pgvane) {
    let cluster = Cluster::start(replicas);
    let tx = free_port();
    let pgvane = Pgvane::start(&pooled_failover_config(&cluster, tx, "15s"), &[tx]);
    let setup = connect(tx, SUPERUSER, "postgres").await.unwrap();
    setup
        .batch_execute("CREATE TABLE w (writer int)")
        .await
        .unwrap();
    cluster.wait_replicated().await;
    (cluster, tx, pgvane)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_costs_idle_transaction_clients_nothing() {
    let (cluster, tx, pgvane) = writers_cluster(2).await;

    let idle = idle_clients(tx, 8).await;
    let writers = Writers::start(tx, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.primary().kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = &cluster.nodes[1];
    new.promote();
    let promoted = Instant::now();

    // Clients that were idle at the crash just go on, held until the new primary is there.
    idle_clients_write_on(&idle, new.port, &pgvane).await;
    eprintln!(
        "promotion -> idle clients' writes done: {:?}",
        promoted.elapsed()
    );
    writers.stop_after_crash(&pgvane).await;
}

#[tokio::test]
async fn no_primary_past_the_hold_timeout_is_a_clean_error() {
    let cluster = Cluster::start(0);
    let (tx, admin) = (free_port(), free_port());
    let text = pooled_failover_config(&cluster, tx, "1s")
        + &format!("\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    let pgvane = Pgvane::start(&text, &[tx, admin]);
    let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();

    cluster.primary().stop();
    pgvane.wait_log("no primary available", PATIENCE).await;
    let started = Instant::now();
    let err = c.batch_execute("SELECT 1").await.unwrap_err();
    let waited = started.elapsed();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "57P03");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "held {waited:?}"
    );
    let sent = r#"pgvane_client_errors_total{sqlstate="57P03"}"#;
    assert_eq!(metric(admin, sent).await, Some(1.0));
    assert!(pgvane
        .log()
        .contains("request failed before reaching a server"));
}

#[tokio::test]
async fn starting_without_a_primary_says_so() {
    let cluster = Cluster::start(0);
    cluster.primary().stop();
    let tx = free_port();
    let pgvane = Pgvane::start(&pooled_failover_config(&cluster, tx, "1s"), &[tx]);
    pgvane
        .wait_log("no primary available at start-up", PATIENCE)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_make_a_switchover_lossless() {
    let (cluster, tx, pgvane) = writers_cluster(1).await;
    let writers = Writers::start(tx, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    pgvane.pause(PATIENCE).await;
    cluster.wait_replicated().await;
    cluster.primary().stop();
    cluster.nodes[1].promote();
    pgvane.wait_log("primary=\"pg1\"", PATIENCE).await;
    pgvane.signal("USR2");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (ok, failed) = writers.stop().await;
    assert_eq!(failed, 0, "\n{}", pgvane.log());
    let c = cluster.nodes[1].connect().await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM w", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows, ok as i64,
        "every acknowledged write is on the new primary"
    );
}

#[tokio::test]
async fn a_replica_behind_in_bytes_leaves_the_replica_target_and_returns() {
    lagging_replica_leaves_and_returns("1048576").await;
}

#[tokio::test]
async fn a_replica_behind_in_replay_time_leaves_the_replica_target_and_returns() {
    lagging_replica_leaves_and_returns("\"1s\"").await;
}

/// A replica whose replay is paused while the primary writes several MB of WAL leaves a
/// replica listener under `max_replica_lag = limit`, and returns once replay resumes.
async fn lagging_replica_leaves_and_returns(limit: &str) {
    let cluster = Cluster::start(1);
    let ro = free_port();
    let health = format!(
        "interval = \"200ms\"\nfast_interval = \"100ms\"\nrise = 2\nfall = 2\nmax_replica_lag = {limit}\n"
    );
    let text = config(&cluster, &health, &listener("ro", ro, "replica", ""))
        + "\n[general]\nfailover_hold_timeout = 0\n";
    let pgvane = Pgvane::start(&text, &[ro]);
    let replica = &cluster.nodes[1];
    let c = connect(ro, SUPERUSER, "postgres").await.unwrap();
    assert_eq!(server_port(&c).await, replica.port);

    // One replayed transaction, so that the replica knows a replay timestamp.
    let p = cluster.primary().connect().await;
    p.batch_execute("CREATE TABLE warm (x int)").await.unwrap();
    cluster.wait_replicated().await;
    let r = replica.connect().await;
    r.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    p.batch_execute(
        "CREATE TABLE big AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 50000) g",
    )
    .await
    .unwrap();
    eventually(PATIENCE, "the replica to leave", || async {
        let err = connect(ro, SUPERUSER, "postgres").await.err()?;
        (err.code().map(|c| c.code()) == Some("57P03")).then_some(())
    })
    .await;
    assert!(pgvane.log().contains("replica too far behind"));

    r.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    eventually(PATIENCE, "the replica to return", || async {
        let c = connect(ro, SUPERUSER, "postgres").await.ok()?;
        (try_server_port(&c).await? == replica.port).then_some(())
    })
    .await;
    assert!(pgvane.log().contains("replica caught up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_passthrough_connection_is_held_until_a_primary_appears() {
    let cluster = Cluster::start(1);
    let rw = free_port();
    let health = "interval = \"200ms\"\nfast_interval = \"100ms\"\n";
    let text = config(&cluster, health, &listener("rw", rw, "primary", ""))
        + "\n[general]\nfailover_hold_timeout = \"10s\"\n";
    let pgvane = Pgvane::start(&text, &[rw]);
    // The listener accepts before the first checks are done: know the primary first.
    pgvane.wait_log("primary elected", PATIENCE).await;
    cluster.primary().stop();
    pgvane.wait_log("no primary available", PATIENCE).await;

    // The client connects while there is no primary; it must wait, not fail.
    let started = Instant::now();
    let client = tokio::spawn(async move { connect(rw, SUPERUSER, "postgres").await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !client.is_finished(),
        "the connection was answered without a primary"
    );
    cluster.nodes[1].promote();
    let c = client
        .await
        .unwrap()
        .expect("held, then served by the new primary");
    assert_eq!(server_port(&c).await, cluster.nodes[1].port);
    assert!(started.elapsed() >= Duration::from_millis(700));
    let log = pgvane.log();
    assert!(log.contains("held until a backend was available"));
    // The election that ends the outage names the primary it replaces.
    let elected = log.lines().rfind(|l| l.contains("primary elected"));
    let (old, new) = (&cluster.nodes[0].name, &cluster.nodes[1].name);
    assert!(
        elected.is_some_and(|l| l.contains(&format!("primary=\"{new}\" previous=\"{old}\""))),
        "{log}"
    );
    let done = format!("failover complete primary=\"{new}\" previous=\"{old}\"");
    assert!(log.contains(&done), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_dying_mid_transaction_gets_its_backend_checked_at_once() {
    let cluster = Cluster::start(0);
    let tx = free_port();
    // Periodic checks only every 60 s: only passive health can notice the crash in time.
    let health =
        "interval = \"60s\"\nfast_interval = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n";
    let text = format!(
        "{}\n[general]\nfailover_hold_timeout = 0\n\n[[user]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n",
        config(&cluster, health, &listener("tx", tx, "primary", "mode = \"transaction\""))
    );
    let pgvane = Pgvane::start(&text, &[tx]);
    pgvane.wait_log("primary elected", PATIENCE).await;
    let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
    let running = tokio::spawn(async move { c.batch_execute("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.primary().kill();
    let err = running
        .await
        .unwrap()
        .expect_err("the transaction's server died");
    assert!(err.as_db_error().is_some() || err.is_closed(), "{err}");
    pgvane.wait_log("to=down", PATIENCE).await;
}

/// Work held for want of a primary dies with its client: one that hangs up (with or without
/// sending more meanwhile) or cancels has its transaction dropped, never sent, so the new
/// primary never commits what its client was told had failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_work_dies_with_its_client() {
    use common::raw::*;
    let cluster = Cluster::start(1);
    cluster
        .primary()
        .connect()
        .await
        .batch_execute("CREATE TABLE held (id int)")
        .await
        .unwrap();
    cluster.wait_replicated().await;
    let (tx, admin) = (free_port(), free_port());
    let listeners = listener("tx", tx, "primary", "mode = \"transaction\"");
    let extra = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    let text = pooled_config(&cluster, &listeners, &extra).replace(
        "[general]\n",
        "[general]\nfailover_hold_timeout = \"60s\"\n",
    );
    let pgvane = Pgvane::start(&text, &[tx, admin]);
    pgvane.wait_log("primary elected", PATIENCE).await;

    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(RawClient::login(tx, SUPERUSER, "postgres").await);
    }
    cluster.primary().stop();
    pgvane.wait_log("no primary available", PATIENCE).await;

    for (i, (c, _)) in clients.iter_mut().enumerate() {
        c.send(&query(&format!("INSERT INTO held VALUES ({i})")))
            .await;
    }
    eventually(PATIENCE, "three held transactions", || async {
        (metric(admin, "pgvane_held_clients").await == Some(3.0)).then_some(())
    })
    .await;
    let mut clients = clients.into_iter();
    // Hangs up.
    drop(clients.next());
    // Sends more, then hangs up.
    let (mut more, _) = clients.next().unwrap();
    more.send(&query("SELECT 1")).await;
    drop(more);
    // Cancels: told so, and the session ends.
    let (mut cancelled, login) = clients.next().unwrap();
    RawClient::cancel(tx, RawClient::key(&login)).await;
    let said = cancelled.until_closed().await;
    assert!(
        said.iter()
            .any(|m| m.field(b'C').as_deref() == Some("57014")),
        "{}",
        show(&said)
    );
    eventually(PATIENCE, "the held work dropped", || async {
        let held = metric(admin, "pgvane_held_clients").await;
        let abandoned = metric(admin, "pgvane_held_abandoned_total").await;
        (held == Some(0.0) && abandoned == Some(3.0)).then_some(())
    })
    .await;

    cluster.nodes[1].promote();
    let c = eventually(PATIENCE, "writes through the new primary", || async {
        let c = connect(tx, SUPERUSER, "postgres").await.ok()?;
        c.batch_execute("INSERT INTO held VALUES (100)")
            .await
            .ok()?;
        Some(c)
    })
    .await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM held WHERE id < 100", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 0,
        "held transactions of clients that gave up were committed"
    );
}

/// A passthrough client held for want of a primary that hangs up is not connected for: its
/// hold ends at once (no server connection is ever opened for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_passthrough_client_that_hangs_up_is_dropped() {
    use tokio::io::AsyncWriteExt;
    let cluster = Cluster::start(1);
    let (rw, admin) = (free_port(), free_port());
    let text = config(
        &cluster,
        "interval = \"200ms\"\n",
        &listener("rw", rw, "primary", ""),
    ) + &format!(
        "\n[general]\nfailover_hold_timeout = \"60s\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
    );
    let pgvane = Pgvane::start(&text, &[rw, admin]);
    pgvane.wait_log("primary elected", PATIENCE).await;
    cluster.primary().stop();
    pgvane.wait_log("no primary available", PATIENCE).await;

    // A startup packet, then nothing: held.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", rw))
        .await
        .unwrap();
    let mut startup = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", SUPERUSER), ("database", "postgres")],
        &mut startup,
    )
    .unwrap();
    s.write_all(&startup).await.unwrap();
    eventually(PATIENCE, "the client held", || async {
        (metric(admin, "pgvane_held_clients").await == Some(1.0)).then_some(())
    })
    .await;
    drop(s);
    eventually(PATIENCE, "the hold dropped", || async {
        let held = metric(admin, "pgvane_held_clients").await;
        let abandoned = metric(admin, "pgvane_held_abandoned_total").await;
        (held == Some(0.0) && abandoned == Some(1.0)).then_some(())
    })
    .await;
}

/// pgvane behind a fault-injecting relay in front of a one-node cluster: a transaction
/// listener (clients log in with trust; hold 60 s) and the admin API. Periodic checks only
/// every 60 s, so a check that comes sooner was triggered by the data path.
async fn behind_relay() -> (Cluster, common::relay::Relay, u16, u16, Pgvane) {
    let cluster = Cluster::start(0);
    let relay = common::relay::Relay::start(cluster.primary().port).await;
    let (tx, admin) = (free_port(), free_port());
    let health =
        "interval = \"60s\"\nfast_interval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n";
    let text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[auth]\ntype = \"trust\"\n[general]\nfailover_hold_timeout = \"60s\"\n\n[[user]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n",
        config(&relay, health, &listener("tx", tx, "primary", "mode = \"transaction\""))
    );
    let pgvane = Pgvane::start(&text, &[tx, admin]);
    pgvane.wait_log("primary elected", PATIENCE).await;
    (cluster, relay, tx, admin, pgvane)
}

/// A client whose application_name differs from the pooled connection's, so that the
/// connection is set (set_config of application_name) before the client's request is sent.
async fn client_named(tx: u16, name: &str) -> common::raw::RawClient {
    let params = [
        ("user", SUPERUSER),
        ("database", "postgres"),
        ("application_name", name),
    ];
    let (c, login) = common::raw::RawClient::login_with(tx, &params).await;
    assert_eq!(login.last().map(|m| m.tag), Some(b'Z'), "logged in");
    c
}

async fn answer(c: &mut common::raw::RawClient, sql: &str) -> Vec<String> {
    use common::raw::*;
    c.send(&query(sql)).await;
    let got = c.until_ready().await;
    assert!(got.iter().all(|m| m.tag != b'E'), "{}", show(&got));
    rows(&got)
}

/// A pooled server connection that died while idle, unnoticed until pgvane sets it up for the
/// next client, has had nothing of that client's: the request goes to a new connection
/// instead of failing with 08006, and the backend is checked at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_found_dead_before_use_is_replaced() {
    let (_cluster, relay, tx, _admin, _pgvane) = behind_relay().await;
    let mut a = client_named(tx, "a").await;
    assert_eq!(answer(&mut a, "SELECT 1").await, ["1"]);

    relay.reset_next_sending(b"set_config(E'application_name'");
    let mut b = client_named(tx, "b").await;
    assert_eq!(
        answer(&mut b, "SELECT current_setting('application_name')").await,
        ["b"]
    );
    assert_eq!(
        relay.resets(),
        1,
        "the idle connection was cut as it was set"
    );
    // Both clients go on.
    assert_eq!(answer(&mut a, "SELECT 2").await, ["2"]);
    assert_eq!(answer(&mut b, "SELECT 3").await, ["3"]);
}

/// When the connection set up for a client dies and the backend then refuses connections (a
/// crash, a restart), the request is held as for a failover, the backend reported at once,
/// and served when the backend is back, even though no check ever marked it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_backend_fails_before_it_was_sent_is_held_not_failed() {
    let (_cluster, relay, tx, admin, pgvane) = behind_relay().await;
    let mut a = client_named(tx, "a").await;
    assert_eq!(answer(&mut a, "SELECT 1").await, ["1"]);

    relay.reset_next_sending(b"set_config(E'application_name'");
    relay.refuse(true);
    let mut b = client_named(tx, "b").await;
    b.send(&common::raw::query("SELECT 'served'")).await;
    eventually(PATIENCE, "the request held", || async {
        (metric(admin, "pgvane_held_clients").await == Some(1.0)).then_some(())
    })
    .await;
    let reported = r#"pgvane_backend_unreachable_total{backend="relayed"}"#;
    eventually(
        PATIENCE,
        "the backend reported by the data path",
        || async { (metric(admin, reported).await >= Some(1.0)).then_some(()) },
    )
    .await;
    relay.refuse(false);
    let got = b.until_ready().await;
    assert_eq!(common::raw::rows(&got), ["served"], "{}", pgvane.log());
    assert_eq!(metric(admin, "pgvane_held_clients").await, Some(0.0));
}
