//! auth_user + auth_query: users PostgreSQL knows log in through pgvane without being listed
//! in its configuration or an auth_file.

mod common;

use common::raw::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_only_postgresql_knows_logs_in_through_auth_query() {
    let cluster = Cluster::start(0);
    create_role(&cluster, "dyn").await;
    let tx = free_port();
    let text = pooled_config(
        &cluster,
        &listener("tx", tx, "primary", "mode = \"transaction\""),
        &format!("[auth]\nauth_user = \"{SUPERUSER}\"\n"),
    );
    assert!(!text.contains("name = \"dyn\""));
    let _pgvane = Pgvane::start(&text, &[tx]);

    // SCRAM against the verifier pg_shadow holds; the pool then logs in to PostgreSQL with
    // the keys the client's proof revealed (no password in pgvane's hands).
    for _ in 0..2 {
        let c = connect(tx, "dyn", "postgres").await.unwrap();
        let rows = c.simple_query("SELECT current_user").await.unwrap();
        assert_eq!(first_value(&rows), Some("dyn"));
    }
    let wrong = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(tx)
        .user("dyn")
        .password("not-the-password")
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await;
    let code = wrong.err().and_then(|e| e.code().cloned());
    assert_eq!(code.map(|c| c.code().to_owned()).as_deref(), Some("28P01"));
    // A name PostgreSQL does not know either: refused like a wrong password.
    let (_, login) = RawClient::login(tx, "nobody_at_all", "postgres").await;
    assert_eq!(
        login.last().and_then(|m| m.field(b'C')).as_deref(),
        Some("28P01"),
        "{}",
        show(&login)
    );
}

/// auth_user must be able to log in itself: a plain password is required, and the check
/// says so with the key.
#[test]
fn auth_user_needs_a_plain_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgvane.toml");
    let text = "[auth]\nauth_user = \"pgbouncer\"\n\n[[user]]\nname = \"pgbouncer\"\n\n[[backend]]\nname = \"pg1\"\nhost = \"127.0.0.1\"\nport = 5432\n\n[[listener]]\nname = \"tx\"\naddress = \"127.0.0.1\"\nport = 6433\nmode = \"transaction\"\ntarget = \"primary\"\n";
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgvane"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("auth.auth_user"), "{stderr}");
}
