//! The admin console: PgBouncer's SHOW commands and controls, checked against real pools and
//! against Debian's PgBouncer itself.

mod common;

use common::bouncer::Bouncer;
use common::raw::*;
use common::*;

const TEXT: u32 = 25;
const INT4: u32 = 23;
const INT8: u32 = 20;
const NUMERIC: u32 = 1700;

/// A transaction listener with `postgres` in admin_users, `watcher` in stats_users and
/// `app` in neither. Returns the listener's port.
async fn with_console() -> (Cluster, u16, Pgvane) {
    with_console_for(2000).await
}

/// As [`with_console`], with `max_client_conn` client slots.
async fn with_console_for(max_client_conn: u32) -> (Cluster, u16, Pgvane) {
    let cluster = Cluster::start(0);
    for role in ["watcher", "app"] {
        create_role(&cluster, role).await;
    }
    let tx = free_port();
    let users = ["watcher", "app"]
        .map(|u| format!("[[user]]\nname = \"{u}\"\npassword = \"{PASSWORD}\"\n"))
        .join("\n");
    let extra =
        format!("[admin]\nadmin_users = [\"{SUPERUSER}\"]\nstats_users = [\"watcher\"]\n\n{users}");
    let text = pooled_config(
        &cluster,
        &listener("tx", tx, "primary", "mode = \"transaction\""),
        &extra,
    )
    .replace(
        "max_client_conn = 2000",
        &format!("max_client_conn = {max_client_conn}"),
    );
    let pgvane = Pgvane::start(&text, &[tx]);
    (cluster, tx, pgvane)
}

/// What PgBouncer 1.25 sends (../shared/reference/pgbouncer.md), name and type per column.
fn expected_columns(command: &str) -> Vec<(&'static str, u32)> {
    let stats = [
        "server_assignment_count",
        "xact_count",
        "query_count",
        "bytes_received",
        "bytes_sent",
        "xact_time",
        "query_time",
        "wait_time",
        "client_parse_count",
        "server_parse_count",
        "bind_count",
        "client_login_count",
    ];
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let typed = |names: &[&'static str], types: &str| -> Vec<(&'static str, u32)> {
        names
            .iter()
            .zip(types.bytes())
            .map(|(n, t)| {
                let oid = match t {
                    b'i' => INT4,
                    b'q' => INT8,
                    b'N' => NUMERIC,
                    _ => TEXT,
                };
                (*n, oid)
            })
            .collect()
    };
    match command {
        "POOLS" => typed(
            &[
                "database",
                "user",
                "cl_active",
                "cl_waiting",
                "cl_active_cancel_req",
                "cl_waiting_cancel_req",
                "sv_active",
                "sv_active_cancel",
                "sv_being_canceled",
                "sv_idle",
                "sv_used",
                "sv_tested",
                "sv_login",
                "maxwait",
                "maxwait_us",
                "pool_mode",
                "load_balance_hosts",
            ],
            "ssiiiiiiiiiiiiiss",
        ),
        "STATS" => {
            let mut names = vec!["database"];
            for c in stats {
                names.push(leak(format!("total_{}", c.trim_start_matches("bytes_"))));
            }
            for c in stats {
                let c = match c {
                    "bytes_received" => "recv",
                    "bytes_sent" => "sent",
                    c => c,
                };
                names.push(leak(format!("avg_{c}")));
            }
            typed(&names, &format!("s{}", "N".repeat(24)))
        }
        "STATS_TOTALS" | "STATS_AVERAGES" => {
            let mut names = vec!["database"];
            for (i, c) in stats.iter().enumerate() {
                names.push(match command == "STATS_AVERAGES" && i >= 8 {
                    true => leak(format!("avg_{c}")),
                    false => c,
                });
            }
            typed(&names, &format!("s{}", "N".repeat(12)))
        }
        "TOTALS" => typed(&["name", "value"], "sN"),
        "DATABASES" => typed(
            &[
                "name",
                "host",
                "port",
                "database",
                "force_user",
                "pool_size",
                "min_pool_size",
                "reserve_pool_size",
                "server_lifetime",
                "pool_mode",
                "load_balance_hosts",
                "max_connections",
                "current_connections",
                "max_client_connections",
                "current_client_connections",
                "paused",
                "disabled",
            ],
            "ssissiiiissiiiiii",
        ),
        "USERS" => typed(
            &[
                "name",
                "pool_size",
                "reserve_pool_size",
                "pool_mode",
                "max_user_connections",
                "current_connections",
                "max_user_client_connections",
                "current_client_connections",
            ],
            "siisiiii",
        ),
        "LISTS" => typed(&["list", "items"], "si"),
        "CLIENTS" | "SERVERS" => typed(
            &[
                "type",
                "user",
                "database",
                "replication",
                "state",
                "addr",
                "port",
                "local_addr",
                "local_port",
                "connect_time",
                "request_time",
                "wait",
                "wait_us",
                "close_needed",
                "ptr",
                "link",
                "remote_pid",
                "tls",
                "application_name",
                "prepared_statements",
                "id",
            ],
            "ssssssisiTTiiississii",
        ),
        "CONFIG" => typed(&["key", "value", "default", "changeable"], "ssss"),
        "STATE" => typed(&["key", "value"], "ss"),
        "VERSION" => typed(&["version"], "s"),
        other => panic!("no reference for SHOW {other}"),
    }
}

