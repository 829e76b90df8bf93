//! Metrics: every counter and gauge pgvane exports, in one Prometheus registry.
//!
//! The parts that change state (topology, data path) update these directly; the admin API
//! renders them. Pool gauges are read from the pools at scrape time instead, so the data
//! path pays nothing for them.

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::pool::Pools;
use crate::stats::{percentiles, Measure, Totals, PERCENTILES};
use crate::tls::TlsByListener;

pub struct Metrics {
    registry: Registry,
    /// Backend role transitions, by backend and old and new role.
    pub role_changes: IntCounterVec,
    /// 1 for each backend's current role.
    pub backend_role: IntGaugeVec,
    /// 1 for what each backend serves in the current routing table.
    pub backend_serving: IntGaugeVec,
    pub replica_lag_bytes: IntGaugeVec,
    pub replica_replay_delay: GaugeVec,
    /// How long each backend's last health check took.
    pub check_seconds: GaugeVec,
    /// Changes of the elected primary after the first election.
    pub primary_changes: IntCounter,
    /// 1 while there is no elected primary.
    pub no_primary: IntGauge,
    /// From losing the primary to electing the next one.
    pub failover_seconds: Histogram,
    /// Tables in which more than one backend claimed primary (fenced or held).
    pub split_brain: IntCounter,
    /// Clients waiting right now for their listener's target to have a backend.
    pub held_clients: IntGauge,
    pub held_total: IntCounter,
    pub hold_timeouts: IntCounter,
    /// Held work dropped because its client hung up or cancelled.
    pub held_abandoned: IntCounter,
    pub hold_seconds: Histogram,
    /// Clients refused by a limit, by limit and whether they were answered.
    pub refusals: IntCounterVec,
    /// ErrorResponses pgvane itself sent to clients, by SQLSTATE.
    pub client_errors: IntCounterVec,
    /// Passive health: the data path failed to reach a backend, by backend.
    pub backend_unreachable: IntCounterVec,
    /// 1 while a backend is drained.
    pub backend_draining: IntGaugeVec,
    /// Configuration reloads, by result (ok, failed).
    pub reloads: IntCounterVec,
    /// Clients whose TLS negotiation failed, by listener.
    pub tls_failures: IntCounterVec,
    /// Open client connections, by listener.
    pub clients: IntGaugeVec,
    pub paused: IntGauge,
    /// Transaction-mode sessions pinned to their server connection by session state.
    pub pinned_sessions: IntGauge,
    pub session_state_pins: IntCounterVec,
    pub session_state_refused: IntCounterVec,
    pool_connections: IntGaugeVec,
    /// Read from the pools and the statistics at scrape time.
    pool_clients: IntGaugeVec,
    pool_maxwait: GaugeVec,
    pool_latency: GaugeVec,
    /// (listener, certificate file, expiry as a Unix time) of every certificate served.
    certificates: std::sync::Mutex<Vec<(String, String, i64)>>,
    certificate_expiry: GaugeVec,
    database_counts: Vec<(IntCounterVec, Field)>,
    database_seconds: Vec<(CounterVec, Field)>,
    /// One scrape at a time: the values read at scrape time are reset, then set.
    rendering: std::sync::Mutex<()>,
}

/// Which of a database's totals a metric shows.
type Field = fn(&Totals) -> u64;

