//! Health probes: how one check of one backend is carried out.
//!
//! * `sql`: a long-lived monitor connection (tokio-postgres) asks `pg_is_in_recovery()` and,
//!   on a primary, the timeline it writes on. Keeping the connection saves an authentication
//!   per check; it is dropped and re-opened after any failure.
//! * `patroni`: HTTP GET of Patroni's `/primary`, then `/replica` (200 = yes, 503 = no), on a
//!   fresh connection each time as HAProxy does.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use tracing::debug;

use super::health::{Observation, Progress};
use crate::config::{BackendConfig, CheckMethod, HealthConfig, ServerSslMode};
use crate::tls::ServerTls;
use tokio_postgres_rustls::MakeRustlsConnect;

/// On a primary the current WAL file name starts with the timeline in 8 hex digits; that is
/// up to date right after a promotion, unlike the checkpoint's timeline. The third column is
/// the WAL position in bytes (written on a primary, replayed on a replica), for replica lag;
/// the fourth a replica's replay delay in ms: 0 when all WAL received is replayed, else
/// the age of the last replayed transaction.
const SQL_CHECK: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL \
     ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END, \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
     ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint, \
     CASE WHEN NOT pg_is_in_recovery() THEN NULL \
     WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
     ELSE greatest(0, extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint END";

pub enum Probe {
    Sql(Box<SqlProbe>),
    Patroni(PatroniProbe),
}

impl Probe {
    pub fn new(backend: &BackendConfig, health: &HealthConfig, tls: Option<&ServerTls>) -> Self {
        match health.method {
            CheckMethod::Sql => Probe::Sql(SqlProbe::new(backend, health, tls)),
            CheckMethod::Patroni => Probe::Patroni(PatroniProbe {
                host: backend.host.clone(),
                port: backend.patroni_port(health),
                sql: health
                    .patroni
                    .cross_check
                    .then(|| SqlProbe::new(backend, health, tls)),
            }),
        }
    }

    /// One check, bounded by `timeout` (connect included), with the backend's WAL position
    /// when the method can tell.
    pub async fn check(&mut self, timeout: Duration) -> (Observation, Progress) {
        let result = tokio::time::timeout(timeout, async {
            match self {
                Probe::Sql(p) => p.check().await,
                Probe::Patroni(p) => p.check().await,
            }
        })
        .await;
        match result {
            Ok(Ok(checked)) => checked,
            Ok(Err(e)) => {
                self.reset();
                (Observation::Failed(e), Progress::default())
            }
            Err(_) => {
                self.reset();
                let e = format!("check timed out after {timeout:?}");
                (Observation::Failed(e), Progress::default())
            }
        }
    }

    fn reset(&mut self) {
        match self {
            Probe::Sql(p) => p.client = None,
            Probe::Patroni(PatroniProbe { sql: Some(p), .. }) => p.client = None,
            Probe::Patroni(_) => {}
        }
    }
}

pub struct SqlProbe {
    config: tokio_postgres::Config,
    client: Option<Client>,
    /// TLS toward PostgreSQL, as the pools' connections have it.
    tls: Option<MakeRustlsConnect>,
}

impl SqlProbe {
    fn new(backend: &BackendConfig, health: &HealthConfig, tls: Option<&ServerTls>) -> Box<Self> {
        let mut pg = tokio_postgres::Config::new();
        pg.host(&backend.host)
            .port(backend.port)
            .user(&health.sql.user)
            .dbname(&health.sql.dbname)
            .application_name("pgvane-health")
            .connect_timeout(health.timeout);
        if let Some(pw) = &health.sql.password {
            pg.password(pw);
        }
        // As the pools' connections: `prefer` and `require` as libpq's, verification by
        // rustls' configuration.
        let tls = tls.map(|t| {
            pg.ssl_mode(match t.mode {
                ServerSslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
            MakeRustlsConnect::new((*t.client_config()).clone())
        });
        Box::new(SqlProbe {
            config: pg,
            client: None,
            tls,
        })
    }

    async fn check(&mut self) -> Result<(Observation, Progress), String> {
        let client = match &self.client {
            Some(c) if !c.is_closed() => c,
            _ => {
                let failed = |e: tokio_postgres::Error| format!("connect: {}", pg_cause(&e));
                let client = match &self.tls {
                    None => {
                        let (client, conn) = self.config.connect(NoTls).await.map_err(failed)?;
                        tokio::spawn(conn);
                        client
                    }
                    Some(tls) => {
                        let (client, conn) =
                            self.config.connect(tls.clone()).await.map_err(failed)?;
                        tokio::spawn(conn);
                        client
                    }
                };
                self.client.insert(client)
            }
        };
        let messages = client
            .simple_query(SQL_CHECK)
            .await
            .map_err(|e| format!("query: {}", pg_cause(&e)))?;
        let row = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .ok_or("query returned no row")?;
        let progress = Progress {
            wal: row.get(2).and_then(|w| w.parse().ok()),
            replay_delay: row
                .get(3)
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis),
        };
        match row.get(0) {
            Some("t") => Ok((Observation::Replica, progress)),
            Some("f") => {
                let timeline = row.get(1).and_then(|t| t.parse().ok());
                Ok((Observation::Primary { timeline }, progress))
            }
            other => Err(format!("unexpected pg_is_in_recovery() value {other:?}")),
        }
    }
}

pub struct PatroniProbe {
    host: String,
    port: u16,
    /// Cross-check over SQL: Patroni can report leader while PostgreSQL is still in
    /// recovery during a slow promotion; such a node takes no writes from pgvane.
    sql: Option<Box<SqlProbe>>,
}

impl PatroniProbe {
    async fn check(&mut self) -> Result<(Observation, Progress), String> {
        let primary = self.status("/primary").await?;
        if primary == StatusCode::OK {
            let Some(sql) = &mut self.sql else {
                return Ok((Observation::Primary { timeline: None }, Progress::default()));
            };
            return match sql.check().await? {
                (Observation::Primary { timeline }, progress) => {
                    Ok((Observation::Primary { timeline }, progress))
                }
                (_, progress) => {
                    debug!(host = %self.host, "patroni reports primary, PostgreSQL is still in recovery");
                    Ok((Observation::Replica, progress))
                }
            };
        }
        let replica = self.status("/replica").await?;
        if replica == StatusCode::OK {
            // Without the leader lock a node is a replica, whatever PostgreSQL says; SQL
            // only adds its WAL progress.
            let progress = match &mut self.sql {
                Some(sql) => sql.check().await.map(|(_, p)| p).unwrap_or_default(),
                None => Progress::default(),
            };
            return Ok((Observation::Replica, progress));
        }
        Err(format!(
            "patroni: /primary answered {}, /replica answered {}",
            primary.as_u16(),
            replica.as_u16()
        ))
    }

    async fn status(&self, path: &str) -> Result<StatusCode, String> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("patroni {}:{}: {e}", self.host, self.port))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("patroni: {}", with_causes(&e)))?;
        // Only the status matters: the connection is dropped without reading the body.
        let conn = AbortOnDrop(tokio::spawn(conn));
        let req = Request::get(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("patroni: {}", with_causes(&e)))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("patroni GET {path}: {}", with_causes(&e)))?;
        drop(conn);
        Ok(resp.status())
    }
}

/// A tokio-postgres error as an operator needs it: its Display alone says only "db error"
/// or "error connecting to server"; the server's message and SQLSTATE, or the I/O cause
/// (refused, timed out), are what tell a crash from a shutdown or a bad password.
fn pg_cause(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => with_causes(e),
    }
}

/// An error followed by its chain of causes.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        // Some errors repeat their cause in their own Display.
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
