//! Passthrough sessions: pick a backend, connect, copy bytes both ways without looking at
//! them. A session ends when either side closes, when its backend stops serving the
//! listener's target (with `on_role_loss = "shutdown-sessions"`), or at shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{copy_bidirectional, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::{refuse, watching, Attempt, Chosen, Route, Shared};
use crate::config::OnRoleLoss;
use crate::error::ClientError;
use crate::protocol::read_first_packet;
use crate::topology::Backend;

pub async fn handle(mut client: TcpStream, peer: SocketAddr, route: &Route, shared: &Shared) {
    let cfg = &route.config;
    // No server connection for a client that sends nothing: its first packet must arrive
    // whole within client_login_timeout (PostgreSQL would keep a backend process for it
    // until its own authentication_timeout).
    let mut early = BytesMut::new();
    let limit = shared.client_login_timeout();
    let first = tokio::time::timeout(limit, read_first_packet(&mut client, &mut early));
    match first.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return debug!(error = %e, "no valid first packet; closed"),
        Err(_) => {
            let refusals = &shared.metrics.refusals;
            refusals
                .with_label_values(&["client_login_timeout", "no"])
                .inc();
            return debug!("no first packet within client_login_timeout; closed");
        }
    }
    shared.wait_resumed(None).await;
    // Nothing has been read from the client yet, so a failed connect can be retried on
    // another backend, or after the routing table changes.
    let connect = |backend: &Arc<Backend>| {
        let backend = backend.clone();
        async move {
            let addr = (backend.host.as_str(), backend.port);
            match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(server)) => Ok(server),
                failed => Err(Attempt::Unreachable(ClientError::BackendUnreachable {
                    backend: backend.name.clone(),
                    addr: backend.addr(),
                    reason: match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("timed out after {:?}", cfg.connect_timeout),
                    },
                })),
            }
        }
    };
    // While held, the client is watched: one that hangs up is not connected for (what it
    // sends meanwhile joins its first packet).
    let chosen = route
        .with_backend(shared, connect, watching(&client, &mut early))
        .await;
    let Chosen {
        index,
        table,
        value: mut server,
    } = match chosen {
        Ok(c) => c,
        Err(ClientError::Abandoned) => return debug!("client left while held"),
        Err(e) => {
            let timeout = shared.client_login_timeout();
            return refuse(client, early, peer, e, timeout, shared).await;
        }
    };
    // Its first packet, and what it sent while held, go first.
    if server.write_all(&early).await.is_err() {
        return;
    }
    let (backend, lost) = (&table.backends[index].backend, &table.backends[index].lost);
    let _ = server.set_nodelay(true);
    let _active = backend.track_session();
    debug!(backend = %backend.name, "session opened");
    let cut_on_loss = cfg.on_role_loss == OnRoleLoss::ShutdownSessions;
    tokio::select! {
        r = copy_bidirectional(&mut client, &mut server) => match r {
            Ok((up, down)) => debug!(backend = %backend.name, bytes_to_server = up, bytes_to_client = down, "session closed"),
            Err(e) => debug!(backend = %backend.name, error = %e, "session ended"),
        },
        _ = route.until_role_lost(&shared.topology, index, lost.clone()), if cut_on_loss => {
            info!(client = %peer, listener = %cfg.name, backend = %backend.name, target_role = %cfg.target, "backend no longer serves this listener's target; session shut down");
        }
    }
}
