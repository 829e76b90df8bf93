//! Named prepared statements in transaction mode (`pool.max_prepared_statements`).
//!
//! A client that prepares a statement (a protocol-level Parse with a name) expects to use it
//! in later transactions, which may run on another server connection. As PgBouncer 1.21+
//! does, pgvane keeps each client's statements (name -> query and parameter types) and gives
//! every distinct statement one server-side name, `pgvane_<hash of its text>`, so that the
//! clients of a pool share what is prepared on each server connection:
//!
//! * Parse: the client's statement is recorded and sent under its server name; when that
//!   server connection has it already, the server's copy is closed first, so that a Parse
//!   behaves as on PostgreSQL: checked and planned against the schema as it is now (a copy
//!   prepared before a column changed type would fail with "cached plan must not change
//!   result type"). Another client sharing the text then uses the fresh copy too.
//! * Bind / Describe of a recorded statement: renamed, and preceded by a Parse of pgvane's
//!   own when the server connection does not have the statement yet.
//! * Close of a recorded statement: forgotten for the client, and sent as a Close of a name
//!   that does not exist (the server answers CloseComplete); the server copy stays for others.
//!
//! Each server connection keeps at most `max_prepared_statements`, evicting the least
//! recently used one with a Close of pgvane's own. The answers to pgvane's own messages
//! (ParseComplete, CloseComplete) are removed from what the client sees, so the server's
//! answers are always the client's in the client's order: pgvane never invents a reply.
//! When the server reports an error in an extended-protocol batch it skips what follows up
//! to Sync; what pgvane recorded for those skipped messages is undone.
//!
//! SQL-level PREPARE/EXECUTE are not tracked (as in PgBouncer); DEALLOCATE ALL and DISCARD
//! ALL are noticed and empty both records.
//!
//! A link engages its tracker ([`LazyTracker`]) only when the client sends its first
//! extended-protocol message other than Sync: simple-protocol traffic (Query, FunctionCall,
//! COPY data) names no statement, and following it would cost every such transaction a
//! second walk over its messages both ways.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{BufMut, BytesMut};
use sha2::{Digest, Sha256};

use super::session_state::{refusal_parse_rest, session_state, Carried, Feature};
use crate::error::ClientError;
use crate::protocol::{CopyInSyncs, ProtocolError};

/// Longest Parse (or Describe/Close) message pgvane holds whole to record it: a statement
/// text of up to 1 MiB. Bind messages are never held whole, only their names.
pub const MAX_TRACKED_MESSAGE: usize = 1 << 20;

/// Longest portal plus statement name prefix of a Bind (PostgreSQL's names are at most 63
/// bytes; clients may send longer ones, which the server truncates).
const MAX_BIND_NAMES: usize = 4096;

/// The name of throwaway statements: never kept on a server connection.
const THROWAWAY: &[u8] = b"pgvane_throwaway";

/// A statement as the server knows it: its name there and its Parse body after the name.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    server_name: Box<[u8]>,
    /// Query text with its NUL, then the parameter type count and OIDs.
    text: Box<[u8]>,
    /// `session_state = "reject"`: the session state running it would create; its Binds
    /// are pointed at a statement that refuses it instead.
    refused: Option<Feature>,
}

impl Statement {
    fn new(text: &[u8]) -> Self {
        let digest = Sha256::digest(text);
        let mut name = b"pgvane_".to_vec();
        for byte in &digest[..16] {
            name.extend_from_slice(format!("{byte:02x}").as_bytes());
        }
        Self {
            server_name: name.into(),
            text: text.into(),
            refused: None,
        }
    }

    /// A statement as a session moved from an upgrade's old process had it.
    pub fn restored(text: &[u8], refused: Option<Feature>) -> Self {
        Self {
            refused,
            ..Self::new(text)
        }
    }

    /// Its Parse message past the name.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// What `session_state = "reject"` refused in it.
    pub fn refused(&self) -> Option<Feature> {
        self.refused
    }
}

/// One client's named statements.
pub type ClientStatements = foldhash::HashMap<Box<[u8]>, Arc<Statement>>;

/// The statements prepared on one server connection, by server name, with the tick of
/// their last use (for evicting the least recently used).
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: foldhash::HashMap<Box<[u8]>, u64>,
    tick: u64,
    /// The queue of the connection's last link, empty, kept so that a transaction
    /// allocates none.
    spare_queue: VecDeque<Sent>,
}

impl ServerStatements {
    /// After DISCARD ALL or DEALLOCATE ALL, the server has none.
    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Marks a statement used; whether the server had it.
    fn touch(&mut self, name: &[u8]) -> bool {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, name: &[u8]) {
        self.tick += 1;
        self.used.insert(name.into(), self.tick);
    }

    fn remove(&mut self, name: &[u8]) {
        self.used.remove(name);
    }

    /// The least recently used statement, removed, once `limit` is reached.
    fn evict(&mut self, limit: usize) -> Option<Box<[u8]>> {
        if self.used.len() < limit {
            return None;
        }
        let oldest = self.used.iter().min_by_key(|(_, t)| **t)?.0.clone();
        self.used.remove(&oldest);
        Some(oldest)
    }
}

/// What pgvane recorded when it sent a Parse or Close, to undo if the server skips it.
#[derive(Debug)]
enum Undo {
    Nothing,
    /// The client's statement was recorded under this name, and the statement marked
    /// prepared on the server connection.
    BothAdded(Box<[u8]>, Box<[u8]>),
    /// The client's statement of this name was forgotten.
    ClientRemoved(Box<[u8]>, Arc<Statement>),
    /// Marked prepared on the server connection.
    ServerAdded(Box<[u8]>),
    /// Evicted from the server connection.
    ServerRemoved(Box<[u8]>),
}

