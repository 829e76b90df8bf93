//! Cancel requests for pooled clients.
//!
//! Each pooled client gets its own BackendKeyData from pgvane. While it holds a server
//! connection, its entry here points at that server's own key; a CancelRequest carrying the
//! client's key is then sent on to that server. A request for an idle client, or with an
//! unknown key, is dropped, as PostgreSQL drops one that matches no backend.
//!
//! PostgreSQL signals a cancelled backend twice (the process, then its process group), and
//! a signal that lands while the backend reads a message is kept for the next statement. A
//! server connection is therefore not handed to another client while a cancel for it is
//! in flight: the client's session waits ([`CancelKey::settled`]) until the server has
//! closed the cancel connection, which it does once both signals are sent. Without that, a
//! client's cancel could stop the next client's query on the same server connection.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use atomic_waker::AtomicWaker;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::pool::CancelTarget;
use crate::topology::Backend;

/// Client key to the slot holding the server its client holds right now. The map's lock is
/// taken only at login, logout and cancel; a transaction touches only its client's slot.
#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<foldhash::HashMap<(u32, u32), Arc<Slot>>>,
}

/// The server a client holds. Pointed at a server and cleared once per transaction each, so
/// with plain stores, no lock and no reference count: the server's key is copied in, and its
/// backend written only when it changes (in practice, once per client and failover).
///
/// One per pooled client, idle ones included: 64 bytes, which with the `Arc`'s counts fill
/// mimalloc's 80-byte class (`a_slot_fits_the_allocators_80_byte_class`).
#[derive(Default)]
struct Slot {
    /// The server's process id and secret key (`pack`); 0 while the client holds none (no
    /// PostgreSQL process has id 0).
    key: AtomicU64,
    /// Which backend `backend` holds, by address, to see without a load of it that it is
    /// current.
    backend_id: AtomicUsize,
    backend: ArcSwapOption<Backend>,
    /// Cancel requests for this client between reading `key` and the server's close.
    in_flight: AtomicU32,
    /// Cancel requests that found the client holding no server connection: a request it
    /// has waiting for one is then dropped, never sent.
    unlinked_cancels: AtomicU32,
    /// Woken when `unlinked_cancels` grows and when `in_flight` drops to 0. One waker for
    /// both: only the client's own session waits on its slot, for one or the other, and
    /// looks again at the count it waits on. Registering costs a compare-and-swap where a
    /// `Notify` would put the waiter on its list under a lock, on every transaction that
    /// waits for a server.
    changed: AtomicWaker,
}

fn pack(process_id: u32, secret_key: u32) -> u64 {
    (u64::from(process_id) << 32) | u64::from(secret_key)
}

/// A client's registration; removed when dropped.
pub struct CancelKey {
    pub process_id: u32,
    pub secret_key: u32,
    slot: Arc<Slot>,
    registry: Arc<CancelRegistry>,
}

impl CancelKey {
    /// Points cancels at the server the client holds now (`None`: it holds none).
    pub fn set_target(&self, target: Option<&CancelTarget>) {
        let Some(t) = target else {
            // SeqCst, paired with `cancel`: either a cancel sees the key gone, or `settled`
            // sees the cancel in flight.
            self.slot.key.store(0, Ordering::SeqCst);
            return;
        };
        let id = Arc::as_ptr(&t.backend) as usize;
        // The slot's own reference keeps that address from being reused by another backend.
        if self.slot.backend_id.load(Ordering::Relaxed) != id {
            self.slot.backend.store(Some(t.backend.clone()));
            self.slot.backend_id.store(id, Ordering::Relaxed);
        }
        let key = pack(t.process_id, t.secret_key);
        self.slot.key.store(key, Ordering::Release);
    }

    /// Whether a cancel for this client is still on its way to the server it held; call
    /// after `set_target(None)`.
    pub fn cancel_in_flight(&self) -> bool {
        self.slot.in_flight.load(Ordering::SeqCst) > 0
    }

    /// Resolves at a cancel request that finds this client holding no server connection
    /// (one that came before the first poll counts: the count is read then).
    pub async fn cancelled_while_unlinked(&self) {
        let seen = self.slot.unlinked_cancels.load(Ordering::SeqCst);
        self.wait_until(|slot| slot.unlinked_cancels.load(Ordering::SeqCst) != seen)
            .await
    }

    /// Waits until no cancel for this client is in flight: the server connection it held
    /// may then go to another client.
    pub async fn settled(&self) {
        self.wait_until(|slot| slot.in_flight.load(Ordering::SeqCst) == 0)
            .await
    }

