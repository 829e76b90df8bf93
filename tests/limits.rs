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
    let open = |n: f64| {
        eventually(PATIENCE, "the clients admitted", move || async move {
            let open = r#"pgvane_client_connections{listener="tx"}"#;
            (metric(admin, open).await == Some(n)).then_some(())
        })
    };
    // The harness's readiness probe may still hold a slot for a moment.
    open(0.0).await;
    let mut admitted = Vec::new();
    for _ in 0..10 {
        admitted.push(TcpStream::connect(("127.0.0.1", tx)).await.unwrap());
    }
    open(10.0).await;
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

/// Waits until a login from `source` succeeds (`what` a limit to pass).
async fn logs_in_eventually(port: u16, source: &str, what: &str) {
    eventually(PATIENCE, what, || async {
        login_code(port, source, SUPERUSER)
            .await
            .is_none()
            .then_some(())
    })
    .await;
}

/// The SQLSTATE a login from `source` ends with: None when it succeeds.
async fn login_code(port: u16, source: &str, user: &str) -> Option<String> {
    let (_, login) = RawClient::login_from(port, source, user, "postgres").await;
    match login.last() {
        Some(m) if m.tag == b'Z' => None,
        Some(m) => Some(m.field(b'C').unwrap_or_default()),
        None => Some("closed".into()),
    }
}

/// Per-address limits, each on a listener of its own, told apart by client address
/// (127.0.0.x): one address over its limit is refused while another is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limits_refuse_one_address_and_serve_another() {
    let cluster = Cluster::start(0);
    let (rate, cap, acl, auth, admin) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let tx = "mode = \"transaction\"";
    let listeners = listener("rate", rate, "primary", &format!("{tx}\n[listener.limits]\nip_connection_rate = \"5/s\"\nip_connection_burst = 5"))
        + &listener("cap", cap, "primary", &format!("{tx}\n[listener.limits]\nip_max_connections = 3"))
        + &listener("acl", acl, "primary", &format!("{tx}\n[listener.limits]\nallow = [\"127.0.0.0/30\"]\ndeny = [\"127.0.0.2/32\"]"))
        + &listener("auth", auth, "primary", &format!("{tx}\n[listener.limits]\nip_auth_failures = 3\nip_auth_failure_window = \"60s\"\nip_auth_lockout = \"2s\""));
    let extra = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    let _pgvane = Pgvane::start(
        &pooled_config(&cluster, &listeners, &extra),
        &[rate, cap, acl, auth, admin],
    );

    Box::pin(rate_limit(rate)).await;
    Box::pin(cap_limit(cap)).await;
    Box::pin(acl_limit(acl)).await;
    Box::pin(auth_limit(auth)).await;

    for (limit, at_least) in [
        ("ip_connection_rate", 15.0),
        ("ip_max_connections", 1.0),
        ("deny", 2.0),
        ("ip_auth_lockout", 1.0),
    ] {
        let sample = format!("pgvane_refusals_total{{answered=\"yes\",limit=\"{limit}\"}}");
        assert!(metric(admin, &sample).await >= Some(at_least), "{sample}");
    }
}

/// One primary behind a transaction listener with `limits` (keys of `[limits]`); the
/// harness superuser's `[[user]]` entry gets `superuser_keys`, and each of `roles` is
/// created on the server and given an entry with the harness password.
async fn behind_limits(
    limits: &str,
    superuser_keys: &str,
    roles: &[&str],
) -> (Cluster, u16, Pgvane) {
    let cluster = Cluster::start(0);
    for role in roles {
        create_role(&cluster, role).await;
    }
    let tx = free_port();
    let mut text = pooled_config(
        &cluster,
        &listener("tx", tx, "primary", "mode = \"transaction\""),
        &format!("[limits]\n{limits}\n"),
    )
    .replace(
        &format!("name = \"{SUPERUSER}\"\n"),
        &format!("name = \"{SUPERUSER}\"\n{superuser_keys}\n"),
    );
    for role in roles {
        text += &format!("\n[[user]]\nname = \"{role}\"\npassword = \"{PASSWORD}\"\n");
    }
    let pgvane = Pgvane::start(&text, &[tx]);
    (cluster, tx, pgvane)
}

