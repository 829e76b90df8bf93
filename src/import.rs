//! Import: turns a `pgbouncer.ini` and/or a Patroni-style `haproxy.cfg` into a commented
//! pgvane.toml, and names every setting it could not carry over, with why.
//!
//! PgBouncer's `[pgbouncer]` settings map to pgvane's keys of the same name (`[general]`,
//! `[pool]`, `[limits]`, `[auth]`, `[admin]`); its listening address becomes a pooled
//! listener in its `pool_mode`; the servers its `[databases]` name become backends (or,
//! when they point at an HAProxy listener of the imported haproxy.cfg, the pooled listener
//! takes that listener's target); `[users]` become `[[user]]` entries. HAProxy's `listen`
//! sections with Patroni's HTTP checks become passthrough listeners with a target (`/primary`
//! or `/` primary, `/replica` replica, `/read-only` any), their `server` lines the backends,
//! and `default-server inter/fall/rise` the health settings.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::config::{ListenerMode, Target};

/// What the importer read, and what it could not carry over.
#[derive(Debug, Default)]
pub struct Import {
    general: Vec<(String, toml::Value)>,
    pool: Vec<(String, toml::Value)>,
    limits: Vec<(String, toml::Value)>,
    auth: Vec<(String, toml::Value)>,
    admin: Vec<(String, toml::Value)>,
    health: Vec<(String, toml::Value)>,
    tls: Vec<(String, toml::Value)>,
    backends: Vec<Backend>,
    listeners: Vec<Listener>,
    users: Vec<(String, Vec<(String, toml::Value)>)>,
    databases: Vec<(String, Vec<(String, toml::Value)>)>,
    /// "key: why", one per setting not carried over.
    pub skipped: Vec<String>,
    /// HAProxy listeners by port, for PgBouncer databases that point at one.
    haproxy_ports: BTreeMap<u16, Target>,
}

#[derive(Debug)]
struct Backend {
    name: String,
    host: String,
    port: u16,
    patroni_port: Option<u16>,
}

#[derive(Debug)]
struct Listener {
    name: String,
    address: String,
    port: u16,
    target: Target,
    mode: ListenerMode,
    extra: Vec<(String, toml::Value)>,
    origin: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {error}")]
    Read { path: String, error: String },
}

/// `[pgbouncer]` keys pgvane has under the same name, and where.
const GENERAL_KEYS: &[&str] = &["max_client_conn", "client_login_timeout"];
const POOL_KEYS: &[&str] = &[
    "default_pool_size",
    "min_pool_size",
    "reserve_pool_size",
    "reserve_pool_timeout",
    "max_db_connections",
    "max_user_connections",
    "server_idle_timeout",
    "server_lifetime",
    "server_connect_timeout",
    "query_wait_timeout",
    "idle_transaction_timeout",
    "query_timeout",
    "transaction_timeout",
    "server_reset_query",
    "server_check_delay",
    "server_check_query",
    "ignore_startup_parameters",
    "max_prepared_statements",
    "track_extra_parameters",
    "autodb_idle_timeout",
    "max_packet_size",
];
const LIMIT_KEYS: &[&str] = &["max_db_client_connections", "max_user_client_connections"];
/// `[pgbouncer]` TLS keys pgvane's `[tls]` has under the same name.
const TLS_KEYS: &[&str] = &[
    "client_tls_sslmode",
    "client_tls_cert_file",
    "client_tls_key_file",
    "client_tls_ca_file",
    "client_tls_protocols",
    "client_tls_ciphers",
    "server_tls_sslmode",
    "server_tls_ca_file",
    "server_tls_cert_file",
    "server_tls_key_file",
];
/// Keys whose value is a comma-separated list in pgbouncer.ini.
const LIST_KEYS: &[&str] = &[
    "ignore_startup_parameters",
    "track_extra_parameters",
    "admin_users",
    "stats_users",
];
/// Keys with a duration in seconds (pgvane reads a plain number as seconds too).
const INTEGER_KEYS: &[&str] = &[
    "max_client_conn",
    "default_pool_size",
    "min_pool_size",
    "reserve_pool_size",
    "max_db_connections",
    "max_user_connections",
    "max_prepared_statements",
    "max_packet_size",
    "max_db_client_connections",
    "max_user_client_connections",
];

