//! The demo stack (docker-compose.yml, docker/): no Docker engine runs here, so what can be
//! checked without one is: the compose file, every config it mounts, and the dashboard's
//! queries against a live pgvane scraped by a real Prometheus.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn succeeds(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

/// Debian's docker-compose accepts the file; pgvane's config passes `pgvane check`;
/// promtool accepts Prometheus's config; the Grafana provisioning names the dashboard.
#[test]
fn the_stack_s_files_are_valid() {
    succeeds(
        Command::new("docker-compose")
            .current_dir(root())
            .args(["config", "-q"]),
    );
    succeeds(
        Command::new(env!("CARGO_BIN_EXE_pgvane"))
            .args(["check", "--config"])
            .arg(root().join("docker/pgvane/pgvane.toml")),
    );
    succeeds(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(root().join("docker/prometheus/prometheus.yml")),
    );
    let dashboard =
        std::fs::read_to_string(root().join("docker/grafana/dashboards/pgvane.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert_eq!(dashboard["uid"], "pgvane");
}

/// The metric names the dashboard's queries use.
fn dashboard_metrics() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(root().join("docker/grafana/dashboards/pgvane.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("pgvane_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    names
}

/// A live pgvane (a primary and a replica behind it, transactions, a refused client) has
/// every metric the dashboard queries, and a real Prometheus scraping it answers queries
/// on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_metric_the_dashboard_queries() {
    let cluster = Cluster::start(1);
    let (tx, admin) = (free_port(), free_port());
    let text = pooled_config(
        &cluster,
        &listener("tx", tx, "primary", "mode = \"transaction\""),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[limits]\ndeny = [\"127.0.0.2/32\"]\n"
        ),
    );
    let _pgvane = Pgvane::start(&text, &[tx, admin]);
    let client = connect(tx, SUPERUSER, "postgres").await.unwrap();
    for _ in 0..20 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    // A refused client: a refusal and a client error.
    let (_, refused) =
        common::raw::RawClient::login_from(tx, "127.0.0.2", SUPERUSER, "postgres").await;
    assert!(refused.iter().any(|m| m.tag == b'E'));

    let wanted = dashboard_metrics();
    assert!(wanted.len() > 10, "{wanted:?}");
    let exposed = eventually(PATIENCE, "every dashboard metric in /metrics", || async {
        let (_, body) = http_async(admin, "GET", "/metrics").await;
        let names: BTreeSet<String> = body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        wanted.is_subset(&names).then_some(names)
    })
    .await;
    assert!(wanted.is_subset(&exposed));

    // A real Prometheus, scraping every 500 ms.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 500ms\nscrape_configs:\n  - job_name: pgvane\n    static_configs:\n      - targets: [\"127.0.0.1:{admin}\"]\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Debian's prometheus package (scripts/test installs it)");
    let found = eventually(
        PATIENCE,
        "Prometheus answering with pgvane's series",
        || async {
            let query = "/api/v1/query?query=pgvane_database_transactions_total";
            // Not listening yet, at first: no answer is a reason to wait, not to fail.
            let asked = tokio::task::spawn_blocking(move || http(web, "GET", query));
            let (code, body) = asked.await.unwrap()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let series = v["data"]["result"].as_array()?.len();
            (code == 200 && series > 0).then_some(body)
        },
    )
    .await;
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(found.contains("\"database\":\"postgres\""), "{found}");
}
