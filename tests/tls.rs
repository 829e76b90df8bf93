//! TLS toward clients on pooled listeners, with certificates made in the test (rcgen):
//! libpq clients (psql, pgbench) with sslmode=require and verify-full, a client certificate
//! checked against a CA, a plaintext client refused where TLS is required, and data streamed
//! both ways through the encrypted link.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A test CA and the files of the certificates it issues.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "pgvane test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        std::fs::write(pki.ca_file(), pki.ca.pem()).unwrap();
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate with common name `cn` and subject alternative names `sans`,
    /// written to `<name>.pem` and `<name>.key` (mode 0600, as libpq wants a key).
    fn issue(&self, name: &str, cn: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        self.issue_until(name, cn, sans, None)
    }

    /// As [`Pki::issue`], valid until `not_after` (default: far ahead).
    fn issue_until(
        &self,
        name: &str,
        cn: &str,
        sans: &[&str],
        not_after: Option<time::OffsetDateTime>,
    ) -> (PathBuf, PathBuf) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(at) = not_after {
            params.not_before = at - time::Duration::days(365);
            params.not_after = at;
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_file, key_file) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(&key_file, private).unwrap();
        (cert_file, key_file)
    }
}

/// A transaction listener whose `tls` table is `tls`; returns its port.
fn tls_listener(name: &str, tls: &str) -> (String, u16) {
    let port = free_port();
    let text = listener(
        name,
        port,
        "primary",
        &format!("mode = \"transaction\"\n[listener.tls]\n{tls}"),
    );
    (text, port)
}

