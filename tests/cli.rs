//! The command line: `pgvane check`, start-up errors, and graceful shutdown.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn pgvane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgvane"))
}

/// `pgvane check --config PATH`.
fn check(path: &std::path::Path) -> std::process::Output {
    pgvane()
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_prints_the_resolved_example_config() {
    let out = pgvane()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgvane.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[health]") && stdout.contains("fall = 3"),
        "{stdout}"
    );
    assert!(stdout.contains("shutdown_timeout = \"30s\""), "{stdout}");
}

/// A config without users prints no `user = []` line (TOML would put it above every
/// table), and what `check` prints is itself a valid config.
#[test]
fn check_prints_a_config_that_checks_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("minimal.toml");
    std::fs::write(
        &path,
        "[[backend]]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 5432\n\
         [[listener]]\nname = \"rw\"\naddress = \"127.0.0.1\"\nport = 6432\ntarget = \"primary\"\n",
    )
    .unwrap();
    let out = check(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(printed.starts_with("[general]\n"), "{printed}");
    assert!(!printed.contains("user = []"), "{printed}");
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, &printed).unwrap();
    let out = check(&again);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[health]\nfall = 0\n[[backend]]\nname = \"a\"\nhost = \"h\"\nport = 0\n\
         [[listener]]\nname = \"l\"\naddress = \"nowhere\"\nport = 5\ntarget = \"any\"\n",
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["health.fall", "backend[0].port", "listener[0].address"] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }

    std::fs::write(&path, "[helth]\ninterval = \"1s\"\n").unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `helth`"), "{stderr}");
    assert!(stderr.contains("line 1"), "{stderr}");
}

#[test]
fn a_taken_port_fails_start_up_naming_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            "[[backend]]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 1\n\
             [[listener]]\nname = \"busy\"\naddress = \"127.0.0.1\"\nport = {port}\ntarget = \"any\"\n"
        ),
    )
    .unwrap();
    let out = pgvane().arg("--config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("listener \"busy\": cannot listen on"),
        "{text}"
    );
}

/// A primary behind a passthrough listener, and a session open through it.
async fn pgvane_with_a_session() -> (Cluster, u16, Pgvane, tokio_postgres::Client) {
    let cluster = Cluster::start(0);
    let rw = free_port();
    let text = config(
        &cluster,
        "interval = \"200ms\"",
        &listener("rw", rw, "primary", ""),
    );
    let pgvane = Pgvane::start(&text, &[rw]);
    let session = connect(rw, SUPERUSER, "postgres").await.unwrap();
    (cluster, rw, pgvane, session)
}

// SIGHUP reloads (the file is unchanged here): pgvane and its sessions go on.
#[tokio::test]
async fn sighup_reloads_and_leaves_pgvane_and_its_sessions_running() {
    let (cluster, rw, mut pgvane, session) = pgvane_with_a_session().await;

    pgvane.signal("HUP");
    pgvane.wait_log("configuration reloaded", PATIENCE).await;
    assert!(pgvane.log().contains("nothing changed"), "{}", pgvane.log());
    assert!(
        pgvane.wait_exit(Duration::from_millis(200)).is_none(),
        "exited on SIGHUP"
    );
    assert_eq!(server_port(&session).await, cluster.primary().port);
    let fresh = connect(rw, SUPERUSER, "postgres").await.unwrap();
    assert_eq!(server_port(&fresh).await, cluster.primary().port);
}

// Multi-threaded: wait_exit blocks its thread while the client's connection task runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_sessions_then_exits() {
    let (cluster, rw, mut pgvane, session) = pgvane_with_a_session().await;

    Command::new("kill")
        .args(["-TERM", &pgvane.pid().to_string()])
        .status()
        .unwrap();
    eventually(PATIENCE, "the listener to close", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", rw))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // The open session keeps working while pgvane drains.
    assert_eq!(server_port(&session).await, cluster.primary().port);
    assert!(
        pgvane.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a session open"
    );
    drop(session);
    let status = pgvane
        .wait_exit(PATIENCE)
        .expect("exit after the last session");
    assert!(status.success(), "{status}");
}

