//! Session state that would not survive a change of server connection in transaction mode.
//!
//! A transaction-mode client gets a server connection per transaction, so whatever it
//! leaves on a connection past its transaction (a LISTEN, a session-level advisory lock, a
//! WITH HOLD cursor, a temporary table, an SQL-level PREPARE, a SET of a parameter the
//! server does not report) would be lost to it and found by the next client. A link that
//! sees a client start such state *pins* the client to its server connection until it
//! disconnects, when the connection is reset (`server_reset_query`) as in session mode.
//!
//! Detection is a light look at each statement's first words (and a search for the
//! session-level advisory lock functions), never a parse: a false alarm costs only a pin.

/// A kind of session state, as named in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Listen,
    AdvisoryLock,
    HoldCursor,
    TempTable,
    SqlPrepare,
    UnreportedSet,
}

impl Feature {
    pub fn name(self) -> &'static str {
        match self {
            Feature::Listen => "listen",
            Feature::AdvisoryLock => "advisory_lock",
            Feature::HoldCursor => "with_hold_cursor",
            Feature::TempTable => "temporary_table",
            Feature::SqlPrepare => "sql_prepare",
            Feature::UnreportedSet => "set",
        }
    }
}

/// The session state `sql` (a simple query, or a Parse's statement; possibly only its
/// start) would create, if any. `reported`: the parameters the server reports (their
/// values follow the client from one server connection to the next).
pub fn session_state(sql: &[u8], reported: &[String]) -> Option<Feature> {
    if contains_ignore_case(sql, b"advisory_lock")
        && (contains_ignore_case(sql, b"pg_advisory_lock")
            || contains_ignore_case(sql, b"pg_try_advisory_lock"))
    {
        return Some(Feature::AdvisoryLock);
    }
    // Each statement of a multi-statement query; a ';' inside a literal only makes an
    // extra, harmless look.
    sql.split(|&b| b == b';')
        .find_map(|s| statement_state(s, reported))
}

fn statement_state(statement: &[u8], reported: &[String]) -> Option<Feature> {
    let mut words = statement
        .split(|b| b.is_ascii_whitespace() || *b == b'(')
        .filter(|w| !w.is_empty());
    let first = words.next()?;
    let is = |w: &[u8], k: &str| w.eq_ignore_ascii_case(k.as_bytes());
    if is(first, "listen") {
        Some(Feature::Listen)
    } else if is(first, "prepare") {
        // PREPARE TRANSACTION is two-phase commit, not a statement.
        (!words.next().is_some_and(|w| is(w, "transaction"))).then_some(Feature::SqlPrepare)
    } else if is(first, "declare") {
        let rest: Vec<&[u8]> = words.collect();
        rest.windows(2)
            .any(|w| is(w[0], "with") && is(w[1], "hold"))
            .then_some(Feature::HoldCursor)
    } else if is(first, "create") {
        let mut next = words.next()?;
        if is(next, "local") || is(next, "global") {
            next = words.next()?;
        }
        (is(next, "temp") || is(next, "temporary")).then_some(Feature::TempTable)
    } else if is(first, "set") {
        let mut name = words.next()?;
        if is(name, "local") || is(name, "transaction") {
            return None; // ends with the transaction
        }
        if is(name, "session") {
            name = words.next()?;
            if is(name, "characteristics") || is(name, "authorization") {
                return Some(Feature::UnreportedSet);
            }
        }
        let name = name.split(|&b| b == b'=').next().unwrap_or_default();
        let followed = reported
            .iter()
            .any(|r| r.as_bytes().eq_ignore_ascii_case(name));
        (!followed).then_some(Feature::UnreportedSet)
    } else {
        None
    }
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_is_told_from_first_words() {
        let cases: &[(&str, Option<Feature>)] = &[
            ("SELECT 1", None),
            ("LISTEN jobs", Some(Feature::Listen)),
            ("select pg_advisory_lock(1)", Some(Feature::AdvisoryLock)),
            (
                "SELECT pg_try_advisory_lock(7)",
                Some(Feature::AdvisoryLock),
            ),
            ("SELECT pg_advisory_xact_lock(1)", None),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                Some(Feature::HoldCursor),
            ),
            ("DECLARE c CURSOR FOR SELECT 1", None),
            ("CREATE TEMP TABLE t (a int)", Some(Feature::TempTable)),
            (
                "create local temporary table t (a int)",
                Some(Feature::TempTable),
            ),
            ("CREATE TABLE t (a int)", None),
            ("PREPARE p AS SELECT 1", Some(Feature::SqlPrepare)),
            ("PREPARE TRANSACTION 'x'", None),
            ("SET work_mem = '64MB'", Some(Feature::UnreportedSet)),
            ("SET statement_timeout TO 5", Some(Feature::UnreportedSet)),
            ("SET LOCAL work_mem = '64MB'", None),
            ("SET TimeZone = 'UTC'", None),
            ("set application_name='x'", None),
            ("SET SESSION work_mem = 1", Some(Feature::UnreportedSet)),
            (
                "BEGIN; SET work_mem = 1; COMMIT",
                Some(Feature::UnreportedSet),
            ),
        ];
        let reported = ["TimeZone".to_string(), "application_name".to_string()];
        for (sql, want) in cases {
            assert_eq!(session_state(sql.as_bytes(), &reported), *want, "{sql}");
        }
    }
}
