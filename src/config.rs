//! Configuration: the TOML file format, its defaults, and validation.
//!
//! This module owns everything an operator writes. Parsing is strict (unknown keys are
//! rejected) and validation collects *every* problem at once, each naming the key it is
//! about and what would be accepted, so `pgvane check` can print them all in one go.
//! Nothing here touches the network; the rest of pgvane receives a validated [`Config`].

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A validated pgvane configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub general: GeneralConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    // Skipped when empty: TOML would print `user = []` above the tables (`pgvane check`).
    #[serde(rename = "user", default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserConfig>,
    #[serde(rename = "database", default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<DatabaseConfig>,
    #[serde(rename = "backend", default)]
    pub backends: Vec<BackendConfig>,
    #[serde(rename = "listener", default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub tls: TlsConfig,
}

/// TLS toward clients, with PgBouncer's names and values: `[tls]` for every pooled
/// listener, a listener's `tls` table overriding keys for it. Unset keys: TLS off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tls_sslmode: Option<ClientSslMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tls_key_file: Option<PathBuf>,
    /// CA certificates client certificates are verified against (verify-ca, verify-full).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tls_ca_file: Option<PathBuf>,
    /// "secure" (TLS 1.2 and 1.3, the default), "all" (the same: pgvane has nothing older),
    /// or a list of "tlsv1.2", "tlsv1.3".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tls_protocols: Option<String>,
    /// "default" (rustls' cipher suites, all of them strong), or a colon-separated list of
    /// suite names, e.g. "TLS13_AES_256_GCM_SHA384:TLS13_CHACHA20_POLY1305_SHA256".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tls_ciphers: Option<String>,
    /// TLS toward PostgreSQL (server connections and health checks; `[tls]` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_tls_sslmode: Option<ServerSslMode>,
    /// CA certificates the server's certificate is verified against (verify-ca,
    /// verify-full).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_tls_ca_file: Option<PathBuf>,
    /// A certificate and key pgvane presents to PostgreSQL (for `cert` authentication).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_tls_key_file: Option<PathBuf>,
}

/// PgBouncer's `server_tls_sslmode`, as libpq's sslmode: whether pgvane's connections to
/// PostgreSQL use TLS, and what of the server's certificate is checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSslMode {
    /// Plaintext (pgvane's default; PgBouncer's is prefer).
    #[default]
    Disable,
    /// TLS if the server offers it, else plaintext; the certificate is not checked.
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS with a certificate signed by `server_tls_ca_file`.
    VerifyCa,
    /// As verify-ca, and the certificate names the backend's host.
    VerifyFull,
}

impl TlsConfig {
    /// This table's keys over `base`'s.
    pub fn over(&self, base: &TlsConfig) -> TlsConfig {
        fn pick<T: Clone>(own: &Option<T>, base: &Option<T>) -> Option<T> {
            own.clone().or_else(|| base.clone())
        }
        TlsConfig {
            client_tls_sslmode: pick(&self.client_tls_sslmode, &base.client_tls_sslmode),
            client_tls_cert_file: pick(&self.client_tls_cert_file, &base.client_tls_cert_file),
            client_tls_key_file: pick(&self.client_tls_key_file, &base.client_tls_key_file),
            client_tls_ca_file: pick(&self.client_tls_ca_file, &base.client_tls_ca_file),
            client_tls_protocols: pick(&self.client_tls_protocols, &base.client_tls_protocols),
            client_tls_ciphers: pick(&self.client_tls_ciphers, &base.client_tls_ciphers),
            // Toward PostgreSQL: [tls] alone.
            server_tls_sslmode: base.server_tls_sslmode,
            server_tls_ca_file: base.server_tls_ca_file.clone(),
            server_tls_cert_file: base.server_tls_cert_file.clone(),
            server_tls_key_file: base.server_tls_key_file.clone(),
        }
    }

    pub fn mode(&self) -> ClientSslMode {
        self.client_tls_sslmode.unwrap_or_default()
    }

    /// The keys about connections to PostgreSQL (`[tls]` only).
    pub fn server_keys(
        &self,
    ) -> (
        Option<ServerSslMode>,
        Option<&Path>,
        Option<&Path>,
        Option<&Path>,
    ) {
        (
            self.server_tls_sslmode,
            self.server_tls_ca_file.as_deref(),
            self.server_tls_cert_file.as_deref(),
            self.server_tls_key_file.as_deref(),
        )
    }
}

/// PgBouncer's `client_tls_sslmode`: whether clients may, or must, use TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientSslMode {
    /// TLS requests are declined.
    #[default]
    Disable,
    /// TLS if the client asks for it (allow and prefer are the same on this side).
    Allow,
    Prefer,
    /// TLS only: a plaintext login is refused (28000), like a `hostssl` line.
    Require,
    /// TLS with a client certificate signed by `client_tls_ca_file`.
    VerifyCa,
    VerifyFull,
}

/// Limits per client address and per user: `[limits]` for every listener, a listener's
/// `limits` table overriding keys for it, `[[user]]` entries overriding the per-user ones.
/// Unset: no limit.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client addresses (CIDRs) allowed to connect; empty: all. Checked first, with `deny`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<ipnet::IpNet>>,
    /// Client addresses refused whatever `allow` says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<ipnet::IpNet>>,
    /// New connections per client address, over a sliding second, e.g. "20/s".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_connection_rate: Option<RateLimit>,
    /// Connections an address may open above its rate in one go (default: the rate's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_connection_burst: Option<u32>,
    /// Connections open at once per client address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_max_connections: Option<u32>,
    /// Failed logins within `ip_auth_failure_window` after which an address is locked out
    /// for `ip_auth_lockout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_auth_failures: Option<u32>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub ip_auth_failure_window: Option<Duration>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub ip_auth_lockout: Option<Duration>,
    /// Width of the count-min sketches that hold per-address counts (memory is fixed at
    /// about 64 bytes times this per limit; past about this many active addresses the
    /// counts over-estimate, so limits refuse early, never late).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tracked_addresses: Option<u32>,
    /// New logins per user, e.g. "50/s" (pooled listeners).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_connection_rate: Option<RateLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_connection_burst: Option<u32>,
    /// Client connections open at once per user, and per database (PgBouncer 1.24's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_user_client_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_db_client_connections: Option<u32>,
    /// Transactions per user (transaction mode), e.g. "100/s", with a burst; one over the
    /// rate waits up to `user_transaction_shape` for its turn, then gets an ERROR.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_transaction_rate: Option<RateLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_transaction_burst: Option<u32>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub user_transaction_shape: Option<Duration>,
}