const SHOWN: [&str; 13] = [
    "POOLS",
    "CLIENTS",
    "SERVERS",
    "STATS",
    "STATS_TOTALS",
    "STATS_AVERAGES",
    "TOTALS",
    "DATABASES",
    "USERS",
    "LISTS",
    "CONFIG",
    "STATE",
    "VERSION",
];

/// Every SHOW command answers with PgBouncer's columns, and the statistics count what ran:
/// transactions, queries, bytes, Parses and Binds, logins; the pool shows its clients and
/// connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_answer_with_pgbouncer_s_columns_and_real_counts() {
    let (_cluster, tx, _pgvane) = with_console().await;
    let app = connect(tx, SUPERUSER, "postgres").await.unwrap();
    for _ in 0..10 {
        app.simple_query("SELECT 1").await.unwrap();
    }
    let statement = app.prepare("SELECT $1::int").await.unwrap();
    for i in 0..5 {
        app.query_one(&statement, &[&i]).await.unwrap();
    }
    for step in ["BEGIN", "SELECT 1", "COMMIT"] {
        app.simple_query(step).await.unwrap();
    }

    let (mut console, login) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;
    assert_eq!(login.last().map(|m| m.tag), Some(b'Z'), "{}", show(&login));
    for command in SHOWN {
        let got = run(&mut console, &format!("SHOW {command}")).await;
        assert!(
            !got.iter().any(|m| m.tag == b'E'),
            "SHOW {command}: {}",
            show(&got)
        );
        let cols: Vec<(String, u32)> = columns(&got);
        let want: Vec<(String, u32)> = expected_columns(command)
            .into_iter()
            .map(|(n, t)| (n.to_owned(), t))
            .collect();
        assert_eq!(cols, want, "SHOW {command}");
    }

    let totals = run(&mut console, "SHOW STATS_TOTALS").await;
    let db = row_of(&totals, "postgres");
    // 10 simple queries, prepare + 5 executions, one transaction of three queries.
    assert!(num(&db, "xact_count") >= 17, "{db:?}");
    assert!(num(&db, "query_count") >= 19, "{db:?}");
    assert!(num(&db, "query_count") > num(&db, "xact_count"), "{db:?}");
    assert!(num(&db, "server_assignment_count") >= 17, "{db:?}");
    assert!(
        num(&db, "bytes_received") > 0 && num(&db, "bytes_sent") > 0,
        "{db:?}"
    );
    assert!(num(&db, "bind_count") >= 5, "{db:?}");
    assert!(num(&db, "client_parse_count") >= 1, "{db:?}");
    assert!(num(&db, "client_login_count") >= 1, "{db:?}");
    assert!(
        num(&db, "xact_time") >= num(&db, "query_time") / 2,
        "{db:?}"
    );

    let pools = run(&mut console, "SHOW POOLS").await;
    let pool = row_of(&pools, "postgres");
    assert_eq!(pool["user"].as_deref(), Some(SUPERUSER));
    assert_eq!(num(&pool, "cl_active"), 1, "{pool:?}");
    assert_eq!(num(&pool, "cl_waiting"), 0, "{pool:?}");
    assert!(num(&pool, "sv_idle") >= 1, "{pool:?}");
    assert_eq!(pool["pool_mode"].as_deref(), Some("transaction"));

    // One client, idle, with its five named statements; one idle server connection, whose
    // pid is the backend's; during a transaction each names the other as its link.
    let clients = run(&mut console, "SHOW CLIENTS").await;
    let client = row_of(&clients, "C");
    assert_eq!(client["state"].as_deref(), Some("idle"), "{client:?}");
    assert_eq!(client["user"].as_deref(), Some(SUPERUSER));
    assert_eq!(num(&client, "prepared_statements"), 1, "{client:?}");
    let servers = run(&mut console, "SHOW SERVERS").await;
    assert_eq!(table(&servers).len(), 1, "{}", show(&servers));
    let server = row_of(&servers, "S");
    let pid: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(num(&server, "remote_pid"), pid as u64, "{server:?}");
    app.batch_execute("BEGIN").await.unwrap();
    let client = row_of(&run(&mut console, "SHOW CLIENTS").await, "C");
    let server = row_of(&run(&mut console, "SHOW SERVERS").await, "S");
    assert_eq!(client["state"].as_deref(), Some("active"), "{client:?}");
    assert_eq!(client["link"], server["ptr"], "{client:?} {server:?}");
    assert_eq!(server["link"], client["ptr"], "{client:?} {server:?}");
    assert_eq!(num(&server, "close_needed"), 0);
    // RECONNECT replaces the pool: the connection in use is marked, closed at release.
    assert_eq!(show(&run(&mut console, "RECONNECT").await), "C Z");
    let server = row_of(&run(&mut console, "SHOW SERVERS").await, "S");
    assert_eq!(num(&server, "close_needed"), 1, "{server:?}");
    app.batch_execute("COMMIT").await.unwrap();
    // The session moves to the new pool with its next transaction.
    app.simple_query("SELECT 1").await.unwrap();

    let lists = run(&mut console, "SHOW LISTS").await;
    assert_eq!(num(&row_of(&lists, "pools"), "items"), 1);
    assert_eq!(num(&row_of(&lists, "databases"), "items"), 1);
    let config = run(&mut console, "SHOW CONFIG").await;
    let max = row_of(&config, "max_client_conn");
    assert_eq!(max["value"].as_deref(), Some("2000"));
    assert_eq!(max["default"].as_deref(), Some("100"));

    // pgvane's own: the backend and the route to it.
    let backends = run(&mut console, "SHOW BACKENDS").await;
    assert_eq!(rows(&backends).len(), 1, "{}", show(&backends));
    let backend = &table(&backends)[0];
    let names = columns(&backends);
    let col = |n: &str| &backend[names.iter().position(|(c, _)| c == n).unwrap()];
    assert_eq!(col("role").as_deref(), Some("primary"));
    // Checked, when and how fast: an RFC 3339 time, a latency in milliseconds.
    let at = col("last_check").clone().expect("last_check");
    assert!(humantime::parse_rfc3339(&at).is_ok(), "{at}");
    let ms: f64 = col("check_ms").as_deref().unwrap().parse().unwrap();
    assert!(ms > 0.0, "{ms}");
    let routes = run(&mut console, "show routes;").await;
    let route = row_of(&routes, "tx");
    assert_eq!(route["backends"], route["primary"], "{route:?}");

    // Several commands in one query, each answered; an unknown one is an ERROR that
    // leaves the console usable; the extended protocol is refused.
    let two = run(&mut console, "SHOW VERSION; SHOW STATE").await;
    assert_eq!(
        two.iter().filter(|m| m.tag == b'C').count(),
        2,
        "{}",
        show(&two)
    );
    let bad = run(&mut console, "SHOW NOTHING").await;
    assert_eq!(
        bad[0].field(b'C').as_deref(),
        Some("42601"),
        "{}",
        show(&bad)
    );
    console.send(&extended("", "SHOW POOLS")).await;
    let ext = console.until_ready().await;
    assert_eq!(
        ext[0].field(b'C').as_deref(),
        Some("08P01"),
        "{}",
        show(&ext)
    );
    assert!(rows(&run(&mut console, "SHOW VERSION").await)[0].starts_with("pgvane"));
}

