//! Pooled sessions (session and transaction mode).
//!
//! A client logs in to pgvane itself: startup, authentication against the user store, then
//! the server's ParameterStatus values, a BackendKeyData of pgvane's own and ReadyForQuery.
//! From then on the session alternates between two states:
//!
//! * **idle**: no server connection, no buffer; only a wait for the client's next bytes.
//! * **linked**: a server connection is leased from the pool for the listener's current
//!   target backend, the client's parameters are applied to it, and bytes are pumped both
//!   ways while a [`Scanner`] on each direction follows message boundaries.
//!
//! In transaction mode the link ends at a ReadyForQuery reporting idle when every request the
//! client sent has been answered; in session mode only when the client leaves. A link that
//! ends any other way closes its server connection instead of returning it.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::auth_query;
use super::cancel::{send_cancel, CancelKey};
use super::client_io::{ClientIo, TlsClient};
use super::migrate::{self, Migrant};
use super::prepared::{forgets_all, untracked, ClientStatements, LazyTracker, LinkPoint, Then};
use super::session_state::{look, with_rejections, Carried, Feature};
use super::{
    read_client_startup, send_error, watching, Abandon, Admission, Attempt, Chosen, Route, Shared,
    HELD_READ_AHEAD,
};
use crate::admin::console::{self, Access, ConsoleLogin};
use crate::auth::{authenticate_client, AuthError, User};
use crate::config::{ClientSslMode, ListenerMode, OnRoleLoss, PoolConfig, SessionStatePolicy};
use crate::error::ClientError;
use crate::limits::{Refusal, UserGuard, REFUSAL_LIMIT};
use crate::metrics::Metrics;
use crate::pool::{
    CancelTarget, LoginParams, Pool, PoolError, ServerConn, SERVER_READ_BUFFER, TRACKED,
};
use crate::protocol::{
    backend, parameter_status, CopyInSyncs, ErrorResponse, Event, Scanner, StartupPacket,
    PROTOCOL_MAJOR_3,
};
use crate::registry::{Entry, NewEntry, State};
use crate::stats::{bump, now_us, LinkCounts, Measure};
use crate::tls::{self, Negotiated, PlainServer, ServerSplit, TlsServer};
use crate::topology::{Backend, RoutingTable};
use crate::upgrade::MAX_EMIGRANT;

/// Read buffer for a client's request while linked (PgBouncer's pkt_buf is 4 KiB).
const LINK_BUFFER: usize = 8192;

/// Read buffer for a client's login: its messages are small.
const LOGIN_BUFFER: usize = 512;

/// A pooled client's whole session; `admission` is held until it ends.
pub fn handle<C: ClientIo>(
    client: C,
    peer: SocketAddr,
    route: Arc<Route>,
    shared: Arc<Shared>,
    admission: Admission,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    session(client, route, shared, admission, Start::Login(peer))
}

/// A session that moved here from an upgrade's old process: its state is restored and it
/// goes on as it was, its client none the wiser.
pub fn adopt(
    client: TcpStream,
    migrant: Migrant,
    route: Arc<Route>,
    shared: Arc<Shared>,
    admission: Admission,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    session(
        client,
        route,
        shared,
        admission,
        Start::Restore(Box::new(migrant)),
    )
}

/// How a session begins.
enum Start {
    /// A new client logs in.
    Login(SocketAddr),
    /// A session arrives from an upgrade's old process.
    Restore(Box<Migrant>),
}

/// A session from its start until the client leaves (or the session moves to an upgrade's
/// new process).
///
/// Its state is what every idle client costs, hence its shape: a function returning an
/// `async move` block, since an `async fn` keeps its arguments twice (as received and as
/// moved into its body); the login boxed before that block, since what the block captures
/// it keeps for good (the start, a second client); the idle loop written inline, since a
/// called async fn would hold a second copy of the client and the session; and no
/// references kept beside the `Arc`s (896 bytes before, 264 now).
#[allow(clippy::manual_async_fn)]
fn session<C: ClientIo>(
    client: C,
    route: Arc<Route>,
    shared: Arc<Shared>,
    admission: Admission,
    start: Start,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let reserved = admission.reserved;
    let begin = Box::pin(begin(
        client,
        start,
        route.clone(),
        shared.clone(),
        reserved,
    ));
    async move {
        let (mut client, mut session, mut begun) = match begin.await {
            Some((client, LoggedIn::Session(session, early))) => (client, session, early),
            Some((client, LoggedIn::Console(login))) => {
                // A task of its own: awaited here, it would take room in every session's
                // future.
                let peer = client.peer();
                let console = console::serve(client, peer, login, shared);
                tokio::spawn(async move {
                    console.await;
                    drop(admission);
                });
                return;
            }
            None => return,
        };
        // `begun`: a request the client sent along with its login without waiting for it
        // to complete, or one a transaction's link read the start of: served without a wait.
        loop {
            if begun.is_none() {
                // Idle: wait for the client's next request, holding neither buffer nor
                // server. poll_read_ready parks on the socket's own waker slot: a much
                // smaller future than `readable()`, and idle clients are what a pooler has
                // most of.
                let woken = std::future::poll_fn(|cx| {
                    if session.movable && session.entry.asked_to_leave(cx.waker()) {
                        return Poll::Ready(Ok(Idle::Leave));
                    }
                    ClientIo::poll_read_ready(&mut client, cx).map_ok(|()| Idle::Readable)
                })
                .await;
                match woken {
                    Err(_) => return,
                    Ok(Idle::Readable) => {}
                    Ok(Idle::Leave) => match session.emigrate(client, &route, &shared) {
                        Ok(()) => {
                            session.leave(&route, &shared);
                            return;
                        }
                        Err(stays) => {
                            client = stays;
                            session.movable = false;
                            continue;
                        }
                    },
                }
            }
            // Everything a request needs lives in its own boxed future, so that an idle
            // session costs no more than the state above.
            match Box::pin(session.serve_request(&mut client, &route, &shared, begun.take())).await
            {
                Served::End => {
                    let killed = session.entry.is_killed();
                    let user = killed.then(|| session.home.key.user.clone());
                    session.leave(&route, &shared);
                    if let Some(user) = user {
                        // A task of its own: an await here would take room in every
                        // session's future.
                        tokio::spawn(tell_killed(client, user, shared));
                    }
                    return;
                }
                Served::Done => {}
                Served::Begun(next) => begun = Some(next),
            }
        }
    }
}

/// What ended an idle session's wait.
enum Idle {
    /// The client sent something (or hung up).
    Readable,
    /// The session is to move to an upgrade's new process.
    Leave,
}

/// A client of a listener with TLS: encryption negotiated first (within
/// `client_login_timeout`), then the session on a plain or an encrypted stream. Its own
/// task type: the extra state stays off sessions of listeners without TLS.
pub async fn handle_tls(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    shared: Arc<Shared>,
    admission: Admission,
) {
    let tls = route.tls.clone().expect("a listener with TLS");
    let limit = shared.client_login_timeout();
    match tokio::time::timeout(limit, tls::negotiate(client, Some(&tls))).await {
        Ok(Ok(Negotiated::Plain(client))) => handle(client, peer, route, shared, admission).await,
        Ok(Ok(Negotiated::Tls(stream))) => {
            let client = TlsClient(stream);
            handle(client, peer, route, shared, admission).await
        }
        Ok(Err(e)) => {
            shared
                .metrics
                .tls_failures
                .with_label_values(&[&route.config.name])
                .inc();
            debug!(client = %peer, error = %e, "TLS negotiation failed; connection closed")
        }
        Err(_) => {
            debug!(client = %peer, "no TLS negotiation within client_login_timeout; connection closed")
        }
    }
}

/// Tells a client KILL ended its session (the session is over: its entry let go of the
/// socket).
async fn tell_killed<C: ClientIo>(mut client: C, user: Arc<str>, shared: Arc<Shared>) {
    info!(client = %client.peer(), user = %user, "session ended by KILL on the console");
    send_error(&mut client, &ClientError::Killed, &shared.metrics).await;
}

/// A logged-in client.
enum LoggedIn {
    /// A pooled session, with what the client sent past its login.
    Session(Session, Option<LinkBuffer>),
    /// An admin console user.
    Console(ConsoleLogin),
}

/// How a request's service ended.
enum Served {
    /// The session is over.
    End,
    /// The client sent nothing more yet.
    Done,
    /// The link read the start of the client's next request.
    Begun(LinkBuffer),
}

impl Served {
    /// The session goes on: with what the link read past the transaction's end (a pipelined
    /// request, whole or in part), the next request's start.
    fn carrying(first: LinkBuffer) -> Self {
        if first.is_empty() {
            Served::Done
        } else {
            Served::Begun(first)
        }
    }
}

/// Logs the client in, or restores its session; `None` when it does not go on. Takes the
/// client and gives it back, so that the session's own future need not hold it meanwhile.
async fn begin<C: ClientIo>(
    mut client: C,
    start: Start,
    route: Arc<Route>,
    shared: Arc<Shared>,
    reserved: bool,
) -> Option<(C, LoggedIn)> {
    let logged_in = match start {
        Start::Login(peer) => login_or_refuse(&mut client, peer, &route, &shared, reserved).await,
        Start::Restore(migrant) => restore_or_refuse(&mut client, *migrant, &route, &shared).await,
    };
    logged_in.map(|logged_in| (client, logged_in))
}