/// A per-database counter of seconds, from microsecond totals.
fn seconds_vec(r: &Registry, name: &str, help: &str) -> CounterVec {
    register(
        r,
        CounterVec::new(Opts::new(name, help), &["database"]).unwrap(),
    )
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: T) -> T {
    registry
        .register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("pgvane".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str| register(&r, IntCounter::new(name, help).unwrap());
        let gauge = |name: &str, help: &str| register(&r, IntGauge::new(name, help).unwrap());
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntGaugeVec::new(Opts::new(name, help), labels).unwrap())
        };
        // From a fast switchover (tens of ms) to a crash with Patroni's ttl (tens of seconds).
        let buckets = vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0];
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.clone());
            register(&r, Histogram::with_opts(opts).unwrap())
        };
        Self {
            role_changes: counter_vec(
                "backend_role_changes_total",
                "Backend role transitions (after rise/fall).",
                &["backend", "from", "to"],
            ),
            backend_role: gauge_vec(
                "backend_role",
                "1 for the backend's current role (primary, replica, down, unknown).",
                &["backend", "role"],
            ),
            backend_serving: gauge_vec(
                "backend_serving",
                "1 for what the backend serves in the routing table (primary, replica, nothing).",
                &["backend", "serving"],
            ),
            replica_lag_bytes: gauge_vec(
                "replica_lag_bytes",
                "WAL bytes the replica has not replayed yet, at its last check.",
                &["backend"],
            ),
            replica_replay_delay: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "replica_replay_delay_seconds",
                        "Age of the last replayed transaction while WAL waits to be replayed (0 when caught up).",
                    ),
                    &["backend"],
                )
                .unwrap(),
            ),
            check_seconds: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "backend_check_seconds",
                        "How long the backend's last health check took (connecting included).",
                    ),
                    &["backend"],
                )
                .unwrap(),
            ),
            primary_changes: counter(
                "primary_changes_total",
                "Changes of the elected primary, not counting the first election at start-up.",
            ),
            no_primary: gauge("no_primary", "1 while no primary is elected."),
            failover_seconds: histogram(
                "failover_seconds",
                "Time from losing the elected primary to electing the next one.",
            ),
            split_brain: counter(
                "split_brain_total",
                "Routing tables in which several backends claimed primary (one fenced, or writes held).",
            ),
            held_clients: gauge(
                "held_clients",
                "Clients waiting for their listener's target to have a reachable backend.",
            ),
            held_total: counter(
                "held_total",
                "Connections and transactions that had to wait for a backend.",
            ),
            hold_timeouts: counter(
                "hold_timeouts_total",
                "Waits for a backend that ended with an error at failover_hold_timeout.",
            ),
            hold_seconds: histogram("hold_seconds", "How long held clients waited for a backend."),
            held_abandoned: counter(
                "held_abandoned_total",
                "Held connections and transactions dropped, never sent, because their client hung up or cancelled.",
            ),
            refusals: counter_vec(
                "refusals_total",
                "Clients refused by a limit, by limit and whether they were answered (no: closed at once, past the refusals in flight).",
                &["limit", "answered"],
            ),
            client_errors: counter_vec(
                "client_errors_total",
                "ErrorResponses pgvane itself sent to clients before closing their connection, by SQLSTATE (a server's own errors inside a session are passed on, not counted).",
                &["sqlstate"],
            ),
            backend_unreachable: counter_vec(
                "backend_unreachable_total",
                "Times the data path could not reach a backend or lost a server connection to it; each triggers an immediate health check.",
                &["backend"],
            ),
            backend_draining: gauge_vec(
                "backend_draining",
                "1 while the backend is drained: it takes no new sessions or transactions.",
                &["backend"],
            ),
            reloads: counter_vec(
                "reloads_total",
                "Configuration reloads (SIGHUP, console RELOAD, POST /reload), by result: ok, or failed (the file was invalid; nothing changed).",
                &["result"],
            ),
            tls_failures: counter_vec(
                "tls_failures_total",
                "Client connections whose TLS negotiation failed (handshake error, no ALPN \"postgresql\" on direct TLS, TLS on a listener without it), by listener.",
                &["listener"],
            ),
            clients: gauge_vec("client_connections", "Open client connections.", &["listener"]),
            paused: gauge("paused", "1 while PAUSE holds new work (global or any database)."),
            pinned_sessions: gauge(
                "pinned_sessions",
                "Transaction-mode clients pinned to their server connection by session state (LISTEN, session advisory locks, WITH HOLD cursors, temporary tables, SQL PREPARE, SET of unreported parameters).",
            ),
            session_state_pins: counter_vec(
                "session_state_statements_total",
                "Transaction-mode statements that created session state, by kind; the first pins its client.",
                &["feature"],
            ),
            session_state_refused: counter_vec(
                "session_state_refused_total",
                "Transaction-mode statements refused with 0A000 (session_state = \"reject\") because they would have created session state, by kind.",
                &["feature"],
            ),
            pool_connections: gauge_vec(
                "pool_server_connections",
                "Server connections per pool, by state (active = lent to a client).",
                &["backend", "database", "user", "state"],
            ),
            pool_clients: gauge_vec(
                "pool_clients",
                "Client sessions per pool: active (linked to a server connection or idle), waiting (for a server connection).",
                &["backend", "database", "user", "state"],
            ),
            pool_maxwait: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "pool_maxwait_seconds",
                        "How long the pool's longest-waiting client has waited (PgBouncer's maxwait).",
                    ),
                    &["backend", "database", "user"],
                )
                .unwrap(),
            ),
            pool_latency: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "pool_latency_seconds",
                        "Percentiles of transaction time (xact), query time (query) and pool wait (wait) over the last one to two minutes, per pool (SHOW LATENCY).",
                    ),
                    &["backend", "database", "user", "measure", "quantile"],
                )
                .unwrap(),
            ),
            certificates: std::sync::Mutex::default(),
            certificate_expiry: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "tls_certificate_expiry_seconds",
                        "Seconds until the certificate a listener serves expires (negative: expired); alert weeks ahead.",
                    ),
                    &["listener", "file"],
                )
                .unwrap(),
            ),
            database_counts: vec![
                (counter_vec("database_server_assignments_total", "Server connections lent to clients, per database (SHOW STATS server_assignment_count).", &["database"]), |t: &Totals| t.server_assignment_count),
                (counter_vec("database_transactions_total", "Transactions pooled, per database (SHOW STATS xact_count).", &["database"]), |t: &Totals| t.xact_count),
                (counter_vec("database_queries_total", "Requests answered (ReadyForQuery), per database (SHOW STATS query_count).", &["database"]), |t: &Totals| t.query_count),
                (counter_vec("database_received_bytes_total", "Bytes received from clients, per database.", &["database"]), |t: &Totals| t.bytes_received),
                (counter_vec("database_sent_bytes_total", "Bytes sent to clients, per database.", &["database"]), |t: &Totals| t.bytes_sent),
                (counter_vec("database_logins_total", "Client logins, per database.", &["database"]), |t: &Totals| t.client_login_count),
            ],
            database_seconds: vec![
                (seconds_vec(&r, "database_transaction_seconds_total", "Time spent in transactions, per database (SHOW STATS xact_time)."), |t: &Totals| t.xact_time),
                (seconds_vec(&r, "database_query_seconds_total", "Time spent answering requests, per database (SHOW STATS query_time)."), |t: &Totals| t.query_time),
                (seconds_vec(&r, "database_wait_seconds_total", "Time clients waited for a server connection, per database (SHOW STATS wait_time)."), |t: &Totals| t.wait_time),
            ],
            rendering: std::sync::Mutex::default(),
            registry: r,
        }
    }

    /// The certificates in force (at start and after each reload).
    pub fn set_certificates(&self, tls: &TlsByListener) {
        let all = tls.iter().map(|(listener, t)| {
            let file = t.cert_file.display().to_string();
            (listener.clone(), file, t.not_after)
        });
        *self.certificates.lock().expect("certificates lock") = all.collect();
    }

    /// The Prometheus text exposition of every metric, with pool gauges read from `pools`.
    pub fn render(&self, pools: &Pools) -> String {
        let _one_at_a_time = self.rendering.lock().expect("render lock");
        self.certificate_expiry.reset();
        let now = crate::tls::unix_now();
        for (listener, file, at) in &*self.certificates.lock().expect("certificates lock") {
            let left = (at - now) as f64;
            self.certificate_expiry
                .with_label_values(&[listener, file])
                .set(left);
        }
        self.pool_connections.reset();
        self.pool_clients.reset();
        self.pool_maxwait.reset();
        self.pool_latency.reset();
        for pool in pools.all() {
            let k = &pool.key;
            let labels = [&k.backend[..], &k.database, &k.user];
            let waiting = pool.waiting_clients();
            let active = pool.clients().saturating_sub(waiting);
            for (state, n) in [("active", active), ("waiting", waiting)] {
                let l = [labels[0], labels[1], labels[2], state];
                self.pool_clients.with_label_values(&l).set(n as i64);
            }
            let maxwait = pool.longest_wait().unwrap_or_default().as_secs_f64();
            self.pool_maxwait.with_label_values(&labels).set(maxwait);
            for (measure, h) in Measure::ALL.iter().zip(pool.latency.window()) {
                let (_, values) = percentiles(&h);
                for (q, v) in PERCENTILES.iter().zip(values) {
                    let Some(us) = v else { continue };
                    let q = q.to_string();
                    let l = [labels[0], labels[1], labels[2], measure.as_str(), &q];
                    self.pool_latency.with_label_values(&l).set(us as f64 / 1e6);
                }
            }
        }
        // Counters from the statistics' totals: set whole at each scrape.
        let totals = pools.stats.totals();
        for (counter, of) in &self.database_counts {
            counter.reset();
            for (db, t) in &totals {
                counter.with_label_values(&[db]).inc_by(of(t));
            }
        }
        for (counter, of) in &self.database_seconds {
            counter.reset();
            for (db, t) in &totals {
                counter.with_label_values(&[db]).inc_by(of(t) as f64 / 1e6);
            }
        }
        for pool in pools.all() {
            let k = &pool.key;
            let (busy, idle) = (pool.busy_connections(), pool.idle_connections());
            for (state, n) in [("active", busy), ("idle", idle)] {
                self.pool_connections
                    .with_label_values(&[&k.backend, &k.database, &k.user, state])
                    .set(n as i64);
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
