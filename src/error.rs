//! Client-facing failures and the one place they become PostgreSQL ErrorResponses.
//!
//! Anything that makes pgvane refuse or end a client connection on its own is a
//! [`ClientError`]; [`ClientError::encode`] picks the SQLSTATE and wording so that clients
//! (and `psql`) see the same kind of error PostgreSQL itself would give. A server's own
//! refusal (say, an unknown database) is passed on unchanged.

use std::time::Duration;

use bytes::BytesMut;

use crate::auth::{error_code, AuthError, ServerLoginError};
use crate::config::Target;
use crate::pool::PoolError;
use crate::protocol::{put_message, ErrorResponse, ProtocolError};

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
    #[error("no more connections allowed (max_client_conn {0})")]
    TooManyClients(u32),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    /// A plaintext login on a listener whose client_tls_sslmode requires TLS (hostssl).
    #[error("listener \"{0}\" accepts TLS connections only")]
    TlsRequired(String),
    #[error("peer authentication failed for user \"{0}\"")]
    PeerAuthFailed(String),
    #[error("user \"{0}\" may not use the admin console")]
    NotConsoleUser(String),
    #[error("database \"{0}\" is not currently accepting connections")]
    DatabaseDisabled(String),
    /// `[[database]]` entries exist, and none (nor `*`) names it: PgBouncer's wording.
    #[error("no such database: {0}")]
    NoSuchDatabase(String),
    #[error("cannot look the user up with auth_query: {0}")]
    AuthQuery(String),
    #[error("unsupported startup parameter: {0}")]
    UnsupportedParameter(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("client did not log in within {0:?} (client_login_timeout)")]
    LoginTimeout(Duration),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("server connection lost: {0}")]
    ServerLost(String),
    /// The client hung up or cancelled while its work waited for a backend or a server
    /// connection: the work was dropped, never sent.
    #[error("canceling statement due to user request (it was waiting for a server and is dropped, never sent)")]
    Abandoned,
    #[error("terminating connection due to administrator command (KILL on pgvane's console)")]
    Killed,
    #[error("idle transaction timeout ({0:?})")]
    IdleTransactionTimeout(Duration),
    #[error(
        "query_timeout ({0:?}): a request went unanswered, or a message unfinished, this long"
    )]
    QueryTimeout(Duration),
    #[error("transaction_timeout ({0:?}): the server connection was held this long")]
    TransactionTimeout(Duration),
    #[error("listener \"{0}\" does not take over pooled sessions after the upgrade (removed, or no longer pooled)")]
    ListenerGone(String),
    #[error("invalid frontend message: {0}")]
    Protocol(#[from] ProtocolError),
    /// A first packet that is no startup packet: closed without an answer.
    #[error("invalid startup packet: {0}")]
    BadStartup(ProtocolError),
    #[error(transparent)]
    Limited(#[from] crate::limits::Refusal),
    #[error("named prepared statement message '{tag}' of {len} bytes is too large to track (limit {max} bytes)", max = crate::proxy::prepared::MAX_TRACKED_MESSAGE)]
    TooLargeToTrack { tag: char, len: usize },
}

/// The SQLSTATEs with which PostgreSQL refuses a parameter: unknown (42704), bad value
/// (22023), not settable now (55P02) or by this user (42501).
fn parameter_refusal(code: &str) -> Option<&'static str> {
    ["42704", "22023", "55P02", "42501"]
        .into_iter()
        .find(|c| *c == code)
}

