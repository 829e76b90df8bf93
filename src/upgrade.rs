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
//! goes on serving.
//!
//! After READY the same connection carries the old process's idle pooled sessions to the
//! new one ([`Emigrant`]s: a client's socket and its session's state, one per message), so
//! that its clients keep their connections across the upgrade; what a session is made of is
//! the data path's business, here it is bytes.

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
pub const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

/// Most sockets one hand-over carries (SCM_RIGHTS allows 253 per message).
const MAX_SOCKETS: usize = 200;

/// Listening sockets by name (listener names, and "admin"), as handed over.
pub type Sockets = Vec<(String, OwnedFd)>;

/// A pooled client moving to the new process: its socket and its session's state.
pub type Emigrant = (Vec<u8>, OwnedFd);

/// Largest session state one emigrant carries (its prepared statements, mostly); a session
/// with more stays on the old process.
pub const MAX_EMIGRANT: usize = 16 << 20;

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

    /// Tells the old process that this one serves: it stops accepting and winds down,
    /// sending its idle pooled sessions here; they arrive on the returned channel.
    pub fn ready(self) -> Option<mpsc::UnboundedReceiver<Emigrant>> {
        let mut link = self.link?;
        if let Err(e) = link.write_all(b"READY\n") {
            warn!(error = %e, "cannot tell the old process to stop accepting; it goes on serving beside this one");
            return None;
        }
        let (arrived, arrivals) = mpsc::unbounded_channel();
        // Blocking reads on a thread of their own, for as long as the old process drains.
        std::thread::spawn(move || {
            let _ = link.set_read_timeout(None);
            let mut count = 0u64;
            loop {
                match receive_emigrant(&mut link) {
                    Ok(Some(emigrant)) => {
                        count += 1;
                        if arrived.send(emigrant).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(error = %e, "reading sessions from the old process failed; the rest finish there");
                        break;
                    }
                }
            }
            info!(
                sessions = count,
                "the old process has sent its last session"
            );
        });
        Some(arrivals)
    }
}

/// Sends one session over `link`: the length of its state, the state, and the client's
/// socket attached to the first bytes.
fn send_emigrant(link: &UnixStream, (state, socket): &Emigrant) -> std::io::Result<()> {
    let mut message = Vec::with_capacity(4 + state.len());
    message.extend_from_slice(&(state.len() as u32).to_be_bytes());
    message.extend_from_slice(state);
    let sent = link.send_with_fd(&message, &[socket.as_raw_fd()])?;
    // A long message may go in several writes; the descriptor went with the first.
    (&*link).write_all(&message[sent..])
}