/// A message sent to the server whose answer the tracker follows.
#[derive(Debug)]
enum Sent {
    /// Parse: answered by ParseComplete; `own` when pgvane sent it, not the client.
    Parse { own: bool, undo: Undo },
    /// Close: answered by CloseComplete.
    Close { own: bool, undo: Undo },
    /// Sync, Query or FunctionCall: answered (last) by ReadyForQuery.
    Ready,
}

/// Records of one link: the client's statements, the server connection's, and the messages
/// sent whose answers are still due. Shared by the link's two directions (one task).
pub struct Tracker<'a> {
    state: Mutex<State<'a>>,
    limit: usize,
}

struct State<'a> {
    client: &'a mut ClientStatements,
    server: &'a mut ServerStatements,
    sent: VecDeque<Sent>,
    /// The server reported an error with no Sync sent since: it ignores messages up to the
    /// next Sync, so pgvane passes them on untouched and records nothing for them.
    skipping: bool,
    /// `session_state = "reject"`: what the unnamed statement's Binds refuse, if anything.
    unnamed_refused: Option<Feature>,
    copy_in_syncs: CopyInSyncs,
    /// Client to server.
    up: Framer,
    /// Server to client.
    down: Framer,
}

/// Walks the messages of one direction as its bytes arrive in chunks.
#[derive(Default)]
struct Framer {
    /// Body bytes of the current message still to pass on untouched.
    body_left: usize,
}

impl Framer {
    /// Passes over what is left of the current message's body from `*i`, then reads the
    /// next header: `None` when the input ends first (an incomplete header waits for more).
    fn next(&mut self, input: &[u8], i: &mut usize) -> Result<Option<(u8, usize)>, ProtocolError> {
        let take = self.body_left.min(input.len() - *i);
        self.body_left -= take;
        *i += take;
        if self.body_left > 0 {
            return Ok(None);
        }
        header(input, *i)
    }
}

/// Where the bytes to send are: the input as it was, or a rewritten copy.
pub struct Output {
    /// Input bytes dealt with; the rest (an incomplete message start) waits for more.
    pub consumed: usize,
    /// Whether the bytes to send are in `out` rather than `input[..consumed]`.
    rewritten: bool,
    /// They end with a query that may drop every statement (see [`may_forget_all`]): what
    /// follows must wait for its answer.
    pub barrier: bool,
    /// Statements refused (`session_state = "reject"`), by what they would have created.
    pub refused: Vec<Feature>,
    /// Parse messages the client sent in the input consumed (for SHOW STATS).
    pub client_parses: u32,
}

impl Output {
    /// The bytes to send, given the input and the output buffer passed to the tracker.
    pub fn bytes<'a>(&self, input: &'a [u8], out: &'a [u8]) -> &'a [u8] {
        if self.rewritten {
            out
        } else {
            &input[..self.consumed]
        }
    }
}

/// Builds the output lazily: untouched input is only copied once something is rewritten.
struct Writer<'o> {
    out: &'o mut BytesMut,
    copied: usize,
    rewritten: bool,
}

impl<'o> Writer<'o> {
    fn new(out: &'o mut BytesMut) -> Self {
        Self {
            out,
            copied: 0,
            rewritten: false,
        }
    }

    /// Replaces `input[at..at + len]` by what `put` writes.
    fn replace(&mut self, input: &[u8], at: usize, len: usize, put: impl FnOnce(&mut BytesMut)) {
        if !self.rewritten {
            self.out.clear();
            self.rewritten = true;
        }
        self.out.extend_from_slice(&input[self.copied..at]);
        put(self.out);
        self.copied = at + len;
    }

    fn finish(self, input: &[u8], consumed: usize, barrier: bool) -> Output {
        if self.rewritten {
            self.out.extend_from_slice(&input[self.copied..consumed]);
        }
        Output {
            consumed,
            rewritten: self.rewritten,
            barrier,
            refused: Vec::new(),
            client_parses: 0,
        }
    }
}

fn put_named(out: &mut BytesMut, tag: u8, kind: Option<u8>, name: &[u8], rest: &[u8]) {
    let len = 4 + kind.map_or(0, |_| 1) + name.len() + 1 + rest.len();
    out.put_u8(tag);
    out.put_u32(len as u32);
    if let Some(k) = kind {
        out.put_u8(k);
    }
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(rest);
}

fn header(input: &[u8], at: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    let Some(h) = input.get(at..at + 5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength(len));
    }
    Ok(Some((h[0], len as usize + 1)))
}

/// The NUL-terminated string at the start of `bytes` and what follows it.
/// Whether each value of a Bind is in binary, from its body past the names (`None` until
/// the format codes and the value count have arrived).
fn bind_formats(after_names: &[u8]) -> Option<impl ExactSizeIterator<Item = bool> + '_> {
    let int16 = |at: usize| {
        let b = after_names.get(at..at + 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]) as usize)
    };
    let formats = int16(0)?;
    let values = int16(2 + 2 * formats)?;
    let codes = &after_names[2..2 + 2 * formats];
    let binary = move |k: usize| match formats {
        0 => false,
        1 => codes[1] == 1,
        _ => codes.get(2 * k + 1) == Some(&1),
    };
    Some((0..values).map(binary))
}

fn cstring(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    Some((&bytes[..nul], &bytes[nul + 1..]))
}

/// Whether a Parse, Describe or Close (of `body_len` bytes, `prefix` seen so far) names a
/// statement; `None` until enough of it has arrived to tell.
fn names_a_statement(tag: u8, prefix: &[u8], body_len: usize) -> Option<bool> {
    if body_len < 2 {
        return Some(false); // empty name or malformed: the server answers it
    }
    match tag {
        b'P' => prefix.first().map(|&b| b != 0),
        _ => match prefix {
            [b'S', b, ..] => Some(*b != 0),
            [_, _, ..] => Some(false),
            _ => None,
        },
    }
}