fn tls_keys(cert: &std::path::Path, key: &std::path::Path, mode: &str) -> String {
    format!(
        "client_tls_sslmode = \"{mode}\"\nclient_tls_cert_file = \"{}\"\nclient_tls_key_file = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// psql with libpq connection string `conninfo` (the harness password in the environment)
/// running `sql`.
fn psql_with(conninfo: &str, sql: &str) -> Output {
    Command::new("psql")
        .args(["-X", "-At", "-d", conninfo, "-c", sql])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// sslmode=require and verify-full (against the test CA, host name checked) log in and
/// run transactions; sslmode=disable is refused with 28000 on a listener that requires TLS,
/// and served on one that prefers it; pgbench's transactions (several clients taking turns
/// on two server connections) and COPY both ways cross the encrypted link intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_clients_use_tls_and_plaintext_is_refused_where_it_is_required() {
    let cluster = Cluster::start(0);
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "localhost", &["localhost", "127.0.0.1"]);
    let (required, tx) = tls_listener("tls", &tls_keys(&cert, &key, "require"));
    let (preferred, prefer) = tls_listener("tls-prefer", &tls_keys(&cert, &key, "prefer"));
    let text = pooled_config(
        &cluster,
        &format!("{required}{preferred}"),
        "[pool]\ndefault_pool_size = 2\n",
    );
    let _pgvane = Pgvane::start(&text, &[tx, prefer]);
    let base = |port: u16| format!("host=localhost port={port} user={SUPERUSER} dbname=postgres");

    let ssl = "SELECT 1";
    assert_eq!(
        stdout(&psql_with(&format!("{} sslmode=require", base(tx)), ssl)),
        "1"
    );
    let ca = pki.ca_file();
    let verified = format!(
        "{} sslmode=verify-full sslrootcert={}",
        base(tx),
        ca.display()
    );
    assert_eq!(stdout(&psql_with(&verified, ssl)), "1");
    // psql shows the negotiated protocol: TLS 1.3 by default.
    let info = psql_with(&verified, "\\conninfo");
    assert!(
        stdout(&info).contains("SSL connection (protocol: TLSv1.3"),
        "{info:?}"
    );

    let plain = psql_with(&format!("{} sslmode=disable", base(tx)), ssl);
    assert!(!plain.status.success());
    let error = String::from_utf8_lossy(&plain.stderr);
    assert!(error.contains("accepts TLS connections only"), "{error}");
    // Prefer: both are served.
    assert_eq!(
        stdout(&psql_with(
            &format!("{} sslmode=disable", base(prefer)),
            ssl
        )),
        "1"
    );
    assert_eq!(
        stdout(&psql_with(
            &format!("{} sslmode=require", base(prefer)),
            ssl
        )),
        "1"
    );

    // Many transactions from 8 clients on 2 server connections, through TLS.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("txn.sql");
    std::fs::write(
        &script,
        "BEGIN;\nSELECT 1;\nSELECT repeat('x', 3000);\nCOMMIT;\n",
    )
    .unwrap();
    // As this user (pg_command's would lack a readable home for libpq's default files).
    let bench = Command::new(pg_bindir().join("pgbench"))
        .args(["-n", "-c", "8", "-j", "2", "-t", "200", "-f"])
        .arg(&script)
        .arg(format!("{} sslmode=require", base(tx)))
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    let report = stdout(&bench);
    assert!(
        report.contains("number of transactions actually processed: 1600/1600"),
        "{report}"
    );

    // COPY both ways, larger than any buffer on the way.
    let direct = cluster.primary().connect().await;
    direct
        .batch_execute("CREATE TABLE streamed (n int, pad text)")
        .await
        .unwrap();
    let rows = 20_000;
    let data: String = (0..rows)
        .map(|n| format!("{n}\t{}\n", "y".repeat(200)))
        .collect();
    let mut copy_in = Command::new("psql")
        .args(["-X", "-d", &format!("{} sslmode=require", base(tx))])
        .args(["-c", "COPY streamed FROM STDIN"])
        .env("PGPASSWORD", PASSWORD)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    copy_in
        .stdin
        .take()
        .unwrap()
        .write_all(data.as_bytes())
        .unwrap();
    let copied = copy_in.wait_with_output().unwrap();
    assert_eq!(stdout(&copied), format!("COPY {rows}"));
    let out = psql_with(
        &format!("{} sslmode=require", base(tx)),
        "COPY streamed TO STDOUT",
    );
    assert_eq!(out.stdout.len(), data.len(), "COPY out through TLS");
    assert_eq!(String::from_utf8_lossy(&out.stdout), data);
}

/// client_tls_sslmode = verify-ca: a client certificate signed by client_tls_ca_file logs
/// in; none, or one from another CA, is refused in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_wants_a_client_certificate_from_the_ca() {
    let cluster = Cluster::start(0);
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "localhost", &["localhost"]);
    let (client_cert, client_key) = pki.issue("client", SUPERUSER, &[]);
    let stranger = Pki::new();
    let (other_cert, other_key) = stranger.issue("client", SUPERUSER, &[]);
    let keys = format!(
        "{}client_tls_ca_file = \"{}\"\n",
        tls_keys(&cert, &key, "verify-ca"),
        pki.ca_file().display()
    );
    let (text, port) = tls_listener("mtls", &keys);
    let _pgvane = Pgvane::start(&pooled_config(&cluster, &text, ""), &[port]);
    let conninfo = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "host=localhost port={port} user={SUPERUSER} dbname=postgres sslmode=require sslcert={} sslkey={}",
            cert.display(),
            key.display()
        )
    };
    assert_eq!(
        stdout(&psql_with(&conninfo(&client_cert, &client_key), "SELECT 1")),
        "1"
    );
    let strange = psql_with(&conninfo(&other_cert, &other_key), "SELECT 1");
    assert!(!strange.status.success(), "a certificate of another CA");
    let none = psql_with(
        &format!("host=localhost port={port} user={SUPERUSER} dbname=postgres sslmode=require sslcert=/nonexistent"),
        "SELECT 1",
    );
    assert!(!none.status.success(), "no client certificate");
}

/// The subject CN of the certificate a new client of `port` is shown, read with OpenSSL's
/// client speaking PostgreSQL's SSLRequest.
fn served_cn(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-starttls", "postgres", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("subject=CN = ")
                .or_else(|| l.strip_prefix("subject=CN="))
        })
        .unwrap_or_else(|| panic!("no subject in: {text}"))
        .trim()
        .to_owned()
}

