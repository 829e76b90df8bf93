//! Statistics: PgBouncer's SHOW STATS counters, per database, counted without locks.
//!
//! A link counts into its server connection's [`LinkCounts`] (plain fields, one task), and
//! the request that ran it adds them to the database's [`DbStats`] once it ends: a handful
//! of relaxed atomic adds per transaction. Averages are over the last complete
//! [`STATS_PERIOD`], as PgBouncer's `stats_period`.
//!
//! Each pool also keeps [`Latency`]: log-linear (HDR-style) histograms of transaction time,
//! query time and pool wait, one relaxed atomic add per sample, for SHOW LATENCY.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The period averages are taken over (PgBouncer's default `stats_period`).
pub const STATS_PERIOD: Duration = Duration::from_secs(60);

/// Microseconds on the monotonic clock (never 0): a timestamp that fits an atomic. Read
/// from the clock itself, four times per transaction: through `Instant` each read took an
/// `elapsed` (a normalised subtraction of two timespecs) as well, about 3 % of pgvane's
/// instructions per transaction.
pub fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// What one link counted, kept with its server connection. Both halves of the link run
/// in one task: each field is written with a load and a store, not a locked add; atomics
/// only keep the link's future `Send`.
#[derive(Debug, Default)]
pub struct LinkCounts {
    /// Client to server.
    pub bytes_up: AtomicU64,
    /// Parse messages the client sent (before prepared-statement tracking rewrote them).
    pub client_parses: AtomicU64,
    /// Parse and Bind messages that reached the server.
    pub server_parses: AtomicU64,
    pub binds: AtomicU64,
    /// Server to client.
    pub bytes_down: AtomicU64,
    /// ReadyForQuery messages: requests answered.
    pub queries: AtomicU64,
    /// ReadyForQuery messages that ended a transaction (status idle).
    pub xacts: AtomicU64,
    pub query_us: AtomicU64,
    pub xact_us: AtomicU64,
    /// When ([`now_us`]) the server last went from nothing owed to busy, and from idle to
    /// a transaction: the starts of query time and transaction time.
    pub busy_from_us: AtomicU64,
    pub xact_from_us: AtomicU64,
    /// The pool's histograms, for the samples of each query and transaction.
    pub latency: Option<Arc<Latency>>,
}

impl LinkCounts {
    pub fn sample(&self, measure: Measure, us: u64) {
        if let Some(l) = &self.latency {
            l.record(measure, us);
        }
    }
}

/// Adds `n` to a counter only its own task writes.
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed) + n, Relaxed);
}

/// Totals of one database since start, or averages per second over a period.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Totals {
    pub server_assignment_count: u64,
    pub xact_count: u64,
    pub query_count: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    pub client_parse_count: u64,
    pub server_parse_count: u64,
    pub bind_count: u64,
    pub client_login_count: u64,
}

impl Totals {
    /// The values in SHOW STATS_TOTALS' column order.
    pub fn values(&self) -> [u64; 12] {
        [
            self.server_assignment_count,
            self.xact_count,
            self.query_count,
            self.bytes_received,
            self.bytes_sent,
            self.xact_time,
            self.query_time,
            self.wait_time,
            self.client_parse_count,
            self.server_parse_count,
            self.bind_count,
            self.client_login_count,
        ]
    }

    fn from_values(v: [u64; 12]) -> Self {
        Self {
            server_assignment_count: v[0],
            xact_count: v[1],
            query_count: v[2],
            bytes_received: v[3],
            bytes_sent: v[4],
            xact_time: v[5],
            query_time: v[6],
            wait_time: v[7],
            client_parse_count: v[8],
            server_parse_count: v[9],
            bind_count: v[10],
            client_login_count: v[11],
        }
    }

    pub fn add(&mut self, other: &Totals) {
        let (a, b) = (self.values(), other.values());
        *self = Self::from_values(std::array::from_fn(|i| a[i] + b[i]));
    }

    /// PgBouncer's averages between `earlier` and `self`, `seconds` apart: counts and
    /// bytes per second; times per transaction (xact_time), per query (query_time) and per
    /// server assignment (wait_time), in microseconds.
    pub fn averages(&self, earlier: &Totals, seconds: u64) -> Totals {
        let (now, then) = (self.values(), earlier.values());
        let d: [u64; 12] = std::array::from_fn(|i| now[i].saturating_sub(then[i]));
        let mut avg = Self::from_values(d.map(|x| x / seconds.max(1)));
        let per = |total: u64, count: u64| total.checked_div(count).unwrap_or(0);
        avg.xact_time = per(d[5], d[1]);
        avg.query_time = per(d[6], d[2]);
        avg.wait_time = per(d[7], d[0]);
        avg
    }
}

