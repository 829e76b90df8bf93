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
//!
//! With `session_state = "reject"` the statement is not run: it is replaced by one that
//! makes the server raise ERROR 0A000 in its place ([`rejecting_query`],
//! [`rejecting_parse_rest`]), so that the error reaches the client in order, in the
//! transaction state the statement itself would have met, and the session goes on.

use bytes::{BufMut, BytesMut};

use crate::protocol::put_message;

/// A kind of session state, as named in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Feature {
    Listen,
    AdvisoryLock,
    HoldCursor,
    TempTable,
    SqlPrepare,
    UnreportedSet,
}

impl Feature {
    /// How the client wrote it, for the error message.
    fn statement(self) -> &'static str {
        match self {
            Feature::Listen => "LISTEN",
            Feature::AdvisoryLock => "a session-level advisory lock",
            Feature::HoldCursor => "a WITH HOLD cursor",
            Feature::TempTable => "a temporary table",
            Feature::SqlPrepare => "SQL-level PREPARE",
            Feature::UnreportedSet => "SET of a parameter the server does not report",
        }
    }

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

/// The parameters whose values follow a client from one server connection to the next, so
/// that a SET of one is no session state: those the server reports, and
/// `pool.track_extra_parameters` (read back after a transaction that sets one, see
/// [`Look::sets_extra`]).
#[derive(Debug, Clone, Copy)]
pub struct Carried<'a> {
    pub reported: &'a [String],
    pub extra: &'a [String],
}

impl Carried<'_> {
    fn contains(&self, name: &[u8]) -> bool {
        self.reported
            .iter()
            .chain(self.extra)
            .any(|r| r.as_bytes().eq_ignore_ascii_case(name))
    }
}

/// What one look at a query (a simple query, or a Parse's statement; possibly only its
/// start) finds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    /// The session state it would create, if any (the first found).
    pub state: Option<Feature>,
    /// Whether it may change one of `extra` (SET or RESET of one, RESET ALL, DISCARD ALL):
    /// the client's value is then read back from the server after the transaction.
    pub sets_extra: bool,
}

/// Looks at `sql` once for both: every simple query and Parse of a transaction-mode client
/// passes here, and most statements end at their first word.
///
/// One memchr pass finds both the ';' that end statements (a ';' inside a literal only
/// makes an extra, harmless look) and the 'v's where a session-level advisory lock's
/// function name could be (`pg_advisory_lock`, `pg_try_advisory_lock`, their `_shared`
/// forms; anywhere, in any case). Such a lock is the state told when there are several.
pub fn look(sql: &[u8], carried: Carried) -> Look {
    let mut found = Look::default();
    let mut locks = false;
    let mut from = 0;
    let marks = memchr::memchr3_iter(b';', b'v', b'V', sql).chain(std::iter::once(sql.len()));
    for at in marks {
        if sql.get(at).is_some_and(|&b| b != b';') {
            locks = locks || advisory_lock_at(sql, at);
            continue;
        }
        let (state, sets_extra) = statement_look(&sql[from..at], carried);
        found.state = found.state.or(state);
        found.sets_extra |= sets_extra;
        from = at + 1;
    }
    if locks {
        found.state = Some(Feature::AdvisoryLock);
    }
    found
}

/// The session state `sql` would create, if any.
pub fn session_state(sql: &[u8], carried: Carried) -> Option<Feature> {
    look(sql, carried).state
}

/// Whether the 'v' at `v` in `sql` is that of "advisory_lock" in `pg_advisory_lock` or
/// `pg_try_advisory_lock`, in any case.
fn advisory_lock_at(sql: &[u8], v: usize) -> bool {
    const LOCK: &[u8] = b"advisory_lock";
    let Some(start) = v.checked_sub(2) else {
        return false;
    };
    let (before, from) = sql.split_at(start);
    from.get(..LOCK.len())
        .is_some_and(|w| w.eq_ignore_ascii_case(LOCK))
        && (ends_with_ignoring_case(before, b"pg_") || ends_with_ignoring_case(before, b"pg_try_"))
}

