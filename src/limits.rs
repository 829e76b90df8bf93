//! Limits on what clients can make pgvane spend: per-address and per-user connection limits
//! (`[limits]`), refusals in flight, file descriptors, and the log lines that refusals and
//! broken clients write.
//!
//! A flood must cost a bounded amount whatever its size: over-limit clients are answered
//! by a bounded number of short refusals (the rest are closed at once), and what they log
//! is held to a budget, the lines over it counted and reported with the next one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::RateLimit;

/// Over-limit clients being refused at once (each waits up to [`REFUSAL_LIMIT`] for its
/// startup packet, to be answered as PostgreSQL would); more are closed without an answer.
pub const REFUSALS_IN_FLIGHT: usize = 64;

/// How long a refused client has to send its startup packet before it is closed without
/// an answer (at most `client_login_timeout`).
pub const REFUSAL_LIMIT: Duration = Duration::from_secs(5);

/// Lines a second that refused and broken clients may log, all together.
pub const REFUSAL_LOG_LINES: u32 = 10;

/// Descriptors beyond clients and refusals: server connections, health checks, the admin
/// API, the log.
pub const FILES_HEADROOM: u64 = 512;

/// Client slots beyond `max_client_conn` kept for `admin_users` on the admin console, so
/// that an operator can still look when every client slot is taken. A client in one must
/// log in within [`REFUSAL_LIMIT`], and only to the console, or it is refused (53300).
pub const CONSOLE_RESERVED_SLOTS: usize = 4;

/// A rate at which a kind of log line may be written; lines over it are counted.
pub struct LogBudget {
    limiter: DefaultDirectRateLimiter,
    not_logged: AtomicU64,
}

impl LogBudget {
    pub fn per_second(lines: u32) -> Self {
        let lines = NonZeroU32::new(lines).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::direct(Quota::per_second(lines)),
            not_logged: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be written now, `n` being the lines not written since the
    /// last one that was; `None` (and the line counted) if over the budget.
    pub fn take(&self) -> Option<u64> {
        match self.limiter.check() {
            Ok(()) => Some(self.not_logged.swap(0, Ordering::Relaxed)),
            Err(_) => {
                self.not_logged.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Raises the soft limit on open files to the hard one, as HAProxy does: clients, server
/// connections and the admin API all need descriptors, and the usual soft limit of 1,024
/// is reached long before `max_client_conn` is. Returns the limit now in force.
pub fn raise_open_files() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_budget_counts_the_lines_it_holds_back() {
        let budget = LogBudget::per_second(2);
        assert_eq!(budget.take(), Some(0));
        assert_eq!(budget.take(), Some(0));
        for _ in 0..5 {
            assert_eq!(budget.take(), None);
        }
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(budget.take(), Some(5));
    }
}

/// A limit a client ran into: the `limit` label of `pgvane_refusals_total`, and what the
/// client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("connections from this address are not allowed (limits.allow / limits.deny)")]
    Denied,
    #[error(
        "too many new connections from this address (limits.ip_connection_rate); retry in a second"
    )]
    AddressRate,
    #[error("too many connections from this address (limits.ip_max_connections = {0})")]
    AddressConnections(u32),
    #[error("too many failed logins from this address (limits.ip_auth_failures); locked out for a while (limits.ip_auth_lockout)")]
    LockedOut,
    #[error(
        "too many new connections for this user (limits.user_connection_rate); retry in a second"
    )]
    UserRate,
    #[error("too many client connections for this user (max_user_client_connections = {0})")]
    UserConnections(u32),
    #[error("too many client connections for this database (max_db_client_connections = {0})")]
    DatabaseConnections(u32),
    #[error("transaction rate of this user exceeded (limits.user_transaction_rate); the transaction was not run")]
    TransactionRate,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Denied => "deny",
            Refusal::AddressRate => "ip_connection_rate",
            Refusal::AddressConnections(_) => "ip_max_connections",
            Refusal::LockedOut => "ip_auth_lockout",
            Refusal::UserRate => "user_connection_rate",
            Refusal::UserConnections(_) => "max_user_client_connections",
            Refusal::DatabaseConnections(_) => "max_db_client_connections",
            Refusal::TransactionRate => "user_transaction_rate",
        }
    }

    /// 53300 (too_many_connections) for caps, as PostgreSQL answers its own; 28000 for an
    /// address refused outright, as pg_hba.conf refuses; 08004 (the server rejected the
    /// connection) for rates and lockouts, which clients treat as worth retrying later.
    pub fn sqlstate(self) -> &'static str {
        match self {
            Refusal::Denied => "28000",
            Refusal::AddressConnections(_)
            | Refusal::UserConnections(_)
            | Refusal::DatabaseConnections(_) => "53300",
            Refusal::AddressRate | Refusal::LockedOut | Refusal::UserRate => "08004",
            // configuration_limit_exceeded: an ERROR, the session goes on.
            Refusal::TransactionRate => "53400",
        }
    }
}

