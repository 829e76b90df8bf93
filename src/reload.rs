//! Reload: reads the configuration file again, validates it, and applies what changed to the
//! running process (SIGHUP, the console's RELOAD, `POST /reload`).
//!
//! An invalid file changes nothing. A valid one is compared with the configuration in force,
//! section by section: users and the auth file, `[pool]` and per-user pool settings (pools
//! whose settings changed are replaced; their connections close as they are released),
//! limits, the `general` settings clients meet, the admin console's users and the API token,
//! `[health]` (every check restarts with it), backends (added ones are checked and join
//! the table as their checks rise; removed or moved ones leave it, ending their sessions:
//! drain one first to let them finish), drain
//! flags, and listeners (closed, opened, moved to another address, or given a new route for
//! their next clients) take effect at once. What cannot change in a running process is
//! named in the reply and left as it was: `admin.listen`, `admin.unix_socket`, `general.worker_threads` and
//! `general.upgrade_socket`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{Config, ConfigError, ListenerConfig};
use crate::limits::UserLimits;
use crate::proxy::{ClientSettings, Shared};
use crate::server::{Listeners, Referenced};
use crate::tls::TlsByListener;

/// What a reload did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// The changes applied, one line each.
    pub applied: Vec<String>,
    /// Changes found in the file that need a restart; the running values stay.
    pub needs_restart: Vec<String>,
    /// Changes that could not be made (a new listener's port taken, say); what ran before
    /// stays.
    pub failed: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.applied.is_empty() {
            true => write!(f, "nothing changed")?,
            false => write!(f, "applied: {}", self.applied.join("; "))?,
        }
        for (what, items) in [
            ("needs a restart (not applied)", &self.needs_restart),
            ("failed (not applied)", &self.failed),
        ] {
            if !items.is_empty() {
                write!(f, "; {what}: {}", items.join("; "))?;
            }
        }
        Ok(())
    }
}

/// A reload's outcome, as the console and the HTTP API tell it.
pub type Outcome = Result<Report, String>;

/// Asks the process to reload; answered once the reload is done.
#[derive(Clone)]
pub struct ReloadHandle(mpsc::Sender<oneshot::Sender<Outcome>>);

impl ReloadHandle {
    pub fn new() -> (Self, mpsc::Receiver<oneshot::Sender<Outcome>>) {
        let (tx, rx) = mpsc::channel(4);
        (Self(tx), rx)
    }

    pub async fn reload(&self) -> Outcome {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(tx)
            .await
            .map_err(|_| "pgvane is shutting down".to_owned())?;
        rx.await.map_err(|_| "pgvane is shutting down".to_owned())?
    }
}

/// Holds the configuration in force and what a reload changes.
pub struct Reloader {
    path: PathBuf,
    current: Config,
    shared: Arc<Shared>,
    listeners: Listeners,
    /// The certificate and key files of the configuration last read, as last seen.
    tls_files: Vec<crate::tls::Fingerprint>,
}

impl Reloader {
    pub fn new(path: PathBuf, current: Config, shared: Arc<Shared>, listeners: Listeners) -> Self {
        Self {
            tls_files: crate::tls::fingerprints(&current),
            path,
            current,
            shared,
            listeners,
        }
    }

    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// The listeners, for shutdown.
    pub fn into_listeners(self) -> Listeners {
        self.listeners
    }

    /// The configuration in force.
    pub fn current(&self) -> &Config {
        &self.current
    }

    /// Whether a certificate or key file changed since the last reload (or start).
    pub fn tls_files_changed(&self) -> bool {
        self.tls_files
            .iter()
            .any(|f| f != &crate::tls::Fingerprint::of(&f.path))
    }

    /// Reads and validates the file, then applies it; logs and counts the outcome.
    pub fn reload(&mut self) -> Outcome {
        let loaded = Config::load(&self.path).and_then(|c| {
            // Seen now, applied or not: a bad certificate is reported once, not at every
            // look, and a fixed one is noticed.
            self.tls_files = crate::tls::fingerprints(&c);
            let referenced = crate::server::load_referenced(&c)?;
            Ok((c, referenced))
        });
        let shared = self.shared.clone();
        let reloads = &shared.metrics.reloads;
        match loaded {
            Ok((config, referenced)) => {
                let report = self.apply(config, referenced);
                reloads.with_label_values(&["ok"]).inc();
                info!(path = %self.path.display(), %report, "configuration reloaded");
                Ok(report)
            }
            Err(e) => {
                reloads.with_label_values(&["failed"]).inc();
                let why = describe(&e);
                warn!(path = %self.path.display(), error = %why, "reload refused: the configuration in force is unchanged");
                Err(why)
            }
        }
    }