/// Histograms' resolution: 2^5 buckets per power of two, so a percentile is within about
/// 3 % of the true value; values (microseconds) up to 2^32 (71 minutes), longer ones counted
/// there. 896 buckets of 4 bytes: 3.5 KiB per histogram.
const GROUPING_POWER: u8 = 5;
const MAX_VALUE_POWER: u8 = 32;

/// The percentiles SHOW LATENCY and /metrics report.
pub const PERCENTILES: [f64; 3] = [0.50, 0.95, 0.99];

/// What a pool's latency histograms measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// From a transaction's first request to the ReadyForQuery that reports idle.
    Transaction,
    /// From a request (or a pipeline of them) sent to the server to its last ReadyForQuery.
    Query,
    /// From a request's start to the server connection it was given.
    Wait,
}

impl Measure {
    pub const ALL: [Measure; 3] = [Measure::Transaction, Measure::Query, Measure::Wait];

    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Transaction => "xact",
            Measure::Query => "query",
            Measure::Wait => "wait",
        }
    }
}

/// One pool's latency histograms, cumulative (counts wrap), and the snapshots that turn them
/// into windows: percentiles are over the current and the last complete [`STATS_PERIOD`],
/// one to two minutes.
pub struct Latency {
    histograms: [histogram::AtomicHistogram32; 3],
    /// Taken at the start of the last complete period and of the current one.
    marks: Mutex<[Option<[histogram::Histogram32; 3]>; 2]>,
}

impl Default for Latency {
    fn default() -> Self {
        let new = || {
            histogram::AtomicHistogram32::new(GROUPING_POWER, MAX_VALUE_POWER)
                .expect("valid histogram parameters")
        };
        Self {
            histograms: [new(), new(), new()],
            marks: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Latency")
    }
}

impl Latency {
    /// Counts one sample of `us` microseconds: one relaxed atomic add, no lock.
    pub fn record(&self, measure: Measure, us: u64) {
        let max = (1u64 << MAX_VALUE_POWER) - 1;
        // In range by the clamp.
        let _ = self.histograms[measure as usize].increment(us.min(max));
    }

    /// Closes a period: called every [`STATS_PERIOD`].
    pub fn roll(&self) {
        let now = self.histograms.each_ref().map(|h| h.load());
        let mut marks = self.marks.lock().expect("latency lock");
        marks[0] = marks[1].take();
        marks[1] = Some(now);
    }

    /// The samples of the window (see [`Latency`]), per measure.
    pub fn window(&self) -> [histogram::Histogram32; 3] {
        let now = self.histograms.each_ref().map(|h| h.load());
        let marks = self.marks.lock().expect("latency lock");
        match &marks[0] {
            // Same configuration on both sides: subtraction cannot fail.
            Some(start) => std::array::from_fn(|i| {
                now[i]
                    .wrapping_sub(&start[i])
                    .expect("histograms of one configuration")
            }),
            None => now,
        }
    }
}

/// Adds `from` into `into` (pools of one database and user on several backends).
pub fn merge(into: &mut histogram::Histogram32, from: &histogram::Histogram32) {
    *into = into
        .wrapping_add(from)
        .expect("histograms of one configuration");
}

/// The count and the [`PERCENTILES`] of `h` in microseconds (each the upper end of its
/// bucket); `None`s when it is empty.
pub fn percentiles(h: &histogram::Histogram32) -> (u64, [Option<u64>; 3]) {
    let count = h.as_slice().iter().map(|&c| u64::from(c)).sum();
    let mut out = [None, None, None];
    if h.quantile_buckets_into(&PERCENTILES, &mut out).is_err() {
        return (count, [None; 3]);
    }
    (count, out.map(|b| b.map(|b| b.end())))
}

/// One database's counters.
#[derive(Debug, Default)]
pub struct DbStats {
    counters: [AtomicU64; 12],
}

impl DbStats {
    /// A server connection was lent after `wait_us` of waiting for it.
    pub fn assigned(&self, wait_us: u64) {
        self.counters[0].fetch_add(1, Relaxed);
        self.counters[7].fetch_add(wait_us, Relaxed);
    }