/// Why a `[pgbouncer]` key has no pgvane equivalent.
fn why_not(key: &str) -> &'static str {
    match key {
        "logfile" | "syslog" | "syslog_ident" | "syslog_facility" | "log_connections"
        | "log_disconnections" | "log_pooler_errors" | "log_stats" | "verbose" | "stats_period" => {
            "pgvane logs to stdout (journald under systemd); the level comes from RUST_LOG, statistics from /metrics and SHOW STATS"
        }
        "pidfile" | "user" => "run pgvane under a service manager (contrib/pgvane.service)",
        "unix_socket_dir" | "unix_socket_mode" | "unix_socket_group" => {
            "pgvane listens on TCP only"
        }
        "server_tls_protocols" | "server_tls_ciphers" => {
            "toward PostgreSQL pgvane uses rustls' defaults (TLS 1.2 and 1.3)"
        }
        "auth_hba_file" | "auth_ident_file" => {
            "pgvane authenticates from [[user]] entries, the auth_file and auth_query"
        }
        "server_round_robin" => "pgvane reuses the most recently used server connection (LIFO)",
        "server_reset_query_always" => {
            "pgvane runs server_reset_query when a session-mode client leaves; transaction-mode clients carry their parameters instead"
        }
        "server_fast_close" | "server_login_retry" | "cancel_wait_timeout" | "suspend_timeout"
        | "query_wait_notify" | "application_name_add_host" | "disable_pqexec"
        | "scram_iterations" | "client_idle_timeout" => "no equivalent in pgvane",
        "listen_backlog" | "so_reuseport" | "tcp_defer_accept" | "tcp_socket_buffer"
        | "tcp_keepalive" | "tcp_keepcnt" | "tcp_keepidle" | "tcp_keepintvl"
        | "tcp_user_timeout" | "pkt_buf" | "sbuf_loopcnt" => "pgvane keeps the system's socket defaults",
        k if k.starts_with("dns_") || k == "resolv_conf" => {
            "pgvane resolves backend host names when it connects"
        }
        "peer_id" => "peering is not supported",
        "conffile" | "service_name" | "job_name" => "Windows service settings",
        _ => "unknown to the importer",
    }
}

