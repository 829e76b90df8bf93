//! Session and transaction pooling against a real PostgreSQL, with real clients.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use tokio_postgres::NoTls;

fn txn_listener(port: u16) -> String {
    listener("tx", port, "primary", "mode = \"transaction\"")
}

/// A primary behind a transaction listener configured with `extra`.
fn behind_txn_listener(extra: &str) -> (Cluster, u16, Pgvane) {
    let cluster = Cluster::start(0);
    let tx = free_port();
    let pgvane = Pgvane::start(&pooled_config(&cluster, &txn_listener(tx), extra), &[tx]);
    (cluster, tx, pgvane)
}

/// A primary with database `app`, behind a transaction listener configured with `extra`.
async fn app_behind_txn_listener(extra: &str) -> (Cluster, u16, Pgvane) {
    let cluster = Cluster::start(0);
    create_app_db(&cluster).await;
    let tx = free_port();
    let pgvane = Pgvane::start(&pooled_config(&cluster, &txn_listener(tx), extra), &[tx]);
    (cluster, tx, pgvane)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_a_pool_of_ten() {
    let (cluster, tx, pgvane) = app_behind_txn_listener("[pool]\ndefault_pool_size = 10\n").await;

    let clients = (0..500).map(|i| async move {
        let c = connect(tx, SUPERUSER, "app")
            .await
            .expect("login through pgvane");
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO t VALUES ({i}, 'x'); SELECT pg_sleep(0.01); COMMIT"
        ))
        .await
        .expect("transaction");
        c
    });
    let held = join_all(clients).await;
    let direct = connect(cluster.primary().port, SUPERUSER, "app")
        .await
        .unwrap();
    let rows: i64 = direct
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 500);
    // 500 clients are still connected, on at most 10 server connections.
    let servers = app_backends(cluster.primary()).await - 1; // minus `direct`
    assert!(servers <= 10 && servers > 0, "{servers} server connections");
    assert_eq!(held.len(), 500);
    drop(pgvane);
}

// Multi-threaded: psql blocks its thread while the dropped client's connection task must
// still run to say goodbye.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_the_server_before_reuse() {
    let cluster = Cluster::start(0);
    create_app_db(&cluster).await;
    let s = free_port();
    let extra = "[pool]\ndefault_pool_size = 1\n";
    let _pgvane = Pgvane::start(
        &pooled_config(
            &cluster,
            &listener("s", s, "primary", "mode = \"session\""),
            extra,
        ),
        &[s],
    );

    let a = connect(s, SUPERUSER, "app").await.unwrap();
    let pid_a = backend_pid(&a).await;
    a.batch_execute("SET work_mem = '7MB'; CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
    drop(a);

    // psql, through the same single server connection, sees none of it.
    let out = eventually(PATIENCE, "psql through the session listener", || async {
        let out = psql(s, "app")
            .args(["-At", "-c", "SELECT pg_backend_pid(), current_setting('work_mem'), to_regclass('scratch') IS NULL"])
            .output()
            .unwrap();
        out.status.success().then_some(out)
    })
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), format!("{pid_a}|4MB|t"));
}

