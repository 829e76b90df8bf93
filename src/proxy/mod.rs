//! The data path: accept, route, pump bytes.
//!
//! Each listener accepts clients and hands each one to its mode's handler:
//! [`passthrough`] relays bytes untouched; [`pooled`] authenticates the client and lends it
//! pooled server connections. Both read the routing table only through
//! [`Topology::snapshot`]; nothing here knows about config files or admin concerns.

mod auth_query;
mod cancel;
pub mod client_io;
pub mod migrate;
mod passthrough;
mod pooled;
pub mod prepared;
pub mod session_state;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

pub use cancel::CancelRegistry;

use crate::admin::console::Console;
use crate::auth::UserStore;
use crate::config::{Balance, LimitsConfig, ListenerConfig};
use crate::error::ClientError;
use crate::limits::{AddressGuard, AddressLimits, LogBudget, UserLimits, REFUSAL_LIMIT};
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::protocol::{read_startup, ProtocolError, StartupPacket, PROTOCOL_MAJOR_3};
use crate::reload::ReloadHandle;
use crate::tls::ListenerTls;
use crate::topology::{Backend, RoutingTable, Topology};
use client_io::ClientIo;

/// A listener's routing policy plus its round-robin cursor and its per-address limits.
pub struct Route {
    config: ListenerConfig,
    cursor: AtomicUsize,
    /// The listener's limits over the `[limits]` defaults, and their counts.
    limits: LimitsConfig,
    addresses: Arc<AddressLimits>,
    /// Pooled listeners with TLS: the certificate new handshakes get.
    tls: Option<Arc<ListenerTls>>,
}

impl Route {
    /// `limits`: the `[limits]` defaults, under the listener's own.
    pub fn new(
        config: ListenerConfig,
        limits: &LimitsConfig,
        tls: Option<Arc<ListenerTls>>,
    ) -> Self {
        let limits = config.limits.over(limits);
        Self {
            addresses: Arc::new(AddressLimits::new(&limits)),
            limits,
            config,
            cursor: AtomicUsize::new(0),
            tls,
        }
    }

    /// The route a reload makes of this one: the per-address counts go on unless the
    /// limits themselves changed.
    pub fn succeeding(
        &self,
        config: ListenerConfig,
        limits: &LimitsConfig,
        tls: Option<Arc<ListenerTls>>,
    ) -> Self {
        let next = Self::new(config, limits, tls);
        match next.limits == self.limits {
            true => Self {
                addresses: self.addresses.clone(),
                ..next
            },
            false => next,
        }
    }

    pub fn config(&self) -> &ListenerConfig {
        &self.config
    }

    /// Backends to try for one client, in order: the balancing choice first, then the other
    /// candidates as fallbacks if connecting fails. Allocation-free: this runs per pooled
    /// transaction.
    fn attempt_order<'t>(&self, table: &'t RoutingTable) -> impl Iterator<Item = usize> + 't {
        let c = &self.config;
        let candidates = table.candidates(c.target, c.fallback_to_primary);
        let n = candidates.len();
        // Rotating the start also spreads ties evenly under least-connections.
        let start = match n {
            0 | 1 => 0,
            _ => self.cursor.fetch_add(1, Ordering::Relaxed) % n,
        };
        let rotated = move || (0..n).map(move |k| (start + k) % n);
        let first = match c.balance {
            Balance::LeastConn => rotated()
                .min_by_key(|&j| table.backends[candidates[j]].backend.active_sessions())
                .unwrap_or(start),
            Balance::RoundRobin => start,
        };
        std::iter::once(first)
            .chain(rotated().filter(move |&j| j != first))
            .take(n)
            .map(move |j| candidates[j])
    }

    /// A login through this listener from `peer` failed: counted toward the address's
    /// lockout (see `limits.ip_auth_failures`).
    fn auth_failed(&self, peer: SocketAddr) {
        self.addresses.auth_failed(peer.ip());
    }

    fn no_backend(&self) -> ClientError {
        ClientError::NoBackend {
            listener: self.config.name.clone(),
            target: self.config.target,
        }
    }

    /// Resolves when backend `i` no longer qualifies for this route's target. A role change
    /// that keeps it qualified (e.g. a replica listener's fallback primary) re-arms the wait.
    async fn until_role_lost(&self, topology: &Topology, i: usize, mut lost: CancellationToken) {
        let c = &self.config;
        loop {
            lost.cancelled().await;
            let table = topology.snapshot();
            if !table.qualifies(i, c.target, c.fallback_to_primary) {
                return;
            }
            lost = table.backends[i].lost.clone();
        }
    }
}