/// Logs the client in within `client_login_timeout`, or tells it why not.
async fn login_or_refuse<C: ClientIo>(
    client: &mut C,
    peer: SocketAddr,
    route: &Route,
    shared: &Shared,
    reserved: bool,
) -> Option<LoggedIn> {
    let limit = match reserved {
        true => shared.client_login_timeout().min(REFUSAL_LIMIT),
        false => shared.client_login_timeout(),
    };
    let error = match tokio::time::timeout(limit, login(client, route, shared, reserved)).await {
        Ok(Ok(Some(LoggedIn::Session(session, early)))) => {
            info!(client = %peer, listener = %route.config.name, user = %session.home.key.user, database = %session.home.key.database, "client logged in");
            return Some(LoggedIn::Session(session, early));
        }
        Ok(Ok(other)) => return other,
        Ok(Err(e)) => e,
        Err(_) => ClientError::LoginTimeout(limit),
    };
    let refused = match &error {
        ClientError::Limited(refusal) => Some(refusal.label()),
        ClientError::TooManyClients(_) => Some("max_client_conn"),
        _ => None,
    };
    if let Some(limit) = refused {
        let refusals = &shared.metrics.refusals;
        refusals.with_label_values(&[limit, "yes"]).inc();
    }
    match error {
        ClientError::BadStartup(e) => debug!(client = %peer, error = %e, "connection closed"),
        ClientError::Abandoned => debug!(client = %peer, "client left while held"),
        error => {
            if let Some(not_logged) = shared.refusal_log.take() {
                info!(client = %peer, sqlstate = %error.sqlstate(), error = %error, not_logged, "client refused");
            }
            send_error(client, &error, &shared.metrics).await
        }
    }
    None
}

struct Session {
    /// The client's count under max_user_client_connections and max_db_client_connections.
    _limited: Option<Box<UserGuard>>,
    /// Its line in SHOW CLIENTS.
    entry: Arc<Entry>,
    /// The pool the client logged in through: its user and database.
    home: Arc<Pool>,
    /// The server's parameter values shown at login, shared by all clients of the pool.
    defaults: Arc<LoginParams>,
    /// The client's own values: from its startup packet and its SETs since.
    overrides: Vec<(String, String)>,
    cancel_key: CancelKey,
    /// Named prepared statements (transaction mode with max_prepared_statements), boxed and
    /// only once there are some: most sessions never prepare one, and idle sessions should
    /// stay small.
    statements: Option<Box<ClientStatements>>,
    /// Transaction mode: the client created session state (see `session_state`) and keeps
    /// its server connection until it leaves.
    pinned: bool,
    /// Whether the session may move to an upgrade's new process when asked: plain TCP
    /// with an upgrade socket configured, until it once could not.
    movable: bool,
}

/// Startup and authentication, returning the session (or console) and any bytes the client
/// sent past its login. `None`: the connection was a CancelRequest. `reserved`: the client
/// is over `max_client_conn` in a console slot, where only `admin_users` may log in, and
/// only to the console.
async fn login<C: ClientIo>(
    client: &mut C,
    route: &Route,
    shared: &Shared,
    reserved: bool,
) -> Result<Option<LoggedIn>, ClientError> {
    // Buffered: each login message then takes one system call, not one per header field
    // and one for the body.
    let mut client = BufReader::with_capacity(LOGIN_BUFFER, client);
    let client = &mut client;
    // A first packet PostgreSQL could not read (node-postgres' Terminate before any startup,
    // say) is closed without an answer, as PostgreSQL closes it.
    let params = match read_client_startup(client)
        .await
        .map_err(ClientError::BadStartup)?
    {
        StartupPacket::CancelRequest {
            process_id,
            secret_key,
        } => {
            shared.cancels.cancel(process_id, secret_key).await;
            return Ok(None);
        }
        StartupPacket::Startup { major, minor, .. } if major != PROTOCOL_MAJOR_3 => {
            return Err(ClientError::UnsupportedProtocol { major, minor })
        }
        StartupPacket::Startup { minor, params, .. } => {
            negotiate_protocol(&mut **client.get_mut(), minor, &params).await?;
            params
        }
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => return Ok(None),
    };
    let mut user = None;
    let mut database = None;
    let mut overrides: Vec<(String, String)> = Vec::new();
    let ignored = &shared.pools.settings().ignore_startup_parameters;
    for (k, v) in params {
        match k.as_str() {
            "user" => user = Some(v),
            "database" => database = Some(v),
            // Protocol options pgvane declined in NegotiateProtocolVersion.
            _ if k.starts_with(PROTOCOL_OPTION_PREFIX) => {}
            _ if ignored.iter().any(|i| i.eq_ignore_ascii_case(&k)) => {}
            // A pooled session cannot carry replication or per-connection options.
            "replication" | "options" => return Err(ClientError::UnsupportedParameter(k)),
            _ if !k
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.') =>
            {
                return Err(ClientError::UnsupportedParameter(k))
            }
            _ => set_param(&mut overrides, &k, v),
        }
    }
    let user = user.filter(|u| !u.is_empty()).ok_or(ClientError::NoUser)?;
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    refuse_plain_if_required::<C>(route)?;
    let to_console = console::DATABASES.contains(&database.as_str());
    // Before authentication, as PgBouncer does: no pool and no auth_query for it.
    if !to_console && !shared.pools.knows_database(&database) {
        return Err(ClientError::NoSuchDatabase(database));
    }
    if !to_console && shared.disabled.contains(&database) {
        return Err(ClientError::DatabaseDisabled(database));
    }
    if reserved && !(to_console && shared.console.access(&user) == Some(Access::Admin)) {
        return Err(ClientError::TooManyClients(shared.max_client_conn()));
    }

    // What the client is told from here on goes out in one write: authentication's last
    // messages, then the parameters, key and ReadyForQuery.
    let mut reply = BytesMut::new();
    let users = shared.users.load_full();
    let mut known = users.get(&user);
    if let (None, false, Some(query)) = (&known, to_console, &users.auth_query) {
        known = Box::pin(auth_query::lookup(shared, query, &user, &database)).await?;
    }
    let certificate = client.get_ref().certificate_cn();
    let authenticated = authenticate_client(
        client,
        &users,
        &user,
        known.as_deref(),
        certificate.as_deref(),
        &mut reply,
    )
    .await;
    if let Err(AuthError::Failed(_) | AuthError::Certificate { .. }) = &authenticated {
        route.auth_failed(client.get_ref().peer());
    }
    authenticated?;
    if to_console {
        let access = shared
            .console
            .access(&user)
            .ok_or(ClientError::NotConsoleUser(user.clone()))?;
        console::greet(&mut reply);
        client
            .write_all(&reply)
            .await
            .map_err(crate::protocol::ProtocolError::from)?;
        let early = client.buffer().to_vec();
        return Ok(Some(LoggedIn::Console(ConsoleLogin {
            user,
            access,
            early,
        })));
    }
    // Counted from here on toward the user's and the database's caps (boxed: an idle
    // session stays small when no such limit is set).
    let limited = match &*shared.user_limits.load() {
        Some(limits) => Some(Box::new(limits.admit(&user, &database)?)),
        None => None,
    };
    let user = known.unwrap_or_else(|| Arc::new(User::without_secret(user)));

    // The client is shown the parameters of a server of its target, with its own values.
    let login_params = |backend: &Arc<Backend>| pool_with_params(shared, backend, &user, &database);
    // Read ahead while held, and passed on with what the login buffer holds.
    let mut ahead = BytesMut::new();
    let watch = watching(&**client.get_ref(), &mut ahead);
    let chosen = match route.with_backend(shared, login_params, watch).await {
        Ok(chosen) => chosen,
        Err(e) => {
            // Authenticated: the client learns that first, then the error, as from PostgreSQL.
            let _ = client.write_all(&reply).await;
            return Err(e);
        }
    };
    let (pool, defaults) = chosen.value;
    pool.stats.logged_in();
    if let Some((_, v)) = overrides.iter_mut().find(|(k, _)| k == "client_encoding") {
        *v = encoding_name(v, defaults.value("client_encoding"));
    }
    if let Err(e) = Box::pin(pool.check_params(&defaults, &overrides)).await {
        let _ = client.write_all(&reply).await;
        return Err(e.into());
    }
    let cancel_key = shared.cancels.register();
    let mut buf = reply;
    for (k, v) in &defaults.all {
        let v = overrides.iter().find(|(w, _)| w == k).map_or(v, |(_, w)| w);
        backend::parameter_status(&mut buf, k, v);
    }
    backend::backend_key_data(&mut buf, cancel_key.process_id, cancel_key.secret_key);
    backend::ready_for_query(&mut buf, b'I');
    client
        .write_all(&buf)
        .await
        .map_err(crate::protocol::ProtocolError::from)?;
    let session = Session::open(
        &**client.get_ref(),
        Opening {
            limited,
            pool,
            defaults,
            overrides,
            cancel_key,
            statements: None,
        },
        shared,
    );
    let early = (!client.buffer().is_empty() || !ahead.is_empty()).then(|| {
        let mut early = LinkBuffer::holding(client.buffer());
        early.extend_from_slice(&ahead);
        early
    });
    Ok(Some(LoggedIn::Session(session, early)))
}

/// Refuses a client without TLS on a listener that requires it.
fn refuse_plain_if_required<C: ClientIo>(route: &Route) -> Result<(), ClientError> {
    let required = route
        .tls
        .as_ref()
        .is_some_and(|t| t.mode >= ClientSslMode::Require);
    match !C::ENCRYPTED && required {
        true => Err(ClientError::TlsRequired(route.config.name.clone())),
        false => Ok(()),
    }
}

