//! Failover benchmark: writers commit small transactions through pgvane's transaction
//! listener (default health settings) while the primary crashes or is switched over, on a
//! real primary + replica made by the test harness.
//!
//!   cargo bench --bench failover -- [crash|switchover] [RUNS] [WRITERS]
//!
//! Reports per run: promotion -> first committed write through pgvane, failed transactions,
//! and the longest time any writer went without a commit. `crash` is kill -9 of the
//! postmaster then `pg_ctl promote`; `switchover` is PAUSE (SIGUSR1), a clean stop of the
//! primary, promotion, and RESUME (SIGUSR2) once pgvane has elected the new primary.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// What one writer saw.
#[derive(Default)]
struct Seen {
    commits: Vec<Instant>,
    failed: u32,
}

async fn writer(port: u16, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut conn = None;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            conn = connect(port, SUPERUSER, "postgres").await.ok();
        }
        let ok = match &conn {
            Some(c) => c.batch_execute("INSERT INTO w VALUES (1)").await.is_ok(),
            None => false,
        };
        if ok {
            seen.lock().unwrap().commits.push(Instant::now());
        } else {
            seen.lock().unwrap().failed += 1;
            conn = None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Outcome {
    promotion_to_write: Duration,
    failed: u32,
    longest_stall: Duration,
}

async fn run_once(mode: &str, writers: usize) -> Outcome {
    let cluster = Cluster::start(1);
    let tx = free_port();
    let text = format!(
        "[health.sql]\nuser = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n\
         [general]\nmax_client_conn = 1000\n[[user]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n{}{}",
        cluster
            .nodes
            .iter()
            .map(|n| format!("\n[[backend]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\n", n.name, n.port))
            .collect::<String>(),
        listener("tx", tx, "primary", "mode = \"transaction\"")
    );
    let pgvane = Pgvane::start(&text, &[tx]);
    let setup = connect(tx, SUPERUSER, "postgres").await.unwrap();
    setup.batch_execute("CREATE TABLE w (x int)").await.unwrap();
    cluster.wait_replicated().await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen: Vec<Arc<Mutex<Seen>>> = (0..writers).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = seen
        .iter()
        .map(|s| tokio::spawn(writer(tx, stop.clone(), s.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let promoted = match mode {
        "crash" => {
            cluster.primary().kill();
            cluster.nodes[1].promote();
            Instant::now()
        }
        _ => {
            pgvane.signal("USR1");
            pgvane
                .wait_log("PAUSE complete", Duration::from_secs(10))
                .await;
            cluster.primary().stop();
            cluster.nodes[1].promote();
            let promoted = Instant::now();
            pgvane
                .wait_log("primary=\"pg1\"", Duration::from_secs(10))
                .await;
            pgvane.signal("USR2");
            promoted
        }
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let mut first_after = None::<Instant>;
    let mut failed = 0;
    let mut longest_stall = Duration::ZERO;
    for s in &seen {
        let s = s.lock().unwrap();
        failed += s.failed;
        if let Some(t) = s.commits.iter().find(|t| **t > promoted) {
            first_after = Some(first_after.map_or(*t, |f| f.min(*t)));
        }
        for pair in s.commits.windows(2) {
            longest_stall = longest_stall.max(pair[1] - pair[0]);
        }
    }
    Outcome {
        promotion_to_write: first_after.expect("a write after the promotion") - promoted,
        failed,
        longest_stall,
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mode = args
        .first()
        .map(String::as_str)
        .unwrap_or("crash")
        .to_owned();
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let writers: usize = args.get(2).and_then(|w| w.parse().ok()).unwrap_or(8);
    assert!(
        mode == "crash" || mode == "switchover",
        "mode is crash or switchover"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("| {mode} run | promotion -> first write | failed transactions | longest stall |");
    println!("|---|---:|---:|---:|");
    for run in 1..=runs {
        let o = rt.block_on(run_once(&mode, writers));
        println!(
            "| {run} | {} ms | {} | {} ms |",
            o.promotion_to_write.as_millis(),
            o.failed,
            o.longest_stall.as_millis()
        );
    }
}
