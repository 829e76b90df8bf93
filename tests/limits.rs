//! What clients can make pgvane spend: floods over `max_client_conn`, silent and trickling
//! connections, hostile admin API requests.

mod common;

use std::time::Instant;

use common::raw::*;
use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Waits until the peer closes `s` (end of stream or reset); panics after PATIENCE.
async fn closed_by_peer(s: &mut TcpStream) {
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(PATIENCE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    read.await.expect("closed by pgvane");
}

/// A transaction listener and the admin API, with `general` settings. Ports: (tx, admin).
async fn limited(general: &str) -> (Cluster, u16, u16, Pgvane) {
    let cluster = Cluster::start(0);
    let (tx, admin) = (free_port(), free_port());
    let listeners = listener("tx", tx, "primary", "mode = \"transaction\"");
    let extra = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    let text = pooled_config(&cluster, &listeners, &extra).replace(
        "[general]\nmax_client_conn = 2000\n",
        &format!("[general]\n{general}\n"),
    );
    let pgvane = Pgvane::start(&text, &[tx, admin]);
    (cluster, tx, admin, pgvane)
}

/// Silent connections over `max_client_conn` are answered by a bounded number of short
/// refusals and the rest closed at once, long before `client_login_timeout`: a flood
/// cannot take every descriptor, and a client that logs in is told 53300 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_over_max_client_conn_is_refused_not_kept() {
    let (_cluster, tx, admin, pgvane) =
        limited("max_client_conn = 10\nclient_login_timeout = \"600s\"").await;
    let mut admitted = Vec::new();
    for _ in 0..10 {
        admitted.push(TcpStream::connect(("127.0.0.1", tx)).await.unwrap());
    }
    eventually(PATIENCE, "ten clients admitted", || async {
        let open = metric(admin, r#"pgvane_client_connections{listener="tx"}"#).await;
        (open == Some(10.0)).then_some(())
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(TcpStream::connect(("127.0.0.1", tx)).await.unwrap());
    }
    let started = Instant::now();
    for s in &mut flood {
        closed_by_peer(s).await;
    }
    eprintln!(
        "300 silent over-limit connections closed in {:?}",
        started.elapsed()
    );
    let unanswered = r#"pgvane_refusals_total{answered="no",limit="max_client_conn"}"#;
    let n = metric(admin, unanswered).await;
    assert!(
        n >= Some(200.0),
        "{n:?}\n{}",
        http_async(admin, "GET", "/metrics").await.1
    );
    // A client that does log in is refused at once, as PostgreSQL refuses it.
    let (_, login) = RawClient::login(tx, SUPERUSER, "postgres").await;
    assert_eq!(
        login[0].field(b'C').as_deref(),
        Some("53300"),
        "{}",
        show(&login)
    );
    // The admitted ones are still there, and few descriptors are open.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", pgvane.pid()))
        .unwrap()
        .count();
    assert!(fds < 200, "{fds} descriptors open");
    drop(admitted);
}
