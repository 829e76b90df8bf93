//! Test harness: real PostgreSQL clusters and a real pgvane process.
//!
//! A [`Cluster`] is a primary plus streaming replicas on free loopback ports in a temp dir,
//! made with initdb (once per machine, then copied), pg_basebackup -R and pg_ctl. When the
//! tests run as root, every PostgreSQL program runs as the unprivileged `postgres` user (or
//! `nobody`), since PostgreSQL refuses root. Everything is stopped and removed on drop, also
//! when a test fails. [`Pgvane`] runs the built binary with a generated config.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod bouncer;
pub mod patroni;
pub mod raw;
pub mod relay;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

/// Superuser of every test cluster; SCRAM over TCP, trust over the Unix socket.
pub const SUPERUSER: &str = "postgres";
pub const PASSWORD: &str = "pgvane-test";

/// How long a test waits for a condition before it fails: generous, since a busy 2-core
/// machine can be slow; a wait ends as soon as its condition holds.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Bump when the template's initdb options change, so stale templates are not reused.
const TEMPLATE_VERSION: u32 = 1;

/// Asks the kernel for a free loopback port, never one this test process was given before:
/// the kernel may hand out a just-released port again, and two calls in a row (two
/// listeners of one config) must not get the same one.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// The user PostgreSQL programs run as: ourselves, or an unprivileged one when we are root.
#[derive(Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> Option<RunAs> {
    static RUN_AS: OnceLock<Option<RunAs>> = OnceLock::new();
    *RUN_AS.get_or_init(|| {
        let euid = std::fs::metadata("/proc/self").expect("/proc/self").uid();
        if euid != 0 {
            return None;
        }
        let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let entry = |name: &str| {
            passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == name).then(|| RunAs {
                    uid: f[2].parse().unwrap(),
                    gid: f[3].parse().unwrap(),
                })
            })
        };
        Some(
            entry("postgres")
                .or_else(|| entry("nobody"))
                .expect("running as root, and neither a `postgres` nor a `nobody` user exists"),
        )
    })
}

/// Gives `path` to the user PostgreSQL runs as.
pub(crate) fn hand_over(path: &Path) {
    if let Some(r) = run_as() {
        std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid)).expect("chown");
    }
}

/// Directory of the PostgreSQL server programs.
pub fn pg_bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let has_server = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
        if let Ok(d) = std::env::var("PGVANE_PG_BINDIR") {
            return PathBuf::from(d);
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server(&d) {
                return d;
            }
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|d| has_server(d))
            .collect();
        found.sort_by_key(|d| {
            d.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        found.pop().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server programs (initdb, pg_ctl) not found. Install them with \
                 `sudo apt-get install -y postgresql` (or run scripts/test, which does), or \
                 point PGVANE_PG_BINDIR at their directory."
            )
        })
    })
}

/// A PostgreSQL program, run as the unprivileged user when we are root.
pub fn pg_command(program: &str) -> Command {
    let mut cmd = Command::new(pg_bindir().join(program));
    cmd.env("PGPASSWORD", PASSWORD)
        .env("LC_ALL", "C")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATA")
        .current_dir("/tmp");
    if let Some(r) = run_as() {
        cmd.uid(r.uid).gid(r.gid);
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An initdb'd data directory shared by all tests on this machine, copied per node.
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let version = String::from_utf8_lossy(&run(pg_command("pg_ctl").arg("--version")).stdout)
            .split_whitespace()
            .last()
            .unwrap_or("unknown")
            .to_owned();
        let uid = run_as().map(|r| r.uid).unwrap_or(0);
        let dir = PathBuf::from(format!(
            "/tmp/pgvane-test-template-{version}-v{TEMPLATE_VERSION}-u{uid}"
        ));
        if dir.join("PG_VERSION").exists() {
            return dir;
        }
        // Build beside the final place and rename, so concurrent test processes never see a
        // half-made template.
        let staging = PathBuf::from(format!("{}.{}", dir.display(), std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).unwrap();
        hand_over(&staging);
        let pwfile = staging.join("pwfile");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        hand_over(&pwfile);
        let data = staging.join("data");
        run(pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "-E", "UTF8", "--locale=C"]));
        let conf = "\n# pgvane test settings\n\
            listen_addresses = '127.0.0.1'\n\
            fsync = off\n\
            synchronous_commit = off\n\
            full_page_writes = off\n\
            shared_buffers = 16MB\n\
            max_connections = 300\n\
            wal_level = replica\n\
            max_wal_senders = 10\n\
            wal_keep_size = 256MB\n\
            hot_standby = on\n\
            wal_receiver_status_interval = 1s\n\
            log_min_messages = warning\n";
        append(&data.join("postgresql.conf"), conf);
        if std::fs::rename(&data, &dir).is_err() {
            // Another process won the race; its template is as good as ours.
            assert!(
                dir.join("PG_VERSION").exists(),
                "cannot create {}",
                dir.display()
            );
        }
        let _ = std::fs::remove_dir_all(&staging);
        dir
    })
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// One PostgreSQL server of a test cluster.
pub struct PgNode {
    pub name: String,
    pub port: u16,
    pub data: PathBuf,
}

