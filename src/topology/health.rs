//! The per-backend health state machine (HAProxy's rise/fall), free of I/O so it can be
//! tested exhaustively.
//!
//! * At start a backend is `Unknown`; the first check decides (there is no history to smooth).
//! * An up backend needs `fall` consecutive failed checks to be marked `Down`. Until then it
//!   keeps its role but is *suspect*, which the primary election uses as a tie-breaker.
//! * A down backend needs `rise` consecutive successful checks to come back.
//! * An up backend that answers with another role (a replica promoted, a primary demoted)
//!   switches at once: the server said so itself, it is not a flap.

use std::fmt;
use std::time::Duration;

/// What a backend currently is, as far as the health checks know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Not checked yet.
    Unknown,
    Down,
    Primary,
    Replica,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Unknown, Role::Down, Role::Primary, Role::Replica];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Down => "down",
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far a backend's WAL has come, as far as the check method can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// WAL position in bytes: written (primary) or replayed (replica).
    pub wal: Option<u64>,
    /// Replicas: how old the last replayed transaction is while WAL waits to be replayed
    /// (zero when everything received is replayed).
    pub replay_delay: Option<Duration>,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Writable. `timeline` is the WAL timeline it writes on, when the method can tell.
    Primary {
        timeline: Option<u32>,
    },
    Replica,
    Failed(String),
}

impl Observation {
    fn role(&self) -> Option<Role> {
        match self {
            Observation::Primary { .. } => Some(Role::Primary),
            Observation::Replica => Some(Role::Replica),
            Observation::Failed(_) => None,
        }
    }
}

/// A role change and the reason for it, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Role,
    pub to: Role,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct HealthState {
    role: Role,
    /// Consecutive successes while down.
    rise_count: u32,
    /// Consecutive failures while up.
    fall_count: u32,
    timeline: Option<u32>,
    last_error: Option<String>,
    /// Where the backend's WAL stood at the last check.
    progress: Progress,
    /// A replica too far behind the primary: up, but not routed to.
    lagging: bool,
    lag_count: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        Self {
            role: Role::Unknown,
            rise_count: 0,
            fall_count: 0,
            timeline: None,
            last_error: None,
            progress: Progress::default(),
            lagging: false,
            lag_count: 0,
        }
    }
}

impl HealthState {
    pub fn role(&self) -> Role {
        self.role
    }

    /// Up, but the latest check(s) failed.
    pub fn is_suspect(&self) -> bool {
        self.fall_count > 0
    }