/// Count-min sketch depth for per-address counts (pingora-limits' own choice).
const SKETCH_HASHES: usize = 4;

/// Default width of the per-address sketches (`limits.max_tracked_addresses`).
pub const DEFAULT_TRACKED_ADDRESSES: u32 = 8192;

/// Connections of one address over a sliding second (the previous second's count weighted
/// by how much of it is still within the last second, plus the current one's), against a
/// limit of rate plus burst. Counts come from count-min sketches of fixed size however many
/// addresses appear; they can only over-estimate.
struct AddressRate {
    counts: pingora_limits::rate::Rate,
    limit: f64,
}

/// Failed logins per address within a window, and lockouts: an address with `max`
/// failures in the last window is locked out for between `lockout` and twice that (the
/// lockout is itself counted in windows of `lockout`).
struct AuthLockout {
    failures: pingora_limits::rate::Rate,
    lockouts: pingora_limits::rate::Rate,
    max: f64,
}

/// Within the last window: the previous window's count, weighted by how much of it is
/// still inside, plus the current one's.
fn sliding(r: pingora_limits::rate::RateComponents) -> f64 {
    r.prev_samples as f64 * (1.0 - r.current_interval_fraction) + r.curr_samples as f64
}

/// The per-address limits of one listener.
#[derive(Default)]
pub struct AddressLimits {
    allow: Vec<ipnet::IpNet>,
    deny: Vec<ipnet::IpNet>,
    rate: Option<AddressRate>,
    open: Option<(pingora_limits::inflight::Inflight, u32)>,
    auth: Option<AuthLockout>,
}

/// Counts a connection among its address's open ones until dropped.
pub type AddressGuard = Option<pingora_limits::inflight::Guard>;

impl AddressLimits {
    pub fn new(c: &crate::config::LimitsConfig) -> Self {
        let slots = c.max_tracked_addresses.unwrap_or(DEFAULT_TRACKED_ADDRESSES) as usize;
        let sketch = |interval| {
            pingora_limits::rate::Rate::new_with_estimator_config(interval, SKETCH_HASHES, slots)
        };
        let rate = c.ip_connection_rate.map(|r| {
            let burst = c.ip_connection_burst.map_or(r.per_second, f64::from);
            AddressRate {
                counts: sketch(Duration::from_secs(1)),
                limit: r.per_second.max(burst),
            }
        });
        let auth = c.ip_auth_failures.map(|max| AuthLockout {
            failures: sketch(c.ip_auth_failure_window.unwrap_or(DEFAULT_AUTH_WINDOW)),
            lockouts: sketch(c.ip_auth_lockout.unwrap_or(DEFAULT_AUTH_LOCKOUT)),
            max: f64::from(max),
        });
        Self {
            allow: c.allow.clone().unwrap_or_default(),
            deny: c.deny.clone().unwrap_or_default(),
            rate,
            open: c
                .ip_max_connections
                .map(|max| (pingora_limits::inflight::Inflight::new(), max)),
            auth,
        }
    }

    /// Whether any limit is set: without one, admitting costs nothing.
    pub fn any(&self) -> bool {
        !self.allow.is_empty()
            || !self.deny.is_empty()
            || self.rate.is_some()
            || self.open.is_some()
            || self.auth.is_some()
    }

    /// Admits a new connection from `ip`, or says which limit refuses it.
    pub fn admit(&self, ip: IpAddr) -> Result<AddressGuard, Refusal> {
        guarded(Ok(None), || self.check(canonical(ip)))
    }