/// stats_users may SHOW but not control; other users cannot log in to the console at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_access_follows_admin_users_and_stats_users() {
    let (_cluster, tx, _pgvane) = with_console().await;
    let (mut watcher, login) = RawClient::login(tx, "watcher", "pgvane").await;
    assert_eq!(login.last().map(|m| m.tag), Some(b'Z'), "{}", show(&login));
    assert!(!run(&mut watcher, "SHOW POOLS")
        .await
        .iter()
        .any(|m| m.tag == b'E'));
    let refused = run(&mut watcher, "PAUSE").await;
    assert_eq!(
        refused[0].field(b'C').as_deref(),
        Some("42501"),
        "{}",
        show(&refused)
    );

    let (_, login) = RawClient::login(tx, "app", "pgbouncer").await;
    assert_eq!(
        login.last().and_then(|m| m.field(b'C')).as_deref(),
        Some("28000"),
        "{}",
        show(&login)
    );
    // A wrong password is refused as on any other database.
    let (_, login) = RawClient::login(tx, "nobody_here", "pgbouncer").await;
    assert_eq!(
        login.last().and_then(|m| m.field(b'C')).as_deref(),
        Some("28P01"),
        "{}",
        show(&login)
    );
}

/// PAUSE on the console holds new transactions and shows in SHOW DATABASES and STATE;
/// RESUME lets the held transaction through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pause_and_resume_hold_and_release_transactions() {
    let (_cluster, tx, _pgvane) = with_console().await;
    let app = connect(tx, SUPERUSER, "postgres").await.unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    let (mut console, _) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;
    let paused = run(&mut console, "PAUSE postgres").await;
    assert_eq!(show(&paused), "C Z");
    let dbs = run(&mut console, "SHOW DATABASES").await;
    assert_eq!(num(&row_of(&dbs, "postgres"), "paused"), 1);
    let unknown = run(&mut console, "PAUSE no_such_db").await;
    assert_eq!(
        unknown[0].field(b'C').as_deref(),
        Some("3D000"),
        "{}",
        show(&unknown)
    );

    let held = tokio::spawn(async move { app.simple_query("SELECT 2").await.map(|_| ()) });
    let dbs_held = eventually(PATIENCE, "the transaction waits in the pool", || {
        let held = &held;
        async move { (!held.is_finished()).then_some(()) }
    });
    dbs_held.await;
    assert_eq!(show(&run(&mut console, "RESUME postgres").await), "C Z");
    tokio::time::timeout(PATIENCE, held)
        .await
        .expect("released by RESUME")
        .unwrap()
        .unwrap();
    let dbs = run(&mut console, "SHOW DATABASES").await;
    assert_eq!(num(&row_of(&dbs, "postgres"), "paused"), 0);
}

