//! `scripts/demo`: run to its end on Patroni and on plain replication, and interrupted with
//! Ctrl-C mid-run, after which it leaves no process and no temp dir.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::PATIENCE;

/// The demo (`PGVANE_DEMO=mode` if given) with this build's pgvane, its output piped, in a
/// process group of its own, as a terminal gives a job: Ctrl-C ([`interrupt`]) reaches all
/// of it.
fn start_demo(mode: Option<&str>) -> Child {
    let mut command = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo"));
    if let Some(mode) = mode {
        command.env("PGVANE_DEMO", mode);
    }
    command
        .env("PGVANE_BIN", env!("CARGO_BIN_EXE_pgvane"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// Ctrl-C to the demo's whole process group; whether `kill` could send it.
fn interrupt(demo: &Child) -> bool {
    let group = format!("-{}", demo.id());
    Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .unwrap()
        .success()
}

#[test]
fn the_demo_cleans_up_after_ctrl_c() {
    let mut demo = start_demo(None);
    let (tx, rx) = mpsc::channel();
    let stdout = demo.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Its temp dir, named as it starts the cluster; interrupted once pgbench runs.
    let deadline = Instant::now() + PATIENCE * 3;
    let (mut work, mut seen) = (None, Vec::new());
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("the demo did not get to pgbench: {seen:#?}"));
        if let Some(at) = line.find(" in /tmp/") {
            // The path, without the terminal codes that may follow it.
            let path = line[at + 4..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || "/._-".contains(*c))
                .collect::<String>();
            work = Some(path);
        }
        let running = line.contains("pgbench through pgvane");
        seen.push(line);
        if running {
            break;
        }
    }
    let work = work.unwrap_or_else(|| panic!("no temp dir named: {seen:#?}"));
    assert!(std::path::Path::new(&work).exists());
    std::thread::sleep(Duration::from_millis(500));
    assert!(interrupt(&demo));
    let exited = Instant::now();
    loop {
        if demo.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            exited.elapsed() < PATIENCE,
            "the demo did not exit after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!std::path::Path::new(&work).exists(), "{work} left behind");
    let ps = Command::new("ps")
        .args(["-eo", "pid,args"])
        .output()
        .unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&work))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "processes left: {left:#?}");
}

/// The whole demo: it runs to its end, shows the failover live (the crash, the promotion
/// and the first write after it marked) and exits cleanly. With Patroni (installed by
/// scripts/test), the demo's default here.
#[test]
fn the_demo_runs_to_its_end_and_shows_the_failover() {
    let out = run_whole_demo(None);
    assert!(out.contains("Patroni promotes the replica"), "{out}");
    writes_reach(&out, "pt1");
}

/// The same on plain streaming replication.
#[test]
fn the_plain_replication_demo_runs_to_its_end_and_shows_the_failover() {
    let out = run_whole_demo(Some("plain"));
    assert!(out.contains("the replica promoted"), "{out}");
    writes_reach(&out, "pg1");
}

/// After the failover, the primary listener reaches `node` (the demo's "now via" line).
fn writes_reach(out: &str, node: &str) {
    let line = out
        .lines()
        .find(|l| l.contains("now via"))
        .unwrap_or_else(|| panic!("no \"now via\" line:\n{out}"));
    let port = line
        .split("server port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no server port: {line}"));
    assert!(line.contains(&format!("({node} is {port})")), "{line}");
}

/// Runs the demo (`PGVANE_DEMO=mode`) to its end; its output, with every mark checked.
fn run_whole_demo(mode: Option<&str>) -> String {
    let mut demo = start_demo(mode);
    let mut stdout = demo.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    // Bounded: a demo that never ends (waiting on a process it started) is a failure too.
    let started = Instant::now();
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > PATIENCE * 5 {
            interrupt(&demo);
            let _ = demo.wait();
            panic!("the demo did not end within {:?}", PATIENCE * 5);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = reader.join().unwrap();
    assert!(status.success(), "{out}");
    for marked in [
        "the primary is killed",
        "the replica is promoted",
        "first write through pgvane",
        "summary:",
        "demo done",
    ] {
        assert!(out.contains(marked), "{marked}:\n{out}");
    }
    out
}
