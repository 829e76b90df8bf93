//! The pooled link under the timings real clients produce: messages split across writes at
//! a transaction's end, a Terminate in any state, both directions streaming at once.

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use futures_util::future::join_all;

fn pooled_listener(mode: &str, port: u16) -> String {
    listener(mode, port, "primary", &format!("mode = \"{mode}\""))
}

/// A primary with database `app` behind a session and a transaction listener with trust
/// authentication and the pool settings in `extra`. Ports: (session, transaction).
async fn app_behind_both(extra: &str) -> (Cluster, u16, u16, Pgvane) {
    let cluster = Cluster::start(0);
    create_app_db(&cluster).await;
    let (session, tx) = (free_port(), free_port());
    let listeners = pooled_listener("session", session) + &pooled_listener("transaction", tx);
    let config = pooled_config(
        &cluster,
        &listeners,
        &format!("[auth]\ntype = \"trust\"\n{extra}"),
    );
    let pgvane = Pgvane::start(&config, &[session, tx]);
    (cluster, session, tx, pgvane)
}

/// Sends `first` with the first `k` bytes of `second` in one write, reads the answer to
/// `first` (the transaction ends there), then sends the rest of `second` and reads its
/// answers: `answers` ReadyForQuery-terminated groups.
async fn split_at_transaction_end(
    c: &mut RawClient,
    first: &[u8],
    second: &[u8],
    k: usize,
    answers: usize,
) -> Vec<Msg> {
    let mut out = first.to_vec();
    out.extend_from_slice(&second[..k]);
    c.send(&out).await;
    let head = c.until_ready().await;
    assert_eq!(rows(&head), ["1"], "{}", show(&head));
    c.send(&second[k..]).await;
    let mut got = Vec::new();
    for _ in 0..answers {
        got.extend(c.until_ready().await);
    }
    got
}

/// A message cut at a transaction's end: the part that came with the previous request must
/// not be lost when the transaction's server connection goes back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_split_at_a_transaction_end_loses_no_byte() {
    let (_cluster, _session, tx, _pgvane) = app_behind_both("").await;
    let (mut c, _) = RawClient::login(tx, SUPERUSER, "app").await;
    let select1 = query("SELECT 1");

    // A simple query whose first 1 to 4 header bytes came early.
    for k in 1..=4 {
        let got = split_at_transaction_end(&mut c, &select1, &query("SELECT 2"), k, 1).await;
        assert_eq!(rows(&got), ["2"], "split at {k}: {}", show(&got));
    }

    // A Bind of a named statement prepared earlier: the first 1 to 8 bytes came early.
    c.send(&[parse("s1", "SELECT 3"), sync()].concat()).await;
    c.until_ready().await;
    for k in 1..=8 {
        let got = split_at_transaction_end(&mut c, &select1, &bind_execute_sync("s1"), k, 1).await;
        assert_eq!(rows(&got), ["3"], "split at {k}: {}", show(&got));
    }

    // A 200 KB named Parse arriving in two writes.
    let long = format!("SELECT length('{}')", "x".repeat(200_000));
    let big = [parse("big", &long), bind_execute_sync("big")].concat();
    let got = split_at_transaction_end(&mut c, &select1, &big, 100_000, 1).await;
    assert_eq!(rows(&got), ["200000"], "{}", show(&got));

    // The session is intact.
    c.send(&query("SELECT 4")).await;
    assert_eq!(rows(&c.until_ready().await), ["4"]);
}

