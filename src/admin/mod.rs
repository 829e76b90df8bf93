//! Admin: operator controls (PAUSE, RESUME), the HTTP admin API and the admin console.
//!
//! The HTTP API (`[admin] listen`) serves:
//! - `GET /metrics`: Prometheus text exposition.
//! - `GET /status`: JSON with the routing table, each backend's health details, the last
//!   failover, PAUSE state and pools.
//! - `POST /pause[?database=NAME]`: PgBouncer's PAUSE, global or for one database. Answers
//!   once no server connection of the paused databases is in use (200), or after
//!   [`PAUSE_WAIT`] with the count still running (202).
//! - `POST /resume[?database=NAME]`: RESUME.
//! - `POST /drain?backend=NAME`, `POST /enable?backend=NAME`: drain a backend (no new
//!   sessions or transactions; running ones finish) or take it back into service.
//! - `POST /reload`: reload the configuration file (see [`crate::reload`]); 200 with what
//!   was applied and what needs a restart, or 422 with why the file was refused.
//!
//! Control requests (POST) come from loopback only, or, with `admin.token` set, carry it as
//! a bearer token (401/403 otherwise). The same controls are on the admin console
//! ([`console`]).
//!
//! Signals reach the same controls: SIGUSR1 = PAUSE, SIGUSR2 = RESUME (as in PgBouncer).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::proxy::{Pause, Shared};
use crate::registry::Entry;
use crate::topology::{Election, UnknownBackend};

pub mod console;

/// How long `POST /pause` waits for running transactions before answering 202.
pub const PAUSE_WAIT: Duration = Duration::from_secs(30);

/// How the console's SHUTDOWN ends the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Close everything now.
    Now,
    /// PAUSE, wait until no server connection is in use, then close (WAIT_FOR_SERVERS).
    WaitForServers,
    /// Stop accepting and wait up to `shutdown_timeout` for clients to leave, as SIGTERM
    /// does (WAIT_FOR_CLIENTS).
    WaitForClients,
}

/// Databases DISABLE refuses new clients on.
#[derive(Default)]
pub struct Disabled(std::sync::Mutex<BTreeSet<String>>);

impl Disabled {
    pub fn contains(&self, database: &str) -> bool {
        self.0.lock().expect("disabled lock").contains(database)
    }

    pub fn all(&self) -> BTreeSet<String> {
        self.0.lock().expect("disabled lock").clone()
    }

