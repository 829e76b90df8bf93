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

/// The admin API bounds what a client can hold: connections that trickle their headers are
/// closed (and past a cap, refused at once), and PAUSE of a database no pool serves is
/// refused rather than remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_cannot_be_held_or_bloated() {
    use tokio::io::AsyncWriteExt;
    let (_cluster, _tx, admin, _pgvane) = limited("").await;
    let mut trickling = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(("127.0.0.1", admin)).await.unwrap();
        s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        trickling.push(s);
    }
    for s in &mut trickling {
        closed_by_peer(s).await;
    }
    let (code, _) = http_async(admin, "GET", "/status").await;
    assert_eq!(code, 200);

    let name = "x".repeat(60_000);
    let (code, body) = http_async(admin, "POST", &format!("/pause?database={name}")).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(metric(admin, "pgvane_paused").await, Some(0.0));
}

/// A passthrough listener spends no server connection on a client that sends nothing: its
/// first packet must arrive within client_login_timeout, or it is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_passthrough_clients_cost_no_server_connection() {
    let cluster = Cluster::start(0);
    let rw = free_port();
    let text = config(
        &cluster,
        "interval = \"200ms\"\n",
        &listener("rw", rw, "primary", ""),
    ) + "\n[general]\nclient_login_timeout = \"2s\"\n";
    let _pgvane = Pgvane::start(&text, &[rw]);
    let server = cluster.primary().port;
    let before = connections_to(server);
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(("127.0.0.1", rw)).await.unwrap());
    }
    // A client that logs in meanwhile is served.
    let c = connect(rw, SUPERUSER, "postgres").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    assert!(
        connections_to(server) <= before + 2,
        "{} connections to the server for 50 silent clients",
        connections_to(server) - before
    );
    for s in &mut silent {
        closed_by_peer(s).await;
    }
}