fn too_large(tag: u8, len: usize) -> ClientError {
    ClientError::TooLargeToTrack {
        tag: tag as char,
        len,
    }
}

impl<'a> Tracker<'a> {
    #[cfg(test)]
    fn new(
        client: &'a mut ClientStatements,
        server: &'a mut ServerStatements,
        limit: usize,
    ) -> Self {
        Self::resuming(client, server, limit, LinkPoint::default())
    }

    /// A tracker taking over a link at `at`, a client message boundary.
    fn resuming(
        client: &'a mut ClientStatements,
        server: &'a mut ServerStatements,
        limit: usize,
        at: LinkPoint,
    ) -> Self {
        let mut sent = std::mem::take(&mut server.spare_queue);
        sent.extend((0..at.ready_due).map(|_| Sent::Ready));
        Self {
            state: Mutex::new(State {
                sent,
                client,
                server,
                skipping: false,
                unnamed_refused: None,
                copy_in_syncs: at.copy_in_syncs,
                up: Framer::default(),
                down: Framer {
                    body_left: at.server_body_left,
                },
            }),
            limit,
        }
    }

    /// Client to server: renames, records and adds what named statements need. `input`
    /// holds what the client sent and pgvane has not passed on yet. `refuse`, with
    /// `session_state = "reject"`: the parameters a SET of which is no session state; a
    /// Bind of a statement that would create session state is then pointed at a refusal.
    pub fn from_client(
        &self,
        input: &[u8],
        out: &mut BytesMut,
        refuse: Option<Carried>,
    ) -> Result<Output, ClientError> {
        let mut st = self.state.lock().expect("tracker lock");
        let mut w = Writer::new(out);
        let mut refused = Vec::new();
        let mut client_parses = 0;
        let mut i = 0;
        while let Some((tag, total)) = st.up.next(input, &mut i)? {
            let body_start = i + 5;
            let whole = input.get(body_start..i + total);
            match tag {
                b'P' | b'D' | b'C' => {
                    let prefix = &input[body_start..input.len().min(i + total)];
                    let Some(named) = names_a_statement(tag, prefix, total - 5) else {
                        break; // not enough of it yet to tell
                    };
                    if !named {
                        // The unnamed statement or a portal: streamed, never held.
                        if tag == b'P' {
                            client_parses += 1;
                            // What its Binds refuse, if anything: told from its start.
                            let text = cstring(prefix)
                                .and_then(|(_, rest)| rest.split(|&b| b == 0).next())
                                .unwrap_or_default();
                            st.unnamed_refused = refuse.and_then(|r| session_state(text, r));
                        }
                        st.record_unnamed(tag);
                        st.up.body_left = total - 5;
                        i = body_start;
                        continue;
                    }
                    if total > MAX_TRACKED_MESSAGE {
                        return Err(too_large(tag, total));
                    }
                    let Some(body) = whole else { break };
                    client_parses += u32::from(tag == b'P');
                    st.client_message(tag, body, self.limit, refuse, |put| {
                        w.replace(input, i, total, put)
                    });
                    i += total;
                }
                b'B' => {
                    let avail = &input[body_start..input.len().min(i + total)];
                    let names = cstring(avail).and_then(|(portal, rest)| {
                        let (stmt, _) = cstring(rest)?;
                        Some((portal, stmt))
                    });
                    let Some((portal, stmt)) = names else {
                        if avail.len() >= total - 5 || avail.len() >= MAX_BIND_NAMES {
                            return Err(ProtocolError::Malformed("Bind without names").into());
                        }
                        break;
                    };
                    let names_len = portal.len() + stmt.len() + 2;
                    let refusing = match refuse {
                        Some(_) if !st.skipping => st.refuses(stmt),
                        _ => None,
                    };
                    let server_name = match refusing {
                        None => st.bind(stmt, self.limit, |put| w.replace(input, i, 0, put)),
                        Some(feature) => {
                            let Some(binary) = bind_formats(&avail[names_len..]) else {
                                if avail.len() >= total - 5 {
                                    return Err(ProtocolError::Malformed("Bind formats").into());
                                }
                                if total > MAX_TRACKED_MESSAGE {
                                    return Err(too_large(tag, total));
                                }
                                break; // not enough of it yet
                            };
                            refused.push(feature);
                            Some(st.refusal(feature, binary, self.limit, |put| {
                                w.replace(input, i, 0, put)
                            }))
                        }
                    };
                    if let Some(server_name) = server_name {
                        let new_total = total - stmt.len() + server_name.len();
                        w.replace(input, i, 5 + names_len, |out| {
                            out.put_u8(b'B');
                            out.put_u32((new_total - 1) as u32);
                            out.put_slice(portal);
                            out.put_u8(0);
                            out.put_slice(&server_name);
                            out.put_u8(0);
                        });
                    }
                    st.up.body_left = total - 5 - names_len;
                    i = body_start + names_len;
                }
                _ => {
                    // A query that may drop every statement is sent whole, and nothing after
                    // it rewritten before its answer (see `may_forget_all`).
                    let barrier = tag == b'Q'
                        && match may_forget_all(
                            &input[body_start..input.len().min(i + total)],
                            whole.is_some(),
                        ) {
                            None => break, // not enough of it yet to tell
                            Some(true) if whole.is_none() => break,
                            Some(forgets) => forgets,
                        };
                    match tag {
                        b'S' => {
                            st.skipping = false;
                            st.sent.push_back(Sent::Ready);
                        }
                        b'Q' | b'F' if !st.skipping => st.sent.push_back(Sent::Ready),
                        _ => {}
                    }
                    // Syncs the server ignored during a COPY will not be answered.
                    for _ in 0..st.copy_in_syncs.frontend(tag) {
                        if let Some(Sent::Ready) = st.sent.back() {
                            st.sent.pop_back();
                        }
                    }
                    if barrier {
                        return Ok(Output {
                            refused,
                            client_parses,
                            ..w.finish(input, i + total, true)
                        });
                    }
                    st.up.body_left = total - 5;
                    i = body_start;
                }
            }
        }
        Ok(Output {
            refused,
            client_parses,
            ..w.finish(input, i, false)
        })
    }