    /// Applies `next` (valid, with its users and certificates loaded) as far as a running
    /// process can.
    fn apply(&mut self, mut next: Config, referenced: Referenced) -> Report {
        let Referenced {
            users,
            tls,
            server_tls,
        } = referenced;
        self.shared.metrics.set_certificates(&tls);
        for warning in crate::tls::expiring_soon(&tls) {
            warn!("{warning}");
        }
        let mut report = Report::default();
        self.keep_what_needs_a_restart(&mut next, &mut report);
        let old = self.current.clone();
        let old = &old;
        let shared = &self.shared.clone();

        let general = ClientSettings::of(&next.general);
        let before = **shared.general.load();
        if general != before {
            resize_client_slots(shared, before.max_client_conn, general.max_client_conn);
            shared.general.store(Arc::new(general));
            report.applied.push(
                "general: max_client_conn, client_login_timeout, failover_hold_timeout".into(),
            );
        }
        if next.general.shutdown_timeout != old.general.shutdown_timeout {
            report.applied.push("general.shutdown_timeout".into());
        }

        let users = Arc::new(users);
        if next.users != old.users || next.auth != old.auth {
            report.applied.push("users and auth".into());
        }
        shared.users.store(users.clone());
        let retired = shared
            .pools
            .reconfigure(&next.pool, &next.databases, &next.users, &users);
        if next.pool != old.pool {
            report.applied.push("pool settings".into());
        }
        if next.databases != old.databases {
            report.applied.push("databases".into());
        }
        if retired > 0 {
            report.applied.push(format!(
                "{retired} pool(s) replaced: their server connections close as they are released"
            ));
        }

        let limits_changed = next.limits != old.limits;
        if limits_changed || next.users != old.users {
            let before = shared.user_limits.load_full();
            shared
                .user_limits
                .store(user_limits_of(&next, before.as_deref()));
        }
        if limits_changed {
            report.applied.push("limits".into());
        }
        self.apply_listeners(&mut next, &tls, &mut report);

        // Server connections made with other TLS settings are replaced as released.
        let server_tls_changed = next.tls.server_keys() != old.tls.server_keys();
        shared.pools.set_server_tls(server_tls.clone());
        if server_tls_changed {
            let replaced = shared.pools.reconnect(None);
            report.applied.push(format!(
                "TLS toward PostgreSQL: {replaced} pool(s) replaced"
            ));
        }
        if shared
            .topology
            .reconfigure_health(&next.health, server_tls, server_tls_changed)
        {
            report
                .applied
                .push("[health]: every check restarted with it".into());
        }
        let changed = shared.topology.reconfigure(&next.backends);
        if !changed.is_empty() {
            let retired = shared
                .pools
                .retire_backends_not_in(&shared.topology.backends());
            report.applied.extend(changed);
            if retired > 0 {
                report.applied.push(format!(
                    "{retired} pool(s) of removed or moved backends closed"
                ));
            }
        }
        for b in &next.backends {
            if let Ok(true) = crate::admin::drain(shared, &b.name, b.drain) {
                report
                    .applied
                    .push(format!("backend {} drain = {}", b.name, b.drain));
            }
        }
        if next.admin != old.admin {
            report.applied.push("admin users and token".into());
        }
        shared.console.reconfigure(&next);
        self.current = next;
        report
    }

