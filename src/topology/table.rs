//! The routing table: an immutable snapshot of which backend serves which role.
//!
//! A new table is built whenever a health state changes and swapped in whole; the data path
//! only ever reads a complete, consistent table. Each backend's entry carries a `lost` token
//! that is cancelled the moment the backend stops serving the role it had in that table, so
//! sessions routed by it can be shut down without polling.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::health::{HealthState, Role};
use crate::config::Target;

/// A configured backend. Lives as long as the process; counters are shared by all tables.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub host: String,
    pub port: u16,
    active: AtomicUsize,
    /// Set by [`super::Topology::set_draining`]; the routing table is rebuilt from it.
    draining: AtomicBool,
    /// Wakes this backend's check task for an immediate check (passive health).
    pub(super) recheck: Notify,
}

impl Backend {
    pub fn new(name: String, host: String, port: u16) -> Self {
        Self {
            name,
            host,
            port,
            active: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            recheck: Notify::new(),
        }
    }

    /// Drained: pooled connections to it close as they are released.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Returns whether this changed anything.
    pub(super) fn set_draining(&self, on: bool) -> bool {
        self.draining.swap(on, Ordering::Relaxed) != on
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Client sessions currently routed to this backend.
    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a session for least-connections balancing until the guard is dropped.
    pub fn track_session(&self) -> SessionGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        SessionGuard(self)
    }
}

pub struct SessionGuard<'a>(&'a Backend);

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a backend may be used for in this table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Serving {
    Primary,
    Replica,
    /// Down, unknown, a primary that lost the election (fenced), or a lagging replica.
    Nothing,
}

impl Serving {
    pub const ALL: [Serving; 3] = [Serving::Primary, Serving::Replica, Serving::Nothing];

    pub fn as_str(self) -> &'static str {
        match self {
            Serving::Primary => "primary",
            Serving::Replica => "replica",
            Serving::Nothing => "nothing",
        }
    }
}

#[derive(Debug)]
pub struct BackendView {
    pub backend: Arc<Backend>,
    pub role: Role,
    pub serving: Serving,
    pub suspect: bool,
    pub timeline: Option<u32>,
    /// Drained: serves the sessions it has, takes no new work.
    pub draining: bool,
    /// Cancelled when this backend's `serving` changes in a later table.
    pub lost: CancellationToken,
}

/// Outcome of choosing one primary among the backends that claim to be primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    None,
    Elected(usize),
    /// Several claim primary and none is clearly newer: route writes nowhere.
    Ambiguous(Vec<usize>),
}

/// Picks the primary. With several claimants the one on the highest timeline wins; on equal
/// timelines a claimant whose last check succeeded beats one whose last check failed. A tie
/// after that is ambiguous: holding writes is better than risking two writable primaries.
pub fn elect(states: &[HealthState]) -> Election {
    let claimants: Vec<usize> = (0..states.len())
        .filter(|&i| states[i].role() == Role::Primary)
        .collect();
    let rank = |i: usize| (states[i].timeline().unwrap_or(0), !states[i].is_suspect());
    match claimants.as_slice() {
        [] => Election::None,
        [only] => Election::Elected(*only),
        _ => {
            let best = claimants.iter().map(|&i| rank(i)).max().expect("non-empty");
            let top: Vec<usize> = claimants
                .iter()
                .copied()
                .filter(|&i| rank(i) == best)
                .collect();
            match top.as_slice() {
                [winner] => Election::Elected(*winner),
                _ => Election::Ambiguous(claimants),
            }
        }
    }
}

#[derive(Debug)]
pub struct RoutingTable {
    /// Increases by one with every published table.
    pub generation: u64,
    pub backends: Vec<BackendView>,
    pub election: Election,
    primary: Option<usize>,
    /// The primary unless it is drained; `replicas` and `any` leave drained backends out.
    routable_primary: Option<usize>,
    replicas: Vec<usize>,
    any: Vec<usize>,
}