impl Import {
    /// Reads a pgbouncer.ini's text.
    pub fn pgbouncer(&mut self, text: &str) -> Result<(), String> {
        let options = ini::ParseOption {
            enabled_quote: false,
            enabled_escape: false,
            ..Default::default()
        };
        let parsed = ini::Ini::load_from_str_opt(text, options).map_err(|e| e.to_string())?;
        if text.lines().any(|l| l.trim_start().starts_with("%include")) {
            self.skip("%include", "included files are not read: import each one");
        }
        let section = |name: &str| parsed.section(Some(name));
        let mut mode = ListenerMode::Session;
        let (mut address, mut port) = (None, 6432u16);
        if let Some(s) = section("pgbouncer") {
            for (key, value) in s.iter() {
                let value = value.trim();
                match key {
                    "listen_addr" => address = Some(value.to_owned()),
                    "listen_port" => match value.parse() {
                        Ok(p) => port = p,
                        Err(_) => self.skip(key, "not a port number"),
                    },
                    "pool_mode" => match value {
                        "session" => mode = ListenerMode::Session,
                        "transaction" => mode = ListenerMode::Transaction,
                        _ => {
                            mode = ListenerMode::Transaction;
                            self.skip("pool_mode = statement", "not supported; the listener uses transaction pooling, the nearest");
                        }
                    },
                    "auth_type" => match value {
                        "md5" | "scram-sha-256" | "trust" | "cert" => self.auth.push(("type".into(), value.into())),
                        "plain" => self.auth.push(("type".into(), "md5".into())),
                        other => self.skip(&format!("auth_type = {other}"), "pgvane authenticates with scram-sha-256, md5 or trust; scram-sha-256 is used"),
                    },
                    "auth_file" => self.auth.push(("file".into(), value.into())),
                    "auth_user" | "auth_query" | "auth_dbname" => self.auth.push((key.into(), value.into())),
                    k if TLS_KEYS.contains(&k) => self.tls.push((k.into(), value.into())),
                    "admin_users" | "stats_users" => self.admin.push((key.into(), typed(key, value))),
                    k if GENERAL_KEYS.contains(&k) => self.general.push((k.into(), typed(k, value))),
                    k if POOL_KEYS.contains(&k) => self.pool.push((k.into(), typed(k, value))),
                    k if LIMIT_KEYS.contains(&k) => self.limits.push((k.into(), typed(k, value))),
                    k => self.skip(k, why_not(k)),
                }
            }
        }
        // The servers the databases name: backends, or an HAProxy listener's target.
        let mut target = Target::Primary;
        if let Some(s) = section("databases") {
            for (name, value) in s.iter() {
                let params = connstr(value);
                let host = params
                    .get("host")
                    .cloned()
                    .unwrap_or_else(|| "127.0.0.1".into());
                let port: u16 = params
                    .get("port")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(5432);
                if let Some(t) = self.haproxy_ports.get(&port).filter(|_| is_local(&host)) {
                    target = *t;
                } else if host.starts_with('/') {
                    self.skip(
                        &format!("[databases] {name}"),
                        "a Unix socket server: pgvane connects over TCP",
                    );
                } else {
                    self.add_backend(&host, port, None);
                }
                let mut keys = Vec::new();
                for (k, v) in &params {
                    let pool_mode = |m: &str| Some(toml::Value::from(m));
                    match (k.as_str(), v.as_str()) {
                        ("host" | "port", _) => {}
                        ("dbname", v) if v == name => {}
                        ("dbname", _) => keys.push((k.clone(), toml::Value::from(v.clone()))),
                        ("pool_size" | "min_pool_size" | "reserve_pool_size" | "max_db_connections", _) => keys.push((k.clone(), typed("default_pool_size", v))),
                        ("reserve_pool", _) => keys.push(("reserve_pool_size".into(), typed("default_pool_size", v))),
                        ("pool_mode", "session" | "transaction") => keys.extend(pool_mode(v).map(|m| (k.clone(), m))),
                        ("pool_mode", _) => {
                            keys.push((k.clone(), toml::Value::from("transaction")));
                            self.skip(&format!("[databases] {name} pool_mode={v}"), "statement mode is not supported; transaction, the nearest, is used");
                        }
                        ("user" | "password", _) => self.skip(&format!("[databases] {name} {k}"), "pgvane logs in to PostgreSQL as the client's user; a forced user is not supported"),
                        _ => self.skip(&format!("[databases] {name} {k}={v}"), "not supported per database; [pool] and [limits] settings apply to every database"),
                    }
                }
                self.databases.push((name.to_owned(), keys));
            }
        }
        if let Some(s) = section("users") {
            for (name, value) in s.iter() {
                let mut keys = Vec::new();
                for (k, v) in connstr(value) {
                    match k.as_str() {
                        "pool_size" | "reserve_pool_size" | "max_user_connections" => keys.push((k.clone(), typed("default_pool_size", &v))),
                        "max_user_client_connections" => keys.push((k.clone(), typed(&k, &v))),
                        "pool_mode" if v == "session" || v == "transaction" => keys.push((k.clone(), toml::Value::from(v))),
                        "pool_mode" => {
                            keys.push((k.clone(), toml::Value::from("transaction")));
                            self.skip(&format!("[users] {name} pool_mode={v}"), "statement mode is not supported; transaction, the nearest, is used");
                        }
                        _ => self.skip(&format!("[users] {name} {k}={v}"), "per-user settings other than pool_size, reserve_pool_size, pool_mode, max_user_connections and max_user_client_connections are not supported"),
                    }
                }
                self.users.push((name.to_owned(), keys));
            }
        }
        if section("peers").is_some_and(|p| !p.is_empty()) {
            self.skip("[peers]", "peering is not supported");
        }
        let addresses = match address.as_deref() {
            None | Some("") => {
                self.skip(
                    "listen_addr unset (Unix socket only)",
                    "a TCP listener on 127.0.0.1 is made instead",
                );
                vec!["127.0.0.1".to_owned()]
            }
            Some(list) => list.split(',').map(|a| listen_address(a.trim())).collect(),
        };
        for (i, address) in addresses.into_iter().enumerate() {
            let name = match i {
                0 => "pgbouncer".to_owned(),
                n => format!("pgbouncer-{}", n + 1),
            };
            self.listeners.push(Listener {
                name,
                address,
                port,
                target,
                mode,
                extra: Vec::new(),
                origin: "pgbouncer.ini [pgbouncer] listen_addr, listen_port, pool_mode".into(),
            });
        }
        Ok(())
    }

