//! Routing through pgvane's passthrough listeners against a real primary and replicas.

mod common;

use std::collections::HashMap;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FAST_HEALTH: &str = "interval = \"200ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n";

async fn is_in_recovery(c: &tokio_postgres::Client) -> bool {
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn writes_go_to_the_primary_and_reads_spread_over_replicas() {
    let cluster = Cluster::start(2);
    let (rw, ro, any) = (free_port(), free_port(), free_port());
    let listeners = listener("rw", rw, "primary", "")
        + &listener("ro", ro, "replica", "balance = \"round-robin\"")
        + &listener("any", any, "any", "");
    let _pgvane = Pgvane::start(&config(&cluster, FAST_HEALTH, &listeners), &[rw, ro, any]);

    // A write through the primary listener lands on the primary.
    let c = connect(rw, SUPERUSER, "postgres").await.unwrap();
    assert!(!is_in_recovery(&c).await);
    assert_eq!(server_port(&c).await, cluster.primary().port);
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (42)")
        .await
        .unwrap();
    let direct = cluster.primary().connect().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t WHERE id = 42", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // The replica listener lands on replicas only, and round-robin uses both.
    let mut seen = HashMap::new();
    for _ in 0..6 {
        let c = connect(ro, SUPERUSER, "postgres").await.unwrap();
        assert!(is_in_recovery(&c).await);
        *seen.entry(server_port(&c).await).or_insert(0) += 1;
    }
    let replicas: Vec<u16> = cluster.nodes[1..].iter().map(|n| n.port).collect();
    assert_eq!(seen.len(), 2, "both replicas used: {seen:?}");
    for p in &replicas {
        assert_eq!(seen[p], 3, "round-robin is even: {seen:?}");
    }

    // The any listener uses all three nodes.
    let mut seen = HashMap::new();
    for _ in 0..6 {
        let c = connect(any, SUPERUSER, "postgres").await.unwrap();
        *seen.entry(server_port(&c).await).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[tokio::test]
async fn least_conn_balances_open_sessions() {
    let cluster = Cluster::start(2);
    let ro = free_port();
    let listeners = listener("ro", ro, "replica", "balance = \"least-conn\"");
    let _pgvane = Pgvane::start(&config(&cluster, FAST_HEALTH, &listeners), &[ro]);

    // Hold 2 sessions open on whatever replica they land on, then 4 more: least-conn must
    // end with 3 on each, whatever order the first ones took.
    let mut held = Vec::new();
    for _ in 0..6 {
        let c = connect(ro, SUPERUSER, "postgres").await.unwrap();
        let port = server_port(&c).await;
        held.push((c, port));
    }
    for n in &cluster.nodes[1..] {
        let count = held.iter().filter(|(_, p)| *p == n.port).count();
        assert_eq!(count, 3, "sessions on {}: {count}", n.name);
    }
}

#[tokio::test]
async fn no_primary_gives_a_postgres_fatal_error() {
    let cluster = Cluster::start(1);
    let (rw, ro) = (free_port(), free_port());
    let listeners = listener("rw", rw, "primary", "")
        + &listener("ro", ro, "replica", "fallback_to_primary = false");
    // No failover hold: refuse at once when the target has no backend.
    let text =
        config(&cluster, FAST_HEALTH, &listeners) + "\n[general]\nfailover_hold_timeout = 0\n";
    let pgvane = Pgvane::start(&text, &[rw, ro]);

    cluster.primary().stop();
    // Until the checks mark it down, the stopped primary is still routed to and the
    // client gets 08006 (cannot connect); then the listener has no primary at all.
    let err = eventually(PATIENCE, "primary marked down", || async {
        let err = connect(rw, SUPERUSER, "postgres").await.err()?;
        (err.code().map(|c| c.code()) == Some("57P03")).then_some(err)
    })
    .await;
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err}"));
    assert_eq!(db.code().code(), "57P03");
    assert_eq!(db.message(), "no primary available");
    assert!(db.detail().unwrap().contains("listener \"rw\""), "{db:?}");

    // psql prints it the way PostgreSQL's own refusals look.
    let out = psql(rw, "postgres")
        .args(["-c", "SELECT 1"])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("psql");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("FATAL:  no primary available"), "{stderr}");

    // The replica listener is unaffected.
    let c = connect(ro, SUPERUSER, "postgres").await.unwrap();
    assert!(is_in_recovery(&c).await);
    assert!(pgvane.log().contains("client refused"));
}

#[tokio::test]
async fn replica_listener_falls_back_to_the_primary() {
    let cluster = Cluster::start(1);
    let ro = free_port();
    let listeners = listener("ro", ro, "replica", "fallback_to_primary = true");
    let _pgvane = Pgvane::start(&config(&cluster, FAST_HEALTH, &listeners), &[ro]);

    cluster.nodes[1].stop();
    let port = eventually(PATIENCE, "fallback to primary", || async {
        let c = connect(ro, SUPERUSER, "postgres").await.ok()?;
        let p = try_server_port(&c).await?;
        (p == cluster.primary().port).then_some(p)
    })
    .await;
    assert_eq!(port, cluster.primary().port);
}

#[tokio::test]
async fn hostile_startup_bytes_are_refused_without_harm() {
    let cluster = Cluster::start(0);
    let (rw, ro) = (free_port(), free_port());
    let listeners = listener("rw", rw, "primary", "") + &listener("ro", ro, "replica", "");
    // No failover hold: refuse at once when the target has no backend.
    let text =
        config(&cluster, FAST_HEALTH, &listeners) + "\n[general]\nfailover_hold_timeout = 0\n";
    let pgvane = Pgvane::start(&text, &[rw, ro]);

    // No replica: pgvane itself parses the startup packet. A 4 GiB length must be refused
    // without allocating, SSL must be declined with 'N', and none of it disturbs others.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", ro))
        .await
        .unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer to a hostile length");

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", ro))
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap(); // SSLRequest
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(&[0, 0, 0, 9, 0, 3, 0, 0]).await.unwrap(); // StartupMessage cut short
    drop(s);

    let c = connect(rw, SUPERUSER, "postgres").await.unwrap();
    assert_eq!(server_port(&c).await, cluster.primary().port);
    assert!(pgvane.log().contains("bad startup"), "{}", pgvane.log());
}
