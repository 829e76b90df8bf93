//! Failover benchmark: writers commit small transactions through a proxy while the primary
//! crashes or is switched over, on real clusters made by the test harness.
//!
//!   cargo bench --bench failover -- MODE [RUNS] [WRITERS]
//!
//! Plain streaming replication (primary + replica, pgvane only, SQL checks):
//! - `crash`: kill -9 of the postmaster, then `pg_ctl promote`;
//! - `switchover`: PAUSE (SIGUSR1), clean stop of the primary, promotion, RESUME (SIGUSR2)
//!   once pgvane has elected the new primary.
//!
//! Patroni (etcd + 3 nodes, ttl 10 / loop_wait 2), pgvane and HAProxy side by side in front
//! of the same cluster, each with its own writers and 8 idle clients. pgvane: Patroni checks
//! with default settings, transaction listener. HAProxy: the configuration Patroni ships
//! (`option httpchk`, `inter 3s fall 3 rise 2 on-marked-down shutdown-sessions`).
//! - `patroni-crash`: the leader's Patroni and PostgreSQL are frozen, then killed;
//! - `patroni-switchover`: `patronictl switchover`, no pause;
//! - `patroni-switchover-paused`: the same inside PAUSE/RESUME over pgvane's admin API
//!   (HAProxy has no such thing).
//!
//! Reported per run: promotion (the new leader answering 200 on `/primary` for Patroni, the
//! return of `pg_ctl promote` otherwise) -> first committed write, failed attempts, the
//! longest time any writer went without a commit, and for Patroni how many idle clients
//! failed their next transaction (15 s after the promotion) and the phantom commits: rows
//! on the new leader whose INSERT the writer saw fail.
//!
//! With `PGVANE_TIMELINE=FILE`, a Patroni mode also writes the first run's commits per
//! 100 ms through each proxy, from 2 s before the event to 15 s after the promotion, as
//! CSV (`proxy,ms_after_event,commits`, the promotion's time in a `# promoted_ms=` line):
//! the failover timeline chart of `benches/public.sh`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::patroni::PatroniCluster;
use common::*;
use std::process::{Child, Command, Stdio};

/// What one writer saw.
#[derive(Default)]
struct Seen {
    commits: Vec<Instant>,
    failed: u32,
    /// Rows whose INSERT the writer saw fail: none may exist afterwards.
    failed_ids: Vec<i64>,
}

/// Writes rows `first`, `first + 1`, ... through `port`, one autocommit INSERT each.
async fn writer(port: u16, first: i64, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut conn = None;
    let mut id = first;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            conn = connect(port, SUPERUSER, "postgres").await.ok();
        }
        id += 1;
        let ok = match &conn {
            Some(c) => c
                .batch_execute(&format!("INSERT INTO w VALUES ({id})"))
                .await
                .is_ok(),
            None => false,
        };
        if ok {
            seen.lock().unwrap().commits.push(Instant::now());
        } else {
            let mut seen = seen.lock().unwrap();
            seen.failed += 1;
            seen.failed_ids.push(id);
            conn = None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Outcome {
    promotion_to_write: Duration,
    failed: u32,
    longest_stall: Duration,
    failed_ids: Vec<i64>,
    /// Every writer's commits.
    commits: Vec<Instant>,
}

/// Writers through one proxy, each with what it saw.
struct WriterGroup {
    stop: Arc<AtomicBool>,
    seen: Vec<Arc<Mutex<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WriterGroup {
    /// `writers` writers through `port`; writer k writes ids from `(group + k) * 10^7` on.
    fn start(port: u16, writers: usize, group: i64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Vec<Arc<Mutex<Seen>>> = (0..writers).map(|_| Arc::default()).collect();
        let tasks = seen
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let first = (group + k as i64) * 10_000_000;
                tokio::spawn(writer(port, first, stop.clone(), s.clone()))
            })
            .collect();
        Self { stop, seen, tasks }
    }

    /// Stops the writers and sums up what they saw around `promoted`.
    async fn finish(self, promoted: Instant) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let mut first_after = None::<Instant>;
        let mut failed = 0;
        let mut longest_stall = Duration::ZERO;
        let mut failed_ids = Vec::new();
        let mut commits = Vec::new();
        for s in &self.seen {
            let s = s.lock().unwrap();
            failed += s.failed;
            failed_ids.extend(&s.failed_ids);
            commits.extend(&s.commits);
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
            failed_ids,
            commits,
        }
    }
}

/// Rows of `ids` (writes their clients saw fail) that exist on the server at `port`.
async fn phantoms(port: u16, ids: &[i64]) -> i64 {
    let c = connect(port, SUPERUSER, "postgres").await.unwrap();
    c.query_one("SELECT count(*) FROM w WHERE x = ANY($1)", &[&ids])
        .await
        .unwrap()
        .get(0)
}

