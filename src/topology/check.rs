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

use super::health::Observation;
use crate::config::{BackendConfig, CheckMethod, HealthConfig};

/// On a primary the current WAL file name starts with the timeline in 8 hex digits; that is
/// up to date right after a promotion, unlike the checkpoint's timeline.
const SQL_CHECK: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL \
     ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END";

pub enum Probe {
    Sql(Box<SqlProbe>),
    Patroni(PatroniProbe),
}

impl Probe {
    pub fn new(backend: &BackendConfig, health: &HealthConfig) -> Self {
        match health.method {
            CheckMethod::Sql => {
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
                Probe::Sql(Box::new(SqlProbe {
                    config: pg,
                    client: None,
                }))
            }
            CheckMethod::Patroni => Probe::Patroni(PatroniProbe {
                host: backend.host.clone(),
                port: backend.patroni_port(health),
            }),
        }
    }

    /// One check, bounded by `timeout` (connect included).
    pub async fn check(&mut self, timeout: Duration) -> Observation {
        let result = tokio::time::timeout(timeout, async {
            match self {
                Probe::Sql(p) => p.check().await,
                Probe::Patroni(p) => p.check().await,
            }
        })
        .await;
        match result {
            Ok(Ok(obs)) => obs,
            Ok(Err(e)) => {
                self.reset();
                Observation::Failed(e)
            }
            Err(_) => {
                self.reset();
                Observation::Failed(format!("check timed out after {timeout:?}"))
            }
        }
    }

    fn reset(&mut self) {
        if let Probe::Sql(p) = self {
            p.client = None;
        }
    }
}

pub struct SqlProbe {
    config: tokio_postgres::Config,
    client: Option<Client>,
}

impl SqlProbe {
    async fn check(&mut self) -> Result<Observation, String> {
        let client = match &self.client {
            Some(c) if !c.is_closed() => c,
            _ => {
                let (client, conn) = self
                    .config
                    .connect(NoTls)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                tokio::spawn(conn);
                self.client.insert(client)
            }
        };
        let messages = client
            .simple_query(SQL_CHECK)
            .await
            .map_err(|e| format!("query: {e}"))?;
        let row = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .ok_or("query returned no row")?;
        match row.get(0) {
            Some("t") => Ok(Observation::Replica),
            Some("f") => Ok(Observation::Primary {
                timeline: row.get(1).and_then(|t| t.parse().ok()),
            }),
            other => Err(format!("unexpected pg_is_in_recovery() value {other:?}")),
        }
    }
}

pub struct PatroniProbe {
    host: String,
    port: u16,
}

impl PatroniProbe {
    async fn check(&self) -> Result<Observation, String> {
        let primary = self.status("/primary").await?;
        if primary == StatusCode::OK {
            return Ok(Observation::Primary { timeline: None });
        }
        let replica = self.status("/replica").await?;
        if replica == StatusCode::OK {
            return Ok(Observation::Replica);
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
            .map_err(|e| format!("patroni: {e}"))?;
        // Only the status matters: the connection is dropped without reading the body.
        let conn = AbortOnDrop(tokio::spawn(conn));
        let req = Request::get(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("patroni: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("patroni GET {path}: {e}"))?;
        drop(conn);
        Ok(resp.status())
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
