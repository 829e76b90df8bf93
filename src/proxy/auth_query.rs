//! auth_query: looks up a user pgvane does not know on the current primary, as PgBouncer's
//! `auth_user` does, so that users need not be listed in a file.

use std::sync::Arc;

use crate::auth::{AuthQuery, User};
use crate::error::ClientError;
use crate::proxy::Shared;

/// The user `auth_query` finds for `name`, with the secret PostgreSQL stores; `None` when
/// there is no such user (the login then fails as for any unknown user). Runs as
/// `auth_user` on a pooled connection to the primary, in `auth_dbname` or `database`.
pub async fn lookup(
    shared: &Shared,
    query: &AuthQuery,
    name: &str,
    database: &str,
) -> Result<Option<Arc<User>>, ClientError> {
    let table = shared.topology.snapshot();
    let primary = table
        .primary()
        .ok_or_else(|| ClientError::AuthQuery("no primary to run it on".into()))?;
    let dbname = query.dbname.as_deref().unwrap_or(database);
    let pool = shared.pools.get(&primary.backend, &query.user, dbname);
    let failed = |e: crate::pool::PoolError| ClientError::AuthQuery(e.to_string());
    let mut lease = pool.acquire().await.map_err(failed)?;
    let row = lease
        .conn()
        .query_with(&query.query, name)
        .await
        .map_err(failed)?;
    lease.release();
    Ok(row.map(|row| {
        let secret = row.get(1).cloned().flatten();
        Arc::new(User::found(name.to_owned(), secret.as_deref()))
    }))
}