    pub fn logged_in(&self) {
        self.counters[11].fetch_add(1, Relaxed);
    }

    /// Adds what a link counted, and zeroes its counts for the next.
    pub fn record(&self, c: &LinkCounts) {
        let adds = [
            (1, &c.xacts),
            (2, &c.queries),
            (3, &c.bytes_up),
            (4, &c.bytes_down),
            (5, &c.xact_us),
            (6, &c.query_us),
            (8, &c.client_parses),
            (9, &c.server_parses),
            (10, &c.binds),
        ];
        for (i, counted) in adds {
            let n = counted.swap(0, Relaxed);
            if n > 0 {
                self.counters[i].fetch_add(n, Relaxed);
            }
        }
    }

    pub fn totals(&self) -> Totals {
        Totals::from_values(std::array::from_fn(|i| self.counters[i].load(Relaxed)))
    }
}

/// Every database's counters, and the snapshots averages are taken from.
#[derive(Default)]
pub struct Stats {
    databases: Mutex<HashMap<String, Arc<DbStats>>>,
    /// Totals at the start and at the end of the last complete period.
    periods: Mutex<(HashMap<String, Totals>, HashMap<String, Totals>)>,
}

impl Stats {
    /// The counters of `database`, made on first use. Pools hold them; [`Stats::prune`]
    /// drops those no pool holds any more, so hostile database names cannot grow the map.
    pub fn of(&self, database: &str) -> Arc<DbStats> {
        let mut dbs = self.databases.lock().expect("stats lock");
        if let Some(s) = dbs.get(database) {
            return s.clone();
        }
        let s = Arc::new(DbStats::default());
        dbs.insert(database.to_owned(), s.clone());
        s
    }

    /// Each database's totals since start, by name.
    pub fn totals(&self) -> Vec<(String, Totals)> {
        let dbs = self.databases.lock().expect("stats lock");
        let mut all: Vec<_> = dbs.iter().map(|(k, v)| (k.clone(), v.totals())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Each database's averages over the last complete period (zero before the first).
    pub fn averages(&self) -> Vec<(String, Totals)> {
        let periods = self.periods.lock().expect("stats lock");
        let (start, end) = &*periods;
        let mut all: Vec<_> = end
            .iter()
            .map(|(db, t)| {
                let earlier = start.get(db).copied().unwrap_or_default();
                (db.clone(), t.averages(&earlier, STATS_PERIOD.as_secs()))
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Totals over every database, and their averages over the last complete period (times
    /// per event over all databases, not an average of averages).
    pub fn overall(&self) -> (Totals, Totals) {
        let mut totals = Totals::default();
        for (_, t) in self.totals() {
            totals.add(&t);
        }
        let periods = self.periods.lock().expect("stats lock");
        let (mut start, mut end) = (Totals::default(), Totals::default());
        for t in periods.0.values() {
            start.add(t);
        }
        for t in periods.1.values() {
            end.add(t);
        }
        (totals, end.averages(&start, STATS_PERIOD.as_secs()))
    }

    /// Closes a period: called every [`STATS_PERIOD`]. Databases no pool holds are dropped.
    pub fn roll(&self) {
        self.databases
            .lock()
            .expect("stats lock")
            .retain(|_, s| Arc::strong_count(s) > 1);
        let now: HashMap<_, _> = self.totals().into_iter().collect();
        let mut periods = self.periods.lock().expect("stats lock");
        periods.0 = std::mem::replace(&mut periods.1, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_per_second_and_times_per_event() {
        let earlier = Totals::default();
        let now = Totals {
            server_assignment_count: 60,
            xact_count: 120,
            query_count: 240,
            bytes_received: 6000,
            xact_time: 1200,
            query_time: 480,
            wait_time: 600,
            ..Totals::default()
        };
        let avg = now.averages(&earlier, 60);
        assert_eq!(avg.xact_count, 2);
        assert_eq!(avg.query_count, 4);
        assert_eq!(avg.bytes_received, 100);
        assert_eq!(avg.xact_time, 10);
        assert_eq!(avg.query_time, 2);
        assert_eq!(avg.wait_time, 10);
    }

    #[test]
    fn unheld_databases_leave_at_the_period_s_end() {
        let stats = Stats::default();
        let held = stats.of("kept");
        drop(stats.of("gone"));
        held.assigned(5);
        stats.roll();
        let names: Vec<String> = stats.totals().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["kept"]);
        assert_eq!(stats.averages()[0].1.server_assignment_count, 0);
    }
}