/// How one attempt on a backend failed.
enum Attempt {
    /// The backend could not be reached or is not taking connections: report it, and try
    /// another one or wait for the routing table to change.
    Unreachable(ClientError),
    /// Any other failure: give up.
    Fatal(ClientError),
}

/// A backend an attempt succeeded on, with what the attempt produced. It keeps the routing
/// table it was chosen from rather than clones of the backend's entry: one reference count
/// per transaction instead of several, all on lines every worker thread shares.
struct Chosen<T> {
    index: usize,
    table: Arc<RoutingTable>,
    value: T,
}

/// What ends a hold early: the client hung up or cancelled (see [`watch_client`]). Made
/// only once a wait begins, so that the common case allocates nothing.
type Abandon<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Resolves when `client` hangs up (end of stream, or an error). What it sends meanwhile is
/// read into `buf` (up to `limit` bytes, after which the watch stops), not lost: the caller
/// passes it on once its work goes ahead.
///
/// It waits on the socket's own reader waker slot (`poll_read_ready`), free while the
/// client's work waits: `readable()` would join and leave the socket's waiter list under
/// its lock, on nearly every transaction when many clients share a small pool.
pub(crate) async fn watch_client(client: &TcpStream, buf: &mut BytesMut, limit: usize) {
    loop {
        if buf.len() >= limit {
            return std::future::pending().await;
        }
        if std::future::poll_fn(|cx| client.poll_read_ready(cx))
            .await
            .is_err()
        {
            return;
        }
        buf.reserve(4096);
        match client.try_read_buf(buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// How often a held client tries the backends that failed it while the routing table stays
/// as it is.
const UNREACHABLE_RETRY: Duration = Duration::from_millis(250);

/// Most bytes a held client's watch reads ahead before it stops watching.
const HELD_READ_AHEAD: usize = 64 * 1024;

/// The watch made by `make` at the first wait, then the same one.
fn watch<'a, 'b>(
    make: &mut Option<impl FnOnce() -> Abandon<'a>>,
    made: &'b mut Option<Abandon<'a>>,
) -> &'b mut Abandon<'a> {
    if let Some(make) = make.take() {
        return made.insert(make());
    }
    made.as_mut().expect("made at the first wait")
}

/// The watch of a held client (see [`watch_client`]), for [`Route::with_backend`].
fn watching<'a, C: ClientIo>(client: &'a C, buf: &'a mut BytesMut) -> impl FnOnce() -> Abandon<'a> {
    move || Box::pin(client.watch(buf, HELD_READ_AHEAD))
}

impl Route {
    /// Runs `attempt` on the backends this route offers, in order, until one succeeds. While
    /// the target has no backend, or every backend offered failed, waits for the routing
    /// table to change, up to `hold` in all (`failover_hold_timeout`): a failover then costs
    /// clients a pause instead of an error. A wait (for the table, or inside an attempt:
    /// a pool's queue, a connect) also ends when what `abandon` makes resolves (the client
    /// gave up): the work is dropped, never sent, and `ClientError::Abandoned` returned.
    async fn with_backend<'a, T, F, Fut>(
        &self,
        shared: &Shared,
        mut attempt: F,
        abandon: impl FnOnce() -> Abandon<'a>,
    ) -> Result<Chosen<T>, ClientError>
    where
        F: FnMut(&Arc<Backend>) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let mut abandon = Some(abandon);
        let mut abandoned: Option<Abandon<'a>> = None;
        let topology = &shared.topology;
        // Only waits for the routing table count as holding (not, say, a pool's queue), and
        // the hold limit counts from the first: the common case never reads the clock.
        let mut held: Option<Held> = None;
        // Subscribed only once a wait is needed: the common case never waits.
        let mut changes: Option<watch::Receiver<u64>> = None;
        let mut last_error = None;
        loop {
            let mut failed = false;
            if let Some(c) = &mut changes {
                c.borrow_and_update();
            }
            let table = topology.snapshot();
            let mut won = None;
            for i in self.attempt_order(&table) {
                let view = &table.backends[i];
                // An attempt that waits (for a pool's server connection, a connect) is
                // watched as a hold is: the watch is made at its first wait only.
                let attempted = {
                    let mut attempting = std::pin::pin!(attempt(&view.backend));
                    std::future::poll_fn(|cx| {
                        if let Poll::Ready(done) = attempting.as_mut().poll(cx) {
                            return Poll::Ready(Some(done));
                        }
                        watch(&mut abandon, &mut abandoned)
                            .as_mut()
                            .poll(cx)
                            .map(|()| None)
                    })
                    .await
                };
                let Some(attempted) = attempted else {
                    // Counted only after a hold: a client that leaves while queued, or a
                    // port probe that closes during the connect, was never held.
                    if held.is_some() {
                        shared.metrics.held_abandoned.inc();
                    }
                    return Err(ClientError::Abandoned);
                };
                match attempted {
                    Ok(value) => {
                        won = Some((i, value));
                        break;
                    }
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(Attempt::Unreachable(e)) => {
                        // Once per client: a held client retries every UNREACHABLE_RETRY.
                        if held.is_none() {
                            warn!(listener = %self.config.name, backend = %view.backend.name, error = %e, "backend unreachable; holding the client");
                        }
                        topology.report_failure(&view.backend);
                        last_error = Some(e);
                        failed = true;
                    }
                }
            }
            if let Some((index, value)) = won {
                if let Some(h) = held {
                    let waited = h.since.elapsed();
                    let backend = &table.backends[index].backend;
                    info!(listener = %self.config.name, backend = %backend.name, ?waited, "held until a backend was available");
                }
                return Ok(Chosen {
                    index,
                    table,
                    value,
                });
            }
            let deadline = held.get_or_insert_with(|| Held::new(&shared.metrics)).since
                + shared.general.load().failover_hold_timeout;
            let changes = match &mut changes {
                Some(c) => c,
                None => {
                    let c = changes.insert(topology.subscribe());
                    // A table published since the snapshot above: retry at once.
                    if *c.borrow_and_update() != table.generation {
                        continue;
                    }
                    c
                }
            };
            drop(table);
            // Backends that failed are tried again even if the table stays as it is: one
            // back before its checks marked it down (a quick restart) serves at once.
            let now = Instant::now();
            let wake = match failed {
                true => deadline.min(now + UNREACHABLE_RETRY),
                false => deadline,
            };
            // Past the hold (or none allowed): no wait, and no watch of the client.
            let woken = if now >= deadline {
                None
            } else {
                let gave_up = watch(&mut abandon, &mut abandoned);
                let timed = Box::pin(tokio::time::timeout_at(wake.into(), changes.changed()));
                tokio::select! {
                    woken = timed => Some(woken),
                    _ = gave_up => {
                        shared.metrics.held_abandoned.inc();
                        return Err(ClientError::Abandoned);
                    }
                }
            };
            match woken {
                Some(Ok(Ok(()))) => {}
                Some(Err(_)) if wake < deadline => {}
                _ => {
                    shared.metrics.hold_timeouts.inc();
                    return Err(last_error.unwrap_or_else(|| self.no_backend()));
                }
            }
        }
    }
}

/// A client waiting for a backend, counted in the metrics while it waits (also when it
/// hangs up meanwhile: the guard is dropped with the future).
struct Held<'a> {
    since: Instant,
    metrics: &'a Metrics,
}

