//! Server connection pools of the session and transaction listeners.
//!
//! A [`Pool`] holds the idle server connections of one (backend, database, user) and a fair
//! FIFO queue of clients waiting for one: a client takes a *slot* (one of `pool_size`), then
//! the most recently used idle connection, or opens a new one; a released slot and its
//! connection go straight to the longest-waiting client ([`queue`]).
//! Connections only exist because a client once needed one, so a pool never holds more than
//! its slots (plus `min_pool_size` kept warm). After `reserve_pool_timeout` a waiting client
//! may also take one of `reserve_pool_size` extra slots. Per-database and per-user caps count
//! open connections over all pools; a pool that finds its cap full closes an idle connection
//! of another pool under the same cap, as PgBouncer does, rather than wait for one.
//!
//! A [`Lease`] returned to the pool as clean is reused; dropped any other way, its connection
//! is closed: a connection in an unknown state is never handed out.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod queue;

use queue::{Limits, Queue, Slot};

use crate::auth::{error_code, error_message, login_to_server, ServerLoginError, User, UserStore};
use crate::config::{
    DatabaseConfig, ListenerMode, PoolConfig, PoolMode, UserConfig, FALLBACK_DATABASE,
};
use crate::protocol::{read_message, ProtocolError};
use crate::proxy::prepared::ServerStatements;
use crate::registry::{Entry, NewEntry, Registry, State};
use crate::stats::{DbStats, Latency, LinkCounts, Measure, Stats, STATS_PERIOD};
use crate::tls::{ServerStream, ServerTls};
use crate::topology::{Backend, Topology};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection became available within {0:?} (query_wait_timeout)")]
    WaitTimeout(Duration),
    #[error("cannot connect to backend \"{backend}\": {reason}")]
    Connect { backend: String, reason: String },
    #[error(transparent)]
    Login(#[from] ServerLoginError),
    #[error("server connection failed: {0}")]
    Server(#[from] ProtocolError),
    #[error("server answered \"{message}\"")]
    Query {
        message: String,
        /// The ErrorResponse's SQLSTATE.
        code: Option<String>,
    },
}

impl PoolError {
    /// The backend cannot be reached or is not taking connections right now (down,
    /// starting, shutting down): another backend, or the same one later, may do.
    pub fn backend_unreachable(&self) -> bool {
        match self {
            PoolError::Connect { .. } | PoolError::Server(_) => true,
            // Cut during the login: the server went away after accepting.
            PoolError::Login(ServerLoginError::Protocol(
                ProtocolError::Closed | ProtocolError::Io(_),
            )) => true,
            PoolError::Login(ServerLoginError::Refused { body, .. }) => {
                // admin_shutdown, crash_shutdown, cannot_connect_now
                matches!(
                    error_code(body).as_deref(),
                    Some("57P01" | "57P02" | "57P03")
                )
            }
            _ => false,
        }
    }
}

impl From<std::io::Error> for PoolError {
    fn from(e: std::io::Error) -> Self {
        PoolError::Server(e.into())
    }
}

/// Parameters pgvane keeps in step across server connections, with their canonical spelling.
pub const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "search_path",
    "standard_conforming_strings",
    "TimeZone",
];

/// What a server reported at login, as shown to the pool's clients at theirs.
#[derive(Debug, Default)]
pub struct LoginParams {
    pub all: Vec<(String, String)>,
    /// The subset named in [`TRACKED`]: the values a client has unless it sets its own.
    pub tracked: Vec<(String, String)>,
}

impl LoginParams {
    /// The value the server reported for `name`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.all
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Where to send a CancelRequest for the query running on a server connection.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub backend: Arc<Backend>,
    pub process_id: u32,
    pub secret_key: u32,
}

/// Read buffer of a server connection (PgBouncer's pkt_buf is 4 KiB).
pub const SERVER_READ_BUFFER: usize = 8192;

/// One logged-in server connection.
pub struct ServerConn {
    pub stream: ServerStream,
    /// What the link reads from the server into: kept with the connection, so a pool of N
    /// connections has N buffers however many clients it serves, and a transaction
    /// allocates none.
    pub read_buf: BytesMut,
    pub params: ServerParams,
    /// Named statements prepared on this connection by pgvane (transaction mode).
    pub prepared: ServerStatements,
    /// Parameters the server reports (ParameterStatus): their values follow each client.
    pub reported_at_login: Vec<String>,
    /// What the current link counted, added to the database's statistics when it ends.
    pub counts: LinkCounts,
    /// Its line in SHOW SERVERS.
    pub entry: Arc<Entry>,
    cancel: CancelTarget,
    created: coarsetime::Instant,
    last_used: coarsetime::Instant,
    /// Per-database and per-user cap permits, held for the connection's lifetime.
    _caps: Vec<OwnedSemaphorePermit>,
}

/// Parameter values in effect on a server connection: as reported at login and by
/// ParameterStatus since, plus those pgvane set itself.
#[derive(Default)]
pub struct ServerParams {
    values: foldhash::HashMap<String, String>,
    /// The client values these were last brought to, while nothing has changed since:
    /// the next client with the same values needs no comparison (checked per transaction).
    synced: Option<ClientValues>,
}

/// A client's parameter values: the pool's defaults and the client's own.
type ClientValues = (Arc<LoginParams>, Vec<(String, String)>);

impl ServerParams {
    fn new(values: foldhash::HashMap<String, String>) -> Self {
        Self {
            values,
            synced: None,
        }
    }

    /// Records a value the server reported or pgvane set.
    pub fn set(&mut self, name: &str, value: &str) {
        self.synced = None;
        self.values.insert(name.to_owned(), value.to_owned());
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The values of `defaults` (unless overridden) and `overrides` this connection does not
    /// have. Empty, and allocation-free, in the common case.
    fn changes<'a>(
        &self,
        defaults: &'a LoginParams,
        overrides: &'a [(String, String)],
    ) -> Vec<&'a (String, String)> {
        defaults
            .tracked
            .iter()
            .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
            .chain(overrides)
            .filter(|(k, v)| self.values.get(k) != Some(v))
            .collect()
    }

    fn synced_with(&self, defaults: &Arc<LoginParams>, overrides: &[(String, String)]) -> bool {
        matches!(&self.synced, Some((d, o)) if Arc::ptr_eq(d, defaults) && o == overrides)
    }
}

impl ServerConn {
    pub fn cancel_target(&self) -> &CancelTarget {
        &self.cancel
    }

