//! TLS toward clients: the certificates and keys each pooled listener serves, loaded into
//! rustls (no OpenSSL), and the negotiation PostgreSQL clients start with, an SSLRequest or
//! (PostgreSQL 17's `sslnegotiation=direct`) a TLS handshake straight away.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, SupportedCipherSuite};
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{ClientSslMode, Config, Problem, TlsConfig};

/// PostgreSQL's ALPN protocol name, which direct TLS requires.
const ALPN: &[u8] = b"postgresql";

/// An SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// A GSSENCRequest: length 8, code 80877104.
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
/// The first byte of a TLS handshake record: a direct TLS connection.
const TLS_HANDSHAKE: u8 = 0x16;

/// One listener's TLS: its mode and what serves its handshakes.
pub struct ListenerTls {
    pub mode: ClientSslMode,
    acceptor: TlsAcceptor,
    /// Each certificate file served and when its first certificate (the listener's own)
    /// expires, as a Unix time: `pgvane_tls_certificate_expiry_seconds`.
    pub expiry: Vec<(PathBuf, i64)>,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("mode", &self.mode)
            .finish()
    }
}

/// Listeners' TLS, by listener name.
pub type TlsByListener = HashMap<String, Arc<ListenerTls>>;

/// The TLS of every pooled listener with a mode other than `disable`, by listener name.
/// Loaded by `pgvane check`, at start and at each reload, so all refuse the same mistakes.
pub fn load(config: &Config) -> Result<TlsByListener, Problem> {
    let mut out = HashMap::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let tls = l.tls.over(&config.tls);
        if tls.mode() == ClientSslMode::Disable || !l.mode.is_pooled() {
            continue;
        }
        // The key named is where the value came from (or would go).
        let key = |k: &str| match is_set(&l.tls, k) || !is_set(&config.tls, k) {
            true => format!("listener[{i}].tls.{k}"),
            false => format!("tls.{k}"),
        };
        let listener = listener_tls(&tls).map_err(|(k, message)| Problem {
            key: key(k),
            message,
        })?;
        out.insert(l.name.clone(), Arc::new(listener));
    }
    Ok(out)
}

/// Whether `[tls]` itself sets key `k`.
fn is_set(tls: &TlsConfig, k: &str) -> bool {
    match k {
        "client_tls_cert_file" => tls.client_tls_cert_file.is_some(),
        "client_tls_key_file" => tls.client_tls_key_file.is_some(),
        "client_tls_ca_file" => tls.client_tls_ca_file.is_some(),
        "client_tls_protocols" => tls.client_tls_protocols.is_some(),
        "client_tls_ciphers" => tls.client_tls_ciphers.is_some(),
        _ => tls.client_tls_sslmode.is_some(),
    }
}