/// Certificates rotate without a restart: new files are noticed (watched, no reload asked)
/// and serve the next handshakes while pgbench's sessions, open across the change, lose
/// nothing; a new certificate that is expired or does not match its key is refused at
/// RELOAD, and the one in force stays. The expiry is in /metrics, and `pgvane check`
/// warns of one within 30 days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_while_sessions_stay_and_bad_ones_are_refused() {
    let cluster = Cluster::start(0);
    let pki = Pki::new();
    let soon = time::OffsetDateTime::now_utc() + time::Duration::days(10);
    let (cert, key) = pki.issue_until("server", "first", &["localhost"], Some(soon));
    let (text, port) = tls_listener("tls", &tls_keys(&cert, &key, "require"));
    let admin = free_port();
    let extra =
        format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\nadmin_users = [\"{SUPERUSER}\"]\n");
    let config = pooled_config(&cluster, &text, &extra);
    let pgvane = Pgvane::start(&config, &[port, admin]);
    assert_eq!(served_cn(port), "first");

    // Expiry, in seconds, for alerts; and `pgvane check`'s warning.
    let expiry = format!(
        "pgvane_tls_certificate_expiry_seconds{{file=\"{}\",listener=\"tls\"}}",
        cert.display()
    );
    let left = metric(admin, &expiry).await.expect("the expiry metric");
    assert!((9.0 * 86400.0..=10.0 * 86400.0).contains(&left), "{left}");
    let checked = Command::new(env!("CARGO_BIN_EXE_pgvane"))
        .args(["check", "--config"])
        .arg(pgvane.config_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "{stderr}");
    let warned = format!("certificate {} expires in", cert.display());
    assert!(stderr.contains(&warned), "{stderr}");

    // pgbench keeps its sessions open across the rotation.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("txn.sql");
    std::fs::write(&script, "BEGIN;\nSELECT 1;\nCOMMIT;\n").unwrap();
    let bench = Command::new(pg_bindir().join("pgbench"))
        .args(["-n", "-c", "4", "-j", "2", "-T", "6", "-f"])
        .arg(&script)
        .arg(format!(
            "host=localhost port={port} user={SUPERUSER} dbname=postgres sslmode=require"
        ))
        .env("PGPASSWORD", PASSWORD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // New files in place, as a certificate manager writes them: noticed without a reload.
    let replacement = Pki::new();
    let (new_cert, new_key) = replacement.issue("server", "second", &["localhost"]);
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    eventually(PATIENCE, "the new certificate served", || async {
        (served_cn(port) == "second").then_some(())
    })
    .await;
    let report = stdout(&bench.wait_with_output().unwrap());
    assert!(
        report.contains("number of failed transactions: 0"),
        "{report}"
    );
    let clients = report
        .lines()
        .find(|l| l.starts_with("number of clients:"))
        .unwrap_or_default()
        .to_owned();
    assert_eq!(clients, "number of clients: 4", "{report}");

    // Expired, then a key of another certificate: refused, the second one stays.
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let (old_cert, old_key) =
        replacement.issue_until("expired", "expired", &["localhost"], Some(past));
    let (other_cert, _) = replacement.issue("third", "third", &["localhost"]);
    for (bad_cert, bad_key, why) in [
        (&old_cert, &old_key, "expired"),
        (&other_cert, &new_key, "does not go with"),
    ] {
        std::fs::copy(bad_cert, &cert).unwrap();
        std::fs::copy(bad_key, &key).unwrap();
        let reply = reload_on_console(port);
        assert!(reply.contains(why), "{reply}");
        assert_eq!(served_cn(port), "second");
    }
}

