//! Flood benchmark: legitimate clients run pgbench through pgvane's transaction listener
//! while a password-guessing flood from many client addresses hits the same listener.
//!
//!   cargo bench --bench flood -- [SECONDS] [CONNECTS_PER_SECOND] [ADDRESSES] [REPETITIONS]
//!
//! Defaults: 20 s, 3000 connects/s, 500 addresses (127.1.x.y), 2 repetitions. Each flood
//! connection logs in as `postgres` with a SCRAM proof that is wrong (no PBKDF2 on the
//! flooder's side, so it can keep the rate), reads the answer and closes. The legitimate
//! load is `pgbench -S -c 16 -j 2` from 127.0.0.1 with the right password.
//!
//! Three conditions per repetition, interleaved, each against its own pgvane process on the
//! same cluster: no flood (`quiet`), the flood against pgvane without limits (`flood`), and
//! the flood against pgvane with per-address limits (`flood+limits`: `ip_connection_rate`
//! 5/s with a burst of 32, and a lockout after 3 failed logins within a minute). Reported: the legitimate clients' tps and
//! p50/p99 latency (from `pgbench --log` samples), the flood's achieved rate and how its
//! attempts were answered, and pgvane's CPU time per second of the run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// How the flood's attempts ended.
#[derive(Default)]
struct Outcomes {
    /// Refused with a password failure (28P01): pgvane ran the SCRAM exchange.
    auth_failed: AtomicU64,
    /// Refused before any SCRAM work (a limit's SQLSTATE: 08004, 53300, ...).
    refused: AtomicU64,
    /// Connect failed, reset, or no answer within the bound.
    other: AtomicU64,
}

/// A wrong SCRAM proof: 32 zero bytes, base64.
const WRONG_PROOF: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// Reads one backend message: (tag, body).
async fn message(s: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    s.read_exact(&mut body).await.ok()?;
    Some((head[0], body))
}

/// The SQLSTATE of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default()
}

/// One password-guessing login from `source`; returns the SQLSTATE it ended with.
async fn guess(port: u16, source: Ipv4Addr) -> Option<String> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind((source, 0).into()).ok()?;
    let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.ok()?;
    let mut out = BytesMut::new();
    frontend::startup_message([("user", SUPERUSER), ("database", "postgres")], &mut out).ok()?;
    s.write_all(&out).await.ok()?;
    loop {
        let (tag, body) = message(&mut s).await?;
        if tag == b'E' {
            return Some(sqlstate(&body));
        }
        if tag != b'R' || body.len() < 4 {
            return None;
        }
        out.clear();
        match u32::from_be_bytes(body[..4].try_into().unwrap()) {
            10 => {
                let nonce: u64 = rand::random();
                let first = format!("n,,n=,r={nonce:016x}");
                frontend::sasl_initial_response("SCRAM-SHA-256", first.as_bytes(), &mut out)
                    .ok()?;
            }
            11 => {
                let server_first = String::from_utf8_lossy(&body[4..]).into_owned();
                let nonce = server_first.split(',').find_map(|f| f.strip_prefix("r="))?;
                let last = format!("c=biws,r={nonce},p={WRONG_PROOF}");
                frontend::sasl_response(last.as_bytes(), &mut out).ok()?;
            }
            _ => return None,
        }
        s.write_all(&out).await.ok()?;
    }
}

