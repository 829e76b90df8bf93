//! Migration: at a binary upgrade an idle pooled session moves to the new process with its
//! client's socket and its state, so that the client keeps its connection.
//!
//! Only a session between requests moves (no server connection, nothing read of its next
//! request: whatever the client sends meanwhile waits in the socket for the new process),
//! and only a plain TCP one: TLS state cannot leave the process. Pinned sessions hold a
//! server connection and never reach that point. A busy session moves at its next idle
//! point, so an upgrade's old process is left with the sessions that stay busy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::prepared::{ClientStatements, Statement};
use super::session_state::Feature;
use crate::registry::Registry;
use crate::upgrade::Emigrant;

/// What a session is, as it travels between processes: enough to serve the client's next
/// request as if nothing had happened.
#[derive(Debug, Serialize, Deserialize)]
pub struct Migrant {
    /// The listener the client connected to.
    pub listener: String,
    pub user: String,
    /// The client's database name (as it logged in with).
    pub database: String,
    /// The client's own parameter values (from its startup packet and its SETs since);
    /// the rest are the server's, as the new process's servers have them.
    pub params: Vec<(String, String)>,
    /// The cancel key the client was given at login.
    pub process_id: u32,
    pub secret_key: u32,
    /// The client's named prepared statements.
    pub statements: Vec<MigratedStatement>,
    /// The user's SCRAM ClientKey, when pgvane logs in to servers with it (SCRAM
    /// pass-through): the new process has seen no login of this user yet.
    pub client_key: Option<Vec<u8>>,
}

/// A client's named prepared statement: its name, its Parse message past the name, and
/// what `session_state = "reject"` refused in it.
#[derive(Debug, Serialize, Deserialize)]
pub struct MigratedStatement {
    pub name: Vec<u8>,
    pub text: Vec<u8>,
    pub refused: Option<Feature>,
}

/// The old process's side: on once the new process serves, until the last session left.
#[derive(Default)]
pub struct Emigration {
    /// Whether an upgrade socket is configured: without one no session ever moves, and idle
    /// sessions need not register for the call.
    possible: bool,
    on: AtomicBool,
    to: Mutex<Option<mpsc::UnboundedSender<Emigrant>>>,
}

impl Emigration {
    pub fn new(possible: bool) -> Self {
        Self {
            possible,
            ..Self::default()
        }
    }

    pub fn is_possible(&self) -> bool {
        self.possible
    }

    /// A sender for a session about to move, while sessions move: it cannot fail while
    /// held (the channel's receiver lives until its last sender is gone).
    pub fn ticket(&self) -> Option<mpsc::UnboundedSender<Emigrant>> {
        self.to.lock().expect("emigration lock").clone()
    }

    /// Whether sessions are moving (a session that logs in now is to move too).
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// The new process serves: sessions move to it through `to`, idle ones at once, busy
    /// ones once their request is served.
    pub fn start(&self, to: mpsc::UnboundedSender<Emigrant>, clients: &Registry) {
        *self.to.lock().expect("emigration lock") = Some(to);
        // Before the sessions are asked: one logging in meanwhile asks itself.
        self.on.store(true, Ordering::SeqCst);
        for entry in clients.entries() {
            entry.ask_to_leave();
        }
    }

    /// No more sessions move: the channel closes once what it holds has been sent.
    pub fn end(&self) {
        self.on.store(false, Ordering::SeqCst);
        self.to.lock().expect("emigration lock").take();
    }
}

/// A session's named prepared statements, as they travel.
pub fn statements_of(statements: Option<&ClientStatements>) -> Vec<MigratedStatement> {
    let all = statements.into_iter().flatten();
    all.map(|(name, s)| MigratedStatement {
        name: name.to_vec(),
        text: s.text().to_vec(),
        refused: s.refused(),
    })
    .collect()
}

/// The statements of a session that arrived; `None` for none, as a session starts.
pub fn restore_statements(statements: Vec<MigratedStatement>) -> Option<Box<ClientStatements>> {
    if statements.is_empty() {
        return None;
    }
    let restored = statements.into_iter().map(|s| {
        let statement = Statement::restored(&s.text, s.refused);
        (s.name.into_boxed_slice(), Arc::new(statement))
    });
    Some(Box::new(restored.collect()))
}
