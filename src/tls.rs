//! TLS toward clients: the certificates and keys each pooled listener serves, loaded into
//! rustls (no OpenSSL), and the negotiation PostgreSQL clients start with, an SSLRequest or
//! (PostgreSQL 17's `sslnegotiation=direct`) a TLS handshake straight away.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ClientSslMode, Config, Problem, ServerSslMode, TlsConfig};

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
    /// The certificate file served, and when its first certificate (the listener's own)
    /// expires, as a Unix time: `pgvane_tls_certificate_expiry_seconds`.
    pub cert_file: PathBuf,
    pub not_after: i64,
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

/// The TLS toward PostgreSQL (`None`: server_tls_sslmode = disable).
pub fn load_server(config: &Config) -> Result<Option<Arc<ServerTls>>, Problem> {
    server_tls(&config.tls)
        .map(|t| t.map(Arc::new))
        .map_err(|(k, message)| Problem {
            key: format!("tls.{k}"),
            message,
        })
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
        cert_file: cert_file.to_owned(),
        not_after,
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

/// A certificate's subject common name.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
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
    let mut out: Vec<String> = tls
        .iter()
        .filter(|(_, t)| t.not_after < soon)
        .map(|(listener, t)| {
            let days = (t.not_after - unix_now()) / 86_400;
            format!(
                "listener {listener}: certificate {} expires in {days} days; renew it",
                t.cert_file.display()
            )
        })
        .collect();
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

/// TLS toward PostgreSQL: `server_tls_sslmode` and what makes its handshakes.
pub struct ServerTls {
    pub mode: ServerSslMode,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .finish()
    }
}

impl ServerTls {
    /// The rustls configuration, for the health checks' tokio-postgres.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Opens TLS on `stream`, a new connection to `host` (with no byte sent yet), as libpq
    /// does: an SSLRequest, then a handshake if the server answers 'S'. A server that
    /// answers 'N' gets plaintext under `prefer`, and is an error otherwise.
    pub async fn connect(
        &self,
        mut stream: TcpStream,
        host: &str,
    ) -> std::io::Result<ServerStream> {
        stream.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let connector = TlsConnector::from(self.config.clone());
                let tls = connector.connect(name, stream).await?;
                Ok(ServerStream::Tls(Box::new(tls)))
            }
            b'N' if self.mode == ServerSslMode::Prefer => Ok(ServerStream::Plain(stream)),
            b'N' => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the server does not accept TLS (server_tls_sslmode requires it)",
            )),
            other => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected answer {other:#x} to an SSLRequest"),
            )),
        }
    }
}

/// The TLS toward PostgreSQL of `tls` (`None` for disable).
fn server_tls(tls: &TlsConfig) -> Result<Option<ServerTls>, Failure> {
    let mode = tls.server_tls_sslmode.unwrap_or_default();
    if mode == ServerSslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("server_tls_sslmode", e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        ServerSslMode::VerifyCa | ServerSslMode::VerifyFull => {
            let ca_file = tls.server_tls_ca_file.as_deref().ok_or((
                "server_tls_ca_file",
                "server_tls_sslmode verify-ca and verify-full check the server's certificate against these CAs: set it".to_owned(),
            ))?;
            let mut roots = RootCertStore::empty();
            for ca in certificates(ca_file).map_err(|e| ("server_tls_ca_file", e))? {
                roots
                    .add(ca)
                    .map_err(|e| ("server_tls_ca_file", format!("{}: {e}", ca_file.display())))?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| ("server_tls_ca_file", e.to_string()))?;
            match mode {
                ServerSslMode::VerifyFull => webpki,
                _ => Arc::new(AnyName(webpki)),
            }
        }
        _ => Arc::new(Unchecked(provider)),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&tls.server_tls_cert_file, &tls.server_tls_key_file) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert).map_err(|e| ("server_tls_cert_file", e))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| ("server_tls_key_file", format!("{}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                (
                    "server_tls_key_file",
                    format!("does not go with server_tls_cert_file: {e}"),
                )
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err((
                "server_tls_key_file",
                "server_tls_cert_file needs its key".to_owned(),
            ))
        }
        (None, Some(_)) => {
            return Err((
                "server_tls_cert_file",
                "server_tls_key_file needs its certificate".to_owned(),
            ))
        }
    };
    Ok(Some(ServerTls {
        mode,
        config: Arc::new(config),
    }))
}

/// `prefer` and `require`, as libpq's: the connection is encrypted, the certificate not
/// checked (the handshake's signatures are).
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the names in the certificate do not matter.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A server connection: plaintext, or TLS over it.
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// How the link splits a server connection of one kind. The link is compiled once per
/// kind, so that a plaintext connection's halves are what they were before TLS (a link's
/// future must stay within the allocator's 1 KiB fast path).
pub trait ServerSplit {
    type Reader<'a>: AsyncRead + Unpin + Send;
    type Writer<'a>: AsyncWrite + Unpin + Send;

    /// Read and write halves, driven concurrently by one task; `None` for a stream of the
    /// other kind.
    fn split(stream: &mut ServerStream) -> Option<(Self::Reader<'_>, Self::Writer<'_>)>;
}

/// A plaintext server connection.
pub struct PlainServer;

/// A server connection over TLS.
pub struct TlsServer;

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

impl ServerSplit for PlainServer {
    type Reader<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Writer<'a> = tokio::net::tcp::WriteHalf<'a>;

    fn split(stream: &mut ServerStream) -> Option<(Self::Reader<'_>, Self::Writer<'_>)> {
        match stream {
            ServerStream::Plain(s) => Some(s.split()),
            ServerStream::Tls(_) => None,
        }
    }
}

impl ServerSplit for TlsServer {
    type Reader<'a> = tokio::io::ReadHalf<&'a mut ClientTls>;
    type Writer<'a> = tokio::io::WriteHalf<&'a mut ClientTls>;

    fn split(stream: &mut ServerStream) -> Option<(Self::Reader<'_>, Self::Writer<'_>)> {
        match stream {
            ServerStream::Tls(s) => Some(tokio::io::split(&mut **s)),
            ServerStream::Plain(_) => None,
        }
    }
}

impl ServerStream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ServerStream::Plain(s) => s,
            ServerStream::Tls(s) => s.get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }

    /// Whether an idle connection is still quiet: no byte to read (a closed connection
    /// reads its end, a server shutting down sends a FATAL first). Registers no waker.
    pub fn is_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            ServerStream::Plain(s) => {
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
            ServerStream::Tls(s) => {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                let mut buf = tokio::io::ReadBuf::new(&mut probe);
                let read = std::pin::Pin::new(&mut **s).poll_read(&mut cx, &mut buf);
                read.is_pending()
            }
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
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