impl PgNode {
    pub fn start(&self) {
        run(pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("server.log"))
            .args(["-w", "-t", "60", "start"]));
    }

    /// Fast shutdown: sessions are terminated, the server exits cleanly.
    pub fn stop(&self) {
        run(pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]));
    }

    /// SIGKILL of the postmaster: a crash. Its children exit on their own shortly after.
    pub fn kill(&self) {
        let pid = self.postmaster_pid().expect("node is not running");
        run(Command::new("kill").args(["-9", &pid.to_string()]));
    }

    /// SIGSTOP / SIGCONT of the postmaster: the kernel still completes TCP handshakes for
    /// it, but nothing answers until it is thawed.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.postmaster_pid().expect("node is not running");
        let sig = if frozen { "-STOP" } else { "-CONT" };
        run(Command::new("kill").args([sig, &pid.to_string()]));
    }

    pub fn promote(&self) {
        run(pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "promote"]));
    }

    fn postmaster_pid(&self) -> Option<u32> {
        postmaster_pid(&self.data)
    }

    /// A direct superuser connection (not through pgvane).
    pub async fn connect(&self) -> Client {
        connect(self.port, SUPERUSER, "postgres")
            .await
            .unwrap_or_else(|e| panic!("connect to {} (port {}): {e}", self.name, self.port))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }
}

/// Established TCP connections (IPv4) whose remote end is 127.0.0.1:`port`: the client
/// sides of connections to a server on `port`, accepted by it yet or not.
pub fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let remote = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == remote && f[3] == "01"
        })
        .count()
}

/// A connection to 127.0.0.1:`port` as `user`, with the harness password.
pub async fn connect(port: u16, user: &str, dbname: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(PASSWORD)
        .dbname(dbname)
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// `psql -X` on 127.0.0.1:`port`, database `dbname`, as the harness superuser with its
/// password; add arguments such as `-c`.
pub fn psql(port: u16, dbname: &str) -> Command {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        SUPERUSER,
        "-d",
        dbname,
        "-X",
    ])
    .env("PGPASSWORD", PASSWORD);
    cmd
}

/// A primary (`nodes[0]`) and its streaming replicas.
pub struct Cluster {
    pub nodes: Vec<PgNode>,
    dir: TempDir,
}

/// A temp dir that PostgreSQL programs can write to, removed on drop.
fn shared_temp_dir(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    hand_over(dir.path());
    dir
}