    /// Server to client: drops the answers to pgvane's own messages and keeps the records
    /// in step with what the server did.
    pub fn from_server(&self, input: &[u8], out: &mut BytesMut) -> Result<Output, ProtocolError> {
        let mut st = self.state.lock().expect("tracker lock");
        let mut w = Writer::new(out);
        let mut i = 0;
        while let Some((tag, total)) = st.down.next(input, &mut i)? {
            match tag {
                b'1' | b'3' => {
                    let own = match st.sent.pop_front() {
                        Some(Sent::Parse { own, .. }) if tag == b'1' => own,
                        Some(Sent::Close { own, .. }) if tag == b'3' => own,
                        other => {
                            // Out of step: cannot happen with a conforming server.
                            return Err(ProtocolError::Malformed(if other.is_some() {
                                "answer out of order"
                            } else {
                                "unexpected answer"
                            }));
                        }
                    };
                    if own {
                        w.replace(input, i, total, |_| {});
                    }
                }
                b'E' => st.server_error(),
                b'Z' => {
                    while let Some(s) = st.sent.pop_front() {
                        if matches!(s, Sent::Ready) {
                            break;
                        }
                    }
                }
                // CommandComplete of DISCARD ALL / DEALLOCATE ALL: every statement is gone.
                b'C' => match input.get(i + 5..i + total) {
                    Some(b) if forgets_all(b) => {
                        st.client.clear();
                        st.server.clear();
                    }
                    None if total <= 64 => break, // short: wait for all of it
                    _ => {}
                },
                _ => {}
            }
            st.down.body_left = total - 5;
            i += 5;
        }
        Ok(w.finish(input, i, false))
    }
}

/// Whether a CommandComplete body reports that the server dropped every prepared statement.
pub fn forgets_all(body: &[u8]) -> bool {
    body.starts_with(b"DISCARD ALL\0") || body.starts_with(b"DEALLOCATE ALL\0")
}

/// Where a link stands when its tracker is engaged.
#[derive(Debug, Default)]
pub struct LinkPoint {
    /// Requests sent untracked (Query, FunctionCall, Sync) still owing a ReadyForQuery.
    pub ready_due: u32,
    /// The link's COPY state so far.
    pub copy_in_syncs: CopyInSyncs,
    /// Body bytes of the server's current message that the link has not read yet.
    pub server_body_left: usize,
}

/// A link's tracker, engaged on the client's first extended-protocol message (see the
/// module doc); until then the link follows only what makes a record stale.
pub struct LazyTracker<'a> {
    /// What the tracker will own, until it is engaged.
    parts: Mutex<Option<(&'a mut ClientStatements, &'a mut ServerStatements)>>,
    engaged: OnceLock<Tracker<'a>>,
    limit: usize,
}

impl<'a> LazyTracker<'a> {
    pub fn new(
        client: &'a mut ClientStatements,
        server: &'a mut ServerStatements,
        limit: usize,
    ) -> Self {
        Self {
            parts: Mutex::new(Some((client, server))),
            engaged: OnceLock::new(),
            limit,
        }
    }

    pub fn get(&self) -> Option<&Tracker<'a>> {
        self.engaged.get()
    }

    /// Engages the tracker (once) at a client message boundary.
    pub fn engage(&self, at: LinkPoint) -> &Tracker<'a> {
        self.engaged.get_or_init(|| {
            let (client, server) = self
                .parts
                .lock()
                .expect("tracker parts lock")
                .take()
                .expect("parts are taken only here, once");
            Tracker::resuming(client, server, self.limit, at)
        })
    }

    /// DISCARD ALL or DEALLOCATE ALL ran while the tracker was not engaged.
    pub fn forget_all(&self) {
        if let Some((client, server)) = &mut *self.parts.lock().expect("tracker parts lock") {
            client.clear();
            server.clear();
        }
    }
}

/// Whether a simple query may drop every prepared statement (DISCARD ALL, DEALLOCATE ALL,
/// as far as its first word tells: a light look, never a parse). `None`: too little of its
/// text (`body`, all of it when `whole`) has arrived to tell.
///
/// The link lets nothing the client sent after such a query be rewritten before its answer:
/// a Bind pipelined behind a DISCARD ALL would otherwise be renamed after a statement the
/// DISCARD ALL then drops, and be prepared again by pgvane, where PostgreSQL fails it.
fn may_forget_all(body: &[u8], whole: bool) -> Option<bool> {
    let text = body.trim_ascii_start();
    let first_word = |w: &[u8]| {
        text.get(..w.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(w))
    };
    match text.first() {
        // Most queries tell at their first letter: they stream on at once.
        Some(c) if !c.eq_ignore_ascii_case(&b'd') => Some(false),
        _ if first_word(b"discard") || first_word(b"deallocate") => Some(true),
        _ if whole || text.len() >= b"deallocate".len() => Some(false),
        _ => None,
    }
}

/// What follows the untracked start of a client's input.
#[derive(Debug, PartialEq, Eq)]
pub enum Then {
    /// An incomplete message: wait for more.
    More,
    /// A message that needs the tracker, which is whole enough to engage it.
    Engage,
    /// Nothing more until the answer to the query just passed (see [`may_forget_all`]).
    Barrier,
}