/// Differential: every SHOW command Debian's PgBouncer (1.18) has answers on pgvane with the
/// same columns in the same order with the same types; pgvane adds only the columns newer
/// PgBouncer releases added (checked above against the 1.25 reference). Row names of the
/// key/value commands (TOTALS, LISTS) likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_columns_match_the_real_pgbouncer() {
    let (cluster, tx, _pgvane) = with_console().await;
    let primary = cluster.primary().port;
    // Trust: the comparison is of the console, not of authentication.
    let bouncer = Bouncer::start(
        &format!("postgres = host=127.0.0.1 port={primary} dbname=postgres"),
        &format!("auth_type = trust\npool_mode = transaction\nadmin_users = {SUPERUSER}\n"),
        // The password is PgBouncer's to log in to PostgreSQL with.
        &format!("\"{SUPERUSER}\" \"{PASSWORD}\"\n"),
    );
    // A pool on each, so that the per-pool commands have a row.
    let via_bouncer = connect(bouncer.port, SUPERUSER, "postgres").await.unwrap();
    via_bouncer.simple_query("SELECT 1").await.unwrap();
    let via_pgvane = connect(tx, SUPERUSER, "postgres").await.unwrap();
    via_pgvane.simple_query("SELECT 1").await.unwrap();

    let (mut theirs, login) = RawClient::login(bouncer.port, SUPERUSER, "pgbouncer").await;
    assert_eq!(
        login.last().map(|m| m.tag),
        Some(b'Z'),
        "{}\n{}",
        show(&login),
        bouncer.log()
    );
    let (mut ours, _) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;
    let version = rows(&run(&mut theirs, "SHOW VERSION").await);
    assert!(version[0].starts_with("PgBouncer"), "{version:?}");
    let mut compared = 0;
    for command in SHOWN {
        let their = run(&mut theirs, &format!("SHOW {command}")).await;
        if their.iter().any(|m| m.tag == b'E') {
            // Newer than this PgBouncer (SHOW STATE came in 1.21).
            continue;
        }
        let mine = run(&mut ours, &format!("SHOW {command}")).await;
        let (their_cols, my_cols) = (columns(&their), columns(&mine));
        let mut mine_left = my_cols.iter();
        for (name, oid) in &their_cols {
            // Renamed by PgBouncer since 1.18; pgvane uses the current name.
            let name = match name.as_str() {
                "reserve_pool" => "reserve_pool_size",
                other => other,
            };
            let col = &(name.to_owned(), *oid);
            assert!(
                mine_left.any(|c| c == col),
                "SHOW {command}: PgBouncer's column {col:?} is missing or out of order in pgvane's {my_cols:?}"
            );
        }
        if matches!(command, "TOTALS" | "LISTS") {
            let my_rows = rows(&mine);
            for name in rows(&their) {
                assert!(
                    my_rows.contains(&name),
                    "SHOW {command}: no row {name}: {my_rows:?}"
                );
            }
        }
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} commands compared");
}

