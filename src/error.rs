//! Client-facing failures and the one place they become PostgreSQL ErrorResponses.
//!
//! Anything that makes pgvane refuse or end a client connection on its own is a
//! [`ClientError`]; [`ClientError::to_response`] picks the SQLSTATE and wording so that
//! clients (and `psql`) see the same kind of error PostgreSQL itself would give.

use crate::config::Target;
use crate::protocol::ErrorResponse;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no {target} available for listener \"{listener}\"")]
    NoBackend { listener: String, target: Target },
    #[error("cannot connect to backend \"{backend}\" ({addr}): {reason}")]
    BackendUnreachable {
        backend: String,
        addr: String,
        reason: String,
    },
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
}

impl ClientError {
    pub fn to_response(&self) -> ErrorResponse {
        match self {
            // 57P03 cannot_connect_now: what PostgreSQL says while it cannot take connections.
            ClientError::NoBackend { target, .. } => {
                ErrorResponse::fatal("57P03", format!("no {target} available"))
                    .with_detail(self.to_string())
                    .with_hint(
                        "pgvane has no healthy backend for this listener's target; retry shortly",
                    )
            }
            // 08006 connection_failure
            ClientError::BackendUnreachable { backend, .. } => ErrorResponse::fatal(
                "08006",
                format!("pgvane cannot connect to backend \"{backend}\""),
            )
            .with_detail(self.to_string()),
            // 0A000 feature_not_supported, as PostgreSQL answers an unknown major version.
            ClientError::UnsupportedProtocol { .. } => {
                ErrorResponse::fatal("0A000", format!("{self}: pgvane supports 3.0"))
            }
        }
    }
}