/// Rows of `t` being copied in right now, seen directly on the server.
async fn copies_running(cluster: &Cluster) -> i64 {
    let c = connect(cluster.primary().port, SUPERUSER, "app")
        .await
        .unwrap();
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY t FROM STDIN%' AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A client that sends Terminate while the server waits for its COPY data (sent once the
/// COPY began, or along with the COPY itself): the server side must end at once (locks
/// freed), and the client's connection be closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_during_copy_in_ends_the_server_side() {
    let (cluster, session, tx, _pgvane) = app_behind_both("").await;
    let copy = query("BEGIN; LOCK t; COPY t FROM STDIN");
    for port in [session, tx] {
        for along in [false, true] {
            let (mut c, _) = RawClient::login(port, SUPERUSER, "app").await;
            if along {
                c.send(&[copy.clone(), terminate()].concat()).await;
            } else {
                c.send(&copy).await;
                // CommandComplete of BEGIN and LOCK, then CopyInResponse.
                loop {
                    let m = c.next().await.expect("CopyInResponse");
                    if m.tag == b'G' {
                        break;
                    }
                    assert_ne!(m.tag, b'E', "{:?}", m.field(b'M'));
                }
                c.send(&copy_data(b"1\tone\n")).await;
                c.send(&terminate()).await;
            }
            let after = c.until_closed().await;
            assert!(
                after.iter().all(|m| m.tag != b'E'),
                "port {port}, along {along}: {}",
                show(&after)
            );
            eventually(ANSWER_LIMIT, "the COPY to end on the server", || async {
                (copies_running(&cluster).await == 0).then_some(())
            })
            .await;
            // Its lock went with it.
            let other = connect(cluster.primary().port, SUPERUSER, "app")
                .await
                .unwrap();
            other
                .batch_execute("SET lock_timeout = '10s'; LOCK t; SELECT 1")
                .await
                .unwrap();
        }
    }
}

/// Large COPY data and long pipelines stream through both listeners: each direction keeps
/// moving while the other is blocked on a full socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_stream_without_stalling() {
    use futures_util::SinkExt;
    let (_cluster, session, tx, _pgvane) = app_behind_both("").await;
    for port in [session, tx] {
        let c = connect(port, SUPERUSER, "app").await.unwrap();
        c.batch_execute("TRUNCATE t").await.unwrap();

        // One 10 MiB row, sent in chunks of varied sizes as drivers do.
        let note = "y".repeat(10 << 20);
        let line = format!("1\t{note}\n").into_bytes();
        let sink = c.copy_in("COPY t FROM STDIN").await.unwrap();
        let mut sink = std::pin::pin!(sink);
        let copy = async {
            let mut rest = &line[..];
            let mut size = 1000;
            while !rest.is_empty() {
                let n = size.min(rest.len());
                sink.send(bytes::Bytes::copy_from_slice(&rest[..n]))
                    .await
                    .unwrap();
                rest = &rest[n..];
                size = size * 7 % 200_000 + 1;
            }
            sink.finish().await.unwrap()
        };
        let copied = tokio::time::timeout(Duration::from_secs(120), copy)
            .await
            .expect("a 10 MiB COPY finishes");
        assert_eq!(copied, 1);

        // 20,000 inserts pipelined on one connection: the client writes while the server's
        // answers stream back.
        let insert = c
            .prepare("INSERT INTO t VALUES ($1, 'pipelined') RETURNING id")
            .await
            .unwrap();
        let inserts = (0..20_000i32).map(|i| {
            let (c, insert) = (&c, &insert);
            async move { c.query_one(insert, &[&i]).await.unwrap().get::<_, i32>(0) }
        });
        let ids = tokio::time::timeout(Duration::from_secs(120), join_all(inserts))
            .await
            .expect("the pipelined inserts finish");
        assert_eq!(ids, (0..20_000).collect::<Vec<_>>());
        let n: i64 = c
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 20_001);
    }
}

