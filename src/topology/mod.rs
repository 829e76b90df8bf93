//! Topology: health checks and the routing table they produce.
//!
//! One task per backend runs its [`check::Probe`] every `health.interval` and sends the
//! result to a single publisher task. The publisher owns every [`health::HealthState`],
//! applies rise/fall, elects the primary, and when anything routable changed builds a new
//! [`RoutingTable`] and swaps it in through `arc-swap`. The data path only calls
//! [`Topology::snapshot`]: it never waits on a check.

mod check;
mod health;
mod table;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use health::{Observation, Progress, Role};
pub use table::{Backend, BackendView, Election, RoutingTable, Serving, SessionGuard};

use crate::config::{BackendConfig, Config, HealthConfig, LagLimit};
use crate::metrics::Metrics;
use crate::tls::ServerTls;
use check::Probe;
use health::HealthState;

pub struct Topology {
    table: ArcSwap<RoutingTable>,
    /// Carries the generation of each published table, for tasks that wait for a change.
    published: watch::Sender<u64>,
    /// The backends as configured, with their check tasks: the list the publisher follows.
    checks: Mutex<Checks>,
    /// Wakes the publisher to rebuild the table (a drain changed, or the backend list).
    rebuild: Notify,
    metrics: Arc<Metrics>,
    /// What the admin API shows beyond the routing table; written by the publisher only.
    details: Mutex<Details>,
}

/// The configured backends in config order, each with what started its check task.
#[derive(Default)]
struct Checks {
    backends: Vec<Checked>,
    /// Set by [`Topology::spawn_checks`]: what a backend added later is checked with.
    started: Option<CheckContext>,
}

struct Checked {
    config: BackendConfig,
    backend: Arc<Backend>,
    /// Stops its check task.
    stop: CancellationToken,
}

#[derive(Clone)]
struct CheckContext {
    health: HealthConfig,
    /// TLS toward PostgreSQL, for SQL checks.
    tls: Option<Arc<ServerTls>>,
    results: mpsc::Sender<CheckResult>,
    shutdown: CancellationToken,
}

/// Per-check details that do not change routing, and the last completed failover.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Details {
    /// By backend name.
    pub backends: HashMap<String, BackendDetails>,
    pub last_failover: Option<Failover>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BackendDetails {
    /// Why the last failed check failed; None after a successful one.
    pub last_error: Option<String>,
    /// Replicas: WAL bytes not yet replayed, as of the last check (needs WAL positions).
    pub lag_bytes: Option<u64>,
    /// Replicas: replay delay at the last check (0 when all WAL received is replayed).
    pub replay_delay_ms: Option<u64>,
    /// When the last check ended (RFC 3339, UTC) and how long it took.
    pub last_check: Option<String>,
    pub check_ms: Option<f64>,
}

/// A replica's lag at one check, as far as it could be measured.
#[derive(Debug, Clone, Copy, Default)]
struct Lag {
    bytes: Option<u64>,
    delay: Option<Duration>,
}

/// A backend name no `[[backend]]` entry has.
#[derive(Debug, thiserror::Error)]
#[error("no backend is named \"{0}\"")]
pub struct UnknownBackend(pub String);

/// One change of primary, as the admin API reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failover {
    pub previous: Option<String>,
    pub primary: String,
    /// When the new primary was elected (RFC 3339, UTC).
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    /// How long no primary was elected (0 when one table replaced the old primary with the
    /// new one).
    pub no_primary_ms: u64,
    /// Clients waiting for a primary (or any backend) at the moment of the election.
    pub clients_held: i64,
}

mod rfc3339 {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }
}