    /// Reads an haproxy.cfg's text (read it before the pgbouncer.ini it serves).
    pub fn haproxy(&mut self, text: &str) -> Result<(), String> {
        let mut sections: Vec<(Vec<String>, Vec<Vec<String>>)> = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim_end();
            if line.trim().is_empty() {
                continue;
            }
            let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            if !line.starts_with(char::is_whitespace) {
                sections.push((words, Vec::new()));
            } else if let Some((_, lines)) = sections.last_mut() {
                lines.push(words);
            } else {
                return Err(format!("a setting outside any section: {}", line.trim()));
            }
        }
        let mut defaults: Vec<Vec<String>> = Vec::new();
        let mut health_set = false;
        for (head, lines) in &sections {
            match head[0].as_str() {
                "global" => {
                    for l in lines {
                        match l[0].as_str() {
                            "maxconn" => self
                                .general
                                .push(("max_client_conn".into(), typed("max_client_conn", &l[1]))),
                            _ => self.skip(
                                &format!("global {}", l.join(" ")),
                                "process settings of HAProxy's own",
                            ),
                        }
                    }
                }
                "defaults" => defaults = lines.clone(),
                "listen" if lines.iter().any(|l| l[..] == ["mode", "http"]) => {
                    self.skip(&format!("listen {}", head.get(1).map_or("", |s| s)), "an HTTP section (stats page): pgvane's admin API serves /metrics and /status");
                }
                "listen" => {
                    let name = head.get(1).cloned().unwrap_or_else(|| "haproxy".into());
                    let all: Vec<&Vec<String>> = defaults.iter().chain(lines).collect();
                    self.haproxy_listen(&name, &all, &mut health_set);
                }
                other => self.skip(
                    &format!("{other} {}", head[1..].join(" ")),
                    "frontend/backend pairs are not imported: write them as one listen section",
                ),
            }
        }
        for l in &defaults {
            match l[0].as_str() {
                "mode" | "timeout" | "option" | "balance" => {}
                _ => self.skip(
                    &format!("defaults {}", l.join(" ")),
                    "no equivalent in pgvane",
                ),
            }
        }
        Ok(())
    }

    fn haproxy_listen(&mut self, name: &str, lines: &[&Vec<String>], health_set: &mut bool) {
        let mut bind = None;
        let mut target = None;
        let mut extra = Vec::new();
        for l in lines {
            let w: Vec<&str> = l.iter().map(String::as_str).collect();
            match w.as_slice() {
                ["bind", addr, ..] => bind = parse_bind(addr),
                ["option", "httpchk", rest @ ..] => {
                    let uri = rest
                        .iter()
                        .find(|w| w.starts_with('/'))
                        .copied()
                        .unwrap_or("/");
                    target = Some(match uri {
                        "/replica" | "/replica?lag=0" => Target::Replica,
                        u if u.starts_with("/replica") => Target::Replica,
                        "/read-only" | "/standby-leader" => Target::Any,
                        _ => Target::Primary,
                    });
                    self.health.retain(|(k, _)| k != "method");
                    self.health.push(("method".into(), "patroni".into()));
                }
                ["http-check", "expect", "status", "200"] | ["mode", "tcp"] => {}
                ["balance", how] => match *how {
                    "leastconn" => extra.push(("balance".to_owned(), "least-conn".into())),
                    "roundrobin" => {}
                    other => self.skip(
                        &format!("listen {name} balance {other}"),
                        "pgvane balances round-robin or least-conn",
                    ),
                },
                ["timeout", "connect", v] => {
                    extra.push(("connect_timeout".to_owned(), haproxy_duration(v)))
                }
                ["timeout", "check", v] if !*health_set => {
                    self.health.push(("timeout".into(), haproxy_duration(v)))
                }
                ["timeout", "client" | "server", _] => self.skip(
                    &format!("listen {name} {}", w.join(" ")),
                    "pgvane does not close idle passthrough sessions",
                ),
                ["default-server", rest @ ..] => {
                    if !*health_set {
                        self.server_options(rest);
                    }
                }
                ["server", server, addr, rest @ ..] => {
                    let Some(addr) = parse_bind(addr) else {
                        self.skip(
                            &format!("listen {name} server {server}"),
                            "its address is not host:port",
                        );
                        continue;
                    };
                    let check_port = rest
                        .windows(2)
                        .find(|p| p[0] == "port")
                        .and_then(|p| p[1].parse::<u16>().ok());
                    self.add_backend(&addr.0, addr.1, check_port);
                }
                ["retries", _] | ["log", ..] => {}
                _ => self.skip(
                    &format!("listen {name} {}", w.join(" ")),
                    "no equivalent in pgvane",
                ),
            }
        }
        *health_set = *health_set || lines.iter().any(|l| l[0] == "default-server");
        let Some((address, port)) = bind else {
            self.skip(
                &format!("listen {name}"),
                "no bind line: nothing to listen on",
            );
            return;
        };
        let target = target.unwrap_or_else(|| {
            self.skip(&format!("listen {name} (no option httpchk)"), "without Patroni's HTTP check HAProxy balances over all servers; the listener targets any backend pgvane finds healthy");
            Target::Any
        });
        self.haproxy_ports.insert(port, target);
        self.listeners.push(Listener {
            name: name.to_owned(),
            address,
            port,
            target,
            mode: ListenerMode::Passthrough,
            extra,
            origin: format!("haproxy.cfg listen {name}"),
        });
    }

    /// `default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions`.
    fn server_options(&mut self, words: &[&str]) {
        let mut i = 0;
        while i < words.len() {
            let value = words.get(i + 1).copied().unwrap_or("");
            match words[i] {
                "inter" => self.health.push(("interval".into(), haproxy_duration(value))),
                "fastinter" => self.health.push(("fast_interval".into(), haproxy_duration(value))),
                "fall" | "rise" => self.health.push((words[i].into(), typed("fall", value))),
                "on-marked-down" if value == "shutdown-sessions" => {
                    // pgvane's default: on_role_loss = "shutdown-sessions".
                }
                "maxconn" => self.skip(&format!("default-server maxconn {value}"), "pgvane does not cap passthrough connections per backend; use max_client_conn or pooling"),
                other => {
                    self.skip(&format!("default-server {other}"), "no equivalent in pgvane");
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
    }

    fn add_backend(&mut self, host: &str, port: u16, patroni_port: Option<u16>) {
        if let Some(b) = self
            .backends
            .iter_mut()
            .find(|b| b.host == host && b.port == port)
        {
            b.patroni_port = b.patroni_port.or(patroni_port);
            return;
        }
        let name = format!("pg{}", self.backends.len() + 1);
        self.backends.push(Backend {
            name,
            host: host.to_owned(),
            port,
            patroni_port,
        });
    }

    fn skip(&mut self, what: &str, why: &str) {
        self.skipped.push(format!("{what}: {why}"));
    }

    /// The pgvane.toml, with what was not carried over listed at the top.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# pgvane.toml made by `pgvane import`. Check it with `pgvane check --config FILE`."
        );
        if self.skipped.is_empty() {
            let _ = writeln!(out, "# Every setting was carried over.");
        } else {
            let _ = writeln!(out, "#\n# Not carried over ({}):", self.skipped.len());
            for s in &self.skipped {
                let _ = writeln!(out, "#   {s}");
            }
        }
        for (section, keys) in [
            ("general", &self.general),
            ("pool", &self.pool),
            ("limits", &self.limits),
            ("auth", &self.auth),
            ("admin", &self.admin),
            ("health", &self.health),
            ("tls", &self.tls),
        ] {
            if keys.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n[{section}]");
            // In the order first read; the last value of a key wins, as in the files.
            let mut merged: Vec<(&String, &toml::Value)> = Vec::new();
            for (k, v) in keys {
                match merged.iter_mut().find(|(seen, _)| *seen == k) {
                    Some(entry) => entry.1 = v,
                    None => merged.push((k, v)),
                }
            }
            for (k, v) in merged {
                let _ = writeln!(out, "{k} = {v}");
            }
        }
        if self
            .health
            .iter()
            .any(|(k, v)| k == "method" && v.as_str() == Some("patroni"))
        {
            let _ = writeln!(out, "# pgvane confirms Patroni's primary over SQL (health.patroni.cross_check):\n# give it a login in [health.sql] (user, password).");
        }
        if self.backends.is_empty() {
            let _ = writeln!(out, "\n# No server was named: set your PostgreSQL servers here.\n[[backend]]\nname = \"pg1\"\nhost = \"127.0.0.1\"\nport = 5432");
        }
        for b in &self.backends {
            let _ = writeln!(
                out,
                "\n[[backend]]\nname = \"{}\"\nhost = {}\nport = {}",
                b.name,
                toml::Value::from(b.host.clone()),
                b.port
            );
            if let Some(p) = b.patroni_port {
                let _ = writeln!(out, "patroni_port = {p}");
            }
        }
        for l in &self.listeners {
            let mode = match l.mode {
                ListenerMode::Passthrough => "passthrough",
                ListenerMode::Session => "session",
                ListenerMode::Transaction => "transaction",
            };
            let _ = writeln!(
                out,
                "\n# From {}.\n[[listener]]\nname = \"{}\"\naddress = {}\nport = {}\nmode = \"{mode}\"\ntarget = \"{}\"",
                l.origin,
                l.name,
                toml::Value::from(l.address.clone()),
                l.port,
                l.target
            );
            for (k, v) in &l.extra {
                let _ = writeln!(out, "{k} = {v}");
            }
        }
        let entries = [("user", &self.users), ("database", &self.databases)];
        for (table, list) in entries {
            for (name, keys) in list {
                let _ = writeln!(
                    out,
                    "\n[[{table}]]\nname = {}",
                    toml::Value::from(name.clone())
                );
                for (k, v) in keys {
                    let _ = writeln!(out, "{k} = {v}");
                }
            }
        }
        out
    }
}