/// `pgvane --version` names the git commit it was built from.
#[test]
fn version_names_the_commit() {
    let out = pgvane().arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    assert!(text.starts_with("pgvane 0."), "{text}");
    assert!(text.contains(&format!("({head})")), "{text} (HEAD {head})");
}

/// Reads service notifications into `heard` until one contains `want`; returns (and
/// clears) what was heard.
async fn hear(socket: &tokio::net::UnixDatagram, heard: &mut String, want: &str) -> String {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        while !heard.contains(want) {
            let n = socket.recv(&mut buf).await.unwrap();
            heard.push_str(&String::from_utf8_lossy(&buf[..n]));
            heard.push('\n');
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {want} within {PATIENCE:?}; heard: {heard}"));
    std::mem::take(heard)
}

/// With `NOTIFY_SOCKET` set, pgvane speaks systemd's service protocol: READY=1 once it
/// accepts, WATCHDOG=1 within `WATCHDOG_USEC`, RELOADING=1 then READY=1 around a SIGHUP
/// reload, STOPPING=1 at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_reload_and_stop() {
    let cluster = Cluster::start(0);
    let rw = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("pgvane.toml");
    std::fs::write(
        &config_path,
        config(
            &cluster,
            "interval = \"200ms\"",
            &listener("rw", rw, "primary", ""),
        ),
    )
    .unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut child = pgvane()
        .arg("--config")
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "300000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut heard = String::new();
    hear(&socket, &mut heard, "READY=1").await;
    // The listener accepts by the time READY=1 is sent.
    std::net::TcpStream::connect(("127.0.0.1", rw)).unwrap();
    hear(&socket, &mut heard, "WATCHDOG=1").await;
    hear(&socket, &mut heard, "WATCHDOG=1").await;
    let kill = |signal: &str| {
        Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap()
    };
    kill("-HUP");
    let around_reload = hear(&socket, &mut heard, "READY=1").await;
    assert!(around_reload.contains("RELOADING=1"), "{around_reload}");
    assert!(around_reload.contains("MONOTONIC_USEC="), "{around_reload}");
    kill("-TERM");
    hear(&socket, &mut heard, "STOPPING=1").await;
    assert!(child.wait().unwrap().success());
}