/// `user`'s pool for `database` on `backend`, with the parameter values its servers show
/// clients.
fn pool_with_params<'a>(
    shared: &'a Shared,
    backend: &Arc<Backend>,
    user: &Arc<User>,
    database: &str,
) -> impl std::future::Future<Output = Result<(Arc<Pool>, Arc<LoginParams>), Attempt>> + 'a {
    let pool = shared.pools.get(backend, user, database);
    async move {
        match Box::pin(pool.login_params()).await {
            Ok(params) => Ok((pool, params)),
            Err(e) => {
                shared.pools.free_if_unused(pool);
                Err(classify(e))
            }
        }
    }
}

/// Restores a session that arrived from an upgrade's old process, or tells its client why
/// it cannot go on here.
async fn restore_or_refuse<C: ClientIo>(
    client: &mut C,
    migrant: Migrant,
    route: &Route,
    shared: &Shared,
) -> Option<LoggedIn> {
    match restore(client, migrant, route, shared).await {
        Ok((session, early)) => {
            debug!(client = %client.peer(), user = %session.home.key.user, "session taken over from the old process");
            Some(LoggedIn::Session(session, early))
        }
        Err(e) => {
            info!(client = %client.peer(), error = %e, "a session from the old process cannot go on here; its client is told why");
            send_error(client, &e, &shared.metrics).await;
            None
        }
    }
}

/// Restores a session from what the old process sent: its user and pool, its parameters,
/// cancel key and prepared statements. Nothing is said to the client, which knows it all.
async fn restore<C: ClientIo>(
    client: &mut C,
    migrant: Migrant,
    route: &Route,
    shared: &Shared,
) -> Result<(Session, Option<LinkBuffer>), ClientError> {
    let Migrant {
        user,
        database,
        params,
        process_id,
        secret_key,
        statements,
        client_key,
        ..
    } = migrant;
    // As for a login: the listener's TLS requirement may be new with the upgrade.
    refuse_plain_if_required::<C>(route)?;
    if !shared.pools.knows_database(&database) {
        return Err(ClientError::NoSuchDatabase(database));
    }
    let users = shared.users.load_full();
    let mut known = users.get(&user);
    if let (None, Some(query)) = (&known, &users.auth_query) {
        known = Box::pin(auth_query::lookup(shared, query, &user, &database)).await?;
    }
    let user = known.unwrap_or_else(|| Arc::new(User::without_secret(user)));
    if let Some(key) = client_key.and_then(|k| <[u8; 32]>::try_from(k).ok()) {
        user.learn_client_key(key);
    }
    let limited = match &*shared.user_limits.load() {
        Some(limits) => Some(Box::new(limits.admit(&user.name, &database)?)),
        None => None,
    };
    let login_params = |backend: &Arc<Backend>| pool_with_params(shared, backend, &user, &database);
    let mut ahead = BytesMut::new();
    let watch = watching(&*client, &mut ahead);
    let (pool, defaults) = route.with_backend(shared, login_params, watch).await?.value;
    let cancel_key = match shared.cancels.register_key((process_id, secret_key)) {
        Some(key) => key,
        None => {
            warn!(client = %client.peer(), "a session from the old process has a cancel key taken here; its cancels will not reach its queries");
            shared.cancels.register()
        }
    };
    let opening = Opening {
        limited,
        pool,
        defaults,
        overrides: params,
        cancel_key,
        statements: migrate::restore_statements(statements),
    };
    let session = Session::open(&*client, opening, shared);
    let early = (!ahead.is_empty()).then(|| LinkBuffer::holding(&ahead));
    Ok((session, early))
}

/// Whether a failure to get a server connection is the backend's (try elsewhere or wait
/// for the routing table) or final.
fn classify(e: PoolError) -> Attempt {
    if e.backend_unreachable() {
        Attempt::Unreachable(e.into())
    } else {
        Attempt::Fatal(e.into())
    }
}

/// Startup parameters of this prefix are protocol options, not settings.
const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

/// Answers a startup packet of a newer 3.x protocol, or one asking for protocol options,
/// with NegotiateProtocolVersion (3.0, no option), as PostgreSQL does; the client then
/// carries on with 3.0 or closes.
async fn negotiate_protocol<C: ClientIo>(
    client: &mut C,
    minor: u16,
    params: &[(String, String)],
) -> Result<(), ClientError> {
    let options: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with(PROTOCOL_OPTION_PREFIX))
        .collect();
    if minor == 0 && options.is_empty() {
        return Ok(());
    }
    let mut buf = BytesMut::new();
    backend::negotiate_protocol_version(&mut buf, u32::from(PROTOCOL_MAJOR_3) << 16, &options);
    client
        .write_all(&buf)
        .await
        .map_err(|e| ClientError::Protocol(e.into()))
}

/// An encoding name in the server's spelling (`utf8` -> `UTF8`), as PostgreSQL reports a
/// client_encoding it was given: case, dashes and underscores do not count.
fn encoding_name(name: &str, server: Option<&str>) -> String {
    let bare = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    match (bare(name).as_str(), server) {
        ("utf8" | "unicode", _) => "UTF8".into(),
        (b, Some(server)) if b == bare(server) => server.into(),
        _ => name.to_ascii_uppercase(),
    }
}

/// Records a parameter value, using the canonical spelling of tracked names.
fn set_param(params: &mut Vec<(String, String)>, name: &str, value: String) {
    let name = TRACKED
        .iter()
        .find(|t| t.eq_ignore_ascii_case(name))
        .map_or(name, |t| *t);
    match params.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => *v = value,
        None => params.push((name.to_owned(), value)),
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.home.part();
        // Before the socket closes (the client stream outlives the session): KILL must not
        // shut down a descriptor number reused meanwhile.
        self.entry.detach();
    }
}

/// What a session starts with, at a login or when it arrives from an upgrade's old process.
struct Opening {
    limited: Option<Box<UserGuard>>,
    pool: Arc<Pool>,
    defaults: Arc<LoginParams>,
    overrides: Vec<(String, String)>,
    cancel_key: CancelKey,
    statements: Option<Box<ClientStatements>>,
}

impl Session {
    /// The session of `client`: counted in its pool and listed in SHOW CLIENTS.
    fn open<C: ClientIo>(client: &C, o: Opening, shared: &Shared) -> Session {
        let Opening {
            limited,
            pool,
            defaults,
            mut overrides,
            cancel_key,
            statements,
        } = o;
        // A value the server has anyway need not be remembered per client.
        overrides.retain(|(k, v)| !defaults.all.iter().any(|(dk, dv)| dk == k && dv == v));
        // Kept for the whole session: no spare room.
        overrides.shrink_to_fit();
        pool.join();
        let application_name = overrides
            .iter()
            .chain(&defaults.all)
            .find(|(k, _)| k == "application_name")
            .map(|(_, v)| v.as_str().into())
            .unwrap_or_default();
        let stream = client.tcp();
        let entry = shared.clients.add(NewEntry {
            user: pool.key.user.clone(),
            database: pool.key.database.clone(),
            addr: client.peer(),
            local_addr: stream.local_addr().unwrap_or_else(|_| client.peer()),
            application_name,
            remote_pid: 0,
            tls: client.tls_description(),
            close_needed: None,
            socket: Some(stream.as_raw_fd()),
        });
        if let Some(statements) = &statements {
            entry.set_prepared(statements.len());
        }
        let emigration = &shared.emigration;
        if emigration.is_on() {
            // Logged in while the others were asked to move.
            entry.ask_to_leave();
        }
        Session {
            _limited: limited,
            entry,
            home: pool,
            defaults,
            overrides,
            cancel_key,
            statements,
            pinned: false,
            movable: !C::ENCRYPTED && emigration.is_possible(),
        }
    }

    /// Moves the idle session to an upgrade's new process: its state and its client's
    /// socket go on the emigration channel. The client comes back if the session cannot
    /// move (its state is too large, or the emigration has ended).
    fn emigrate<C: ClientIo>(&self, client: C, route: &Route, shared: &Shared) -> Result<(), C> {
        let Some(to) = shared.emigration.ticket() else {
            return Err(client);
        };
        let migrant = Migrant {
            listener: route.config.name.clone(),
            user: self.home.key.user.to_string(),
            database: self.home.key.database.to_string(),
            params: self.overrides.clone(),
            process_id: self.cancel_key.process_id,
            secret_key: self.cancel_key.secret_key,
            statements: migrate::statements_of(self.statements.as_deref()),
            client_key: self.home.user().client_key().map(|k| k.to_vec()),
        };
        let state = match serde_json::to_vec(&migrant) {
            Ok(state) if state.len() <= MAX_EMIGRANT => state,
            _ => {
                info!(client = %client.peer(), prepared = self.entry.prepared(), "session state too large to move to the new process; the session stays here");
                return Err(client);
            }
        };
        let tcp = client.into_tcp()?;
        // Before the socket leaves: KILL must not touch a descriptor number reused here.
        self.entry.detach();
        let socket = match tcp.into_std() {
            Ok(socket) => OwnedFd::from(socket),
            Err(e) => {
                warn!(error = %e, "cannot take a client's socket off the runtime to move it; the client is disconnected");
                return Ok(());
            }
        };
        if to.send((state, socket)).is_err() {
            warn!("the emigration ended under a session moving; its client is disconnected");
        }
        Ok(())
    }

