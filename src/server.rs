//! Process lifecycle: bind every listener, start the health checks and pool upkeep, serve,
//! and drain on a signal.
//!
//! Shutdown (SIGTERM or SIGINT) stops accepting at once, then waits up to
//! `general.shutdown_timeout` for open sessions to end on their own before closing them.
//! A second signal closes them immediately. Sessions still open then are closed by
//! returning: the runtime drops every task with it, so the data path never has to watch a
//! shutdown signal of its own.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::console::Console;
use crate::admin::{self, Shutdown};
use crate::auth::UserStore;
use crate::config::{Config, ConfigError, LimitsConfig, ListenerConfig};
use crate::limits::{self, LogBudget, FILES_HEADROOM, REFUSALS_IN_FLIGHT, REFUSAL_LOG_LINES};
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::proxy::migrate::Emigration;
use crate::proxy::{self, CancelRegistry, ClientSettings, PauseState, Route, Shared};
use crate::reload::{user_limits_of, ReloadHandle, Reloader};
use crate::tls::{self, ServerTls, TlsByListener};
use crate::topology::Topology;
use crate::upgrade;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener \"{name}\": cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot take over the running pgvane's sockets (general.upgrade_socket): {0}")]
    Upgrade(std::io::Error),
    #[error("admin.unix_socket: cannot listen on {path}: {source}")]
    ConsoleSocket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What a config refers to: the auth file's users and the listeners' certificates.
pub struct Referenced {
    pub users: UserStore,
    pub tls: TlsByListener,
    pub server_tls: Option<Arc<ServerTls>>,
}

/// Loads what the config refers to, so that `check`, start-up and reloads refuse the same
/// mistakes.
pub fn load_referenced(config: &Config) -> Result<Referenced, ConfigError> {
    let invalid = |p| ConfigError::Invalid(vec![p]);
    Ok(Referenced {
        users: UserStore::load(config).map_err(invalid)?,
        tls: tls::load(config).map_err(invalid)?,
        server_tls: tls::load_server(config).map_err(invalid)?,
    })
}

/// systemd's service protocol (`Type=notify`, `WatchdogSec=`): readiness once every
/// listener accepts, reloads and shutdown announced, and the watchdog fed while the runtime
/// runs. Without `NOTIFY_SOCKET` each call does nothing.
mod systemd {
    use std::time::Duration;

    use sd_notify::NotifyState;
    use tokio_util::sync::CancellationToken;
    use tracing::debug;

    fn notify(state: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(false, state) {
            debug!(error = %e, "cannot notify the service manager");
        }
    }

    pub fn ready() {
        notify(&[NotifyState::Ready]);
    }

    pub fn stopping() {
        notify(&[NotifyState::Stopping]);
    }

    /// Runs `reload` between RELOADING=1 (with the monotonic time systemd asks for) and
    /// READY=1.
    pub fn reloading<T>(reload: impl FnOnce() -> T) -> T {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[NotifyState::Reloading, now]),
            Err(_) => notify(&[NotifyState::Reloading]),
        }
        let done = reload();
        ready();
        done
    }

    /// The watchdog interval systemd expects pings within: `WATCHDOG_USEC`, unless
    /// `WATCHDOG_PID` names another process.
    fn watchdog() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        let pid = std::env::var("WATCHDOG_PID").ok();
        if pid.is_some_and(|p| p.parse() != Ok(std::process::id())) {
            return None;
        }
        (usec > 0).then(|| Duration::from_micros(usec))
    }

    /// Pings the watchdog at half its interval until `stop`: a runtime too stuck to run
    /// this task gets pgvane restarted.
    pub fn keep_watchdog_fed(stop: CancellationToken) {
        let Some(interval) = watchdog() else { return };
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval / 2);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => notify(&[NotifyState::Watchdog]),
                }
            }
        });
    }
}

/// The listening sockets, each with its accept loop, as the configuration in force has
/// them: started at start-up and changed by a reload.
pub struct Listeners {
    shared: Arc<Shared>,
    sessions: TaskTracker,
    accepting: TaskTracker,
    stop_all: CancellationToken,
    running: HashMap<String, Running>,
}

struct Running {
    config: ListenerConfig,
    route: Arc<ArcSwap<Route>>,
    stop: CancellationToken,
    /// A duplicate of the listening socket, for an upgrade's hand-over.
    socket: Option<OwnedFd>,
}

impl Listeners {
    fn new(shared: Arc<Shared>, sessions: TaskTracker) -> Self {
        Self {
            shared,
            sessions,
            accepting: TaskTracker::new(),
            stop_all: CancellationToken::new(),
            running: HashMap::new(),
        }
    }