impl LimitsConfig {
    /// These settings with each unset key taken from `defaults`.
    pub fn over(&self, defaults: &LimitsConfig) -> LimitsConfig {
        let d = defaults.clone();
        LimitsConfig {
            allow: self.allow.clone().or(d.allow),
            deny: self.deny.clone().or(d.deny),
            ip_connection_rate: self.ip_connection_rate.or(d.ip_connection_rate),
            ip_connection_burst: self.ip_connection_burst.or(d.ip_connection_burst),
            ip_max_connections: self.ip_max_connections.or(d.ip_max_connections),
            ip_auth_failures: self.ip_auth_failures.or(d.ip_auth_failures),
            ip_auth_failure_window: self.ip_auth_failure_window.or(d.ip_auth_failure_window),
            ip_auth_lockout: self.ip_auth_lockout.or(d.ip_auth_lockout),
            max_tracked_addresses: self.max_tracked_addresses.or(d.max_tracked_addresses),
            user_connection_rate: self.user_connection_rate.or(d.user_connection_rate),
            user_connection_burst: self.user_connection_burst.or(d.user_connection_burst),
            max_user_client_connections: self
                .max_user_client_connections
                .or(d.max_user_client_connections),
            max_db_client_connections: self
                .max_db_client_connections
                .or(d.max_db_client_connections),
            user_transaction_rate: self.user_transaction_rate.or(d.user_transaction_rate),
            user_transaction_burst: self.user_transaction_burst.or(d.user_transaction_burst),
            user_transaction_shape: self.user_transaction_shape.or(d.user_transaction_shape),
        }
    }
}

/// Events per second, written "20/s", "600/m" or "3600/h".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
}

impl std::str::FromStr for RateLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not a rate; use e.g. \"20/s\", \"600/m\" or \"3600/h\"");
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        let seconds = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        if !(n > 0.0 && n.is_finite()) {
            return Err(bad());
        }
        Ok(RateLimit {
            per_second: n / seconds,
        })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", self.per_second)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for RateLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The HTTP admin API: `/metrics` (Prometheus), `/status`, `/pause`, `/resume`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address and port of the admin API, e.g. "127.0.0.1:9930". Unset: no admin API.
    pub listen: Option<SocketAddr>,
    /// Users who may run every command on the admin console (virtual database `pgbouncer`
    /// or `pgvane` on a pooled listener), as PgBouncer's `admin_users`.
    pub admin_users: Vec<String>,
    /// Users who may run SHOW commands there (PgBouncer's `stats_users`).
    pub stats_users: Vec<String>,
    /// Bearer token for the HTTP API's control endpoints (`POST /pause`, `/resume`). Unset:
    /// they answer loopback callers only. Set: every caller must send
    /// `Authorization: Bearer <token>`. `/metrics` and `/status` stay open.
    pub token: Option<String>,
    /// The admin console on a Unix socket too, e.g. "/run/pgvane/.s.PGSQL.6432" (psql -h
    /// /run/pgvane -p 6432 pgbouncer). Peer authentication, as PgBouncer's user `pgbouncer`
    /// on its socket: a client running as pgvane's own OS user (or root) logs in without a
    /// password, as a user of admin_users or stats_users, or as `pgbouncer` (admin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<PathBuf>,
}

/// Process-wide settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneralConfig {
    /// On SIGTERM/SIGINT pgvane stops accepting and waits this long for open sessions to end
    /// before closing them.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// How long a client may take from connecting to finishing authentication.
    #[serde(with = "duration")]
    pub client_login_timeout: Duration,
    /// Client connections accepted at once, over all listeners; more get FATAL 53300.
    pub max_client_conn: u32,
    /// While a listener's target has no backend (or its backend cannot be reached), new
    /// connections and transactions wait this long for one to appear (0 = refuse at once).
    #[serde(with = "duration")]
    pub failover_hold_timeout: Duration,
    /// Threads that run sessions, health checks and the admin API (HAProxy's nbthread).
    pub worker_threads: WorkerThreads,
    /// Unix socket on which a running pgvane hands its listening sockets, then its pooled
    /// sessions, to a new one started with the same setting (zero-downtime upgrade).
    /// Unset: no hand-over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_socket: Option<PathBuf>,
}

impl Default for GeneralConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: Duration::from_secs(30),
            client_login_timeout: Duration::from_secs(60),
            max_client_conn: 100,
            failover_hold_timeout: Duration::from_secs(30),
            worker_threads: WorkerThreads::Auto,
            upgrade_socket: None,
        }
    }
}

/// How many threads pgvane runs on; read at start only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WorkerThreads {
    /// One per CPU core.
    #[default]
    Auto,
    /// Exactly this many. One runs everything on the main thread, as PgBouncer does: no
    /// hand-offs between threads, so less CPU per transaction, but one core at most.
    Count(NonZeroUsize),
}

impl WorkerThreads {
    /// More threads than this is a typo, not a machine.
    const MAX: usize = 1024;

    fn parse_count(n: u64) -> Result<Self, String> {
        match usize::try_from(n).ok().and_then(NonZeroUsize::new) {
            Some(n) if n.get() <= Self::MAX => Ok(WorkerThreads::Count(n)),
            _ => Err(format!(
                "{n} threads: use \"auto\" (one per CPU core) or a number from 1 to {}",
                Self::MAX
            )),
        }
    }
}

