//! A TCP relay in front of a real server that breaks connections on cue: a network fault
//! injector (the database behind it stays real). pgvane is pointed at the relay, so that a
//! test can make a server connection die at a chosen moment, as at a crash.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::Backends;

#[derive(Default)]
struct Faults {
    /// The next connection whose client sends these bytes is reset instead.
    reset_on: Mutex<Option<Vec<u8>>>,
    /// While set, new connections are closed at once (the server seems down).
    refuse: AtomicBool,
    resets: AtomicUsize,
}

pub struct Relay {
    pub port: u16,
    faults: Arc<Faults>,
    stop: CancellationToken,
}

impl Relay {
    /// Relays 127.0.0.1:`port` (from the kernel) to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let stop = CancellationToken::new();
        let (f, s) = (faults.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                if f.refuse.load(Ordering::SeqCst) {
                    reset(&client);
                    continue;
                }
                tokio::spawn(relay(client, target, f.clone(), s.child_token()));
            }
        });
        Relay { port, faults, stop }
    }

    /// Resets both sides of the next connection whose client sends `pattern` (in one read),
    /// before the bytes reach the server.
    pub fn reset_next_sending(&self, pattern: &[u8]) {
        *self.faults.reset_on.lock().unwrap() = Some(pattern.to_vec());
    }

    /// While `on`, new connections are reset at once: the server seems down.
    pub fn refuse(&self, on: bool) {
        self.faults.refuse.store(on, Ordering::SeqCst);
    }

    /// Connections reset by [`Relay::reset_next_sending`] so far.
    pub fn resets(&self) -> usize {
        self.faults.resets.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Backends for Relay {
    fn backends_toml(&self) -> String {
        format!(
            "\n[[backend]]\nname = \"relayed\"\nhost = \"127.0.0.1\"\nport = {}\n",
            self.port
        )
    }
}

/// Closes with a RST, as a crashed host's kernel answers.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

async fn relay(client: TcpStream, target: u16, faults: Arc<Faults>, stop: CancellationToken) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
        reset(&client);
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let hit = {
                let mut armed = faults.reset_on.lock().unwrap();
                let hit = armed
                    .as_deref()
                    .is_some_and(|p| chunk.windows(p.len()).any(|w| w == p));
                if hit {
                    *armed = None;
                }
                hit
            };
            if hit {
                faults.resets.fetch_add(1, Ordering::SeqCst);
                reset(from_client.as_ref());
                reset(to_server.as_ref());
                return;
            }
            if to_server.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let downstream = tokio::io::copy(&mut from_server, &mut to_client);
    // Either direction ending ends both: the halves are dropped, and the sockets closed.
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
        _ = stop.cancelled() => {}
    }
}