    /// Whether the backend of the pool the client logged in through still serves its
    /// listener's target.
    fn home_serves(&self, table: &RoutingTable, route: &Route) -> bool {
        let c = &route.config;
        let home = self.home.backend();
        let i = table
            .backends
            .iter()
            .position(|b| Arc::ptr_eq(&b.backend, home));
        i.is_some_and(|i| table.qualifies(i, c.target, c.fallback_to_primary))
    }

    /// A transaction went to another backend's pool `to`: once the home backend no longer
    /// serves the listener (a failover), `to` becomes home, which spares later transactions
    /// a pool lookup, and the old pool is freed if nothing else holds it.
    fn move_home(&mut self, table: &RoutingTable, to: &Arc<Pool>, route: &Route, shared: &Shared) {
        if !self.home_serves(table, route) {
            let old = self.set_home(to.clone());
            shared.pools.free_if_unused(old);
        }
    }

    /// Moves the session to pool `next`, counted there and no longer in the old one, which
    /// is returned.
    fn set_home(&mut self, next: Arc<Pool>) -> Arc<Pool> {
        next.join();
        let old = std::mem::replace(&mut self.home, next);
        old.part();
        old
    }

    /// The home pool was retired by a reload: the session moves to the pool that replaces
    /// it, as its user and its backend are now configured. A backend the reload removed has
    /// no such pool: the session's next transaction goes elsewhere, and home with it.
    fn rehome(&mut self, shared: &Shared) {
        let key = &self.home.key;
        let table = shared.topology.snapshot();
        let Some(view) = table
            .backends
            .iter()
            .find(|v| v.backend.name == key.backend)
        else {
            return;
        };
        let user = shared.users.load().get(&key.user);
        let user = user.unwrap_or_else(|| self.home.user().clone());
        let next = shared.pools.get(&view.backend, &user, &key.database);
        self.set_home(next);
    }

    /// The session is over: a home pool on a backend that no longer serves the listener is
    /// freed if this was the last hold on it, rather than kept until `autodb_idle_timeout`.
    fn leave(self, route: &Route, shared: &Shared) {
        if !self.home_serves(&shared.topology.snapshot(), route) {
            let home = self.home.clone();
            drop(self);
            shared.pools.free_if_unused(home);
        }
    }

    /// After a transaction that may have changed `extra` parameters (which the server does
    /// not report): their values now become the client's, carried to its next server
    /// connection as reported ones are.
    async fn read_back(
        &mut self,
        conn: &mut ServerConn,
        extra: &[String],
    ) -> Result<(), PoolError> {
        for (name, value) in conn.current_settings(extra).await? {
            conn.params.set(&name, &value);
            set_param(&mut self.overrides, &name, value);
        }
        Ok(())
    }

    /// Serves the client's next request: `early` is its start if already read. Its future
    /// is moved into a box per request, so the rare paths (cancel, reset; error replies box
    /// themselves) are boxed on their own to keep it small.
    async fn serve_request<C: ClientIo>(
        &mut self,
        client: &mut C,
        route: &Route,
        shared: &Shared,
        early: Option<LinkBuffer>,
    ) -> Served {
        // The request's first bytes, read before a server is chosen: one system call where a
        // peek and a read would take two, and a Terminate or a hang-up needs no server.
        let mut first = match early {
            Some(begun) => begun,
            None => {
                let mut first = LinkBuffer::take();
                match client.read_request_start(&mut first) {
                    // Hung up: nothing to do on any server.
                    Ok(Some(0)) | Err(_) => return Served::End,
                    Ok(Some(_)) => first,
                    // The readiness was stale: back to waiting.
                    Ok(None) => return Served::Done,
                }
            }
        };
        // A Terminate: nothing to do on any server either.
        if first[0] == b'X' {
            return Served::End;
        }
        let cfg = &route.config;
        if self.home.is_retired() {
            self.rehome(shared);
        }
        shared.wait_resumed(Some(&self.home.key.database)).await;
        let mode = self.home.mode_on(cfg.mode);
        if mode == ListenerMode::Transaction {
            let user = &self.home.key.user;
            // A free turn costs a check; only a wait takes the limits along, and a future
            // (boxed: rare).
            let must_wait = match &*shared.user_limits.load() {
                Some(l) if l.paces_transactions() && l.transaction_turn(user).is_some() => {
                    Some(l.clone())
                }
                _ => None,
            };
            if let Some(limits) = must_wait {
                if let Err(refusal) = Box::pin(limits.pace_transaction(user)).await {
                    return Box::pin(refuse_request(client, first, refusal, shared)).await;
                }
            }
        }
        let (home, defaults, overrides) = (&self.home, &self.defaults, &self.overrides[..]);
        // A server connection set to the client's parameters: until then nothing of the
        // client's is sent, so a connection that fails is replaced, and a backend that
        // fails is reported and the request held as for a failover.
        let acquire = |backend: &Arc<Backend>| {
            // Usually the backend the client logged in through: no pool lookup then.
            let other = (!Arc::ptr_eq(home.backend(), backend))
                .then(|| shared.pools.get(backend, home.user(), &home.key.database));
            async move {
                let pool = other.as_ref().unwrap_or(home);
                pool.acquire_with(defaults, overrides)
                    .await
                    .map_err(classify)
            }
        };
        // While held, the client is watched: one that hangs up or cancels has its request
        // dropped, never sent (what else it sends meanwhile joins the request).
        let (cancel_key, watched, read_ahead) = (&self.cancel_key, &*client, &mut *first);
        let watch = move || {
            // A waiting client keeps only the bytes it sent, not a link buffer: with
            // thousands of clients on a small pool, nearly all of them wait.
            LinkBuffer::shed(read_ahead);
            Box::pin(async move {
                tokio::select! {
                    _ = watched.watch(read_ahead, HELD_READ_AHEAD) => {}
                    _ = cancel_key.cancelled_while_unlinked() => {}
                }
            }) as Abandon
        };
        // Boxed: with the watch, its state would take this future past mimalloc's 1 KiB fast
        // path (`a_request_s_future_fits_the_allocator_s_fast_path`).
        let asked = now_us();
        self.entry.request(asked);
        let chosen = Box::pin(route.with_backend(shared, acquire, watch)).await;
        first.restore();
        let Chosen {
            index: i,
            table,
            value: mut lease,
        } = match chosen {
            Ok(c) => c,
            Err(e) => {
                let peer = client.peer();
                match e {
                    ClientError::Abandoned => {
                        info!(client = %peer, "request dropped, never sent: the client gave up while it waited")
                    }
                    _ => {
                        info!(client = %peer, sqlstate = %e.sqlstate(), error = %e, "request failed before reaching a server; client connection closed")
                    }
                }
                send_error(client, &e, &shared.metrics).await;
                return Served::End;
            }
        };
        lease.pool().assigned(now_us().saturating_sub(asked));
        let server = &lease.conn().entry;
        server.set(State::Active, self.entry.id);
        self.entry.set(State::Active, server.id);
        if !Arc::ptr_eq(lease.pool(), &self.home) {
            self.move_home(&table, lease.pool(), route, shared);
        }
        let (backend, lost) = (&table.backends[i].backend, &table.backends[i].lost);
        self.cancel_key
            .set_target(Some(lease.conn().cancel_target()));
        let _active = backend.track_session();
        // A session-mode session is its link: it ends when the backend stops serving the
        // target, as a passthrough session does. A transaction is let finish (or fail on a
        // dead server); its connection is then closed instead of returned.
        let role_lost = (cfg.on_role_loss == OnRoleLoss::ShutdownSessions
            && mode == ListenerMode::Session)
            .then(|| {
                Box::pin(route.until_role_lost(&shared.topology, i, lost.clone())) as RoleLost
            });
        // The settings of the pool the session is in: a reload that changes them retires
        // the pool, and the session moves to its successor (above) before its next request.
        let settings = self.home.settings();
        // Most clients never name a statement: until one does, its records start in an empty
        // map here (which allocates nothing) and are kept in the session only once it has some.
        let mut first_statements = ClientStatements::default();
        let statements = (mode == ListenerMode::Transaction
            && settings.max_prepared_statements > 0)
            .then_some(match &mut self.statements {
                Some(kept) => &mut **kept,
                None => &mut first_statements,
            });
        let link = Link {
            mode,
            settings,
            metrics: &shared.metrics,
            session_state: (mode == ListenerMode::Transaction).then_some(cfg.session_state),
            pinned: &mut self.pinned,
        };
        // Boxed on its own: two boxes of up to 1 KiB each cost less than one past it
        // (`a_request_s_future_fits_the_allocator_s_fast_path`).
        let (overrides, conn) = (&mut self.overrides, lease.conn());
        let end = match conn.stream.is_tls() {
            false => {
                let link = link.run::<C, PlainServer>(
                    client, &mut first, conn, overrides, statements, role_lost,
                );
                Box::pin(link).await
            }
            true => {
                let link = link.run::<C, TlsServer>(
                    client, &mut first, conn, overrides, statements, role_lost,
                );
                Box::pin(link).await
            }
        };
        lease.record_stats();
        self.entry.set(State::Idle, 0);
        let conn = lease.conn();
        conn.entry.set_prepared(conn.prepared.len());
        let own = self
            .statements
            .as_ref()
            .map_or(first_statements.len(), |s| s.len());
        self.entry.set_prepared(own);
        if !first_statements.is_empty() {
            self.statements = Some(Box::new(first_statements));
        }
        self.cancel_key.set_target(None);
        let drained = lost.is_cancelled();
        let died = matches!(end, LinkEnd::ServerDied { .. });
        if self.pinned && !matches!(end, LinkEnd::Idle { .. }) {
            shared.metrics.pinned_sessions.dec();
        }
        let cancel = matches!(end, LinkEnd::Expired { busy: true, .. });
        if let LinkEnd::Idle { read_back: true } = end {
            // Cloned: a rare path, and the session is borrowed for the read-back.
            let extra = settings.track_extra_parameters.clone();
            if let Err(e) = Box::pin(self.read_back(lease.conn(), &extra)).await {
                let error = ClientError::from(e);
                info!(client = %client.peer(), backend = %backend.name, error = %error, "session ended: cannot read back the client's parameters");
                drop(lease);
                send_error(client, &error, &shared.metrics).await;
                return Served::End;
            }
        }
        match end {
            LinkEnd::Idle { .. } if drained => {
                debug!(backend = %backend.name, "backend changed role; server connection closed");
                Served::carrying(first)
            }
            LinkEnd::Idle { .. } => {
                if self.cancel_key.cancel_in_flight() {
                    Box::pin(self.cancel_key.settled()).await;
                }
                lease.release();
                Served::carrying(first)
            }
            LinkEnd::ClientGone(state) => {
                match state {
                    ServerState::Idle if drained => {}
                    ServerState::Idle if self.cancel_key.cancel_in_flight() => {
                        // Closed rather than kept waiting on: the client has left.
                    }
                    ServerState::Idle if mode == ListenerMode::Session || self.pinned => {
                        let reset = lease.pool().settings().server_reset_query.clone();
                        Box::pin(lease.reset_and_release(&reset)).await
                    }
                    ServerState::Idle => lease.release(),
                    // Whatever the client left open dies with the connection: the server
                    // rolls it back and frees its locks.
                    ServerState::Busy => cancel_in_background(lease.conn().cancel_target()),
                    ServerState::InTransaction | ServerState::Broken => {}
                }
                debug!(?state, "client left");
                Served::End
            }
            LinkEnd::ServerDied { error, tell_client }
            | LinkEnd::Failed { error, tell_client }
            | LinkEnd::Expired {
                error, tell_client, ..
            } => {
                if died {
                    shared.topology.report_failure(backend);
                }
                info!(client = %client.peer(), backend = %backend.name, error = %error, "session ended");
                // What still runs on the server is cancelled, and the connection closed,
                // before the client is told (a client past a limit may not read).
                if cancel {
                    cancel_in_background(lease.conn().cancel_target());
                }
                drop(lease);
                if tell_client {
                    send_error(client, &error, &shared.metrics).await;
                }
                Served::End
            }
        }
    }
}