    /// Returns whether anything changed.
    pub fn set(&self, database: &str, disabled: bool) -> bool {
        let mut set = self.0.lock().expect("disabled lock");
        match disabled {
            true => set.insert(database.to_owned()),
            false => set.remove(database),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("pgvane is paused globally; RESUME without a database")]
    GloballyPaused,
    #[error("no pool serves this database: name a database clients use")]
    NoSuchDatabase,
    #[error("no client session has id {0}: see the id column of SHOW CLIENTS")]
    NoSuchClient(u64),
}

/// A command naming `database` (none: all) must name one some pool serves.
fn served(shared: &Shared, database: Option<&str>) -> Result<(), AdminError> {
    match database {
        Some(d) if !shared.pools.serves_database(d) => Err(AdminError::NoSuchDatabase),
        _ => Ok(()),
    }
}

/// PgBouncer's KILL: every client session of `database` (of all with `None`) ends at once,
/// told why (57P01); the database is paused, so new work waits for RESUME; its pools are
/// replaced, so their server connections close (what a session had open is rolled back).
/// Returns how many sessions were ended.
pub fn kill(shared: &Arc<Shared>, database: Option<String>) -> Result<usize, AdminError> {
    served(shared, database.as_deref())?;
    pause(shared, database.clone());
    let of_db = |e: &Arc<Entry>| database.as_deref().is_none_or(|d| d == &*e.database);
    let entries = shared.clients.entries();
    let killed = entries.iter().filter(|e| of_db(e) && e.kill()).count();
    let replaced = shared.pools.reconnect(database.as_deref());
    info!(
        database = database.as_deref().unwrap_or("all databases"),
        killed,
        pools = replaced,
        "KILL: sessions ended, pools replaced; new work waits for RESUME"
    );
    Ok(killed)
}

/// PgBouncer's KILL_CLIENT: ends client session `id` (SHOW CLIENTS' id) at once, with
/// whatever it has open on a server.
pub fn kill_client(shared: &Shared, id: u64) -> Result<(), AdminError> {
    let entries = shared.clients.entries();
    let entry = entries.iter().find(|e| e.id == id);
    match entry {
        Some(e) if e.kill() => {
            info!(client = %e.addr(), user = %e.user, id, "KILL_CLIENT: session ended");
            Ok(())
        }
        _ => Err(AdminError::NoSuchClient(id)),
    }
}

/// PAUSE `database`, or everything with `None`. Logs "PAUSE complete" once no server
/// connection it holds is in use any more, which is when a planned switchover can start
/// without failing a transaction.
pub fn pause(shared: &Arc<Shared>, database: Option<String>) {
    let changed = shared.paused.modify(|p| {
        let next = match (&*p, database.clone()) {
            (Pause::All, _) | (_, None) => Pause::All,
            (Pause::Off, Some(db)) => Pause::Databases(BTreeSet::from([db])),
            (Pause::Databases(dbs), Some(db)) => {
                let mut dbs = dbs.clone();
                dbs.insert(db);
                Pause::Databases(dbs)
            }
        };
        let changed = *p != next;
        *p = next;
        changed
    });
    shared.metrics.paused.set(shared.paused.is_on() as i64);
    if !changed {
        return;
    }
    let scope = database.as_deref().unwrap_or("all databases");
    info!(
        scope,
        running = running(shared),
        "PAUSE: new transactions are held"
    );
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut changes = shared.paused.subscribe();
        let state = changes.borrow_and_update().clone();
        tokio::select! {
            // Paused differently or resumed meanwhile: that call reports for itself.
            _ = changes.changed() => {}
            _ = drained(&shared, None) => {
                info!(scope = ?state, "PAUSE complete: no transaction running");
            }
        }
    });
}