impl Topology {
    /// A topology with nothing routable yet; [`Topology::spawn_checks`] brings it to life.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Arc<Self> {
        let checked: Vec<Checked> = config.backends.iter().map(Checked::new).collect();
        for c in checked.iter().filter(|c| c.config.drain) {
            metrics
                .backend_draining
                .with_label_values(&[&c.config.name])
                .set(1);
        }
        let backends: Vec<Arc<Backend>> = checked.iter().map(|c| c.backend.clone()).collect();
        let table = RoutingTable::initial(&backends);
        Arc::new(Self {
            rebuild: Notify::new(),
            checks: Mutex::new(Checks {
                backends: checked,
                started: None,
            }),
            table: ArcSwap::from_pointee(table),
            published: watch::channel(0).0,
            metrics,
            details: Mutex::default(),
        })
    }

    /// Takes a reloaded backend list: backends whose address and check settings are as
    /// before stay as they are (health, sessions, pools); new ones start being checked and
    /// join the table as their checks rise; removed and moved ones stop being checked and
    /// leave the table at once, which ends the sessions routed to them. Returns what
    /// changed, one line each.
    pub fn reconfigure(self: &Arc<Self>, configs: &[BackendConfig]) -> Vec<String> {
        let mut checks = self.checks.lock().expect("checks lock");
        let placement = |b: &BackendConfig| BackendConfig {
            drain: false,
            ..b.clone()
        };
        let mut old: Vec<Checked> = std::mem::take(&mut checks.backends);
        let mut changes = Vec::new();
        for config in configs {
            let kept = old
                .iter()
                .position(|c| placement(&c.config) == placement(config))
                .map(|i| old.swap_remove(i));
            let entry = match kept {
                Some(mut c) => {
                    c.config.drain = config.drain;
                    c
                }
                None => {
                    let c = Checked::new(config);
                    if config.drain {
                        self.metrics
                            .backend_draining
                            .with_label_values(&[&config.name])
                            .set(1);
                    }
                    if let Some(context) = &checks.started {
                        self.start_check(&c, context);
                    }
                    changes.push(format!(
                        "backend {} added at {}",
                        config.name,
                        c.backend.addr()
                    ));
                    c
                }
            };
            checks.backends.push(entry);
        }
        for gone in old {
            gone.stop.cancel();
            let moved = configs.iter().any(|c| c.name == gone.config.name);
            if !moved {
                changes.push(format!("backend {} removed", gone.config.name));
                let m = &self.metrics;
                let _ = m.backend_draining.remove_label_values(&[&gone.config.name]);
                let _ = m
                    .replica_lag_bytes
                    .remove_label_values(&[&gone.config.name]);
                let _ = m
                    .replica_replay_delay
                    .remove_label_values(&[&gone.config.name]);
            }
            self.details
                .lock()
                .expect("details lock")
                .backends
                .remove(&gone.config.name);
        }
        drop(checks);
        if !changes.is_empty() {
            self.rebuild.notify_one();
        }
        changes
    }

    /// Takes reloaded `[health]` settings and TLS toward PostgreSQL: when either changed
    /// (`tls_changed`), every check task restarts with them (health states, and so the
    /// routing table, stay as they are). Returns whether anything changed.
    pub fn reconfigure_health(
        self: &Arc<Self>,
        health: &HealthConfig,
        tls: Option<Arc<ServerTls>>,
        tls_changed: bool,
    ) -> bool {
        let mut checks = self.checks.lock().expect("checks lock");
        let Some(context) = checks.started.as_mut() else {
            return false;
        };
        if context.health == *health && !tls_changed {
            return false;
        }
        context.health = health.clone();
        context.tls = tls;
        let context = context.clone();
        for c in &mut checks.backends {
            c.stop.cancel();
            c.stop = CancellationToken::new();
            self.start_check(c, &context);
        }
        drop(checks);
        // The publisher takes the new rise, fall and lag limit.
        self.rebuild.notify_one();
        true
    }

    /// The `[health]` settings in force, once checks run.
    fn health(&self) -> Option<HealthConfig> {
        let checks = self.checks.lock().expect("checks lock");
        checks.started.as_ref().map(|c| c.health.clone())
    }

    /// The configured backends, in config order.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        let checks = self.checks.lock().expect("checks lock");
        checks.backends.iter().map(|c| c.backend.clone()).collect()
    }

    /// Drains backend `name` (`on`) or takes it back into service: a new routing table
    /// leaves it out of (or puts it back into) every listener's candidates; its sessions
    /// keep running. Returns whether anything changed.
    pub fn set_draining(&self, name: &str, on: bool) -> Result<bool, UnknownBackend> {
        let backend = self
            .backends()
            .into_iter()
            .find(|b| b.name == name)
            .ok_or_else(|| UnknownBackend(name.to_owned()))?;
        let changed = backend.set_draining(on);
        if changed {
            self.metrics
                .backend_draining
                .with_label_values(&[name])
                .set(i64::from(on));
            self.rebuild.notify_one();
        }
        Ok(changed)
    }

    /// Per-check details and the last failover, for the admin API.
    pub fn details(&self) -> Details {
        self.details.lock().expect("details lock").clone()
    }

    /// The current routing table. Cheap: one atomic load and a reference count.
    pub fn snapshot(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Passive health: the data path failed to reach `backend`, so check it now rather
    /// than at its next interval.
    pub fn report_failure(&self, backend: &Backend) {
        self.metrics
            .backend_unreachable
            .with_label_values(&[&backend.name])
            .inc();
        backend.recheck.notify_one();
    }

    /// Waits until every backend has been checked once, or `limit` has passed.
    pub async fn wait_first_checks(&self, limit: Duration) {
        let mut changes = self.subscribe();
        let all_checked = |t: &RoutingTable| t.backends.iter().all(|b| b.role != Role::Unknown);
        let _ = tokio::time::timeout(limit, async {
            while !all_checked(&self.snapshot()) {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Starts one check task per backend and the publisher; all stop on `shutdown`.
    pub fn spawn_checks(
        self: &Arc<Self>,
        config: &Config,
        tls: Option<Arc<ServerTls>>,
        shutdown: CancellationToken,
    ) {
        let (tx, rx) = mpsc::channel(config.backends.len().max(1) * 4);
        let context = CheckContext {
            health: config.health.clone(),
            tls,
            results: tx,
            shutdown,
        };
        let mut checks = self.checks.lock().expect("checks lock");
        for c in &checks.backends {
            self.start_check(c, &context);
        }
        checks.started = Some(context);
        drop(checks);
        tokio::spawn(self.clone().publish_loop(rx, config.health.clone()));
    }

    /// Starts backend `c`'s check task; it stops at shutdown or when `c.stop` is cancelled.
    fn start_check(self: &Arc<Self>, c: &Checked, context: &CheckContext) {
        let probe = Probe::new(&c.config, &context.health, context.tls.as_deref());
        let (health, results) = (context.health.clone(), context.results.clone());
        let (stop, shutdown) = (c.stop.clone(), context.shutdown.clone());
        let checks = self
            .clone()
            .check_loop(c.backend.clone(), probe, health, results);
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = shutdown.cancelled() => {}
                _ = checks => {}
            }
        });
    }

    /// Checks backend `index` every `interval`; after a failed check or while no primary is
    /// elected, every `fast_interval` (HAProxy's fastinter); and at once when the data path
    /// reports a failure.
    async fn check_loop(
        self: Arc<Self>,
        backend: Arc<Backend>,
        mut probe: Probe,
        health: HealthConfig,
        tx: mpsc::Sender<CheckResult>,
    ) {
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = backend.recheck.notified() => {}
            };
            let started = Instant::now();
            let (obs, progress) = probe.check(health.timeout).await;
            let took = started.elapsed();
            // Faster while this backend fails, and while there is no primary: then a
            // promoted replica is found within fast_interval.
            let hurry =
                matches!(obs, Observation::Failed(_)) || self.snapshot().primary().is_none();
            let pause = if hurry {
                health.fast_interval
            } else {
                health.interval
            };
            next = Instant::now() + pause;
            if tx
                .send((backend.clone(), obs, progress, took))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    async fn publish_loop(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<CheckResult>,
        mut health: HealthConfig,
    ) {
        // The backends the tables are built from, with their health states, aligned.
        let mut list = self.backends();
        let mut states = vec![HealthState::default(); list.len()];
        let snapshot = |s: &HealthState| (s.role(), s.is_suspect(), s.timeline(), s.is_lagging());
        let mut outage = Outage::default();
        loop {
            let (backend, obs, progress, took) = tokio::select! {
                checked = rx.recv() => match checked {
                    Some(c) => c,
                    None => return,
                },
                _ = self.rebuild.notified() => {
                    health = self.health().unwrap_or(health);
                    self.follow_config(&mut list, &mut states);
                    self.publish(&list, &states, &mut outage);
                    continue;
                }
            };
            let position =
                |list: &[Arc<Backend>]| list.iter().position(|b| Arc::ptr_eq(b, &backend));
            let i = match position(&list) {
                Some(i) => i,
                // Added by a reload this loop has not seen yet, or removed by one.
                None => {
                    if self.follow_config(&mut list, &mut states) {
                        self.publish(&list, &states, &mut outage);
                    }
                    match position(&list) {
                        Some(i) => i,
                        None => continue,
                    }
                }
            };
            let name = &list[i].name;
            if let Observation::Failed(e) = &obs {
                debug!(backend = %name, error = %e, "health check failed");
            }
            let before = snapshot(&states[i]);
            let state = &mut states[i];
            state.set_progress(progress);
            if let Some(t) = state.observe(obs, health.rise, health.fall) {
                if t.to == Role::Down {
                    warn!(backend = %name, from = %t.from, to = %t.to, reason = %t.reason, "backend role changed");
                } else {
                    info!(backend = %name, from = %t.from, to = %t.to, reason = %t.reason, "backend role changed");
                }
                self.metrics
                    .role_changes
                    .with_label_values(&[name, t.from.as_str(), t.to.as_str()])
                    .inc();
            }
            let lag = if state.role() == Role::Replica {
                self.judge_lag(&list, &mut states, i, &health)
            } else {
                Lag::default()
            };
            self.record_details(&list[i].name, &states[i], lag, took);
            if before == snapshot(&states[i]) {
                continue;
            }
            self.publish(&list, &states, &mut outage);
        }
    }

    /// Brings the publisher's `list` (and `states`, aligned with it) to the configured
    /// backends: kept ones keep their state, new ones start unknown. Returns whether the
    /// list changed.
    fn follow_config(&self, list: &mut Vec<Arc<Backend>>, states: &mut Vec<HealthState>) -> bool {
        let configured = self.backends();
        let same = configured.len() == list.len()
            && configured
                .iter()
                .zip(list.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return false;
        }
        let next_states = configured
            .iter()
            .map(|b| {
                let was = list.iter().position(|o| Arc::ptr_eq(o, b));
                was.map(|i| states[i].clone()).unwrap_or_default()
            })
            .collect();
        *list = configured;
        *states = next_states;
        true
    }

    /// Builds the next routing table from `list` and `states` and swaps it in.
    fn publish(&self, list: &[Arc<Backend>], states: &[HealthState], outage: &mut Outage) {
        let prev = self.table.load_full();
        let next = RoutingTable::build(prev.generation + 1, list, states, Some(&prev));
        log_election(&prev, &next, outage.previous.as_deref());
        self.record_table(&prev, &next, outage);
        let generation = next.generation;
        self.table.store(Arc::new(next));
        self.published.send_replace(generation);
    }

    fn record_details(&self, name: &str, state: &HealthState, lag: Lag, took: Duration) {
        let mut details = self.details.lock().expect("details lock");
        let d = details.backends.entry(name.to_owned()).or_default();
        d.last_error = state.last_error().map(str::to_owned);
        d.lag_bytes = lag.bytes;
        d.replay_delay_ms = lag.delay.map(|d| d.as_millis() as u64);
        let now = std::time::SystemTime::now();
        d.last_check = Some(humantime::format_rfc3339_millis(now).to_string());
        d.check_ms = Some(took.as_secs_f64() * 1000.0);
        let m = &self.metrics;
        m.check_seconds
            .with_label_values(&[name])
            .set(took.as_secs_f64());
        match lag.bytes {
            Some(b) => m.replica_lag_bytes.with_label_values(&[name]).set(b as i64),
            None => {
                let _ = m.replica_lag_bytes.remove_label_values(&[name]);
            }
        }
        match lag.delay {
            Some(d) => m
                .replica_replay_delay
                .with_label_values(&[name])
                .set(d.as_secs_f64()),
            None => {
                let _ = m.replica_replay_delay.remove_label_values(&[name]);
            }
        }
    }

    /// Updates the role gauges and, when the primary changed, the failover record.
    fn record_table(&self, prev: &RoutingTable, next: &RoutingTable, outage: &mut Outage) {
        let m = &self.metrics;
        if prev.backends.len() != next.backends.len()
            || prev
                .backends
                .iter()
                .zip(&next.backends)
                .any(|(a, b)| a.backend.name != b.backend.name)
        {
            // A reload changed the list: no series of a removed backend stays behind.
            m.backend_role.reset();
            m.backend_serving.reset();
        }
        for b in &next.backends {
            let name = b.backend.name.as_str();
            for r in Role::ALL {
                let on = (r == b.role) as i64;
                m.backend_role
                    .with_label_values(&[name, r.as_str()])
                    .set(on);
            }
            for s in Serving::ALL {
                let on = (s == b.serving) as i64;
                m.backend_serving
                    .with_label_values(&[name, s.as_str()])
                    .set(on);
            }
        }
        let claimants = next
            .backends
            .iter()
            .filter(|b| b.role == Role::Primary)
            .count();
        if claimants > 1 && prev.election != next.election {
            m.split_brain.inc();
        }
        let (was, now) = (prev.primary(), next.primary());
        m.no_primary.set(now.is_none() as i64);
        let name = |b: Option<&BackendView>| b.map(|b| b.backend.name.clone());
        match (was, now) {
            (Some(_), None) => {
                outage.since = Some(Instant::now());
                outage.previous = name(was);
            }
            (_, Some(p)) if name(was) != name(now) => {
                let lasted = outage.since.take().map(|t| t.elapsed()).unwrap_or_default();
                let previous = name(was).or(outage.previous.take());
                // The first election since start-up is not a failover.
                if previous.is_none() {
                    return;
                }
                m.primary_changes.inc();
                m.failover_seconds.observe(lasted.as_secs_f64());
                let record = Failover {
                    previous,
                    primary: p.backend.name.clone(),
                    at: SystemTime::now(),
                    no_primary_ms: lasted.as_millis() as u64,
                    clients_held: m.held_clients.get(),
                };
                info!(
                    primary = record.primary.as_str(),
                    previous = record.previous.as_deref().unwrap_or("none"),
                    no_primary_ms = record.no_primary_ms,
                    clients_held = record.clients_held,
                    "failover complete"
                );
                self.details.lock().expect("details lock").last_failover = Some(record);
            }
            _ => {}
        }
    }
}

/// Since when no primary has been elected, and which one was last.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    previous: Option<String>,
}