impl<'a> Held<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.held_clients.inc();
        metrics.held_total.inc();
        Self {
            since: Instant::now(),
            metrics,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.metrics.held_clients.dec();
        let waited = self.since.elapsed().as_secs_f64();
        self.metrics.hold_seconds.observe(waited);
    }
}

/// PgBouncer's PAUSE: while it holds a database, new transactions (and new passthrough
/// connections, for a global pause) wait; running ones go on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Pause {
    #[default]
    Off,
    All,
    Databases(BTreeSet<String>),
}

impl Pause {
    /// Whether new work on `database` waits. Passthrough sessions pass `None`: pgvane does
    /// not read their database, so only a global pause holds them.
    pub fn holds(&self, database: Option<&str>) -> bool {
        match self {
            Pause::Off => false,
            Pause::All => true,
            Pause::Databases(dbs) => database.is_some_and(|d| dbs.contains(d)),
        }
    }
}

/// The PAUSE state, with a lock-free flag saying whether anything is paused: every
/// transaction asks, and reading the watch channel takes its read lock, a write to a cache
/// line all worker threads share.
pub struct PauseState {
    state: watch::Sender<Pause>,
    on: AtomicBool,
}

impl Default for PauseState {
    fn default() -> Self {
        Self {
            state: watch::channel(Pause::Off).0,
            on: AtomicBool::new(false),
        }
    }
}

