//! Passthrough sessions: pick a backend, connect, copy bytes both ways without looking at
//! them. A session ends when either side closes, when its backend stops serving the
//! listener's target (with `on_role_loss = "shutdown-sessions"`), or at shutdown.

use std::net::SocketAddr;

use tokio::io::copy_bidirectional;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{refuse, Route, Shared};
use crate::config::OnRoleLoss;
use crate::error::ClientError;

pub async fn handle(mut client: TcpStream, peer: SocketAddr, route: &Route, shared: &Shared) {
    let cfg = &route.config;
    let table = shared.topology.snapshot();
    let order = route.attempt_order(&table);
    if order.is_empty() {
        debug!(target_role = %cfg.target, "no backend for target");
        return refuse(
            client,
            peer,
            route.no_backend(),
            shared.client_login_timeout,
        )
        .await;
    }

    let mut last_error = None;
    for i in order {
        let view = &table.backends[i];
        let backend = view.backend.clone();
        let connect = TcpStream::connect((backend.host.as_str(), backend.port));
        let mut server = match tokio::time::timeout(cfg.connect_timeout, connect).await {
            Ok(Ok(server)) => server,
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("timed out after {:?}", cfg.connect_timeout),
                };
                warn!(client = %peer, backend = %backend.name, error = %reason, "connect to backend failed");
                last_error = Some(ClientError::BackendUnreachable {
                    backend: backend.name.clone(),
                    addr: backend.addr(),
                    reason,
                });
                continue;
            }
        };
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
            _ = route.until_role_lost(&shared.topology, i, lost), if cut_on_loss => {
                info!(client = %peer, listener = %cfg.name, backend = %backend.name, target_role = %cfg.target, "backend no longer serves this listener's target; session shut down");
            }
            _ = shared.kill_sessions.cancelled() => {
                info!(client = %peer, backend = %backend.name, "session closed by shutdown");
            }
        }
        return;
    }
    if let Some(err) = last_error {
        refuse(client, peer, err, shared.client_login_timeout).await;
    }
}