/// Reads the files given and makes the pgvane.toml: haproxy.cfg first, so that PgBouncer
/// databases pointing at an HAProxy listener take its target.
pub fn import(
    pgbouncer: Option<&std::path::Path>,
    haproxy: Option<&std::path::Path>,
) -> Result<Import, ImportError> {
    type Reader = fn(&mut Import, &str) -> Result<(), String>;
    let mut import = Import::default();
    let files: [(Option<&std::path::Path>, Reader); 2] =
        [(haproxy, Import::haproxy), (pgbouncer, Import::pgbouncer)];
    for (path, read) in files {
        let Some(path) = path else { continue };
        let failed = |error: String| ImportError::Read {
            path: path.display().to_string(),
            error,
        };
        let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
        read(&mut import, &text).map_err(failed)?;
    }
    Ok(import)
}

/// A value as pgvane's key wants it: a list, a number, or text.
fn typed(key: &str, value: &str) -> toml::Value {
    let value = value.trim();
    if LIST_KEYS.contains(&key) {
        let items = value.split(',').map(str::trim).filter(|s| !s.is_empty());
        return toml::Value::Array(items.map(toml::Value::from).collect());
    }
    if INTEGER_KEYS.contains(&key) || matches!(key, "fall" | "rise") {
        if let Ok(n) = value.parse::<i64>() {
            return toml::Value::Integer(n);
        }
    }
    // Durations are seconds in pgbouncer.ini, as a plain number is in pgvane.toml; a
    // fraction becomes milliseconds.
    if let Ok(n) = value.parse::<i64>() {
        return toml::Value::Integer(n);
    }
    if let Ok(n) = value.parse::<f64>() {
        return toml::Value::from(format!("{}ms", (n * 1000.0).round() as u64));
    }
    toml::Value::from(value.to_owned())
}