    /// Names what differs in sections a running process cannot change, and puts the values
    /// in force back into `next` so that it says what is in force.
    fn keep_what_needs_a_restart(&self, next: &mut Config, report: &mut Report) {
        let old = &self.current;
        let mut restart = |what: String| report.needs_restart.push(what);
        if next.general.worker_threads != old.general.worker_threads {
            restart("general.worker_threads".into());
            next.general.worker_threads = old.general.worker_threads;
        }
        if next.general.upgrade_socket != old.general.upgrade_socket {
            restart("general.upgrade_socket".into());
            next.general.upgrade_socket = old.general.upgrade_socket.clone();
        }
        if next.admin.unix_socket != old.admin.unix_socket {
            restart("admin.unix_socket".into());
            next.admin.unix_socket = old.admin.unix_socket.clone();
        }
        if next.admin.listen != old.admin.listen {
            restart("admin.listen".into());
            next.admin.listen = old.admin.listen;
        }
    }

    /// Closes listeners no longer configured, opens new ones, moves those whose address
    /// changed, and gives the others their new route (clients connected before keep theirs).
    /// A socket that cannot be bound is reported, and what ran before stays, in `next` too.
    fn apply_listeners(&mut self, next: &mut Config, tls: &TlsByListener, report: &mut Report) {
        let wanted: HashMap<String, ListenerConfig> = next
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.clone()))
            .collect();
        for name in self.listeners.names() {
            if !wanted.contains_key(&name) {
                self.listeners.stop(&name);
                report.applied.push(format!("listener {name} closed"));
            }
        }
        let mut in_force = Vec::new();
        for l in &next.listeners {
            let running = self
                .listeners
                .get(&l.name)
                .map(|(c, r)| (c.clone(), r.clone()));
            match running {
                Some((was, route)) if was.socket_addr() == l.socket_addr() => {
                    // Always: certificate files are read again at each reload; a new one
                    // serves the next handshakes, open sessions keep theirs.
                    let now = route.load_full();
                    let tls = tls.get(&l.name).cloned();
                    route.store(Arc::new(now.succeeding(l.clone(), &next.limits, tls)));
                    self.listeners.set_config(l);
                    if &was != l {
                        report.applied.push(format!("listener {} changed", l.name));
                    }
                    in_force.push(l.clone());
                }
                running => match Listeners::bind(l) {
                    Ok(socket) => {
                        if running.is_some() {
                            self.listeners.stop(&l.name);
                        }
                        self.listeners.start(socket, l, &next.limits, tls);
                        let what = if running.is_some() {
                            "moved to"
                        } else {
                            "opened on"
                        };
                        report.applied.push(format!(
                            "listener {} {what} {}",
                            l.name,
                            l.socket_addr()
                        ));
                        in_force.push(l.clone());
                    }
                    Err(e) => {
                        report.failed.push(format!(
                            "listener {}: cannot listen on {}: {e}",
                            l.name,
                            l.socket_addr()
                        ));
                        if let Some((was, _)) = running {
                            in_force.push(was);
                        }
                    }
                },
            }
        }
        next.listeners = in_force;
    }
}

/// The per-user limits, if any is set (in `[limits]` or a `[[user]]`); `before`: those a
/// reload replaces, whose open counts carry over.
pub fn user_limits_of(config: &Config, before: Option<&UserLimits>) -> Option<Arc<UserLimits>> {
    let l = &config.limits;
    let any = l.user_connection_rate.is_some()
        || l.max_user_client_connections.is_some()
        || l.max_db_client_connections.is_some()
        || l.user_transaction_rate.is_some()
        || config
            .users
            .iter()
            .any(|u| u.user_connection_rate.is_some() || u.max_user_client_connections.is_some());
    any.then(|| Arc::new(UserLimits::new(l, &config.users, before)))
}

/// Grows or shrinks the `max_client_conn` permits. Shrinking takes free permits now and the
/// rest as clients leave: no open client is closed for it.
fn resize_client_slots(shared: &Arc<Shared>, from: u32, to: u32) {
    let slots = &shared.client_slots;
    if to > from {
        slots.add_permits((to - from) as usize);
        return;
    }
    let excess = (from - to) as usize;
    let forgotten = slots.forget_permits(excess);
    if forgotten < excess {
        let (slots, rest) = (slots.clone(), (excess - forgotten) as u32);
        tokio::spawn(async move {
            if let Ok(permits) = slots.acquire_many_owned(rest).await {
                permits.forget();
            }
        });
    }
}

/// A config error as one line, each problem with its key.
fn describe(e: &ConfigError) -> String {
    e.to_string().replace('\n', "; ")
}