    pub fn timeline(&self) -> Option<u32> {
        self.timeline
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn progress(&self) -> Progress {
        self.progress
    }

    pub fn set_progress(&mut self, progress: Progress) {
        self.progress = progress;
    }

    pub fn is_lagging(&self) -> bool {
        self.lagging
    }

    /// Feeds whether this replica is further behind than allowed. Like health itself it
    /// takes `fall` consecutive answers to leave and `rise` to come back; returns the new
    /// state when it changes.
    pub fn observe_lag(&mut self, behind: bool, rise: u32, fall: u32) -> Option<bool> {
        if behind == self.lagging {
            self.lag_count = 0;
            return None;
        }
        self.lag_count += 1;
        if self.lag_count < if behind { fall } else { rise } {
            return None;
        }
        self.lagging = behind;
        self.lag_count = 0;
        Some(behind)
    }

    /// Feeds one check result; returns the role change it caused, if any.
    pub fn observe(&mut self, obs: Observation, rise: u32, fall: u32) -> Option<Transition> {
        let from = self.role;
        let to = match &obs {
            Observation::Failed(e) => {
                self.last_error = Some(e.clone());
                self.rise_count = 0;
                match from {
                    Role::Primary | Role::Replica => {
                        self.fall_count += 1;
                        if self.fall_count >= fall {
                            Role::Down
                        } else {
                            from
                        }
                    }
                    Role::Unknown | Role::Down => Role::Down,
                }
            }
            ok => {
                let seen = ok.role().expect("a success has a role");
                self.fall_count = 0;
                if let Observation::Primary { timeline } = ok {
                    self.timeline = *timeline;
                }
                if from == Role::Down {
                    self.rise_count += 1;
                    if self.rise_count >= rise {
                        seen
                    } else {
                        Role::Down
                    }
                } else {
                    seen
                }
            }
        };
        if from == to {
            return None;
        }
        self.role = to;
        self.fall_count = 0;
        self.rise_count = 0;
        let reason = match (&obs, from) {
            (Observation::Failed(e), Role::Unknown) => format!("first check failed: {e}"),
            (Observation::Failed(e), _) => format!("{fall} consecutive checks failed, last: {e}"),
            (_, Role::Unknown) => format!("first check reports {to}"),
            (_, Role::Down) => format!("{rise} consecutive checks succeeded"),
            _ => format!("check reports {to}"),
        };
        if to != Role::Down {
            self.last_error = None;
        }
        Some(Transition { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Observation = Observation::Primary { timeline: None };
    const R: Observation = Observation::Replica;

    fn fail() -> Observation {
        Observation::Failed("connection refused".into())
    }

    /// Runs a sequence and returns the role after each observation.
    fn run(seq: Vec<Observation>, rise: u32, fall: u32) -> Vec<Role> {
        let mut h = HealthState::default();
        seq.into_iter()
            .map(|o| {
                h.observe(o, rise, fall);
                h.role()
            })
            .collect()
    }

    #[test]
    fn first_check_decides() {
        assert_eq!(run(vec![P], 2, 3), [Role::Primary]);
        assert_eq!(run(vec![R], 2, 3), [Role::Replica]);
        assert_eq!(run(vec![fail()], 2, 3), [Role::Down]);
    }

    #[test]
    fn fall_consecutive_failures_mark_down() {
        use Role::*;
        assert_eq!(
            run(vec![P, fail(), fail(), P, fail(), fail(), fail()], 2, 3),
            [Primary, Primary, Primary, Primary, Primary, Primary, Down]
        );
    }

    #[test]
    fn rise_consecutive_successes_mark_up() {
        use Role::*;
        assert_eq!(
            run(vec![fail(), R, fail(), R, R], 2, 3),
            [Down, Down, Down, Down, Replica]
        );
    }

    #[test]
    fn role_flip_is_immediate() {
        use Role::*;
        assert_eq!(run(vec![R, P, R], 2, 3), [Replica, Primary, Replica]);
    }

    #[test]
    fn suspect_while_failing_below_fall() {
        let mut h = HealthState::default();
        h.observe(P, 2, 3);
        assert!(!h.is_suspect());
        h.observe(fail(), 2, 3);
        assert!(h.is_suspect());
        assert_eq!(h.last_error(), Some("connection refused"));
        h.observe(P, 2, 3);
        assert!(!h.is_suspect());
    }

    #[test]
    fn transitions_carry_reasons() {
        let mut h = HealthState::default();
        let t = h
            .observe(Observation::Primary { timeline: Some(2) }, 2, 1)
            .unwrap();
        assert_eq!((t.from, t.to), (Role::Unknown, Role::Primary));
        assert_eq!(h.timeline(), Some(2));
        let t = h.observe(fail(), 2, 1).unwrap();
        assert_eq!(t.to, Role::Down);
        assert!(t.reason.contains("connection refused"), "{}", t.reason);
        assert!(h.observe(fail(), 2, 1).is_none());
    }

    #[test]
    fn lag_leaves_after_fall_and_returns_after_rise() {
        let mut h = HealthState::default();
        let seq = [true, false, true, true, true, false, true, false, false];
        let states: Vec<bool> = seq
            .iter()
            .map(|&b| {
                h.observe_lag(b, 2, 3);
                h.is_lagging()
            })
            .collect();
        assert_eq!(
            states,
            [false, false, false, false, true, true, true, true, false]
        );
    }

    #[test]
    fn fall_and_rise_of_one_react_to_every_check() {
        use Role::*;
        assert_eq!(
            run(vec![P, fail(), P, fail()], 1, 1),
            [Primary, Down, Primary, Down]
        );
    }
}
