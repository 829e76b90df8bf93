//! Cancel requests for pooled clients.
//!
//! Each pooled client gets its own BackendKeyData from pgvane. While it holds a server
//! connection, its entry here points at that server's own key; a CancelRequest carrying the
//! client's key is then sent on to that server. A request for an idle client, or with an
//! unknown key, is dropped, as PostgreSQL drops one that matches no backend.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::pool::CancelTarget;

/// Client key to the slot holding the server its client holds right now. The map's lock is
/// taken only at login, logout and cancel; a transaction touches only its client's slot.
#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<foldhash::HashMap<(u32, u32), Arc<Slot>>>,
}

/// The server a client holds (`None`: it holds none).
type Slot = Mutex<Option<Arc<CancelTarget>>>;

/// A client's registration; removed when dropped.
pub struct CancelKey {
    pub process_id: u32,
    pub secret_key: u32,
    slot: Arc<Slot>,
    registry: Arc<CancelRegistry>,
}

impl CancelKey {
    /// Points cancels at the server the client holds now (`None`: it holds none).
    pub fn set_target(&self, target: Option<&Arc<CancelTarget>>) {
        *self.slot.lock().expect("cancel slot") = target.cloned();
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry
            .clients
            .lock()
            .expect("cancel registry")
            .remove(&(self.process_id, self.secret_key));
    }
}

impl CancelRegistry {
    /// Issues a fresh random key for a client.
    pub fn register(self: &Arc<Self>) -> CancelKey {
        let mut clients = self.clients.lock().expect("cancel registry");
        loop {
            let key: (u32, u32) = rand::random();
            if let std::collections::hash_map::Entry::Vacant(e) = clients.entry(key) {
                let slot = e.insert(Arc::default()).clone();
                return CancelKey {
                    process_id: key.0,
                    secret_key: key.1,
                    slot,
                    registry: self.clone(),
                };
            }
        }
    }

    /// Forwards a client's CancelRequest to the server it is using, if any.
    pub async fn cancel(&self, process_id: u32, secret_key: u32) {
        let slot = self
            .clients
            .lock()
            .expect("cancel registry")
            .get(&(process_id, secret_key))
            .cloned();
        let target = slot.and_then(|s| s.lock().expect("cancel slot").clone());
        match target {
            Some(t) => send_cancel(&t).await,
            None => debug!("cancel request for an idle or unknown client ignored"),
        }
    }
}

/// Sends a CancelRequest for the query running on `target`.
pub async fn send_cancel(target: &CancelTarget) {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(
        target.process_id as i32,
        target.secret_key as i32,
        &mut buf,
    );
    let backend = &target.backend;
    match TcpStream::connect((backend.host.as_str(), backend.port)).await {
        Ok(mut s) => {
            let _ = s.write_all(&buf).await;
            debug!(server_pid = target.process_id, "cancel request forwarded");
        }
        Err(e) => debug!(error = %e, "cannot forward cancel request"),
    }
}