/// Waits until no transaction the current PAUSE holds is running, or until `deadline`;
/// returns how many still run. It polls: a notification on every release would put a cost
/// on every transaction for the sake of a rare admin command.
async fn drained(shared: &Shared, deadline: Option<tokio::time::Instant>) -> usize {
    loop {
        let left = running(shared);
        if left == 0 || deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RESUME `database`, or everything with `None`.
pub fn resume(shared: &Shared, database: Option<&str>) -> Result<(), AdminError> {
    let mut refused = false;
    shared.paused.modify(|p| match (&mut *p, database) {
        (Pause::Off, _) => false,
        (_, None) => {
            *p = Pause::Off;
            true
        }
        (Pause::All, Some(_)) => {
            refused = true;
            false
        }
        (Pause::Databases(dbs), Some(db)) => {
            let removed = dbs.remove(db);
            if dbs.is_empty() {
                *p = Pause::Off;
            }
            removed
        }
    });
    if refused {
        return Err(AdminError::GloballyPaused);
    }
    shared.metrics.paused.set(shared.paused.is_on() as i64);
    info!(
        scope = database.unwrap_or("all databases"),
        "RESUME: held clients proceed"
    );
    Ok(())
}

/// PAUSE, answered once no transaction of the paused databases runs (or after
/// [`PAUSE_WAIT`]): how many still run then. A database no pool serves is refused.
pub async fn pause_and_wait(
    shared: &Arc<Shared>,
    database: Option<String>,
) -> Result<usize, AdminError> {
    served(shared, database.as_deref())?;
    pause(shared, database);
    Ok(drained(shared, Some(tokio::time::Instant::now() + PAUSE_WAIT)).await)
}

/// Drains backend `name` (`on`: HAProxy's `set server state drain`) or takes it back into
/// service. Draining closes its idle pooled connections at once; the others close as they
/// are released. Returns whether anything changed.
pub fn drain(shared: &Shared, name: &str, on: bool) -> Result<bool, UnknownBackend> {
    let changed = shared.topology.set_draining(name, on)?;
    if changed && on {
        let closed = shared.pools.close_idle(name);
        info!(
            backend = name,
            closed_idle = closed,
            "backend drained: no new sessions or transactions go there; running ones finish"
        );
    } else if changed {
        info!(backend = name, "backend back in service");
    }
    Ok(changed)
}

/// Server connections open to backend `name`, over all its pools.
pub fn server_connections(shared: &Shared, name: &str) -> usize {
    let pools = shared.pools.all();
    let of_backend = pools.iter().filter(|p| p.key.backend == name);
    of_backend.map(|p| p.open_connections()).sum()
}

/// Server connections in use in pools that the current PAUSE holds.
fn running(shared: &Shared) -> usize {
    let pause = shared.paused.borrow().clone();
    shared
        .pools
        .all()
        .iter()
        .filter(|p| pause.holds(Some(&p.key.database)))
        .map(|p| p.busy_connections())
        .sum()
}

/// Admin API connections served at once; more are closed at accept.
const ADMIN_CONNECTIONS: usize = 32;

/// How long a request's headers may take to arrive (a client that trickles them, or a kept
/// connection with no request, is closed after this).
const HEADER_READ_LIMIT: Duration = Duration::from_secs(5);

/// Serves the HTTP admin API on `listener` until `stop`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(not_logged) = shared.refusal_log.take() {
                warn!(client = %peer, not_logged, "admin API connection closed: {ADMIN_CONNECTIONS} already open");
            }
            continue;
        };
        let shared = shared.clone();
        let service = service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(req, &shared, peer).await) }
        });
        tokio::spawn(async move {
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_LIMIT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(client = %peer, error = %e, "admin connection ended");
            }
            drop(slot);
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if req.method() == Method::POST {
        let token = shared.console.token();
        let authorization = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Err(refused) = may_control(authorization, peer.ip(), token.as_deref()) {
            warn!(client = %peer, path = req.uri().path(), "admin API control request refused: {}", refused.1);
            return refused_reply(refused);
        }
    }
    let param = |name: &str| {
        req.uri().query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        })
    };
    let database = param("database");
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let text = shared.metrics.render(&shared.pools);
            reply(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        (&Method::GET, "/status") => json_reply(StatusCode::OK, status(shared)),
        (&Method::POST, "/pause") => {
            info!(client = %peer, database = database.as_deref(), "PAUSE requested over HTTP");
            let left = match pause_and_wait(shared, database).await {
                Ok(left) => left,
                Err(e) => {
                    return json_reply(StatusCode::NOT_FOUND, json!({"error": e.to_string()}))
                }
            };
            let code = if left == 0 {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            json_reply(
                code,
                json!({"paused": pause_json(&shared.paused.borrow()), "complete": left == 0, "running": left}),
            )
        }
        (&Method::POST, "/resume") => {
            info!(client = %peer, database = database.as_deref(), "RESUME requested over HTTP");
            match resume(shared, database.as_deref()) {
                Ok(()) => json_reply(
                    StatusCode::OK,
                    json!({"paused": pause_json(&shared.paused.borrow())}),
                ),
                Err(e) => json_reply(StatusCode::CONFLICT, json!({"error": e.to_string()})),
            }
        }
        (&Method::POST, "/reload") => {
            info!(client = %peer, "reload requested over HTTP");
            match shared.reloads.reload().await {
                Ok(report) => json_reply(StatusCode::OK, json!(report)),
                Err(why) => json_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"error": format!("reload refused, nothing changed: {why}")}),
                ),
            }
        }
        (&Method::POST, path @ ("/drain" | "/enable")) => {
            let Some(backend) = param("backend") else {
                return json_reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "name the backend: ?backend=NAME"}),
                );
            };
            let on = path == "/drain";
            info!(client = %peer, backend, drain = on, "backend drain change requested over HTTP");
            match drain(shared, &backend, on) {
                Ok(changed) => json_reply(
                    StatusCode::OK,
                    json!({
                        "backend": backend,
                        "draining": on,
                        "changed": changed,
                        "server_connections": server_connections(shared, &backend),
                    }),
                ),
                Err(e) => json_reply(StatusCode::NOT_FOUND, json!({"error": e.to_string()})),
            }
        }
        (_, "/metrics" | "/status" | "/pause" | "/resume" | "/drain" | "/enable" | "/reload") => {
            json_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "GET /metrics and /status; POST /pause, /resume, /drain, /enable and /reload"}),
            )
        }
        _ => json_reply(
            StatusCode::NOT_FOUND,
            json!({"error": "unknown path; try /metrics, /status, /pause, /resume, /drain, /enable, /reload"}),
        ),
    }
}