impl Serialize for WorkerThreads {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            WorkerThreads::Auto => s.serialize_str("auto"),
            WorkerThreads::Count(n) => s.serialize_u64(n.get() as u64),
        }
    }
}

impl<'de> Deserialize<'de> for WorkerThreads {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Count(n)) => WorkerThreads::parse_count(n).map_err(de::Error::custom),
            Ok(Raw::Text(t)) if t == "auto" => Ok(WorkerThreads::Auto),
            _ => Err(de::Error::custom(
                "expected \"auto\" (one thread per CPU core) or a number of threads from 1 up",
            )),
        }
    }
}

/// How pooled listeners authenticate clients. Passthrough listeners leave authentication
/// to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    #[serde(rename = "type")]
    pub method: AuthMethod,
    /// A PgBouncer-format `auth_file`: one `"user" "secret"` line per user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// PgBouncer's `auth_user`: a user known to pgvane (with a plain password) that runs
    /// `auth_query` on the current primary for users pgvane does not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// Returns (name, secret) for `$1`; the secret is what pg_authid stores.
    pub auth_query: String,
    /// Database `auth_query` runs in (default: the one the client asks for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_dbname: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            method: AuthMethod::default(),
            file: None,
            auth_user: None,
            auth_query: "SELECT usename, passwd FROM pg_shadow WHERE usename=$1".into(),
            auth_dbname: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
    /// The user is the common name of the client's certificate, verified against
    /// `client_tls_ca_file` (client_tls_sslmode verify-ca or verify-full); no password.
    Cert,
}

/// A user of the pooled listeners.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain text, `md5...` or `SCRAM-SHA-256$...`. pgvane logs in to PostgreSQL with it too,
    /// so it must be plain text unless the server trusts pgvane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Overrides `pool.default_pool_size` for this user's pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
    /// Overrides `pool.max_user_connections` for this user (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_user_connections: Option<u32>,
    /// Override `pool.reserve_pool_size` and the pool mode (over a `[[database]]` entry's
    /// and the listener's) for this user's pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_pool_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_mode: Option<PoolMode>,
    /// Override `limits.max_user_client_connections` and `limits.user_connection_rate` /
    /// `user_connection_burst` for this user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_user_client_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_connection_rate: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_connection_burst: Option<u32>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("max_user_connections", &self.max_user_connections)
            .field("reserve_pool_size", &self.reserve_pool_size)
            .field("pool_mode", &self.pool_mode)
            .finish()
    }
}

/// A `[[database]]` entry, PgBouncer's `[databases]` line: the name clients ask for, the
/// database it is on the server, and settings over `[pool]`'s for its pools. Once any entry
/// exists, only those names (or any, with the fallback entry named `*`) can be logged in to.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub name: String,
    /// The database on the server (default: `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_pool_size: Option<u32>,
    /// `reserve_pool` is PgBouncer's name before 1.24.
    #[serde(
        default,
        alias = "reserve_pool",
        skip_serializing_if = "Option::is_none"
    )]
    pub reserve_pool_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_db_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_mode: Option<PoolMode>,
}

/// The name of the `[[database]]` entry that serves databases not listed.
pub const FALLBACK_DATABASE: &str = "*";

/// How long a pooled client keeps a server connection, when a `[[database]]` or `[[user]]`
/// entry sets it for its pools rather than the listener's `mode`. PgBouncer's statement
/// mode has no counterpart: multi-statement transactions would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    Session,
    Transaction,
}

impl From<PoolMode> for ListenerMode {
    fn from(m: PoolMode) -> Self {
        match m {
            PoolMode::Session => ListenerMode::Session,
            PoolMode::Transaction => ListenerMode::Transaction,
        }
    }
}

/// Server connection pools of the session and transaction listeners. Names and defaults
/// follow pgbouncer.ini; durations also accept a plain number of seconds, as there.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Server connections per (backend, database, user) pool.
    pub default_pool_size: u32,
    /// Server connections kept open per pool even when idle.
    pub min_pool_size: u32,
    /// Extra connections a pool may open once a client has waited `reserve_pool_timeout`.
    pub reserve_pool_size: u32,
    #[serde(with = "duration")]
    pub reserve_pool_timeout: Duration,
    /// Server connections per database over all users and backends (0 = unlimited).
    pub max_db_connections: u32,
    /// Server connections per user over all databases and backends (0 = unlimited).
    pub max_user_connections: u32,
    /// A client waiting this long for a server connection gets an error (0 = wait forever).
    #[serde(with = "duration")]
    pub query_wait_timeout: Duration,
    /// Idle server connections older than this are closed (0 = never).
    #[serde(with = "duration")]
    pub server_idle_timeout: Duration,
    /// Server connections older than this are closed when next released (0 = never).
    #[serde(with = "duration")]
    pub server_lifetime: Duration,
    /// A pool no client has used for this long, with no server connection left, is freed
    /// (0 = never). Pools are made per (database, user) a client names, so without this
    /// made-up names would pile up.
    #[serde(with = "duration")]
    pub autodb_idle_timeout: Duration,
    #[serde(with = "duration")]
    pub server_connect_timeout: Duration,
    /// Server connections being opened (connect and login) at once per backend, over all
    /// pools: after a failover every pool refills toward the new primary, and this keeps
    /// that from becoming a login storm on it.
    pub server_connect_concurrency: u32,
    /// A client idle inside a transaction this long is disconnected (0 = never).
    #[serde(with = "duration")]
    pub idle_transaction_timeout: Duration,
    /// A request unanswered this long (a long query, or a client that does not read its
    /// results), or a client message begun and not finished, ends the session; what runs
    /// is cancelled (0 = never).
    #[serde(with = "duration")]
    pub query_timeout: Duration,
    /// A client holding a server connection out of idle this long (a transaction block, a
    /// request, a message begun) is disconnected (0 = never).
    #[serde(with = "duration")]
    pub transaction_timeout: Duration,
    /// Run on a server connection when a session-mode client leaves; empty = nothing.
    pub server_reset_query: String,
    /// A server connection idle longer than this is checked before reuse (0 = always).
    #[serde(with = "duration")]
    pub server_check_delay: Duration,
    /// The check; empty means an empty query, the cheapest round trip.
    pub server_check_query: String,
    /// Startup parameters dropped instead of applied on the server (e.g. `extra_float_digits`).
    pub ignore_startup_parameters: Vec<String>,
    /// Transaction mode: named prepared statements kept per server connection, so that a
    /// client's statements follow it to any server connection (0 = not tracked).
    pub max_prepared_statements: u32,
    /// Parameters the server does not report whose values follow a transaction-mode client
    /// from one server connection to the next, as reported ones do (read back after a
    /// transaction that SETs one) instead of pinning it.
    pub track_extra_parameters: Vec<String>,
    /// Longest message a pooled client may send (bytes, length field included); a longer
    /// one ends its session with 08P01 before any of it is passed on. PostgreSQL's own
    /// limit by default.
    pub max_packet_size: u32,
}