    /// Binds `config`'s address, as a reload does (start-up binds everything first).
    pub fn bind(config: &ListenerConfig) -> std::io::Result<TcpListener> {
        serve_on(std::net::TcpListener::bind(config.socket_addr())?)
    }

    /// Accepts clients of listener `config` on `socket`, with its TLS from `tls`.
    pub fn start(
        &mut self,
        socket: TcpListener,
        config: &ListenerConfig,
        limits: &LimitsConfig,
        tls: &TlsByListener,
    ) {
        info!(listener = %config.name, addr = %config.socket_addr(), mode = ?config.mode, target = %config.target, "listening");
        let dup = socket.as_fd().try_clone_to_owned().ok();
        let tls = tls.get(&config.name).cloned();
        let route = Arc::new(ArcSwap::from_pointee(Route::new(
            config.clone(),
            limits,
            tls,
        )));
        let stop = self.stop_all.child_token();
        self.accepting.spawn(proxy::serve(
            socket,
            route.clone(),
            self.shared.clone(),
            stop.clone(),
            self.sessions.clone(),
        ));
        let running = Running {
            config: config.clone(),
            route,
            stop,
            socket: dup,
        };
        self.running.insert(config.name.clone(), running);
    }

    /// Closes listener `name`'s socket; its sessions go on.
    pub fn stop(&mut self, name: &str) {
        if let Some(r) = self.running.remove(name) {
            r.stop.cancel();
            info!(listener = name, addr = %r.config.socket_addr(), "listener closed; its sessions go on");
        }
    }

    /// The running listener `name`'s config and route.
    pub fn get(&self, name: &str) -> Option<(&ListenerConfig, &Arc<ArcSwap<Route>>)> {
        self.running.get(name).map(|r| (&r.config, &r.route))
    }

