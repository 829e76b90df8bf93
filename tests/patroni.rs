//! Patroni check mode against an HTTP endpoint per node that answers as Patroni does
//! (`/primary` and `/replica`: 200 or 503), derived from the node's real state.

mod common;

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// Serves Patroni's `/primary` and `/replica` for the PostgreSQL server on `pg_port`. A
/// `lying` one answers 200 on `/primary` whatever PostgreSQL's state, as Patroni can during
/// a slow promotion.
async fn fake_patroni(pg_port: u16, lying: bool) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                let in_recovery = match connect(pg_port, SUPERUSER, "postgres").await {
                    Ok(c) => c
                        .query_one("SELECT pg_is_in_recovery()", &[])
                        .await
                        .ok()
                        .map(|r| r.get::<_, bool>(0)),
                    Err(_) => None,
                };
                let ok = (lying && req.uri().path() == "/primary")
                    || matches!(
                        (req.uri().path(), in_recovery),
                        ("/primary", Some(false)) | ("/replica", Some(true))
                    );
                let status = if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(b"{\"state\": \"running\"}")))
                        .unwrap(),
                )
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_checks_route_and_follow_a_failover() {
    let cluster = Cluster::start(1);
    let mut backends = String::new();
    for n in &cluster.nodes {
        backends += &format!(
            "\n[[backend]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\npatroni_port = {}\n",
            n.name,
            n.port,
            fake_patroni(n.port, false).await
        );
    }
    let (rw, ro) = (free_port(), free_port());
    let text = format!(
        "[health]\nmethod = \"patroni\"\ninterval = \"300ms\"\ntimeout = \"1s\"\nfall = 3\n\
         [health.sql]\nuser = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n{backends}{}{}",
        listener("rw", rw, "primary", ""),
        listener("ro", ro, "replica", "")
    );
    let pgvane = Pgvane::start(&text, &[rw, ro]);

    let c = connect(rw, SUPERUSER, "postgres").await.unwrap();
    assert_eq!(server_port(&c).await, cluster.primary().port);
    let c = connect(ro, SUPERUSER, "postgres").await.unwrap();
    assert_eq!(server_port(&c).await, cluster.nodes[1].port);

    cluster.primary().stop();
    cluster.nodes[1].promote();
    let promoted = Instant::now();
    eventually(PATIENCE, "writes on the promoted node", || async {
        let c = connect(rw, SUPERUSER, "postgres").await.ok()?;
        c.batch_execute("CREATE TABLE IF NOT EXISTS t (id int)")
            .await
            .ok()?;
        (try_server_port(&c).await? == cluster.nodes[1].port).then_some(())
    })
    .await;
    eprintln!(
        "patroni mode: promotion -> first write: {:?}",
        promoted.elapsed()
    );
    assert!(
        pgvane.log().contains("patroni: /primary answered 503"),
        "{}",
        pgvane.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_still_in_recovery_gets_no_writes() {
    let cluster = Cluster::start(1);
    let mut backends = String::new();
    for (i, n) in cluster.nodes.iter().enumerate() {
        // The replica's Patroni claims the leader role.
        let api = fake_patroni(n.port, i == 1).await;
        backends += &format!(
            "\n[[backend]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\npatroni_port = {api}\n",
            n.name, n.port
        );
    }
    for cross_check in [true, false] {
        let rw = free_port();
        let text = format!(
            "[general]\nfailover_hold_timeout = 0\n[health]\nmethod = \"patroni\"\ninterval = \"200ms\"\n\
             [health.patroni]\ncross_check = {cross_check}\n\
             [health.sql]\nuser = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\n{backends}{}",
            listener("rw", rw, "primary", "")
        );
        let pgvane = Pgvane::start(&text, &[rw]);
        if cross_check {
            // The claim is checked: writes go to the one node that is writable.
            let c = connect(rw, SUPERUSER, "postgres").await.unwrap();
            assert_eq!(server_port(&c).await, cluster.primary().port);
            c.batch_execute("CREATE TABLE IF NOT EXISTS x (i int)")
                .await
                .unwrap();
        } else {
            // Two indistinguishable claimants: writes go nowhere rather than to both.
            let err = connect(rw, SUPERUSER, "postgres").await.unwrap_err();
            assert_eq!(err.code().unwrap().code(), "57P03");
            assert!(pgvane.log().contains("several backends claim primary"));
        }
    }
}
