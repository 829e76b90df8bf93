//! Process lifecycle: bind every listener, start the health checks, serve, and drain on a
//! signal.
//!
//! Shutdown (SIGTERM or SIGINT) stops accepting at once, then waits up to
//! `general.shutdown_timeout` for open sessions to end on their own before closing them.
//! A second signal closes them immediately.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::proxy::{self, Route};
use crate::topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener \"{name}\": cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}

/// Runs pgvane until a shutdown signal has been handled.
pub async fn run(config: Config) -> Result<(), StartError> {
    // Bind everything first so a taken port fails start-up before any work begins.
    let mut bound = Vec::new();
    for l in &config.listeners {
        let addr = l.socket_addr();
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                name: l.name.clone(),
                addr,
                source,
            })?;
        bound.push((socket, Arc::new(Route::new(l.clone()))));
    }
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;

    let stop_checks = CancellationToken::new();
    let topology = Topology::new(&config);
    topology.spawn_checks(&config, stop_checks.clone());
    // Routing before the first checks would refuse clients for no reason.
    topology
        .wait_first_checks(config.health.timeout + config.health.interval)
        .await;

    let stop_accepting = CancellationToken::new();
    let kill_sessions = CancellationToken::new();
    let sessions = TaskTracker::new();
    let listeners = TaskTracker::new();
    for ((socket, route), l) in bound.into_iter().zip(&config.listeners) {
        info!(listener = %l.name, addr = %l.socket_addr(), mode = ?l.mode, target = %l.target, "listening");
        listeners.spawn(proxy::serve(
            socket,
            route,
            topology.clone(),
            stop_accepting.clone(),
            sessions.clone(),
            kill_sessions.clone(),
        ));
    }
    listeners.close();

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        _ = sigint.recv() => info!("SIGINT: shutting down"),
    }
    stop_accepting.cancel();
    listeners.wait().await;
    sessions.close();
    let open = sessions.len();
    if open > 0 {
        info!(sessions = open, timeout = ?config.general.shutdown_timeout, "waiting for open sessions to end");
        tokio::select! {
            _ = sessions.wait() => {}
            _ = tokio::time::sleep(config.general.shutdown_timeout) => {
                warn!(sessions = sessions.len(), "shutdown timeout reached; closing sessions");
            }
            _ = sigterm.recv() => warn!("second signal: closing sessions now"),
            _ = sigint.recv() => warn!("second signal: closing sessions now"),
        }
    }
    kill_sessions.cancel();
    sessions.wait().await;
    stop_checks.cancel();
    info!("stopped");
    Ok(())
}
