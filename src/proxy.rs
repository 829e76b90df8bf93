//! The passthrough data path: accept, route, pump bytes.
//!
//! For each client: read the current routing table, pick a backend for the listener's
//! target, connect, then copy bytes both ways without looking at them. A session ends when
//! either side closes, when its backend stops serving the listener's target (if the listener
//! says `on_role_loss = "shutdown-sessions"`), or when pgvane is told to stop.
//! When there is no backend to go to, the client gets a PostgreSQL FATAL error, never a reset.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{copy_bidirectional, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Balance, ListenerConfig, OnRoleLoss};
use crate::error::ClientError;
use crate::protocol::{read_startup, StartupPacket, PROTOCOL_MAJOR_3};
use crate::topology::{RoutingTable, Topology};

/// A listener's routing policy plus its round-robin cursor.
pub struct Route {
    config: ListenerConfig,
    cursor: AtomicUsize,
}

impl Route {
    pub fn new(config: ListenerConfig) -> Self {
        Self {
            config,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Backends to try for one client, in order: the balancing choice first, then the other
    /// candidates as fallbacks if connecting fails.
    fn attempt_order(&self, table: &RoutingTable) -> Vec<usize> {
        let c = &self.config;
        let mut order = table.candidates(c.target, c.fallback_to_primary).to_vec();
        if order.is_empty() {
            return order;
        }
        // Rotating first also spreads ties evenly under least-connections.
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % order.len();
        order.rotate_left(start);
        if c.balance == Balance::LeastConn {
            order.sort_by_key(|&i| table.backends[i].backend.active_sessions());
        }
        order
    }
}

/// Accepts clients until `stop_accepting` fires. Sessions run on `sessions` and end early
/// when `kill_sessions` fires.
pub async fn serve(
    listener: TcpListener,
    route: Arc<Route>,
    topology: Arc<Topology>,
    stop_accepting: CancellationToken,
    sessions: TaskTracker,
    kill_sessions: CancellationToken,
) {
    let name = route.config.name.clone();
    loop {
        let (client, peer) = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = client.set_nodelay(true);
        let span = tracing::info_span!("session", listener = %name, client = %peer);
        sessions.spawn(
            handle_client(
                client,
                route.clone(),
                topology.clone(),
                kill_sessions.clone(),
            )
            .instrument(span),
        );
    }
}

async fn handle_client(
    mut client: TcpStream,
    route: Arc<Route>,
    topology: Arc<Topology>,
    kill: CancellationToken,
) {
    let cfg = &route.config;
    let table = topology.snapshot();
    let order = route.attempt_order(&table);
    if order.is_empty() {
        debug!(target_role = %cfg.target, "no backend for target");
        let err = ClientError::NoBackend {
            listener: cfg.name.clone(),
            target: cfg.target,
        };
        return refuse(client, err, cfg).await;
    }

    let mut last_error = None;
    for i in order {
        let view = &table.backends[i];
        let backend = view.backend.clone();
        let connect = TcpStream::connect((backend.host.as_str(), backend.port));
        let result = match tokio::time::timeout(cfg.connect_timeout, connect).await {
            Ok(Ok(server)) => Ok(server),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {:?}", cfg.connect_timeout)),
        };
        match result {
            Ok(mut server) => {
                let _ = server.set_nodelay(true);
                let _active = backend.track_session();
                let lost = view.lost.clone();
                drop(table);
                debug!(backend = %backend.name, "session opened");
                let cut_on_loss = cfg.on_role_loss == OnRoleLoss::ShutdownSessions;
                tokio::select! {
                    r = copy_bidirectional(&mut client, &mut server) => match r {
                        Ok((up, down)) => debug!(backend = %backend.name, bytes_to_server = up, bytes_to_client = down, "session closed"),
                        Err(e) => debug!(backend = %backend.name, error = %e, "session ended"),
                    },
                    _ = until_role_lost(&topology, &route, i, lost), if cut_on_loss => {
                        info!(backend = %backend.name, target_role = %cfg.target, "backend no longer serves this listener's target; session shut down");
                    }
                    _ = kill.cancelled() => {
                        info!(backend = %backend.name, "session closed by shutdown");
                    }
                }
                return;
            }
            Err(reason) => {
                warn!(backend = %backend.name, error = %reason, "connect to backend failed");
                last_error = Some(ClientError::BackendUnreachable {
                    backend: backend.name.clone(),
                    addr: backend.addr(),
                    reason,
                });
            }
        }
    }
    if let Some(err) = last_error {
        refuse(client, err, cfg).await;
    }
}

/// Resolves when backend `i` no longer qualifies for the route's target. A role change
/// that keeps it qualified (e.g. a replica listener's fallback primary) re-arms the wait.
async fn until_role_lost(
    topology: &Topology,
    route: &Route,
    i: usize,
    mut lost: CancellationToken,
) {
    let c = &route.config;
    loop {
        lost.cancelled().await;
        let table = topology.snapshot();
        if !table.qualifies(i, c.target, c.fallback_to_primary) {
            return;
        }
        lost = table.backends[i].lost.clone();
    }
}

/// Answers like a PostgreSQL server that cannot take the connection: decline SSL/GSS
/// encryption, read the StartupMessage, send a FATAL ErrorResponse and close.
async fn refuse(mut client: TcpStream, err: ClientError, cfg: &ListenerConfig) {
    // A client may ask for SSL and then GSS (or the reverse) before its StartupMessage.
    const MAX_NEGOTIATIONS: usize = 2;
    let answer = tokio::time::timeout(cfg.client_login_timeout, async {
        for _ in 0..=MAX_NEGOTIATIONS {
            match read_startup(&mut client).await? {
                StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                    client.write_all(b"N").await?;
                }
                // Nothing of ours to cancel: PostgreSQL closes silently too.
                StartupPacket::CancelRequest { .. } => return Ok(None),
                StartupPacket::Startup { major, minor, .. } if major != PROTOCOL_MAJOR_3 => {
                    return Ok(Some(ClientError::UnsupportedProtocol { major, minor }));
                }
                StartupPacket::Startup { .. } => return Ok(Some(err)),
            }
        }
        Err(crate::protocol::ProtocolError::Malformed(
            "too many encryption requests",
        ))
    })
    .await;
    match answer {
        Ok(Ok(Some(err))) => {
            info!(error = %err, "client refused");
            let mut buf = BytesMut::new();
            err.to_response().encode(&mut buf);
            let _ = client.write_all(&buf).await;
            let _ = client.shutdown().await;
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => debug!(error = %e, "bad startup from refused client"),
        Err(_) => debug!("refused client sent no startup packet in time"),
    }
}