/// A startup packet of protocol 3.`minor` with `params`.
fn startup(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = (3u32 << 16 | u32::from(minor)).to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

fn parameter(login: &[Msg], name: &str) -> Option<String> {
    login.iter().filter(|m| m.tag == b'S').find_map(|m| {
        let mut parts = m.body.split(|&b| b == 0);
        (parts.next()? == name.as_bytes())
            .then(|| String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned())
    })
}

/// What drivers notice at login is as PostgreSQL does it: application_name reported,
/// client_encoding in the server's spelling, a Terminate before any startup packet closed
/// silently, an unknown parameter refused (42704), a newer protocol minor version or
/// protocol options negotiated down with NegotiateProtocolVersion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_answers_as_postgresql_does() {
    let (_cluster, session, tx, _pgvane) = app_behind_both("").await;
    for port in [session, tx] {
        let params = [
            ("user", SUPERUSER),
            ("database", "app"),
            ("application_name", "myapp"),
            ("client_encoding", "utf8"),
        ];
        let (mut c, login) = RawClient::login_with(port, &params).await;
        assert_eq!(
            parameter(&login, "application_name").as_deref(),
            Some("myapp")
        );
        assert_eq!(
            parameter(&login, "client_encoding").as_deref(),
            Some("UTF8")
        );
        c.send(&query("SHOW application_name")).await;
        assert_eq!(rows(&c.until_ready().await), ["myapp"]);

        // node-postgres' connect() then end() before the socket was used.
        let mut c = RawClient::connect(port).await;
        c.send(&terminate()).await;
        let said = c.until_closed().await;
        assert!(said.is_empty(), "{}", show(&said));
    }
    for port in [session, tx] {
        // An unknown parameter: the login is refused as PostgreSQL refuses it.
        let mut c = RawClient::connect(port).await;
        c.send(&startup(
            0,
            &[("user", SUPERUSER), ("database", "app"), ("foo", "bar")],
        ))
        .await;
        let said = c.until_closed().await;
        let codes: Vec<_> = said.iter().filter_map(|m| m.field(b'C')).collect();
        assert!(
            said.iter().all(|m| m.tag != b'Z') && codes.contains(&"42704".to_string()),
            "port {port}: {}",
            show(&said)
        );
    }
    for port in [session, tx] {
        // Protocol 3.2 with an option: negotiated down to 3.0, the option named.
        let mut c = RawClient::connect(port).await;
        c.send(&startup(
            2,
            &[
                ("user", SUPERUSER),
                ("database", "app"),
                ("_pq_.extension", "on"),
            ],
        ))
        .await;
        let login = c.until_ready().await;
        let v = login
            .iter()
            .find(|m| m.tag == b'v')
            .expect("NegotiateProtocolVersion");
        assert_eq!(&v.body[..8], &[0, 3, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&v.body[8..], b"_pq_.extension\0");
        c.send(&query("SELECT 1")).await;
        assert_eq!(rows(&c.until_ready().await), ["1"]);
    }
}

/// A client's Parse behaves as a Parse on PostgreSQL: a statement of the same text that the
/// server connection prepared before a schema change is not reused for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_parse_sees_the_current_schema() {
    // One server connection: both statements meet on it.
    let (cluster, _session, tx, _pgvane) = app_behind_both("[pool]\ndefault_pool_size = 1\n").await;
    let direct = connect(cluster.primary().port, SUPERUSER, "app")
        .await
        .unwrap();
    direct
        .batch_execute("CREATE TABLE rt (col int); INSERT INTO rt VALUES (1)")
        .await
        .unwrap();
    let (mut c, _) = RawClient::login(tx, SUPERUSER, "app").await;
    c.send(&[parse("s_int", "select col from rt"), sync()].concat())
        .await;
    let got = c.until_ready().await;
    assert_eq!(show(&got), "1 Z");

    direct
        .batch_execute("DROP TABLE rt; CREATE TABLE rt (col smallint); INSERT INTO rt VALUES (2)")
        .await
        .unwrap();
    c.send(&extended("s_small", "select col from rt")).await;
    let got = c.until_ready().await;
    assert_eq!(rows(&got), ["2"], "{}", show(&got));
}

