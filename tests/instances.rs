//! Several pgvane instances in front of one cluster: each follows it on its own, and the
//! operator's helper (`scripts/pgvane-all`) runs an admin command on all of them.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Two instances, writers through each; the primary crashes and a replica is promoted.
/// Both route writes to the new primary within the bound a single instance meets, each
/// instance's writes go to the old primary and then to the new one only (never back), and
/// no write lands on the old primary once one landed on the new: never two write targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_follow_a_failover_each_on_its_own() {
    let cluster = Cluster::start(1);
    let health = "interval = \"500ms\"\nfast_interval = \"100ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 3\n";
    let mut instances = Vec::new();
    for _ in 0..2 {
        let (tx, admin) = (free_port(), free_port());
        let text = format!(
            "{}\n[general]\nfailover_hold_timeout = \"15s\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[[user]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n",
            config(&cluster, health, &listener("tx", tx, "primary", "mode = \"transaction\""))
        );
        let pgvane = Pgvane::start(&text, &[tx, admin]);
        instances.push((tx, admin, pgvane));
    }
    let setup = connect(instances[0].0, SUPERUSER, "postgres")
        .await
        .unwrap();
    setup
        .batch_execute("CREATE TABLE w (instance int)")
        .await
        .unwrap();
    cluster.wait_replicated().await;

    // The helper pauses both (each answers once its transactions are done), then resumes.
    let admins: Vec<String> = instances
        .iter()
        .map(|(_, admin, _)| format!("127.0.0.1:{admin}"))
        .collect();
    let helper = |args: &[&str]| {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pgvane-all"))
            .args(args)
            .arg("--")
            .args(&admins)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    helper(&["pause"]);
    for (_, admin, _) in &instances {
        let (_, status) = http_async(*admin, "GET", "/status").await;
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["paused"], true, "{status}");
    }
    helper(&["resume"]);
    for (_, admin, _) in &instances {
        let (_, status) = http_async(*admin, "GET", "/status").await;
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["paused"], false, "{status}");
    }

    // Writers: two per instance, each write recording when it was acknowledged and where.
    let acked: Arc<Mutex<Vec<(Instant, usize, u16)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, (tx, _, _)) in instances.iter().enumerate() {
        for _ in 0..2 {
            let (acked, stop, tx) = (acked.clone(), stop.clone(), *tx);
            writers.push(tokio::spawn(async move {
                let mut client = connect(tx, SUPERUSER, "postgres").await.ok();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Some(c) = &client else {
                        client = connect(tx, SUPERUSER, "postgres").await.ok();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let sql = format!("INSERT INTO w VALUES ({i}) RETURNING inet_server_port()");
                    match c.simple_query(&sql).await {
                        Ok(messages) => {
                            let port = first_value(&messages).and_then(|p| p.parse().ok());
                            if let Some(port) = port {
                                acked.lock().unwrap().push((Instant::now(), i, port));
                            }
                        }
                        Err(_) if c.is_closed() => client = None,
                        Err(_) => {}
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
    }
    let (old, new) = (cluster.primary(), &cluster.nodes[1]);
    eventually(PATIENCE, "writes through both instances", || {
        let acked = acked.clone();
        async move {
            let acked = acked.lock().unwrap();
            (0..2)
                .all(|i| acked.iter().any(|(_, w, p)| *w == i && *p == old.port))
                .then_some(())
        }
    })
    .await;

    old.kill();
    new.promote();
    let promoted = Instant::now();
    let firsts = eventually(
        PATIENCE,
        "both instances writing to the new primary",
        || {
            let acked = acked.clone();
            async move {
                let acked = acked.lock().unwrap();
                let first = |i: usize| {
                    acked
                        .iter()
                        .find(|(_, w, p)| *w == i && *p == new.port)
                        .map(|(at, _, _)| *at)
                };
                Some([first(0)?, first(1)?])
            }
        },
    )
    .await;
    // A few more writes on the new primary, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    for (i, first) in firsts.iter().enumerate() {
        let took = first.saturating_duration_since(promoted);
        eprintln!("instance {i}: promotion -> first write on the new primary: {took:?}");
        assert!(
            took < Duration::from_millis(1500 + 1000),
            "instance {i} took {took:?}\n{}",
            instances[i].2.log()
        );
    }
    let acked = acked.lock().unwrap();
    let first_new = firsts.iter().min().copied().unwrap();
    for (at, i, port) in acked.iter() {
        assert!(
            *port == old.port || *port == new.port,
            "instance {i} wrote to {port}"
        );
        assert!(
            !(*port == old.port && *at > first_new),
            "instance {i} wrote to the old primary after a write on the new one"
        );
    }
    for i in 0..2 {
        let ports: Vec<u16> = acked
            .iter()
            .filter(|(_, w, _)| *w == i)
            .map(|(_, _, p)| *p)
            .collect();
        let switched = ports.iter().position(|p| *p == new.port).unwrap();
        assert!(
            ports[switched..].iter().all(|p| *p == new.port),
            "instance {i} went back: {ports:?}"
        );
    }
}