/// With every client slot taken, an admin still reaches the console (in a reserved slot),
/// while anyone else, console or not, is refused with 53300 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_reaches_the_console_when_every_client_slot_is_taken() {
    let (_cluster, tx, _pgvane) = with_console_for(3).await;
    let mut taken = Vec::new();
    for _ in 0..3 {
        taken.push(connect(tx, SUPERUSER, "postgres").await.unwrap());
    }
    let refused_code = |login: &[Msg]| login.last().and_then(|m| m.field(b'C'));
    let (_, login) = RawClient::login(tx, SUPERUSER, "postgres").await;
    assert_eq!(
        refused_code(&login).as_deref(),
        Some("53300"),
        "{}",
        show(&login)
    );
    // A stats user is no admin: the reserve is not for it.
    let (_, login) = RawClient::login(tx, "watcher", "pgbouncer").await;
    assert_eq!(
        refused_code(&login).as_deref(),
        Some("53300"),
        "{}",
        show(&login)
    );

    let (mut console, login) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;
    assert_eq!(login.last().map(|m| m.tag), Some(b'Z'), "{}", show(&login));
    let lists = run(&mut console, "SHOW LISTS").await;
    assert_eq!(
        num(&row_of(&lists, "used_clients"), "items"),
        3,
        "{}",
        show(&lists)
    );
    for c in &taken {
        c.simple_query("SELECT 1").await.unwrap();
    }
}