    fn check(&self, ip: IpAddr) -> Result<AddressGuard, Refusal> {
        if self.deny.iter().any(|n| n.contains(&ip))
            || (!self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)))
        {
            return Err(Refusal::Denied);
        }
        if let Some(auth) = &self.auth {
            if auth.lockouts.rate_with(&ip, sliding) > 0.0 {
                return Err(Refusal::LockedOut);
            }
        }
        if let Some(r) = &self.rate {
            if r.counts.rate_with(&ip, sliding) + 1.0 > r.limit {
                return Err(Refusal::AddressRate);
            }
            r.counts.observe(&ip, 1);
        }
        match &self.open {
            None => Ok(None),
            Some((open, max)) => {
                let (guard, n) = open.incr(ip, 1);
                if n > *max as isize {
                    return Err(Refusal::AddressConnections(*max));
                }
                Ok(Some(guard))
            }
        }
    }

    /// A login from `ip` failed: counted toward its lockout.
    pub fn auth_failed(&self, ip: IpAddr) {
        let Some(auth) = &self.auth else { return };
        let ip = canonical(ip);
        guarded((), || {
            auth.failures.observe(&ip, 1);
            if auth.failures.rate_with(&ip, sliding) >= auth.max {
                auth.lockouts.observe(&ip, 1);
            }
        })
    }
}

/// Runs a count of pingora-limits' `Rate`, which asserts on clock skew between threads
/// (a panic on a badly stalled machine): if it ever fires, `otherwise` stands, rather than
/// a panic ending the accept loop or a login.
fn guarded<T>(otherwise: T, count: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(count)).unwrap_or(otherwise)
}

const DEFAULT_AUTH_WINDOW: Duration = Duration::from_secs(60);
const DEFAULT_AUTH_LOCKOUT: Duration = Duration::from_secs(300);

/// An IPv4 client on a dual-stack socket, as IPv4: one address, one count.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Limits per user and per database, over all listeners: caps on open client connections
/// (exact counts, kept only for keys with connections open) and login rates (governor's
/// keyed token buckets, idle keys expired by [`UserLimits::forget_idle`]).
pub struct UserLimits {
    max_user: Option<u32>,
    max_db: Option<u32>,
    own_max_user: HashMap<String, u32>,
    rate: Option<DefaultKeyedRateLimiter<String>>,
    own_rate: HashMap<String, DefaultDirectRateLimiter>,
    /// Shared with the limits a reload replaces, so that clients counted before it are
    /// still counted (and given back) after it.
    open: Arc<OpenCounts>,
    /// Keyed by the pool's shared name: a turn clones no string.
    transactions: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    /// How long a transaction over the rate may wait for its turn.
    shape: Duration,
}

/// Client connections open per user and per database, for the keys that have a cap.
#[derive(Default)]
struct OpenCounts {
    by_user: Mutex<HashMap<String, u32>>,
    by_db: Mutex<HashMap<String, u32>>,
}