    /// Runs a simple-protocol statement whose rows nobody needs, up to its ReadyForQuery.
    /// Returns the transaction status the server reports afterwards.
    pub async fn run(&mut self, sql: &str) -> Result<u8, PoolError> {
        self.run_for_row(sql, None).await
    }

    /// The current values of `names`, of those the server knows.
    pub async fn current_settings(
        &mut self,
        names: &[String],
    ) -> Result<Vec<(String, String)>, PoolError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let columns: Vec<String> = names
            .iter()
            .map(|n| format!("pg_catalog.current_setting({}, true)", quote_literal(n)))
            .collect();
        let mut row = Vec::new();
        self.run_for_row(&format!("SELECT {}", columns.join(", ")), Some(&mut row))
            .await?;
        let known = names
            .iter()
            .zip(row)
            .filter_map(|(n, v)| Some((n.clone(), v?)));
        Ok(known.collect())
    }

    /// Runs `sql` with `$1` bound to `param` (extended protocol, text), returning its first
    /// row, if any.
    pub async fn query_with(
        &mut self,
        sql: &str,
        param: &str,
    ) -> Result<Option<Vec<Option<String>>>, PoolError> {
        use postgres_protocol::message::frontend;
        let mut buf = BytesMut::new();
        frontend::parse("", sql, std::iter::empty(), &mut buf)?;
        let bound = frontend::bind(
            "",
            "",
            std::iter::empty::<i16>(),
            [param],
            |p, out| {
                out.extend_from_slice(p.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            std::iter::empty::<i16>(),
            &mut buf,
        );
        bound.map_err(|_| ProtocolError::Malformed("auth_query parameter"))?;
        frontend::execute("", 1, &mut buf)?;
        frontend::sync(&mut buf);
        self.stream.write_all(&buf).await?;
        let mut first = Vec::new();
        self.read_until_ready(Some(&mut first)).await?;
        Ok((!first.is_empty()).then_some(first))
    }

    /// As [`ServerConn::run`], keeping the first row's values in `row`.
    async fn run_for_row(
        &mut self,
        sql: &str,
        row: Option<&mut Vec<Option<String>>>,
    ) -> Result<u8, PoolError> {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut buf)?;
        self.stream.write_all(&buf).await?;
        self.read_until_ready(row).await
    }

    /// Reads a request's answer up to its ReadyForQuery, keeping the first row's values in
    /// `row`; returns the transaction status, or the error the server sent.
    async fn read_until_ready(
        &mut self,
        mut row: Option<&mut Vec<Option<String>>>,
    ) -> Result<u8, PoolError> {
        let mut error = None;
        loop {
            let m = read_message(&mut self.stream, 1 << 20).await?;
            match m.tag {
                b'D' => {
                    if let Some(row) = row.take() {
                        *row = data_row(&m.body).ok_or(ProtocolError::Malformed("DataRow"))?;
                    }
                }
                b'E' => error = Some((error_message(&m.body), error_code(&m.body))),
                b'S' => {
                    if let Some((k, v)) = crate::protocol::parameter_status(&m.body) {
                        self.params.set(k, v);
                    }
                }
                b'Z' => {
                    let status = m.body.first().copied().unwrap_or(b'I');
                    return match error {
                        Some((message, code)) => Err(PoolError::Query { message, code }),
                        None => Ok(status),
                    };
                }
                _ => {}
            }
        }
    }

    /// Brings the server's parameters to a client's values (its `overrides`, else the
    /// `defaults`) with one round trip, so that no value leaks from one client to the next.
    /// `set_config`, not `SET x TO '...'`: a value is then read as in a startup packet, so
    /// a list (`search_path=a, b`) stays a list rather than one quoted name.
    pub async fn apply_params(
        &mut self,
        defaults: &Arc<LoginParams>,
        overrides: &[(String, String)],
    ) -> Result<(), PoolError> {
        if self.params.synced_with(defaults, overrides) {
            return Ok(());
        }
        let changes = self.params.changes(defaults, overrides);
        if !changes.is_empty() {
            let sets: Vec<String> = changes
                .iter()
                .map(|(k, v)| {
                    let (k, v) = (quote_literal(k), quote_literal(v));
                    format!("pg_catalog.set_config({k}, {v}, false)")
                })
                .collect();
            self.run(&format!("SELECT {}", sets.join(", "))).await?;
            for (k, v) in changes {
                self.params.set(k, v);
            }
        }
        self.params.synced = Some((defaults.clone(), overrides.to_vec()));
        Ok(())
    }

    /// After a reset query (DISCARD ALL), values pgvane set for parameters the server does
    /// not report are back to their defaults, so they are no longer known.
    fn forget_unreported(&mut self) {
        let reported = &self.reported_at_login;
        self.params.synced = None;
        self.params.values.retain(|k, _| reported.contains(k));
    }
}

/// The values of a DataRow's columns (`None` for NULL).
fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut at = 2;
    let mut values = Vec::with_capacity(n.into());
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        values.push(match usize::try_from(len) {
            Ok(len) => {
                let v = body.get(at..at + len)?;
                at += len;
                Some(String::from_utf8_lossy(v).into_owned())
            }
            Err(_) => None,
        });
    }
    Some(values)
}

/// Whether a reset query leaves no prepared statement on the connection.
fn drops_statements(reset_query: &str) -> bool {
    let q = reset_query.trim().trim_end_matches(';').trim_end();
    q.eq_ignore_ascii_case("DISCARD ALL") || q.eq_ignore_ascii_case("DEALLOCATE ALL")
}

/// `E'...'` literal: safe whatever `standard_conforming_strings` is.
fn quote_literal(v: &str) -> String {
    let escaped = v.replace('\\', "\\\\").replace('\'', "''");
    format!("E'{escaped}'")
}

/// A cap over several pools: `max_db_connections` or `max_user_connections`.
#[derive(Debug, Clone, Copy)]
enum Cap {
    Database,
    User,
}

/// Identity of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub backend: String,
    /// Shared with its sessions' and connections' SHOW CLIENTS / SHOW SERVERS entries.
    pub database: Arc<str>,
    pub user: Arc<str>,
}