    /// Records that listener `name` now runs with `config` (its route already replaced).
    pub fn set_config(&mut self, config: &ListenerConfig) {
        if let Some(r) = self.running.get_mut(&config.name) {
            r.config = config.clone();
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    /// Duplicates of the listening sockets, by listener name, for an upgrade's hand-over.
    pub fn sockets(&self) -> upgrade::Sockets {
        let dup = |r: &Running| r.socket.as_ref()?.try_clone().ok();
        let named = self
            .running
            .iter()
            .map(|(name, r)| Some((name.clone(), dup(r)?)));
        named.flatten().collect()
    }

    /// Takes over a session an upgrade's old process sent, on its listener here.
    pub fn adopt(&self, emigrant: upgrade::Emigrant) {
        let route_of = |name: &str| Some(self.running.get(name)?.route.load_full());
        proxy::adopt(emigrant, route_of, &self.shared, &self.sessions);
    }

    /// Stops accepting on every listener and waits until the accept loops have ended.
    async fn stop_all(self) {
        self.stop_all.cancel();
        self.accepting.close();
        self.accepting.wait().await;
    }
}

/// The next session from an upgrade's old process; pending forever when none come.
async fn arrival(
    arrivals: &mut Option<tokio::sync::mpsc::UnboundedReceiver<upgrade::Emigrant>>,
) -> Option<upgrade::Emigrant> {
    match arrivals {
        Some(arriving) => match arriving.recv().await {
            Some(emigrant) => Some(emigrant),
            None => {
                *arrivals = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// The admin API's socket's name in an upgrade's hand-over.
const ADMIN_SOCKET: &str = "admin";

/// A listening socket (bound here or handed over) for tokio.
fn serve_on(socket: std::net::TcpListener) -> std::io::Result<TcpListener> {
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket)
}

/// Binds `addr`, or takes the socket `name` a running pgvane handed over for it.
async fn bind_or_inherit(
    inherited: &mut upgrade::Inherited,
    name: &str,
    addr: std::net::SocketAddr,
) -> Result<TcpListener, StartError> {
    let bind_error = |source| StartError::Bind {
        name: name.to_owned(),
        addr,
        source,
    };
    match inherited.take(name, addr) {
        Some(socket) => serve_on(socket).map_err(bind_error),
        None => TcpListener::bind(addr).await.map_err(bind_error),
    }
}

/// Raises the open files limit as far as allowed, and warns if it is still short of what
/// `max_client_conn` may take (clients and refusals, plus room for server connections,
/// checks and the admin API).
fn check_open_files(config: &Config) {
    let needed =
        u64::from(config.general.max_client_conn) + REFUSALS_IN_FLIGHT as u64 + FILES_HEADROOM;
    match limits::raise_open_files() {
        Ok(limit) if limit < needed => warn!(
            limit,
            needed,
            "the open files limit is below what max_client_conn may need: raise it (ulimit -n, systemd LimitNOFILE) or lower max_client_conn"
        ),
        Ok(limit) => info!(limit, "open files limit"),
        Err(e) => warn!(error = %e, "cannot read or raise the open files limit"),
    }
}

/// Runs pgvane until a shutdown signal has been handled. `referenced` comes from
/// [`load_referenced`], which start-up has already called to validate the config; `path` is
/// where a reload reads the configuration again.
pub async fn run(path: PathBuf, config: Config, referenced: Referenced) -> Result<(), StartError> {
    let Referenced {
        users,
        tls,
        server_tls,
    } = referenced;
    let users = Arc::new(users);
    check_open_files(&config);
    // A running pgvane's sockets, when this process upgrades it.
    let mut inherited = match &config.general.upgrade_socket {
        Some(path) => upgrade::take_over(path).map_err(StartError::Upgrade)?,
        None => upgrade::Inherited::none(),
    };
    // Bind everything first so a taken port fails start-up before any work begins.
    let mut bound = Vec::new();
    for l in &config.listeners {
        bound.push(bind_or_inherit(&mut inherited, &l.name, l.socket_addr()).await?);
    }
    let admin_socket = match config.admin.listen {
        Some(addr) => Some(bind_or_inherit(&mut inherited, ADMIN_SOCKET, addr).await?),
        None => None,
    };
    let console_socket =
        match &config.admin.unix_socket {
            Some(path) => Some(admin::console::bind_unix(path).map_err(|source| {
                StartError::ConsoleSocket {
                    path: path.clone(),
                    source,
                }
            })?),
            None => None,
        };
    // The admin API stops with the rest, or at once when an upgrade's new process serves.
    let stop_admin = CancellationToken::new();
    let admin_dup = admin_socket
        .as_ref()
        .and_then(|s| s.as_fd().try_clone_to_owned().ok());
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;

    let stop_background = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let topology = Topology::new(&config, metrics.clone());
    topology.spawn_checks(&config, server_tls.clone(), stop_background.clone());
    let pools = Pools::new(config.pool.clone(), &config.databases, &config.users);
    pools.set_server_tls(server_tls);
    tokio::spawn(pools.clone().maintain(stop_background.clone()));
    tokio::spawn(
        pools
            .clone()
            .follow_topology(topology.clone(), stop_background.clone()),
    );
    // Routing before the first checks would refuse clients for no reason.
    topology
        .wait_first_checks(config.health.timeout + config.health.interval)
        .await;
    // An election that finds none changes nothing, so the topology does not say it.
    if topology.snapshot().primary().is_none() {
        warn!("no primary available at start-up; writes are held (failover_hold_timeout) until a backend is primary");
    }

    let (reloads, mut reload_requests) = ReloadHandle::new();
    let (shutdowns, mut shutdown_requests) = tokio::sync::mpsc::channel(1);
    let shared = Arc::new(Shared {
        topology,
        pools,
        users: ArcSwap::new(users),
        cancels: Arc::new(CancelRegistry::default()),
        client_slots: Arc::new(Semaphore::new(config.general.max_client_conn as usize)),
        refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT)),
        refusal_log: LogBudget::per_second(REFUSAL_LOG_LINES),
        user_limits: ArcSwapOption::new(user_limits_of(&config, None)),
        general: ArcSwap::from_pointee(ClientSettings::of(&config.general)),
        paused: PauseState::default(),
        console: Console::new(&config),
        reloads,
        shutdowns,
        disabled: Default::default(),
        clients: Default::default(),
        emigration: Emigration::new(config.general.upgrade_socket.is_some()),
        metrics,
    });
    // Login-rate state of users idle long enough to have full buckets again goes.
    let idle_users = shared.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            if let Some(limits) = &*idle_users.user_limits.load() {
                limits.forget_idle();
            }
        }
    });
    shared.metrics.set_certificates(&tls);
    for warning in tls::expiring_soon(&tls) {
        warn!("{warning}");
    }
    let sessions = TaskTracker::new();
    let mut listeners = Listeners::new(shared.clone(), sessions.clone());
    for (socket, l) in bound.into_iter().zip(&config.listeners) {
        listeners.start(socket, l, &config.limits, &tls);
    }
    if let Some(socket) = admin_socket {
        info!(addr = %config.admin.listen.expect("bound"), "admin API listening");
        tokio::spawn(admin::serve(socket, shared.clone(), stop_admin.clone()));
    }
    if let Some(socket) = console_socket {
        let path = config.admin.unix_socket.as_ref().expect("bound");
        info!(path = %path.display(), "admin console listening on a Unix socket");
        tokio::spawn(admin::console::serve_unix(
            socket,
            shared.clone(),
            stop_admin.clone(),
        ));
    }