    /// Waits until `done` holds, looked at again at each change of the slot (registered
    /// first, so that a change between the look and the wait still wakes it).
    async fn wait_until(&self, done: impl Fn(&Slot) -> bool) {
        std::future::poll_fn(|cx| {
            self.slot.changed.register(cx.waker());
            match done(&self.slot) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
        .await
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
        loop {
            if let Some(key) = self.register_key(rand::random()) {
                return key;
            }
        }
    }

    /// Takes `key` for a client, unless another client has it: a session that came from an
    /// upgrade's old process keeps the key it was given there.
    pub fn register_key(self: &Arc<Self>, key: (u32, u32)) -> Option<CancelKey> {
        let mut clients = self.clients.lock().expect("cancel registry");
        let std::collections::hash_map::Entry::Vacant(e) = clients.entry(key) else {
            return None;
        };
        let slot = e.insert(Arc::default()).clone();
        Some(CancelKey {
            process_id: key.0,
            secret_key: key.1,
            slot,
            registry: self.clone(),
        })
    }

    /// Forwards a client's CancelRequest to the server it is using, if any.
    pub async fn cancel(&self, process_id: u32, secret_key: u32) {
        let slot = self
            .clients
            .lock()
            .expect("cancel registry")
            .get(&(process_id, secret_key))
            .cloned();
        let Some(slot) = slot else {
            return debug!("cancel request for an unknown client ignored");
        };
        // Counted in flight before the key is read (see `set_target`).
        slot.in_flight.fetch_add(1, Ordering::SeqCst);
        // A client switching servers meanwhile can pair a key with the other server's
        // backend: that server knows no such key and ignores the request.
        let key = slot.key.load(Ordering::SeqCst);
        let backend = slot.backend.load_full();
        match backend.filter(|_| key != 0) {
            Some(backend) => {
                send_cancel(&CancelTarget {
                    backend,
                    process_id: (key >> 32) as u32,
                    secret_key: key as u32,
                })
                .await
            }
            None => {
                slot.unlinked_cancels.fetch_add(1, Ordering::SeqCst);
                slot.changed.wake();
                debug!("cancel request for a client holding no server connection");
            }
        }
        if slot.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            slot.changed.wake();
        }
    }
}

/// How long a forwarded cancel may take to be acted on (the server closing its connection).
const CANCEL_LIMIT: Duration = Duration::from_secs(10);

/// Sends a CancelRequest for the query running on `target`, and waits (up to
/// `CANCEL_LIMIT`) until the server has acted on it and closed the connection.
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
            let sent = async {
                s.write_all(&buf).await?;
                s.read_to_end(&mut Vec::new()).await
            };
            let outcome = tokio::time::timeout(CANCEL_LIMIT, sent).await;
            debug!(
                server_pid = target.process_id,
                ?outcome,
                "cancel request forwarded"
            );
        }
        Err(e) => debug!(error = %e, "cannot forward cancel request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn a_slot_fits_the_allocators_80_byte_class() {
        // An Arc's two counts come on top; mimalloc's classes here are 64, 80, 96, 112, 128.
        assert!(std::mem::size_of::<Slot>() + 16 <= 80);
    }

    /// A cancel settling wakes the unlinked-cancel wait (they share one waker) but does
    /// not end it; a cancel that finds the client holding no server does.
    #[tokio::test]
    async fn a_settled_cancel_is_not_taken_for_one_that_found_no_server() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let registry = Arc::new(CancelRegistry::default());
        let key = registry.register();
        key.set_target(Some(&CancelTarget {
            backend: Arc::new(Backend::new("pg0".into(), "127.0.0.1".into(), port)),
            process_id: 7,
            secret_key: 9,
        }));
        let unlinked = key.cancelled_while_unlinked();
        let mut unlinked = std::pin::pin!(unlinked);
        // Polled once: the wait has started.
        assert!(futures_util::poll!(unlinked.as_mut()).is_pending());

        let forwarded = tokio::spawn({
            let registry = registry.clone();
            let (pid, secret) = (key.process_id, key.secret_key);
            async move { registry.cancel(pid, secret).await }
        });
        // The "server" takes the CancelRequest, then closes: the cancel settles.
        let (mut conn, _) = server.accept().await.unwrap();
        let mut request = [0u8; 16];
        conn.read_exact(&mut request).await.unwrap();
        assert_eq!(&request[8..], &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert!(key.cancel_in_flight());
        drop(conn);
        forwarded.await.unwrap();
        key.settled().await;
        assert!(!key.cancel_in_flight());
        assert!(futures_util::poll!(unlinked.as_mut()).is_pending());

        key.set_target(None);
        registry.cancel(key.process_id, key.secret_key).await;
        unlinked.await;
    }

    /// A session waiting for a server, parked, is woken by a cancel that another task
    /// handles (the listener's): its wait ends.
    #[tokio::test]
    async fn a_cancel_from_another_task_wakes_a_waiting_session() {
        let registry = Arc::new(CancelRegistry::default());
        let key = Arc::new(registry.register());
        let (parked, is_parked) = tokio::sync::oneshot::channel();
        let waiting = tokio::spawn({
            let key = key.clone();
            async move {
                let unlinked = key.cancelled_while_unlinked();
                let mut unlinked = std::pin::pin!(unlinked);
                assert!(futures_util::poll!(unlinked.as_mut()).is_pending());
                parked.send(()).unwrap();
                unlinked.await
            }
        });
        is_parked.await.unwrap();
        registry.cancel(key.process_id, key.secret_key).await;
        tokio::time::timeout(Duration::from_secs(60), waiting)
            .await
            .expect("the cancel woke the waiting session")
            .unwrap();
    }
}