/// HAProxy durations: a number of milliseconds, or with a unit (us, ms, s, m, h, d).
fn haproxy_duration(value: &str) -> toml::Value {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (n, unit) = value.split_at(split);
    let unit = if unit.is_empty() { "ms" } else { unit };
    toml::Value::from(format!("{n}{unit}"))
}

/// `*:5000`, `:5000`, `127.0.0.1:5000`, `[::1]:5000` as (address, port).
fn parse_bind(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((listen_address(host), port))
}

/// PgBouncer's and HAProxy's "all addresses" and names as pgvane's listener address.
fn listen_address(a: &str) -> String {
    match a {
        "" | "*" | "0.0.0.0" => "0.0.0.0".into(),
        "localhost" => "127.0.0.1".into(),
        other => other
            .parse::<SocketAddr>()
            .map_or(other.to_owned(), |s| s.ip().to_string()),
    }
}

fn is_local(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "::1")
}

/// libpq-style `key=value key='quoted value'` pairs.
fn connstr(value: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = value.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().to_owned();
        let after = after.trim_start();
        let (val, next) = match after.strip_prefix('\'') {
            Some(quoted) => match quoted.find('\'') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            },
            None => match after.find(char::is_whitespace) {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            },
        };
        out.insert(key, val.to_owned());
        rest = next.trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_split_as_libpq_does() {
        let c = connstr("host=db1 port=5433  dbname='my db' user=app");
        assert_eq!(c["host"], "db1");
        assert_eq!(c["port"], "5433");
        assert_eq!(c["dbname"], "my db");
        assert_eq!(c["user"], "app");
    }

    #[test]
    fn values_take_pgvane_s_types() {
        assert_eq!(
            typed("admin_users", "a, b"),
            toml::Value::Array(vec!["a".into(), "b".into()])
        );
        assert_eq!(typed("server_lifetime", "3600"), toml::Value::Integer(3600));
        assert_eq!(
            typed("reserve_pool_timeout", "2.5"),
            toml::Value::from("2500ms")
        );
        assert_eq!(
            typed("server_reset_query", "DISCARD ALL"),
            toml::Value::from("DISCARD ALL")
        );
        assert_eq!(haproxy_duration("3s"), toml::Value::from("3s"));
        assert_eq!(haproxy_duration("1500"), toml::Value::from("1500ms"));
        assert_eq!(parse_bind("*:5000"), Some(("0.0.0.0".into(), 5000)));
        assert_eq!(parse_bind("[::1]:5001"), Some(("::1".into(), 5001)));
    }

    #[test]
    fn patroni_check_paths_pick_the_target() {
        let cfg = "listen primary\n    bind *:5000\n    option httpchk OPTIONS /primary\n    server a 10.0.0.1:5432 check port 8008\nlisten replicas\n    bind *:5001\n    option httpchk OPTIONS /replica\n    balance leastconn\n    server a 10.0.0.1:5432 check port 8008\n    server b 10.0.0.2:5432 check port 8008\n";
        let mut i = Import::default();
        i.haproxy(cfg).unwrap();
        let targets: Vec<Target> = i.listeners.iter().map(|l| l.target).collect();
        assert_eq!(targets, [Target::Primary, Target::Replica]);
        assert_eq!(
            i.backends.len(),
            2,
            "servers in both sections are the same backends"
        );
        assert!(i.skipped.is_empty(), "{:?}", i.skipped);
        let text = i.to_toml();
        assert!(text.contains("balance = \"least-conn\""), "{text}");
    }
}