async fn run_once(mode: &str, writers: usize) -> Outcome {
    let cluster = Cluster::start(1);
    let tx = free_port();
    let text = format!(
        "{}\n[general]\nmax_client_conn = 1000\n[[user]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n",
        config(&cluster, "", &listener("tx", tx, "primary", "mode = \"transaction\""))
    );
    let pgvane = Pgvane::start(&text, &[tx]);
    let setup = connect(tx, SUPERUSER, "postgres").await.unwrap();
    setup
        .batch_execute("CREATE TABLE w (x bigint)")
        .await
        .unwrap();
    cluster.wait_replicated().await;

    let group = WriterGroup::start(tx, writers, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let promoted = match mode {
        "crash" => {
            cluster.primary().kill();
            cluster.nodes[1].promote();
            Instant::now()
        }
        _ => {
            pgvane.pause(Duration::from_secs(10)).await;
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
    group.finish(promoted).await
}

/// A running HAProxy, stopped on drop (also when a run panics).
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy as Patroni ships it, in front of `cluster`, on `port`.
fn start_haproxy(cluster: &PatroniCluster, port: u16, dir: &std::path::Path) -> Haproxy {
    let mut cfg = format!(
        "global\n    maxconn 100\ndefaults\n    mode tcp\n    retries 2\n    timeout client 30m\n    \
         timeout connect 4s\n    timeout server 30m\n    timeout check 5s\n\
         listen batman\n    bind 127.0.0.1:{port}\n    option httpchk\n    http-check expect status 200\n    \
         default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\n"
    );
    for n in &cluster.nodes {
        cfg += &format!(
            "    server {} 127.0.0.1:{} maxconn 100 check port {}\n",
            n.name, n.pg_port, n.api_port
        );
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&path)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy (Debian package `haproxy`) is needed for the Patroni modes");
    let haproxy = Haproxy(child);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    haproxy
}

/// Clients that wrote once and then sat idle through the failover; how many fail their
/// next write.
async fn idle_failures(idle: &[tokio_postgres::Client]) -> usize {
    let mut failed = 0;
    for c in idle {
        if c.batch_execute("INSERT INTO w VALUES (2)").await.is_err() {
            failed += 1;
        }
    }
    failed
}

/// One Patroni failover, seen through pgvane and HAProxy at once: (event -> new leader,
/// pgvane's outcome and idle failures, HAProxy's).
/// What one proxy's clients saw: writers' outcome, idle clients that failed, phantom commits.
type Seen3 = (Outcome, usize, i64);

/// The event (crash or switchover), the promotion, and what each proxy's clients saw.
async fn run_patroni(mode: &str, writers: usize) -> (Instant, Instant, Seen3, Seen3) {
    let mut cluster = tokio::task::spawn_blocking(|| PatroniCluster::start(3))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tx, admin, ha) = (free_port(), free_port(), free_port());
    let text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[general]\nmax_client_conn = 1000\n\
         [[user]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n",
        config(
            &cluster,
            "method = \"patroni\"\n",
            &listener("tx", tx, "primary", "mode = \"transaction\"")
        )
    );
    let pgvane = Pgvane::start(&text, &[tx, admin]);
    let haproxy = start_haproxy(&cluster, ha, dir.path());
    pgvane
        .wait_log("primary elected", Duration::from_secs(10))
        .await;
    let setup = connect(tx, SUPERUSER, "postgres").await.unwrap();
    setup
        .batch_execute("CREATE TABLE w (x bigint)")
        .await
        .unwrap();
    // HAProxy starts with every server up and takes fall x inter (9 s) to mark the replicas
    // down: wait until six connections in a row reach the leader.
    eventually(
        Duration::from_secs(30),
        "HAProxy to route to the leader only",
        || async {
            for _ in 0..6 {
                let c = connect(ha, SUPERUSER, "postgres").await.ok()?;
                if try_server_port(&c).await? != cluster.nodes[0].pg_port {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let (idle_pgvane, idle_haproxy) = (idle_clients(tx, 8).await, idle_clients(ha, 8).await);
    let (via_pgvane, via_haproxy) = (
        WriterGroup::start(tx, writers, 1),
        WriterGroup::start(ha, writers, 101),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let event = Instant::now();
    let promoted = if mode == "patroni-crash" {
        cluster.crash(0);
        cluster.wait_new_leader(0, Duration::from_secs(60)).await;
        Instant::now()
    } else {
        let paused = mode == "patroni-switchover-paused";
        if paused {
            let (code, body) = http_async(admin, "POST", "/pause").await;
            assert_eq!(code, 200, "{body}");
        }
        let candidate_api = cluster.nodes[1].api_port;
        let switch = tokio::task::spawn_blocking(move || {
            cluster.switchover(0, 1);
            cluster
        });
        // The leader changes while patronictl is still running: watch for it alongside.
        let promoted = loop {
            if http_async(candidate_api, "GET", "/primary").await.0 == 200 {
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        cluster = switch.await.unwrap();
        eventually(Duration::from_secs(10), "pgvane to elect pt1", || async {
            let (_, body) = http_async(admin, "GET", "/status").await;
            body.contains("\"primary\": \"pt1\"").then_some(())
        })
        .await;
        if paused {
            let (code, body) = http_async(admin, "POST", "/resume").await;
            assert_eq!(code, 200, "{body}");
        }
        promoted
    };
    // Long enough for HAProxy to mark the old leader down (fall 3 x inter 3 s).
    tokio::time::sleep(Duration::from_secs(15)).await;
    let pgvane_idle = idle_failures(&idle_pgvane).await;
    let haproxy_idle = idle_failures(&idle_haproxy).await;
    let pgvane_outcome = via_pgvane.finish(promoted).await;
    let haproxy_outcome = via_haproxy.finish(promoted).await;
    let leader = cluster.leader().expect("a leader after the failover");
    let leader_port = cluster.nodes[leader].pg_port;
    let pgvane_phantoms = phantoms(leader_port, &pgvane_outcome.failed_ids).await;
    let haproxy_phantoms = phantoms(leader_port, &haproxy_outcome.failed_ids).await;
    drop((haproxy, pgvane, cluster));
    (
        event,
        promoted,
        (pgvane_outcome, pgvane_idle, pgvane_phantoms),
        (haproxy_outcome, haproxy_idle, haproxy_phantoms),
    )
}

/// Commits per 100 ms through each proxy, from 2 s before `event` to 15 s after `promoted`.
fn timeline_csv(event: Instant, promoted: Instant, outcomes: &[(&str, &Outcome)]) -> String {
    const BUCKET_MS: i64 = 100;
    let ms = |t: Instant| {
        if t >= event {
            (t - event).as_millis() as i64
        } else {
            -((event - t).as_millis() as i64)
        }
    };
    // Whole buckets only: a partial last one would show as a drop.
    let from = -2000;
    let to = from + (ms(promoted) + 15_000 - from) / BUCKET_MS * BUCKET_MS;
    let mut csv = format!(
        "# promoted_ms={}\nproxy,ms_after_event,commits\n",
        ms(promoted)
    );
    for (name, o) in outcomes {
        let mut buckets = vec![0u32; ((to - from) / BUCKET_MS) as usize];
        for t in o
            .commits
            .iter()
            .map(|t| ms(*t))
            .filter(|t| (from..to).contains(t))
        {
            buckets[((t - from) / BUCKET_MS) as usize] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            csv += &format!("{name},{},{n}\n", from + i as i64 * BUCKET_MS);
        }
    }
    csv
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
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ms = |d: Duration| d.as_millis();
    match mode.as_str() {
        "crash" | "switchover" => {
            println!(
                "| {mode} run | promotion -> first write | failed transactions | longest stall |"
            );
            println!("|---|---:|---:|---:|");
            for run in 1..=runs {
                let o = rt.block_on(run_once(&mode, writers));
                println!(
                    "| {run} | {} ms | {} | {} ms |",
                    ms(o.promotion_to_write),
                    o.failed,
                    ms(o.longest_stall)
                );
            }
        }
        "patroni-crash" | "patroni-switchover" | "patroni-switchover-paused" => {
            println!("| {mode} run | proxy | event -> new leader | promotion -> first write | failed attempts | longest stall | idle clients failed | phantom commits |");
            println!("|---|---|---:|---:|---:|---:|---:|---:|");
            let timeline = std::env::var_os("PGVANE_TIMELINE");
            for run in 1..=runs {
                let (event, promoted, pgvane, haproxy) = rt.block_on(run_patroni(&mode, writers));
                if let (1, Some(file)) = (run, &timeline) {
                    let csv = timeline_csv(event, promoted, &[("pgvane", &pgvane.0), ("HAProxy", &haproxy.0)]);
                    std::fs::write(file, csv).expect("PGVANE_TIMELINE is writable");
                }
                let to_leader = promoted - event;
                for (name, (o, idle, phantom)) in [("pgvane", pgvane), ("HAProxy", haproxy)] {
                    println!(
                        "| {run} | {name} | {} ms | {} ms | {} | {} ms | {idle} of 8 | {phantom} |",
                        ms(to_leader),
                        ms(o.promotion_to_write),
                        o.failed,
                        ms(o.longest_stall)
                    );
                }
            }
        }
        _ => panic!("mode is crash, switchover, patroni-crash, patroni-switchover or patroni-switchover-paused"),
    }
}
