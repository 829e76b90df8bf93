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

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use health::{Observation, Role};
pub use table::{Backend, BackendView, Election, RoutingTable, Serving, SessionGuard};

use crate::config::{Config, HealthConfig};
use check::Probe;
use health::HealthState;

pub struct Topology {
    backends: Vec<Arc<Backend>>,
    table: ArcSwap<RoutingTable>,
    /// Carries the generation of each published table, for tasks that wait for a change.
    published: watch::Sender<u64>,
    /// One per backend: wakes its check task for an immediate check.
    recheck: Vec<Notify>,
}

impl Topology {
    /// A topology with nothing routable yet; [`Topology::spawn_checks`] brings it to life.
    pub fn new(config: &Config) -> Arc<Self> {
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| Arc::new(Backend::new(b.name.clone(), b.host.clone(), b.port)))
            .collect();
        let table = RoutingTable::initial(&backends);
        Arc::new(Self {
            recheck: backends.iter().map(|_| Notify::new()).collect(),
            backends,
            table: ArcSwap::from_pointee(table),
            published: watch::channel(0).0,
        })
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
            let (obs, wal) = tokio::select! {
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
            if tx.send((index, obs, wal)).await.is_err() {
                return;
            }
        }
    }

    async fn publish_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Checked>, health: HealthConfig) {
        let (rise, fall) = (health.rise, health.fall);
        let mut states = vec![HealthState::default(); self.backends.len()];
        let snapshot = |s: &HealthState| (s.role(), s.is_suspect(), s.timeline(), s.is_lagging());
        // Ends when every check task has stopped (shutdown).
        while let Some((i, obs, wal)) = rx.recv().await {
            let name = &self.backends[i].name;
            if let Observation::Failed(e) = &obs {
                debug!(backend = %name, error = %e, "health check failed");
            }
            let before = snapshot(&states[i]);
            let state = &mut states[i];
            state.set_wal(wal);
            if let Some(t) = state.observe(obs, rise, fall) {
                if t.to == Role::Down {
                    warn!(backend = %name, from = %t.from, to = %t.to, reason = %t.reason, "backend role changed");
                } else {
                    info!(backend = %name, from = %t.from, to = %t.to, reason = %t.reason, "backend role changed");
                }
            }
            if state.role() == Role::Replica && health.max_replica_lag > 0 {
                self.judge_lag(&mut states, i, &health);
            }
            if before == snapshot(&states[i]) {
                continue;
            }
            let prev = self.table.load_full();
            let next =
                RoutingTable::build(prev.generation + 1, &self.backends, &states, Some(&prev));
            log_election(&prev, &next);
            let generation = next.generation;
            self.table.store(Arc::new(next));
            self.published.send_replace(generation);
        }
    }
}

impl Topology {
    /// Compares replica `i`'s replayed WAL position with the primary's written one and
    /// takes the replica out of (or back into) the replica target, with rise/fall.
    fn judge_lag(&self, states: &mut [HealthState], i: usize, health: &HealthConfig) {
        let table = self.table.load();
        let primary_wal = match table.election {
            Election::Elected(p) => states[p].wal(),
            _ => None,
        };
        // Without both positions there is nothing to judge: keep the last verdict.
        let (Some(primary_wal), Some(replica_wal)) = (primary_wal, states[i].wal()) else {
            return;
        };
        let lag = primary_wal.saturating_sub(replica_wal);
        let behind = lag > health.max_replica_lag;
        if let Some(lagging) = states[i].observe_lag(behind, health.rise, health.fall) {
            let name = &self.backends[i].name;
            let max = health.max_replica_lag;
            if lagging {
                warn!(backend = %name, lag_bytes = lag, max_replica_lag = max, "replica too far behind; out of the replica target");
            } else {
                info!(backend = %name, lag_bytes = lag, max_replica_lag = max, "replica caught up; back in the replica target");
            }
        }
    }
}

/// A check result: backend index, what it said, its WAL position.
type Checked = (usize, Observation, Option<u64>);

fn log_election(prev: &RoutingTable, next: &RoutingTable) {
    if prev.election == next.election {
        return;
    }
    let name = |i: &usize| next.backends[*i].backend.name.as_str();
    match &next.election {
        Election::Elected(i) => {
            let was = prev
                .primary()
                .map(|b| b.backend.name.as_str())
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