impl Topology {
    /// Measures replica `i`'s lag and, with `max_replica_lag` set, takes the replica out of
    /// (or back into) the replica target, with rise/fall. Without a measure for the limit's
    /// kind the last verdict stands.
    fn judge_lag(
        &self,
        list: &[Arc<Backend>],
        states: &mut [HealthState],
        i: usize,
        health: &HealthConfig,
    ) -> Lag {
        let table = self.table.load();
        let primary_wal = match table.election {
            Election::Elected(p) => states[p].progress().wal,
            _ => None,
        };
        let progress = states[i].progress();
        let lag = Lag {
            bytes: primary_wal
                .zip(progress.wal)
                .map(|(p, r)| p.saturating_sub(r)),
            delay: progress.replay_delay,
        };
        let behind = match health.max_replica_lag {
            LagLimit::Off => return lag,
            LagLimit::Bytes(max) => lag.bytes.map(|b| b > max),
            LagLimit::Time(max) => lag.delay.map(|d| d > max),
        };
        let Some(behind) = behind else { return lag };
        if let Some(lagging) = states[i].observe_lag(behind, health.rise, health.fall) {
            let name = &list[i].name;
            let (bytes, delay, max) = (lag.bytes, lag.delay, health.max_replica_lag);
            if lagging {
                warn!(backend = %name, lag_bytes = ?bytes, replay_delay = ?delay, max_replica_lag = ?max, "replica too far behind; out of the replica target");
            } else {
                info!(backend = %name, lag_bytes = ?bytes, replay_delay = ?delay, max_replica_lag = ?max, "replica caught up; back in the replica target");
            }
        }
        lag
    }
}

