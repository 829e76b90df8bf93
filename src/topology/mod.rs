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

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use health::{Observation, Progress, Role};
pub use table::{Backend, BackendView, Election, RoutingTable, Serving, SessionGuard};

use crate::config::{Config, HealthConfig, LagLimit};
use crate::metrics::Metrics;
use check::Probe;
use health::HealthState;

pub struct Topology {
    backends: Vec<Arc<Backend>>,
    table: ArcSwap<RoutingTable>,
    /// Carries the generation of each published table, for tasks that wait for a change.
    published: watch::Sender<u64>,
    /// One per backend: wakes its check task for an immediate check.
    recheck: Vec<Notify>,
    /// Wakes the publisher to rebuild the table from unchanged health (a drain changed).
    rebuild: Notify,
    metrics: Arc<Metrics>,
    /// What the admin API shows beyond the routing table; written by the publisher only.
    details: Mutex<Details>,
}

/// Per-check details that do not change routing, and the last completed failover.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Details {
    /// Per backend, in config order.
    pub backends: Vec<BackendDetails>,
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
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| {
                let backend = Backend::new(b.name.clone(), b.host.clone(), b.port);
                backend.set_draining(b.drain);
                Arc::new(backend)
            })
            .collect();
        let table = RoutingTable::initial(&backends);
        Arc::new(Self {
            recheck: backends.iter().map(|_| Notify::new()).collect(),
            rebuild: Notify::new(),
            backends,
            table: ArcSwap::from_pointee(table),
            published: watch::channel(0).0,
            metrics,
            details: Mutex::new(Details {
                backends: vec![BackendDetails::default(); config.backends.len()],
                last_failover: None,
            }),
        })
    }

    /// Drains backend `name` (`on`) or takes it back into service: a new routing table
    /// leaves it out of (or puts it back into) every listener's candidates; its sessions
    /// keep running. Returns whether anything changed.
    pub fn set_draining(&self, name: &str, on: bool) -> Result<bool, UnknownBackend> {
        let backend = self
            .backends
            .iter()
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

    /// Passive health: the data path failed to reach backend `i`, so check it now rather
    /// than at its next interval.
    pub fn report_failure(&self, i: usize) {
        if let Some(n) = self.recheck.get(i) {
            self.metrics
                .backend_unreachable
                .with_label_values(&[&self.backends[i].name])
                .inc();
            n.notify_one();
        }
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
    pub fn spawn_checks(self: &Arc<Self>, config: &Config, shutdown: CancellationToken) {
        let (tx, rx) = mpsc::channel(self.backends.len().max(1) * 4);
        let mut tasks = JoinSet::new();
        for (i, b) in config.backends.iter().enumerate() {
            let probe = Probe::new(b, &config.health);
            tasks.spawn(self.clone().check_loop(
                i,
                probe,
                config.health.clone(),
                tx.clone(),
                shutdown.clone(),
            ));
        }
        tasks.detach_all();
        tokio::spawn(self.clone().publish_loop(rx, config.health.clone()));
    }

    /// Checks backend `index` every `interval`; after a failed check or while no primary is
    /// elected, every `fast_interval` (HAProxy's fastinter); and at once when the data path
    /// reports a failure.
    async fn check_loop(
        self: Arc<Self>,
        index: usize,
        mut probe: Probe,
        health: HealthConfig,
        tx: mpsc::Sender<Checked>,
        shutdown: CancellationToken,
    ) {
        let mut next = Instant::now();
        loop {
            let (obs, progress) = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => probe.check(health.timeout).await,
                _ = self.recheck[index].notified() => probe.check(health.timeout).await,
            };
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
            if tx.send((index, obs, progress)).await.is_err() {
                return;
            }
        }
    }

    async fn publish_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Checked>, health: HealthConfig) {
        let (rise, fall) = (health.rise, health.fall);
        let mut states = vec![HealthState::default(); self.backends.len()];
        let snapshot = |s: &HealthState| (s.role(), s.is_suspect(), s.timeline(), s.is_lagging());
        let mut outage = Outage::default();
        // Ends when every check task has stopped (shutdown).
        loop {
            let (i, obs, progress) = tokio::select! {
                checked = rx.recv() => match checked {
                    Some(c) => c,
                    None => return,
                },
                _ = self.rebuild.notified() => {
                    self.publish(&states, &mut outage);
                    continue;
                }
            };
            let name = &self.backends[i].name;
            if let Observation::Failed(e) = &obs {
                debug!(backend = %name, error = %e, "health check failed");
            }
            let before = snapshot(&states[i]);
            let state = &mut states[i];
            state.set_progress(progress);
            if let Some(t) = state.observe(obs, rise, fall) {
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
                self.judge_lag(&mut states, i, &health)
            } else {
                Lag::default()
            };
            self.record_details(i, &states[i], lag);
            if before == snapshot(&states[i]) {
                continue;
            }
            self.publish(&states, &mut outage);
        }
    }

    /// Builds the next routing table from `states` and swaps it in.
    fn publish(&self, states: &[HealthState], outage: &mut Outage) {
        let prev = self.table.load_full();
        let next = RoutingTable::build(prev.generation + 1, &self.backends, states, Some(&prev));
        log_election(&prev, &next, outage.previous.as_deref());
        self.record_table(&prev, &next, outage);
        let generation = next.generation;
        self.table.store(Arc::new(next));
        self.published.send_replace(generation);
    }

    fn record_details(&self, i: usize, state: &HealthState, lag: Lag) {
        let mut details = self.details.lock().expect("details lock");
        let d = &mut details.backends[i];
        d.last_error = state.last_error().map(str::to_owned);
        d.lag_bytes = lag.bytes;
        d.replay_delay_ms = lag.delay.map(|d| d.as_millis() as u64);
        let name = self.backends[i].name.as_str();
        let m = &self.metrics;
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
    fn judge_lag(&self, states: &mut [HealthState], i: usize, health: &HealthConfig) -> Lag {
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
            let name = &self.backends[i].name;
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

/// A check result: backend index, what it said, its WAL progress.
type Checked = (usize, Observation, Progress);

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