/// Whether a control request (any POST) may run: with `admin.token` set, it must carry it
/// as a bearer token; without, it must come from a loopback address.
fn may_control(
    authorization: Option<&str>,
    peer: IpAddr,
    token: Option<&str>,
) -> Result<(), (StatusCode, &'static str)> {
    let Some(token) = token else {
        return match peer.is_loopback() {
            true => Ok(()),
            false => Err((
                StatusCode::FORBIDDEN,
                "control endpoints answer loopback callers only unless admin.token is set",
            )),
        };
    };
    match authorization.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(sent) if constant_time_eq(sent.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err((
            StatusCode::UNAUTHORIZED,
            "control endpoints need Authorization: Bearer <admin.token>",
        )),
    }
}

/// Compares without stopping at the first difference, so timing tells nothing of the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refused_reply((code, why): (StatusCode, &'static str)) -> Response<Full<Bytes>> {
    let mut reply = json_reply(code, json!({ "error": why }));
    if code == StatusCode::UNAUTHORIZED {
        reply.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
    }
    reply
}

fn pause_json(p: &Pause) -> Value {
    match p {
        Pause::Off => json!(false),
        Pause::All => json!(true),
        Pause::Databases(dbs) => json!(dbs),
    }
}

/// The routing table and what the admin API knows beyond it.
fn status(shared: &Shared) -> Value {
    let table = shared.topology.snapshot();
    let details = shared.topology.details();
    let backends: Vec<Value> = table
        .backends
        .iter()
        .map(|b| {
            let d = details
                .backends
                .get(&b.backend.name)
                .cloned()
                .unwrap_or_default();
            json!({
                "name": b.backend.name,
                "addr": b.backend.addr(),
                "role": b.role.as_str(),
                "serving": b.serving.as_str(),
                "suspect": b.suspect,
                "timeline": b.timeline,
                "active_sessions": b.backend.active_sessions(),
                "draining": b.draining,
                "server_connections": server_connections(shared, &b.backend.name),
                "last_error": d.last_error,
                "lag_bytes": d.lag_bytes,
                "replay_delay_ms": d.replay_delay_ms,
            })
        })
        .collect();
    let name = |i: &usize| table.backends[*i].backend.name.clone();
    let election = match &table.election {
        Election::Elected(i) => json!({"state": "elected", "primary": name(i)}),
        Election::None => json!({"state": "none"}),
        Election::Ambiguous(c) => {
            json!({"state": "ambiguous", "claimants": c.iter().map(name).collect::<Vec<_>>()})
        }
    };
    let pools: Vec<Value> = shared
        .pools
        .all()
        .iter()
        .map(|p| {
            json!({
                "backend": p.key.backend,
                "database": &*p.key.database,
                "user": &*p.key.user,
                "active": p.busy_connections(),
                "idle": p.idle_connections(),
            })
        })
        .collect();
    json!({
        "generation": table.generation,
        "election": election,
        "backends": backends,
        "last_failover": details.last_failover,
        "paused": pause_json(&shared.paused.borrow()),
        "held_clients": shared.metrics.held_clients.get(),
        "pinned_sessions": shared.metrics.pinned_sessions.get(),
        "pools": pools,
    })
}

fn json_reply(code: StatusCode, body: Value) -> Response<Full<Bytes>> {
    reply(code, "application/json", format!("{body:#}\n"))
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_needs_loopback_or_the_token() {
        let (lo, far): (IpAddr, IpAddr) =
            ("127.0.0.1".parse().unwrap(), "10.1.2.3".parse().unwrap());
        assert!(may_control(None, lo, None).is_ok());
        assert_eq!(
            may_control(None, far, None).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        // A token, once set, is asked of every caller, loopback included.
        assert_eq!(
            may_control(None, lo, Some("t")).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert!(may_control(Some("Bearer t"), far, Some("t")).is_ok());
        assert!(may_control(Some("Bearer u"), far, Some("t")).is_err());
        assert!(may_control(Some("Bearer tt"), far, Some("t")).is_err());
        assert!(may_control(Some("t"), far, Some("t")).is_err());
    }
}
