//! Registry: the open pooled client sessions and server connections, for SHOW CLIENTS and
//! SHOW SERVERS.
//!
//! Each session and server connection holds an [`Entry`]; the registry keeps weak
//! references, pruned as they die, so it holds no more than what is open (plus what died
//! since the last prune). The data path writes an entry's state with relaxed stores, a few
//! per transaction, on the entry's own cache line.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst,
};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atomic_waker::AtomicWaker;

use crate::stats::now_us;

/// What SHOW CLIENTS and SHOW SERVERS say of a session or a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Idle = 0,
    Active = 1,
    /// A client waiting for a server connection.
    Waiting = 2,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Active => "active",
            State::Waiting => "waiting",
        }
    }
}

/// A socket address in 16 bytes, not `SocketAddr`'s 32: IPv6 ones, the rarer, boxed.
#[derive(Debug)]
enum CompactAddr {
    V4(SocketAddrV4),
    V6(Box<SocketAddrV6>),
}

impl From<SocketAddr> for CompactAddr {
    fn from(a: SocketAddr) -> Self {
        match a {
            SocketAddr::V4(a) => CompactAddr::V4(a),
            SocketAddr::V6(a) => CompactAddr::V6(Box::new(a)),
        }
    }
}

impl CompactAddr {
    fn get(&self) -> SocketAddr {
        match self {
            CompactAddr::V4(a) => SocketAddr::V4(*a),
            CompactAddr::V6(a) => SocketAddr::V6(**a),
        }
    }
}

/// One session or server connection. Every idle client holds one: its size is kept in
/// mimalloc's 192-byte class (`an_entry_fits_the_allocators_192_byte_class`).
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    /// Shared with the pool's key: an idle client's entry holds no strings of its own but
    /// `texts`.
    pub user: Arc<str>,
    pub database: Arc<str>,
    addr: CompactAddr,
    local_addr: CompactAddr,
    /// Microseconds since the Unix epoch.
    connect_time_us: u64,
    /// application_name, then (clients over TLS) protocol and cipher suite, as SHOW
    /// CLIENTS' tls column, which starts at `tls_from`: one allocation, and none for a
    /// client with neither.
    texts: Box<str>,
    tls_from: u32,
    /// Servers: the backend process id (from the cancel key).
    pub remote_pid: u32,
    /// Servers: set when their pool is replaced (reload, RECONNECT): closed at release.
    close_needed: Option<Arc<AtomicBool>>,
    state: AtomicU8,
    /// `now_us` of the current request's start (clients) or lease (servers).
    since_us: AtomicU64,
    /// The id of the entry on the other side of the link; 0 for none.
    link: AtomicU64,
    /// Named prepared statements: a client's, or prepared on a server connection.
    prepared: AtomicU32,
    /// Clients: their socket while the session holds it open, for KILL; `NO_SOCKET` when
    /// none (a plain descriptor, not an `Option`: 4 bytes less).
    socket: Mutex<RawFd>,
    /// Clients: ended by KILL or KILL_CLIENT.
    killed: AtomicBool,
    /// Clients: asked to move to an upgrade's new process; the session's idle wait, woken
    /// then (registered only where an upgrade socket is configured).
    leave: AtomicBool,
    idle: AtomicWaker,
}

impl Entry {
    pub fn set(&self, state: State, link: u64) {
        self.state.store(state as u8, Relaxed);
        self.link.store(link, Relaxed);
    }

    /// A client's request starts (`at`: `now_us`); it waits for a server first.
    pub fn request(&self, at: u64) {
        self.since_us.store(at, Relaxed);
        self.set(State::Waiting, 0);
    }

    /// KILL: the client's socket is shut for reading, which the session sees as the client
    /// leaving, whether idle, waiting or linked (what it has open on a server is rolled back
    /// with the server connection); it then tells the client why. Returns whether the
    /// session was still open.
    pub fn kill(&self) -> bool {
        self.killed.store(true, Relaxed);
        let socket = self.socket.lock().expect("entry lock");
        match *socket {
            NO_SOCKET => false,
            fd => {
                // SAFETY: the session clears `socket` (under this lock) before it closes the
                // descriptor, so `fd` is still the client's socket here.
                unsafe { libc::shutdown(fd, libc::SHUT_RD) };
                true
            }
        }
    }

    /// Whether the session is asked to move to an upgrade's new process; if not yet,
    /// `waker` is woken when it is.
    pub fn asked_to_leave(&self, waker: &Waker) -> bool {
        // Registered before the flag is read, which `ask_to_leave` sets before it wakes: a
        // session either sees the flag or is woken.
        self.idle.register(waker);
        self.leave.load(SeqCst)
    }