type Failure = (&'static str, String);

fn listener_tls(tls: &TlsConfig) -> Result<ListenerTls, Failure> {
    let mode = tls.mode();
    let cert_file = tls.client_tls_cert_file.as_deref().ok_or((
        "client_tls_cert_file",
        "client_tls_sslmode other than \"disable\" needs a certificate (PEM)".to_owned(),
    ))?;
    let key_file = tls.client_tls_key_file.as_deref().ok_or((
        "client_tls_key_file",
        "client_tls_sslmode other than \"disable\" needs the certificate's key (PEM)".to_owned(),
    ))?;
    let chain = certificates(cert_file).map_err(|e| ("client_tls_cert_file", e))?;
    let not_after = not_after(&chain[0]).map_err(|e| {
        (
            "client_tls_cert_file",
            format!("{}: {e}", cert_file.display()),
        )
    })?;
    let now = unix_now();
    if not_after <= now {
        return Err((
            "client_tls_cert_file",
            format!(
                "{}: the certificate expired {} ago; renew it",
                cert_file.display(),
                humantime::format_duration(std::time::Duration::from_secs(
                    (now - not_after) as u64
                ))
            ),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        (
            "client_tls_key_file",
            format!("{}: {e}", key_file.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: cipher_suites(tls.client_tls_ciphers.as_deref())
            .map_err(|e| ("client_tls_ciphers", e))?,
        ..rustls::crypto::ring::default_provider()
    });
    let versions =
        protocols(tls.client_tls_protocols.as_deref()).map_err(|e| ("client_tls_protocols", e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| {
            (
                "client_tls_ciphers",
                format!("no cipher suite of these protocols: {e}"),
            )
        })?;
    let builder = match mode {
        ClientSslMode::VerifyCa | ClientSslMode::VerifyFull => {
            let ca_file = tls.client_tls_ca_file.as_deref().ok_or((
                "client_tls_ca_file",
                format!("client_tls_sslmode = \"{}\" verifies client certificates against these CAs: set it", mode_name(mode)),
            ))?;
            let mut roots = RootCertStore::empty();
            for ca in certificates(ca_file).map_err(|e| ("client_tls_ca_file", e))? {
                roots
                    .add(ca)
                    .map_err(|e| ("client_tls_ca_file", format!("{}: {e}", ca_file.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ("client_tls_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        (
            "client_tls_key_file",
            format!("does not go with client_tls_cert_file: {e}"),
        )
    })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(ListenerTls {
        mode,
        acceptor: TlsAcceptor::from(Arc::new(config)),
        expiry: vec![(cert_file.to_owned(), not_after)],
    })
}

/// A certificate, key or CA file as last seen: a changed one is read again (a reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub path: PathBuf,
    /// Modification time, length and inode; `None` when it cannot be read.
    seen: Option<(std::time::SystemTime, u64, u64)>,
}

impl Fingerprint {
    pub fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let seen = std::fs::metadata(path).ok().map(|m| {
            (
                m.modified().unwrap_or(std::time::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        });
        Self {
            path: path.to_owned(),
            seen,
        }
    }
}

/// The TLS files `config` names, as they are now.
pub fn fingerprints(config: &Config) -> Vec<Fingerprint> {
    let mut paths: Vec<&Path> = Vec::new();
    let tables = std::iter::once(&config.tls).chain(config.listeners.iter().map(|l| &l.tls));
    for t in tables {
        let files = [
            &t.client_tls_cert_file,
            &t.client_tls_key_file,
            &t.client_tls_ca_file,
        ];
        paths.extend(files.into_iter().flatten().map(PathBuf::as_path));
    }
    paths.sort();
    paths.dedup();
    paths.into_iter().map(Fingerprint::of).collect()
}

/// How often certificate and key files are looked at for changes.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| d.as_secs() as i64)
}

/// When a certificate stops being valid, as a Unix time.
fn not_after(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(parsed.validity().not_after.timestamp())
}

/// Certificates expiring within this time get a warning from `pgvane check` and at load.
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// "listener L: FILE expires in N days" for every certificate served that expires within
/// [`EXPIRY_WARNING`].
pub fn expiring_soon(tls: &TlsByListener) -> Vec<String> {
    let soon = unix_now() + EXPIRY_WARNING.as_secs() as i64;
    let mut out = Vec::new();
    for (listener, t) in tls {
        for (file, at) in &t.expiry {
            if *at < soon {
                let days = (at - unix_now()) / 86_400;
                out.push(format!(
                    "listener {listener}: certificate {} expires in {days} days; renew it",
                    file.display()
                ));
            }
        }
    }
    out.sort();
    out
}

fn mode_name(mode: ClientSslMode) -> &'static str {
    match mode {
        ClientSslMode::Disable => "disable",
        ClientSslMode::Allow => "allow",
        ClientSslMode::Prefer => "prefer",
        ClientSslMode::Require => "require",
        ClientSslMode::VerifyCa => "verify-ca",
        ClientSslMode::VerifyFull => "verify-full",
    }
}

/// The certificates of a PEM file, in order; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// `client_tls_protocols`: TLS 1.2 and 1.3, or one of them.
fn protocols(
    value: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let (v12, v13) = (&rustls::version::TLS12, &rustls::version::TLS13);
    let mut out = Vec::new();
    for word in value
        .unwrap_or("secure")
        .split([',', ' ', ':'])
        .filter(|w| !w.is_empty())
    {
        match word.to_ascii_lowercase().as_str() {
            "secure" | "all" | "default" => out.extend([v12, v13]),
            "tlsv1.2" => out.push(v12),
            "tlsv1.3" => out.push(v13),
            "tlsv1.0" | "tlsv1.1" | "legacy" => {
                return Err(format!(
                    "\"{word}\": pgvane speaks TLS 1.2 and 1.3 only; use \"secure\", \"tlsv1.2\" or \"tlsv1.3\""
                ))
            }
            other => {
                return Err(format!(
                    "\"{other}\" is not a protocol; use \"secure\", \"tlsv1.2\" or \"tlsv1.3\""
                ))
            }
        }
    }
    out.dedup_by_key(|v| v.version);
    Ok(out)
}

/// `client_tls_ciphers`: rustls' suites, or the named ones of them.
fn cipher_suites(value: Option<&str>) -> Result<Vec<SupportedCipherSuite>, String> {
    let all = rustls::crypto::ring::default_provider().cipher_suites;
    let value = value.unwrap_or("default");
    if matches!(
        value.to_ascii_lowercase().as_str(),
        "default" | "secure" | "normal" | "fast" | "all"
    ) {
        return Ok(all);
    }
    let name = |s: &SupportedCipherSuite| format!("{:?}", s.suite());
    let mut out = Vec::new();
    for word in value.split(':').filter(|w| !w.is_empty()) {
        match all.iter().find(|s| name(s).eq_ignore_ascii_case(word)) {
            Some(s) => out.push(*s),
            None => {
                let names: Vec<String> = all.iter().map(name).collect();
                return Err(format!(
                    "\"{word}\" is not a cipher suite pgvane has; use \"default\" or some of {}",
                    names.join(", ")
                ));
            }
        }
    }
    Ok(out)
}

/// How a client's connection starts.
pub enum Negotiated {
    /// Plaintext: the startup packet is next.
    Plain(TcpStream),
    /// TLS was negotiated; the startup packet comes inside it.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Answers the client's requests for encryption, before its startup packet: an SSLRequest
/// gets 'S' and a TLS handshake when `tls` is set ('N' otherwise), a GSSENCRequest 'N', and
/// a TLS handshake sent straight away (direct TLS) is accepted when `tls` is set and the
/// client names `postgresql` in ALPN, as PostgreSQL 17 requires. Nothing else is read.
pub async fn negotiate(
    mut client: TcpStream,
    tls: Option<&ListenerTls>,
) -> std::io::Result<Negotiated> {
    for _ in 0..3 {
        let head = peek_head(&client).await?;
        if head.first() == Some(&TLS_HANDSHAKE) {
            let Some(tls) = tls else {
                return Err(refused("a TLS handshake on a listener without TLS"));
            };
            let stream = tls.acceptor.accept(client).await?;
            // Direct TLS carries no SSLRequest to say the client speaks PostgreSQL: ALPN does.
            if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
                return Err(refused("direct TLS without ALPN \"postgresql\""));
            }
            return Ok(Negotiated::Tls(Box::new(stream)));
        }
        let request = if head == SSL_REQUEST {
            Some(true)
        } else if head == GSSENC_REQUEST {
            Some(false)
        } else {
            None
        };
        match (request, tls) {
            (None, _) => return Ok(Negotiated::Plain(client)),
            (Some(ssl), tls) => {
                let mut request = [0u8; 8];
                client.read_exact(&mut request).await?;
                if let (true, Some(tls)) = (ssl, tls) {
                    client.write_all(b"S").await?;
                    let stream = tls.acceptor.accept(client).await?;
                    return Ok(Negotiated::Tls(Box::new(stream)));
                }
                client.write_all(b"N").await?;
            }
        }
    }
    Err(refused("too many encryption requests"))
}

fn refused(why: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why)
}

/// The client's first bytes, not consumed: 8, or fewer when they already differ from an
/// encryption request's (a startup packet is at least 8 bytes, but may come in pieces).
async fn peek_head(client: &TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 8];
    loop {
        let n = client.peek(&mut head).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let partial_request = n < 8
            && head[0] != TLS_HANDSHAKE
            && (SSL_REQUEST[..n] == head[..n] || GSSENC_REQUEST[..n] == head[..n]);
        if !partial_request {
            return Ok(head[..n].to_vec());
        }
        // Rare (an 8-byte request split in two): the rest is a moment away, and peek,
        // which leaves the bytes there, would find them again at once.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tls: &str) -> Config {
        Config::parse(&format!(
            r#"
            [auth]
            type = "trust"
            [tls]
            {tls}
            [[backend]]
            name = "pg1"
            host = "127.0.0.1"
            port = 5432
            [[listener]]
            name = "tx"
            address = "127.0.0.1"
            port = 6432
            target = "primary"
            mode = "transaction"
            "#
        ))
        .unwrap()
    }

    #[test]
    fn a_problem_names_the_key_and_the_fix() {
        let problem = load(&config("client_tls_sslmode = \"require\"")).unwrap_err();
        assert_eq!(problem.key, "listener[0].tls.client_tls_cert_file");
        let missing = config(
            "client_tls_sslmode = \"require\"\nclient_tls_cert_file = \"/nonexistent.pem\"\nclient_tls_key_file = \"/nonexistent.key\"",
        );
        let problem = load(&missing).unwrap_err();
        assert_eq!(problem.key, "tls.client_tls_cert_file");
        assert!(problem.message.contains("/nonexistent.pem"), "{problem}");
        // Off: nothing is loaded, whatever the files.
        assert!(load(&config("client_tls_cert_file = \"/nonexistent.pem\""))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn protocols_and_ciphers_are_rustls_own() {
        assert_eq!(protocols(None).unwrap().len(), 2);
        assert_eq!(protocols(Some("tlsv1.3")).unwrap().len(), 1);
        let old = protocols(Some("tlsv1.1")).unwrap_err();
        assert!(old.contains("TLS 1.2 and 1.3 only"), "{old}");
        assert!(!cipher_suites(Some("default")).unwrap().is_empty());
        let one = cipher_suites(Some("TLS13_AES_256_GCM_SHA384")).unwrap();
        assert_eq!(one.len(), 1);
        let unknown = cipher_suites(Some("RC4-MD5")).unwrap_err();
        assert!(unknown.contains("TLS13_AES_128_GCM_SHA256"), "{unknown}");
    }
}