/// PostgreSQL's limit on a client message (`PQ_LARGE_MESSAGE_LIMIT`, 1 GiB - 1).
const MAX_PACKET_SIZE: u32 = (1 << 30) - 1;

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            default_pool_size: 20,
            min_pool_size: 0,
            reserve_pool_size: 0,
            reserve_pool_timeout: Duration::from_secs(5),
            max_db_connections: 0,
            max_user_connections: 0,
            query_wait_timeout: Duration::from_secs(120),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            autodb_idle_timeout: Duration::from_secs(3600),
            server_connect_timeout: Duration::from_secs(15),
            server_connect_concurrency: 16,
            idle_transaction_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            transaction_timeout: Duration::ZERO,
            server_reset_query: "DISCARD ALL".into(),
            server_check_delay: Duration::from_secs(30),
            server_check_query: String::new(),
            ignore_startup_parameters: Vec::new(),
            max_prepared_statements: 200,
            track_extra_parameters: vec!["search_path".into()],
            max_packet_size: MAX_PACKET_SIZE,
        }
    }
}

/// How backends are checked. HAProxy semantics: `rise` consecutive successful checks mark a
/// backend up, `fall` consecutive failures mark it down.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub method: CheckMethod,
    /// Time between the starts of two checks of the same backend.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Time between checks after a failed one, until one succeeds (HAProxy's fastinter).
    #[serde(with = "duration")]
    pub fast_interval: Duration,
    /// A check (connect included) that takes longer than this has failed.
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// A replica further behind than this leaves the replica target (after `fall` such
    /// checks) until it catches up (`rise`): bytes of WAL not replayed yet, or replay delay.
    pub max_replica_lag: LagLimit,
    pub sql: SqlCheckConfig,
    pub patroni: PatroniCheckConfig,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            method: CheckMethod::Sql,
            interval: Duration::from_secs(1),
            fast_interval: Duration::from_millis(250),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            max_replica_lag: LagLimit::Off,
            sql: SqlCheckConfig::default(),
            patroni: PatroniCheckConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckMethod {
    /// Log in as the monitor user and ask `pg_is_in_recovery()`.
    Sql,
    /// Ask Patroni's REST API: `/primary` and `/replica` answer 200 or 503.
    Patroni,
}

/// Credentials of the monitor connection used by `method = "sql"`.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlCheckConfig {
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    pub dbname: String,
}

impl Default for SqlCheckConfig {
    fn default() -> Self {
        Self {
            user: "postgres".into(),
            password: None,
            dbname: "postgres".into(),
        }
    }
}

impl fmt::Debug for SqlCheckConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlCheckConfig")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PatroniCheckConfig {
    /// Patroni REST API port, unless a backend sets its own `patroni_port`.
    pub port: u16,
    /// Also log in with [health.sql]: a node Patroni calls primary takes writes only once
    /// `pg_is_in_recovery()` is false, and replica lag becomes measurable.
    pub cross_check: bool,
}

impl Default for PatroniCheckConfig {
    fn default() -> Self {
        Self {
            port: 8008,
            cross_check: true,
        }
    }
}

/// One PostgreSQL server of the cluster.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Overrides `health.patroni.port` for this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patroni_port: Option<u16>,
    /// Drained (HAProxy's `set server state drain`): no new session or transaction goes
    /// there, running ones finish, pooled connections close as they are released.
    #[serde(default)]
    pub drain: bool,
}

/// A listening socket and where its clients go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub mode: ListenerMode,
    pub target: Target,
    #[serde(default)]
    pub balance: Balance,
    /// Replica listeners only: send clients to the primary while no replica is healthy.
    #[serde(default)]
    pub fallback_to_primary: bool,
    #[serde(default)]
    pub on_role_loss: OnRoleLoss,
    /// Transaction mode: what a statement that creates session state gets.
    #[serde(default)]
    pub session_state: SessionStatePolicy,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Keys of `[limits]` overridden for this listener (a table: it comes last).
    #[serde(default, skip_serializing_if = "is_default")]
    pub limits: LimitsConfig,
    /// Keys of `[tls]` overridden for this listener.
    #[serde(default, skip_serializing_if = "is_default")]
    pub tls: TlsConfig,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerMode {
    /// Layer 4: pick a backend, then copy bytes both ways without parsing them.
    #[default]
    Passthrough,
    /// pgvane authenticates the client; it keeps one pooled server connection for the
    /// whole client session.
    Session,
    /// pgvane authenticates the client; it lends a pooled server connection for each
    /// transaction and takes it back at the ReadyForQuery that reports idle.
    Transaction,
}

impl ListenerMode {
    pub fn is_pooled(self) -> bool {
        self != ListenerMode::Passthrough
    }
}