    let mut sigusr1 = signal(SignalKind::user_defined1()).map_err(StartError::Signal)?;
    let mut sigusr2 = signal(SignalKind::user_defined2()).map_err(StartError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;
    let (upgrades, mut upgrade_requests) = tokio::sync::mpsc::channel(1);
    // Sessions the old process sends once this one serves; and, once this one is the old
    // one, when it has sent its own.
    let mut arrivals = None;
    let mut emigrated = None;
    if let Some(path) = &config.general.upgrade_socket {
        arrivals = inherited.ready();
        if let Err(e) = upgrade::offer(path, upgrades) {
            warn!(path = %path.display(), error = %e, "cannot offer the listening sockets for upgrades");
        }
    }
    let mut reloader = Reloader::new(path, config, shared.clone(), listeners);
    let mut tls_watch = tokio::time::interval(tls::WATCH_INTERVAL);
    systemd::ready();
    systemd::keep_watchdog_fed(stop_background.clone());
    let shutdown = loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break Shutdown::WaitForClients }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break Shutdown::WaitForClients }
            Some(how) = shutdown_requests.recv() => { info!(?how, "SHUTDOWN from the admin console"); break how }
            // PgBouncer's signals: SIGUSR1 = PAUSE, SIGUSR2 = RESUME.
            _ = sigusr1.recv() => admin::pause(&shared, None),
            _ = sigusr2.recv() => {
                let _ = admin::resume(&shared, None);
            }
            _ = sighup.recv() => {
                info!("SIGHUP: reloading the configuration");
                let _ = systemd::reloading(|| reloader.reload());
            }
            Some(asked) = reload_requests.recv() => {
                let _ = asked.send(systemd::reloading(|| reloader.reload()));
            }
            _ = tls_watch.tick() => {
                if reloader.tls_files_changed() {
                    info!("a certificate or key file changed: reloading the configuration");
                    let _ = systemd::reloading(|| reloader.reload());
                }
            }
            Some(upgrade) = upgrade_requests.recv() => match upgrade {
                upgrade::Request::Sockets(reply) => {
                    let mut sockets = reloader.listeners().sockets();
                    let admin = admin_dup.as_ref().and_then(|fd| fd.try_clone().ok());
                    sockets.extend(admin.map(|fd| (ADMIN_SOCKET.to_owned(), fd)));
                    let _ = reply.send(sockets);
                }
                upgrade::Request::Handed { emigrants, sent } => {
                    shared.emigration.start(emigrants, &shared.clients);
                    emigrated = Some(sent);
                    stop_admin.cancel();
                    break Shutdown::WaitForClients;
                }
            },
            Some(emigrant) = arrival(&mut arrivals) => reloader.listeners().adopt(emigrant),
        }
    };
    systemd::stopping();
    // How long open sessions may take to end on their own.
    let shutdown_timeout = match shutdown {
        Shutdown::WaitForClients => reloader.current().general.shutdown_timeout,
        Shutdown::Now | Shutdown::WaitForServers => Duration::ZERO,
    };
    reloader.into_listeners().stop_all().await;
    if shutdown == Shutdown::WaitForServers {
        let running = admin::pause_and_wait(&shared, None)
            .await
            .expect("pausing everything names no database");
        info!(
            running,
            "SHUTDOWN WAIT_FOR_SERVERS: paused; closing the sessions"
        );
    }
    sessions.close();
    let open = sessions.len();
    if open > 0 {
        info!(sessions = open, timeout = ?shutdown_timeout, "waiting for open sessions to end");
        tokio::select! {
            _ = sessions.wait() => {}
            _ = tokio::time::sleep(shutdown_timeout) => {
                warn!(sessions = sessions.len(), "shutdown timeout reached; closing sessions");
            }
            _ = sigterm.recv() => warn!("second signal: closing sessions now"),
            _ = sigint.recv() => warn!("second signal: closing sessions now"),
        }
    }
    shared.emigration.end();
    if let Some(sent) = emigrated {
        // Sessions that moved are on their way until the sending thread is done.
        let _ = tokio::time::timeout(upgrade::EXCHANGE_LIMIT, sent).await;
    }
    stop_background.cancel();
    stop_admin.cancel();
    info!(closed = sessions.len(), "stopped");
    Ok(())
}