/// Runs `pgvane import` with `args`; returns the TOML it printed, which must pass
/// `pgvane check`.
fn import(args: &[&str]) -> String {
    let out = pgvane().arg("import").args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let toml = String::from_utf8_lossy(&out.stdout).into_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imported.toml");
    std::fs::write(&path, &toml).unwrap();
    let checked = check(&path);
    assert!(
        checked.status.success(),
        "{toml}\n{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    toml
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Debian's shipped pgbouncer.ini: its listener, auth and the settings it cannot carry.
#[test]
fn import_reads_debian_s_pgbouncer_ini() {
    let toml = import(&["--pgbouncer", "/etc/pgbouncer/pgbouncer.ini"]);
    for want in [
        "type = \"md5\"",
        "file = \"/etc/pgbouncer/userlist.txt\"",
        "port = 6432",
        "mode = \"session\"",
        "unix_socket_dir: pgvane listens on TCP only",
        "No server was named",
    ] {
        assert!(toml.contains(want), "{want}:\n{toml}");
    }
}

/// Patroni's haproxy.cfg: one primary listener, the servers with their REST ports, HAProxy's
/// check timings; the stats page and client/server timeouts are listed as not carried.
#[test]
fn import_reads_patroni_s_haproxy_cfg() {
    let toml = import(&["--haproxy", &fixture("haproxy-patroni.cfg")]);
    let config = pgvane::config::Config::parse(&toml).unwrap();
    assert_eq!(config.backends.len(), 2);
    assert_eq!(config.backends[1].patroni_port, Some(8009));
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.listeners[0].port, 5000);
    assert_eq!(config.listeners[0].target, pgvane::config::Target::Primary);
    assert_eq!(config.health.interval, Duration::from_secs(3));
    assert_eq!((config.health.rise, config.health.fall), (2, 3));
    assert_eq!(config.health.timeout, Duration::from_secs(5));
    assert!(toml.contains("listen stats: an HTTP section"), "{toml}");
}

/// Every key the importer maps lands under pgvane's name with its value; a PgBouncer
/// database pointing at the HAProxy listener takes its target instead of a backend.
#[test]
fn import_maps_every_key_it_knows() {
    let toml = import(&[
        "--pgbouncer",
        &fixture("pgbouncer-full.ini"),
        "--haproxy",
        &fixture("haproxy-patroni.cfg"),
    ]);
    let c = pgvane::config::Config::parse(&toml).unwrap();
    assert_eq!(c.general.max_client_conn, 1000);
    assert_eq!(c.general.client_login_timeout, Duration::from_secs(30));
    let p = &c.pool;
    assert_eq!(
        (p.default_pool_size, p.min_pool_size, p.reserve_pool_size),
        (25, 2, 5)
    );
    assert_eq!(p.reserve_pool_timeout, Duration::from_millis(2500));
    assert_eq!((p.max_db_connections, p.max_user_connections), (50, 40));
    assert_eq!(p.server_idle_timeout, Duration::from_secs(300));
    assert_eq!(p.server_lifetime, Duration::from_secs(1800));
    assert_eq!(p.server_connect_timeout, Duration::from_secs(10));
    assert_eq!(p.query_wait_timeout, Duration::from_secs(60));
    assert_eq!(p.idle_transaction_timeout, Duration::from_secs(20));
    assert_eq!(p.server_check_delay, Duration::from_secs(10));
    assert_eq!(p.server_check_query, "select 1");
    assert_eq!(
        p.ignore_startup_parameters,
        ["extra_float_digits", "options"]
    );
    assert_eq!(p.max_prepared_statements, 100);
    assert_eq!(p.track_extra_parameters, ["search_path"]);
    assert_eq!(p.autodb_idle_timeout, Duration::from_secs(600));
    assert_eq!(p.max_packet_size, 1048576);
    assert_eq!(c.limits.max_db_client_connections, Some(500));
    assert_eq!(c.limits.max_user_client_connections, Some(300));
    assert_eq!(c.admin.admin_users, ["postgres", "ops"]);
    assert_eq!(c.admin.stats_users, ["monitor"]);
    let pooled = c.listeners.iter().find(|l| l.name == "pgbouncer").unwrap();
    assert_eq!(pooled.mode, pgvane::config::ListenerMode::Transaction);
    assert_eq!(pooled.target, pgvane::config::Target::Primary);
    // The HAProxy servers and PgBouncer's other server; not the HAProxy port itself.
    let ports: Vec<u16> = c.backends.iter().map(|b| b.port).collect();
    assert_eq!(ports, [5432, 5433, 5433]);
    let app = c.users.iter().find(|u| u.name == "app").unwrap();
    assert_eq!(
        (
            app.pool_size,
            app.reserve_pool_size,
            app.max_user_connections
        ),
        (Some(10), Some(3), Some(20))
    );
    use pgvane::config::PoolMode;
    assert_eq!(app.pool_mode, Some(PoolMode::Session));
    let batch = c.users.iter().find(|u| u.name == "batch").unwrap();
    assert_eq!(batch.pool_mode, Some(PoolMode::Transaction));
    let other = c.databases.iter().find(|d| d.name == "other").unwrap();
    assert_eq!(other.dbname.as_deref(), Some("realname"));
    assert_eq!(
        (
            other.pool_size,
            other.min_pool_size,
            other.reserve_pool_size
        ),
        (Some(5), Some(1), Some(2))
    );
    assert_eq!(other.max_db_connections, Some(8));
    assert_eq!(other.pool_mode, Some(PoolMode::Session));
    let names: Vec<&str> = c.databases.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["appdb", "other", "*"]);
    assert_eq!(c.auth.auth_user.as_deref(), Some("pgbouncer"));
    assert_eq!(
        c.auth.auth_query,
        "SELECT usename, passwd FROM pgbouncer.get_auth($1)"
    );
    assert_eq!(c.auth.auth_dbname.as_deref(), Some("postgres"));
    assert_eq!(
        c.tls.client_tls_cert_file.as_deref(),
        Some(std::path::Path::new("/etc/pgbouncer/server.crt"))
    );
    assert_eq!(c.tls.client_tls_protocols.as_deref(), Some("secure"));
    assert_eq!(
        c.tls.server_tls_sslmode,
        Some(pgvane::config::ServerSslMode::Prefer)
    );
    for not_carried in [
        "server_tls_protocols: toward PostgreSQL pgvane uses rustls' defaults",
        "[databases] other connect_query=select 1: not supported per database",
        "[users] batch pool_mode=statement: statement mode is not supported",
        "logfile:",
    ] {
        assert!(toml.contains(not_carried), "{not_carried}:\n{toml}");
    }
}