/// DISABLE refuses new clients on a database (55000, as PostgreSQL for a database that
/// does not allow connections) and leaves open sessions alone; ENABLE lets clients in again.
/// RECONNECT gives sessions new server connections from their next transaction on.
/// SHUTDOWN ends the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_enable_reconnect_and_shutdown() {
    let (_cluster, tx, mut pgvane) = with_console().await;
    let app = connect(tx, SUPERUSER, "postgres").await.unwrap();
    let backend_pid =
        |rows: Vec<tokio_postgres::SimpleQueryMessage>| first_value(&rows).unwrap().to_owned();
    let first = backend_pid(app.simple_query("SELECT pg_backend_pid()").await.unwrap());
    let (mut console, _) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;

    assert_eq!(show(&run(&mut console, "DISABLE postgres").await), "C Z");
    let (_, login) = RawClient::login(tx, SUPERUSER, "postgres").await;
    assert_eq!(
        login.last().and_then(|m| m.field(b'C')).as_deref(),
        Some("55000"),
        "{}",
        show(&login)
    );
    let dbs = run(&mut console, "SHOW DATABASES").await;
    assert_eq!(num(&row_of(&dbs, "postgres"), "disabled"), 1);
    app.simple_query("SELECT 1").await.unwrap();
    assert_eq!(show(&run(&mut console, "ENABLE postgres").await), "C Z");
    let (_, login) = RawClient::login(tx, SUPERUSER, "postgres").await;
    assert_eq!(login.last().map(|m| m.tag), Some(b'Z'), "{}", show(&login));

    assert_eq!(show(&run(&mut console, "RECONNECT postgres").await), "C Z");
    let second = backend_pid(app.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_ne!(first, second, "a new server connection after RECONNECT");

    assert_eq!(show(&run(&mut console, "SHUTDOWN").await), "C Z");
    let exited = tokio::task::spawn_blocking(move || pgvane.wait_exit(PATIENCE))
        .await
        .unwrap();
    assert!(exited.is_some(), "pgvane exits after SHUTDOWN");
}

/// SHUTDOWN WAIT_FOR_SERVERS lets the running transaction finish (PAUSE), then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_wait_for_servers_lets_the_running_transaction_finish() {
    let (_cluster, tx, mut pgvane) = with_console().await;
    let app = connect(tx, SUPERUSER, "postgres").await.unwrap();
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (mut console, _) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;
    assert_eq!(
        show(&run(&mut console, "SHUTDOWN WAIT_FOR_SERVERS").await),
        "C Z"
    );
    // Still running: the transaction holds its server connection.
    app.simple_query("SELECT 2").await.unwrap();
    assert!(!pgvane.has_exited());
    app.batch_execute("COMMIT").await.unwrap();
    let exited = tokio::task::spawn_blocking(move || pgvane.wait_exit(PATIENCE))
        .await
        .unwrap();
    assert!(
        exited.is_some(),
        "pgvane exits once the transaction is done"
    );
}