fn quota(rate: RateLimit, burst: Option<u32>) -> Quota {
    let period = Duration::from_secs_f64(1.0 / rate.per_second);
    let burst = burst.unwrap_or(rate.per_second.ceil() as u32).max(1);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

impl UserLimits {
    /// `before`: the limits these replace on a reload, whose open counts carry over (rates
    /// start with full buckets).
    pub fn new(
        c: &crate::config::LimitsConfig,
        users: &[crate::config::UserConfig],
        before: Option<&UserLimits>,
    ) -> Self {
        let own_rate = users
            .iter()
            .filter_map(|u| {
                let rate = u.user_connection_rate.or(c.user_connection_rate)?;
                let burst = u.user_connection_burst.or(c.user_connection_burst);
                (u.user_connection_rate.is_some() || u.user_connection_burst.is_some())
                    .then(|| (u.name.clone(), RateLimiter::direct(quota(rate, burst))))
            })
            .collect();
        Self {
            max_user: c.max_user_client_connections,
            max_db: c.max_db_client_connections,
            own_max_user: users
                .iter()
                .filter_map(|u| Some((u.name.clone(), u.max_user_client_connections?)))
                .collect(),
            rate: c
                .user_connection_rate
                .map(|r| RateLimiter::keyed(quota(r, c.user_connection_burst))),
            own_rate,
            open: before.map(|b| b.open.clone()).unwrap_or_default(),
            transactions: c
                .user_transaction_rate
                .map(|r| RateLimiter::keyed(quota(r, c.user_transaction_burst))),
            shape: c.user_transaction_shape.unwrap_or_default(),
        }
    }

    /// Whether transactions are rate-limited at all: without, pacing costs nothing.
    pub fn paces_transactions(&self) -> bool {
        self.transactions.is_some()
    }

    /// Takes a turn for `user`'s next transaction if one is free now: `None`, or how long
    /// until the next one. Checked per transaction, so no allocation and no future.
    pub fn transaction_turn(&self, user: &Arc<str>) -> Option<Duration> {
        let limiter = self.transactions.as_ref()?;
        let not_until = limiter.check_key(user).err()?;
        Some(not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Waits for `user`'s next transaction to be within its rate, up to
    /// `user_transaction_shape`; refuses it if that is not long enough.
    pub async fn pace_transaction(&self, user: &Arc<str>) -> Result<(), Refusal> {
        let deadline = tokio::time::Instant::now() + self.shape;
        while let Some(wait) = self.transaction_turn(user) {
            if tokio::time::Instant::now() + wait > deadline {
                return Err(Refusal::TransactionRate);
            }
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// Admits a logged-in client of `user` on `database`, or says which limit refuses it.
    /// The guard counts it until dropped.
    pub fn admit(self: &Arc<Self>, user: &str, database: &str) -> Result<UserGuard, Refusal> {
        let limited = match self.own_rate.get(user) {
            Some(own) => own.check().is_err(),
            None => self
                .rate
                .as_ref()
                .is_some_and(|r| r.check_key(&user.to_owned()).is_err()),
        };
        if limited {
            return Err(Refusal::UserRate);
        }
        let max_user = self.own_max_user.get(user).copied().or(self.max_user);
        let user_slot =
            take(&self.open.by_user, user, max_user).map_err(Refusal::UserConnections)?;
        let db_slot = match take(&self.open.by_db, database, self.max_db) {
            Ok(taken) => taken,
            Err(max) => {
                if user_slot {
                    give_back(&self.open.by_user, user);
                }
                return Err(Refusal::DatabaseConnections(max));
            }
        };
        Ok(UserGuard {
            limits: self.clone(),
            user: user_slot.then(|| user.to_owned()),
            database: db_slot.then(|| database.to_owned()),
        })
    }

    /// Drops the rate state of users idle long enough that their buckets are full again.
    pub fn forget_idle(&self) {
        fn forget<K: Clone + Eq + std::hash::Hash>(r: &Option<DefaultKeyedRateLimiter<K>>) {
            if let Some(r) = r {
                r.retain_recent();
                r.shrink_to_fit();
            }
        }
        forget(&self.rate);
        forget(&self.transactions);
    }
}

/// Counts one more connection of `key` under `max` (none: not counted). `Ok(true)`:
/// counted; `Err(max)`: at the cap.
fn take(open: &Mutex<HashMap<String, u32>>, key: &str, max: Option<u32>) -> Result<bool, u32> {
    let Some(max) = max else { return Ok(false) };
    let mut open = open.lock().expect("limits lock");
    let n = open.entry(key.to_owned()).or_insert(0);
    if *n >= max {
        if *n == 0 {
            open.remove(key);
        }
        return Err(max);
    }
    *n += 1;
    Ok(true)
}

fn give_back(open: &Mutex<HashMap<String, u32>>, key: &str) {
    let mut open = open.lock().expect("limits lock");
    if let Some(n) = open.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            open.remove(key);
        }
    }
}

/// A client counted toward its user's and database's caps, until dropped.
pub struct UserGuard {
    limits: Arc<UserLimits>,
    user: Option<String>,
    database: Option<String>,
}

impl Drop for UserGuard {
    fn drop(&mut self) {
        if let Some(u) = &self.user {
            give_back(&self.limits.open.by_user, u);
        }
        if let Some(d) = &self.database {
            give_back(&self.limits.open.by_db, d);
        }
    }
}
