//! A real Patroni cluster on loopback: one etcd and one Patroni per node (Debian packages
//! `patroni` and `etcd-server`), every port from the kernel, everything in a temp dir.
//!
//! Each node's configuration is scripts/patroni-node.yml, shared with the demo. Timings are
//! faster than Patroni's defaults so failovers fit in a test: ttl 10 s,
//! loop_wait 2 s, retry_timeout 5 s. Patroni advises ttl >= loop_wait + 2 * retry_timeout
//! (12 s here); with one healthy local etcd the shorter ttl is safe and halves the wait for a
//! crashed leader's lock to expire.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    free_port, hand_over, http, pg_bindir, postmaster_pid, psql, run, run_as, shared_temp_dir,
    stop_immediately, Backends, PASSWORD, SUPERUSER,
};

const SCOPE: &str = "pgvane-test";

/// A program of the Patroni stack, run as the unprivileged user when we are root.
fn stack_command(program: &str) -> Command {
    let path = Path::new("/usr/bin").join(program);
    assert!(
        path.is_file(),
        "{} not found: install Debian's `patroni` and `etcd-server` packages (scripts/test does)",
        path.display()
    );
    let mut cmd = Command::new(path);
    // Patroni's own pg_basebackup must use its pgpass file, not a password from our
    // environment (scripts/lib.sh exports PGPASSWORD for the demo).
    cmd.current_dir("/tmp").env("LC_ALL", "C.UTF-8");
    for var in [
        "PGPASSWORD",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSFILE",
    ] {
        cmd.env_remove(var);
    }
    if let Some(r) = run_as() {
        cmd.uid(r.uid).gid(r.gid);
    }
    cmd
}

pub struct PatroniNode {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    config: PathBuf,
    data: PathBuf,
    patroni: Option<Child>,
}

impl PatroniNode {
    pub fn is_primary(&self) -> bool {
        http(self.api_port, "GET", "/primary").map(|r| r.0) == Some(200)
    }

    pub fn is_replica(&self) -> bool {
        http(self.api_port, "GET", "/replica").map(|r| r.0) == Some(200)
    }
}

pub struct PatroniCluster {
    pub nodes: Vec<PatroniNode>,
    etcd: Child,
    dir: TempDir,
}

impl PatroniCluster {
    /// Starts etcd and `n` Patroni nodes; returns once node 0 leads and every other node
    /// streams from it.
    pub fn start(n: usize) -> PatroniCluster {
        let dir = shared_temp_dir("pgvane-patroni-");
        let (client, peer) = (free_port(), free_port());
        let etcd = stack_command("etcd")
            .args(["--name", "e0", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=e0=http://127.0.0.1:{peer}"))
            .stdin(Stdio::null())
            .stdout(log_file(&dir.path().join("etcd.log")))
            .stderr(log_file(&dir.path().join("etcd.log")))
            .spawn()
            .expect("start etcd");
        let mut cluster = PatroniCluster {
            nodes: Vec::new(),
            etcd,
            dir,
        };
        for i in 0..n {
            let node = cluster.make_node(i, client);
            cluster.nodes.push(node);
            cluster.launch(i);
            if i == 0 {
                // Node 0 bootstraps alone, so the leader is known before the others join.
                cluster.wait_until(Duration::from_secs(60), "node 0 to lead", |c| {
                    c.nodes[0].is_primary()
                });
            }
        }
        cluster.wait_until(Duration::from_secs(90), "replicas to run", |c| {
            c.nodes[1..].iter().all(PatroniNode::is_replica)
        });
        // A replica that runs may not stream yet (its slot is made by the leader's next
        // loop), and Patroni refuses to switch over to a replica that does not.
        let streaming = n.saturating_sub(1).to_string();
        cluster.wait_until(Duration::from_secs(60), "replicas to stream", |c| {
            let out = psql(c.nodes[0].pg_port, "postgres")
                .args([
                    "-Atc",
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                ])
                .output();
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == streaming)
        });
        cluster
    }

    fn make_node(&self, i: usize, etcd_port: u16) -> PatroniNode {
        let name = format!("pt{i}");
        let node = PatroniNode {
            pg_port: free_port(),
            api_port: free_port(),
            config: self.dir.path().join(format!("{name}.yml")),
            data: self.dir.path().join(&name),
            patroni: None,
            name,
        };
        let dir = self.dir.path().display().to_string();
        let (api, pg, etcd) = (
            node.api_port.to_string(),
            node.pg_port.to_string(),
            etcd_port.to_string(),
        );
        let bin = pg_bindir().display().to_string();
        let mut yaml = include_str!("../../scripts/patroni-node.yml").to_owned();
        for (name, value) in [
            ("@SCOPE@", SCOPE),
            ("@NAME@", &node.name),
            ("@API_PORT@", &api),
            ("@PG_PORT@", &pg),
            ("@ETCD_PORT@", &etcd),
            ("@DIR@", &dir),
            ("@BIN_DIR@", &bin),
            ("@SUPERUSER@", SUPERUSER),
            ("@PASSWORD@", PASSWORD),
        ] {
            yaml = yaml.replace(name, value);
        }
        std::fs::write(&node.config, yaml).unwrap();
        hand_over(&node.config);
        node
    }

    fn launch(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = self.dir.path().join(format!("{}.log", node.name));
        let child = stack_command("patroni")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .spawn()
            .expect("start patroni");
        node.patroni = Some(child);
    }

    fn wait_until(&self, limit: Duration, what: &str, ok: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node answering 200 on `/primary`, if exactly one does.
    pub fn leader(&self) -> Option<usize> {
        let leaders: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_primary())
            .collect();
        match leaders.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Waits until a node other than `old` leads; returns it.
    pub async fn wait_new_leader(&self, old: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            match self.leader() {
                Some(l) if l != old => return l,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "no new leader after {limit:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `patronictl switchover`: a planned change of leader.
    pub fn switchover(&self, leader: usize, candidate: usize) {
        run(stack_command("patronictl")
            .arg("-c")
            .arg(&self.nodes[leader].config)
            .args(["switchover", "--force", "--leader"])
            .arg(&self.nodes[leader].name)
            .arg("--candidate")
            .arg(&self.nodes[candidate].name));
    }

    /// A crash of node `i`: Patroni, the postmaster and its children are frozen first and
    /// then killed, so none of them reacts to the others' deaths (the leader key then
    /// expires after ttl, as on a real machine failure).
    pub fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut pids = Vec::new();
        if let Some(p) = &node.patroni {
            pids.push(p.id());
        }
        if let Some(pm) = postmaster_pid(&node.data) {
            pids.push(pm);
            pids.extend(children(pm));
        }
        for sig in ["-STOP", "-KILL"] {
            for pid in &pids {
                let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
            }
        }
        if let Some(mut p) = node.patroni.take() {
            let _ = p.wait();
        }
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let log = self.dir.path().join(format!("{}.log", n.name));
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            s += &format!("---- {} (last lines) ----\n", n.name);
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }
}

impl Backends for PatroniCluster {
    fn backends_toml(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "\n[[backend]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\npatroni_port = {}\n",
                    n.name, n.pg_port, n.api_port
                )
            })
            .collect()
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut p) = node.patroni.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
            stop_immediately(&node.data);
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn log_file(path: &Path) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    hand_over(path);
    f
}

/// Processes whose parent is `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The fields after the parenthesised command name: state, ppid, ...
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            after.split_whitespace().nth(1) == Some(pid.to_string().as_str())
        })
        .collect()
}