/// Whether a client of `port` gets `SELECT 1` answered: the pool's one connection is free.
async fn pool_serves(port: u16) {
    let (mut c, _) = RawClient::login(port, SUPERUSER, "app").await;
    c.send(&query("SELECT 1")).await;
    assert_eq!(rows(&c.until_ready().await), ["1"]);
}

/// A client stopped mid-message, one that never reads its results, or one that sits in a
/// transaction cannot keep the pool's only server connection: query_timeout and
/// transaction_timeout end it, and the next client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_cannot_hold_a_server_connection_hostage() {
    let extra =
        "[pool]\ndefault_pool_size = 1\nquery_timeout = \"2s\"\ntransaction_timeout = \"4s\"\n";
    let (_cluster, session, tx, _pgvane) = app_behind_both(extra).await;
    let mut half_query = query("SELECT 1").to_vec();
    half_query.truncate(7);
    let big = query("SELECT repeat('x', 1000) FROM generate_series(1, 200000)");
    let stalls: [(&str, Vec<u8>, Option<&str>); 4] = [
        ("mid-message", half_query, Some("57014")),
        ("never reads", big.to_vec(), None),
        (
            "idle in a transaction block",
            query("BEGIN").to_vec(),
            Some("25P04"),
        ),
        ("half a header", b"Q\0\0".to_vec(), Some("25P04")),
    ];
    for port in [session, tx] {
        for (what, bytes, code) in &stalls {
            if *what == "half a header" && port == session {
                continue; // a session holds its connection while idle: nothing to bound
            }
            let (mut c, _) = RawClient::login(port, SUPERUSER, "app").await;
            c.send(bytes).await;
            if code.is_some() {
                let said = c.until_closed().await;
                let codes: Vec<_> = said.iter().filter_map(|m| m.field(b'C')).collect();
                assert!(
                    codes.iter().any(|c| Some(c.as_str()) == *code),
                    "{what} on port {port}: {}",
                    show(&said)
                );
            }
            // The next client gets the connection, however long the stalled one waits.
            pool_serves(tx).await;
            drop(c);
        }
    }
}

/// A Bind pipelined behind a DISCARD ALL fails as on PostgreSQL (the statement is gone),
/// instead of being renamed before the DISCARD ALL is answered and prepared anew on a server
/// connection that lacks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_discarded_in_the_same_pipeline_is_gone() {
    let (_cluster, _session, tx, _pgvane) =
        app_behind_both("[pool]\ndefault_pool_size = 2\n").await;
    let (mut c, _) = RawClient::login(tx, SUPERUSER, "app").await;
    let (mut other, _) = RawClient::login(tx, SUPERUSER, "app").await;
    for forget in ["DISCARD ALL", "DEALLOCATE ALL"] {
        // Prepared on the pool's idle connection, which another client then holds: the
        // DISCARD ALL and the Bind run on the other one, which lacks the statement.
        c.send(&[parse("s1", "SELECT 1"), sync()].concat()).await;
        c.until_ready().await;
        other.send(&query("BEGIN")).await;
        other.until_ready().await;
        c.send(&[query(forget), bind_execute_sync("s1")].concat())
            .await;
        let forgot = c.until_ready().await;
        assert_eq!(show(&forgot), "C Z", "{forget}");
        let bind = c.until_ready().await;
        assert_eq!(
            bind.first().and_then(|m| m.field(b'C')).as_deref(),
            Some("26000"),
            "{forget}: {}",
            show(&bind)
        );
        other.send(&query("COMMIT")).await;
        other.until_ready().await;
    }
}