impl RoutingTable {
    /// The table before any check has run: nothing is routable.
    pub fn initial(backends: &[Arc<Backend>]) -> Self {
        let states = vec![HealthState::default(); backends.len()];
        Self::build(0, backends, &states, None)
    }

    /// Builds the next table from the health states. Tokens of backends whose `serving` did not
    /// change are carried over; the others are cancelled, which ends the sessions that depend
    /// on them, as are those of backends no longer listed (a reload removed or moved them).
    /// A backend is the same one across tables if it is the same `Arc`.
    pub fn build(
        generation: u64,
        backends: &[Arc<Backend>],
        states: &[HealthState],
        prev: Option<&RoutingTable>,
    ) -> Self {
        let election = elect(states);
        let primary = match election {
            Election::Elected(i) => Some(i),
            _ => None,
        };
        let views: Vec<BackendView> = backends
            .iter()
            .zip(states)
            .enumerate()
            .map(|(i, (backend, state))| {
                let serving = match state.role() {
                    Role::Primary if primary == Some(i) => Serving::Primary,
                    Role::Replica if !state.is_lagging() => Serving::Replica,
                    _ => Serving::Nothing,
                };
                let before =
                    prev.and_then(|p| p.backends.iter().find(|v| Arc::ptr_eq(&v.backend, backend)));
                let lost = match before {
                    Some(old) if old.serving == serving => old.lost.clone(),
                    Some(old) => {
                        old.lost.cancel();
                        CancellationToken::new()
                    }
                    None => CancellationToken::new(),
                };
                BackendView {
                    backend: backend.clone(),
                    role: state.role(),
                    serving,
                    suspect: state.is_suspect(),
                    timeline: state.timeline(),
                    draining: backend.is_draining(),
                    lost,
                }
            })
            .collect();
        if let Some(prev) = prev {
            let listed = |v: &&BackendView| backends.iter().any(|b| Arc::ptr_eq(b, &v.backend));
            for gone in prev.backends.iter().filter(|v| !listed(v)) {
                gone.lost.cancel();
            }
        }
        // New work goes to backends that are not drained; a drained one keeps its role
        // (and its sessions their tokens).
        let takes_work = |i: &usize| !views[*i].draining;
        let routable_primary = primary.filter(takes_work);
        let replicas: Vec<usize> = (0..views.len())
            .filter(|&i| views[i].serving == Serving::Replica)
            .filter(takes_work)
            .collect();
        let any = routable_primary
            .into_iter()
            .chain(replicas.iter().copied())
            .collect();
        Self {
            generation,
            backends: views,
            election,
            primary,
            routable_primary,
            replicas,
            any,
        }
    }

    pub fn primary(&self) -> Option<&BackendView> {
        self.primary.map(|i| &self.backends[i])
    }

    /// Indexes of the backends a listener may use right now, best choice set first.
    pub fn candidates(&self, target: Target, fallback_to_primary: bool) -> &[usize] {
        match target {
            Target::Primary => self.routable_primary.as_slice(),
            Target::Replica if self.replicas.is_empty() && fallback_to_primary => {
                self.routable_primary.as_slice()
            }
            Target::Replica => &self.replicas,
            Target::Any => &self.any,
        }
    }

    /// Whether a session on backend `i` still belongs to a listener with this target.
    /// A fallback session on the primary stays there when replicas come back.
    pub fn qualifies(&self, i: usize, target: Target, fallback_to_primary: bool) -> bool {
        match (target, self.backends[i].serving) {
            (_, Serving::Nothing) => false,
            (Target::Any, _) => true,
            (Target::Primary, s) => s == Serving::Primary,
            (Target::Replica, Serving::Replica) => true,
            (Target::Replica, Serving::Primary) => fallback_to_primary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::health::Observation;
    use super::*;

    fn backends(n: usize) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| Arc::new(Backend::new(format!("pg{i}"), "127.0.0.1".into(), 5432)))
            .collect()
    }