impl Cluster {
    pub fn start(replicas: usize) -> Cluster {
        let dir = shared_temp_dir("pgvane-cluster-");
        let primary = PgNode {
            name: "pg0".into(),
            port: free_port(),
            data: dir.path().join("pg0"),
        };
        run(Command::new("cp")
            .arg("-a")
            .arg(template())
            .arg(&primary.data));
        configure(&primary, dir.path());
        primary.start();
        let mut nodes = vec![primary];
        for i in 1..=replicas {
            let node = PgNode {
                name: format!("pg{i}"),
                port: free_port(),
                data: dir.path().join(format!("pg{i}")),
            };
            run(pg_command("pg_basebackup")
                .args(["-h", "127.0.0.1", "-U", SUPERUSER, "-p"])
                .arg(nodes[0].port.to_string())
                .arg("-D")
                .arg(&node.data)
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]));
            configure(&node, dir.path());
            node.start();
            nodes.push(node);
        }
        Cluster { nodes, dir }
    }

    pub fn primary(&self) -> &PgNode {
        &self.nodes[0]
    }

    /// Waits until every replica has replayed everything the primary wrote so far. The insert
    /// position, not the write position: with synchronous_commit = off a commit record may
    /// still sit in WAL buffers.
    pub async fn wait_replicated(&self) {
        let primary = self.primary().connect().await;
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        for node in &self.nodes[1..] {
            let c = node.connect().await;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let caught_up: bool = c
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                        &[&lsn],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if caught_up {
                    break;
                }
                assert!(Instant::now() < deadline, "{} did not catch up", node.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn configure(node: &PgNode, sockets: &Path) {
    append(
        &node.data.join("postgresql.conf"),
        &format!(
            "port = {}\nunix_socket_directories = '{}'\ncluster_name = '{}'\n",
            node.port,
            sockets.display(),
            node.name
        ),
    );
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            stop_immediately(&node.data);
        }
    }
}

/// The postmaster's pid from the data directory `data`, if the server runs.
fn postmaster_pid(data: &Path) -> Option<u32> {
    let pidfile = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    pidfile.lines().next()?.trim().parse().ok()
}

/// Stops the server of `data`, if it runs, without a shutdown checkpoint: for clean-up.
fn stop_immediately(data: &Path) {
    if let Some(pid) = postmaster_pid(data) {
        // A postmaster a test froze (SIGSTOP) and did not thaw, because it failed first,
        // would not act on the stop until resumed.
        let _ = Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A running pgvane binary with its own config and log file.
/// Waits up to PATIENCE until `ports` accept on 127.0.0.1; panics with the log at `log` if
/// `child` (`what`) exits first or they do not.
pub fn wait_listening(child: &mut Child, what: &str, ports: &[u16], log: &Path) {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + PATIENCE;
    for &port in ports {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{what} exited ({status}):\n{}", log());
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not listen on {port}:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Pgvane {
    child: Child,
    dir: TempDir,
}

impl Pgvane {
    /// Writes `config` to a file, starts pgvane on it and waits until `ports` accept.
    pub fn start(config: &str, ports: &[u16]) -> Pgvane {
        let dir = tempfile::Builder::new()
            .prefix("pgvane-run-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("pgvane.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("pgvane.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pgvane"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "pgvane=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pgvane");
        let mut p = Pgvane { child, dir };
        let log = p.dir.path().join("pgvane.log");
        wait_listening(&mut p.child, "pgvane", ports, &log);
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgvane.log")).unwrap_or_default()
    }

    /// Replaces the configuration file pgvane started with (for reload tests).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pgvane.toml")
    }

    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(self.dir.path().join("pgvane.toml"), config).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal, e.g. "USR1".
    pub fn signal(&self, name: &str) {
        run(Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string()));
    }

    /// PAUSE (SIGUSR1), then waits up to `limit` for the running transactions to end.
    pub async fn pause(&self, limit: Duration) {
        self.signal("USR1");
        self.wait_log("PAUSE complete", limit).await;
    }

    /// Waits until the log contains `text`.
    pub async fn wait_log(&self, text: &str, limit: Duration) {
        eventually(limit, text, || async {
            self.log().contains(text).then_some(())
        })
        .await
    }

    /// Whether the process has ended, now.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Pgvane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- pgvane log ----\n{}", self.log());
        }
    }
}

/// An HTTP/1.0 request to 127.0.0.1:`port`: the status and body, or None if nothing
/// answers. Blocking; see [`http_async`] in async tests.
pub fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    http_with(port, method, path, "")
}

/// [`http`] with extra header lines (each ending in `\r\n`).
pub fn http_with(port: u16, method: &str, path: &str, headers: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.get(9..12)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// [`http`] off the async runtime's threads; panics if nothing answers.
pub async fn http_async(port: u16, method: &'static str, path: &str) -> (u16, String) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || http(port, method, &path))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no HTTP answer on port {port}"))
}

/// The value of one sample line of pgvane's `/metrics` on `admin`, e.g. `pgvane_no_primary`.
pub async fn metric(admin: u16, sample: &str) -> Option<f64> {
    let (code, body) = http_async(admin, "GET", "/metrics").await;
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A set of servers pgvane can be pointed at.
pub trait Backends {
    /// One `[[backend]]` table per server.
    fn backends_toml(&self) -> String;
}

impl Backends for Cluster {
    fn backends_toml(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "\n[[backend]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\n",
                    n.name, n.port
                )
            })
            .collect()
    }
}

/// The pgvane config a test needs: backends from the cluster, health with the given method
/// and timings, and listeners given as TOML.
pub fn config(cluster: &impl Backends, health: &str, listeners: &str) -> String {
    format!(
        "[health]\n{health}\n[health.sql]\nuser = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n{}{listeners}",
        cluster.backends_toml()
    )
}

/// The superuser's SCRAM verifier, as pg_authid holds it.
pub async fn scram_verifier(cluster: &Cluster) -> String {
    let c = cluster.primary().connect().await;
    let sql = "SELECT rolpassword FROM pg_authid WHERE rolname = $1";
    let verifier: String = c.query_one(sql, &[&SUPERUSER]).await.unwrap().get(0);
    assert!(verifier.starts_with("SCRAM-SHA-256$"));
    verifier
}

/// A `[[listener]]` table.
pub fn listener(name: &str, port: u16, target: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\nport = {port}\ntarget = \"{target}\"\n{extra}\n"
    )
}

/// `inet_server_port()` of a connection: tells which backend pgvane routed it to.
pub async fn server_port(c: &Client) -> u16 {
    try_server_port(c).await.expect("SELECT inet_server_port()")
}