/// Session state in transaction mode pins the client to its server connection: its later
/// transactions find the state, and no other client finds it, neither while the client is
/// there (the other waits for the pool's one connection) nor after it left (the connection
/// was reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_a_transaction_mode_client() {
    let (_cluster, _session, tx, _pgvane) =
        app_behind_both("[pool]\ndefault_pool_size = 1\n").await;
    let cases = [
        (
            "SET work_mem = '1MB'",
            "SHOW work_mem",
            "1MB",
            "SHOW work_mem",
            "4MB",
        ),
        (
            "PREPARE p AS SELECT 7",
            "EXECUTE p",
            "7",
            "SELECT count(*) FROM pg_prepared_statements",
            "0",
        ),
        (
            "CREATE TEMP TABLE tt (a int)",
            "SELECT count(*) FROM tt",
            "0",
            "SELECT to_regclass('tt') IS NULL",
            "t",
        ),
        (
            "LISTEN ch",
            "SELECT count(*) FROM pg_listening_channels()",
            "1",
            "SELECT count(*) FROM pg_listening_channels()",
            "0",
        ),
        (
            "SELECT pg_advisory_lock(42)",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "1",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            "0",
        ),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT 5",
            "FETCH c",
            "5",
            "SELECT count(*) FROM pg_cursors",
            "0",
        ),
    ];
    for (create, own_check, own, other_check, other) in cases {
        let (mut a, _) = RawClient::login(tx, SUPERUSER, "app").await;
        let (mut b, _) = RawClient::login(tx, SUPERUSER, "app").await;
        a.send(&query(create)).await;
        a.until_ready().await;
        // Waits for the pool's one connection while `a` is pinned to it.
        b.send(&query(other_check)).await;
        a.send(&query(own_check)).await;
        let got = a.until_ready().await;
        assert_eq!(rows(&got), [own], "{create}: {}", show(&got));
        a.send(&terminate()).await;
        a.until_closed().await;
        let got = b.until_ready().await;
        assert_eq!(
            rows(&got),
            [other],
            "{create}, seen by another client: {}",
            show(&got)
        );
    }
}

/// A client that hangs up while queued for the pool's one server connection has its request
/// dropped, never sent: its INSERT is not committed when the connection frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_dies_with_its_client() {
    let (_cluster, _session, tx, pgvane) = app_behind_both("[pool]\ndefault_pool_size = 1\n").await;
    let (mut holder, _) = RawClient::login(tx, SUPERUSER, "app").await;
    holder.send(&query("BEGIN")).await;
    holder.until_ready().await;
    let (mut queued, _) = RawClient::login(tx, SUPERUSER, "app").await;
    queued
        .send(&query("INSERT INTO t VALUES (7, 'queued')"))
        .await;
    drop(queued);
    pgvane
        .wait_log("request dropped, never sent", PATIENCE)
        .await;
    holder.send(&query("COMMIT")).await;
    holder.until_ready().await;
    // FIFO: a request of the dropped client would run before this one.
    holder
        .send(&query("SELECT count(*) FROM t WHERE id = 7"))
        .await;
    assert_eq!(rows(&holder.until_ready().await), ["0"]);
}

