//! The admin console: PgBouncer's virtual database `pgbouncer` (also `pgvane`) on the pooled
//! listeners, simple query protocol only, with PgBouncer's SHOW commands (column names, order
//! and types as PgBouncer 1.25 sends them) and pgvane's own beside them.
//!
//! `admin_users` may run everything, `stats_users` only SHOW. SUSPEND is not offered: it
//! exists for PgBouncer's online restart, which pgvane does not do that way. With
//! `admin.unix_socket` the console also listens on a Unix socket, with peer authentication.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{
    AdminConfig, Config, GeneralConfig, ListenerConfig, ListenerMode, PoolConfig, PoolMode,
};
use crate::error::ClientError;
use crate::limits::CONSOLE_RESERVED_SLOTS;
use crate::pool::Pool;
use crate::protocol::{backend, put_message, read_message, ProtocolError};
use crate::protocol::{StartupPacket, PROTOCOL_MAJOR_3};
use crate::proxy::{read_client_startup, send_error, Pause, Shared};
use crate::registry::Entry;
use crate::stats::{self, Measure, Totals, PERCENTILES};
use crate::topology::Election;

/// Names of the virtual database.
pub const DATABASES: [&str; 2] = ["pgbouncer", "pgvane"];

/// How often WAIT_CLOSE looks again.
const CLOSE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Longest console query read (a command line, not data).
const MAX_QUERY: usize = 64 * 1024;

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `admin_users`: every command.
    Admin,
    /// `stats_users`: SHOW only.
    Stats,
}

/// What the console and the admin API need beyond the data path's shared state: the
/// configuration in force, replaced on reload.
pub struct Console {
    settings: ArcSwap<ConsoleSettings>,
    /// Client slots past `max_client_conn` for `admin_users` (none while there are none).
    pub reserved: Arc<Semaphore>,
}

struct ConsoleSettings {
    admin_users: Vec<String>,
    stats_users: Vec<String>,
    /// The HTTP API's bearer token for control requests.
    token: Option<String>,
    /// SHOW CONFIG rows: key, value, default.
    config: Vec<[String; 3]>,
    /// The listeners, for SHOW ROUTES and pool_mode.
    listeners: Vec<ListenerConfig>,
}

impl ConsoleSettings {
    fn of(config: &Config) -> Self {
        Self {
            admin_users: config.admin.admin_users.clone(),
            stats_users: config.admin.stats_users.clone(),
            token: config.admin.token.clone(),
            config: config_rows(config),
            listeners: config.listeners.clone(),
        }
    }
}

impl Console {
    pub fn new(config: &Config) -> Self {
        let console = Self {
            settings: ArcSwap::from_pointee(ConsoleSettings::of(config)),
            reserved: Arc::new(Semaphore::new(0)),
        };
        console.reserve(config);
        console
    }

    /// Takes the configuration in force (at start and on reload).
    pub fn reconfigure(&self, config: &Config) {
        self.settings.store(Arc::new(ConsoleSettings::of(config)));
        self.reserve(config);
    }

    /// Keeps the reserved slots while there are admin users (taken ones are given back
    /// as their sessions end, so a reload can only add the missing ones).
    fn reserve(&self, config: &Config) {
        if !config.admin.admin_users.is_empty() && self.reserved.available_permits() == 0 {
            self.reserved.add_permits(CONSOLE_RESERVED_SLOTS);
        }
    }

    /// What `user` may do on the console; `None`: not a console user.
    pub fn access(&self, user: &str) -> Option<Access> {
        let s = self.settings.load();
        if s.admin_users.iter().any(|u| u == user) {
            Some(Access::Admin)
        } else if s.stats_users.iter().any(|u| u == user) {
            Some(Access::Stats)
        } else {
            None
        }
    }

    /// `admin.token`, as in force.
    pub fn token(&self) -> Option<String> {
        self.settings.load().token.clone()
    }

    /// A pool's mode as SHOW POOLS' pool_mode: the one `set` by a `[[database]]` or
    /// `[[user]]` entry, else the pooled listeners' modes.
    fn pool_mode(&self, set: Option<PoolMode>) -> String {
        match set {
            Some(PoolMode::Session) => return "session".into(),
            Some(PoolMode::Transaction) => return "transaction".into(),
            None => {}
        }
        let settings = self.settings.load();
        let modes: BTreeSet<&str> = settings
            .listeners
            .iter()
            .filter_map(|l| match l.mode {
                ListenerMode::Session => Some("session"),
                ListenerMode::Transaction => Some("transaction"),
                ListenerMode::Passthrough => None,
            })
            .collect();
        modes.into_iter().collect::<Vec<_>>().join(",")
    }
}