impl PauseState {
    /// Changes the state with `f`, which returns whether it changed anything.
    pub fn modify(&self, f: impl FnOnce(&mut Pause) -> bool) -> bool {
        let changed = self.state.send_if_modified(f);
        let on = *self.state.borrow() != Pause::Off;
        self.on.store(on, Ordering::SeqCst);
        changed
    }

    /// Whether anything is paused, without the channel's lock.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    pub fn borrow(&self) -> watch::Ref<'_, Pause> {
        self.state.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Pause> {
        self.state.subscribe()
    }
}

/// What every client handler needs, shared by all listeners.
pub struct Shared {
    pub topology: Arc<Topology>,
    pub pools: Arc<Pools>,
    /// Users of the pooled listeners; replaced on reload (sessions keep the users they
    /// logged in as).
    pub users: ArcSwap<UserStore>,
    pub cancels: Arc<CancelRegistry>,
    /// `max_client_conn` permits; a client holds one for its whole connection.
    pub client_slots: Arc<Semaphore>,
    /// Over-limit clients being answered (see `limits::REFUSALS_IN_FLIGHT`).
    pub refusals: Arc<Semaphore>,
    /// What refused and broken clients may log.
    pub refusal_log: LogBudget,
    /// Per-user and per-database limits of pooled logins; `None` when none is set.
    pub user_limits: ArcSwapOption<UserLimits>,
    /// `general` settings the data path reads; replaced on reload.
    pub general: ArcSwap<ClientSettings>,
    /// Set by PAUSE and RESUME (admin API, console, signals).
    pub paused: PauseState,
    /// Who may use the admin console, and what it shows of the configuration.
    pub console: Console,
    /// Asks for a configuration reload (console RELOAD, `POST /reload`).
    pub reloads: ReloadHandle,
    /// Asks for a shutdown (console SHUTDOWN).
    pub shutdowns: tokio::sync::mpsc::Sender<crate::admin::Shutdown>,
    /// Databases DISABLE refuses new clients on (pooled listeners).
    pub disabled: crate::admin::Disabled,
    /// Open pooled sessions, for SHOW CLIENTS.
    pub clients: crate::registry::Registry,
    /// Idle sessions moving to an upgrade's new process.
    pub emigration: migrate::Emigration,
    pub metrics: Arc<Metrics>,
}

/// The `general` settings that clients meet, as in force now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientSettings {
    pub max_client_conn: u32,
    pub client_login_timeout: Duration,
    pub failover_hold_timeout: Duration,
}

impl ClientSettings {
    pub fn of(general: &crate::config::GeneralConfig) -> Self {
        Self {
            max_client_conn: general.max_client_conn,
            client_login_timeout: general.client_login_timeout,
            failover_hold_timeout: general.failover_hold_timeout,
        }
    }
}

impl Shared {
    pub fn client_login_timeout(&self) -> Duration {
        self.general.load().client_login_timeout
    }

    pub fn max_client_conn(&self) -> u32 {
        self.general.load().max_client_conn
    }

    /// Waits while a PAUSE holds `database`.
    async fn wait_resumed(&self, database: Option<&str>) {
        if !self.paused.is_on() || !self.paused.borrow().holds(database) {
            return;
        }
        let mut paused = self.paused.subscribe();
        // Err only if the sender is gone, which it never is while sessions run.
        let _ = paused.wait_for(|p| !p.holds(database)).await;
    }
}