/// With `session_state = "reject"`, a statement that would create session state is not run:
/// the client gets ERROR 0A000 in its place (simple query, named and unnamed extended
/// statements alike), in order, and its session goes on unpinned. A pinning listener on the
/// same pool still runs the same text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_is_refused_where_the_listener_says_so() {
    let cluster = Cluster::start(0);
    create_app_db(&cluster).await;
    let (pin, strict, admin) = (free_port(), free_port(), free_port());
    let listeners = pooled_listener("transaction", pin)
        + &listener(
            "strict",
            strict,
            "primary",
            "mode = \"transaction\"\nsession_state = \"reject\"",
        );
    let extra = format!(
        "[auth]\ntype = \"trust\"\n[pool]\ndefault_pool_size = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
    );
    let _pgvane = Pgvane::start(
        &pooled_config(&cluster, &listeners, &extra),
        &[pin, strict, admin],
    );

    let refused = |got: &[Msg], what: &str| {
        let e = got.iter().find(|m| m.tag == b'E');
        let e = e.unwrap_or_else(|| panic!("{what}: no error in {}", show(got)));
        assert_eq!(e.field(b'C').as_deref(), Some("0A000"), "{what}");
        let message = e.field(b'M').unwrap();
        assert!(
            message.contains("not supported in transaction mode"),
            "{what}: {message}"
        );
        assert!(
            e.field(b'H').unwrap().contains("session-mode listener"),
            "{what}"
        );
    };
    let (mut c, _) = RawClient::login(strict, SUPERUSER, "app").await;
    let cases = [
        ("SET work_mem = '1MB'", "SHOW work_mem", "4MB"),
        (
            "PREPARE p AS SELECT 7",
            "SELECT count(*) FROM pg_prepared_statements",
            "0",
        ),
        (
            "CREATE TEMP TABLE tt (a int)",
            "SELECT to_regclass('tt') IS NULL",
            "t",
        ),
        (
            "LISTEN ch",
            "SELECT count(*) FROM pg_listening_channels()",
            "0",
        ),
        (
            "SELECT pg_advisory_lock(42)",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            "0",
        ),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT 5",
            "SELECT count(*) FROM pg_cursors",
            "0",
        ),
    ];
    for (create, check, none) in cases {
        c.send(&query(create)).await;
        let got = c.until_ready().await;
        refused(&got, create);
        assert_eq!(
            got.last().unwrap().body,
            b"I",
            "{create}: idle after the error"
        );
        c.send(&query(check)).await;
        assert_eq!(
            rows(&c.until_ready().await),
            [none],
            "{create} left nothing"
        );
    }
    // Inside a transaction the refusal fails it, as the statement's own error would.
    c.send(&query("BEGIN")).await;
    c.until_ready().await;
    c.send(&query("SELECT 1; LISTEN ch")).await;
    let got = c.until_ready().await;
    refused(&got, "LISTEN in a transaction");
    assert_eq!(got.last().unwrap().body, b"E", "{}", show(&got));
    c.send(&query("ROLLBACK")).await;
    c.until_ready().await;

    // Unnamed extended statement with a parameter, as psycopg sends it.
    let mut out = bytes::BytesMut::new();
    use postgres_protocol::message::frontend;
    frontend::parse("", "SELECT pg_advisory_lock($1)", [20], &mut out).unwrap();
    frontend::bind(
        "",
        "",
        [0i16],
        [Some(&b"42"[..])],
        |v: Option<&[u8]>, buf: &mut bytes::BytesMut| {
            buf.extend_from_slice(v.unwrap());
            Ok::<_, Box<dyn std::error::Error + Sync + Send>>(postgres_protocol::IsNull::No)
        },
        [0i16],
        &mut out,
    )
    .map_err(|_| ())
    .unwrap();
    frontend::describe(b'P', "", &mut out).unwrap();
    frontend::execute("", 0, &mut out).unwrap();
    frontend::sync(&mut out);
    c.send(&out).await;
    let got = c.until_ready().await;
    refused(&got, "unnamed extended");
    let tags: String = got.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, "12nEZ", "{}", show(&got));
    drop(c);

    // Named statements through a driver that checks types (tokio-postgres).
    let strict_client = connect(strict, SUPERUSER, "app").await.unwrap();
    let err = strict_client
        .query("SELECT pg_advisory_lock($1)", &[&42i64])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
    let listen = strict_client.prepare("LISTEN jobs").await.unwrap();
    let err = strict_client.execute(&listen, &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
    let locks: i64 = strict_client
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(locks, 0);
    drop(strict_client);

    // The pinning listener runs the same text on the same pool.
    let pinned = connect(pin, SUPERUSER, "app").await.unwrap();
    pinned
        .query("SELECT pg_advisory_lock($1)", &[&42i64])
        .await
        .unwrap();
    let mine: i64 = pinned
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mine, 1);
    for (feature, n) in [("listen", 3.0), ("advisory_lock", 3.0), ("set", 1.0)] {
        let sample = format!("pgvane_session_state_refused_total{{feature=\"{feature}\"}}");
        assert_eq!(metric(admin, &sample).await, Some(n), "{sample}");
    }
    assert_eq!(metric(admin, "pgvane_pinned_sessions").await, Some(1.0));
}

