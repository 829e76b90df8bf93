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
    let elapsed = eventually(
        Duration::from_secs(10),
        "a write through pgvane",
        || async {
            let c = connect(rw, SUPERUSER, "postgres").await.ok()?;
            if let Err(e) = c.batch_execute("INSERT INTO t VALUES (1)").await {
                eprintln!("write failed: {e:?}");
                return None;
            }
            (try_server_port(&c).await? == new_primary.port).then(|| promoted.elapsed())
        },
    )
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
    eventually(
        Duration::from_secs(5),
        "writes routed to the new primary",
        || async {
            let c = connect(rw, SUPERUSER, "postgres").await.ok()?;
            (try_server_port(&c).await? == new.port).then_some(())
        },
    )
    .await;

    // The old primary is alive, so only pgvane can have closed this session.
    eventually(
        Duration::from_secs(2),
        "the pinned session to be cut",
        || async { cut.simple_query("SELECT 1").await.is_err().then_some(()) },
    )
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
