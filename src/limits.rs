//! Limits on what clients can make pgvane spend: refusals in flight, file descriptors, and
//! the log lines that refusals and broken clients write.
//!
//! A flood must cost a bounded amount whatever its size: over-limit clients are answered
//! by a bounded number of short refusals (the rest are closed at once), and what they log
//! is held to a budget, the lines over it counted and reported with the next one.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

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