/// Per-user caps count over all listeners; a user's own entry overrides `[limits]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_limits_cap_a_user_and_not_another() {
    let (_cluster, tx, _pgvane) = behind_limits(
        "max_user_client_connections = 2",
        "max_user_client_connections = 3",
        &["other"],
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let (c, login) = RawClient::login(tx, SUPERUSER, "postgres").await;
        assert_eq!(login.last().unwrap().tag, b'Z');
        open.push(c);
    }
    let (_, login) = RawClient::login(tx, SUPERUSER, "postgres").await;
    assert_eq!(
        login[0].field(b'C').as_deref(),
        Some("53300"),
        "{}",
        show(&login)
    );
    assert!(login[0]
        .field(b'M')
        .unwrap()
        .contains("max_user_client_connections"));
    // "other" has the [limits] cap of 2.
    let mut others = Vec::new();
    for _ in 0..2 {
        let (c, login) = RawClient::login(tx, "other", "postgres").await;
        assert_eq!(login.last().unwrap().tag, b'Z', "{}", show(&login));
        others.push(c);
    }
    let (_, login) = RawClient::login(tx, "other", "postgres").await;
    assert_eq!(
        login[0].field(b'C').as_deref(),
        Some("53300"),
        "{}",
        show(&login)
    );
    // One leaves, another comes.
    drop(others.pop());
    eventually(PATIENCE, "a place freed for other", || async {
        let (_, login) = RawClient::login(tx, "other", "postgres").await;
        (login.last().unwrap().tag == b'Z').then_some(())
    })
    .await;
}

async fn rate_limit(port: u16) {
    // Rate: 30 logins at once from 127.0.0.2, then one from 127.0.0.3.
    let logins = (0..30).map(|_| login_code(port, "127.0.0.2", SUPERUSER));
    let codes = futures_util::future::join_all(logins).await;
    let refused = codes
        .iter()
        .filter(|c| c.as_deref() == Some("08004"))
        .count();
    assert!(refused >= 10, "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c.is_none() || c.as_deref() == Some("08004")),
        "{codes:?}"
    );
    assert_eq!(login_code(port, "127.0.0.3", SUPERUSER).await, None);
}

async fn cap_limit(port: u16) {
    // Connections at once: three from 127.0.0.2, the fourth refused, one from elsewhere fine.
    let mut open = Vec::new();
    for _ in 0..3 {
        let (c, login) = RawClient::login_from(port, "127.0.0.2", SUPERUSER, "postgres").await;
        assert_eq!(login.last().unwrap().tag, b'Z');
        open.push(c);
    }
    assert_eq!(
        login_code(port, "127.0.0.2", SUPERUSER).await.as_deref(),
        Some("53300")
    );
    assert_eq!(login_code(port, "127.0.0.3", SUPERUSER).await, None);
    drop(open.pop());
    logs_in_eventually(port, "127.0.0.2", "a place freed for 127.0.0.2").await;
}

async fn acl_limit(port: u16) {
    // allow 127.0.0.0/30 minus deny 127.0.0.2.
    assert_eq!(login_code(port, "127.0.0.1", SUPERUSER).await, None);
    assert_eq!(
        login_code(port, "127.0.0.2", SUPERUSER).await.as_deref(),
        Some("28000")
    );
    assert_eq!(
        login_code(port, "127.0.0.5", SUPERUSER).await.as_deref(),
        Some("28000")
    );
}

async fn auth_limit(port: u16) {
    // Three failed logins lock 127.0.0.6 out, even with the right password; 127.0.0.7 is
    // not; the lockout ends.
    for _ in 0..3 {
        assert_eq!(
            login_code(port, "127.0.0.6", "nobody").await.as_deref(),
            Some("28P01")
        );
    }
    assert_eq!(
        login_code(port, "127.0.0.6", SUPERUSER).await.as_deref(),
        Some("08004")
    );
    assert_eq!(login_code(port, "127.0.0.7", SUPERUSER).await, None);
    logs_in_eventually(port, "127.0.0.6", "the lockout to end").await;
}