fn ends_with_ignoring_case(text: &[u8], suffix: &[u8]) -> bool {
    text.len() >= suffix.len() && text[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

fn words(statement: &[u8]) -> impl Iterator<Item = &[u8]> {
    statement
        .split(|b| b.is_ascii_whitespace() || *b == b'(')
        .filter(|w| !w.is_empty())
}

fn is(w: &[u8], keyword: &str) -> bool {
    w.eq_ignore_ascii_case(keyword.as_bytes())
}

/// The session state one statement would create, and whether it may change an extra
/// parameter.
fn statement_look(statement: &[u8], carried: Carried) -> (Option<Feature>, bool) {
    let mut words = words(statement);
    let Some(first) = words.next() else {
        return (None, false);
    };
    let state = if is(first, "listen") {
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
        let next = words.next().unwrap_or_default();
        let next = match is(next, "local") || is(next, "global") {
            true => words.next().unwrap_or_default(),
            false => next,
        };
        (is(next, "temp") || is(next, "temporary")).then_some(Feature::TempTable)
    } else if is(first, "set") || is(first, "reset") || is(first, "discard") {
        return changed_parameter(first, words, carried);
    } else {
        None
    };
    (state, false)
}

/// A SET, RESET or DISCARD (`first`, then `words`): the session state it creates (a SET of
/// a parameter that does not follow the client), and whether it may change an extra one.
fn changed_parameter<'s>(
    first: &[u8],
    mut words: impl Iterator<Item = &'s [u8]>,
    carried: Carried,
) -> (Option<Feature>, bool) {
    let named = |w: &[u8]| {
        carried
            .extra
            .iter()
            .any(|e| e.as_bytes().eq_ignore_ascii_case(w))
    };
    let Some(mut second) = words.next() else {
        return (None, false);
    };
    let (set, reset) = (is(first, "set"), is(first, "reset"));
    if !set && !reset {
        return (None, is(second, "all"));
    }
    // SET LOCAL and SET TRANSACTION end with the transaction.
    let lasts = !(is(second, "local") || is(second, "transaction"));
    if is(second, "session") || is(second, "local") {
        second = words.next().unwrap_or_default();
        if set && lasts && (is(second, "characteristics") || is(second, "authorization")) {
            return (Some(Feature::UnreportedSet), false);
        }
    }
    let name = second.split(|&b| b == b'=').next().unwrap_or_default();
    if reset {
        return (None, named(name) || is(name, "all"));
    }
    let state =
        (lasts && !name.is_empty() && !carried.contains(name)).then_some(Feature::UnreportedSet);
    (state, named(name))
}

/// A DO block that raises what the client is told instead of running `feature`'s statement.
/// Plain ASCII and no quote of the client's text: nothing in it needs escaping.
fn raising(feature: Feature) -> String {
    format!(
        "DO $pgvane$BEGIN RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', \
         MESSAGE = 'pgvane: {} is not supported in transaction mode', \
         DETAIL = 'It would outlive the transaction on a server connection that other clients share next.', \
         HINT = 'Use a session-mode listener, or session_state = \"pin\" on this one.'; END$pgvane$",
        feature.statement()
    )
}

/// A simple Query that has the server refuse `feature` with 0A000, for one that would
/// have created it: one ReadyForQuery, as the client expects.
pub fn rejecting_query(feature: Feature) -> BytesMut {
    let mut out = BytesMut::new();
    put_message(&mut out, b'Q', |b| {
        b.put_slice(raising(feature).as_bytes());
        b.put_u8(0);
    });
    out
}

/// A Parse's body past its name for the statement a refused one's Bind is pointed at: the
/// DO block that refuses `feature`, with one parameter per value the Bind carries, typed by
/// its format (text for text, bytea for binary), so that whatever types the client's
/// statement has, its values bind and the Execute gets the error.
pub fn refusal_parse_rest(
    feature: Feature,
    binary: impl ExactSizeIterator<Item = bool>,
) -> Vec<u8> {
    let mut out = raising(feature).into_bytes();
    out.push(0);
    out.extend_from_slice(&(binary.len() as u16).to_be_bytes());
    for b in binary {
        out.extend_from_slice(&if b { BYTEA_OID } else { TEXT_OID }.to_be_bytes());
    }
    out
}

const BYTEA_OID: u32 = 17;
const TEXT_OID: u32 = 25;

/// `data[..upto]` with each simple Query from `first` on (the start of the first one to
/// refuse; messages follow each other from there) that would create session state replaced
/// by its refusal. Returns the bytes and what was refused. A Query may go on past `data`:
/// `carry` is set to how many of the bytes that follow are the rest of it, to drop.
pub fn with_rejections(
    data: &[u8],
    upto: usize,
    first: usize,
    carried: Carried,
    carry: &mut usize,
) -> (BytesMut, Vec<Feature>) {
    let mut out = BytesMut::with_capacity(upto + 512);
    let mut refused = Vec::new();
    let (mut from, mut at) = (0, first);
    while let Some(header) = data.get(at..at + 5).filter(|_| at < upto) {
        let len = u32::from_be_bytes(header[1..].try_into().expect("4 bytes")) as usize;
        let end = at + 1 + len.max(4);
        let text = data[at + 5..end.min(data.len())].split(|&b| b == 0).next();
        let feature = text
            .filter(|t| header[0] == b'Q' && !t.is_empty())
            .and_then(|t| session_state(t, carried));
        if let Some(feature) = feature {
            out.extend_from_slice(&data[from..at]);
            out.extend_from_slice(&rejecting_query(feature));
            refused.push(feature);
            from = end.min(upto);
            *carry = end.saturating_sub(data.len());
        }
        at = end;
    }
    out.extend_from_slice(&data[from..upto]);
    (out, refused)
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
            ("SELECT PG_ADVISORY_LOCK(1)", Some(Feature::AdvisoryLock)),
            (
                "select 1; select Pg_Advisory_Lock_Shared(2)",
                Some(Feature::AdvisoryLock),
            ),
            ("SELECT pg_advisory_unlock(1)", None),
            ("select advisory_lock(1)", None),
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
            ("SELECT 1;\n  (LISTEN jobs)", Some(Feature::Listen)),
            ("SELECT 1;", None),
            ("", None),
        ];
        let reported = ["TimeZone".to_string(), "application_name".to_string()];
        let extra = ["search_path".to_string()];
        let carried = Carried {
            reported: &reported,
            extra: &extra,
        };
        for (sql, want) in cases {
            assert_eq!(session_state(sql.as_bytes(), carried), *want, "{sql}");
        }
        assert_eq!(session_state(b"SET search_path = app", carried), None);
    }

    #[test]
    fn changes_of_extra_parameters_are_told() {
        let extra = ["search_path".to_string()];
        let carried = Carried {
            reported: &[],
            extra: &extra,
        };
        let sets_extra = |sql: &str| look(sql.as_bytes(), carried).sets_extra;
        for sql in [
            "SET search_path = app",
            "set SESSION search_path to app, public",
            "SET search_path=app",
            "BEGIN; RESET search_path",
            "RESET ALL",
            "discard all",
        ] {
            assert!(sets_extra(sql), "{sql}");
        }
        for sql in ["SET work_mem = 1", "SELECT 1", "RESET work_mem", "SET"] {
            assert!(!sets_extra(sql), "{sql}");
        }
        // One look tells both, in any statement of a query.
        let cases: &[(&str, Option<Feature>, bool)] = &[
            ("SET LOCAL search_path = app", None, true),
            (
                "SET search_path = app; LISTEN jobs",
                Some(Feature::Listen),
                true,
            ),
            ("LISTEN jobs; RESET ALL", Some(Feature::Listen), true),
            (
                "SET work_mem = 1; SET search_path = app",
                Some(Feature::UnreportedSet),
                true,
            ),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                Some(Feature::UnreportedSet),
                false,
            ),
            ("SET LOCAL SESSION AUTHORIZATION x", None, false),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None, false),
            ("SET SESSION", None, false),
            ("DISCARD PLANS", None, false),
            (
                "SELECT pg_advisory_lock(1); SET search_path = a",
                Some(Feature::AdvisoryLock),
                true,
            ),
            ("CREATE", None, false),
        ];
        for (sql, state, sets_extra) in cases {
            let want = Look {
                state: *state,
                sets_extra: *sets_extra,
            };
            assert_eq!(look(sql.as_bytes(), carried), want, "{sql}");
        }
    }

    proptest::proptest! {
        /// One pass tells what a look at each piece between ';'s and a case-blind search
        /// for the lock functions tell, in text made of statements, pieces of the names,
        /// other 'v's and separators.
        #[test]
        fn a_look_is_that_of_each_statement_and_of_a_search_for_locks(
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                "pg_", "PG_", "Pg_", "try_", "TRY_", "advisory_lock", "ADVISORY_LOCK",
                "Advisory_Lock", "advisory", "_lock", "_shared", "v", "V", "ad", "p", "g",
                "_", " ", "(1)", ";", "; ", "SET work_mem = 1", "set search_path = a",
                "LISTEN x", "reset all", "VALUES",
            ]), 0..12)
        ) {
            let sql = pieces.concat();
            let extra = ["search_path".to_string()];
            let carried = Carried { reported: &[], extra: &extra };
            let lower = sql.to_ascii_lowercase();
            let locks = ["pg_advisory_lock", "pg_try_advisory_lock"]
                .iter()
                .any(|name| lower.contains(name));
            let mut want = Look::default();
            for statement in sql.as_bytes().split(|&b| b == b';') {
                let (state, sets_extra) = statement_look(statement, carried);
                want.state = want.state.or(state);
                want.sets_extra |= sets_extra;
            }
            if locks {
                want.state = Some(Feature::AdvisoryLock);
            }
            proptest::prop_assert_eq!(look(sql.as_bytes(), carried), want, "{}", sql);
        }
    }

    const NONE: Carried = Carried {
        reported: &[],
        extra: &[],
    };

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn refused_queries_are_replaced_in_place() {
        let before = message(b'Q', b"SELECT 1\0");
        let listen = message(b'Q', b"LISTEN jobs\0");
        let parse = message(b'P', b"\0LISTEN jobs\0\0\0");
        let lock = message(b'Q', b"SELECT pg_advisory_lock(1)\0");
        let data = [&before[..], &listen, &parse, &lock].concat();
        let mut carry = 0;
        let (out, refused) = with_rejections(&data, data.len(), before.len(), NONE, &mut carry);
        assert_eq!(carry, 0);
        assert_eq!(refused, [Feature::Listen, Feature::AdvisoryLock]);
        let listen_refused = rejecting_query(Feature::Listen);
        let lock_refused = rejecting_query(Feature::AdvisoryLock);
        let want = [&before[..], &listen_refused, &parse, &lock_refused].concat();
        assert_eq!(&out[..], &want[..]);
        let text = String::from_utf8_lossy(&listen_refused);
        assert!(text.contains("LISTEN is not supported"), "{text}");
    }

    #[test]
    fn a_refused_query_cut_short_drops_its_rest() {
        let listen = message(b'Q', b"LISTEN jobs\0");
        let mut carry = 0;
        let (out, _) = with_rejections(&listen[..14], 14, 0, NONE, &mut carry);
        assert_eq!(carry, listen.len() - 14);
        assert_eq!(&out[..], &rejecting_query(Feature::Listen)[..]);
    }

    #[test]
    fn a_refusal_statement_takes_the_bind_s_values_whatever_their_format() {
        let rest = refusal_parse_rest(Feature::TempTable, [false, true].into_iter());
        let nul = rest.iter().position(|&b| b == 0).unwrap();
        assert!(rest.starts_with(b"DO $pgvane$"));
        assert_eq!(&rest[nul + 1..], &[0, 2, 0, 0, 0, 25, 0, 0, 0, 17]);
    }
}