/// What a transaction-mode listener does with a statement that would leave state on the
/// server connection past its transaction (LISTEN, a session advisory lock, a WITH HOLD
/// cursor, a temporary table, SQL PREPARE, SET of a parameter the server does not report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionStatePolicy {
    /// The statement runs and the client keeps its server connection until it leaves: it
    /// works as in session mode, at the cost of a pooled connection.
    #[default]
    Pin,
    /// The statement is not run: ERROR 0A000 (feature_not_supported), the session goes on.
    Reject,
}

/// Which backends a listener may send clients to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Primary,
    Replica,
    Any,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Primary => "primary",
            Target::Replica => "replica",
            Target::Any => "any",
        })
    }
}

/// How a listener chooses among several eligible backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
}

/// What happens to open sessions when their backend no longer qualifies for the listener's
/// target (primary demoted or down, replica down). HAProxy: `on-marked-down shutdown-sessions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRoleLoss {
    #[default]
    ShutdownSessions,
    Keep,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{}", render_problems(.0))]
    Invalid(Vec<Problem>),
}

/// One validation problem, tied to the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn render_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
    format!(
        "invalid configuration ({} problem{}):\n{}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        lines.join("\n")
    )
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            source: Box::new(source),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The resolved configuration (defaults filled in, secrets redacted) as TOML.
    pub fn to_resolved_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.health.sql.password.is_some() {
            shown.health.sql.password = Some("<redacted>".into());
        }
        if shown.admin.token.is_some() {
            shown.admin.token = Some("<redacted>".into());
        }
        for u in &mut shown.users {
            if u.password.is_some() {
                u.password = Some("<redacted>".into());
            }
        }
        toml::to_string_pretty(&shown).expect("a Config always serializes")
    }

    /// Every semantic problem, in file order.
    fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: String, message: String| out.push(Problem { key, message });

        let h = &self.health;
        if h.interval.is_zero() {
            bad(
                "health.interval".into(),
                "must be greater than 0, e.g. \"1s\"".into(),
            );
        }
        if h.fast_interval.is_zero() {
            bad(
                "health.fast_interval".into(),
                "must be greater than 0, e.g. \"250ms\"".into(),
            );
        }
        if h.timeout.is_zero() {
            bad(
                "health.timeout".into(),
                "must be greater than 0, e.g. \"1s\"".into(),
            );
        }
        if h.rise == 0 {
            bad("health.rise".into(), "must be at least 1".into());
        }
        if h.fall == 0 {
            bad("health.fall".into(), "must be at least 1".into());
        }
        if h.method == CheckMethod::Patroni
            && !h.patroni.cross_check
            && h.max_replica_lag != LagLimit::Off
        {
            bad(
                "health.max_replica_lag".into(),
                "needs WAL positions: method = \"sql\", or health.patroni.cross_check = true"
                    .into(),
            );
        }
        if (h.method == CheckMethod::Sql || h.patroni.cross_check) && h.sql.user.is_empty() {
            bad(
                "health.sql.user".into(),
                "must name the monitor role".into(),
            );
        }

        if self.general.client_login_timeout.is_zero() {
            bad(
                "general.client_login_timeout".into(),
                "must be greater than 0, e.g. \"60s\"".into(),
            );
        }
        let p = &self.pool;
        if p.default_pool_size == 0 {
            bad("pool.default_pool_size".into(), "must be at least 1".into());
        }
        if p.min_pool_size > p.default_pool_size {
            bad(
                "pool.min_pool_size".into(),
                format!(
                    "{} is more than pool.default_pool_size ({})",
                    p.min_pool_size, p.default_pool_size
                ),
            );
        }
        if p.server_connect_timeout.is_zero() {
            bad(
                "pool.server_connect_timeout".into(),
                "must be greater than 0, e.g. \"15s\"".into(),
            );
        }
        if p.server_connect_concurrency == 0 {
            bad(
                "pool.server_connect_concurrency".into(),
                "must be at least 1 (connections opened at once per backend)".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() {
                bad(format!("user[{i}].name"), "must not be empty".into());
            } else if !names.insert(u.name.as_str()) {
                bad(
                    format!("user[{i}].name"),
                    format!("\"{}\" is listed twice; names must be unique", u.name),
                );
            }
            if u.pool_size == Some(0) {
                bad(format!("user[{i}].pool_size"), "must be at least 1".into());
            }
        }
        let mut names = HashSet::new();
        for (i, d) in self.databases.iter().enumerate() {
            let key = |k: &str| format!("database[{i}].{k}");
            if d.name.is_empty() {
                bad(key("name"), "must not be empty".into());
            } else if !names.insert(d.name.as_str()) {
                bad(
                    key("name"),
                    format!("\"{}\" is listed twice; names must be unique", d.name),
                );
            } else if crate::admin::console::DATABASES.contains(&d.name.as_str()) {
                bad(
                    key("name"),
                    format!("\"{}\" is the admin console's; choose another name", d.name),
                );
            }
            if d.name == FALLBACK_DATABASE && d.dbname.is_some() {
                bad(
                    key("dbname"),
                    "the fallback entry \"*\" serves each database under its own name; remove dbname".into(),
                );
            }
            if d.dbname.as_deref() == Some("") {
                bad(
                    key("dbname"),
                    "must not be empty (omit it to use name)".into(),
                );
            }
            if d.pool_size == Some(0) {
                bad(key("pool_size"), "must be at least 1".into());
            }
            let size = d.pool_size.unwrap_or(p.default_pool_size);
            if let Some(min) = d.min_pool_size.filter(|m| *m > size) {
                bad(
                    key("min_pool_size"),
                    format!("{min} is more than the entry's pool_size ({size})"),
                );
            }
        }
        if self.auth.method == AuthMethod::Cert {
            for (i, l) in self.listeners.iter().enumerate() {
                let mode = l.tls.over(&self.tls).mode();
                if l.mode.is_pooled() && mode < ClientSslMode::VerifyCa {
                    bad(
                        format!("listener[{i}].tls.client_tls_sslmode"),
                        "auth.type = \"cert\" takes the user from a verified client certificate: set \"verify-ca\" or \"verify-full\" (with client_tls_ca_file)".into(),
                    );
                }
            }
        }
        if self.listeners.iter().any(|l| l.mode.is_pooled())
            && !matches!(self.auth.method, AuthMethod::Trust | AuthMethod::Cert)
            && self.users.is_empty()
            && self.auth.file.is_none()
        {
            bad(
                "user".into(),
                "session and transaction listeners authenticate clients: add [[user]] entries \
                 or auth.file, or set auth.type = \"trust\""
                    .into(),
            );
        }

        if self.backends.is_empty() {
            bad(
                "backend".into(),
                "at least one [[backend]] (name, host, port) is required".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            if b.name.is_empty() {
                bad(format!("backend[{i}].name"), "must not be empty".into());
            } else if !names.insert(b.name.as_str()) {
                bad(
                    format!("backend[{i}].name"),
                    format!(
                        "\"{}\" is used by another backend; names must be unique",
                        b.name
                    ),
                );
            }
            if b.host.is_empty() {
                bad(format!("backend[{i}].host"), "must not be empty".into());
            }
            if b.port == 0 {
                bad(format!("backend[{i}].port"), "must be 1-65535".into());
            }
            if b.patroni_port == Some(0) {
                bad(
                    format!("backend[{i}].patroni_port"),
                    "must be 1-65535".into(),
                );
            }
        }

        if self.listeners.is_empty() {
            bad(
                "listener".into(),
                "at least one [[listener]] (name, address, port, target) is required".into(),
            );
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty() {
                bad(format!("listener[{i}].name"), "must not be empty".into());
            } else if !names.insert(l.name.as_str()) {
                bad(
                    format!("listener[{i}].name"),
                    format!(
                        "\"{}\" is used by another listener; names must be unique",
                        l.name
                    ),
                );
            }
            match l.address.parse::<IpAddr>() {
                Err(_) => bad(
                    format!("listener[{i}].address"),
                    format!(
                        "\"{}\" is not an IP address; use e.g. \"127.0.0.1\", \"0.0.0.0\" or \"::\"",
                        l.address
                    ),
                ),
                Ok(ip) => {
                    let addr = SocketAddr::new(ip, l.port);
                    if l.port != 0 && !addrs.insert(addr) {
                        bad(
                            format!("listener[{i}].port"),
                            format!("{addr} is already used by another listener"),
                        );
                    }
                }
            }
            if l.port == 0 {
                bad(format!("listener[{i}].port"), "must be 1-65535".into());
            }
            if l.fallback_to_primary && l.target != Target::Replica {
                bad(
                    format!("listener[{i}].fallback_to_primary"),
                    format!(
                        "only applies to target = \"replica\" (this listener's target is \"{}\")",
                        l.target
                    ),
                );
            }
            if l.tls.server_keys() != TlsConfig::default().server_keys() {
                bad(
                    format!("listener[{i}].tls"),
                    "server_tls_* keys apply to every connection to PostgreSQL: set them in [tls]"
                        .into(),
                );
            }
            if l.mode == ListenerMode::Passthrough && l.tls != TlsConfig::default() {
                bad(
                    format!("listener[{i}].tls"),
                    "a passthrough listener relays TLS untouched, end to end between client and PostgreSQL (configure it there); remove the table".into(),
                );
            }
            if l.session_state == SessionStatePolicy::Reject && l.mode != ListenerMode::Transaction
            {
                bad(
                    format!("listener[{i}].session_state"),
                    "\"reject\" only applies to mode = \"transaction\" (other modes keep a server connection per session); remove it".into(),
                );
            }
            if l.session_state == SessionStatePolicy::Reject
                && l.mode == ListenerMode::Transaction
                && self.pool.max_prepared_statements == 0
            {
                bad(
                    format!("listener[{i}].session_state"),
                    "\"reject\" needs pool.max_prepared_statements > 0: extended-protocol statements are refused through the statement tracking it enables".into(),
                );
            }
            let per_user = [
                (
                    "user_connection_rate",
                    l.limits.user_connection_rate.is_some(),
                ),
                (
                    "user_connection_burst",
                    l.limits.user_connection_burst.is_some(),
                ),
                (
                    "max_user_client_connections",
                    l.limits.max_user_client_connections.is_some(),
                ),
                (
                    "max_db_client_connections",
                    l.limits.max_db_client_connections.is_some(),
                ),
                (
                    "user_transaction_rate",
                    l.limits.user_transaction_rate.is_some(),
                ),
                (
                    "user_transaction_burst",
                    l.limits.user_transaction_burst.is_some(),
                ),
                (
                    "user_transaction_shape",
                    l.limits.user_transaction_shape.is_some(),
                ),
            ];
            for (key, _) in per_user.iter().filter(|(_, set)| *set) {
                bad(
                    format!("listener[{i}].limits.{key}"),
                    "per-user and per-database limits count over all listeners: set it in [limits] or a [[user]] entry".into(),
                );
            }
            if l.connect_timeout.is_zero() {
                bad(
                    format!("listener[{i}].connect_timeout"),
                    "must be greater than 0, e.g. \"3s\"".into(),
                );
            }
        }
        let is_name = |n: &str| {
            n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        };
        for name in &self.pool.track_extra_parameters {
            if !is_name(name) {
                bad(
                    "pool.track_extra_parameters".into(),
                    format!("\"{name}\" is not a parameter name (letters, digits, '_' and '.', e.g. \"search_path\")"),
                );
            }
        }
        if let Some(addr) = self.admin.listen {
            if addrs.contains(&addr) {
                bad(
                    "admin.listen".into(),
                    format!("{addr} is already used by a listener; pick another port"),
                );
            }
        }
        out
    }
}