/// A list-valued parameter given at login (`search_path=a, b`) means on a pooled server
/// connection what it means on a direct one: two schemas, not one named "a, b".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_parameter_from_the_login_keeps_its_meaning() {
    let (cluster, session, tx, _pgvane) = app_behind_both("").await;
    let params = [
        ("user", SUPERUSER),
        ("database", "app"),
        ("search_path", "app_a, public"),
        ("DateStyle", "ISO, DMY"),
    ];
    let show = "SELECT current_setting('search_path') || ' / ' || current_setting('DateStyle')";
    let (mut direct, _) = RawClient::login_with(cluster.primary().port, &params).await;
    direct.send(&query(show)).await;
    let want = rows(&direct.until_ready().await);
    assert_eq!(want, ["app_a, public / ISO, DMY"]);
    for port in [session, tx] {
        let (mut c, _) = RawClient::login_with(port, &params).await;
        c.send(&query(show)).await;
        assert_eq!(rows(&c.until_ready().await), want, "port {port}");
    }
}

/// A `track_extra_parameters` parameter (search_path, which the server does not report)
/// set by a transaction-mode client follows it to its next transaction instead of pinning
/// it, and never reaches another client: with one server connection, another client is
/// served between the two (a pinned client would keep it from them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_follows_a_transaction_mode_client() {
    let (cluster, _session, tx, _pgvane) = app_behind_both("[pool]\ndefault_pool_size = 1\n").await;
    connect(cluster.primary().port, SUPERUSER, "app")
        .await
        .unwrap()
        .batch_execute("CREATE SCHEMA app_a")
        .await
        .unwrap();
    let one = |msgs: Vec<Msg>| rows(&msgs).join("");
    let path = "SELECT current_setting('search_path')";
    let (mut a, _) = RawClient::login(tx, SUPERUSER, "app").await;
    let (mut b, _) = RawClient::login(tx, SUPERUSER, "app").await;
    a.send(&query("SET search_path = app_a, public")).await;
    a.until_ready().await;
    b.send(&query(path)).await;
    assert_eq!(one(b.until_ready().await), "\"$user\", public");
    a.send(&query(path)).await;
    assert_eq!(one(a.until_ready().await), "app_a, public");
    // RESET is followed too.
    a.send(&query("BEGIN; RESET search_path; COMMIT")).await;
    a.until_ready().await;
    b.send(&query("SET search_path = app_a")).await;
    b.until_ready().await;
    a.send(&query(path)).await;
    assert_eq!(one(a.until_ready().await), "\"$user\", public");
    b.send(&query(path)).await;
    assert_eq!(one(b.until_ready().await), "app_a");
}

/// A client message longer than `max_packet_size` ends that client's session with 08P01
/// before any of it reaches the server; other clients go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_packet_size_is_refused() {
    let (_cluster, _session, tx, _pgvane) =
        app_behind_both("[pool]\nmax_packet_size = 1000\n").await;
    let (mut other, _) = RawClient::login(tx, SUPERUSER, "app").await;
    let (mut c, _) = RawClient::login(tx, SUPERUSER, "app").await;
    let long = format!("SELECT '{}'", "x".repeat(2000));
    c.send(&query(&long)).await;
    let got = c.until_closed().await;
    let e = got.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(e.field(b'C').as_deref(), Some("08P01"), "{}", show(&got));
    assert!(e
        .field(b'M')
        .unwrap()
        .contains("exceeds the limit of 1000 bytes"));
    other.send(&query("SELECT 1")).await;
    assert_eq!(rows(&other.until_ready().await), ["1"]);
}