    fn state(obs: &[Observation]) -> HealthState {
        let mut h = HealthState::default();
        for o in obs {
            h.observe(o.clone(), 2, 3);
        }
        h
    }

    fn primary(tl: Option<u32>) -> Observation {
        Observation::Primary { timeline: tl }
    }

    fn failed() -> Observation {
        Observation::Failed("timeout".into())
    }

    #[test]
    fn routes_each_target() {
        let b = backends(3);
        let s = [
            state(&[primary(Some(1))]),
            state(&[Observation::Replica]),
            state(&[failed()]),
        ];
        let t = RoutingTable::build(1, &b, &s, None);
        assert_eq!(t.candidates(Target::Primary, false), &[0]);
        assert_eq!(t.candidates(Target::Replica, false), &[1]);
        assert_eq!(t.candidates(Target::Any, false), &[0, 1]);
        assert_eq!(t.backends[2].serving, Serving::Nothing);
    }

    #[test]
    fn replica_fallback_only_when_asked_and_no_replica() {
        let b = backends(2);
        let s = [state(&[primary(None)]), state(&[failed()])];
        let t = RoutingTable::build(1, &b, &s, None);
        assert!(t.candidates(Target::Replica, false).is_empty());
        assert_eq!(t.candidates(Target::Replica, true), &[0]);
        assert!(t.qualifies(0, Target::Replica, true));
        assert!(!t.qualifies(0, Target::Replica, false));
    }

    #[test]
    fn higher_timeline_wins_and_loser_is_fenced() {
        let b = backends(2);
        let s = [state(&[primary(Some(1))]), state(&[primary(Some(2))])];
        let t = RoutingTable::build(1, &b, &s, None);
        assert_eq!(t.election, Election::Elected(1));
        assert_eq!(t.backends[0].serving, Serving::Nothing);
        assert_eq!(t.candidates(Target::Any, false), &[1]);
    }

    #[test]
    fn healthy_claimant_beats_suspect_one_on_same_timeline() {
        let s = [state(&[primary(None), failed()]), state(&[primary(None)])];
        assert_eq!(elect(&s), Election::Elected(1));
    }

    #[test]
    fn indistinguishable_primaries_route_writes_nowhere() {
        let b = backends(2);
        let s = [state(&[primary(Some(3))]), state(&[primary(Some(3))])];
        let t = RoutingTable::build(1, &b, &s, None);
        assert_eq!(t.election, Election::Ambiguous(vec![0, 1]));
        assert!(t.candidates(Target::Primary, false).is_empty());
        assert!(t.candidates(Target::Any, false).is_empty());
    }

    #[test]
    fn lost_token_fires_only_when_serving_changes() {
        let b = backends(2);
        let t1 = RoutingTable::build(
            1,
            &b,
            &[state(&[primary(Some(1))]), state(&[Observation::Replica])],
            None,
        );
        // Replica 1 is promoted on a new timeline: 0 is fenced at once, 1 changes role.
        let s2 = [state(&[primary(Some(1))]), state(&[primary(Some(2))])];
        let t2 = RoutingTable::build(2, &b, &s2, Some(&t1));
        assert!(t1.backends[0].lost.is_cancelled());
        assert!(t1.backends[1].lost.is_cancelled());
        // Nothing changes: tokens are carried over, not cancelled.
        let t3 = RoutingTable::build(3, &b, &s2, Some(&t2));
        assert!(!t2.backends[1].lost.is_cancelled());
        assert!(!t3.backends[1].lost.is_cancelled());
        assert_eq!(t3.primary().unwrap().backend.name, "pg1");
    }

    #[test]
    fn session_guard_counts_active_sessions() {
        let b = backends(1);
        let g1 = b[0].track_session();
        let g2 = b[0].track_session();
        assert_eq!(b[0].active_sessions(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(b[0].active_sessions(), 0);
    }
}