/// RELOAD on the admin console, over TLS (the listener requires it): "ok", or the error.
fn reload_on_console(port: u16) -> String {
    let conninfo =
        format!("host=localhost port={port} user={SUPERUSER} dbname=pgbouncer sslmode=require");
    let out = psql_with(&conninfo, "RELOAD");
    match out.status.success() {
        true => "ok".into(),
        false => String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// PostgreSQL 17's direct TLS (`sslnegotiation=direct`, ALPN "postgresql"), from libpq
/// 17+ as psycopg's binary wheel bundles it; SHOW CLIENTS shows the protocol and suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_from_libpq_17_is_accepted() {
    let cluster = Cluster::start(0);
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "localhost", &["localhost"]);
    let (text, port) = tls_listener("tls", &tls_keys(&cert, &key, "require"));
    let extra = format!("[admin]\nadmin_users = [\"{SUPERUSER}\"]\n");
    let _pgvane = Pgvane::start(&pooled_config(&cluster, &text, &extra), &[port]);
    let script = "import psycopg, sys\n\
        c = psycopg.connect(sys.argv[1], autocommit=True)\n\
        assert c.pgconn.ssl_in_use\n\
        print(c.execute('SELECT 41 + 1').fetchone()[0])\n\
        console = psycopg.connect(sys.argv[2], autocommit=True)\n\
        for row in console.execute('SHOW CLIENTS'):\n\
        \x20   print(row[17])\n";
    let conninfo = |db: &str| {
        format!(
            "host=localhost port={port} user={SUPERUSER} password={PASSWORD} dbname={db} sslmode=verify-full sslrootcert={} sslnegotiation=direct",
            pki.ca_file().display()
        )
    };
    let out = Command::new(drivers_python())
        .args(["-c", script, &conninfo("postgres"), &conninfo("pgbouncer")])
        .output()
        .unwrap();
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("42"));
    assert!(
        lines.any(|l| l.starts_with("TLSv1.3/TLS13_")),
        "SHOW CLIENTS' tls column: {text}"
    );
}

/// auth.type = "cert": the client certificate's common name is the user, no password
/// asked; a certificate for another user is refused with 28000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_authentication_takes_the_user_from_the_certificate() {
    let cluster = Cluster::start(0);
    create_role(&cluster, "watcher").await;
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "localhost", &["localhost"]);
    let (client_cert, client_key) = pki.issue("client", SUPERUSER, &[]);
    let keys = format!(
        "{}client_tls_ca_file = \"{}\"\n",
        tls_keys(&cert, &key, "verify-full"),
        pki.ca_file().display()
    );
    let (text, port) = tls_listener("cert", &keys);
    let config = pooled_config(&cluster, &text, "[auth]\ntype = \"cert\"\n");
    let _pgvane = Pgvane::start(&config, &[port]);
    let as_user = |user: &str| {
        let conninfo = format!(
            "host=localhost port={port} user={user} dbname=postgres sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            pki.ca_file().display(),
            client_cert.display(),
            client_key.display()
        );
        Command::new("psql")
            .args([
                "-X",
                "-At",
                "-w",
                "-d",
                &conninfo,
                "-c",
                "SELECT current_user",
            ])
            .env_remove("PGPASSWORD")
            .output()
            .unwrap()
    };
    assert_eq!(stdout(&as_user(SUPERUSER)), SUPERUSER);
    let other = as_user("watcher");
    assert!(!other.status.success());
    let error = String::from_utf8_lossy(&other.stderr);
    assert!(
        error.contains("certificate authentication failed for user \"watcher\""),
        "{error}"
    );
}

/// A PostgreSQL that takes TLS connections only (ssl = on, `hostssl` lines alone in
/// pg_hba.conf) behind pgvane with server_tls_sslmode = verify-full: pooled connections
/// and health checks use TLS with the server's certificate checked against the CA and the
/// backend's address; plaintext clients of pgvane reach it all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connections_use_tls_toward_a_postgresql_that_requires_it() {
    use std::os::unix::fs::MetadataExt;
    let cluster = Cluster::start(0);
    let pki = Pki::new();
    let (cert, key) = pki.issue("postgres-server", "127.0.0.1", &["127.0.0.1", "localhost"]);
    let node = cluster.primary();
    let owner = std::fs::metadata(&node.data).unwrap();
    for (from, to) in [(&cert, "server.crt"), (&key, "server.key")] {
        let path = node.data.join(to);
        std::fs::copy(from, &path).unwrap();
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
    }
    let conf = node.data.join("postgresql.conf");
    let mut settings = std::fs::read_to_string(&conf).unwrap();
    settings.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(&conf, settings).unwrap();
    std::fs::write(
        node.data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    node.connect()
        .await
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    eventually(PATIENCE, "plaintext refused by PostgreSQL", || async {
        connect(node.port, SUPERUSER, "postgres")
            .await
            .err()
            .map(|_| ())
    })
    .await;

    let tx = free_port();
    let extra = format!(
        "[tls]\nserver_tls_sslmode = \"verify-full\"\nserver_tls_ca_file = \"{}\"\n",
        pki.ca_file().display()
    );
    let text = pooled_config(
        &cluster,
        &listener("tx", tx, "primary", "mode = \"transaction\""),
        &extra,
    );
    let _pgvane = Pgvane::start(&text, &[tx]);
    let client = connect(tx, SUPERUSER, "postgres").await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let (ssl, version): (bool, String) = (row.get(0), row.get(1));
    assert!(ssl);
    assert_eq!(version, "TLSv1.3");
}

