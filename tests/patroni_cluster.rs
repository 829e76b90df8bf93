//! Failover against a real Patroni cluster (etcd + three Patroni nodes on loopback), with
//! pgvane in Patroni check mode in front: a planned `patronictl switchover` inside PAUSE /
//! RESUME, and a crash of the leader.

mod common;

use std::time::{Duration, Instant};

use common::patroni::PatroniCluster;
use common::*;

/// Patroni checks every 500 ms, a transaction listener on the primary, a 30 s hold (a
/// crashed leader's key lives for ttl = 10 s).
fn patroni_config(cluster: &PatroniCluster, tx: u16) -> String {
    let health = "method = \"patroni\"\ninterval = \"500ms\"\nfast_interval = \"100ms\"\ntimeout = \"500ms\"\n";
    format!(
        "{}\n[general]\nfailover_hold_timeout = \"30s\"\n\n[[user]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n",
        config(cluster, health, &listener("tx", tx, "primary", "mode = \"transaction\""))
    )
}

/// The cluster, pgvane in front of it, table `w` for the writers and eight clients that
/// have written once and then sit idle.
async fn patroni_with_idle_clients() -> (PatroniCluster, Pgvane, u16, Vec<tokio_postgres::Client>) {
    let cluster = tokio::task::spawn_blocking(|| PatroniCluster::start(3))
        .await
        .unwrap();
    let tx = free_port();
    let pgvane = Pgvane::start(&patroni_config(&cluster, tx), &[tx]);
    pgvane.wait_log("primary elected", PATIENCE).await;
    let setup = connect(tx, SUPERUSER, "postgres").await.unwrap();
    setup
        .batch_execute("CREATE TABLE w (writer int)")
        .await
        .unwrap();
    let idle = idle_clients(tx, 8).await;
    (cluster, pgvane, tx, idle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_switchover_inside_pause_fails_no_transaction() {
    let (cluster, pgvane, tx, idle) = patroni_with_idle_clients().await;
    let writers = Writers::start(tx, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    pgvane.pause(PATIENCE).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.switchover(0, 1);
        cluster
    })
    .await
    .unwrap();
    let switched = Instant::now();
    let new = &cluster.nodes[1];
    pgvane
        .wait_log(&format!("primary=\"{}\"", new.name), PATIENCE)
        .await;
    eprintln!(
        "switchover done -> pgvane elected {}: {:?}",
        new.name,
        switched.elapsed()
    );
    pgvane.signal("USR2");

    idle_clients_write_on(&idle, new.pg_port, &pgvane).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed) = writers.stop().await;
    eprintln!("writers: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "\n{}", pgvane.log());
    assert!(ok > 0);

    // Every acknowledged write is on the new leader: 8 + 8 from the idle clients.
    let c = connect(new.pg_port, SUPERUSER, "postgres").await.unwrap();
    let rows: i64 = c
        .query_one("SELECT count(*) FROM w", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, ok as i64 + 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_leader_crash_costs_idle_clients_nothing() {
    let (mut cluster, pgvane, tx, idle) = patroni_with_idle_clients().await;
    let writers = Writers::start(tx, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.crash(0);
    let crashed = Instant::now();
    let leader = cluster.wait_new_leader(0, Duration::from_secs(60)).await;
    let promoted = Instant::now();
    eprintln!(
        "crash -> new leader answers /primary: {:?}",
        promoted - crashed
    );
    let new = &cluster.nodes[leader];

    idle_clients_write_on(&idle, new.pg_port, &pgvane).await;
    eprintln!(
        "new leader -> idle clients' writes done: {:?}",
        promoted.elapsed()
    );
    writers.stop_after_crash(&pgvane).await;
    assert!(
        pgvane.log().contains(&format!("primary=\"{}\"", new.name)),
        "{}",
        pgvane.log()
    );
}