/// As [`server_port`], for connections that may be cut meanwhile. Simple protocol: one
/// statement, one round trip, so it works the same through a transaction pooler.
pub async fn try_server_port(c: &Client) -> Option<u16> {
    let messages = c.simple_query("SELECT inet_server_port()").await.ok()?;
    first_value(&messages)?.parse().ok()
}

/// The first column of the first row of a simple query's answer.
pub fn first_value(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<&str> {
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
        _ => None,
    })
}

/// A config with the cluster's backends, `listeners`, and `extra` TOML (pool, auth, users)
/// for pooled listeners; the harness superuser is a pgvane user with its password.
pub fn pooled_config(cluster: &impl Backends, listeners: &str, extra: &str) -> String {
    let health = "interval = \"200ms\"\n";
    format!(
        "{}\n{extra}\n[general]\nmax_client_conn = 2000\n\n[[user]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n",
        config(cluster, health, listeners)
    )
}

/// Creates login role `name` with the harness password on the primary.
pub async fn create_role(cluster: &Cluster, name: &str) {
    cluster
        .primary()
        .connect()
        .await
        .batch_execute(&format!("CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'"))
        .await
        .unwrap();
}

/// Creates database `app` with a table `t (id int, note text)` on the primary.
pub async fn create_app_db(cluster: &Cluster) {
    let c = cluster.primary().connect().await;
    c.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = connect(cluster.primary().port, SUPERUSER, "app")
        .await
        .unwrap();
    app.batch_execute("CREATE TABLE t (id int, note text)")
        .await
        .unwrap();
}

/// Server connections on database `app`, as PostgreSQL counts them.
pub async fn app_backends(node: &PgNode) -> i64 {
    let c = node.connect().await;
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND backend_type = 'client backend'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Writers loop on short write transactions through `port`, each on its own connection,
/// reconnecting when theirs is closed; they count successes and failures.
pub struct Writers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u32, u32)>>,
}

impl Writers {
    pub fn start(port: u16, n: usize) -> Writers {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|w| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0, 0);
                    let mut conn = None;
                    while !stop.load(Ordering::Relaxed) {
                        if conn.is_none() {
                            conn = connect(port, SUPERUSER, "postgres").await.ok();
                        }
                        let Some(c) = &conn else {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        match c
                            .batch_execute(&format!("INSERT INTO w VALUES ({w})"))
                            .await
                        {
                            Ok(()) => ok += 1,
                            Err(e) => {
                                eprintln!("writer {w}: {e}");
                                failed += 1;
                                conn = None;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    (ok, failed)
                })
            })
            .collect();
        Writers { stop, tasks }
    }

    /// Lets the writers go on for a second, stops them, and checks that only transactions
    /// in flight at a crash failed: at most one per writer. Returns the writes that
    /// succeeded.
    pub async fn stop_after_crash(self, pgvane: &Pgvane) -> u32 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let writers = self.tasks.len() as u32;
        let (ok, failed) = self.stop().await;
        eprintln!("writers: {ok} ok, {failed} failed");
        assert!(
            failed <= writers,
            "{failed} failed writes\n{}",
            pgvane.log()
        );
        ok
    }

    pub async fn stop(self) -> (u32, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = (0, 0);
        for t in self.tasks {
            let (ok, failed) = t.await.unwrap();
            total = (total.0 + ok, total.1 + failed);
        }
        total
    }
}

/// `n` clients through `port` that have each written once to table `w` and then sit idle.
pub async fn idle_clients(port: u16, n: usize) -> Vec<Client> {
    let mut idle = Vec::new();
    for _ in 0..n {
        let c = connect(port, SUPERUSER, "postgres").await.unwrap();
        c.batch_execute("INSERT INTO w VALUES (-1)").await.unwrap();
        idle.push(c);
    }
    idle
}

/// Each of `idle` (clients that sat idle through a failover) writes once more: every write
/// must succeed and land on the server on `port`.
pub async fn idle_clients_write_on(idle: &[Client], port: u16, pgvane: &Pgvane) {
    for c in idle {
        c.batch_execute("INSERT INTO w VALUES (-2)")
            .await
            .unwrap_or_else(|e| panic!("idle client saw {e}\n{}", pgvane.log()));
        assert_eq!(server_port(c).await, port);
    }
}

/// Where scripts/test installs the client drivers (a Python venv with psycopg and asyncpg,
/// node-postgres); `PGVANE_DRIVERS` overrides it.
pub fn drivers_dir() -> PathBuf {
    std::env::var_os("PGVANE_DRIVERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/drivers"))
}

/// The drivers' Python (psycopg's binary wheel bundles libpq 17 or later).
pub fn drivers_python() -> PathBuf {
    drivers_dir().join("venv/bin/python")
}