/// Answers a request that `refusal` keeps from any server, as a server answers a failed
/// one: its messages are read and dropped up to its end (a Query, a function call or a
/// Sync), then ERROR and ReadyForQuery; the session goes on with what the client sent past
/// it.
async fn refuse_request<C: ClientIo>(
    client: &mut C,
    mut first: LinkBuffer,
    refusal: Refusal,
    shared: &Shared,
) -> Served {
    let mut taken = 0;
    {
        let mut request = AsyncReadExt::chain(&first[..], &mut *client);
        loop {
            let mut header = [0u8; 5];
            if request.read_exact(&mut header).await.is_err() {
                return Served::End;
            }
            let len = u32::from_be_bytes(header[1..].try_into().expect("4 bytes"));
            let Some(body) = len.checked_sub(4) else {
                return Served::End;
            };
            let mut rest = (&mut request).take(u64::from(body));
            let skipped = tokio::io::copy(&mut rest, &mut tokio::io::sink()).await;
            if skipped.ok() != Some(u64::from(body)) {
                return Served::End;
            }
            taken += 5 + body as usize;
            match header[0] {
                b'X' => return Served::End,
                // What ends a request: a Query or a function call, or a pipeline's Sync.
                b'Q' | b'F' | b'S' => break,
                _ => {}
            }
        }
    }
    let consumed = taken.min(first.len());
    keep_tail(&mut first, consumed);
    let refusals = &shared.metrics.refusals;
    refusals.with_label_values(&[refusal.label(), "yes"]).inc();
    if let Some(not_logged) = shared.refusal_log.take() {
        info!(client = %client.peer(), error = %refusal, not_logged, "request refused");
    }
    let mut reply = BytesMut::new();
    ErrorResponse::error(refusal.sqlstate(), format!("pgvane: {refusal}"))
        .with_hint("retry later, or ask for a higher limit")
        .encode(&mut reply);
    backend::ready_for_query(&mut reply, b'I');
    if client.write_all(&reply).await.is_err() {
        return Served::End;
    }
    Served::carrying(first)
}

/// Cancels what runs on a server connection that is about to be closed, in a task of its
/// own: the connection closes at once rather than after the server has acted on the cancel
/// (which `send_cancel` waits for), and this rare path stays out of every request's future.
fn cancel_in_background(target: &CancelTarget) {
    let target = target.clone();
    tokio::spawn(async move { send_cancel(&target).await });
}

/// The server connection's state when a client leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    /// At ReadyForQuery 'I' with nothing outstanding: reusable.
    Idle,
    /// Idle inside a transaction block ('T' or 'E').
    InTransaction,
    /// A request is outstanding.
    Busy,
    /// Part of a message was sent: the connection cannot be used again.
    Broken,
}

enum LinkEnd {
    /// Transaction mode: the transaction is over and the server connection is clean;
    /// `read_back`: the values of `track_extra_parameters` may have changed.
    Idle {
        read_back: bool,
    },
    ClientGone(ServerState),
    /// The session must end; `tell_client` says whether an ErrorResponse can still be sent
    /// without landing in the middle of a server message.
    Failed {
        error: ClientError,
        tell_client: bool,
    },
    /// The server connection broke (closed, reset, unwritable): as `Failed`, and the
    /// backend's health is re-checked at once (passive health).
    ServerDied {
        error: ClientError,
        tell_client: bool,
    },
    /// One of the link's time limits passed: as `Failed`, and what runs on the server
    /// connection is cancelled when `busy`.
    Expired {
        error: ClientError,
        tell_client: bool,
        busy: bool,
    },
}

/// A link's time limits (zero is off): `idle_transaction_timeout` (idle inside a
/// transaction block), `query_timeout` (a request outstanding, or a client message begun
/// and not finished), `transaction_timeout` (anything but idle).
fn time_limits(settings: &PoolConfig) -> [Duration; 3] {
    [
        settings.idle_transaction_timeout,
        settings.query_timeout,
        settings.transaction_timeout,
    ]
}

/// Protocol state shared by the two directions of a link. Both run in the same task; the
/// atomics (all relaxed) are there only to keep the session future `Send`.
struct LinkState<'c> {
    /// Requests sent (Query, Sync, FunctionCall) that still owe a ReadyForQuery.
    pending: AtomicU32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: AtomicBool,
    client_mid_message: AtomicBool,
    /// Transaction status of the latest ReadyForQuery.
    tx_status: AtomicU8,
    /// Body bytes of the server's current message not read yet; `usize::MAX` in the
    /// middle of a header.
    server_body_left: AtomicUsize,
    /// The client sent a Terminate while requests were still being answered.
    terminated: AtomicBool,
    /// The server is in COPY FROM STDIN: it waits for the client's data, whatever else is
    /// owed.
    copy_in: AtomicBool,
    /// Set only when a time limit is on: the clock is then read per read of either side.
    started: Option<Instant>,
    /// Milliseconds from `started` to the client's latest data.
    last_client_data_ms: AtomicU64,
    /// Milliseconds from `started` to when the server connection last left Idle, and last
    /// became Busy; `u64::MAX` while it is not.
    active_since_ms: AtomicU64,
    busy_since_ms: AtomicU64,
    /// Transaction mode: the link is one transaction, active from its start to its end
    /// (a client that stalls before its first message is sent holds the connection too).
    whole_link_active: bool,
    /// Transaction mode: the client created session state; the link lasts until it leaves.
    pinned: AtomicBool,
    /// Transaction mode: the client may have changed a `track_extra_parameters` parameter.
    read_back: AtomicBool,
    /// What the link counts for SHOW STATS (kept with the server connection).
    counts: &'c LinkCounts,
}

impl<'c> LinkState<'c> {
    fn new(timed: bool, whole_link_active: bool, counts: &'c LinkCounts) -> Self {
        Self {
            pending: AtomicU32::new(0),
            unsynced: AtomicBool::new(false),
            client_mid_message: AtomicBool::new(false),
            tx_status: AtomicU8::new(b'I'),
            server_body_left: AtomicUsize::new(0),
            terminated: AtomicBool::new(false),
            copy_in: AtomicBool::new(false),
            started: timed.then(Instant::now),
            last_client_data_ms: AtomicU64::new(0),
            active_since_ms: AtomicU64::new(if whole_link_active { 0 } else { u64::MAX }),
            busy_since_ms: AtomicU64::new(u64::MAX),
            whole_link_active,
            pinned: AtomicBool::new(false),
            read_back: AtomicBool::new(false),
            counts,
        }
    }

    /// A request (Query, Sync, FunctionCall) went to the server: it now owes one more
    /// ReadyForQuery. The first from nothing owed starts query time; from idle, a
    /// transaction.
    fn request_sent(&self) {
        if self.pending.load(Relaxed) == 0 {
            let now = now_us();
            self.counts.busy_from_us.store(now, Relaxed);
            if self.tx_status.load(Relaxed) == b'I' {
                self.counts.xact_from_us.store(now, Relaxed);
            }
        }
        self.change_pending(1);
    }

