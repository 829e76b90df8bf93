//! pgvane: a health-aware PostgreSQL proxy for replicated clusters.
//!
//! Module map:
//! - [`config`]: the TOML file, defaults and validation.
//! - [`topology`]: health checks and the hot-swapped routing table.
//! - [`proxy`]: the data path (accept, route, pump bytes).
//! - [`protocol`]: the bits of the PostgreSQL wire protocol pgvane speaks itself.
//! - [`error`]: client-facing failures and their PostgreSQL ErrorResponses.
//! - [`server`]: process lifecycle (bind, start, signals, drain).

pub mod config;
pub mod error;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod topology;