/// The console's statistics and pool client counts are in /metrics too, for monitoring
/// that reads Prometheus rather than SHOW.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_and_latency_are_exported() {
    let cluster = Cluster::start(0);
    let (tx, admin) = (free_port(), free_port());
    let text = pooled_config(
        &cluster,
        &listener("tx", tx, "primary", "mode = \"transaction\""),
        &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\nadmin_users = [\"{SUPERUSER}\"]\n"),
    );
    let _pgvane = Pgvane::start(&text, &[tx, admin]);
    let app = connect(tx, SUPERUSER, "postgres").await.unwrap();
    for _ in 0..19 {
        app.simple_query("SELECT 1").await.unwrap();
    }
    // One slow transaction of 21: the p99 (nearest rank: the slowest) shows it, the
    // median does not.
    app.simple_query("SELECT pg_sleep(0.3)").await.unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    let count = |name: &'static str| async move {
        metric(admin, &format!("pgvane_{name}{{database=\"postgres\"}}")).await
    };
    assert!(count("database_transactions_total").await >= Some(5.0));
    assert!(count("database_queries_total").await >= Some(5.0));
    assert!(count("database_received_bytes_total").await > Some(0.0));
    assert!(count("database_transaction_seconds_total").await > Some(0.0));
    assert_eq!(count("database_logins_total").await, Some(1.0));
    let active =
        r#"pgvane_pool_clients{backend="pg0",database="postgres",state="active",user="postgres"}"#;
    assert_eq!(metric(admin, active).await, Some(1.0));

    let (mut console, _) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;
    let latency = run(&mut console, "SHOW LATENCY").await;
    let row = row_where(&latency, &["postgres", SUPERUSER]);
    assert_eq!(num(&row, "xact_count"), 21, "{row:?}");
    assert_eq!(num(&row, "query_count"), 21, "{row:?}");
    assert!(num(&row, "wait_count") >= 21, "{row:?}");
    assert!(num(&row, "xact_p50_us") < 250_000, "{row:?}");
    assert!(num(&row, "xact_p99_us") >= 300_000, "{row:?}");
    assert!(num(&row, "query_p99_us") >= 300_000, "{row:?}");
    assert!(
        num(&row, "wait_p50_us") <= num(&row, "wait_p99_us"),
        "{row:?}"
    );
    let p99 = r#"pgvane_pool_latency_seconds{backend="pg0",database="postgres",measure="xact",quantile="0.99",user="postgres"}"#;
    let p50 = p99.replace("0.99", "0.5");
    assert!(metric(admin, p99).await >= Some(0.3));
    assert!(metric(admin, &p50).await < Some(0.25));
}

/// WAIT_CLOSE answers once no server connection is left to close after RECONNECT: not
/// while a transaction still holds one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_close_returns_when_the_reconnected_connections_are_gone() {
    let (_cluster, tx, _pgvane) = with_console().await;
    let app = connect(tx, SUPERUSER, "postgres").await.unwrap();
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (mut console, _) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;
    assert_eq!(show(&run(&mut console, "RECONNECT postgres").await), "C Z");
    console.send(&query("WAIT_CLOSE postgres")).await;
    let waiting = tokio::spawn(async move { console.until_ready().await });
    // Answered only after the transaction ends and its connection closes.
    app.simple_query("SELECT 2").await.unwrap();
    assert!(!waiting.is_finished());
    app.batch_execute("COMMIT").await.unwrap();
    let answered = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("WAIT_CLOSE answered once the connection closed")
        .unwrap();
    assert_eq!(show(&answered), "C Z");
}

/// The id (SHOW CLIENTS' id column) of the client session with `application_name`.
async fn client_id(console: &mut RawClient, application_name: &str) -> String {
    let clients = run(console, "SHOW CLIENTS").await;
    let names = columns(&clients);
    let col = |n: &str| names.iter().position(|(c, _)| c == n).unwrap();
    let (app, id) = (col("application_name"), col("id"));
    table(&clients)
        .into_iter()
        .find(|r| r[app].as_deref() == Some(application_name))
        .and_then(|r| r[id].clone())
        .unwrap_or_else(|| {
            panic!(
                "no client {application_name}: {}",
                rows(&clients).join("\n")
            )
        })
}