    /// Counts a ReadyForQuery with transaction `status` (after `pending` went down).
    fn count_ready(&self, status: u8) {
        let c = self.counts;
        bump(&c.queries, 1);
        let idle = status == b'I';
        if self.pending.load(Relaxed) > 0 && !idle {
            return;
        }
        let now = now_us();
        if self.pending.load(Relaxed) == 0 {
            let took = now.saturating_sub(c.busy_from_us.load(Relaxed));
            bump(&c.query_us, took);
            c.sample(Measure::Query, took);
        }
        if idle {
            let took = now.saturating_sub(c.xact_from_us.load(Relaxed));
            bump(&c.xacts, 1);
            bump(&c.xact_us, took);
            c.sample(Measure::Transaction, took);
        }
    }

    /// Part of a server message has been passed on: an ErrorResponse of pgvane's would
    /// land inside it.
    fn server_mid_message(&self) -> bool {
        self.server_body_left.load(Relaxed) != 0
    }

    fn server_state(&self) -> ServerState {
        if self.client_mid_message.load(Relaxed)
            || self.unsynced.load(Relaxed)
            || self.pending.load(Relaxed) > 0
        {
            ServerState::Busy
        } else if self.tx_status.load(Relaxed) == b'I' {
            ServerState::Idle
        } else {
            ServerState::InTransaction
        }
    }

    /// Counts requests sent (+) and answered (-), never below zero. A load and a store rather
    /// than a locked read-modify-write: only the link's own task touches the state.
    fn change_pending(&self, delta: i64) {
        let pending = i64::from(self.pending.load(Relaxed)) + delta;
        self.pending.store(pending.max(0) as u32, Relaxed);
    }

    fn client_data_now(&self) {
        if let Some(started) = self.started {
            let ms = started.elapsed().as_millis() as u64;
            self.last_client_data_ms.store(ms, Relaxed);
        }
    }

    /// Notes when the server connection left Idle and became Busy; only with `started`
    /// set. Called after each read of either side has been followed.
    fn note_state(&self) {
        let Some(started) = self.started else {
            return;
        };
        let state = self.server_state();
        let mark = |since: &AtomicU64, on: bool| match (on, since.load(Relaxed) == u64::MAX) {
            (true, true) => since.store(started.elapsed().as_millis() as u64, Relaxed),
            (false, false) => since.store(u64::MAX, Relaxed),
            _ => {}
        };
        mark(
            &self.active_since_ms,
            (self.whole_link_active && !self.pinned.load(Relaxed)) || state != ServerState::Idle,
        );
        mark(&self.busy_since_ms, state == ServerState::Busy);
    }

    /// The instant `ms` milliseconds after `started`; `None` for `u64::MAX` (not set).
    fn at(&self, ms: &AtomicU64) -> Option<Instant> {
        let ms = ms.load(Relaxed);
        (ms != u64::MAX)
            .then_some(self.started?)
            .map(|s| s + Duration::from_millis(ms))
    }

    /// The first of the link's limits to pass, with when it passes.
    fn next_expiry(&self, settings: &PoolConfig) -> Option<(Instant, ClientError)> {
        let [idle_transaction, query, transaction] = time_limits(settings);
        let state = self.server_state();
        let idle_in_transaction = (state == ServerState::InTransaction)
            .then(|| self.at(&self.last_client_data_ms))
            .flatten();
        [
            (
                idle_in_transaction,
                idle_transaction,
                ClientError::IdleTransactionTimeout as fn(Duration) -> ClientError,
            ),
            (
                self.at(&self.busy_since_ms),
                query,
                ClientError::QueryTimeout,
            ),
            (
                self.at(&self.active_since_ms),
                transaction,
                ClientError::TransactionTimeout,
            ),
        ]
        .into_iter()
        .filter(|(_, limit, _)| !limit.is_zero())
        .filter_map(|(since, limit, error)| Some((since? + limit, error(limit))))
        .min_by_key(|(at, _)| *at)
    }
}

/// Resolves when a session-mode link's backend stops serving the listener's target.
type RoleLost<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

struct Link<'a> {
    mode: ListenerMode,
    settings: &'a PoolConfig,
    metrics: &'a Metrics,
    /// Transaction mode: what a statement that creates session state gets.
    session_state: Option<SessionStatePolicy>,
    /// The session's `pinned`: set when a transaction-mode client creates session state.
    pinned: &'a mut bool,
}