impl ListenerConfig {
    /// The socket address to bind. Only valid after validation.
    pub fn socket_addr(&self) -> SocketAddr {
        let ip: IpAddr = self.address.parse().expect("validated listener address");
        SocketAddr::new(ip, self.port)
    }
}

impl BackendConfig {
    pub fn patroni_port(&self, health: &HealthConfig) -> u16 {
        self.patroni_port.unwrap_or(health.patroni.port)
    }
}

/// How far behind a replica may be: `0` (off), bytes of WAL (`1048576`, `"16MB"`, `"512kB"`)
/// or replay delay (`"10s"`, `"500ms"`), as Patroni's `/replica?lag=` reads sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LagLimit {
    #[default]
    Off,
    Bytes(u64),
    Time(Duration),
}

impl LagLimit {
    fn from_bytes(n: u64) -> Self {
        if n == 0 {
            LagLimit::Off
        } else {
            LagLimit::Bytes(n)
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let unit_size = match unit.trim() {
            "" | "B" => Some(1),
            "kB" | "KB" => Some(1 << 10),
            "MB" => Some(1 << 20),
            "GB" => Some(1 << 30),
            _ => None,
        };
        if let (Ok(n), Some(size)) = (number.parse::<u64>(), unit_size) {
            return n
                .checked_mul(size)
                .map(Self::from_bytes)
                .ok_or_else(|| format!("\"{text}\" is too large"));
        }
        match humantime::parse_duration(t) {
            Ok(d) if d.is_zero() => Ok(LagLimit::Off),
            Ok(d) => Ok(LagLimit::Time(d)),
            Err(_) => Err(format!(
                "\"{text}\" is neither a size nor a duration; use bytes (1048576, \"16MB\", \"512kB\") \
                 or a replay delay (\"10s\", \"500ms\"), or 0 for no limit"
            )),
        }
    }
}

impl Serialize for LagLimit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LagLimit::Off => s.serialize_u64(0),
            LagLimit::Bytes(n) => s.serialize_u64(*n),
            LagLimit::Time(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for LagLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Bytes(n)) => Ok(LagLimit::from_bytes(n)),
            Ok(Raw::Text(t)) => LagLimit::parse(&t).map_err(de::Error::custom),
            Err(_) => Err(de::Error::custom(
                "expected bytes (1048576, \"16MB\") or a replay delay (\"10s\")",
            )),
        }
    }
}

