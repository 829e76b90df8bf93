//! pgvane: a health-aware PostgreSQL proxy for replicated clusters.
//!
//! Module map:
//! - [`config`]: the TOML file, defaults and validation.
//! - [`topology`]: health checks and the hot-swapped routing table.
//! - [`proxy`]: the data path (accept, route, pump bytes; passthrough and pooled sessions).
//! - [`pool`]: server connection pools, their wait queue and upkeep.
//! - [`auth`]: client authentication (SCRAM, md5, trust) and server login.
//! - [`protocol`]: the bits of the PostgreSQL wire protocol pgvane speaks itself.
//! - [`error`]: client-facing failures and their PostgreSQL ErrorResponses.
//! - [`import`]: `pgvane import` from pgbouncer.ini and haproxy.cfg.
//! - [`limits`]: bounds on what clients can make pgvane spend (refusals, descriptors, logs).
//! - [`admin`]: PAUSE/RESUME, the HTTP admin API (metrics, status) and the admin console.
//! - [`stats`]: PgBouncer's SHOW STATS counters, per database.
//! - [`registry`]: the open sessions and server connections, for SHOW CLIENTS/SERVERS.
//! - [`metrics`]: the Prometheus registry.
//! - [`reload`]: applies a changed configuration file to the running process.
//! - [`server`]: process lifecycle (bind, start, signals, drain).
//! - [`upgrade`]: hands the listening sockets and the pooled sessions to a new process
//!   (zero-downtime upgrade).

pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
pub mod import;
pub mod limits;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod server;
pub mod stats;
pub mod tls;
pub mod topology;
pub mod upgrade;

/// pgvane's version and the git commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PGVANE_COMMIT"), ")");