/// Reads one session from `link`; `None` once the old process has closed it.
fn receive_emigrant(link: &mut UnixStream) -> std::io::Result<Option<Emigrant>> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    // The length alone first: a read never takes bytes past the message that carries the
    // descriptor, so that the next message's descriptor is not lost with them.
    let mut length = [0u8; 4];
    let mut fds: [RawFd; 2] = [-1; 2];
    let (n, received) = link.recv_with_fd(&mut length, &mut fds)?;
    let socket: Vec<OwnedFd> = fds[..received]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 && received == 0 {
        return Ok(None);
    }
    let Ok::<[OwnedFd; 1], _>([socket]) = socket.try_into() else {
        return Err(invalid(format!("{received} sockets with one session")));
    };
    std::io::Read::read_exact(link, &mut length[n..])?;
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_EMIGRANT {
        return Err(invalid(format!("a session's state of {length} bytes")));
    }
    let mut state = vec![0u8; length];
    std::io::Read::read_exact(link, &mut state)?;
    Ok(Some((state, socket)))
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
    /// The new process serves: stop accepting, send it the idle pooled sessions on
    /// `emigrants`, and shut down. `sent` resolves once the channel has closed and all it
    /// carried has gone.
    Handed {
        emigrants: mpsc::UnboundedSender<Emigrant>,
        sent: oneshot::Receiver<()>,
    },
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
                    Ok(Ok(Some(link))) => {
                        info!(path = %path.display(), "the new pgvane serves on the handed-over sockets: this one stops accepting, sends it its idle sessions and winds down");
                        let (emigrants, leaving) = mpsc::unbounded_channel();
                        let (done, sent) = oneshot::channel();
                        std::thread::spawn(move || {
                            send_emigrants(&link, leaving);
                            let _ = done.send(());
                        });
                        let _ = requests.send(Request::Handed { emigrants, sent }).await;
                    }
                    Ok(Ok(None)) => {
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

/// Sends the sessions that `leaving` carries over `link` until the channel closes. One that
/// cannot be sent closes its client's connection (the new process went away).
fn send_emigrants(link: &UnixStream, mut leaving: mpsc::UnboundedReceiver<Emigrant>) {
    let (mut sent, mut lost) = (0u64, 0u64);
    while let Some(emigrant) = leaving.blocking_recv() {
        if lost == 0 {
            match send_emigrant(link, &emigrant) {
                Ok(()) => sent += 1,
                Err(e) => {
                    warn!(error = %e, "cannot send a session to the new process; its client is disconnected, and so are those after it");
                    lost += 1;
                }
            }
        } else {
            lost += 1;
        }
    }
    info!(sent, lost, "sessions sent to the new process");
}

/// Sends `sockets` when asked, then waits for READY. Returns the connection if it came.
fn hand_over(stream: UnixStream, sockets: &Sockets) -> std::io::Result<Option<UnixStream>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(EXCHANGE_LIMIT))?;
    let mut lines = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    lines.read_line(&mut line)?;
    if line.trim() != "FDS" {
        return Ok(None);
    }
    let names: Vec<&str> = sockets.iter().map(|(n, _)| n.as_str()).collect();
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let names = serde_json::to_vec(&names).expect("names serialize");
    stream.send_with_fd(&names, &fds)?;
    // The new process starts its checks and pools before it serves: allow it the time.
    stream.set_read_timeout(Some(EXCHANGE_LIMIT * 6))?;
    line.clear();
    lines.read_line(&mut line)?;
    stream.set_read_timeout(None)?;
    Ok((line.trim() == "READY").then_some(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions keep their order, their state and each its own socket, whatever the size
    /// of the state (a large one goes in several writes, only the first carrying the
    /// descriptor).
    #[test]
    fn emigrants_arrive_whole_in_order_each_with_its_socket() {
        let (sender, mut receiver) = UnixStream::pair().unwrap();
        let sizes = [0usize, 10, 300_000, 5, 2 << 20, 1];
        let sockets: Vec<UnixStream> = sizes
            .iter()
            .map(|_| UnixStream::pair().unwrap().0)
            .collect();
        let ids: Vec<u64> = sockets.iter().map(|s| inode(s.as_raw_fd())).collect();
        let sending = {
            let sent: Vec<Emigrant> = sizes
                .iter()
                .zip(&sockets)
                .enumerate()
                .map(|(i, (&n, s))| (vec![i as u8; n], OwnedFd::from(s.try_clone().unwrap())))
                .collect();
            std::thread::spawn(move || {
                for emigrant in &sent {
                    send_emigrant(&sender, emigrant).unwrap();
                }
            })
        };
        for (i, &n) in sizes.iter().enumerate() {
            let (state, socket) = receive_emigrant(&mut receiver).unwrap().expect("a session");
            assert_eq!(state, vec![i as u8; n], "state {i}");
            assert_eq!(inode(socket.as_raw_fd()), ids[i], "socket {i}");
        }
        sending.join().unwrap();
        assert!(receive_emigrant(&mut receiver).unwrap().is_none(), "closed");
    }

    /// A message claiming more state than any session may carry is refused, not allocated.
    #[test]
    fn an_oversized_state_is_refused() {
        let (sender, mut receiver) = UnixStream::pair().unwrap();
        let (socket, _) = UnixStream::pair().unwrap();
        let length = (MAX_EMIGRANT as u32 + 1).to_be_bytes();
        sender.send_with_fd(&length, &[socket.as_raw_fd()]).unwrap();
        let err = receive_emigrant(&mut receiver).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    fn inode(fd: RawFd) -> u64 {
        let path = format!("/proc/self/fd/{fd}");
        std::fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    }
}