/// SHOW CONFIG: every setting PgBouncer also has, with its value and default.
fn config_rows(config: &Config) -> Vec<[String; 3]> {
    let mut rows = Vec::new();
    let mut add = |value: toml::Value, default: toml::Value| {
        let (Some(value), Some(default)) = (value.as_table(), default.as_table()) else {
            return;
        };
        for (k, v) in value {
            let shown = |v: &toml::Value| match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            if v.is_table() {
                continue;
            }
            let d = default.get(k).map(shown).unwrap_or_default();
            rows.push([k.clone(), shown(v), d]);
        }
    };
    add(section(&config.general), section(&GeneralConfig::default()));
    add(section(&config.pool), section(&PoolConfig::default()));
    // stats_users read this: the token is shown as set, never as itself.
    let mut admin = config.admin.clone();
    if admin.token.is_some() {
        admin.token = Some("<redacted>".into());
    }
    add(section(&admin), section(&AdminConfig::default()));
    rows.sort();
    rows
}

/// A config section as a TOML table.
fn section<T: serde::Serialize>(v: &T) -> toml::Value {
    toml::Value::try_from(v).unwrap_or(toml::Value::Table(Default::default()))
}

/// Column types, as PgBouncer's `pktbuf_write_RowDescription` letters name them.
#[derive(Clone, Copy)]
enum Type {
    Text,
    Int4,
    Int8,
    Numeric,
    /// A timestamp sent as text (PgBouncer's `T`).
    Timestamp,
}

impl Type {
    fn oid(self) -> u32 {
        match self {
            Type::Text => 25,
            Type::Int4 => 23,
            Type::Int8 => 20,
            Type::Numeric => 1700,
            // PgBouncer sends its timestamps as text.
            Type::Timestamp => 25,
        }
    }

    fn size(self) -> i16 {
        match self {
            Type::Int4 => 4,
            Type::Int8 | Type::Timestamp => 8,
            Type::Text | Type::Numeric => -1,
        }
    }

    /// From PgBouncer's letter: s, i, q, N, T.
    fn of(letter: u8) -> Type {
        match letter {
            b'i' => Type::Int4,
            b'q' => Type::Int8,
            b'N' => Type::Numeric,
            b'T' => Type::Timestamp,
            _ => Type::Text,
        }
    }
}

/// One result set being written.
struct ResultSet<'a> {
    out: &'a mut BytesMut,
    rows: usize,
}

impl<'a> ResultSet<'a> {
    /// RowDescription of `names` typed by PgBouncer's type letters.
    fn new(out: &'a mut BytesMut, names: &[&str], types: &str) -> Self {
        debug_assert_eq!(names.len(), types.len());
        put_message(out, b'T', |b| {
            b.put_u16(names.len() as u16);
            for (name, t) in names.iter().zip(types.bytes()) {
                let t = Type::of(t);
                b.put_slice(name.as_bytes());
                b.put_u8(0);
                b.put_u32(0);
                b.put_u16(0);
                b.put_u32(t.oid());
                b.put_i16(t.size());
                b.put_i32(-1);
                b.put_u16(0);
            }
        });
        Self { out, rows: 0 }
    }

    /// A DataRow: `None` is NULL.
    fn row<S: AsRef<str>>(&mut self, values: impl IntoIterator<Item = Option<S>>) {
        let values: Vec<Option<S>> = values.into_iter().collect();
        put_message(self.out, b'D', |b| {
            b.put_u16(values.len() as u16);
            for v in &values {
                match v {
                    None => b.put_i32(-1),
                    Some(v) => {
                        b.put_i32(v.as_ref().len() as i32);
                        b.put_slice(v.as_ref().as_bytes());
                    }
                }
            }
        });
        self.rows += 1;
    }

    fn done(self) {
        let tag = format!("SHOW {}", self.rows);
        command_complete(self.out, &tag);
    }
}

fn command_complete(out: &mut BytesMut, tag: &str) {
    put_message(out, b'C', |b| {
        b.put_slice(tag.as_bytes());
        b.put_u8(0);
    });
}

/// An ErrorResponse (ERROR) or NoticeResponse with `code` and `message`.
fn notice_or_error(out: &mut BytesMut, tag: u8, severity: &str, code: &str, message: &str) {
    put_message(out, tag, |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            b.put_u8(field);
            b.put_slice(value.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    });
}

fn error(out: &mut BytesMut, code: &str, message: &str) {
    notice_or_error(out, b'E', "ERROR", code, message);
}

