//! The driver matrix: real drivers' workloads through pgvane's transaction and session
//! listeners, with four times as many clients as the pool has server connections. Each
//! reuses prepared statements across many transactions, and copies and pipelines where
//! the driver can; any error or wrong answer fails the test.
//!
//! The drivers come from their registries, installed by `scripts/test` into
//! `target/drivers` (or `PGVANE_DRIVERS`): psycopg 3 and asyncpg (PyPI), node-postgres
//! (npm); pgjdbc is Debian's libpostgresql-jdbc-java. Go drivers cannot be installed here
//! (no Go module registry).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::future::join_all;

const POOL: usize = 2;
const CLIENTS: usize = 4 * POOL;

/// A primary with database `app` (tables `drv` and `drv_copy`) behind a transaction and a
/// session listener sharing a pool of `POOL`. Ports: (transaction, session).
async fn behind_both_modes() -> (Cluster, u16, u16, Pgvane) {
    let cluster = Cluster::start(0);
    create_app_db(&cluster).await;
    let app = connect(cluster.primary().port, SUPERUSER, "app")
        .await
        .unwrap();
    app.batch_execute(
        "CREATE TABLE drv (client int, note text); CREATE TABLE drv_copy (client int, note text)",
    )
    .await
    .unwrap();
    let (tx, session) = (free_port(), free_port());
    let listeners = listener("tx", tx, "primary", "mode = \"transaction\"")
        + &listener("session", session, "primary", "mode = \"session\"");
    let extra = format!("[pool]\ndefault_pool_size = {POOL}\n");
    let pgvane = Pgvane::start(&pooled_config(&cluster, &listeners, &extra), &[tx, session]);
    (cluster, tx, session, pgvane)
}

fn workload(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/drivers")
        .join(file)
}

/// Runs a driver's workload on each port (on empty tables), off the async runtime, and
/// fails on any error.
async fn run_on(
    cluster: &Cluster,
    ports: [u16; 2],
    command: impl Fn(u16) -> Command + Send + Sync + 'static,
) {
    let app = connect(cluster.primary().port, SUPERUSER, "app")
        .await
        .unwrap();
    let command = std::sync::Arc::new(command);
    for port in ports {
        app.batch_execute("TRUNCATE drv, drv_copy").await.unwrap();
        let command = command.clone();
        let out = tokio::task::spawn_blocking(move || command(port).output())
            .await
            .unwrap()
            .unwrap_or_else(|e| {
                panic!("cannot run the driver ({e}); scripts/test installs the drivers")
            });
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "port {port}: {text}");
    }
}

fn python(driver: &'static str) -> impl Fn(u16) -> Command {
    move |port| {
        let mut c = Command::new(drivers_dir().join("venv/bin/python"));
        c.arg(workload("workload.py"))
            .arg(driver)
            .arg(port.to_string())
            .arg(CLIENTS.to_string());
        c
    }
}

#[tokio::test]
async fn psycopg() {
    let (cluster, tx, session, _pgvane) = behind_both_modes().await;
    run_on(&cluster, [tx, session], python("psycopg")).await;
}

#[tokio::test]
async fn asyncpg() {
    let (cluster, tx, session, _pgvane) = behind_both_modes().await;
    run_on(&cluster, [tx, session], python("asyncpg")).await;
}

#[tokio::test]
async fn node_postgres() {
    let (cluster, tx, session, _pgvane) = behind_both_modes().await;
    run_on(&cluster, [tx, session], |port| {
        let mut c = Command::new("node");
        c.arg(workload("workload.js"))
            .arg(port.to_string())
            .arg(CLIENTS.to_string())
            .env("NODE_PATH", drivers_dir().join("node/node_modules"));
        c
    })
    .await;
}

#[tokio::test]
async fn pgjdbc() {
    let (cluster, tx, session, _pgvane) = behind_both_modes().await;
    run_on(&cluster, [tx, session], |port| {
        let mut c = Command::new("java");
        c.args(["-cp", "/usr/share/java/postgresql.jar"])
            .arg(workload("Workload.java"))
            .arg(port.to_string())
            .arg(CLIENTS.to_string());
        c
    })
    .await;
}

#[tokio::test]
async fn pgbench_in_every_query_mode() {
    let (cluster, tx, session, _pgvane) = behind_both_modes().await;
    let direct = cluster.primary().port;
    let init = pg_command("pgbench")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &direct.to_string(),
            "-U",
            SUPERUSER,
        ])
        .args(["-i", "-s", "1", "-q", "app"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    for mode in ["simple", "extended", "prepared"] {
        run_on(&cluster, [tx, session], move |port| {
            // A thread per client: pgbench prepares synchronously, blocking its thread
            // while that client waits for a server connection.
            let clients = CLIENTS.to_string();
            let mut c = pg_command("pgbench");
            c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
                .args([
                    "-M", mode, "-c", &clients, "-j", &clients, "-t", "50", "app",
                ]);
            c
        })
        .await;
    }
}

#[tokio::test]
async fn psql_scripts() {
    let (cluster, tx, session, _pgvane) = behind_both_modes().await;
    run_on(&cluster, [tx, session], |port| {
        let mut c = psql(port, "app");
        c.args(["-v", "ON_ERROR_STOP=1", "-f"])
            .arg(workload("script.sql"));
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres() {
    use futures_util::SinkExt;
    let (_cluster, tx, session, _pgvane) = behind_both_modes().await;
    for port in [tx, session] {
        let clients = (0..CLIENTS as i32).map(|n| async move {
            let c = connect(port, SUPERUSER, "app").await.unwrap();
            let plus = c.prepare("SELECT $1::int + 1").await.unwrap();
            for i in 0..40i32 {
                let v: i32 = c.query_one(&plus, &[&i]).await.unwrap().get(0);
                assert_eq!(v, i + 1);
            }
            // Pipelined: all sent before the first answer.
            let got = join_all((0..50i32).map(|i| {
                let (c, plus) = (&c, &plus);
                async move { c.query_one(plus, &[&i]).await.unwrap().get::<_, i32>(0) }
            }))
            .await;
            assert_eq!(got, (1..51).collect::<Vec<_>>());
            let sink = c
                .copy_in("COPY drv_copy (client, note) FROM STDIN")
                .await
                .unwrap();
            let mut sink = std::pin::pin!(sink);
            let rows: String = (0..2000).map(|i| format!("{n}\tcopied {i}\n")).collect();
            sink.send(bytes::Bytes::from(rows)).await.unwrap();
            assert_eq!(sink.finish().await.unwrap(), 2000);
        });
        tokio::time::timeout(Duration::from_secs(300), join_all(clients))
            .await
            .expect("tokio-postgres clients finish");
    }
}