/// Starts `rate` guesses per second from `addresses` addresses until `stop`, at most 512 at
/// once (an attempt that would exceed that is skipped and counted as `other`).
async fn flood(port: u16, rate: u32, addresses: u32, stop: Arc<AtomicBool>, seen: Arc<Outcomes>) {
    let in_flight = Arc::new(Semaphore::new(512));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let per_tick = (rate / 100).max(1);
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for _ in 0..per_tick {
            n = n.wrapping_add(1);
            let i = n % addresses;
            let source = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                seen.other.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let end = tokio::time::timeout(Duration::from_secs(10), guess(port, source)).await;
                let counter = match end.ok().flatten().as_deref() {
                    Some("28P01") => &seen.auth_failed,
                    Some(_) => &seen.refused,
                    None => &seen.other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }
}

/// utime + stime of a process, in clock ticks (10 ms).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// What one pgbench run measured.
struct Run {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: bool,
}

/// `pgbench -S` through `port` for `seconds`; latencies from its per-transaction log.
fn pgbench(port: u16, seconds: u64, dir: &std::path::Path) -> Run {
    let prefix = dir.join(format!("log-{port}-{}", rand::random::<u32>()));
    let out = Command::new(pg_bindir().join("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .args(["-S", "-c", "16", "-j", "2", "-T", &seconds.to_string()])
        .args([
            "--log",
            "--log-prefix",
            prefix.to_str().unwrap(),
            "postgres",
        ])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("pgbench runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let mut latencies: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix.file_name().unwrap().to_str().unwrap()) {
            let log = std::fs::read_to_string(entry.path()).unwrap();
            latencies.extend(
                log.lines()
                    .filter_map(|l| l.split(' ').nth(2)?.parse::<u64>().ok()),
            );
            std::fs::remove_file(entry.path()).ok();
        }
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    Run {
        tps,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        failed: !out.status.success(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (seconds, rate, addresses, reps) = (arg(0, 20), arg(1, 3000), arg(2, 500), arg(3, 2));
    // The flood holds up to 512 sockets, pgvane and pgbench their own.
    rlimit::increase_nofile_limit(65536).ok();
    let rt = tokio::runtime::Runtime::new().unwrap();

    let cluster = Cluster::start(0);
    let plain_port = free_port();
    let limits_port = free_port();
    let plain = Pgvane::start(
        &pooled_config(
            &cluster,
            &listener("tx", plain_port, "primary", "mode = \"transaction\""),
            "",
        ),
        &[plain_port],
    );
    let limits = "[limits]\nip_connection_rate = \"5/s\"\nip_connection_burst = 32\nip_auth_failures = 3\nip_auth_failure_window = \"60s\"\nip_auth_lockout = \"60s\"\n";
    let limited = Pgvane::start(
        &pooled_config(
            &cluster,
            &listener("tx", limits_port, "primary", "mode = \"transaction\""),
            limits,
        ),
        &[limits_port],
    );
    let init = Command::new(pg_bindir().join("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &cluster.primary().port.to_string()])
        .args(["-U", SUPERUSER, "-i", "-s", "10", "-q", "postgres"])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    let conditions = [
        ("quiet", plain_port, plain.pid(), false),
        ("flood", plain_port, plain.pid(), true),
        ("flood+limits", limits_port, limited.pid(), true),
    ];
    let mut rows: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for rep in 1..=reps {
        for (i, (name, port, pid, flooded)) in conditions.iter().enumerate() {
            let stop = Arc::new(AtomicBool::new(false));
            let seen = Arc::new(Outcomes::default());
            let flooder = flooded.then(|| {
                rt.spawn(flood(
                    *port,
                    rate as u32,
                    addresses as u32,
                    stop.clone(),
                    seen.clone(),
                ))
            });
            let cpu0 = cpu_ticks(*pid);
            let started = Instant::now();
            let run = pgbench(*port, seconds, cluster.dir());
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = (cpu_ticks(*pid) - cpu0) as f64 / 100.0 / elapsed;
            stop.store(true, Ordering::Relaxed);
            if let Some(f) = flooder {
                rt.block_on(f).unwrap();
            }
            // Let the flood's last attempts end before the next condition starts.
            rt.block_on(async {
                eventually(PATIENCE, "flood attempts end", || async {
                    (connections_to(*port) == 0).then_some(())
                })
                .await
            });
            let (failed, refused, other) = (
                seen.auth_failed.load(Ordering::Relaxed),
                seen.refused.load(Ordering::Relaxed),
                seen.other.load(Ordering::Relaxed),
            );
            let attempts = (failed + refused + other) as f64 / elapsed;
            let flood_cell = if *flooded {
                format!(
                    "{attempts:.0}/s: {failed} auth failed, {refused} refused early, {other} other"
                )
            } else {
                "none".into()
            };
            let row = format!(
                "| {name} | {} | {:.2} | {:.2} | {flood_cell} | {cpu:.2} |",
                if run.failed {
                    "failed".into()
                } else {
                    format!("{:.0}", run.tps)
                },
                run.p50_ms,
                run.p99_ms
            );
            println!("rep {rep} {row}");
            rows.entry(i).or_default().push(row);
        }
    }
    println!(
        "\nmeasured {} with `cargo bench --bench flood -- {seconds} {rate} {addresses} {reps}`: pgbench -S -c 16 -j 2 from 127.0.0.1; flood from {addresses} addresses\n",
        String::from_utf8_lossy(&Command::new("date").args(["-u", "+%F"]).output().unwrap().stdout).trim()
    );
    println!("| condition | legitimate tps | p50 ms | p99 ms | flood (attempts, answers) | pgvane CPU s/s |");
    println!("|---|---:|---:|---:|---|---:|");
    for row in rows.values().flatten() {
        println!("{row}");
    }
}