    /// Asks an idle session to move to an upgrade's new process (a busy one moves once its
    /// request is served).
    pub fn ask_to_leave(&self) {
        self.leave.store(true, SeqCst);
        self.idle.wake();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Relaxed)
    }

    /// The session is about to close its socket: KILL must no longer touch it.
    pub fn detach(&self) {
        *self.socket.lock().expect("entry lock") = NO_SOCKET;
    }

    /// The peer's address: the client's, or the server's.
    pub fn addr(&self) -> SocketAddr {
        self.addr.get()
    }

    /// pgvane's end of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr.get()
    }

    pub fn application_name(&self) -> &str {
        &self.texts[..self.tls_from as usize]
    }

    /// Clients over TLS: protocol and cipher suite; empty for others.
    pub fn tls(&self) -> &str {
        &self.texts[self.tls_from as usize..]
    }

    pub fn connect_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.connect_time_us)
    }

    pub fn close_needed(&self) -> bool {
        self.close_needed.as_ref().is_some_and(|c| c.load(Relaxed))
    }

    pub fn set_prepared(&self, n: usize) {
        self.prepared
            .store(n.min(u32::MAX as usize) as u32, Relaxed);
    }

    pub fn prepared(&self) -> u32 {
        self.prepared.load(Relaxed)
    }

    pub fn state(&self) -> State {
        match self.state.load(Relaxed) {
            1 => State::Active,
            2 => State::Waiting,
            _ => State::Idle,
        }
    }

    pub fn link(&self) -> u64 {
        self.link.load(Relaxed)
    }

    /// When the current request (or lease) started, as a wall-clock time.
    pub fn request_time(&self) -> Option<SystemTime> {
        let at = self.since_us.load(Relaxed);
        (at != 0).then(|| {
            let ago = now_us().saturating_sub(at);
            SystemTime::now() - Duration::from_micros(ago)
        })
    }

    /// How long a waiting client has waited.
    pub fn waited(&self) -> Duration {
        match self.state() {
            State::Waiting => {
                Duration::from_micros(now_us().saturating_sub(self.since_us.load(Relaxed)))
            }
            _ => Duration::ZERO,
        }
    }
}

/// `Entry::socket` holding none.
const NO_SOCKET: RawFd = -1;

/// What an entry is made of.
pub struct NewEntry {
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub addr: SocketAddr,
    pub local_addr: SocketAddr,
    pub application_name: Box<str>,
    pub remote_pid: u32,
    pub tls: Box<str>,
    /// Servers: their pool's "replaced" flag.
    pub close_needed: Option<Arc<AtomicBool>>,
    /// Clients: their socket, for KILL (see [`Entry::detach`]).
    pub socket: Option<RawFd>,
}

/// Open entries of one kind.
#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    open: Mutex<Vec<Weak<Entry>>>,
}

impl Registry {
    /// Registers a new entry; it leaves the registry when its last holder drops it.
    pub fn add(&self, e: NewEntry) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Relaxed) + 1,
            user: e.user,
            database: e.database,
            addr: e.addr.into(),
            local_addr: e.local_addr.into(),
            connect_time_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            tls_from: e.application_name.len() as u32,
            texts: match e.tls.is_empty() {
                true => e.application_name,
                false => [&*e.application_name, &*e.tls].concat().into(),
            },
            remote_pid: e.remote_pid,
            close_needed: e.close_needed,
            state: AtomicU8::new(State::Idle as u8),
            since_us: AtomicU64::new(0),
            link: AtomicU64::new(0),
            prepared: AtomicU32::new(0),
            socket: Mutex::new(e.socket.unwrap_or(NO_SOCKET)),
            killed: AtomicBool::new(false),
            leave: AtomicBool::new(false),
            idle: AtomicWaker::new(),
        });
        let mut open = self.open.lock().expect("registry lock");
        // Pruned when it has doubled since the last prune: amortized, and bounded by twice
        // what is open.
        if open.len() >= 64 && open.len().is_power_of_two() {
            open.retain(|w| w.strong_count() > 0);
        }
        open.push(Arc::downgrade(&entry));
        entry
    }

    /// The open entries, oldest first.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        let mut open = self.open.lock().expect("registry lock");
        open.retain(|w| w.strong_count() > 0);
        open.iter().filter_map(Weak::upgrade).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new() -> NewEntry {
        NewEntry {
            user: "u".into(),
            database: "d".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            local_addr: "127.0.0.1:2".parse().unwrap(),
            application_name: Box::default(),
            remote_pid: 0,
            tls: Box::default(),
            close_needed: None,
            socket: None,
        }
    }

    #[test]
    fn an_entry_fits_the_allocators_192_byte_class() {
        // With the Arc's two counts; mimalloc's classes here are 192, 224, 256.
        let size = std::mem::size_of::<Entry>() + 16;
        assert!(size <= 192, "a client's registry entry takes {size} bytes");
    }

    #[test]
    fn an_entry_gives_back_what_it_was_made_of() {
        let r = Registry::default();
        let plain = r.add(new());
        assert_eq!((plain.application_name(), plain.tls()), ("", ""));
        assert!(!plain.kill(), "no socket to shut");
        let e = r.add(NewEntry {
            addr: "[2001:db8::1]:5433".parse().unwrap(),
            application_name: "psql".into(),
            tls: "TLSv1.3/TLS13_AES_256_GCM_SHA384".into(),
            ..new()
        });
        assert_eq!(e.application_name(), "psql");
        assert_eq!(e.tls(), "TLSv1.3/TLS13_AES_256_GCM_SHA384");
        assert_eq!(e.addr(), "[2001:db8::1]:5433".parse().unwrap());
        assert_eq!(e.local_addr(), "127.0.0.1:2".parse().unwrap());
        let age = SystemTime::now().duration_since(e.connect_time()).unwrap();
        assert!(
            age < Duration::from_secs(3600),
            "connect_time is now, not {age:?} ago"
        );
        let tls_only = r.add(NewEntry {
            tls: "TLSv1.2/x".into(),
            ..new()
        });
        assert_eq!(
            (tls_only.application_name(), tls_only.tls()),
            ("", "TLSv1.2/x")
        );
    }

    #[test]
    fn entries_leave_when_dropped_and_the_list_stays_bounded() {
        let r = Registry::default();
        let kept = r.add(new());
        for _ in 0..10_000 {
            drop(r.add(new()));
        }
        assert_eq!(r.entries().len(), 1);
        assert!(r.open.lock().unwrap().len() <= 2);
        kept.request(now_us());
        assert_eq!(kept.state(), State::Waiting);
        kept.set(State::Active, 7);
        assert_eq!((kept.state(), kept.link()), (State::Active, 7));
    }
}