/// A user over its transaction rate gets an ERROR (53400) for the transaction, not run,
/// and its session goes on (simple and extended requests alike); another user is not
/// affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_its_transaction_rate_is_refused_a_transaction_not_the_session() {
    let limits =
        "user_transaction_rate = \"2/s\"\nuser_transaction_burst = 3\nuser_transaction_shape = 0";
    let (_cluster, tx, _pgvane) = behind_limits(limits, "", &["other"]).await;
    let (mut c, _) = RawClient::login(tx, SUPERUSER, "postgres").await;
    let (mut o, _) = RawClient::login(tx, "other", "postgres").await;
    let mut refused = 0;
    for _ in 0..10 {
        c.send(&query("SELECT 1")).await;
        let got = c.until_ready().await;
        match got.iter().find(|m| m.tag == b'E') {
            Some(e) => {
                assert_eq!(e.field(b'C').as_deref(), Some("53400"), "{}", show(&got));
                assert_eq!(e.field(b'S').as_deref(), Some("ERROR"));
                refused += 1;
            }
            None => assert_eq!(rows(&got), ["1"]),
        }
    }
    assert!(refused >= 5, "{refused} of 10 refused");
    // The other user is not limited by this one's rate.
    o.send(&query("SELECT 2")).await;
    assert_eq!(rows(&o.until_ready().await), ["2"]);
    // An extended request over the rate is refused whole, up to its Sync.
    c.send(&extended("", "SELECT 3")).await;
    let got = c.until_ready().await;
    let tags: String = got.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, "EZ", "{}", show(&got));
    // Within the rate again, the session works.
    let deadline = Instant::now() + PATIENCE;
    loop {
        c.send(&query("SELECT 4")).await;
        if rows(&c.until_ready().await) == ["4"] {
            break;
        }
        assert!(Instant::now() < deadline, "never within the rate again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// With `user_transaction_shape`, transactions over the rate wait for their turn instead of
/// failing: all are served, at the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_over_the_rate_are_shaped_within_the_shape() {
    let limits = "user_transaction_rate = \"4/s\"\nuser_transaction_burst = 1\nuser_transaction_shape = \"30s\"";
    let (_cluster, tx, _pgvane) = behind_limits(limits, "", &[]).await;
    let (mut c, _) = RawClient::login(tx, SUPERUSER, "postgres").await;
    let started = Instant::now();
    for i in 0..9 {
        c.send(&query(&format!("SELECT {i}"))).await;
        assert_eq!(rows(&c.until_ready().await), [i.to_string()]);
    }
    // Nine at 4 a second with a burst of one: the last no sooner than 2 s after the first.
    assert!(
        started.elapsed().as_secs_f64() >= 1.9,
        "{:?}",
        started.elapsed()
    );
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Per-address state stays bounded however many addresses appear: 100,000 connections from
/// 100,000 distinct addresses (127.1.0.0 and up), each limited, move pgvane's RSS by a few
/// MiB at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_addresses_cost_bounded_memory() {
    let cluster = Cluster::start(0);
    let rw = free_port();
    let limits = "[listener.limits]\nip_connection_rate = \"1/s\"\nip_max_connections = 1\nip_auth_failures = 5\n";
    let text = config(
        &cluster,
        "interval = \"1s\"\n",
        &listener("rw", rw, "primary", limits),
    ) + "\n[general]\nmax_client_conn = 5000\nclient_login_timeout = \"1s\"\n";
    let pgvane = Pgvane::start(&text, &[rw]);
    // Warm up: the first connections set up what every connection uses.
    let flood = |from: u32, to: u32| async move {
        let lanes = (0..8u32).map(|lane| async move {
            for i in (from + lane..to).step_by(8) {
                let ip = std::net::Ipv4Addr::from(0x7f01_0000 + i);
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind((ip, 0).into()).unwrap();
                // Closed at once by the client: pgvane still admits it and counts its address.
                drop(socket.connect(([127, 0, 0, 1], rw).into()).await);
            }
        });
        futures_util::future::join_all(lanes).await;
    };
    flood(0, 5_000).await;
    let before = rss_kib(pgvane.pid());
    let started = Instant::now();
    flood(5_000, 105_000).await;
    let after = rss_kib(pgvane.pid());
    eprintln!(
        "100,000 addresses in {:?}: RSS {before} KiB -> {after} KiB",
        started.elapsed()
    );
    assert!(after < before + 8 * 1024, "RSS {before} KiB -> {after} KiB");
    // Still serving, once the last second's counts (over-estimated with this many
    // addresses in the sketches, as documented) have passed.
    eventually(PATIENCE, "a login after the flood", || async {
        connect(rw, SUPERUSER, "postgres").await.ok().map(drop)
    })
    .await;
}