/// The rest of a console login after AuthenticationOk: what PgBouncer's console reports.
pub fn greet(out: &mut BytesMut) {
    for (k, v) in [
        (
            "server_version",
            concat!(env!("CARGO_PKG_VERSION"), "/pgvane"),
        ),
        ("client_encoding", "UTF8"),
        ("server_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("TimeZone", "UTC"),
        ("standard_conforming_strings", "on"),
        ("integer_datetimes", "on"),
    ] {
        backend::parameter_status(out, k, v);
    }
    backend::backend_key_data(out, 0, 0);
    backend::ready_for_query(out, b'I');
}

/// A console user, logged in.
pub struct ConsoleLogin {
    pub user: String,
    pub access: Access,
    /// What the client sent past its login.
    pub early: Vec<u8>,
}

/// Console sessions on the Unix socket at once: an operator's handful; more are closed.
const UNIX_SESSIONS: usize = 16;

/// Binds the console's Unix socket (`admin.unix_socket`), readable and writable by pgvane's
/// own user only. A socket left there (a pgvane that did not stop cleanly, or the one an
/// upgrade replaces) is replaced; any other file is not.
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the console on its Unix socket until `stop`.
pub async fn serve_unix(listener: UnixListener, shared: Arc<Shared>, stop: CancellationToken) {
    let sessions = Arc::new(Semaphore::new(UNIX_SESSIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "admin console Unix socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            debug!("admin console Unix socket: {UNIX_SESSIONS} sessions open; connection closed");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let limit = shared.client_login_timeout();
            let login = tokio::time::timeout(limit, unix_login(&mut stream, &shared)).await;
            let error = match login {
                Ok(Ok(Some(login))) => return serve(stream, "unix socket", login, shared).await,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => e,
                Err(_) => ClientError::LoginTimeout(limit),
            };
            info!(sqlstate = %error.sqlstate(), error = %error, "admin console login refused on the Unix socket");
            send_error(&mut stream, &error, &shared.metrics).await;
        });
    }
}