/// Accepts clients until `stop_accepting` fires; sessions run on `sessions`. Each client
/// takes the route in force when it connects (a reload replaces it).
pub async fn serve(
    listener: TcpListener,
    routes: Arc<ArcSwap<Route>>,
    shared: Arc<Shared>,
    stop_accepting: CancellationToken,
    sessions: TaskTracker,
) {
    let name = routes.load().config.name.clone();
    let clients = shared.metrics.clients.with_label_values(&[&name]);
    loop {
        let (client, peer) = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    if let Some(not_logged) = shared.refusal_log.take() {
                        warn!(listener = %name, error = %e, not_logged, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = client.set_nodelay(true);
        let route = routes.load_full();
        // A debug-level span: at the default level it costs an idle client nothing, and the
        // info-level events name the client themselves.
        let span = tracing::debug_span!("session", listener = %name, client = %peer);
        // Full: a pooled listener still takes an admin console login, in a reserved slot.
        let console_slot = route.config.mode.is_pooled();
        let admission = match admit(&route, &shared, peer, &clients, console_slot) {
            Ok(admission) => admission,
            Err((err, limit)) => {
                turn_away(client, peer, err, limit, &shared, &sessions, span);
                continue;
            }
        };
        let (route, shared) = (route.clone(), shared.clone());
        if route.config.mode.is_pooled() && route.tls.is_some() {
            let session = pooled::handle_tls(client, peer, route, shared, admission);
            sessions.spawn(session.instrument(span));
        } else if route.config.mode.is_pooled() {
            // One task type per mode (a task is as large as its largest state), spawned with
            // no wrapping future: it is what every idle client costs.
            let session = pooled::handle(client, peer, route, shared, admission);
            if span.is_disabled() {
                sessions.spawn(session);
            } else {
                sessions.spawn(session.instrument(span));
            }
        } else {
            let session = async move {
                passthrough::handle(client, peer, &route, &shared).await;
                drop(admission);
            };
            sessions.spawn(session.instrument(span));
        }
    }
}

/// Admits a client of `route` from `peer` under its address's limits and max_client_conn
/// (with `console_slot`, past it in a slot reserved for admin console logins), counted in
/// `clients`; or says which limit refuses it.
fn admit(
    route: &Route,
    shared: &Shared,
    peer: SocketAddr,
    clients: &prometheus::IntGauge,
    console_slot: bool,
) -> Result<Admission, (ClientError, &'static str)> {
    let address = admit_address(&route.addresses, peer)
        .map_err(|refusal| (ClientError::Limited(refusal), refusal.label()))?;
    let admitted = match shared.client_slots.clone().try_acquire_owned() {
        Ok(slot) => Some((slot, false)),
        Err(_) if console_slot => {
            let reserved = shared.console.reserved.clone().try_acquire_owned();
            reserved.ok().map(|slot| (slot, true))
        }
        Err(_) => None,
    };
    let Some((slot, reserved)) = admitted else {
        let err = ClientError::TooManyClients(shared.max_client_conn());
        return Err((err, "max_client_conn"));
    };
    Ok(Admission {
        _slot: slot,
        reserved,
        _open: ClientGauge::open(clients),
        _address: address.map(Box::new),
    })
}

/// Takes over a session an upgrade's old process sent (see [`migrate`]): it goes on on
/// `route_of` its listener, admitted as a new client would be. A session that cannot go on
/// here (its listener gone or no longer pooled, a limit) is told why and closed.
pub fn adopt(
    (state, socket): crate::upgrade::Emigrant,
    route_of: impl Fn(&str) -> Option<Arc<Route>>,
    shared: &Arc<Shared>,
    sessions: &TaskTracker,
) {
    let migrant: migrate::Migrant = match serde_json::from_slice(&state) {
        Ok(m) => m,
        Err(e) => {
            return warn!(error = %e, "unreadable session state from the old process; its client is disconnected")
        }
    };
    let client = std::net::TcpStream::from(socket);
    let client = match client
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(client))
    {
        Ok(c) => c,
        Err(e) => return warn!(error = %e, "cannot serve a client socket from the old process"),
    };
    let peer = client
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let admitted = match route_of(&migrant.listener) {
        Some(route) if route.config.mode.is_pooled() => {
            let clients = shared
                .metrics
                .clients
                .with_label_values(&[&route.config.name]);
            let admitted = admit(&route, shared, peer, &clients, false);
            admitted.map(|a| (route, a)).map_err(|(err, _)| err)
        }
        _ => Err(ClientError::ListenerGone(migrant.listener.clone())),
    };
    let span = tracing::debug_span!("session", listener = %migrant.listener, client = %peer);
    match admitted {
        Ok((route, admission)) => {
            let session = pooled::adopt(client, migrant, route, shared.clone(), admission);
            sessions.spawn(session.instrument(span));
        }
        Err(err) => {
            info!(client = %peer, error = %err, "a session from the old process cannot go on here; its client is told why");
            let shared = shared.clone();
            let told = async move {
                let mut client = client;
                send_error(&mut client, &err, &shared.metrics).await;
            };
            sessions.spawn(told.instrument(span));
        }
    }
}

/// What an admitted client holds until its session ends: its place under max_client_conn,
/// its count in the listener's gauge and (with `ip_max_connections`) among its address's
/// connections (boxed: idle sessions stay small when no such limit is set).
pub struct Admission {
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// The slot is one of the console's reserved ones: only an admin console login may
    /// use it.
    pub reserved: bool,
    _open: ClientGauge,
    _address: Option<Box<pingora_limits::inflight::Guard>>,
}

/// The per-address limits' verdict on a new connection from `peer`. Nothing is spent when
/// none is set.
fn admit_address(
    limits: &AddressLimits,
    peer: SocketAddr,
) -> Result<AddressGuard, crate::limits::Refusal> {
    if !limits.any() {
        return Ok(None);
    }
    limits.admit(peer.ip())
}

/// Refuses a new client for `limit`: answered as PostgreSQL would (its startup packet read,
/// then a FATAL `err`) by a bounded number of short refusals; past them a flood is closed
/// at once, so that it cannot take every descriptor.
fn turn_away(
    client: TcpStream,
    peer: SocketAddr,
    err: ClientError,
    limit: &'static str,
    shared: &Arc<Shared>,
    sessions: &TaskTracker,
    span: tracing::Span,
) {
    let refusals = &shared.metrics.refusals;
    let Ok(refusing) = shared.refusals.clone().try_acquire_owned() else {
        refusals.with_label_values(&[limit, "no"]).inc();
        return;
    };
    refusals.with_label_values(&[limit, "yes"]).inc();
    let shared = shared.clone();
    let refused = async move {
        let wait = shared.client_login_timeout().min(REFUSAL_LIMIT);
        refuse(client, BytesMut::new(), peer, err, wait, &shared).await;
        drop(refusing);
    };
    sessions.spawn(refused.instrument(span));
}

/// Counts an open client connection in its listener's gauge until dropped.
struct ClientGauge(prometheus::IntGauge);

impl ClientGauge {
    fn open(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads a client's startup packet, answering encryption requests with 'N' (pgvane does not
/// terminate TLS).
pub(crate) async fn read_client_startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
) -> Result<StartupPacket, ProtocolError> {
    // A client may ask for SSL and then GSS (or the reverse) before its StartupMessage.
    for _ in 0..3 {
        match read_startup(client).await? {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                client.write_all(b"N").await?;
            }
            other => return Ok(other),
        }
    }
    Err(ProtocolError::Malformed("too many encryption requests"))
}

/// Answers like a PostgreSQL server that cannot take the connection: decline encryption,
/// read the StartupMessage (its first bytes may have been read already: `early`), send a
/// FATAL ErrorResponse and close.
async fn refuse(
    mut client: TcpStream,
    early: BytesMut,
    peer: SocketAddr,
    err: ClientError,
    login_timeout: Duration,
    shared: &Shared,
) {
    // The client's stream with what was read of it already in front.
    let (read, write) = client.split();
    let mut stream = tokio::io::join(AsyncReadExt::chain(&early[..], read), write);
    let answer = tokio::time::timeout(login_timeout, read_client_startup(&mut stream)).await;
    match answer {
        Ok(Ok(StartupPacket::Startup { major, minor, .. })) => {
            let err = match major {
                PROTOCOL_MAJOR_3 => err,
                _ => ClientError::UnsupportedProtocol { major, minor },
            };
            if let Some(not_logged) = shared.refusal_log.take() {
                info!(client = %peer, sqlstate = %err.sqlstate(), error = %err, not_logged, "client refused");
            }
            send_error(&mut client, &err, &shared.metrics).await
        }
        // Nothing of ours to cancel: PostgreSQL closes silently too.
        Ok(Ok(_)) => {}
        Ok(Err(e)) => debug!(error = %e, "bad startup from refused client"),
        Err(_) => debug!("refused client sent no startup packet in time"),
    }
}

/// How long an error may wait for room in the socket of a client that does not read.
const ERROR_WRITE_LIMIT: Duration = Duration::from_secs(5);

/// Sends `err` as an ErrorResponse and closes the client's side of the connection; given up
/// after `ERROR_WRITE_LIMIT`. Boxed inside: a rare path, which should not enlarge the
/// futures of its callers (a pooled transaction's is boxed anew per request).
/// Counted by SQLSTATE in `pgvane_client_errors_total`; the caller logs why.
pub(crate) async fn send_error<S: AsyncWrite + Unpin>(
    client: &mut S,
    err: &ClientError,
    metrics: &Metrics,
) {
    metrics
        .client_errors
        .with_label_values(&[&err.sqlstate()])
        .inc();
    let mut buf = BytesMut::new();
    err.encode(&mut buf);
    let write = async {
        let _ = client.write_all(&buf).await;
        let _ = client.shutdown().await;
    };
    let _ = Box::pin(tokio::time::timeout(ERROR_WRITE_LIMIT, write)).await;
}