/// tokio-postgres over rustls (tokio-postgres-rustls) with sslmode=require, verifying
/// pgvane's certificate against `pki`'s CA and the host name.
async fn tls_client(pki: &Pki, port: u16) -> tokio_postgres::Client {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.ca_file()).unwrap();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connect = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
    let (client, conn) = tokio_postgres::Config::new()
        .host("localhost")
        .port(port)
        .user(SUPERUSER)
        .password(PASSWORD)
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect(connect)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// At an upgrade an encrypted session cannot leave its process: it stays on the old one
/// and goes on there, the old process ending only once it has. A plain session moved to a
/// new process whose listener now requires TLS is refused there, not served unencrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_an_upgrade_tls_sessions_stay_and_moved_ones_meet_the_new_tls_requirement() {
    let cluster = Cluster::start(0);
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "localhost", &["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("upgrade.sock");
    let (preferred, port) = tls_listener("tls", &tls_keys(&cert, &key, "prefer"));
    let config = |listener: &str| {
        let general = format!(
            "[general]\nupgrade_socket = \"{}\"\nshutdown_timeout = \"600s\"\n",
            socket.display()
        );
        pooled_config(&cluster, listener, "").replace("[general]\n", &general)
    };
    let mut old = Pgvane::start(&config(&preferred), &[port]);
    eventually(PATIENCE, "the upgrade socket offered", || async {
        socket.exists().then_some(())
    })
    .await;
    let encrypted = tls_client(&pki, port).await;
    let statement = encrypted.prepare("SELECT $1::int + 1").await.unwrap();
    let plain = connect(port, SUPERUSER, "postgres").await.unwrap();
    plain.batch_execute("SELECT 1").await.unwrap();

    let required = preferred.replace("\"prefer\"", "\"require\"");
    let new = Pgvane::start(&config(&required), &[port]);
    new.wait_log("accepts TLS connections only", PATIENCE).await;
    plain
        .batch_execute("SELECT 1")
        .await
        .expect_err("a plain session on a listener that now requires TLS");
    // The encrypted session is served where it is, by the old process.
    let row = encrypted.query_one(&statement, &[&41]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(!old.has_exited(), "the old process serves its TLS session");
    drop(encrypted);
    let exited = tokio::task::spawn_blocking(move || old.wait_exit(PATIENCE)).await;
    assert!(
        exited.unwrap().is_some(),
        "the old process exits once it has"
    );
}

/// tokio-postgres over rustls (tokio-postgres-rustls) with sslmode=require, verifying the
/// certificate against the CA and the host name: prepared statements across transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_verifies_pgvane_s_certificate() {
    let cluster = Cluster::start(0);
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "localhost", &["localhost"]);
    let (text, port) = tls_listener("tls", &tls_keys(&cert, &key, "require"));
    let _pgvane = Pgvane::start(&pooled_config(&cluster, &text, ""), &[port]);
    let client = tls_client(&pki, port).await;
    let statement = client.prepare("SELECT $1::int + 1").await.unwrap();
    for n in 0..20 {
        let row = client.query_one(&statement, &[&n]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), n + 1);
    }
}
