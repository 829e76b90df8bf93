//! pgbouncer.ini's model of databases and users: `[[database]]` entries (name → server
//! dbname, pool size, caps, pool mode, the `*` fallback) and per-user overrides, against a
//! real PostgreSQL, seen by clients and on the admin console.

mod common;

use common::raw::*;
use common::*;

/// The SQLSTATE and message a login was refused with.
async fn refused(port: u16, user: &str, database: &str) -> (String, String) {
    let e = match connect(port, user, database).await {
        Ok(_) => panic!("{user}@{database} logged in"),
        Err(e) => e,
    };
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

async fn one_row(client: &tokio_postgres::Client, sql: &str) -> (String, i32) {
    let row = client.query_one(sql, &[]).await.unwrap();
    (row.get(0), row.get(1))
}

const WHO: &str = "SELECT current_database()::text, pg_backend_pid()";

/// A session listener; database `app` is the server's `postgres` in transaction mode with
/// one connection, `held` is `postgres` in the listener's session mode, `capped` may have
/// one server connection over all its pools; user `watcher` is in session mode whatever the
/// database says. Nothing else may be logged in to, until a reload adds `*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_entries_name_size_cap_and_mode_their_pools() {
    let cluster = Cluster::start(0);
    create_role(&cluster, "watcher").await;
    let port = free_port();
    let entries = format!(
        r#"[admin]
admin_users = ["{SUPERUSER}"]

[[user]]
name = "watcher"
password = "{PASSWORD}"
pool_mode = "session"

[[database]]
name = "app"
dbname = "postgres"
pool_size = 1
pool_mode = "transaction"

[[database]]
name = "held"
dbname = "postgres"

[[database]]
name = "capped"
dbname = "postgres"
pool_size = 5
max_db_connections = 1
pool_mode = "transaction"
"#
    );
    let text = pooled_config(
        &cluster,
        &listener("s", port, "primary", "mode = \"session\""),
        &entries,
    );
    let pgvane = Pgvane::start(&text, &[port]);

    // A name maps to the server's database; with one connection in transaction mode, two
    // clients take turns on it (in the listener's session mode the second would wait).
    let (a, b) = (
        connect(port, SUPERUSER, "app").await.unwrap(),
        connect(port, SUPERUSER, "app").await.unwrap(),
    );
    let within = |f| tokio::time::timeout(PATIENCE, f);
    let (db_a, pid_a) = within(one_row(&a, WHO)).await.expect("a served");
    let (db_b, pid_b) = within(one_row(&b, WHO)).await.expect("b served");
    assert_eq!((db_a.as_str(), db_b.as_str()), ("postgres", "postgres"));
    assert_eq!(pid_a, pid_b, "one server connection, lent per transaction");

    // Not listed, and no `*`: PgBouncer's refusal, with PostgreSQL's SQLSTATE.
    let (code, message) = refused(port, SUPERUSER, "template1").await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("3D000", "no such database: template1")
    );

    // `held` keeps the listener's session mode; `watcher` has session mode on `app` too.
    let held = connect(port, SUPERUSER, "held").await.unwrap();
    held.batch_execute("SELECT 1").await.unwrap();
    let watcher = connect(port, "watcher", "app").await.unwrap();
    let (_, watcher_pid) = one_row(&watcher, WHO).await;
    assert_ne!(watcher_pid, pid_a, "the watcher's own pool");

    let (mut console, _) = RawClient::login(port, SUPERUSER, "pgbouncer").await;
    let pools = run(&mut console, "SHOW POOLS").await;
    let pool = |db: &str, user: &str| row_where(&pools, &[db, user]);
    // Idle clients: a session-mode one keeps its server connection, a transaction-mode one
    // does not.
    let (app, held_row, watched) = (
        pool("app", SUPERUSER),
        pool("held", SUPERUSER),
        pool("app", "watcher"),
    );
    assert_eq!(app["pool_mode"].as_deref(), Some("transaction"));
    assert_eq!(num(&app, "sv_active"), 0, "{app:?}");
    assert_eq!(held_row["pool_mode"].as_deref(), Some("session"));
    assert_eq!(num(&held_row, "sv_active"), 1, "{held_row:?}");
    assert_eq!(watched["pool_mode"].as_deref(), Some("session"));
    assert_eq!(num(&watched, "sv_active"), 1, "{watched:?}");

    // SHOW DATABASES shows every entry, used or not, with its server database and settings.
    let dbs = run(&mut console, "SHOW DATABASES").await;
    let app_db = row_of(&dbs, "app");
    assert_eq!(app_db["database"].as_deref(), Some("postgres"));
    assert_eq!(num(&app_db, "pool_size"), 1);
    assert_eq!(app_db["pool_mode"].as_deref(), Some("transaction"));
    let capped = row_of(&dbs, "capped");
    assert_eq!(num(&capped, "max_connections"), 1);
    assert_eq!(num(&capped, "pool_size"), 5);
    let users = run(&mut console, "SHOW USERS").await;
    assert_eq!(
        row_of(&users, "watcher")["pool_mode"].as_deref(),
        Some("session")
    );

    // max_db_connections: one server connection for `capped`, though its pool has five; a
    // second client waits for the first one's transaction to end.
    let first = connect(port, SUPERUSER, "capped").await.unwrap();
    first.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let second = connect(port, SUPERUSER, "capped").await.unwrap();
    let waiting = tokio::spawn(async move {
        second.batch_execute("SELECT 1").await.unwrap();
        second
    });
    // A fresh console connection per look: `eventually` calls a closure that cannot lend one.
    eventually(
        PATIENCE,
        "the second client waiting for the cap",
        || async move {
            let (mut console, _) = RawClient::login(port, SUPERUSER, "pgbouncer").await;
            let pools = run(&mut console, "SHOW POOLS").await;
            (num(&row_where(&pools, &["capped", SUPERUSER]), "cl_waiting") == 1).then_some(())
        },
    )
    .await;
    assert!(!waiting.is_finished());
    first.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("served once the first transaction ended")
        .unwrap();

    // A reload adds the fallback entry: any database may now be logged in to; `app` turns
    // to session mode, which its new pool shows.
    let reloaded = text.replace(
        "[[database]]\nname = \"app\"",
        "[[database]]\nname = \"*\"\n\n[[database]]\nname = \"app\"",
    );
    let reloaded = reloaded.replacen(
        "pool_size = 1\npool_mode = \"transaction\"",
        "pool_size = 1\npool_mode = \"session\"",
        1,
    );
    assert_ne!(reloaded, text);
    pgvane.rewrite_config(&reloaded);
    let reply = run(&mut console, "RELOAD").await;
    assert!(reply.iter().all(|m| m.tag != b'E'), "{}", show(&reply));
    let template = connect(port, SUPERUSER, "template1").await.unwrap();
    let (db, _) = one_row(&template, WHO).await;
    assert_eq!(db, "template1");
    drop((a, b));
    let c = connect(port, SUPERUSER, "app").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    let pools = run(&mut console, "SHOW POOLS").await;
    let app = row_where(&pools, &["app", SUPERUSER]);
    assert_eq!(app["pool_mode"].as_deref(), Some("session"), "{app:?}");
    assert_eq!(num(&app, "sv_active"), 1, "{app:?}");
}