/// A login on the console's Unix socket: peer authentication (see `admin.unix_socket`).
/// `None`: not a login (a cancel request), closed without an answer.
async fn unix_login(
    stream: &mut UnixStream,
    shared: &Shared,
) -> Result<Option<ConsoleLogin>, ClientError> {
    let params = match read_client_startup(stream)
        .await
        .map_err(ClientError::BadStartup)?
    {
        StartupPacket::Startup { major, minor, .. } if major != PROTOCOL_MAJOR_3 => {
            return Err(ClientError::UnsupportedProtocol { major, minor })
        }
        StartupPacket::Startup { params, .. } => params,
        _ => return Ok(None),
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let user = param("user").ok_or(ClientError::NoUser)?;
    let database = param("database").unwrap_or_else(|| user.clone());
    if !DATABASES.contains(&database.as_str()) {
        // This socket serves the console only.
        return Err(ClientError::NoSuchDatabase(database));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    if uid != Some(own) && uid != Some(0) {
        return Err(ClientError::PeerAuthFailed(user));
    }
    let access = shared
        .console
        .access(&user)
        .or(DATABASES.contains(&user.as_str()).then_some(Access::Admin))
        .ok_or_else(|| ClientError::NotConsoleUser(user.clone()))?;
    let mut reply = BytesMut::new();
    backend::authentication_ok(&mut reply);
    greet(&mut reply);
    stream
        .write_all(&reply)
        .await
        .map_err(crate::protocol::ProtocolError::from)?;
    Ok(Some(ConsoleLogin {
        user,
        access,
        early: Vec::new(),
    }))
}

/// Serves a logged-in console user until it leaves.
pub async fn serve<S>(
    client: S,
    peer: impl std::fmt::Display,
    login: ConsoleLogin,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let ConsoleLogin {
        user,
        access,
        early,
    } = login;
    info!(client = %peer, user, ?access, "admin console user logged in");
    let (user, shared) = (&user[..], &shared);
    let (read, mut write) = tokio::io::split(client);
    let mut read = tokio::io::AsyncReadExt::chain(&early[..], read);
    let mut out = BytesMut::new();
    // An extended-protocol request is refused once, then skipped up to its Sync, which gets
    // the ReadyForQuery (as PostgreSQL answers a failed extended request).
    let mut skipping = false;
    loop {
        let message = match read_message(&mut read, MAX_QUERY).await {
            Ok(m) => m,
            Err(ProtocolError::Io(_)) => return,
            Err(e) => {
                error(&mut out, "08P01", &e.to_string());
                let _ = write.write_all(&out).await;
                return;
            }
        };
        out.clear();
        match message.tag {
            b'X' => return,
            b'Q' => {
                let text = String::from_utf8_lossy(&message.body);
                let text = text.trim_end_matches('\0');
                run(&mut out, text, user, access, shared).await;
            }
            b'S' if skipping => skipping = false,
            _ if skipping => continue,
            tag => {
                error(
                    &mut out,
                    "08P01",
                    "the admin console speaks the simple query protocol only",
                );
                if tag != b'S' {
                    skipping = true;
                    let _ = write.write_all(&out).await;
                    continue;
                }
            }
        }
        backend::ready_for_query(&mut out, b'I');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Runs one console query: `;`-separated commands, each answered in turn.
async fn run(out: &mut BytesMut, text: &str, user: &str, access: Access, shared: &Arc<Shared>) {
    let commands: Vec<&str> = text
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if commands.is_empty() {
        put_message(out, b'I', |_| {});
        return;
    }
    for command in commands {
        let words: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        let verb = words[0].to_ascii_uppercase();
        let arg = words.get(1).map(|w| w.trim_matches('"').to_owned());
        if access == Access::Stats && verb != "SHOW" {
            error(
                out,
                "42501",
                "admin access needed: only SHOW is open to stats_users",
            );
            return;
        }
        match verb.as_str() {
            "SHOW" => {
                let what = arg.as_deref().unwrap_or("").to_ascii_uppercase();
                if !show(out, &what, shared) {
                    error(
                        out,
                        "42601",
                        &format!("invalid command 'SHOW {what}', use SHOW HELP;"),
                    );
                    return;
                }
            }
            "PAUSE" => {
                info!(
                    user,
                    database = arg.as_deref(),
                    "PAUSE requested on the console"
                );
                if let Err(e) = super::pause_and_wait(shared, arg).await {
                    error(out, "3D000", &e.to_string());
                    return;
                }
                command_complete(out, "PAUSE");
            }
            "DISABLE" | "ENABLE" if !is_backend(&arg) => {
                let Some(db) = arg else {
                    error(out, "42601", &format!("{verb} needs a database name"));
                    return;
                };
                let disable = verb == "DISABLE";
                info!(user, database = %db, disable, "database access change requested on the console");
                shared.disabled.set(&db, disable);
                command_complete(out, &verb);
            }
            "WAIT_CLOSE" => {
                // PgBouncer's: returns once no server connection of `db` (of any with none)
                // is still waiting to be closed (after RECONNECT or a reload).
                let waiting = |e: &Arc<Entry>| {
                    e.close_needed() && arg.as_deref().is_none_or(|d| d == &*e.database)
                };
                while shared.pools.servers.entries().iter().any(waiting) {
                    tokio::time::sleep(CLOSE_POLL).await;
                }
                command_complete(out, "WAIT_CLOSE");
            }
            "RECONNECT" => {
                let replaced = shared.pools.reconnect(arg.as_deref());
                info!(
                    user,
                    database = arg.as_deref(),
                    pools = replaced,
                    "RECONNECT: server connections close as they are released"
                );
                command_complete(out, "RECONNECT");
            }
            "SHUTDOWN" => {
                let how = match arg.as_deref().map(str::to_ascii_uppercase).as_deref() {
                    None => super::Shutdown::Now,
                    Some("WAIT_FOR_SERVERS") => super::Shutdown::WaitForServers,
                    Some("WAIT_FOR_CLIENTS") => super::Shutdown::WaitForClients,
                    Some(other) => {
                        error(out, "42601", &format!("SHUTDOWN {other}: use SHUTDOWN, SHUTDOWN WAIT_FOR_SERVERS or SHUTDOWN WAIT_FOR_CLIENTS"));
                        return;
                    }
                };
                info!(user, ?how, "SHUTDOWN requested on the console");
                let _ = shared.shutdowns.try_send(how);
                command_complete(out, "SHUTDOWN");
            }
            "DRAIN" | "ENABLE" if is_backend(&arg) => {
                let Some(name) = words.get(2) else {
                    error(
                        out,
                        "42601",
                        &format!("{verb} BACKEND needs a backend name"),
                    );
                    return;
                };
                let on = verb == "DRAIN";
                info!(user, backend = %name, drain = on, "backend drain change requested on the console");
                if let Err(e) = super::drain(shared, name, on) {
                    error(out, "42704", &e.to_string());
                    return;
                }
                command_complete(out, &verb);
            }
            "RELOAD" => {
                info!(user, "RELOAD requested on the console");
                match shared.reloads.reload().await {
                    Ok(report) => {
                        notice_or_error(out, b'N', "NOTICE", "00000", &report.to_string());
                        command_complete(out, "RELOAD");
                    }
                    Err(why) => {
                        // config_file_error: nothing was changed.
                        error(
                            out,
                            "F0000",
                            &format!("reload refused, nothing changed: {why}"),
                        );
                        return;
                    }
                }
            }
            "KILL" => {
                info!(
                    user,
                    database = arg.as_deref(),
                    "KILL requested on the console"
                );
                if let Err(e) = super::kill(shared, arg) {
                    error(out, "3D000", &e.to_string());
                    return;
                }
                command_complete(out, "KILL");
            }
            "KILL_CLIENT" => {
                let Some(id) = arg.as_deref().and_then(|a| a.parse().ok()) else {
                    error(
                        out,
                        "42601",
                        "KILL_CLIENT needs a client id (the id column of SHOW CLIENTS)",
                    );
                    return;
                };
                info!(user, id, "KILL_CLIENT requested on the console");
                if let Err(e) = super::kill_client(shared, id) {
                    error(out, "42704", &e.to_string());
                    return;
                }
                command_complete(out, "KILL_CLIENT");
            }
            "RESUME" => {
                info!(
                    user,
                    database = arg.as_deref(),
                    "RESUME requested on the console"
                );
                if let Err(e) = super::resume(shared, arg.as_deref()) {
                    error(out, "55000", &e.to_string());
                    return;
                }
                command_complete(out, "RESUME");
            }
            _ => {
                error(
                    out,
                    "42601",
                    &format!("invalid command '{command}', use SHOW HELP;"),
                );
                return;
            }
        }
    }
}

/// Whether a command's first argument is the word BACKEND (DRAIN/ENABLE BACKEND name).
fn is_backend(arg: &Option<String>) -> bool {
    arg.as_deref()
        .is_some_and(|a| a.eq_ignore_ascii_case("backend"))
}

/// Writes the answer to SHOW `what`; false if there is no such SHOW.
fn show(out: &mut BytesMut, what: &str, shared: &Shared) -> bool {
    match what {
        "HELP" => {
            let help = "Console usage\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|USERS|LISTS|STATE|VERSION\n\tSHOW BACKENDS|ROUTES|LATENCY (pgvane)\n\tPAUSE [<db>]\n\tRESUME [<db>]\n\tDISABLE <db>\n\tENABLE <db>\n\tKILL [<db>]\n\tKILL_CLIENT <id>\n\tRECONNECT [<db>]\n\tWAIT_CLOSE [<db>]\n\tRELOAD\n\tSHUTDOWN [WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS]\n\tDRAIN BACKEND <name>\n\tENABLE BACKEND <name>";
            notice_or_error(out, b'N', "NOTICE", "00000", help);
            command_complete(out, "SHOW");
        }
        "VERSION" => {
            let mut rs = ResultSet::new(out, &["version"], "s");
            rs.row([Some(format!("pgvane {}", crate::VERSION))]);
            rs.done();
        }
        "STATE" => {
            let paused = *shared.paused.borrow() == Pause::All;
            let mut rs = ResultSet::new(out, &["key", "value"], "ss");
            for (k, v) in [
                ("active", !paused),
                ("paused", paused),
                ("suspended", false),
            ] {
                rs.row([Some(k), Some(if v { "yes" } else { "no" })]);
            }
            rs.done();
        }
        "CONFIG" => {
            let mut rs = ResultSet::new(out, &["key", "value", "default", "changeable"], "ssss");
            for [k, v, d] in &shared.console.settings.load().config {
                rs.row([Some(k.as_str()), Some(v), Some(d), Some("no")]);
            }
            rs.done();
        }
        "POOLS" => show_pools(out, shared),
        "STATS" => {
            let names: Vec<String> = std::iter::once("database".to_owned())
                .chain(
                    TOTALS_COLUMNS
                        .iter()
                        .map(|c| format!("total_{}", total_name(c))),
                )
                .chain(
                    TOTALS_COLUMNS
                        .iter()
                        .map(|c| format!("avg_{}", avg_name(c))),
                )
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let types = format!("s{}", "N".repeat(24));
            let mut rs = ResultSet::new(out, &names, &types);
            let averages: BTreeMap<String, Totals> =
                shared.pools.stats.averages().into_iter().collect();
            for (db, totals) in shared.pools.stats.totals() {
                let avg = averages.get(&db).copied().unwrap_or_default();
                let values = totals.values().into_iter().chain(avg.values());
                rs.row(std::iter::once(Some(db)).chain(values.map(|v| Some(v.to_string()))));
            }
            rs.done();
        }
        "STATS_TOTALS" | "STATS_AVERAGES" => {
            let averages = what == "STATS_AVERAGES";
            let names: Vec<String> = std::iter::once("database".to_owned())
                .chain(TOTALS_COLUMNS.iter().enumerate().map(|(i, c)| {
                    // PgBouncer's quirk: in STATS_AVERAGES only the last four carry avg_.
                    match averages && i >= 8 {
                        true => format!("avg_{c}"),
                        false => (*c).to_owned(),
                    }
                }))
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let types = format!("s{}", "N".repeat(12));
            let mut rs = ResultSet::new(out, &names, &types);
            let rows = match averages {
                true => shared.pools.stats.averages(),
                false => shared.pools.stats.totals(),
            };
            for (db, t) in rows {
                rs.row(std::iter::once(Some(db)).chain(t.values().map(|v| Some(v.to_string()))));
            }
            rs.done();
        }
        "TOTALS" => {
            let (totals, averages) = shared.pools.stats.overall();
            let mut rs = ResultSet::new(out, &["name", "value"], "sN");
            for (prefix, values) in [("total", totals.values()), ("avg", averages.values())] {
                for (name, v) in TOTALS_ROWS.iter().zip(values) {
                    rs.row([Some(format!("{prefix}_{name}")), Some(v.to_string())]);
                }
            }
            rs.done();
        }
        "DATABASES" => show_databases(out, shared),
        "USERS" => show_users(out, shared),
        "LISTS" => {
            let pools = shared.pools.all();
            let databases: BTreeSet<&str> = pools.iter().map(|p| &*p.key.database).collect();
            let users: BTreeSet<&str> = pools.iter().map(|p| &*p.key.user).collect();
            let pairs: BTreeSet<(&str, &str)> = pools
                .iter()
                .map(|p| (&*p.key.database, &*p.key.user))
                .collect();
            let slots = shared.max_client_conn() as usize;
            let clients = slots.saturating_sub(shared.client_slots.available_permits());
            let idle: usize = pools.iter().map(|p| p.idle_connections()).sum();
            let open: usize = pools.iter().map(|p| p.open_connections()).sum();
            let mut rs = ResultSet::new(out, &["list", "items"], "si");
            for (k, v) in [
                ("databases", databases.len()),
                ("users", users.len()),
                ("pools", pairs.len()),
                ("free_clients", shared.client_slots.available_permits()),
                ("used_clients", clients),
                ("login_clients", 0),
                ("free_servers", idle),
                ("used_servers", open - idle),
                ("dns_names", 0),
                ("dns_zones", 0),
                ("dns_queries", 0),
                ("dns_pending", 0),
            ] {
                rs.row([Some(k.to_owned()), Some(v.to_string())]);
            }
            rs.done();
        }
        "CLIENTS" => show_sockets(out, "C", &shared.clients.entries(), shared),
        "SERVERS" => show_sockets(out, "S", &shared.pools.servers.entries(), shared),
        "BACKENDS" => show_backends(out, shared),
        "ROUTES" => show_routes(out, shared),
        "LATENCY" => show_latency(out, shared),
        _ => return false,
    }
    true
}

/// SHOW STATS_TOTALS' columns (without the `database` one).
const TOTALS_COLUMNS: [&str; 12] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
    "client_login_count",
];

/// SHOW TOTALS' row names (after `total_` and `avg_`): PgBouncer's field names there.
const TOTALS_ROWS: [&str; 12] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "client_bytes",
    "server_bytes",
    "xact_time",
    "query_time",
    "wait_time",
    "ps_client_parse_count",
    "ps_server_parse_count",
    "ps_bind_count",
    "client_login_count",
];

/// SHOW STATS' name of a total: `total_received`, not `total_bytes_received`.
fn total_name(column: &str) -> &str {
    column.strip_prefix("bytes_").unwrap_or(column)
}

/// SHOW STATS' name of an average: `avg_recv`, `avg_sent`.
fn avg_name(column: &str) -> &str {
    match column {
        "bytes_received" => "recv",
        "bytes_sent" => "sent",
        c => c,
    }
}

/// Every pool, over all backends, grouped by `key` (a database, a user, or both), in
/// order.
fn pools_by<K: Ord>(shared: &Shared, key: impl Fn(&Pool) -> K) -> BTreeMap<K, Vec<Arc<Pool>>> {
    let mut groups: BTreeMap<K, Vec<_>> = BTreeMap::new();
    for pool in shared.pools.all() {
        groups.entry(key(&pool)).or_default().push(pool);
    }
    groups
}

fn show_pools(out: &mut BytesMut, shared: &Shared) {
    let names = [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
        "load_balance_hosts",
    ];
    let mut rs = ResultSet::new(out, &names, "ssiiiiiiiiiiiiiss");
    let pairs = pools_by(shared, |p| {
        (p.key.database.to_string(), p.key.user.to_string())
    });
    for ((db, user), pools) in pairs {
        let sum = |f: &dyn Fn(&Arc<Pool>) -> usize| pools.iter().map(f).sum::<usize>();
        let waiting = sum(&|p| p.waiting_clients());
        let clients = sum(&|p| p.clients());
        let maxwait = pools
            .iter()
            .filter_map(|p| p.longest_wait())
            .max()
            .unwrap_or_default();
        let n = |v: usize| Some(v.to_string());
        rs.row([
            Some(db),
            Some(user),
            n(clients.saturating_sub(waiting)),
            n(waiting),
            n(0),
            n(0),
            n(sum(&|p| p.busy_connections())),
            n(0),
            n(0),
            n(sum(&|p| p.idle_connections())),
            n(0),
            n(0),
            n(0),
            Some(maxwait.as_secs().to_string()),
            Some(maxwait.subsec_micros().to_string()),
            Some(shared.console.pool_mode(pools[0].shape().mode)),
            None,
        ]);
    }
    rs.done();
}

fn show_databases(out: &mut BytesMut, shared: &Shared) {
    let names = [
        "name",
        "host",
        "port",
        "database",
        "force_user",
        "pool_size",
        "min_pool_size",
        "reserve_pool_size",
        "server_lifetime",
        "pool_mode",
        "load_balance_hosts",
        "max_connections",
        "current_connections",
        "max_client_connections",
        "current_client_connections",
        "paused",
        "disabled",
    ];
    let settings = shared.pools.settings();
    let paused = shared.paused.borrow().clone();
    let mut databases = pools_by(shared, |p| p.key.database.to_string());
    // Listed databases no client used yet are shown too, as PgBouncer shows its entries,
    // and those paused or disabled (KILL leaves no pool behind).
    let paused_dbs = match &paused {
        crate::proxy::Pause::Databases(dbs) => dbs.clone(),
        _ => BTreeSet::new(),
    };
    let marked = shared.pools.listed_databases().into_iter();
    for db in marked.chain(paused_dbs).chain(shared.disabled.all()) {
        databases.entry(db).or_default();
    }
    let mut rs = ResultSet::new(out, &names, "ssissiiiissiiiiii");
    for (db, pools) in databases {
        let shape = shared.pools.database_shape(&db);
        let backends: BTreeSet<(&str, u16)> = pools
            .iter()
            .map(|p| (p.backend().host.as_str(), p.backend().port))
            .collect();
        let hosts: Vec<&str> = backends.iter().map(|(h, _)| *h).collect();
        let port = backends.iter().next().map_or(0, |(_, p)| *p);
        let open: usize = pools.iter().map(|p| p.open_connections()).sum();
        let clients: usize = pools.iter().map(|p| p.clients()).sum();
        let n = |v: u64| Some(v.to_string());
        rs.row([
            Some(db.clone()),
            Some(hosts.join(",")),
            n(port.into()),
            Some(shape.dbname),
            None,
            n(shape.pool_size.into()),
            n(shape.min_pool_size.into()),
            n(shape.reserve_pool_size.into()),
            n(settings.server_lifetime.as_secs()),
            Some(shared.console.pool_mode(shape.mode)),
            None,
            n(shape.max_db_connections.into()),
            n(open as u64),
            n(0),
            n(clients as u64),
            n(u64::from(paused.holds(Some(&db)))),
            n(u64::from(shared.disabled.contains(&db))),
        ]);
    }
    rs.done();
}

fn show_users(out: &mut BytesMut, shared: &Shared) {
    let names = [
        "name",
        "pool_size",
        "reserve_pool_size",
        "pool_mode",
        "max_user_connections",
        "current_connections",
        "max_user_client_connections",
        "current_client_connections",
    ];
    let users = pools_by(shared, |p| p.key.user.to_string());
    let mut rs = ResultSet::new(out, &names, "siisiiii");
    for (user, pools) in users {
        let open: usize = pools.iter().map(|p| p.open_connections()).sum();
        let clients: usize = pools.iter().map(|p| p.clients()).sum();
        // A user's pools on different databases may differ: the first one speaks for it.
        let shape = pools[0].shape();
        let n = |v: usize| Some(v.to_string());
        rs.row([
            Some(user),
            n(shape.pool_size as usize),
            n(shape.reserve_pool_size as usize),
            Some(shared.console.pool_mode(shape.mode)),
            n(shape.max_user_connections as usize),
            n(open),
            n(0),
            n(clients),
        ]);
    }
    rs.done();
}

/// SHOW CLIENTS (`kind` "C") and SHOW SERVERS ("S"): PgBouncer's columns, one row per
/// open session or server connection. `ptr` and `link` are the entries' ids in hex, so a
/// client and its server connection name each other.
fn show_sockets(out: &mut BytesMut, kind: &str, entries: &[Arc<Entry>], shared: &Shared) {
    let names = [
        "type",
        "user",
        "database",
        "replication",
        "state",
        "addr",
        "port",
        "local_addr",
        "local_port",
        "connect_time",
        "request_time",
        "wait",
        "wait_us",
        "close_needed",
        "ptr",
        "link",
        "remote_pid",
        "tls",
        "application_name",
        "prepared_statements",
        "id",
    ];
    let table = shared.topology.snapshot();
    // A server connection whose pool was replaced, or to a drained backend, closes when
    // released.
    let draining = |e: &Entry| {
        let same = |v: &crate::topology::BackendView| {
            let ip = v.backend.host.parse::<std::net::IpAddr>();
            v.backend.port == e.addr().port() && ip.map_or(true, |ip| ip == e.addr().ip())
        };
        kind == "S" && table.backends.iter().any(|v| v.draining && same(v))
    };
    let mut rs = ResultSet::new(out, &names, "ssssssisiTTiiississii");
    for e in entries {
        let waited = e.waited();
        let link = e.link();
        rs.row([
            Some(kind.to_owned()),
            Some(e.user.to_string()),
            Some(e.database.to_string()),
            Some("none".to_owned()),
            Some(e.state().as_str().to_owned()),
            Some(e.addr().ip().to_string()),
            Some(e.addr().port().to_string()),
            Some(e.local_addr().ip().to_string()),
            Some(e.local_addr().port().to_string()),
            Some(timestamp(e.connect_time())),
            Some(e.request_time().map(timestamp).unwrap_or_default()),
            Some(waited.as_secs().to_string()),
            Some(waited.subsec_micros().to_string()),
            Some(u8::from(e.close_needed() || draining(e)).to_string()),
            Some(format!("{:#x}", e.id)),
            Some(if link == 0 {
                String::new()
            } else {
                format!("{link:#x}")
            }),
            Some(e.remote_pid.to_string()),
            Some(e.tls().to_string()),
            Some(e.application_name().to_string()),
            Some(e.prepared().to_string()),
            Some(e.id.to_string()),
        ]);
    }
    rs.done();
}

/// A time as PgBouncer shows it: `2026-11-30 23:38:13 UTC`.
fn timestamp(t: std::time::SystemTime) -> String {
    let rfc = humantime::format_rfc3339_seconds(t).to_string();
    rfc.replacen('T', " ", 1).replace('Z', " UTC")
}

/// pgvane's SHOW BACKENDS: each backend's role and health as the last checks saw them.
fn show_backends(out: &mut BytesMut, shared: &Shared) {
    let table = shared.topology.snapshot();
    let details = shared.topology.details();
    let names = [
        "name",
        "host",
        "port",
        "role",
        "serving",
        "suspect",
        "lag_bytes",
        "replay_delay_ms",
        "active_sessions",
        "draining",
        "server_connections",
        "last_check",
        "check_ms",
        "last_error",
    ];
    let mut rs = ResultSet::new(out, &names, "ssissiqqiiisNs");
    for b in &table.backends {
        let d = details
            .backends
            .get(&b.backend.name)
            .cloned()
            .unwrap_or_default();
        rs.row([
            Some(b.backend.name.clone()),
            Some(b.backend.host.clone()),
            Some(b.backend.port.to_string()),
            Some(b.role.as_str().to_owned()),
            Some(b.serving.as_str().to_owned()),
            Some(u8::from(b.suspect).to_string()),
            d.lag_bytes.map(|v| v.to_string()),
            d.replay_delay_ms.map(|v| v.to_string()),
            Some(b.backend.active_sessions().to_string()),
            Some(u8::from(b.draining).to_string()),
            Some(super::server_connections(shared, &b.backend.name).to_string()),
            d.last_check.clone(),
            d.check_ms.map(|ms| format!("{ms:.3}")),
            d.last_error.clone(),
        ]);
    }
    rs.done();
}

/// pgvane's SHOW LATENCY: per pool (database, user), the count and p50/p95/p99 of
/// transaction time, query time and pool wait over the last one to two minutes, in
/// microseconds, from HDR-style histograms (within about 3 %).
fn show_latency(out: &mut BytesMut, shared: &Shared) {
    let mut names = vec!["database".to_owned(), "user".to_owned()];
    for m in Measure::ALL {
        let m = m.as_str();
        names.push(format!("{m}_count"));
        for p in PERCENTILES {
            names.push(format!("{m}_p{}_us", (p * 100.0).round()));
        }
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let types = format!("ss{}", "q".repeat(names.len() - 2));
    let mut rs = ResultSet::new(out, &names, &types);
    let pairs = pools_by(shared, |p| {
        (p.key.database.to_string(), p.key.user.to_string())
    });
    for ((db, user), pools) in pairs {
        let mut window = pools[0].latency.window();
        for pool in &pools[1..] {
            for (into, from) in window.iter_mut().zip(pool.latency.window().iter()) {
                stats::merge(into, from);
            }
        }
        let mut row = vec![Some(db), Some(user)];
        for h in &window {
            let (count, p) = stats::percentiles(h);
            row.push(Some(count.to_string()));
            row.extend(p.map(|v| v.map(|v| v.to_string())));
        }
        rs.row(row);
    }
    rs.done();
}

/// pgvane's SHOW ROUTES: each listener's target and the backends it routes to now.
fn show_routes(out: &mut BytesMut, shared: &Shared) {
    let table = shared.topology.snapshot();
    let names = [
        "listener",
        "mode",
        "target",
        "backends",
        "generation",
        "primary",
    ];
    let primary = match &table.election {
        Election::Elected(i) => Some(table.backends[*i].backend.name.clone()),
        Election::None | Election::Ambiguous(_) => None,
    };
    let mut rs = ResultSet::new(out, &names, "ssssqs");
    for l in &shared.console.settings.load().listeners {
        let backends: Vec<&str> = (0..table.backends.len())
            .filter(|&i| table.qualifies(i, l.target, l.fallback_to_primary))
            .map(|i| table.backends[i].backend.name.as_str())
            .collect();
        let mode = match l.mode {
            ListenerMode::Passthrough => "passthrough",
            ListenerMode::Session => "session",
            ListenerMode::Transaction => "transaction",
        };
        rs.row([
            Some(l.name.clone()),
            Some(mode.to_owned()),
            Some(l.target.to_string()),
            Some(backends.join(",")),
            Some(table.generation.to_string()),
            primary.clone(),
        ]);
    }
    rs.done();
}