#[tokio::test]
async fn wrong_password_is_refused_without_a_server_connection() {
    let (cluster, tx, _pgvane) = app_behind_txn_listener("").await;

    let err = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(tx)
        .user(SUPERUSER)
        .password("not-the-password")
        .dbname("app")
        .connect(NoTls)
        .await
        .err()
        .expect("login must fail");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "28P01");
    assert_eq!(
        db.message(),
        "password authentication failed for user \"postgres\""
    );
    // An unknown user gets the same answer.
    let err = connect(tx, "nobody_here", "app").await.err().unwrap();
    assert_eq!(err.as_db_error().unwrap().code().code(), "28P01");
    assert_eq!(app_backends(cluster.primary()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_transaction_leaves_no_lock_behind() {
    let (cluster, tx, _pgvane) = app_behind_txn_listener("").await;
    let direct = connect(cluster.primary().port, SUPERUSER, "app")
        .await
        .unwrap();
    let locks = || async {
        direct
            .query_one("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 't'", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };

    for script in [
        // Idle in transaction, holding a lock.
        "BEGIN;\nLOCK TABLE t IN ACCESS EXCLUSIVE MODE;\n",
        // Busy: a statement is running when the client dies.
        "BEGIN;\nLOCK TABLE t IN ACCESS EXCLUSIVE MODE;\nSELECT pg_sleep(60);\n",
    ] {
        let mut client = psql(tx, "app")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        client
            .stdin
            .as_mut()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        eventually(PATIENCE, "the lock to be taken", || async {
            (locks().await > 0).then_some(())
        })
        .await;
        client.kill().unwrap(); // SIGKILL: no Terminate message
        client.wait().unwrap();
        eventually(PATIENCE, "the lock to be released", || async {
            (locks().await == 0).then_some(())
        })
        .await;
        let open: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(open, 0, "no transaction left open after: {script}");
    }
    // The pool still works.
    let c = connect(tx, SUPERUSER, "app").await.unwrap();
    c.batch_execute("BEGIN; LOCK TABLE t; COMMIT")
        .await
        .unwrap();
}

/// Waits until a query of database `app` runs pg_sleep on the server.
async fn sleeping(cluster: &Cluster) {
    let direct = cluster.primary().connect().await;
    eventually(PATIENCE, "pg_sleep to run on the server", || async {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND state = 'active' AND query LIKE '%pg_sleep%'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (n > 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn cancel_reaches_the_running_query() {
    let (cluster, tx, _pgvane) = app_behind_txn_listener("").await;

    let c = connect(tx, SUPERUSER, "app").await.unwrap();
    let token = c.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    sleeping(&cluster).await;
    token.cancel_query(NoTls).await.unwrap();
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "57014", "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A cancel for an idle client is dropped and harms nothing. Sent raw to wait for
    // pgvane to close the cancel connection: tokio-postgres returns once it has sent the
    // request, and a cancel still on its way would reach the next query.
    let (mut idle, login) = raw::RawClient::login(tx, SUPERUSER, "app").await;
    raw::RawClient::cancel(tx, raw::RawClient::key(&login)).await;
    idle.send(&raw::query("SELECT 1")).await;
    let reply = idle.until_ready().await;
    assert_eq!(raw::rows(&reply), ["1"], "{}", raw::show(&reply));
}

#[tokio::test]
async fn a_cancel_from_a_client_that_went_idle_does_not_reach_its_last_server() {
    // One server connection: the client that used it last and the one using it now share it.
    let extra = "[pool]\ndefault_pool_size = 1\nquery_wait_timeout = \"10s\"\n";
    let (cluster, tx, _pgvane) = app_behind_txn_listener(extra).await;
    let before = connect(tx, SUPERUSER, "app").await.unwrap();
    let pid = backend_pid(&before).await;
    let now = connect(tx, SUPERUSER, "app").await.unwrap();
    let sleeper = tokio::spawn(async move {
        let pid: i32 = now
            .query_one("SELECT pg_backend_pid() FROM pg_sleep(2)", &[])
            .await?
            .get(0);
        Ok::<_, tokio_postgres::Error>(pid)
    });
    sleeping(&cluster).await;
    before.cancel_token().cancel_query(NoTls).await.unwrap();
    assert_eq!(
        sleeper.await.unwrap().unwrap().to_string(),
        pid,
        "same server connection"
    );
}

#[tokio::test]
async fn copy_in_and_out_in_transaction_mode() {
    use futures_util::{SinkExt, StreamExt};
    // One server connection: each step below needs it back from the one before.
    let extra = "[pool]\ndefault_pool_size = 1\nquery_wait_timeout = \"5s\"\n";
    let (_cluster, tx, _pgvane) = app_behind_txn_listener(extra).await;
    let c = connect(tx, SUPERUSER, "app").await.unwrap();
    let other = connect(tx, SUPERUSER, "app").await.unwrap();

    let sink = c.copy_in("COPY t FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut data = String::new();
    for i in 0..20_000 {
        data += &format!("{i}\trow number {i}\n");
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 20_000);
    // The extended-protocol COPY (whose early Sync the server ignores) returned the
    // server connection to the pool.
    other.batch_execute("SELECT 1").await.unwrap();

    let stream = c
        .copy_out("COPY (SELECT * FROM t ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<_> = stream.collect().await;
    let out: Vec<u8> = chunks
        .into_iter()
        .flat_map(|c| c.unwrap().to_vec())
        .collect();
    assert_eq!(String::from_utf8(out).unwrap(), data);
    // The connection is usable afterwards.
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_queries_from_many_clients_stay_apart() {
    let (_cluster, tx, _pgvane) = behind_txn_listener("[pool]\ndefault_pool_size = 2\n");

    let clients = (0..20).map(|client| async move {
        let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
        // tokio-postgres pipelines concurrent queries on one connection: each query_typed
        // is an unnamed Parse/Bind/Describe/Execute/Sync, all sent before the first answer.
        let queries = (0..50).map(|q| {
            let c = &c;
            async move {
                let v = client * 1000 + q;
                let rows = c
                    .query_typed(
                        "SELECT $1::int + 0",
                        &[(&v, tokio_postgres::types::Type::INT4)],
                    )
                    .await
                    .unwrap();
                assert_eq!(rows[0].get::<_, i32>(0), v);
            }
        });
        join_all(queries).await;
    });
    join_all(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_follow_the_client_to_another_server_connection() {
    let (_cluster, tx, _pgvane) = behind_txn_listener("[pool]\ndefault_pool_size = 2\n");

    // Simple-protocol statements only: each is one round trip on one server connection.
    async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
        let rows = c.simple_query(sql).await.unwrap();
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_owned()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no row from {sql}"))
    }
    let a = connect(tx, SUPERUSER, "postgres").await.unwrap();
    let b = connect(tx, SUPERUSER, "postgres").await.unwrap();
    let default_tz = one(&b, "SHOW TimeZone").await;
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let pid_set = one(&a, "SELECT pg_backend_pid()").await;

    // B takes the connection A just used (the pool reuses the most recent one first) and
    // keeps it inside a transaction, so A's next statement lands on another connection.
    b.batch_execute("BEGIN").await.unwrap();
    let pid_b = one(&b, "SELECT pg_backend_pid()").await;
    let tz_b = one(&b, "SHOW TimeZone").await;
    let pid_a = one(&a, "SELECT pg_backend_pid()").await;
    let tz_a = one(&a, "SHOW TimeZone").await;
    b.batch_execute("COMMIT").await.unwrap();

    assert_eq!(pid_b, pid_set, "B reused A's server connection");
    assert_ne!(pid_a, pid_set, "A moved to another server connection");
    assert_eq!(tz_a, "Asia/Tokyo", "A's setting followed it");
    assert_eq!(tz_b, default_tz, "A's setting did not leak to B");
}

#[tokio::test]
async fn query_wait_timeout_gives_a_clear_error() {
    let (_cluster, tx, _pgvane) =
        behind_txn_listener("[pool]\ndefault_pool_size = 1\nquery_wait_timeout = \"500ms\"\n");

    let holder = connect(tx, SUPERUSER, "postgres").await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    // Login needs no server connection once the pool knows the server's parameters.
    let waiter = connect(tx, SUPERUSER, "postgres").await.unwrap();
    let started = Instant::now();
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse, not a hang");
    assert_eq!(db.code().code(), "53300");
    assert_eq!(db.message(), "query_wait_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    holder.batch_execute("COMMIT").await.unwrap();
}

/// The pool's waiting clients, from a fresh console connection.
async fn clients_waiting(port: u16) -> u64 {
    let (mut console, _) = raw::RawClient::login(port, SUPERUSER, "pgbouncer").await;
    let pools = raw::run(&mut console, "SHOW POOLS").await;
    raw::num(&raw::row_of(&pools, "postgres"), "cl_waiting")
}

#[tokio::test]
async fn waiting_clients_are_served_first_come_first_served() {
    let extra =
        format!("[admin]\nadmin_users = [\"{SUPERUSER}\"]\n\n[pool]\ndefault_pool_size = 1\n");
    let (cluster, tx, _pgvane) = behind_txn_listener(&extra);
    cluster
        .primary()
        .connect()
        .await
        .batch_execute("CREATE SEQUENCE turn")
        .await
        .unwrap();
    let holder = connect(tx, SUPERUSER, "postgres").await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    // Each joins the queue only once the one before it waits there.
    let mut waiting = Vec::new();
    for n in 1..=4 {
        let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
        waiting.push(tokio::spawn(async move {
            let got = c.simple_query("SELECT nextval('turn')").await.unwrap();
            first_value(&got).unwrap().to_owned()
        }));
        eventually(PATIENCE, "the client in the queue", || async {
            (clients_waiting(tx).await == n).then_some(())
        })
        .await;
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let mut turns = Vec::new();
    for w in waiting {
        turns.push(tokio::time::timeout(PATIENCE, w).await.unwrap().unwrap());
    }
    assert_eq!(turns, ["1", "2", "3", "4"]);
}

#[tokio::test]
async fn a_client_waiting_past_reserve_pool_timeout_gets_a_reserve_connection() {
    let extra =
        "[pool]\ndefault_pool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout = \"300ms\"\n";
    let (_cluster, tx, _pgvane) = behind_txn_listener(extra);
    let holder = connect(tx, SUPERUSER, "postgres").await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let held_pid = backend_pid(&holder).await;
    // Served while the holder keeps the pool's one connection: by a second one.
    let waiter = connect(tx, SUPERUSER, "postgres").await.unwrap();
    let started = Instant::now();
    let pid = tokio::time::timeout(PATIENCE, backend_pid(&waiter))
        .await
        .expect("served from the reserve");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_ne!(pid, held_pid);
    // The reserve slot went back: the next waiter gets it again, after its own wait.
    let started = Instant::now();
    tokio::time::timeout(PATIENCE, backend_pid(&waiter))
        .await
        .expect("served from the reserve again");
    assert!(started.elapsed() >= Duration::from_millis(300));
    holder.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connects_per_backend_are_bounded() {
    let cluster = Cluster::start(0);
    let tx = free_port();
    // Connections to the server are counted below: a health check timing out on a loaded
    // machine would add one (the monitor reconnecting to the frozen server), so checks get
    // all the time they need.
    let config = pooled_config(
        &cluster,
        &txn_listener(tx),
        "[pool]\nserver_connect_concurrency = 2\n",
    )
    .replace(
        "interval = \"200ms\"\n",
        "interval = \"200ms\"\ntimeout = \"120s\"\n",
    );
    let _pgvane = Pgvane::start(&config, &[tx]);
    // One after the other: only the first login needs a server connection.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(connect(tx, SUPERUSER, "postgres").await.unwrap());
    }
    let pg = cluster.primary();
    // The pool's one connection is kept by a transaction: the freeze below stops the
    // postmaster only, so a free connection would serve every query one after the other
    // (on a busy machine, often) and no connect would ever start.
    clients[0].batch_execute("BEGIN").await.unwrap();
    // The health monitor's connection and the pool's one connection.
    let before = connections_to(pg.port);

    // A frozen server completes TCP handshakes but never answers a login: each of the five
    // clients that find no idle connection starts a connect, and only two may be under way.
    pg.freeze(true);
    let queries: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(async move { c.simple_query("SELECT 1").await.map(|_| c) }))
        .collect();
    // Progress first (a connect under way), then the bound: never more than two. (Waiting
    // for exactly two timed out twice in full parallel runs, not reproduced alone; the
    // count is of all connections to the port, so one closing meanwhile hides one.)
    eventually(PATIENCE, "connects under way", || async {
        (connections_to(pg.port) > before).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = connections_to(pg.port);
    pg.freeze(false);
    assert!(
        during <= before + 2,
        "{} connects under way at once",
        during - before
    );
    for q in queries {
        q.await
            .unwrap()
            .expect("every query runs once the server answers");
    }
}

#[tokio::test]
async fn a_full_database_cap_closes_another_pools_idle_connection() {
    let cluster = Cluster::start(0);
    create_role(&cluster, "other").await;
    let tx = free_port();
    let extra = format!(
        "[pool]\nmax_db_connections = 1\nquery_wait_timeout = \"5s\"\n\n[[user]]\nname = \"other\"\npassword = \"{PASSWORD}\"\n"
    );
    let _pgvane = Pgvane::start(&pooled_config(&cluster, &txn_listener(tx), &extra), &[tx]);

    // The superuser's pool keeps database postgres's only connection, idle.
    let first = connect(tx, SUPERUSER, "postgres").await.unwrap();
    first.batch_execute("SELECT 1").await.unwrap();
    // Another user's pool on the same database takes it over at once instead of waiting
    // out query_wait_timeout.
    let started = Instant::now();
    let other = connect(tx, "other", "postgres").await.unwrap();
    other.batch_execute("SELECT 1").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited {:?}",
        started.elapsed()
    );
    // And back: the cap still holds, one server connection at a time.
    first.batch_execute("SELECT 1").await.unwrap();
    let servers: i64 = cluster
        .primary()
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'postgres' \
             AND backend_type = 'client backend' AND application_name <> 'pgvane-health' \
             AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(servers, 1);
}

/// pgvane on a transaction listener whose users come from an auth_file holding the
/// superuser's `secret`, with `auth` added to the `[auth]` section. The dir holds the file.
fn behind_auth_file(
    cluster: &Cluster,
    secret: &str,
    auth: &str,
) -> (u16, Pgvane, tempfile::TempDir) {
    let tx = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("userlist.txt");
    std::fs::write(&file, format!("\"{SUPERUSER}\" \"{secret}\"\n")).unwrap();
    let text = format!(
        "{}\n[auth]\n{auth}file = \"{}\"\n",
        config(cluster, "interval = \"200ms\"", &txn_listener(tx)),
        file.display()
    );
    (tx, Pgvane::start(&text, &[tx]), dir)
}

#[tokio::test]
async fn md5_auth_and_auth_file() {
    let cluster = Cluster::start(0);
    let (tx, _pgvane, _dir) = behind_auth_file(&cluster, PASSWORD, "type = \"md5\"\n");
    let out = psql(tx, "postgres")
        .args(["-At", "-c", "SELECT 40 + 2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

#[tokio::test]
async fn a_scram_secret_from_pg_authid_is_enough_to_log_in_to_the_server() {
    let cluster = Cluster::start(0);
    let verifier = scram_verifier(&cluster).await;
    let (tx, _pgvane, _dir) = behind_auth_file(&cluster, &verifier, "");

    // pgvane has no plain password: it logs in to PostgreSQL with the keys the client's
    // SCRAM login proved.
    let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
    let rows = c.simple_query("SELECT 40 + 2").await.unwrap();
    assert_eq!(first_value(&rows), Some("42"));
    let err = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(tx)
        .user(SUPERUSER)
        .password("wrong")
        .dbname("postgres")
        .connect(NoTls)
        .await
        .err()
        .expect("a wrong password is refused");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"));
}

#[tokio::test]
async fn the_primary_pool_follows_a_failover() {
    let cluster = Cluster::start(1);
    let tx = free_port();
    let _pgvane = Pgvane::start(&pooled_config(&cluster, &txn_listener(tx), ""), &[tx]);
    let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
    c.batch_execute("CREATE TABLE f (x int)").await.unwrap();
    cluster.wait_replicated().await;

    cluster.primary().kill();
    cluster.nodes[1].promote();
    eventually(PATIENCE, "writes on the new primary", || async {
        let c = connect(tx, SUPERUSER, "postgres").await.ok()?;
        c.batch_execute("INSERT INTO f VALUES (1)").await.ok()?;
        (try_server_port(&c).await? == cluster.nodes[1].port).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_prepared_statements_follow_clients_across_server_connections() {
    // Two server connections, room for three statements on each: twelve clients with a
    // statement of their own and one they share keep moving between connections and
    // evicting each other's statements.
    let (_cluster, tx, _pgvane) =
        behind_txn_listener("[pool]\ndefault_pool_size = 2\nmax_prepared_statements = 3\n");

    let clients = (0..12).map(|client: i32| async move {
        let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
        // Each prepare is a Parse/Describe/Sync transaction of its own.
        let own = c
            .prepare(&format!("SELECT $1::int + {client}"))
            .await
            .unwrap();
        let shared = c.prepare("SELECT $1::int * 2").await.unwrap();
        for round in 0..40 {
            let a: i32 = c.query_one(&own, &[&round]).await.unwrap().get(0);
            let b: i32 = c.query_one(&shared, &[&round]).await.unwrap().get(0);
            assert_eq!((a, b), (round + client, round * 2));
        }
        // Closed, then the name's statement is gone for this client only.
        drop(own);
        let again = c.prepare("SELECT $1::int - 1").await.unwrap();
        let v: i32 = c.query_one(&again, &[&10]).await.unwrap().get(0);
        assert_eq!(v, 9);
        c
    });
    let clients = join_all(clients).await;

    // A server-side statement that fails to prepare leaves nothing behind.
    let c = &clients[0];
    let err = c.prepare("SELEC 1").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::SYNTAX_ERROR)
    );
    let ok = c.prepare("SELECT 41 + 1").await.unwrap();
    let v: i32 = c.query_one(&ok, &[]).await.unwrap().get(0);
    assert_eq!(v, 42);

    // Never more than max_prepared_statements on a server connection.
    for c in &clients[..4] {
        let rows = c
            .simple_query("SELECT count(*) FROM pg_prepared_statements")
            .await
            .unwrap();
        let n: i64 = match &rows[1] {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().parse().unwrap(),
            other => panic!("expected a row, got {other:?}"),
        };
        assert!(n <= 3, "{n} statements on one server connection");
    }
}

/// The tracker is engaged only at a client's first extended-protocol message: a statement
/// prepared after a simple query in the same transaction, or sent right behind one that is
/// still running, is recorded all the same and follows the client to other connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_behind_simple_queries_are_kept() {
    let (_cluster, tx, _pgvane) =
        behind_txn_listener("[pool]\ndefault_pool_size = 2\nmax_prepared_statements = 3\n");

    let clients = (0..6).map(|client: i32| async move {
        let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
        for round in 0..8 {
            c.batch_execute("BEGIN").await.unwrap();
            let s = c
                .prepare(&format!("SELECT $1::int + {client} + {round}"))
                .await
                .unwrap();
            let v: i32 = c.query_one(&s, &[&1]).await.unwrap().get(0);
            assert_eq!(v, 1 + client + round);
            c.batch_execute("COMMIT").await.unwrap();
            // Pipelined behind a running query: the tracker starts with its answer owed.
            let (slept, t) = tokio::join!(
                c.simple_query("SELECT pg_sleep(0.01)"),
                c.prepare("SELECT $1::int * 3")
            );
            slept.unwrap();
            let t = t.unwrap();
            for (statement, want) in [(&s, 2 + client + round), (&t, 6)] {
                let v: i32 = c.query_one(statement, &[&2]).await.unwrap().get(0);
                assert_eq!(v, want);
            }
        }
    });
    join_all(clients).await;
}

/// DISCARD ALL in a simple query (no tracker engaged) drops the client's statements and
/// tells pgvane that the server connection has none left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_forgets_prepared_statements() {
    let (_cluster, tx, _pgvane) =
        behind_txn_listener("[pool]\ndefault_pool_size = 1\nmax_prepared_statements = 3\n");
    let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
    let s = c.prepare("SELECT $1::int + 1").await.unwrap();
    let v: i32 = c.query_one(&s, &[&1]).await.unwrap().get(0);
    assert_eq!(v, 2);

    c.batch_execute("DISCARD ALL").await.unwrap();
    let err = c.query_one(&s, &[&1]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME)
    );
    // The same text again: pgvane must prepare it anew on the (only) server connection.
    let again = c.prepare("SELECT $1::int + 1").await.unwrap();
    let v: i32 = c.query_one(&again, &[&1]).await.unwrap().get(0);
    assert_eq!(v, 2);
}

/// A client may send its first request without waiting for its login to complete (with
/// trust authentication nothing in the login needs an answer), and a Terminate without
/// waiting for the answers. pgvane reads logins in large reads: what came after the login is
/// the session's first request. As PostgreSQL does, requests sent before a Terminate are
/// answered (not cancelled) before the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_along_with_the_login_is_served() {
    use postgres_protocol::message::frontend;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (_cluster, tx, _pgvane) = behind_txn_listener("[auth]\ntype = \"trust\"\n");

    let mut out = bytes::BytesMut::new();
    frontend::startup_message([("user", SUPERUSER), ("database", "postgres")], &mut out).unwrap();
    frontend::query("SELECT 6 * 7", &mut out).unwrap();
    frontend::terminate(&mut out);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", tx))
        .await
        .unwrap();
    s.write_all(&out).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the connection closes after the Terminate")
        .unwrap();

    let mut messages = Vec::new();
    let mut rest = &answer[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        messages.push((rest[0], rest[5..1 + len].to_vec()));
        rest = &rest[1 + len..];
    }
    let tags: Vec<u8> = messages.iter().map(|(t, _)| *t).collect();
    let login_done = tags.iter().position(|t| *t == b'Z').expect("ReadyForQuery");
    assert_eq!(
        &tags[login_done + 1..],
        b"TDCZ",
        "{:?}",
        String::from_utf8_lossy(&tags)
    );
    // DataRow: one column, "42".
    assert_eq!(messages[login_done + 2].1, b"\0\x01\0\0\0\x0242");
}

/// Session and transaction listeners share their pools. A session client may drop the
/// statements pgvane prepared on its server connection for transaction-mode clients, and a
/// reset query other than DISCARD ALL leaves them; either way the transaction-mode client's
/// statement must go on working on that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_a_session_client_on_their_server_connection() {
    let cluster = Cluster::start(0);
    for (reset, session_sql) in [("", "DEALLOCATE ALL"), ("RESET ALL", "SELECT 1")] {
        let (tx, session) = (free_port(), free_port());
        let listeners =
            txn_listener(tx) + &listener("session", session, "primary", "mode = \"session\"");
        // One server connection: the session client gets the one the statement is on.
        let extra = format!("[pool]\ndefault_pool_size = 1\nserver_reset_query = \"{reset}\"\n");
        let _pgvane = Pgvane::start(&pooled_config(&cluster, &listeners, &extra), &[tx, session]);

        let c = connect(tx, SUPERUSER, "postgres").await.unwrap();
        let statement = c.prepare("SELECT $1::int + 1").await.unwrap();
        let v: i32 = c.query_one(&statement, &[&1]).await.unwrap().get(0);
        assert_eq!(v, 2);

        let s = connect(session, SUPERUSER, "postgres").await.unwrap();
        s.batch_execute(session_sql).await.unwrap();
        drop(s);

        // Waits for the connection the session client returns (after its reset).
        for i in 0..3 {
            let v: i32 = c
                .query_one(&statement, &[&i])
                .await
                .unwrap_or_else(|e| panic!("reset {reset:?}, then {session_sql}: {e:?}"))
                .get(0);
            assert_eq!(v, i + 1);
        }
    }
}

/// A login the server refuses after pgvane authenticated the client (unknown database) gets
/// the server's own error, after authentication's closing messages.
#[tokio::test]
async fn a_server_refusal_after_authentication_reaches_the_client() {
    let (_cluster, tx, _pgvane) = behind_txn_listener("");
    let Err(err) = connect(tx, SUPERUSER, "nosuchdb").await else {
        panic!("login to a database that does not exist accepted");
    };
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "3D000", "{db:?}");
    assert!(db.message().contains("nosuchdb"), "{db:?}");
    // The pool for the other database is unaffected.
    let ok = connect(tx, SUPERUSER, "postgres").await.unwrap();
    ok.simple_query("SELECT 1").await.unwrap();
}

/// The server process serving `c` now, asked in one simple Query (one transaction).
async fn backend_pid(c: &tokio_postgres::Client) -> String {
    match &c.simple_query("SELECT pg_backend_pid()").await.unwrap()[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_owned(),
        other => panic!("expected a row, got {other:?}"),
    }
}

/// With `server_check_delay = 0`, every reuse of an idle server connection runs
/// `server_check_query` first; a connection older than `server_lifetime` is not used again.
#[tokio::test]
async fn server_connections_are_checked_before_reuse_and_retired_after_their_lifetime() {
    let cluster = Cluster::start(0);
    create_app_db(&cluster).await;
    let direct = connect(cluster.primary().port, SUPERUSER, "app")
        .await
        .unwrap();
    direct
        .batch_execute("CREATE SEQUENCE checks")
        .await
        .unwrap();
    let tx = free_port();
    let extra = "[pool]\nserver_check_delay = \"0s\"\nserver_check_query = \"SELECT nextval('checks')\"\nserver_lifetime = \"2s\"\n";
    let _pgvane = Pgvane::start(&pooled_config(&cluster, &txn_listener(tx), extra), &[tx]);
    let client = connect(tx, SUPERUSER, "app").await.unwrap();

    // One client, one server connection, reused at once six times (the login left it idle).
    let first = backend_pid(&client).await;
    for _ in 0..5 {
        assert_eq!(backend_pid(&client).await, first);
    }
    let checks: i64 = direct
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM checks",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(checks, 6, "one check per reuse");

    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_ne!(
        backend_pid(&client).await,
        first,
        "a connection past its lifetime"
    );
    eventually(PATIENCE, "the old connection closed", || async {
        let gone: bool = direct
            .query_one(
                "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid::text = $1)",
                &[&first],
            )
            .await
            .unwrap()
            .get(0);
        gone.then_some(())
    })
    .await;
}

/// Idle server connections are closed after `server_idle_timeout` (`min_pool_size` is 0).
#[tokio::test]
async fn idle_server_connections_are_closed_after_server_idle_timeout() {
    let (cluster, tx, _pgvane) =
        app_behind_txn_listener("[pool]\nserver_idle_timeout = \"1s\"\n").await;
    let client = connect(tx, SUPERUSER, "app").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(app_backends(cluster.primary()).await, 1);
    eventually(PATIENCE, "the idle connection closed", || async {
        (app_backends(cluster.primary()).await == 0).then_some(())
    })
    .await;
    // The client is still logged in, and gets a new server connection.
    client.simple_query("SELECT 1").await.unwrap();
}

/// Runs pgbench against `port` (database postgres) and returns its output; it must succeed.
fn pgbench(port: u16, args: &[&str]) -> String {
    let out = pg_command("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .args(args)
        .arg("postgres")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_mode_runs_through_transaction_pooling() {
    let (cluster, tx, _pgvane) = behind_txn_listener("[pool]\ndefault_pool_size = 4\n");
    pgbench(cluster.primary().port, &["-i", "-s", "1", "-q"]);
    // Each client prepares its statement once (pgbench names it P_0, as every other client
    // does for the same text) and runs it on whichever of the 4 server connections is free.
    // Select-only: pgbench's PQprepare blocks its thread, so with more clients than server
    // connections a multi-statement transaction could wait on a client that thread serves.
    let out = pgbench(
        tx,
        &["-S", "-M", "prepared", "-c", "16", "-j", "2", "-t", "200"],
    );
    assert!(
        out.contains("number of transactions actually processed: 3200/3200"),
        "{out}"
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
}

#[tokio::test]
async fn one_worker_thread_runs_everything_on_the_main_thread() {
    let cluster = Cluster::start(0);
    let tx = free_port();
    let config = pooled_config(
        &cluster,
        &txn_listener(tx),
        "[pool]\ndefault_pool_size = 4\n",
    )
    .replace(
        "max_client_conn = 2000",
        "max_client_conn = 2000\nworker_threads = 1",
    );
    let pgvane = Pgvane::start(&config, &[tx]);
    pgbench(cluster.primary().port, &["-i", "-s", "1", "-q"]);
    // TPC-B-like: seven statements per transaction, 16 clients on 4 server connections.
    let out = pgbench(tx, &["-c", "16", "-j", "2", "-t", "100"]);
    assert!(
        out.contains("number of transactions actually processed: 1600/1600"),
        "{out}"
    );
    // Sessions ran on the main thread; the other threads are the blocking pool's, where the
    // server logins derived the password's SCRAM key (PBKDF2) instead of stalling sessions.
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", pgvane.pid()))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .map(|name| name.trim().to_owned())
        .collect();
    assert!(names.contains(&"pgvane".to_owned()), "{names:?}");
    assert!(names.contains(&"pgvane-blocking".to_owned()), "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n == "pgvane" || n == "pgvane-blocking"),
        "{names:?}"
    );
}

/// Pools listed by `/status`.
async fn pools_listed(admin: u16) -> usize {
    let (_, body) = http_async(admin, "GET", "/status").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["pools"].as_array().map_or(0, Vec::len)
}

/// Pools are made per (database, user) a client names: one for a database the server
/// refuses is not kept, and one no client used for autodb_idle_timeout is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_of_refused_and_unused_logins_are_freed() {
    let admin = free_port();
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[pool]\nautodb_idle_timeout = \"1s\"\nserver_idle_timeout = \"1s\"\n"
    );
    let cluster = Cluster::start(0);
    create_app_db(&cluster).await;
    let tx = free_port();
    let _pgvane = Pgvane::start(
        &pooled_config(&cluster, &txn_listener(tx), &extra),
        &[tx, admin],
    );
    for i in 0..50 {
        let Err(err) = connect(tx, SUPERUSER, &format!("made_up_{i}")).await else {
            panic!("logged in to a database that does not exist");
        };
        assert_eq!(err.code().map(|c| c.code()), Some("3D000"), "{err}");
    }
    assert_eq!(pools_listed(admin).await, 0, "pools of refused logins");

    let c = connect(tx, SUPERUSER, "app").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    // Held by its session: kept however long it idles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pools_listed(admin).await, 1);
    drop(c);
    // Its idle connection closes after server_idle_timeout, then the pool goes.
    eventually(PATIENCE, "the unused pool freed", || async {
        (pools_listed(admin).await == 0).then_some(())
    })
    .await;
}
