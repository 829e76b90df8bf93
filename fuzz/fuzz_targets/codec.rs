//! What pgvane reads from a client before and after login, fed arbitrary bytes: the
//! startup packet, the first packet a passthrough listener reads, client authentication
//! (SCRAM), message framing cut at an arbitrary point, and the tracker's untracked scan.
//! The bar: no panic, no hang, no unbounded allocation.
//!
//!   cargo +nightly fuzz run codec

#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use pgvane::auth::{authenticate_client, UserStore};
use pgvane::config::Config;
use pgvane::protocol::{read_first_packet, read_startup, Scanner};
use pgvane::proxy::prepared::untracked;

/// A store with one SCRAM user, made once (its verifier costs a PBKDF2).
fn users() -> &'static UserStore {
    static USERS: OnceLock<UserStore> = OnceLock::new();
    USERS.get_or_init(|| {
        let text = "[auth]\ntype = \"scram-sha-256\"\n[[user]]\nname = \"u\"\npassword = \"p\"\n\
                    [[backend]]\nname = \"b\"\nhost = \"h\"\nport = 1\n\
                    [[listener]]\nname = \"l\"\naddress = \"127.0.0.1\"\nport = 1\n\
                    target = \"any\"\nmode = \"transaction\"\n";
        UserStore::load(&Config::parse(text).expect("valid config")).expect("users")
    })
}

fuzz_target!(|data: &[u8]| {
    // Reads from a byte slice never wait: each future completes on its first poll.
    let _ = read_startup(&mut &data[..]).now_or_never();
    let mut first = BytesMut::new();
    let _ = read_first_packet(&mut &data[..], &mut first).now_or_never();

    let mut stream = tokio::io::join(&data[..], tokio::io::sink());
    let mut reply = BytesMut::new();
    let known = users().get("u");
    let authenticated =
        authenticate_client(&mut stream, users(), "u", known.as_deref(), None, &mut reply);
    let _ = authenticated.now_or_never();

    let cut = data.first().map_or(0, |&c| c as usize).min(data.len());
    let mut scanner = Scanner::limited(b"ZSC", 1 << 20);
    let fed = scanner.feed(&data[..cut], |_| {});
    if fed.is_ok() {
        let _ = scanner.feed(&data[cut..], |_| {});
    }
    let _ = untracked(data, 0);
});