/// Durations as pgbouncer.ini writes them (a number of seconds) or as text ("500ms", "2m").
/// `duration` for optional keys.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"500ms\", \"2s\", \"1m\", or a number of seconds")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("{v} is negative; durations are 0 or more")))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Duration::try_from_secs_f64(v)
                .map_err(|_| E::custom(format!("{v} is not a valid number of seconds")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v).map_err(|e| {
                E::custom(format!(
                    "\"{v}\" is not a duration ({e}); use e.g. \"500ms\", \"2s\" or a number of seconds"
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[backend]]
        name = "pg1"
        host = "127.0.0.1"
        port = 5432

        [[listener]]
        name = "rw"
        address = "127.0.0.1"
        port = 6432
        target = "primary"
    "#;

    /// MINIMAL with `table` (a table and its keys) in front, parsed; errors as text.
    fn with_minimal(table: &str) -> Result<Config, String> {
        Config::parse(&format!("{table}\n{MINIMAL}")).map_err(|e| e.to_string())
    }

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(text) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[test]
    fn cert_authentication_needs_verified_client_certificates() {
        let text = format!(
            "[auth]\ntype = \"cert\"\n{}",
            MINIMAL.replace(
                "target = \"primary\"",
                "target = \"primary\"\nmode = \"session\""
            )
        );
        let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["listener[0].tls.client_tls_sslmode"]);
    }

    #[test]
    fn tls_on_a_passthrough_listener_is_refused() {
        let text = format!("{MINIMAL}\n[listener.tls]\nclient_tls_sslmode = \"require\"\n");
        let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["listener[0].tls"]);
    }

    #[test]
    fn database_entries_are_checked_key_by_key() {
        let text = format!(
            r#"{MINIMAL}
            [[database]]
            name = "app"
            pool_size = 0
            [[database]]
            name = "app"
            [[database]]
            name = "*"
            dbname = "x"
            [[database]]
            name = "pgbouncer"
            [[database]]
            name = "small"
            pool_size = 2
            min_pool_size = 3
            "#
        );
        let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "database[0].pool_size",
                "database[1].name",
                "database[2].dbname",
                "database[3].name",
                "database[4].min_pool_size"
            ]
        );
        let c = Config::parse(&format!(
            "{MINIMAL}\n[[database]]\nname = \"app\"\nreserve_pool = 2\npool_mode = \"transaction\""
        ))
        .unwrap();
        assert_eq!(c.databases[0].reserve_pool_size, Some(2));
        assert_eq!(c.databases[0].pool_mode, Some(PoolMode::Transaction));
        let statement = format!("{MINIMAL}\n[[user]]\nname = \"u\"\npool_mode = \"statement\"");
        let e = Config::parse(&statement).unwrap_err().to_string();
        assert!(e.contains("expected `session` or `transaction`"), "{e}");
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.health.method, CheckMethod::Sql);
        assert_eq!(c.health.interval, Duration::from_secs(1));
        assert_eq!((c.health.rise, c.health.fall), (2, 3));
        let l = &c.listeners[0];
        assert_eq!(l.mode, ListenerMode::Passthrough);
        assert_eq!(l.balance, Balance::RoundRobin);
        assert_eq!(l.on_role_loss, OnRoleLoss::ShutdownSessions);
        assert_eq!(l.socket_addr(), "127.0.0.1:6432".parse().unwrap());
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("target = \"primary\"", "target = \"primary\"\ntargte = 1");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `targte`"), "{err}");
        assert!(err.contains("target"), "lists the allowed keys: {err}");
    }

    #[test]
    fn bad_enum_value_lists_allowed_values() {
        let text = MINIMAL.replace("\"primary\"", "\"master\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("master"), "{err}");
        assert!(
            err.contains("primary") && err.contains("replica") && err.contains("any"),
            "{err}"
        );
    }

    #[test]
    fn worker_threads_are_auto_or_a_count() {
        let threads = |v: &str| {
            with_minimal(&format!("[general]\nworker_threads = {v}"))
                .map(|c| c.general.worker_threads)
        };
        assert_eq!(
            Config::parse(MINIMAL).unwrap().general.worker_threads,
            WorkerThreads::Auto
        );
        assert_eq!(threads("\"auto\""), Ok(WorkerThreads::Auto));
        assert_eq!(
            threads("1"),
            Ok(WorkerThreads::Count(NonZeroUsize::new(1).unwrap()))
        );
        for bad in ["0", "100000", "\"many\"", "-1"] {
            let err = threads(bad).unwrap_err();
            assert!(
                err.contains("worker_threads") && err.contains("auto"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn bad_duration_is_reported() {
        let text = format!("[health]\ninterval = \"soon\"\n{MINIMAL}");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("interval"), "{err}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_key() {
        let text = r#"
            [health]
            rise = 0
            fall = 0

            [[backend]]
            name = "a"
            host = ""
            port = 0

            [[backend]]
            name = "a"
            host = "h"
            port = 1

            [[listener]]
            name = "x"
            address = "localhost"
            port = 1
            target = "primary"
            fallback_to_primary = true
            session_state = "reject"
        "#;
        let keys: Vec<String> = problems(text).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "health.rise",
                "health.fall",
                "backend[0].host",
                "backend[0].port",
                "backend[1].name",
                "listener[0].address",
                "listener[0].fallback_to_primary",
                "listener[0].session_state",
            ]
        );
    }

    #[test]
    fn extra_parameters_must_be_names() {
        let text = "[pool]\ntrack_extra_parameters = [\"search_path\", \"a; DROP\"]\n";
        let bad: Vec<Problem> = problems(text)
            .into_iter()
            .filter(|p| p.key == "pool.track_extra_parameters")
            .collect();
        assert_eq!(bad.len(), 1);
        assert!(bad[0].message.contains("\"a; DROP\""), "{}", bad[0].message);
    }

    #[test]
    fn empty_config_asks_for_backends_and_listeners() {
        let keys: Vec<String> = problems("").into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["backend", "listener"]);
    }

    #[test]
    fn duplicate_listen_address_is_refused() {
        let text = format!(
            "{MINIMAL}\n[[listener]]\nname = \"rw2\"\naddress = \"127.0.0.1\"\nport = 6432\ntarget = \"any\"\n"
        );
        let p = problems(&text);
        assert_eq!(p[0].key, "listener[1].port");
        assert!(p[0].message.contains("already used"));
    }

    #[test]
    fn resolved_toml_redacts_password_and_round_trips() {
        let text = format!("[health.sql]\nuser = \"mon\"\npassword = \"s3cret\"\n{MINIMAL}");
        let c = Config::parse(&text).unwrap();
        let shown = c.to_resolved_toml();
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains("<redacted>"));
        let again = Config::parse(&shown).unwrap();
        assert_eq!(again.health.sql.user, "mon");
        assert_eq!(again.listeners[0].connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn durations_accept_pgbouncer_seconds_and_text() {
        let text = format!(
            "[pool]\nquery_wait_timeout = 30\nreserve_pool_timeout = 2.5\nserver_lifetime = \"1h\"\n{MINIMAL}"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.pool.query_wait_timeout, Duration::from_secs(30));
        assert_eq!(c.pool.reserve_pool_timeout, Duration::from_millis(2500));
        assert_eq!(c.pool.server_lifetime, Duration::from_secs(3600));
        let err = Config::parse(&format!("[pool]\nquery_wait_timeout = -1\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("query_wait_timeout") && err.contains("negative"),
            "{err}"
        );
    }

    #[test]
    fn replica_lag_is_bytes_a_size_or_a_delay() {
        let lag = |v: &str| {
            with_minimal(&format!("[health]\nmax_replica_lag = {v}"))
                .map(|c| c.health.max_replica_lag)
        };
        assert_eq!(lag("0"), Ok(LagLimit::Off));
        assert_eq!(lag("1048576"), Ok(LagLimit::Bytes(1 << 20)));
        assert_eq!(lag("\"16MB\""), Ok(LagLimit::Bytes(16 << 20)));
        assert_eq!(lag("\"512kB\""), Ok(LagLimit::Bytes(512 << 10)));
        assert_eq!(lag("\"10s\""), Ok(LagLimit::Time(Duration::from_secs(10))));
        assert_eq!(
            lag("\"500ms\""),
            Ok(LagLimit::Time(Duration::from_millis(500)))
        );
        let err = lag("\"lots\"").unwrap_err();
        assert!(
            err.contains("max_replica_lag") && err.contains("16MB") && err.contains("10s"),
            "{err}"
        );
        // Printed back as written, so `pgvane check` output loads again.
        let c = Config::parse(&format!("[health]\nmax_replica_lag = \"10s\"\n{MINIMAL}")).unwrap();
        let again = Config::parse(&c.to_resolved_toml()).unwrap();
        assert_eq!(
            again.health.max_replica_lag,
            LagLimit::Time(Duration::from_secs(10))
        );
    }

    #[test]
    fn pooled_listener_needs_users_unless_trust() {
        let text = MINIMAL.replace(
            "target = \"primary\"",
            "target = \"primary\"\nmode = \"transaction\"",
        );
        let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["user"]);
        let trust = format!("[auth]\ntype = \"trust\"\n{text}");
        assert!(Config::parse(&trust).is_ok());
        let with_user = format!("{text}\n[[user]]\nname = \"app\"\npassword = \"pw\"\n");
        let c = Config::parse(&with_user).unwrap();
        assert_eq!(c.auth.method, AuthMethod::ScramSha256);
        assert!(!c.to_resolved_toml().contains("\"pw\""));
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgvane.toml");
        let c = Config::load(&path).unwrap();
        assert!(c.backends.len() >= 2);
        assert!(c.listeners.iter().any(|l| l.target == Target::Primary));
        assert!(c.listeners.iter().any(|l| l.target == Target::Replica));
    }
}