impl ClientError {
    pub fn to_response(&self) -> ErrorResponse {
        use ClientError::*;
        let fatal = |code, msg: String| ErrorResponse::fatal(code, msg);
        // A client's parameter the server refused to SET: its answer, as at its own login.
        if let Pool(PoolError::Query {
            message,
            code: Some(code),
        }) = self
        {
            if let Some(code) = parameter_refusal(code) {
                return fatal(code, message.clone());
            }
        }
        match self {
            // 57P03 cannot_connect_now: what PostgreSQL says while it cannot take connections.
            NoBackend { target, .. } => fatal("57P03", format!("no {target} available"))
                .with_detail(self.to_string())
                .with_hint(
                    "pgvane has no healthy backend for this listener's target; retry shortly",
                ),
            // 08006 connection_failure
            BackendUnreachable { backend, .. } => fatal(
                "08006",
                format!("pgvane cannot connect to backend \"{backend}\""),
            )
            .with_detail(self.to_string()),
            // 0A000 feature_not_supported, as PostgreSQL answers an unknown major version.
            UnsupportedProtocol { .. } => fatal("0A000", format!("{self}: pgvane supports 3.0")),
            TooManyClients(_) => fatal("53300", self.to_string()),
            NoUser => fatal("28000", self.to_string()),
            AuthQuery(_) => fatal("08006", self.to_string()),
            // As PostgreSQL answers for a database with datallowconn off.
            DatabaseDisabled(_) => fatal("55000", self.to_string())
                .with_hint("DISABLE on pgvane's admin console; ENABLE lets clients in again"),
            // invalid_catalog_name, as PostgreSQL answers for a database it does not have.
            NoSuchDatabase(_) => fatal("3D000", self.to_string())
                .with_hint("add a [[database]] entry for it, or one named \"*\" for any database"),
            // As PostgreSQL answers a client no hostssl line lets in without encryption.
            TlsRequired(_) => fatal("28000", format!("pgvane: {self}"))
                .with_hint("connect with sslmode=require (or verify-ca, verify-full)"),
            PeerAuthFailed(_) => fatal("28000", self.to_string()).with_hint(
                "the admin console's Unix socket admits pgvane's own OS user (and root) only",
            ),
            NotConsoleUser(_) => fatal("28000", self.to_string())
                .with_hint("list the user in admin.admin_users or admin.stats_users"),
            UnsupportedParameter(_) => fatal("08P01", self.to_string())
                .with_hint("list it in pool.ignore_startup_parameters to have pgvane drop it"),
            Auth(AuthError::Protocol(e)) => {
                fatal("08P01", format!("invalid authentication message: {e}"))
            }
            // invalid_authorization_specification, as PostgreSQL's cert authentication.
            Auth(e @ AuthError::Certificate { .. }) => fatal("28000", e.to_string()),
            Auth(e) => fatal("28P01", e.to_string()),
            LoginTimeout(_) => fatal("08P01", self.to_string()),
            Pool(PoolError::WaitTimeout(_)) => {
                fatal("53300", "query_wait_timeout".into()).with_detail(self.to_string())
            }
            Pool(e) => fatal(
                "08006",
                format!("pgvane cannot get a server connection: {e}"),
            ),
            ServerLost(_) => fatal("08006", self.to_string()),
            // query_canceled: the answer to a cancel; a client that hung up reads nothing.
            Abandoned => fatal("57014", self.to_string()),
            // admin_shutdown, as for pg_terminate_backend.
            Killed => fatal("57P01", self.to_string()),
            ListenerGone(_) => fatal("57P01", self.to_string())
                .with_hint("connect again: the upgraded pgvane serves other listeners"),
            IdleTransactionTimeout(_) => fatal("25P03", self.to_string()),
            // query_canceled, as PostgreSQL's statement_timeout; transaction_timeout (PG 17).
            QueryTimeout(_) => fatal("57014", self.to_string()),
            TransactionTimeout(_) => fatal("25P04", self.to_string()),
            Protocol(_) | BadStartup(_) => fatal("08P01", self.to_string()),
            Limited(r) => fatal(r.sqlstate(), format!("pgvane: {r}")),
            // 54000 program_limit_exceeded
            TooLargeToTrack { .. } => fatal("54000", self.to_string()).with_hint(
                "use the unnamed statement for such queries, or set pool.max_prepared_statements = 0",
            ),
        }
    }

    /// The SQLSTATE the client is sent.
    pub fn sqlstate(&self) -> String {
        match self {
            ClientError::Pool(PoolError::Login(ServerLoginError::Refused { body, .. })) => {
                error_code(body).unwrap_or_else(|| "XX000".into())
            }
            other => other.to_response().code.to_owned(),
        }
    }

    /// Appends the ErrorResponse for this error to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            ClientError::Pool(PoolError::Login(ServerLoginError::Refused { body, .. })) => {
                put_message(buf, b'E', |b| b.extend_from_slice(body));
            }
            other => other.to_response().encode(buf),
        }
    }
}