pub struct Pool {
    pub key: PoolKey,
    /// Replaced on reload (its settings or its user's changed): it takes no new sessions,
    /// its idle connections are closed and the others close as they are released.
    /// Shared with its connections' SHOW SERVERS entries (close_needed).
    retired: Arc<AtomicBool>,
    /// SHOW STATS counters of the pool's database.
    pub stats: Arc<DbStats>,
    /// SHOW LATENCY's histograms, shared with the pool's connections.
    pub latency: Arc<Latency>,
    /// TLS toward PostgreSQL, as when the pool was made.
    server_tls: Option<Arc<ServerTls>>,
    /// SHOW SERVERS' registry, shared by all pools.
    servers: Arc<Registry>,
    backend: Arc<Backend>,
    user: Arc<User>,
    settings: Arc<PoolConfig>,
    /// What the `[[database]]` and `[[user]]` entries make of `settings` for this pool.
    shape: PoolShape,
    /// Slots, idle connections (most recently used last) and waiting clients. Boxed
    /// connections: they move in and out of the queue on every transaction.
    queue: Arc<Queue<Box<ServerConn>>>,
    caps: Vec<(Cap, Arc<Gate>)>,
    /// Clients of this pool waiting for a cap's permit, and their wake-up when a connection
    /// of the pool is released: they take it instead.
    cap_waiting: AtomicUsize,
    released: tokio::sync::Notify,
    /// The pools sharing this one's caps, for closing their idle connections.
    siblings: Weak<Pools>,
    /// Connects in progress to this pool's backend, shared by all its pools.
    connecting: Arc<Gate>,
    /// ParameterStatus values of the first login, shown to clients at their login.
    login_params: Mutex<Option<Arc<LoginParams>>>,
    /// Names of startup parameters the server accepted (bounded by `KNOWN_PARAMS_MAX`).
    known_params: Mutex<Vec<String>>,
    open: AtomicUsize,
    /// Client sessions in this pool (see [`Pool::join`]).
    sessions: AtomicUsize,
    /// When each client now waiting for a cap's permit started to (with the queue's
    /// waiters, SHOW POOLS' cl_waiting and maxwait).
    cap_waits: Mutex<BTreeMap<Instant, usize>>,
    /// Since when no session or lease holds the pool: read and written only by the upkeep
    /// task, once a second, so the data path pays nothing for it.
    unused_since: Mutex<Option<coarsetime::Instant>>,
}

/// Startup parameter names remembered per pool as accepted by the server; a client naming
/// others has them tried on a server connection at its login.
const KNOWN_PARAMS_MAX: usize = 64;

/// How many failed server connections [`Pool::acquire_with`] replaces before giving up: at a
/// crash, every idle connection may be dead, but those that have noticed are skipped anyway.
const STALE_RETRIES: u32 = 3;

/// A client's place among a pool's clients waiting for a cap, from its start to its end.
struct Waiting<'a> {
    waits: &'a Mutex<BTreeMap<Instant, usize>>,
    since: Instant,
}

impl<'a> Waiting<'a> {
    fn new(waits: &'a Mutex<BTreeMap<Instant, usize>>) -> Self {
        let since = Instant::now();
        *waits.lock().expect("pool lock").entry(since).or_default() += 1;
        Self { waits, since }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waits = self.waits.lock().expect("pool lock");
        if let Some(n) = waits.get_mut(&self.since) {
            *n -= 1;
            if *n == 0 {
                waits.remove(&self.since);
            }
        }
    }
}

/// A server connection lent to one client.
pub struct Lease {
    /// Boxed: a connection moves between the idle list, a lease and back on every
    /// transaction, and a pointer is cheaper to move than the connection's few hundred bytes.
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    /// Given back when the lease ends, with the connection if it was released clean.
    slot: Option<Slot>,
}

impl Lease {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until released")
    }

    /// Adds what the connection's last link counted to its database's statistics.
    pub fn record_stats(&mut self) {
        if let Some(conn) = &self.conn {
            self.pool.stats.record(&conn.counts);
        }
    }

    /// Closes the lent connection, which failed, and takes another under the same slot.
    async fn renew(&mut self) -> Result<(), PoolError> {
        if self.conn.take().is_some() {
            self.pool.open.fetch_sub(1, Ordering::Relaxed);
        }
        self.conn = Some(self.pool.connection(None, None).await?);
        Ok(())
    }

    /// Returns a connection whose state is known to be idle and clean.
    pub fn release(mut self) {
        let conn = self.conn.take().expect("released once");
        let kept = self.pool.put_back(conn);
        let slot = self
            .slot
            .take()
            .expect("a lease holds its slot until it ends");
        self.pool.queue.give_back(slot, kept);
    }

    /// Runs the reset query (session mode), then returns the connection if that worked.
    pub async fn reset_and_release(mut self, reset_query: &str) {
        if !reset_query.is_empty() {
            match self.conn().run(reset_query).await {
                Ok(b'I') => self.conn().forget_unreported(),
                Ok(_) | Err(_) => return, // dropped: closed
            }
        }
        // Statements pgvane prepared here for the pool's transaction-mode clients: the
        // session may have deallocated them, or a reset query other than DISCARD ALL left
        // them. Either way the record would no longer be true; with none left it is.
        if drops_statements(reset_query) {
            self.conn().prepared.clear();
        } else if !self.conn().prepared.is_empty() {
            match self.conn().run("DEALLOCATE ALL").await {
                Ok(b'I') => self.conn().prepared.clear(),
                Ok(_) | Err(_) => return,
            }
        }
        self.release();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.open.fetch_sub(1, Ordering::Relaxed);
            debug!(pool = ?self.pool.key, "server connection closed (not released clean)");
        }
        if let Some(slot) = self.slot.take() {
            self.pool.queue.give_back(slot, None);
        }
    }
}