impl Link<'_> {
    fn refused(&self, feature: Feature) {
        debug!(
            feature = feature.name(),
            "session state: statement refused (session_state = \"reject\")"
        );
        self.metrics
            .session_state_refused
            .with_label_values(&[feature.name()])
            .inc();
    }

    /// With `session_state = "reject"`, the parameters the server reports: what a statement
    /// is classified with.
    fn refusing<'r>(&'r self, reported: &'r [String]) -> Option<Carried<'r>> {
        (self.session_state == Some(SessionStatePolicy::Reject)).then(|| self.carried(reported))
    }

    /// The parameters a SET of which is no session state: `reported` by the server, and
    /// the extra ones pgvane reads back.
    fn carried<'r>(&'r self, reported: &'r [String]) -> Carried<'r> {
        Carried {
            reported,
            extra: &self.settings.track_extra_parameters,
        }
    }

    /// Sends `data` from `skip` on with each statement that would create session state,
    /// from the one at `first` on, replaced by its refusal (see `with_rejections`).
    async fn send_refusing<W: AsyncWrite + Unpin>(
        &self,
        server: &mut W,
        data: &[u8],
        (skip, first): (usize, usize),
        reported: &[String],
        carry: &mut usize,
    ) -> std::io::Result<()> {
        let carried = self.carried(reported);
        let (out, refused) = with_rejections(data, data.len(), first, carried, carry);
        for feature in refused {
            self.refused(feature);
        }
        server.write_all(&out[skip..]).await
    }

    /// Pumps bytes between a client and its leased server connection until the link ends.
    /// Both directions run concurrently in this one task, so neither can stall the other,
    /// and they share their view of the protocol state through `LinkState`. Each socket is
    /// split into its read and write halves and driven only through tokio's own reads and
    /// writes, whose wake-ups tokio guarantees (its coop budget included).
    async fn run<C: ClientIo, S: ServerSplit>(
        self,
        client: &mut C,
        buf: &mut BytesMut,
        server: &mut ServerConn,
        overrides: &mut Vec<(String, String)>,
        statements: Option<&mut ClientStatements>,
        role_lost: Option<RoleLost<'_>>,
    ) -> LinkEnd {
        let timed = time_limits(self.settings).iter().any(|l| !l.is_zero());
        let st = LinkState::new(
            timed,
            self.mode == ListenerMode::Transaction,
            &server.counts,
        );
        let state = || st.server_state();

        let (mut client_r, mut client_w) = client.split();
        let ServerConn {
            stream,
            params,
            read_buf,
            prepared,
            reported_at_login,
            ..
        } = server;
        let reported_at_login = &*reported_at_login;
        // Pinned already (an earlier transaction of this client made session state), or
        // watched for it in transaction mode.
        st.pinned.store(*self.pinned, Relaxed);
        let Some((mut server_r, mut server_w)) = S::split(stream) else {
            // The caller picks `S` by the stream's kind.
            let error = ClientError::ServerLost("server stream of another kind".into());
            return LinkEnd::Failed {
                error,
                tell_client: true,
            };
        };
        let max_prepared = self.settings.max_prepared_statements as usize;
        let tracker = statements.map(|c| LazyTracker::new(c, prepared, max_prepared));

        let client_to_server = async {
            // read_buf fills spare capacity: no zeroing of a fresh buffer per transaction.
            // Bytes kept from the last round: the start of a message the tracker needs whole.
            let mut held = 0;
            let mut rewritten = BytesMut::new();
            let mut scan = Scanner::limited(b"", self.settings.max_packet_size);
            let mut copy_in_syncs = CopyInSyncs::default();
            // Bytes still to come of a Query refused (`session_state = "reject"`).
            let mut carry = 0;
            loop {
                if buf.len() == held {
                    make_room(buf, LINK_BUFFER);
                    match client_r.read_buf(buf).await {
                        Ok(0) | Err(_) => return LinkEnd::ClientGone(state()),
                        Ok(_) => {}
                    }
                }
                st.client_data_now();
                // Untracked bytes first; the tracker is engaged at the message that needs it.
                let (mut plain, mut then) = (buf.len(), Then::More);
                let engaged = match &tracker {
                    None => None,
                    Some(lazy) => match lazy.get() {
                        Some(t) => Some(t),
                        // Untracked, the link passes on no partial header: the scanner is
                        // never in the middle of one here.
                        None => match untracked(buf, scan.body_left().unwrap_or(0)) {
                            Ok((0, Then::Engage)) => {
                                // The tracker must know where the server's next message
                                // starts: not in the middle of a header, which the server
                                // completes without waiting for the client.
                                let server_body_left = std::future::poll_fn(|_| {
                                    match st.server_body_left.load(Relaxed) {
                                        usize::MAX => Poll::Pending,
                                        n => Poll::Ready(n),
                                    }
                                })
                                .await;
                                Some(lazy.engage(LinkPoint {
                                    ready_due: st.pending.load(Relaxed),
                                    copy_in_syncs,
                                    server_body_left,
                                }))
                            }
                            Ok((n, next)) => {
                                (plain, then) = (n, next);
                                None
                            }
                            Err(e) => {
                                return LinkEnd::Failed {
                                    error: e.into(),
                                    tell_client: !st.server_mid_message(),
                                }
                            }
                        },
                    },
                };
                let (data, consumed) = match engaged {
                    None => (&buf[..plain], plain),
                    Some(t) => {
                        match t.from_client(buf, &mut rewritten, self.refusing(reported_at_login)) {
                            Ok(o) => {
                                if o.barrier {
                                    then = Then::Barrier;
                                }
                                bump(&st.counts.client_parses, u64::from(o.client_parses));
                                for feature in &o.refused {
                                    self.refused(*feature);
                                }
                                (o.bytes(buf, &rewritten), o.consumed)
                            }
                            Err(error) => {
                                return LinkEnd::Failed {
                                    error,
                                    tell_client: !st.server_mid_message(),
                                }
                            }
                        }
                    }
                };

                let n = data.len();
                let mut terminate_at = None;
                let mut created = None;
                // Where the first statement to refuse starts: a plain value, so that the
                // common case keeps nothing more across the write below.
                let mut refuse_from = None;
                let scanned = scan.feed(data, |e| {
                    if let Event::Start { tag, at } = e {
                        let looking = match self.session_state {
                            Some(SessionStatePolicy::Pin) => created.is_none(),
                            Some(SessionStatePolicy::Reject) => true,
                            None => false,
                        };
                        let sql = match looking && matches!(tag, b'Q' | b'P') {
                            true => statement_text(data, tag, at),
                            false => None,
                        };
                        if let Some(sql) = sql {
                            let found = look(sql, self.carried(reported_at_login));
                            if found.sets_extra {
                                st.read_back.store(true, Relaxed);
                            }
                            match (found.state, self.session_state, tag) {
                                // A Parse creates nothing: a refused statement's Bind is
                                // pointed elsewhere by the tracker.
                                (_, Some(SessionStatePolicy::Reject), b'P') => {}
                                (Some(_), Some(SessionStatePolicy::Reject), _) => {
                                    refuse_from = refuse_from.or(Some(at as usize))
                                }
                                (found, _, _) => created = created.or(found),
                            }
                        }
                        match tag {
                            b'Q' | b'F' => st.request_sent(),
                            b'S' => {
                                st.request_sent();
                                st.unsynced.store(false, Relaxed);
                            }
                            b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => {
                                match tag {
                                    b'P' => bump(&st.counts.server_parses, 1),
                                    b'B' => bump(&st.counts.binds, 1),
                                    _ => {}
                                }
                                st.unsynced.store(true, Relaxed)
                            }
                            b'X' => terminate_at = terminate_at.or(Some(at)),
                            b'c' | b'f' => st.copy_in.store(false, Relaxed),
                            _ => {}
                        }
                        // Syncs the server ignored during a COPY owe no ReadyForQuery.
                        let ignored = copy_in_syncs.frontend(tag);
                        if ignored > 0 {
                            st.change_pending(-i64::from(ignored));
                        }
                    }
                });
                if let Err(e) = scanned {
                    return LinkEnd::Failed {
                        error: e.into(),
                        tell_client: !st.server_mid_message(),
                    };
                }
                st.client_mid_message.store(!scan.at_boundary(), Relaxed);
                if let Some(feature) = created {
                    if !st.pinned.swap(true, Relaxed) {
                        debug!(
                            feature = feature.name(),
                            "session state: client pinned to its server connection"
                        );
                        self.metrics.pinned_sessions.inc();
                    }
                    self.metrics
                        .session_state_pins
                        .with_label_values(&[feature.name()])
                        .inc();
                }
                st.note_state();
                // A Terminate is pgvane's to act on; the pooled server connection stays open.
                let upto = terminate_at.map_or(n, |at: isize| at.max(0) as usize);
                // The rest of a refused Query, read since: not sent.
                let dropped = carry.min(upto);
                carry -= dropped;
                // Counted before the write: nothing of it is kept across the wait.
                bump(&st.counts.bytes_up, (upto - dropped) as u64);
                if engaged.is_none() {
                    // Untracked, the client's Parses are those the server got.
                    let parses = st.counts.server_parses.load(Relaxed);
                    st.counts.client_parses.store(parses, Relaxed);
                }
                let written = match refuse_from {
                    None => server_w.write_all(&data[dropped..upto]).await,
                    // Boxed: a rare path, kept out of every transaction's future.
                    Some(first) => {
                        Box::pin(self.send_refusing(
                            &mut server_w,
                            &data[..upto],
                            (dropped, first),
                            reported_at_login,
                            &mut carry,
                        ))
                        .await
                    }
                };
                if written.is_err() {
                    return LinkEnd::ServerDied {
                        error: ClientError::ServerLost("cannot write to the server".into()),
                        tell_client: !st.server_mid_message(),
                    };
                }
                if let Some(at) = terminate_at {
                    st.client_mid_message.store(false, Relaxed);
                    // Mid-message, or in a COPY the server would wait on for ever: the
                    // server connection is closed, which ends (and rolls back) its work.
                    let s = if at < 0 || st.copy_in.load(Relaxed) {
                        ServerState::Broken
                    } else {
                        state()
                    };
                    // Requests sent before the Terminate are answered first, as PostgreSQL
                    // would (the other direction ends the link when they are); the client
                    // sends nothing more.
                    if s == ServerState::Busy && !st.unsynced.load(Relaxed) {
                        st.terminated.store(true, Relaxed);
                        return std::future::pending().await;
                    }
                    return LinkEnd::ClientGone(s);
                }
                keep_tail(buf, consumed);
                if then == Then::Barrier {
                    // What follows a query that may drop every prepared statement waits
                    // for its answer, so that the records are right before it is rewritten
                    // (in transaction mode the link may end meanwhile: the rest then
                    // starts the next transaction).
                    std::future::poll_fn(|_| match st.pending.load(Relaxed) {
                        0 => Poll::Ready(()),
                        _ => Poll::Pending,
                    })
                    .await;
                }
                // What is left is a partial message waiting for more, unless it starts with
                // the message that engages the tracker (whole enough to go on), or follows
                // a barrier.
                held = if then == Then::More { buf.len() } else { 0 };
            }
        };

        let server_to_client = async {
            let buf = read_buf;
            let mut rewritten = BytesMut::new();
            // CommandComplete too: a DISCARD ALL must reach the records while untracked.
            let mut scan = Scanner::new(b"ZSC");
            loop {
                make_room(buf, SERVER_READ_BUFFER);
                if let Ok(0) | Err(_) = server_r.read_buf(buf).await {
                    return LinkEnd::ServerDied {
                        error: ClientError::ServerLost("the server closed the connection".into()),
                        tell_client: scan.at_boundary(),
                    };
                }
                let engaged = tracker.as_ref().and_then(LazyTracker::get);
                let (data, consumed) = match engaged {
                    None => (&buf[..], buf.len()),
                    Some(t) => match t.from_server(buf, &mut rewritten) {
                        Ok(o) => (o.bytes(buf, &rewritten), o.consumed),
                        Err(e) => {
                            return LinkEnd::Failed {
                                error: ClientError::ServerLost(e.to_string()),
                                tell_client: false,
                            }
                        }
                    },
                };
                let mut ready_last = false;
                let scanned = scan.feed(data, |e| match e {
                    Event::Complete { tag: b'Z', body } => {
                        st.change_pending(-1);
                        st.copy_in.store(false, Relaxed);
                        let status = body.first().copied().unwrap_or(b'I');
                        st.tx_status.store(status, Relaxed);
                        st.count_ready(status);
                        ready_last = true;
                    }
                    Event::Complete { tag: b'S', body } => {
                        if let Some((k, v)) = parameter_status(body) {
                            if TRACKED.contains(&k) {
                                set_param(overrides, k, v.to_owned());
                            }
                            params.set(k, v);
                        }
                    }
                    Event::Complete { tag: b'C', body } => {
                        if let (Some(lazy), None) = (&tracker, engaged) {
                            if forgets_all(body) {
                                lazy.forget_all();
                            }
                        }
                    }
                    Event::Start { tag, .. } if tag != b'Z' => {
                        ready_last = false;
                        if tag == b'G' {
                            st.copy_in.store(true, Relaxed);
                        }
                    }
                    _ => {}
                });
                if let Err(e) = scanned {
                    return LinkEnd::Failed {
                        error: ClientError::ServerLost(e.to_string()),
                        tell_client: false,
                    };
                }
                st.server_body_left
                    .store(scan.body_left().unwrap_or(usize::MAX), Relaxed);
                st.note_state();
                bump(&st.counts.bytes_down, data.len() as u64);
                if client_w.write_all(data).await.is_err() {
                    return LinkEnd::ClientGone(state());
                }
                keep_tail(buf, consumed);
                // A COPY the client started along with its Terminate would wait for ever.
                if st.terminated.load(Relaxed) && st.copy_in.load(Relaxed) {
                    return LinkEnd::ClientGone(ServerState::Broken);
                }
                if st.terminated.load(Relaxed) && scan.at_boundary() && state() != ServerState::Busy
                {
                    return LinkEnd::ClientGone(state());
                }
                if self.mode == ListenerMode::Transaction
                    && ready_last
                    && scan.at_boundary()
                    && state() == ServerState::Idle
                    && !st.pinned.load(Relaxed)
                {
                    let read_back = st.read_back.load(Relaxed);
                    return LinkEnd::Idle { read_back };
                }
            }
        };

        // Its timers are boxed: the limits are off by default, and this future is part of
        // every transaction's. A state change does not wake it: it looks again at least
        // every shortest limit, so a limit passes at most that much late.
        let expiry = async {
            if !timed {
                return std::future::pending().await;
            }
            loop {
                // Computed in a block, so that nothing of it is kept across the wait.
                let wait = {
                    // The shortest limit that is on.
                    let shortest = time_limits(self.settings)
                        .into_iter()
                        .filter(|l| !l.is_zero())
                        .min()
                        .unwrap_or(Duration::MAX);
                    let now = Instant::now();
                    let until = match st.next_expiry(self.settings) {
                        Some((at, error)) if at <= now => {
                            return LinkEnd::Expired {
                                error,
                                tell_client: !st.server_mid_message(),
                                busy: state() == ServerState::Busy,
                            };
                        }
                        Some((at, _)) => at.min(now + shortest),
                        None => now + shortest,
                    };
                    Box::pin(tokio::time::sleep_until(until.into()))
                };
                wait.await;
            }
        };

        let role_lost = async {
            match role_lost {
                Some(lost) => lost.await,
                None => std::future::pending().await,
            }
        };

        // Biased: fairness among these branches buys nothing, and the random start would
        // cost a random number per wake-up.
        let end = tokio::select! {
            biased;
            end = server_to_client => end,
            end = client_to_server => end,
            end = expiry => end,
            _ = role_lost => LinkEnd::Failed {
                error: ClientError::ServerLost("the backend no longer serves this listener's target".into()),
                tell_client: !st.server_mid_message(),
            },
        };
        *self.pinned = st.pinned.load(Relaxed);
        end
    }
}

