//! Upgrade: a new pgvane process takes over the listening sockets of the running one, so a
//! binary upgrade refuses no connection (HAProxy's `-x`, pingora's fd transfer).
//!
//! With `general.upgrade_socket` set, a running pgvane offers its listening sockets on that
//! Unix socket. A new process started with the same setting connects there first and asks
//! for them (`FDS`); they come over SCM_RIGHTS with their names. Both processes then accept
//! on the same sockets until the new one has started every listener and says `READY`: the
//! old one then stops accepting (nothing queued is lost: the sockets stay open in the new
//! process) and shuts down as on SIGTERM, letting its sessions finish within
//! `shutdown_timeout`. A new process that dies before READY changes nothing: the old one
//! goes on serving. Sessions are not moved between processes: idle pooled clients of the
//! old process stay there until they leave or `shutdown_timeout` passes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How long either side waits for the other during a hand-over.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

/// Most sockets one hand-over carries (SCM_RIGHTS allows 253 per message).
const MAX_SOCKETS: usize = 200;

/// Listening sockets by name (listener names, and "admin"), as handed over.
pub type Sockets = Vec<(String, OwnedFd)>;

/// What a new process received from the running one, and the connection over which it
/// will say READY.
pub struct Inherited {
    pub sockets: HashMap<String, std::net::TcpListener>,
    link: Option<UnixStream>,
}

impl Inherited {
    pub fn none() -> Self {
        Self {
            sockets: HashMap::new(),
            link: None,
        }
    }

    /// Takes the inherited socket `name` if it is bound to `addr`.
    pub fn take(
        &mut self,
        name: &str,
        addr: std::net::SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let bound_here = |s: &std::net::TcpListener| s.local_addr().ok() == Some(addr);
        let socket = self.sockets.remove(name)?;
        bound_here(&socket).then_some(socket)
    }

    /// Tells the old process that this one serves: it stops accepting and winds down.
    pub fn ready(self) {
        let Some(mut link) = self.link else { return };
        if let Err(e) = link.write_all(b"READY\n") {
            warn!(error = %e, "cannot tell the old process to stop accepting; it goes on serving beside this one");
        }
    }
}

/// Asks a running pgvane at `path` for its listening sockets. Nothing listens there: a
/// plain start.
pub fn take_over(path: &Path) -> std::io::Result<Inherited> {
    let mut link = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Inherited::none());
        }
        Err(e) => return Err(e),
    };
    link.set_read_timeout(Some(EXCHANGE_LIMIT))?;
    link.write_all(b"FDS\n")?;
    let mut names = vec![0u8; 64 * 1024];
    let mut fds: Vec<RawFd> = vec![-1; MAX_SOCKETS];
    let (n, received) = link.recv_with_fd(&mut names, &mut fds)?;
    // Owned at once, so that every received descriptor is closed on any error below.
    let owned: Vec<OwnedFd> = fds[..received]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let names: Vec<String> = serde_json::from_slice(&names[..n])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if names.len() != owned.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} names for {} sockets", names.len(), owned.len()),
        ));
    }
    let sockets = names
        .into_iter()
        .zip(owned)
        .map(|(name, fd)| (name, std::net::TcpListener::from(fd)))
        .collect::<HashMap<_, _>>();
    info!(sockets = sockets.len(), path = %path.display(), "listening sockets taken over from the running pgvane");
    Ok(Inherited {
        sockets,
        link: Some(link),
    })
}

/// A hand-over the process's main loop performs: the sockets, then whether to wind down.
pub enum Request {
    /// Duplicates of the listening sockets in force.
    Sockets(oneshot::Sender<Sockets>),
    /// The new process serves: stop accepting and shut down.
    Handed,
}

/// Offers this process's listening sockets at `path` until the process ends. The main loop
/// answers `requests`.
pub fn offer(path: &Path, requests: mpsc::Sender<Request>) -> std::io::Result<()> {
    // A socket file left by an earlier process (or by the one handing over to this one).
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    // Whoever gets the sockets gets the clients: only this process's user may ask.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let path = path.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            if !same_user(&stream) {
                warn!("upgrade socket: a process of another user asked for the listening sockets; refused");
                continue;
            }
            let requests = requests.clone();
            // Blocking I/O on its own thread: a hand-over happens once per upgrade.
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            let path = path.clone();
            tokio::spawn(async move {
                let (tx, rx) = oneshot::channel();
                if requests.send(Request::Sockets(tx)).await.is_err() {
                    return;
                }
                let Ok(sockets) = rx.await else { return };
                let handed = tokio::task::spawn_blocking(move || hand_over(stream, &sockets)).await;
                match handed {
                    Ok(Ok(true)) => {
                        info!(path = %path.display(), "the new pgvane serves on the handed-over sockets: this one stops accepting and winds down");
                        let _ = requests.send(Request::Handed).await;
                    }
                    Ok(Ok(false)) => {
                        warn!("the new pgvane went away before it served; this one goes on serving")
                    }
                    Ok(Err(e)) => {
                        warn!(error = %e, "socket hand-over failed; this one goes on serving")
                    }
                    Err(_) => {}
                }
            });
        }
    });
    Ok(())
}

/// Whether the peer runs as this process's user (or root).
fn same_user(stream: &tokio::net::UnixStream) -> bool {
    let own = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    let peer = stream.peer_cred().map(|c| c.uid());
    matches!((peer, own), (Ok(p), Ok(o)) if p == o || p == 0)
}

/// Sends `sockets` when asked, then waits for READY. Returns whether it came.
fn hand_over(stream: UnixStream, sockets: &Sockets) -> std::io::Result<bool> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(EXCHANGE_LIMIT))?;
    let mut lines = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    lines.read_line(&mut line)?;
    if line.trim() != "FDS" {
        return Ok(false);
    }
    let names: Vec<&str> = sockets.iter().map(|(n, _)| n.as_str()).collect();
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let names = serde_json::to_vec(&names).expect("names serialize");
    stream.send_with_fd(&names, &fds)?;
    // The new process starts its checks and pools before it serves: allow it the time.
    stream.set_read_timeout(Some(EXCHANGE_LIMIT * 6))?;
    line.clear();
    lines.read_line(&mut line)?;
    Ok(line.trim() == "READY")
}