/// While the tracker is not engaged: how many bytes at the start of the client's `input`
/// can be passed on untracked, and what comes after them. `body_left`: bytes of a message
/// begun earlier.
pub fn untracked(input: &[u8], body_left: usize) -> Result<(usize, Then), ProtocolError> {
    let mut up = Framer { body_left };
    let mut i = 0;
    while let Some((tag, total)) = up.next(input, &mut i)? {
        if !matches!(tag, b'Q' | b'F' | b'S' | b'd' | b'c' | b'f' | b'X') {
            return Ok((i, Then::Engage));
        }
        if tag == b'Q' {
            let whole = input.len() >= i + total;
            match may_forget_all(&input[i + 5..input.len().min(i + total)], whole) {
                None | Some(true) if !whole => return Ok((i, Then::More)),
                Some(true) => return Ok((i + total, Then::Barrier)),
                _ => {}
            }
        }
        up.body_left = total - 5;
        i += 5;
    }
    Ok((i, Then::More))
}

impl Drop for State<'_> {
    fn drop(&mut self) {
        let mut queue = std::mem::take(&mut self.sent);
        queue.clear();
        self.server.spare_queue = queue;
    }
}

impl State<'_> {
    /// Handles a whole Parse, Describe or Close; `replace` rewrites the message.
    fn client_message(
        &mut self,
        tag: u8,
        body: &[u8],
        limit: usize,
        refuse: Option<Carried>,
        replace: impl FnOnce(&mut dyn FnMut(&mut BytesMut)),
    ) {
        // Parse starts with the name; Describe and Close with 'S' (checked) and the name.
        let named = if tag == b'P' { body } else { &body[1..] };
        let Some((name, rest)) = cstring(named) else {
            // Malformed: the server says so.
            return self.record_unnamed(tag);
        };
        if self.skipping {
            return self.record_unnamed(tag);
        }
        match tag {
            b'P' => {
                let mut own = Vec::new();
                if let Some(existing) = self.client.get(name).cloned() {
                    // A second Parse of the same name: the server's "already exists" error
                    // is the right answer, so send it under the existing server name.
                    self.ensure(&existing, limit, &mut own);
                    self.sent.push_back(Sent::Parse {
                        own: false,
                        undo: Undo::Nothing,
                    });
                    let server_name = existing.server_name.clone();
                    replace(&mut |out| {
                        out.put_slice(&own);
                        put_named(out, b'P', None, &server_name, rest);
                    });
                    return;
                }
                let mut statement = Statement::new(rest);
                statement.refused = refuse.and_then(|r| session_state(cstring(rest)?.0, r));
                let statement = Arc::new(statement);
                self.client.insert(name.into(), statement.clone());
                if self.server.touch(&statement.server_name) {
                    // Prepared anew, as a Parse on PostgreSQL is: the server's copy may
                    // predate a schema change (a column's new type), which a statement
                    // prepared now must see.
                    let server_name = &statement.server_name;
                    self.server.remove(server_name);
                    self.sent.push_back(Sent::Close {
                        own: true,
                        undo: Undo::ServerRemoved(server_name.clone()),
                    });
                    self.server.insert(server_name);
                    self.sent.push_back(Sent::Parse {
                        own: false,
                        undo: Undo::BothAdded(name.into(), server_name.clone()),
                    });
                    replace(&mut |out| {
                        put_named(out, b'C', Some(b'S'), server_name, &[]);
                        put_named(out, b'P', None, server_name, rest);
                    });
                } else {
                    self.evict(limit, &mut own);
                    self.server.insert(&statement.server_name);
                    self.sent.push_back(Sent::Parse {
                        own: false,
                        undo: Undo::BothAdded(name.into(), statement.server_name.clone()),
                    });
                    replace(&mut |out| {
                        out.put_slice(&own);
                        put_named(out, b'P', None, &statement.server_name, rest);
                    });
                }
            }
            b'D' => {
                let Some(statement) = self.client.get(name).cloned() else {
                    return;
                };
                let mut own = Vec::new();
                self.ensure(&statement, limit, &mut own);
                replace(&mut |out| {
                    out.put_slice(&own);
                    put_named(out, b'D', Some(b'S'), &statement.server_name, &[]);
                });
            }
            _ => {
                let Some(statement) = self.client.remove(name) else {
                    return self.record_unnamed(tag);
                };
                self.sent.push_back(Sent::Close {
                    own: false,
                    undo: Undo::ClientRemoved(name.into(), statement),
                });
                replace(&mut |out| put_named(out, b'C', Some(b'S'), THROWAWAY, &[]));
            }
        }
    }

    /// A Parse or Close passed on as it is: its answer is the client's.
    fn record_unnamed(&mut self, tag: u8) {
        if self.skipping {
            return;
        }
        let undo = Undo::Nothing;
        match tag {
            b'P' => self.sent.push_back(Sent::Parse { own: false, undo }),
            b'C' => self.sent.push_back(Sent::Close { own: false, undo }),
            _ => {}
        }
    }

    /// The server name a Bind of the client's statement `name` must use, after `insert`
    /// has put whatever the server connection needs first. `None`: passed on as it is.
    fn bind(
        &mut self,
        name: &[u8],
        limit: usize,
        insert: impl FnOnce(&mut dyn FnMut(&mut BytesMut)),
    ) -> Option<Box<[u8]>> {
        if self.skipping || name.is_empty() {
            return None;
        }
        let statement = self.client.get(name)?.clone();
        let mut own = Vec::new();
        self.ensure(&statement, limit, &mut own);
        if !own.is_empty() {
            insert(&mut |out| out.put_slice(&own));
        }
        Some(statement.server_name.clone())
    }

    /// What a Bind of the client's statement `name` refuses, if anything.
    fn refuses(&self, name: &[u8]) -> Option<Feature> {
        match name {
            [] => self.unnamed_refused,
            _ => self.client.get(name)?.refused,
        }
    }

    /// The server name of the statement that refuses `feature` for a Bind of values in the
    /// formats `binary`, prepared first (into `insert`) unless the server has it.
    fn refusal(
        &mut self,
        feature: Feature,
        binary: impl ExactSizeIterator<Item = bool>,
        limit: usize,
        insert: impl FnOnce(&mut dyn FnMut(&mut BytesMut)),
    ) -> Box<[u8]> {
        let statement = Statement::new(&refusal_parse_rest(feature, binary));
        let mut own = Vec::new();
        self.ensure(&statement, limit, &mut own);
        if !own.is_empty() {
            insert(&mut |out| out.put_slice(&own));
        }
        statement.server_name
    }

    /// Prepares `statement` on the server connection (into `own`) unless it is there.
    fn ensure(&mut self, statement: &Statement, limit: usize, own: &mut Vec<u8>) {
        if self.server.touch(&statement.server_name) {
            return;
        }
        self.evict(limit, own);
        self.server.insert(&statement.server_name);
        self.sent.push_back(Sent::Parse {
            own: true,
            undo: Undo::ServerAdded(statement.server_name.clone()),
        });
        let mut buf = BytesMut::new();
        put_named(
            &mut buf,
            b'P',
            None,
            &statement.server_name,
            &statement.text,
        );
        own.extend_from_slice(&buf);
    }

    /// Makes room for one more statement on the server connection (a Close into `own`).
    fn evict(&mut self, limit: usize, own: &mut Vec<u8>) {
        if let Some(victim) = self.server.evict(limit) {
            let mut buf = BytesMut::new();
            put_named(&mut buf, b'C', Some(b'S'), &victim, &[]);
            own.extend_from_slice(&buf);
            self.sent.push_back(Sent::Close {
                own: true,
                undo: Undo::ServerRemoved(victim),
            });
        }
    }

    /// An ErrorResponse. Inside a simple query it ends only that query's statement; in an
    /// extended-protocol batch the server skips everything up to the next Sync, so what
    /// pgvane recorded for the skipped messages (and the failed one) is undone, last first
    /// (a Close and a Parse of one name in a batch leave the records as they were).
    fn server_error(&mut self) {
        let skipped = self
            .sent
            .iter()
            .position(|s| matches!(s, Sent::Ready))
            .unwrap_or(self.sent.len());
        if skipped == self.sent.len() {
            self.skipping = true;
        }
        let undone: Vec<Sent> = self.sent.drain(..skipped).collect();
        for sent in undone.into_iter().rev() {
            if let Sent::Parse { undo, .. } | Sent::Close { undo, .. } = sent {
                self.undo(undo);
            }
        }
    }

    fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Nothing => {}
            Undo::BothAdded(name, server_name) => {
                self.client.remove(&name);
                self.server.remove(&server_name);
            }
            Undo::ClientRemoved(name, statement) => {
                self.client.insert(name, statement);
            }
            Undo::ServerAdded(server_name) => self.server.remove(&server_name),
            Undo::ServerRemoved(server_name) => self.server.insert(&server_name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn parse(name: &str, query: &str) -> Vec<u8> {
        msg(
            b'P',
            &[name.as_bytes(), b"\0", query.as_bytes(), b"\0\0\0"].concat(),
        )
    }

    fn bind(stmt: &str, params: &[u8]) -> Vec<u8> {
        msg(b'B', &[b"\0", stmt.as_bytes(), b"\0", params].concat())
    }

    fn close(name: &str) -> Vec<u8> {
        msg(b'C', &[b"S", name.as_bytes(), b"\0"].concat())
    }

    const SYNC: &[u8] = b"S\0\0\0\x04";

    /// Splits bytes into (tag, body) messages.
    fn messages(mut bytes: &[u8]) -> Vec<(char, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
            out.push((bytes[0] as char, bytes[5..1 + len].to_vec()));
            bytes = &bytes[1 + len..];
        }
        out
    }

    /// What the tracker sends on for `input`, all of which must be dealt with.
    fn run(t: &Tracker, input: &[u8], from_client: bool) -> Vec<u8> {
        let mut out = BytesMut::new();
        let o = if from_client {
            t.from_client(input, &mut out, None).unwrap()
        } else {
            t.from_server(input, &mut out).unwrap()
        };
        assert_eq!(o.consumed, input.len());
        if o.rewritten {
            out.to_vec()
        } else {
            input.to_vec()
        }
    }

    /// Statements that would create session state are prepared as they are, and their Binds
    /// pointed at a statement that refuses them, prepared first (its answer hidden), with
    /// one parameter per value in the Bind's formats.
    #[test]
    fn binds_of_refused_statements_go_to_a_refusal() {
        let (mut client, mut server) = Default::default();
        let t = Tracker::new(&mut client, &mut server, 10);
        let carried = Carried {
            reported: &[],
            extra: &[],
        };
        // One text value (no format codes), then one binary value (one code, 1).
        let one_text = b"\0\0\0\x01\0\0\0\x01x\0\0";
        let one_binary = b"\0\x01\0\x01\0\x01\0\0\0\x01x\0\0";
        let input = [
            parse("l", "LISTEN jobs"),
            bind("l", one_text),
            parse("", "SELECT pg_advisory_lock($1)"),
            bind("", one_binary),
            parse("ok", "SELECT 1"),
            bind("ok", b"\0\0\0\0\0\0"),
            SYNC.to_vec(),
        ]
        .concat();
        let mut out = BytesMut::new();
        let o = t.from_client(&input, &mut out, Some(carried)).unwrap();
        assert_eq!(o.consumed, input.len());
        assert_eq!(o.refused, [Feature::Listen, Feature::AdvisoryLock]);
        let sent = messages(&out);
        let tags: String = sent.iter().map(|(t, _)| *t).collect();
        assert_eq!(tags, "PPBPPBPBS");
        // The client's statement is prepared as it is.
        assert_eq!(name_of(&sent[0].1), server_name("LISTEN jobs"));
        // Its Bind goes to a refusal with one text parameter.
        let listen = refusal_parse_rest(Feature::Listen, [false].into_iter());
        assert_eq!(&sent[1].1[name_of(&sent[1].1).len() + 1..], &listen[..]);
        assert_eq!(
            sent[2].1[1..].split(|&b| b == 0).next(),
            Some(name_of(&sent[1].1))
        );
        // The unnamed statement's Bind: a refusal with one bytea parameter.
        let lock = refusal_parse_rest(Feature::AdvisoryLock, [true].into_iter());
        assert_eq!(&sent[4].1[name_of(&sent[4].1).len() + 1..], &lock[..]);
        assert_eq!(
            sent[5].1[1..].split(|&b| b == 0).next(),
            Some(name_of(&sent[4].1))
        );
        // The refusals' ParseCompletes are pgvane's, the rest the client's.
        assert_eq!(server_tags(&t, b"11211212Z"), "121212Z");
    }

    fn server_tags(t: &Tracker, tags: &[u8]) -> String {
        let input: Vec<u8> = tags
            .iter()
            .flat_map(|&tag| msg(tag, if tag == b'Z' { b"I" } else { b"" }))
            .collect();
        messages(&run(t, &input, false))
            .iter()
            .map(|(t, _)| *t)
            .collect()
    }

    fn server_name(query: &str) -> Vec<u8> {
        Statement::new(&[query.as_bytes(), b"\0\0\0"].concat())
            .server_name
            .to_vec()
    }

    fn name_of(body: &[u8]) -> &[u8] {
        cstring(body).unwrap().0
    }

    #[test]
    fn a_query_ends_the_syncs_owed_to_an_earlier_execute() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let t = Tracker::new(&mut client, &mut server, 10);
        run(&t, &[parse("a", "SELECT 1"), SYNC.to_vec()].concat(), true);
        server_tags(&t, b"1Z");
        // Bind, Execute, Sync; then a COPY by simple query, its data and CopyDone: the
        // CopyDone owes nothing back to the Sync before the Query.
        let execute = msg(b'E', b"\0\0\0\0\0");
        let copy = [
            msg(b'Q', b"COPY t FROM STDIN\0"),
            msg(b'd', b"1\n"),
            msg(b'c', b""),
        ];
        let input = [
            bind("a", b"\0\0\0\0\0\0"),
            execute,
            SYNC.to_vec(),
            copy.concat(),
        ];
        run(&t, &input.concat(), true);
        assert_eq!(
            t.state.lock().unwrap().sent.len(),
            2,
            "a Ready for the Sync and the Query"
        );
    }

    #[test]
    fn only_discard_and_deallocate_queries_are_barriers() {
        assert_eq!(
            may_forget_all(b"SE", false),
            Some(false),
            "told at its first letter"
        );
        assert_eq!(may_forget_all(b"  discard ALL\0", true), Some(true));
        assert_eq!(may_forget_all(b"DEALLOCATE ALL", false), Some(true));
        assert_eq!(may_forget_all(b"dis", false), None, "too little to tell");
        assert_eq!(may_forget_all(b"delete from t\0", true), Some(false));
        assert_eq!(may_forget_all(b"do $$ begin", false), Some(false));
        assert_eq!(may_forget_all(b"   ", false), None);
    }

    #[test]
    fn a_statement_follows_its_client_to_a_connection_without_it() {
        let mut client = ClientStatements::default();
        let (mut s1, mut s2) = (ServerStatements::default(), ServerStatements::default());
        let q = "SELECT $1::int";
        {
            let t = Tracker::new(&mut client, &mut s1, 10);
            let sent = messages(&run(&t, &[parse("a", q), SYNC.to_vec()].concat(), true));
            assert_eq!(sent[0].0, 'P');
            assert_eq!(name_of(&sent[0].1), server_name(q));
            assert_eq!(server_tags(&t, b"1Z"), "1Z");
        }
        let t = Tracker::new(&mut client, &mut s2, 10);
        let input = [
            bind("a", b"\0\0\0\0\0\0"),
            msg(b'E', b"\0\0\0\0\0"),
            SYNC.to_vec(),
        ]
        .concat();
        let sent = messages(&run(&t, &input, true));
        let tags: String = sent.iter().map(|m| m.0).collect();
        assert_eq!(tags, "PBES", "pgvane's own Parse first");
        assert_eq!(name_of(&sent[0].1), server_name(q));
        assert_eq!(name_of(&sent[1].1[1..]), server_name(q), "Bind renamed");
        assert_eq!(&sent[1].1[1 + server_name(q).len() + 1..], b"\0\0\0\0\0\0");
        assert_eq!(server_tags(&t, b"12CZ"), "2CZ", "own ParseComplete dropped");
    }

    #[test]
    fn what_the_server_skipped_after_an_error_is_undone() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let t = Tracker::new(&mut client, &mut server, 10);
        let input = [parse("bad", "SELEC"), bind("bad", b""), SYNC.to_vec()].concat();
        run(&t, &input, true);
        assert_eq!(server_tags(&t, b"EZ"), "EZ");
        // Prepared again from scratch: a Parse under the server name, nothing of pgvane's.
        let sent = messages(&run(
            &t,
            &[parse("bad", "SELECT 1"), SYNC.to_vec()].concat(),
            true,
        ));
        assert_eq!(sent.len(), 2);
        assert_eq!(name_of(&sent[0].1), server_name("SELECT 1"));
        drop(t);
        assert_eq!(client.len(), 1);
        assert!(server.touch(&server_name("SELECT 1")));
        assert!(!server.touch(&server_name("SELEC")));
    }

    #[test]
    fn a_skipped_fresh_prepare_leaves_the_server_copy_recorded() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let t = Tracker::new(&mut client, &mut server, 10);
        run(&t, &[parse("a", "SELECT 1"), SYNC.to_vec()].concat(), true);
        server_tags(&t, b"1Z");
        // An error before them: the server skips the Close and the Parse pgvane sent for
        // "b", and keeps its copy of the statement.
        let input = [parse("", "SELEC"), parse("b", "SELECT 1"), SYNC.to_vec()].concat();
        run(&t, &input, true);
        assert_eq!(server_tags(&t, b"EZ"), "EZ");
        drop(t);
        assert!(client.contains_key(&b"a"[..]) && !client.contains_key(&b"b"[..]));
        assert!(server.touch(&server_name("SELECT 1")));
    }

    #[test]
    fn a_statement_the_server_has_is_prepared_anew() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let t = Tracker::new(&mut client, &mut server, 10);
        run(&t, &[parse("a", "SELECT 1"), SYNC.to_vec()].concat(), true);
        server_tags(&t, b"1Z");
        let sent = messages(&run(
            &t,
            &[parse("b", "SELECT 1"), SYNC.to_vec()].concat(),
            true,
        ));
        // Closed, then prepared again under the same server name: a client's Parse sees the
        // schema as it is now.
        let tags: String = sent.iter().map(|m| m.0).collect();
        assert_eq!(tags, "CPS");
        assert_eq!(name_of(&sent[0].1[1..]), server_name("SELECT 1"));
        assert_eq!(name_of(&sent[1].1), server_name("SELECT 1"));
        assert_eq!(server_tags(&t, b"31Z"), "1Z", "own CloseComplete dropped");
        // The client's Close forgets it; the server copy stays for others.
        let sent = messages(&run(&t, &[close("b"), SYNC.to_vec()].concat(), true));
        assert_eq!(name_of(&sent[0].1[1..]), THROWAWAY);
        assert_eq!(server_tags(&t, b"3Z"), "3Z");
        drop(t);
        assert!(!client.contains_key(&b"b"[..]) && client.contains_key(&b"a"[..]));
    }

    #[test]
    fn the_least_recently_used_statement_is_evicted() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let t = Tracker::new(&mut client, &mut server, 2);
        for (name, q) in [("a", "SELECT 1"), ("b", "SELECT 2")] {
            run(&t, &[parse(name, q), SYNC.to_vec()].concat(), true);
            server_tags(&t, b"1Z");
        }
        run(&t, &[bind("a", b""), SYNC.to_vec()].concat(), true); // a is now the newer
        server_tags(&t, b"2Z");
        let sent = messages(&run(
            &t,
            &[parse("c", "SELECT 3"), SYNC.to_vec()].concat(),
            true,
        ));
        let tags: String = sent.iter().map(|m| m.0).collect();
        assert_eq!(tags, "CPS");
        assert_eq!(name_of(&sent[0].1[1..]), server_name("SELECT 2"));
        assert_eq!(server_tags(&t, b"31Z"), "1Z");
    }

    #[test]
    fn an_own_answer_split_across_reads_is_still_dropped_and_discard_all_forgets() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let t = Tracker::new(&mut client, &mut server, 10);
        run(&t, &[parse("a", "SELECT 1"), SYNC.to_vec()].concat(), true);
        server_tags(&t, b"1Z");
        run(&t, &[parse("b", "SELECT 1"), SYNC.to_vec()].concat(), true);
        let answers = [msg(b'3', b""), msg(b'1', b""), msg(b'Z', b"I")].concat();
        let mut out = BytesMut::new();
        let o = t.from_server(&answers[..3], &mut out).unwrap();
        assert_eq!(
            (o.consumed, o.bytes(&answers[..3], &out)),
            (0, &b""[..]),
            "CloseComplete's start held"
        );
        let o = t.from_server(&answers, &mut out).unwrap();
        assert_eq!(
            o.bytes(&answers, &out),
            [msg(b'1', b""), msg(b'Z', b"I")].concat(),
            "own CloseComplete dropped"
        );

        run(&t, &msg(b'Q', b"DISCARD ALL\0"), true);
        run(
            &t,
            &[msg(b'C', b"DISCARD ALL\0"), msg(b'Z', b"I")].concat(),
            false,
        );
        drop(t);
        assert!(client.is_empty() && server.used.is_empty());
    }

    #[test]
    fn a_bind_split_across_reads_is_renamed_and_its_values_streamed() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let t = Tracker::new(&mut client, &mut server, 10);
        run(&t, &[parse("a", "SELECT 1"), SYNC.to_vec()].concat(), true);
        server_tags(&t, b"1Z");
        let values = vec![7u8; 10_000];
        let input = [bind("a", &values), SYNC.to_vec()].concat();
        let mut sent = Vec::new();
        let mut pending = Vec::new();
        for chunk in [&input[..3], &input[3..6], &input[6..4000], &input[4000..]] {
            pending.extend_from_slice(chunk);
            let mut out = BytesMut::new();
            let o = t.from_client(&pending, &mut out, None).unwrap();
            sent.extend_from_slice(if o.rewritten {
                &out
            } else {
                &pending[..o.consumed]
            });
            pending.drain(..o.consumed);
        }
        assert!(pending.is_empty());
        let expected = [
            bind(
                std::str::from_utf8(&server_name("SELECT 1")).unwrap(),
                &values,
            ),
            SYNC.to_vec(),
        ]
        .concat();
        assert_eq!(sent, expected);
    }
}