/// A transaction listener `tx` (prepared statements tracked), the admin API on `admin`,
/// and `upgrade_socket` at `socket`.
fn upgradable_config(
    cluster: &Cluster,
    tx: u16,
    admin: u16,
    socket: &std::path::Path,
    shutdown_timeout: &str,
) -> String {
    pooled_config(
        cluster,
        &listener("tx", tx, "primary", "mode = \"transaction\""),
        &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n[pool]\nmax_prepared_statements = 10\n"),
    )
    .replace(
        "[general]\n",
        &format!(
            "[general]\nupgrade_socket = \"{}\"\nshutdown_timeout = \"{shutdown_timeout}\"\n",
            socket.display()
        ),
    )
}

/// Starts pgvane on `text` and waits until it offers its sockets for an upgrade at `socket`.
async fn start_upgradable(text: &str, ports: &[u16], socket: &std::path::Path) -> Pgvane {
    let p = Pgvane::start(text, ports);
    eventually(PATIENCE, "the upgrade socket offered", || async {
        socket.exists().then_some(())
    })
    .await;
    p
}

/// Waits (up to PATIENCE) for `p` to exit: its exit status if it did, and `p` for its log.
async fn exit_of(mut p: Pgvane) -> (Option<std::process::ExitStatus>, Pgvane) {
    let exited = tokio::task::spawn_blocking(move || (p.wait_exit(PATIENCE), p));
    exited.await.unwrap()
}