/// KILL_CLIENT ends one session inside its transaction: the client reads 57P01, what it
/// had written is rolled back, other sessions go on. KILL ends every session of a database
/// and pauses it, so that new work waits for RESUME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_and_kill_end_sessions_at_once() {
    let (cluster, tx, _pgvane) = with_console().await;
    let direct = cluster.primary().connect().await;
    direct
        .batch_execute("CREATE TABLE killed (v int)")
        .await
        .unwrap();
    let login = |name: &'static str| async move {
        let params = [
            ("user", SUPERUSER),
            ("database", "postgres"),
            ("application_name", name),
        ];
        RawClient::login_with(tx, &params).await
    };
    let (mut victim, _) = login("victim").await;
    let (mut bystander, _) = login("bystander").await;
    victim
        .send(&query("BEGIN; INSERT INTO killed VALUES (1)"))
        .await;
    victim.until_ready().await;

    let (mut console, _) = RawClient::login(tx, SUPERUSER, "pgbouncer").await;
    let id = client_id(&mut console, "victim").await;
    let reply = run(&mut console, &format!("KILL_CLIENT {id}")).await;
    assert_eq!(show(&reply), "C Z");
    let last = victim.until_closed().await;
    assert!(
        last.iter()
            .any(|m| m.field(b'C').as_deref() == Some("57P01")),
        "{}",
        show(&last)
    );
    eventually(PATIENCE, "the victim's insert rolled back", || {
        let direct = &direct;
        async move {
            let n: i64 = direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        }
    })
    .await;
    let rows: i64 = direct
        .query_one("SELECT count(*) FROM killed", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    bystander.send(&query("SELECT 1")).await;
    assert_eq!(show(&bystander.until_ready().await), "T D C Z");
    let unknown = run(&mut console, &format!("KILL_CLIENT {id}")).await;
    assert_eq!(
        unknown[0].field(b'C').as_deref(),
        Some("42704"),
        "{}",
        show(&unknown)
    );

    // KILL postgres: the bystander is told; the database is paused until RESUME.
    assert_eq!(show(&run(&mut console, "KILL postgres").await), "C Z");
    let last = bystander.until_closed().await;
    assert!(
        last.iter()
            .any(|m| m.field(b'C').as_deref() == Some("57P01")),
        "{}",
        show(&last)
    );
    let dbs = run(&mut console, "SHOW DATABASES").await;
    assert_eq!(num(&row_of(&dbs, "postgres"), "paused"), 1);
    let (mut late, _) = login("late").await;
    late.send(&query("SELECT 1")).await;
    let resumed = run(&mut console, "RESUME postgres").await;
    assert_eq!(show(&resumed), "C Z");
    assert_eq!(show(&late.until_ready().await), "T D C Z");
    let unknown = run(&mut console, "KILL nosuchdb").await;
    assert_eq!(
        unknown[0].field(b'C').as_deref(),
        Some("3D000"),
        "{}",
        show(&unknown)
    );
}

/// `admin.unix_socket`: the console on a Unix socket, psql-style (`-h DIR -p PORT`), with
/// peer authentication: pgvane's own OS user logs in without a password, as `pgbouncer` or
/// a console user; other databases and users are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_answers_on_a_unix_socket_with_peer_authentication() {
    let cluster = Cluster::start(0);
    let tx = free_port();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join(format!(".s.PGSQL.{tx}"));
    let text = pooled_config(
        &cluster,
        &listener("tx", tx, "primary", "mode = \"transaction\""),
        &format!(
            "[admin]\nadmin_users = [\"{SUPERUSER}\"]\nunix_socket = \"{}\"\n",
            socket.display()
        ),
    );
    let _pgvane = Pgvane::start(&text, &[tx]);
    eventually(PATIENCE, "the console's Unix socket", || async {
        socket.exists().then_some(())
    })
    .await;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let over_socket = |user: &str, database: &str| {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(dir.path())
            .port(tx)
            .user(user)
            .dbname(database);
        async move {
            let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    for user in ["pgbouncer", SUPERUSER] {
        let console = over_socket(user, "pgbouncer").await.unwrap();
        let version = console.simple_query("SHOW VERSION").await.unwrap();
        let row = first_value(&version);
        assert!(row.unwrap_or("").starts_with("pgvane"), "{user}: {row:?}");
        // Admin access: PAUSE and RESUME run.
        console.simple_query("PAUSE").await.unwrap();
        console.simple_query("RESUME").await.unwrap();
    }
    let code = |e: tokio_postgres::Error| e.as_db_error().unwrap().code().code().to_owned();
    let other_db = over_socket("pgbouncer", "postgres").await.unwrap_err();
    assert_eq!(code(other_db), "3D000");
    let not_console = over_socket("app", "pgbouncer").await.unwrap_err();
    assert_eq!(code(not_console), "28000");
}