/// A check result: the backend, what it said, its WAL progress.
/// A check's outcome, with how long it took.
type CheckResult = (Arc<Backend>, Observation, Progress, Duration);

impl Checked {
    fn new(config: &BackendConfig) -> Self {
        let backend = Backend::new(config.name.clone(), config.host.clone(), config.port);
        backend.set_draining(config.drain);
        Self {
            config: config.clone(),
            backend: Arc::new(backend),
            stop: CancellationToken::new(),
        }
    }
}

/// `last_primary`: the primary before an outage, for an election that ends one.
fn log_election(prev: &RoutingTable, next: &RoutingTable, last_primary: Option<&str>) {
    if prev.election == next.election {
        return;
    }
    let name = |i: &usize| next.backends[*i].backend.name.as_str();
    match &next.election {
        Election::Elected(i) => {
            let was = prev
                .primary()
                .map(|b| b.backend.name.as_str())
                .or(last_primary)
                .unwrap_or("none");
            info!(
                primary = name(i),
                previous = was,
                generation = next.generation,
                "primary elected"
            );
            for (j, b) in next.backends.iter().enumerate() {
                if j != *i && b.role == Role::Primary {
                    warn!(backend = %b.backend.name, primary = name(i), "backend claims primary on an older timeline or is failing checks; fenced");
                }
            }
        }
        Election::None => {
            warn!(generation = next.generation, "no primary available");
        }
        Election::Ambiguous(claimants) => {
            let names: Vec<&str> = claimants.iter().map(name).collect();
            error!(claimants = ?names, "several backends claim primary and none is clearly newer; writes are held until this resolves");
        }
    }
}