/// Zero-downtime upgrade: a second pgvane with the same `upgrade_socket` takes over the
/// listening sockets; a client connecting in a loop meanwhile is never refused, the old
/// process finishes the transaction it has open, then exits, and idle pooled clients go on
/// over their connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_takes_over_the_sockets_without_refusing_a_connection() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let cluster = Cluster::start(0);
    let (tx, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("upgrade.sock");
    let text = upgradable_config(&cluster, tx, admin, &socket, "60s");
    let old = start_upgradable(&text, &[tx, admin], &socket).await;
    let held = connect(tx, SUPERUSER, "postgres").await.unwrap();
    held.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(connect(tx, SUPERUSER, "postgres").await.unwrap());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let looping = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let run = async {
                    let c = connect(tx, SUPERUSER, "postgres").await?;
                    c.simple_query("SELECT 1").await.map(|_| ())
                };
                match run.await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        })
    };
    eventually(PATIENCE, "the connect loop running", || async {
        (ok.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;

    let new = Pgvane::start(&text, &[tx, admin]);
    new.wait_log("listening sockets taken over", PATIENCE).await;
    old.wait_log("winds down", PATIENCE).await;
    // The old process still serves the transaction it has open.
    held.batch_execute("SELECT 2; COMMIT").await.unwrap();
    drop(held);
    let exited = exit_of(old).await;
    assert!(
        exited.0.is_some(),
        "the old process exits once its sessions are done"
    );
    let after = ok.load(Ordering::Relaxed);
    eventually(
        PATIENCE,
        "connections served by the new process alone",
        || async { (ok.load(Ordering::Relaxed) >= after + 20).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let errors = looping.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{errors:?}");
    // Pooled clients idle through it all go on over their connections.
    for c in &idle {
        c.batch_execute("SELECT 1").await.unwrap();
    }
    // The new process offers its sockets for the next upgrade, to its own user only.
    assert!(new.log().contains("listening"), "{}", new.log());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

/// Zero-downtime upgrade with pooled clients: idle ones move to the new process with their
/// sockets and sessions (parameters, prepared statements, cancel key), a busy one once its
/// transaction ends; none reconnects, and the old process exits long before its
/// shutdown_timeout, having nobody left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_moves_pooled_clients_to_the_new_process() {
    let cluster = Cluster::start(0);
    let (tx, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("upgrade.sock");
    let text = upgradable_config(&cluster, tx, admin, &socket, "600s");
    let old = start_upgradable(&text, &[tx, admin], &socket).await;

    // An idle client with a parameter of its own and a named prepared statement.
    let prepared = connect(tx, SUPERUSER, "postgres").await.unwrap();
    prepared
        .batch_execute("SET application_name = 'moved'")
        .await
        .unwrap();
    let add_one = prepared.prepare("SELECT $1::int + 1").await.unwrap();
    assert_eq!(
        prepared
            .query_one(&add_one, &[&41])
            .await
            .unwrap()
            .get::<_, i32>(0),
        42
    );
    // Idle clients that only logged in.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(connect(tx, SUPERUSER, "postgres").await.unwrap());
    }
    // One in a transaction while the upgrade happens.
    let busy = connect(tx, SUPERUSER, "postgres").await.unwrap();
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let new = Pgvane::start(&text, &[tx, admin]);
    old.wait_log("winds down", PATIENCE).await;
    // The busy client's transaction goes on where it is, then the client moves too.
    busy.batch_execute("SELECT 2; COMMIT").await.unwrap();
    let (status, old) = exit_of(old).await;
    assert!(
        status.is_some(),
        "the old process exits once its sessions have moved (shutdown_timeout is 600 s):\n{}",
        old.log()
    );
    assert!(
        old.log().contains("sent=22 lost=0"),
        "every pooled session was sent:\n{}",
        old.log()
    );

    // Every client goes on over the connection it has, now served by the new process.
    assert_eq!(
        prepared
            .query_one(&add_one, &[&1])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    let name = prepared
        .query_one("SHOW application_name", &[])
        .await
        .unwrap();
    assert_eq!(name.get::<_, String>(0), "moved");
    for c in &idle {
        assert_eq!(
            c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
            1
        );
    }
    busy.batch_execute("SELECT 3").await.unwrap();
    // Its cancel key came along: a cancel reaches its query through the new process.
    let cancel = prepared.cancel_token();
    let sleeping = tokio::spawn(async move { prepared.batch_execute("SELECT pg_sleep(60)").await });
    eventually(PATIENCE, "the query running", || async {
        let c = cluster.primary().connect().await;
        let running = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
                &[],
            )
            .await
            .unwrap();
        (running.get::<_, i64>(0) == 1).then_some(())
    })
    .await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeping.await.unwrap().unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
    new.wait_log(
        "the old process has sent its last session sessions=22",
        PATIENCE,
    )
    .await;
}

/// A session whose user pgvane knows only by its SCRAM verifier moves with the keys its
/// login proved: the new process, which has seen no login of that user, logs in to
/// PostgreSQL with them for the session's next transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_session_brings_the_scram_keys_its_server_logins_need() {
    let cluster = Cluster::start(0);
    let verifier = scram_verifier(&cluster).await;
    let tx = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (file, socket) = (dir.path().join("userlist.txt"), dir.path().join("up.sock"));
    std::fs::write(&file, format!("\"{SUPERUSER}\" \"{verifier}\"\n")).unwrap();
    let text = format!(
        "{}\n[auth]\nfile = \"{}\"\n[general]\nupgrade_socket = \"{}\"\nshutdown_timeout = \"600s\"\n",
        config(&cluster, "interval = \"200ms\"", &listener("tx", tx, "primary", "mode = \"transaction\"")),
        file.display(),
        socket.display(),
    );
    let old = start_upgradable(&text, &[tx], &socket).await;
    let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
    assert_eq!(
        first_value(&c.simple_query("SELECT 1").await.unwrap()),
        Some("1")
    );

    let new = Pgvane::start(&text, &[tx]);
    assert!(exit_of(old).await.0.is_some(), "the old process exits");
    new.wait_log("sessions=1", PATIENCE).await;
    let rows = c.simple_query("SELECT 40 + 2").await.unwrap();
    assert_eq!(first_value(&rows), Some("42"));
}