impl Pool {
    pub fn user(&self) -> &Arc<User> {
        &self.user
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    pub fn size(&self) -> usize {
        self.shape.pool_size as usize
    }

    /// A server connection was lent after `wait_us` of waiting for it.
    pub fn assigned(&self, wait_us: u64) {
        self.stats.assigned(wait_us);
        self.latency.record(Measure::Wait, wait_us);
    }

    pub fn shape(&self) -> &PoolShape {
        &self.shape
    }

    /// The mode of this pool's sessions on a listener of mode `listener`: a `[[database]]`
    /// or `[[user]]` entry's `pool_mode` if set.
    pub fn mode_on(&self, listener: ListenerMode) -> ListenerMode {
        self.shape.mode.map_or(listener, ListenerMode::from)
    }

    /// The settings this pool was made with (see [`Pools::reconfigure`]).
    pub fn settings(&self) -> &PoolConfig {
        &self.settings
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Clients whose session is in this pool (SHOW POOLS' cl_active + cl_waiting).
    pub fn clients(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// A client's session joined the pool (at its login, or moved here at a failover).
    pub fn join(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// A client's session left the pool.
    pub fn part(&self) {
        self.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// Clients waiting for a server connection now.
    pub fn waiting_clients(&self) -> usize {
        let for_caps: usize = self.cap_waits.lock().expect("pool lock").values().sum();
        self.queue.waiting().0 + for_caps
    }

    /// How long the longest-waiting client has waited.
    pub fn longest_wait(&self) -> Option<Duration> {
        let for_cap = self
            .cap_waits
            .lock()
            .expect("pool lock")
            .keys()
            .next()
            .map(Instant::elapsed);
        self.queue.waiting().1.max(for_cap)
    }

    /// Closes every idle connection now; returns how many.
    fn close_idle(&self) -> usize {
        let conns = std::mem::take(&mut *self.queue.idle());
        self.open.fetch_sub(conns.len(), Ordering::Relaxed);
        conns.len()
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn idle_connections(&self) -> usize {
        self.queue.idle().len()
    }

    /// Connections lent to clients (or being opened for one).
    pub fn busy_connections(&self) -> usize {
        self.open_connections()
            .saturating_sub(self.idle_connections())
    }

    /// The server's ParameterStatus values for a client's login, logging in once if this
    /// pool has never had a connection.
    pub async fn login_params(self: &Arc<Self>) -> Result<Arc<LoginParams>, PoolError> {
        if let Some(p) = self.login_params.lock().expect("pool lock").clone() {
            return Ok(p);
        }
        let lease = self.acquire().await?;
        lease.release();
        Ok(self
            .login_params
            .lock()
            .expect("pool lock")
            .clone()
            .unwrap_or_default())
    }

    /// Whether the server is known to accept each of a client's startup parameters: those
    /// it reports at login, and those it accepted before. Otherwise they are tried (SET) on
    /// a server connection, so that a login naming a parameter PostgreSQL does not know is
    /// refused as PostgreSQL refuses it, not its first transaction.
    pub async fn check_params(
        self: &Arc<Self>,
        defaults: &Arc<LoginParams>,
        overrides: &[(String, String)],
    ) -> Result<(), PoolError> {
        let is_known =
            |k: &str, known: &[String]| defaults.value(k).is_some() || known.iter().any(|n| n == k);
        {
            let known = self.known_params.lock().expect("pool lock");
            if overrides.iter().all(|(k, _)| is_known(k, &known)) {
                return Ok(());
            }
        }
        self.acquire_with(defaults, overrides).await?.release();
        let mut known = self.known_params.lock().expect("pool lock");
        for (k, _) in overrides {
            if !is_known(k, &known) && known.len() < KNOWN_PARAMS_MAX {
                known.push(k.clone());
            }
        }
        Ok(())
    }

    /// Waits (FIFO) for a slot, then lends the connection released with it, an idle one or
    /// a new one.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, PoolError> {
        // A free slot needs neither a place in the queue nor the clock.
        let (grant, started) = match self.queue.try_take() {
            Some(grant) => (grant, None),
            None => {
                // tokio's clock, as the queue's.
                let started = tokio::time::Instant::now();
                let grant = self
                    .queue
                    .wait(started)
                    .await
                    .ok_or(PoolError::WaitTimeout(self.settings.query_wait_timeout))?;
                if grant.slot == Slot::Reserve {
                    info!(pool = ?self.key, "pool exhausted; using a reserve connection slot");
                }
                (grant, Some(started))
            }
        };
        // Made first: should no connection come, the slot goes back.
        let mut lease = Lease {
            conn: None,
            pool: self.clone(),
            slot: Some(grant.slot),
        };
        lease.conn = Some(self.connection(grant.item, started).await?);
        Ok(lease)
    }

    /// As [`Pool::acquire`], with the connection's parameters brought to a client's values
    /// (see [`ServerConn::apply_params`]). A connection that fails meanwhile (its server
    /// crashed or closed it since its last use) has had nothing of the client's: it is
    /// closed and another one taken under the same slot, so the client keeps its place. A
    /// backend that is down fails the next connect, which the caller reports.
    pub async fn acquire_with(
        self: &Arc<Self>,
        defaults: &Arc<LoginParams>,
        overrides: &[(String, String)],
    ) -> Result<Lease, PoolError> {
        let mut lease = self.acquire().await?;
        if lease.conn().params.synced_with(defaults, overrides) {
            return Ok(lease);
        }
        // Boxed: the common case above stays out of every transaction's future.
        Box::pin(self.set_params(lease, defaults, overrides)).await
    }

    /// The part of [`Pool::acquire_with`] that sets parameters.
    async fn set_params(
        self: &Arc<Self>,
        mut lease: Lease,
        defaults: &Arc<LoginParams>,
        overrides: &[(String, String)],
    ) -> Result<Lease, PoolError> {
        let mut failed = 0;
        loop {
            match lease.conn().apply_params(defaults, overrides).await {
                Err(PoolError::Server(e)) if failed < STALE_RETRIES => {
                    failed += 1;
                    info!(pool = ?self.key, error = %e, "server connection failed before use; taking another");
                    lease.renew().await?;
                }
                done => return done.map(|()| lease),
            }
        }
    }

    /// `released` (the connection released with the slot), else the most recently used
    /// idle connection, if still usable, or a new one; a caller that has waited since
    /// `waited_since` has spent that much of `query_wait_timeout`.
    async fn connection(
        &self,
        mut released: Option<Box<ServerConn>>,
        waited_since: Option<tokio::time::Instant>,
    ) -> Result<Box<ServerConn>, PoolError> {
        loop {
            let candidate = released.take().or_else(|| self.queue.pop_idle());
            let Some(mut conn) = candidate else { break };
            if self.usable(&mut conn).await {
                return Ok(conn);
            }
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        let wait = self.settings.query_wait_timeout;
        let waited = waited_since.map_or(Duration::ZERO, |since| since.elapsed());
        let remaining = (!wait.is_zero()).then(|| wait.saturating_sub(waited));
        // Boxed, as the check in `usable`: rare, and large in every lease's future otherwise.
        Box::pin(self.open_connection(remaining)).await
    }

    /// A connection idle for longer than `server_check_delay` must answer the check query.
    async fn usable(&self, conn: &mut ServerConn) -> bool {
        // An idle server says nothing; readable means it closed or sent a FATAL (its
        // server was shut down or crashed). Checking costs no system call when quiet.
        if !conn.stream.is_quiet() {
            debug!(pool = ?self.key, "idle server connection was closed by the server");
            return false;
        }
        let now = coarse_now();
        if expired(now, conn.created, self.settings.server_lifetime) {
            return false;
        }
        // 0: checked every time, even when the clock has not moved since.
        let delay = self.settings.server_check_delay;
        if !delay.is_zero() && !expired(now, conn.last_used, delay) {
            return true;
        }
        let check = tokio::time::timeout(
            self.settings.server_connect_timeout,
            conn.run(&self.settings.server_check_query),
        );
        match Box::pin(check).await {
            Ok(Ok(b'I')) => true,
            other => {
                debug!(pool = ?self.key, result = ?other.map(|r| r.map(|s| s as char)), "server connection failed its check");
                false
            }
        }
    }

    async fn open_connection(&self, wait: Option<Duration>) -> Result<Box<ServerConn>, PoolError> {
        let started = Instant::now();
        // Waits for a permit within what is left of `wait`.
        let permit = |semaphore: &Arc<Semaphore>| {
            let left = wait.map(|w| w.saturating_sub(started.elapsed()));
            let acquire = semaphore.clone().acquire_owned();
            async move {
                let permit = match left {
                    None => acquire.await.ok(),
                    Some(d) => tokio::time::timeout(d, acquire)
                        .await
                        .ok()
                        .and_then(Result::ok),
                };
                permit.ok_or(PoolError::WaitTimeout(self.settings.query_wait_timeout))
            }
        };
        let mut caps = Vec::with_capacity(self.caps.len());
        for (kind, cap) in &self.caps {
            let got = match cap.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // Full: an idle connection elsewhere under this cap gives its permit up.
                    if let Some(pools) = self.siblings.upgrade() {
                        pools.close_idle_sharing(*kind, &self.key);
                    }
                    // A wait as for a slot, in SHOW POOLS' cl_waiting and maxwait; counted,
                    // so that a connection released meanwhile comes here (or, from another
                    // pool under the cap, closes to free its permit).
                    let _waiting = Waiting::new(&self.cap_waits);
                    let _counted = (Counted::new(&cap.waiting), Counted::new(&self.cap_waiting));
                    loop {
                        tokio::select! {
                            got = permit(&cap.permits) => break got?,
                            () = self.released.notified() => {
                                if let Some(conn) = self.queue.pop_idle() {
                                    return Ok(conn);
                                }
                            }
                        }
                    }
                }
            };
            caps.push(got);
        }
        let _connecting = permit(&self.connecting.permits).await?;
        let backend = &self.backend;
        let connect = async {
            let stream = TcpStream::connect((backend.host.as_str(), backend.port))
                .await
                .map_err(|e| PoolError::Connect {
                    backend: backend.name.clone(),
                    reason: e.to_string(),
                })?;
            let _ = stream.set_nodelay(true);
            let mut stream =
                match &self.server_tls {
                    None => ServerStream::Plain(stream),
                    Some(tls) => tls.connect(stream, &backend.host).await.map_err(|e| {
                        PoolError::Connect {
                            backend: backend.name.clone(),
                            reason: format!("TLS: {e}"),
                        }
                    })?,
                };
            let hello = login_to_server(
                &mut stream,
                &self.user.name,
                &self.shape.dbname,
                self.user.server_credential(),
            )
            .await?;
            Ok::<_, PoolError>((stream, hello))
        };
        let (stream, hello) = tokio::time::timeout(self.settings.server_connect_timeout, connect)
            .await
            .map_err(|_| PoolError::Connect {
                backend: backend.name.clone(),
                reason: format!(
                    "timed out after {:?} (server_connect_timeout)",
                    self.settings.server_connect_timeout
                ),
            })??;
        self.open.fetch_add(1, Ordering::Relaxed);
        debug!(pool = ?self.key, server_pid = hello.process_id, "server connection opened");
        let now = coarse_now();
        let tracked: Vec<(String, String)> = hello
            .params
            .iter()
            .filter(|(k, _)| TRACKED.contains(&k.as_str()))
            .cloned()
            .collect();
        let all = hello.params.clone();
        let entry = self.servers.add(NewEntry {
            user: self.key.user.clone(),
            database: self.key.database.clone(),
            addr: stream.tcp().peer_addr().unwrap_or_else(|_| unspecified()),
            local_addr: stream.tcp().local_addr().unwrap_or_else(|_| unspecified()),
            application_name: Box::default(),
            remote_pid: hello.process_id,
            tls: match &stream {
                ServerStream::Plain(_) => Box::default(),
                ServerStream::Tls(_) => "TLS".into(),
            },
            close_needed: Some(self.retired.clone()),
            socket: None,
        });
        let mut conn = Box::new(ServerConn {
            reported_at_login: hello.params.iter().map(|(k, _)| k.clone()).collect(),
            params: ServerParams::new(hello.params.into_iter().collect()),
            cancel: CancelTarget {
                backend: backend.clone(),
                process_id: hello.process_id,
                secret_key: hello.secret_key,
            },
            stream,
            read_buf: BytesMut::with_capacity(SERVER_READ_BUFFER),
            prepared: ServerStatements::default(),
            counts: LinkCounts {
                latency: Some(self.latency.clone()),
                ..LinkCounts::default()
            },
            entry,
            created: now,
            last_used: now,
            _caps: caps,
        });
        if self.login_params.lock().expect("pool lock").is_none() {
            // The pool's first connection: its values are the pool's defaults, those of
            // the extra parameters too (read here, since the server does not report them).
            let mut tracked = tracked;
            let extra = &self.settings.track_extra_parameters;
            let values = conn.current_settings(extra).await.inspect_err(|_| {
                self.open.fetch_sub(1, Ordering::Relaxed);
            })?;
            for (k, v) in values {
                if !tracked.iter().any(|(t, _)| *t == k) {
                    conn.params.set(&k, &v);
                    tracked.push((k, v));
                }
            }
            let params = Arc::new(LoginParams { all, tracked });
            self.login_params
                .lock()
                .expect("pool lock")
                .get_or_insert(params);
        }
        Ok(conn)
    }

    /// A released connection, if it is to be kept: handed on with its slot.
    fn put_back(&self, mut conn: Box<ServerConn>) -> Option<Box<ServerConn>> {
        if self.backend.is_draining() || self.is_retired() {
            self.open.fetch_sub(1, Ordering::Relaxed);
            debug!(pool = ?self.key, "backend drained or pool replaced by a reload; server connection closed at release");
            return None;
        }
        let now = coarse_now();
        if expired(now, conn.created, self.settings.server_lifetime) {
            self.open.fetch_sub(1, Ordering::Relaxed);
            debug!(pool = ?self.key, "server connection reached server_lifetime; closed");
            return None;
        }
        conn.last_used = now;
        conn.entry.set(State::Idle, 0);
        if self.cap_waiting.load(Ordering::Relaxed) > 0 {
            // A client of this pool waits for a cap: the connection is its.
            self.queue.idle().push(conn);
            self.released.notify_one();
            return None;
        }
        if self
            .caps
            .iter()
            .any(|(_, cap)| cap.waiting.load(Ordering::Relaxed) > 0)
        {
            self.open.fetch_sub(1, Ordering::Relaxed);
            debug!(pool = ?self.key, "server connection closed at release: a client of another pool waits for its cap");
            return None;
        }
        Some(conn)
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime`, keeping
    /// `min_pool_size` open, then opens connections up to `min_pool_size`.
    async fn maintain(self: &Arc<Self>) {
        let s = &self.settings;
        let min = self.shape.min_pool_size as usize;
        {
            let mut idle = self.queue.idle();
            let open = self.open.load(Ordering::Relaxed);
            let mut closable = open.saturating_sub(min);
            let before = idle.len();
            let now = coarse_now();
            let draining = self.backend.is_draining();
            idle.retain(|c| {
                let close = draining
                    || (expired(now, c.last_used, s.server_idle_timeout)
                        || expired(now, c.created, s.server_lifetime))
                        && closable > 0;
                closable -= close as usize;
                !close
            });
            let closed = before - idle.len();
            if closed > 0 {
                self.open.fetch_sub(closed, Ordering::Relaxed);
                debug!(pool = ?self.key, closed, "idle server connections closed");
            }
        }
        while self.open.load(Ordering::Relaxed) < min && !self.backend.is_draining() {
            match self.open_connection(Some(s.server_connect_timeout)).await {
                Ok(conn) => self.queue.idle().insert(0, conn),
                Err(e) => {
                    warn!(pool = ?self.key, error = %e, "cannot open min_pool_size connection");
                    break;
                }
            }
        }
    }
}

/// An address for a socket that cannot tell its own (closed meanwhile).
fn unspecified() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 0))
}

/// One pool's settings where `[[database]]` and `[[user]]` entries may differ from `[pool]`:
/// a user's entry over its database's, over `[pool]`'s, as in PgBouncer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolShape {
    /// The database on the server.
    pub dbname: String,
    pub pool_size: u32,
    pub min_pool_size: u32,
    pub reserve_pool_size: u32,
    pub max_db_connections: u32,
    pub max_user_connections: u32,
    /// Overrides the listener's mode.
    pub mode: Option<PoolMode>,
}

/// The `[[database]]` and `[[user]]` entries, by name.
#[derive(Default)]
struct PoolRules {
    databases: HashMap<String, DatabaseConfig>,
    users: HashMap<String, UserConfig>,
}

impl PoolRules {
    fn new(databases: &[DatabaseConfig], users: &[UserConfig]) -> Self {
        Self {
            databases: databases
                .iter()
                .map(|d| (d.name.clone(), d.clone()))
                .collect(),
            users: users.iter().map(|u| (u.name.clone(), u.clone())).collect(),
        }
    }

    /// The entry for `database`: its own, else the fallback's. `None` either when there are
    /// no entries (any database is served with `[pool]`'s settings) or when it is unknown.
    fn database(&self, database: &str) -> Option<&DatabaseConfig> {
        self.databases
            .get(database)
            .or_else(|| self.databases.get(FALLBACK_DATABASE))
    }

    fn knows(&self, database: &str) -> bool {
        self.databases.is_empty() || self.database(database).is_some()
    }

    fn shape(&self, s: &PoolConfig, database: &str, user: Option<&str>) -> PoolShape {
        let db = self.database(database);
        let user = user.and_then(|u| self.users.get(u));
        let pick = |of_user: Option<u32>, of_db: Option<u32>, default: u32| {
            of_user.or(of_db).unwrap_or(default)
        };
        PoolShape {
            dbname: db
                .and_then(|d| d.dbname.clone())
                .unwrap_or_else(|| database.to_owned()),
            pool_size: pick(
                user.and_then(|u| u.pool_size),
                db.and_then(|d| d.pool_size),
                s.default_pool_size,
            ),
            min_pool_size: pick(None, db.and_then(|d| d.min_pool_size), s.min_pool_size),
            reserve_pool_size: pick(
                user.and_then(|u| u.reserve_pool_size),
                db.and_then(|d| d.reserve_pool_size),
                s.reserve_pool_size,
            ),
            max_db_connections: pick(
                None,
                db.and_then(|d| d.max_db_connections),
                s.max_db_connections,
            ),
            max_user_connections: pick(
                user.and_then(|u| u.max_user_connections),
                None,
                s.max_user_connections,
            ),
            mode: user
                .and_then(|u| u.pool_mode)
                .or(db.and_then(|d| d.pool_mode)),
        }
    }
}

/// A cap over several pools: permits for open connections (or connects in progress), and
/// how many clients wait for one.
struct Gate {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// A count held up while a client waits.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Caps shared by pools, by (name, limit): a reload that changes a limit makes a new cap
/// for the new pools while the retired ones' connections keep the old one's permits.
type Caps = Mutex<HashMap<(String, u32), Arc<Gate>>>;

fn cap_of(caps: &Caps, name: &str, limit: u32) -> Arc<Gate> {
    let new = || {
        Arc::new(Gate {
            permits: Arc::new(Semaphore::new(limit as usize)),
            waiting: AtomicUsize::new(0),
        })
    };
    let mut caps = caps.lock().expect("caps lock");
    caps.entry((name.to_owned(), limit))
        .or_insert_with(new)
        .clone()
}

/// Drops the caps no pool and no connection holds any more.
fn prune(caps: &Caps) {
    caps.lock()
        .expect("caps lock")
        .retain(|_, cap| Arc::strong_count(cap) > 1 || Arc::strong_count(&cap.permits) > 1);
}

/// database → user → pool.
type PoolsOfBackend = HashMap<Arc<str>, HashMap<Arc<str>, Arc<Pool>>>;

/// The clock for server connection ages, read at every lease and release: coarse (a few
/// milliseconds) but a fraction of a precise read's cost, which is plenty for limits counted
/// in seconds (PgBouncer reads a cached time for the same reason). Not the variant that
/// also updates coarsetime's process-wide cache: a store every worker thread would share.
fn coarse_now() -> coarsetime::Instant {
    coarsetime::Instant::now_without_cache_update()
}

/// Whether more than `limit` passed from `since` to `now`; a zero limit never expires.
fn expired(now: coarsetime::Instant, since: coarsetime::Instant, limit: Duration) -> bool {
    !limit.is_zero() && now.duration_since(since) > coarsetime::Duration::from(limit)
}

/// Whether only the pools' map holds `pool` (no session calls it home, no lease is out) and
/// it has no server connection open. Asked under the map's lock, under which new holders
/// are made.
fn held_by_nothing(pool: &Arc<Pool>) -> bool {
    Arc::strong_count(pool) == 1 && pool.open_connections() == 0
}

/// Every pool, created on first use.
pub struct Pools {
    settings: ArcSwap<PoolConfig>,
    /// backend → database → user → pool: looked up by `&str` per transaction, without
    /// building a key.
    pools: Mutex<HashMap<String, PoolsOfBackend>>,
    db_caps: Caps,
    user_caps: Caps,
    /// backend → its `server_connect_concurrency` permits.
    connecting: Caps,
    rules: ArcSwap<PoolRules>,
    /// TLS toward PostgreSQL for new pools (a change replaces the pools: see reload).
    server_tls: ArcSwapOption<ServerTls>,
    /// SHOW STATS counters, per database.
    pub stats: Stats,
    /// Open server connections, for SHOW SERVERS.
    pub servers: Arc<Registry>,
}

impl Pools {
    pub fn new(
        settings: PoolConfig,
        databases: &[DatabaseConfig],
        users: &[UserConfig],
    ) -> Arc<Self> {
        Arc::new(Self {
            settings: ArcSwap::from_pointee(settings),
            pools: Mutex::default(),
            db_caps: Mutex::default(),
            user_caps: Mutex::default(),
            connecting: Mutex::default(),
            rules: ArcSwap::from_pointee(PoolRules::new(databases, users)),
            server_tls: ArcSwapOption::empty(),
            stats: Stats::default(),
            servers: Arc::default(),
        })
    }

    /// The pool settings in force (a pool keeps those it was made with).
    pub fn settings(&self) -> Arc<PoolConfig> {
        self.settings.load_full()
    }

    /// TLS toward PostgreSQL for the pools made from now on.
    pub fn set_server_tls(&self, tls: Option<Arc<ServerTls>>) {
        self.server_tls.store(tls);
    }

    /// Whether clients may log in to `database`: any, unless `[[database]]` entries exist
    /// and none (nor `*`) names it.
    pub fn knows_database(&self, database: &str) -> bool {
        self.rules.load().knows(database)
    }

    /// The settings pools of `database` get, before any user's entry (SHOW DATABASES).
    pub fn database_shape(&self, database: &str) -> PoolShape {
        self.rules
            .load()
            .shape(&self.settings.load(), database, None)
    }

    /// The `[[database]]` entries' names, `*` aside.
    pub fn listed_databases(&self) -> Vec<String> {
        let rules = self.rules.load();
        let names = rules.databases.keys().filter(|n| *n != FALLBACK_DATABASE);
        names.cloned().collect()
    }

    /// Takes a reloaded `[pool]` section and `[[database]]` and `[[user]]` entries: every
    /// pool whose settings, shape or user secret changed is retired (its idle connections
    /// closed now, the others as they are released) and replaced by a new one at its next
    /// use; sessions move to it at their next transaction. Returns how many were retired.
    pub fn reconfigure(
        &self,
        settings: &PoolConfig,
        databases: &[DatabaseConfig],
        users: &[UserConfig],
        store: &UserStore,
    ) -> usize {
        let settings_changed = **self.settings.load() != *settings;
        let rules = Arc::new(PoolRules::new(databases, users));
        // Stored first: a pool made meanwhile is made with the new settings.
        self.settings.store(Arc::new(settings.clone()));
        self.rules.store(rules.clone());
        let retired = self.retire(|_, pool| {
            let shape = rules.shape(settings, &pool.key.database, Some(&pool.key.user));
            settings_changed || shape != pool.shape || !store.has_same(pool.user())
        });
        for caps in [&self.db_caps, &self.user_caps, &self.connecting] {
            prune(caps);
        }
        retired
    }

    /// PgBouncer's RECONNECT: the pools of `database` (all with `None`) are replaced; each
    /// server connection closes when released, and sessions take new ones from the next
    /// transaction on. Returns how many pools were replaced.
    pub fn reconnect(&self, database: Option<&str>) -> usize {
        self.retire(|_, pool| database.is_none_or(|d| *pool.key.database == *d))
    }

    /// Retires the pools of backends not in `backends` (removed or moved by a reload).
    pub fn retire_backends_not_in(&self, backends: &[Arc<Backend>]) -> usize {
        self.retire(|_, pool| !backends.iter().any(|b| Arc::ptr_eq(b, pool.backend())))
    }

    /// Retires every pool `stale` says so of (given its user's name): out of the map, its
    /// idle connections closed, the others closed as they are released.
    fn retire(&self, stale: impl Fn(&str, &Arc<Pool>) -> bool) -> usize {
        let mut retired = Vec::new();
        {
            let mut pools = self.pools.lock().expect("pools lock");
            for dbs in pools.values_mut() {
                for users in dbs.values_mut() {
                    users.retain(|name, pool| {
                        let keep = !stale(name, pool);
                        if !keep {
                            retired.push(pool.clone());
                        }
                        keep
                    });
                }
                dbs.retain(|_, users| !users.is_empty());
            }
            pools.retain(|_, dbs| !dbs.is_empty());
        }
        for pool in &retired {
            pool.retired.store(true, Ordering::Relaxed);
            pool.close_idle();
        }
        retired.len()
    }

    /// The pool of `user` on `database` at `backend`.
    pub fn get(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        user: &Arc<User>,
        database: &str,
    ) -> Arc<Pool> {
        let mut pools = self.pools.lock().expect("pools lock");
        let found = pools
            .get(&backend.name)
            .and_then(|dbs| dbs.get(database))
            .and_then(|users| users.get(user.name.as_str()));
        if let Some(p) = found {
            return p.clone();
        }
        let key = PoolKey {
            backend: backend.name.clone(),
            database: database.into(),
            user: user.name.as_str().into(),
        };
        let settings = self.settings.load_full();
        let shape = self
            .rules
            .load()
            .shape(&settings, database, Some(&user.name));
        let mut caps = Vec::new();
        if shape.max_db_connections > 0 {
            let limit = shape.max_db_connections;
            caps.push((Cap::Database, cap_of(&self.db_caps, database, limit)));
        }
        if shape.max_user_connections > 0 {
            let limit = shape.max_user_connections;
            caps.push((Cap::User, cap_of(&self.user_caps, &user.name, limit)));
        }
        let connecting = cap_of(
            &self.connecting,
            &backend.name,
            settings.server_connect_concurrency,
        );
        let pool = Arc::new(Pool {
            key: key.clone(),
            retired: Arc::default(),
            stats: self.stats.of(database),
            latency: Arc::default(),
            server_tls: self.server_tls.load_full(),
            servers: self.servers.clone(),
            backend: backend.clone(),
            user: user.clone(),
            settings: settings.clone(),
            queue: Arc::new(Queue::new(Limits {
                size: shape.pool_size as usize,
                reserve: shape.reserve_pool_size as usize,
                reserve_after: settings.reserve_pool_timeout,
                wait_limit: Some(settings.query_wait_timeout).filter(|d| !d.is_zero()),
            })),
            shape,
            caps,
            siblings: Arc::downgrade(self),
            connecting,
            login_params: Mutex::default(),
            known_params: Mutex::default(),
            open: AtomicUsize::new(0),
            cap_waiting: AtomicUsize::new(0),
            released: tokio::sync::Notify::new(),
            sessions: AtomicUsize::new(0),
            cap_waits: Mutex::default(),
            unused_since: Mutex::default(),
        });
        pools
            .entry(key.backend)
            .or_default()
            .entry(key.database)
            .or_default()
            .insert(key.user, pool.clone());
        pool
    }

    /// Closes the longest-idle connection of a pool other than `key`'s under the same `cap`
    /// (same database, or same user), which frees a permit of that cap.
    fn close_idle_sharing(&self, cap: Cap, key: &PoolKey) {
        let shares = |p: &Pool| match cap {
            Cap::Database => p.key.database == key.database,
            Cap::User => p.key.user == key.user,
        };
        for pool in self.all().iter().filter(|p| p.key != *key && shares(p)) {
            let mut idle = pool.queue.idle();
            if !idle.is_empty() {
                // Oldest first: idle connections are kept most recently used last.
                drop(idle.remove(0));
                pool.open.fetch_sub(1, Ordering::Relaxed);
                debug!(pool = ?pool.key, cap = ?cap, for_pool = ?key, "idle server connection closed to free a capped slot");
                return;
            }
        }
    }

    /// Closes the idle connections of every pool on `backend`.
    pub fn close_idle(&self, backend: &str) -> usize {
        let mut closed = 0;
        for pool in self.all().iter().filter(|p| p.key.backend == backend) {
            closed += pool.close_idle();
        }
        closed
    }

    /// Drains a backend's idle connections the moment its role in the routing table
    /// changes: they were opened for what it no longer is (or it is gone).
    pub async fn follow_topology(
        self: Arc<Self>,
        topology: Arc<Topology>,
        stop: CancellationToken,
    ) {
        let mut changes = topology.subscribe();
        let mut prev = topology.snapshot();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            let next = topology.snapshot();
            for new in &next.backends {
                let before = prev
                    .backends
                    .iter()
                    .find(|old| Arc::ptr_eq(&old.backend, &new.backend));
                let Some(old) = before else { continue };
                if old.serving != new.serving {
                    let closed = self.close_idle(&new.backend.name);
                    info!(backend = %new.backend.name, role = new.role.as_str(), serving = new.serving.as_str(), was_serving = old.serving.as_str(), closed, "backend serves another target now; its idle server connections closed");
                }
            }
            prev = next;
        }
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().expect("pools lock");
        pools
            .values()
            .flat_map(|dbs| dbs.values())
            .flat_map(|users| users.values())
            .cloned()
            .collect()
    }

    /// Runs pool upkeep every second, and closes a statistics period every `STATS_PERIOD`,
    /// until `stop`.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut period = tokio::time::interval(STATS_PERIOD);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = period.tick() => {
                    self.stats.roll();
                    for pool in self.all() {
                        pool.latency.roll();
                    }
                }
                _ = tick.tick() => {
                    for pool in self.all() {
                        pool.maintain().await;
                    }
                    self.free_unused();
                }
            }
        }
    }

    /// Frees the pools that no session or lease has held for `limit` and that have no
    /// server connection open (PgBouncer's autodb_idle_timeout), and the caps of databases
    /// and users no pool has any more.
    fn free_unused(&self) {
        let limit = self.settings.load().autodb_idle_timeout;
        if limit.is_zero() {
            return;
        }
        let now = coarse_now();
        let mut freed = 0;
        let mut pools = self.pools.lock().expect("pools lock");
        for dbs in pools.values_mut() {
            for users in dbs.values_mut() {
                users.retain(|_, pool| {
                    let unused = held_by_nothing(pool);
                    let mut since = pool.unused_since.lock().expect("pool lock");
                    if !unused {
                        *since = None;
                        return true;
                    }
                    let keep = !expired(now, *since.get_or_insert(now), limit);
                    freed += usize::from(!keep);
                    keep
                });
            }
            dbs.retain(|_, users| !users.is_empty());
        }
        pools.retain(|_, dbs| !dbs.is_empty());
        drop(pools);
        if freed > 0 {
            debug!(freed, "unused pools freed (autodb_idle_timeout)");
            for caps in [&self.db_caps, &self.user_caps] {
                prune(caps);
            }
        }
    }

    /// Whether any pool serves `database`.
    pub fn serves_database(&self, database: &str) -> bool {
        let pools = self.pools.lock().expect("pools lock");
        pools.values().any(|dbs| dbs.contains_key(database))
    }

    /// Frees `pool` at once if nothing else holds it and it has no server connection: a
    /// login the server refused (an unknown database, say) leaves no pool behind.
    pub fn free_if_unused(&self, pool: Arc<Pool>) {
        let key = pool.key.clone();
        drop(pool);
        let mut pools = self.pools.lock().expect("pools lock");
        let Some(dbs) = pools.get_mut(&key.backend) else {
            return;
        };
        let Some(users) = dbs.get_mut(&key.database) else {
            return;
        };
        if users.get(&key.user).is_some_and(held_by_nothing) {
            users.remove(&key.user);
            if users.is_empty() {
                dbs.remove(&key.database);
            }
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("key", &self.key)
            .field("shape", &self.shape)
            .field("open", &self.open_connections())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted_for_any_standard_conforming_strings() {
        assert_eq!(quote_literal("UTC"), "E'UTC'");
        assert_eq!(quote_literal("it's"), "E'it''s'");
        assert_eq!(quote_literal("a\\'; DROP"), "E'a\\\\''; DROP'");
    }

    #[test]
    fn only_discard_all_and_deallocate_all_drop_every_statement() {
        for q in ["DISCARD ALL", "discard all;", " DEALLOCATE ALL ; "] {
            assert!(drops_statements(q), "{q}");
        }
        for q in ["", "RESET ALL", "DISCARD PLANS", "DEALLOCATE pgvane_1"] {
            assert!(!drops_statements(q), "{q}");
        }
    }
}