/// The statement text of a Query or Parse whose header starts at `at` in `data` (as much of
/// it as `data` holds); `None` when its header began in an earlier chunk.
fn statement_text(data: &[u8], tag: u8, at: isize) -> Option<&[u8]> {
    let at = usize::try_from(at).ok()?;
    let len = u32::from_be_bytes(data.get(at + 1..at + 5)?.try_into().ok()?) as usize;
    let body = data.get(at + 5..data.len().min(at + 1 + len))?;
    let text = if tag == b'P' {
        // After the statement's name.
        &body[memchr::memchr(0, body)? + 1..]
    } else {
        body
    };
    Some(memchr::memchr(0, text).map_or(text, |end| &text[..end]))
}

/// The buffer a link reads the client's requests into. Taken from, and given back to, a
/// small per-thread stock: a transaction then allocates none (8 KiB is past malloc's
/// per-thread cache), and an idle session holds none.
struct LinkBuffer(BytesMut);

thread_local! {
    static SPARE_LINK_BUFFERS: std::cell::RefCell<Vec<BytesMut>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare buffers kept per worker thread.
const SPARE_LINK_BUFFERS_MAX: usize = 64;

impl LinkBuffer {
    fn take() -> Self {
        Self(Self::spare_or_new())
    }

    fn spare_or_new() -> BytesMut {
        let spare = SPARE_LINK_BUFFERS.with_borrow_mut(Vec::pop);
        spare.unwrap_or_else(|| BytesMut::with_capacity(LINK_BUFFER))
    }

    fn holding(bytes: &[u8]) -> Self {
        let mut buf = Self::take();
        buf.extend_from_slice(bytes);
        buf
    }

    /// Swaps a link buffer for a copy of just what it holds, and gives the buffer back to
    /// the spares; [`LinkBuffer::restore`] undoes it.
    fn shed(buf: &mut BytesMut) {
        let compact = BytesMut::from(&buf[..]);
        drop(LinkBuffer(std::mem::replace(buf, compact)));
    }

    /// Makes a shed buffer a link buffer again (what it holds kept).
    fn restore(&mut self) {
        if self.0.capacity() < LINK_BUFFER {
            let compact = std::mem::replace(&mut self.0, Self::spare_or_new());
            self.0.extend_from_slice(&compact);
        }
    }
}

impl Drop for LinkBuffer {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        // Reclaims what reading advanced past; a shed buffer is let go.
        if !buf.try_reclaim(LINK_BUFFER) {
            return;
        }
        // One that grew for a large message is let go.
        if buf.capacity() <= 2 * LINK_BUFFER {
            SPARE_LINK_BUFFERS.with_borrow_mut(|spare| {
                if spare.len() < SPARE_LINK_BUFFERS_MAX {
                    spare.push(buf);
                }
            });
        }
    }
}

impl std::ops::Deref for LinkBuffer {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.0
    }
}

impl std::ops::DerefMut for LinkBuffer {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.0
    }
}

/// Reclaims (or grows) a buffer's room for a read of up to `size` bytes when it is low.
fn make_room(buf: &mut BytesMut, size: usize) {
    if buf.capacity() - buf.len() < size / 2 {
        buf.reserve(size);
    }
}

/// Drops the first `consumed` bytes, keeping the rest (an incomplete message start).
fn keep_tail(buf: &mut BytesMut, consumed: usize) {
    if consumed == buf.len() {
        buf.clear(); // keeps the whole allocation for the next read
    } else {
        buf.advance(consumed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn output_size<A, B, C, D, E, R>(_: impl Fn(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_pooled_session_task_stays_small() {
        // Every idle client costs this much in its task. tokio's task cell is the future
        // plus 112 bytes (header, scheduler, id, stage tag, trailer, and the TaskTracker's
        // token), rounded up to 128: up to 272 bytes of future it takes 384, past that 512.
        // The future was 896 bytes when arguments and the session were held twice, 312
        // while it kept the login's start and references beside its Arcs.
        let size = output_size(handle::<TcpStream>);
        assert!(size <= 272, "pooled session future is {size} bytes");
        let size = output_size(handle::<TlsClient>);
        assert!(size <= 272, "pooled TLS session future is {size} bytes");
    }

    #[test]
    fn a_waiting_request_keeps_its_bytes_not_a_link_buffer() {
        let mut first = LinkBuffer::holding(b"Q\0\0\0\x0dSELECT 1\0");
        let sent = first.to_vec();
        LinkBuffer::shed(&mut first);
        assert_eq!(first.capacity(), sent.len());
        assert_eq!(first[..], sent[..]);
        // The link buffer went back to the spares, and comes back with the bytes.
        assert!(SPARE_LINK_BUFFERS.with_borrow(|s| s.iter().any(|b| b.capacity() >= LINK_BUFFER)));
        first.restore();
        assert!(first.capacity() >= LINK_BUFFER);
        assert_eq!(first[..], sent[..]);
    }

    #[test]
    fn a_request_s_future_fits_the_allocator_s_fast_path() {
        // Both boxed once per request. mimalloc's fast path serves objects up to 1 KiB:
        // a link future of 1,064 bytes took ~180 more instructions per transaction
        // (callgrind, -S 32 clients), in mi_malloc_aligned's generic path.
        let size = output_size(Session::serve_request::<TcpStream>);
        assert!(size <= 1024, "per-request future is {size} bytes");
        let size = output_size7(Link::run::<TcpStream, PlainServer>);
        assert!(size <= 1024, "link future is {size} bytes");
        let size = output_size(Session::serve_request::<TlsClient>);
        assert!(size <= 1024, "per-request future (TLS) is {size} bytes");
        let size = output_size7(Link::run::<TlsClient, PlainServer>);
        assert!(size <= 1024, "link future (TLS client) is {size} bytes");
        let size = output_size7(Link::run::<TcpStream, TlsServer>);
        assert!(size <= 1024, "link future (TLS server) is {size} bytes");
        let size = output_size7(Link::run::<TlsClient, TlsServer>);
        assert!(size <= 1024, "link future (TLS both) is {size} bytes");
    }

    fn output_size7<A, B, C, D, E, F, G, R>(_: impl Fn(A, B, C, D, E, F, G) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A link read first polled when the task's coop budget is spent (tokio then answers
    /// Pending and wakes the task at once, registering nothing with the socket) must still be
    /// woken by data that arrives later. A hand-polled read that took that Pending for a
    /// registration slept through the data: a link streaming one way only (a large COPY)
    /// froze with the client's bytes unread.
    #[tokio::test]
    async fn a_link_read_polled_with_the_budget_spent_still_wakes() {
        use std::future::Future;
        use std::sync::atomic::AtomicUsize;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        // A first read drains the socket: its readiness is clear.
        peer.write_all(b"a").await.unwrap();
        let mut buf = BytesMut::with_capacity(64);
        s.split().0.read_buf(&mut buf).await.unwrap();

        let polls = Arc::new(AtomicUsize::new(0));
        let seen = polls.clone();
        let reader = tokio::spawn(async move {
            let (mut r, _w) = s.split();
            let mut read = std::pin::pin!(r.read_buf(&mut buf));
            let mut spent = false;
            std::future::poll_fn(|cx| {
                seen.fetch_add(1, Relaxed);
                if !spent {
                    spent = true;
                    while std::pin::pin!(tokio::task::coop::consume_budget())
                        .poll(cx)
                        .is_ready()
                    {}
                }
                read.as_mut().poll(cx)
            })
            .await
            .unwrap()
        });
        // Polled once with the budget spent, then again after tokio's immediate wake-up.
        while polls.load(Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
        peer.write_all(b"b").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the read is woken by the new data")
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn tracked_parameters_take_their_canonical_names() {
        let mut p = Vec::new();
        set_param(&mut p, "timezone", "UTC".into());
        set_param(&mut p, "TimeZone", "Europe/Paris".into());
        set_param(&mut p, "extra_float_digits", "3".into());
        assert_eq!(
            p,
            [
                ("TimeZone".to_string(), "Europe/Paris".to_string()),
                ("extra_float_digits".to_string(), "3".to_string())
            ]
        );
    }
}
