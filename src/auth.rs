//! Authentication, both ways: pgvane as the server to its clients, and as a client to
//! PostgreSQL when it opens pooled server connections.
//!
//! Users and secrets come from `[[user]]` entries and a PgBouncer-format `auth_file`.
//! A secret is plain text, `md5` + hex, or a `SCRAM-SHA-256$...` verifier as stored in
//! `pg_authid`. Client-side crypto (SCRAM client, md5 hashing, verifier generation) comes from
//! the postgres-protocol crate; the server side of SCRAM (RFC 5802/7677) is the few HMAC
//! steps below, on the RustCrypto hmac/sha2 crates.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::{AuthMethod, Config, Problem};
use crate::protocol::{backend, read_message, ProtocolError};

/// Authentication messages are small; anything bigger is hostile.
const MAX_AUTH_MESSAGE: usize = 8192;

/// A stored secret, as found in the config or auth_file.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    /// `md5` followed by 32 hex digits: md5(password || user).
    Md5(String),
    Scram(ScramSecret),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Secret::Plain(_) => "Plain(<redacted>)",
            Secret::Md5(_) => "Md5(<redacted>)",
            Secret::Scram(_) => "Scram(<redacted>)",
        })
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScramSecret(<redacted>, {} iterations)", self.iterations)
    }
}

impl ScramSecret {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts).
    pub fn parse(s: &str) -> Option<ScramSecret> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

impl Secret {
    pub fn parse(s: &str) -> Secret {
        if s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|c| c.is_ascii_hexdigit()) {
            return Secret::Md5(s.to_ascii_lowercase());
        }
        match ScramSecret::parse(s) {
            Some(scram) => Secret::Scram(scram),
            None => Secret::Plain(s.to_owned()),
        }
    }
}

/// What pgvane knows of one user.
#[derive(Debug)]
pub struct User {
    pub name: String,
    secret: Option<Secret>,
    /// A SCRAM verifier for SCRAM client logins (derived once from a plain password).
    scram: Option<ScramSecret>,
    /// The SCRAM ClientKey, learned from the first client that proved it knows the
    /// password: with it pgvane logs in to a server holding the same verifier without the
    /// plain password (SCRAM pass-through, as PgBouncer does with SCRAM secrets).
    client_key: OnceLock<[u8; 32]>,
}

/// How pgvane proves itself to PostgreSQL for a user.
pub enum ServerCredential<'a> {
    Password(&'a str),
    /// SCRAM keys learned from a client login; only for a server with this verifier.
    ScramKeys {
        secret: &'a ScramSecret,
        client_key: &'a [u8; 32],
    },
    None,
}

impl User {
    fn new(name: String, secret: Option<Secret>) -> Self {
        let scram = match &secret {
            Some(Secret::Scram(s)) => Some(s.clone()),
            Some(Secret::Plain(p)) => {
                ScramSecret::parse(&postgres_protocol::password::scram_sha_256(p.as_bytes()))
            }
            _ => None,
        };
        Self {
            name,
            secret,
            scram,
            client_key: OnceLock::new(),
        }
    }

    /// A user `auth_query` found, with the secret it returned (`None`: it cannot log in
    /// with a password).
    pub fn found(name: String, secret: Option<&str>) -> Self {
        Self::new(name, secret.map(Secret::parse))
    }

    /// A user pgvane has no secret for (trust authentication).
    pub fn without_secret(name: String) -> Self {
        Self::new(name, None)
    }

    /// The SCRAM ClientKey a client's login revealed, if any.
    pub fn client_key(&self) -> Option<&[u8; 32]> {
        self.client_key.get()
    }

    /// Learns the SCRAM ClientKey another pgvane process learned (a session moved here at an
    /// upgrade): kept only if it matches this user's verifier.
    pub fn learn_client_key(&self, key: [u8; 32]) {
        let Some(scram) = &self.scram else { return };
        if constant_time_eq(&<Sha256 as sha2::Digest>::digest(key), &scram.stored_key) {
            let _ = self.client_key.set(key);
        }
    }

    /// What pgvane logs in to PostgreSQL with: the plain password if it has one, else the
    /// SCRAM keys a client's login revealed.
    pub fn server_credential(&self) -> ServerCredential<'_> {
        match (&self.secret, &self.scram, self.client_key.get()) {
            (Some(Secret::Plain(p)), _, _) => ServerCredential::Password(p),
            (_, Some(secret), Some(client_key)) => {
                ServerCredential::ScramKeys { secret, client_key }
            }
            _ => ServerCredential::None,
        }
    }
}

/// `auth_user` with `auth_query`: how users pgvane does not know are looked up.
#[derive(Debug)]
pub struct AuthQuery {
    pub user: Arc<User>,
    pub query: String,
    pub dbname: Option<String>,
}

/// All users of the pooled listeners.
#[derive(Debug, Default)]
pub struct UserStore {
    method: AuthMethod,
    users: HashMap<String, Arc<User>>,
    /// Set with `auth.auth_user`.
    pub auth_query: Option<AuthQuery>,
    /// Derives the salt shown to a user pgvane does not know: fixed per name, as a real
    /// user's is, so that the salt does not tell who exists (PostgreSQL's mock salt).
    mock_key: [u8; 32],
}

impl UserStore {
    /// Reads `[[user]]` entries and `auth.file`; a user in both takes the config's password.
    pub fn load(config: &Config) -> Result<UserStore, Problem> {
        let mut users = HashMap::new();
        if let Some(path) = &config.auth.file {
            for (name, secret) in read_auth_file(path)? {
                users.insert(
                    name.clone(),
                    Arc::new(User::new(name, Some(Secret::parse(&secret)))),
                );
            }
        }
        for u in &config.users {
            let known = users.get(&u.name).and_then(|x| x.secret.clone());
            let secret = u.password.as_deref().map(Secret::parse).or(known);
            users.insert(u.name.clone(), Arc::new(User::new(u.name.clone(), secret)));
        }
        let auth_query = match &config.auth.auth_user {
            None => None,
            Some(name) => {
                let user = users.get(name).cloned();
                if !user
                    .as_ref()
                    .is_some_and(|u| matches!(u.secret, Some(Secret::Plain(_))))
                {
                    return Err(Problem {
                        key: "auth.auth_user".into(),
                        message: format!("\"{name}\" needs a plain password, in a [[user]] entry or the auth_file: pgvane logs in with it to run auth_query"),
                    });
                }
                Some(AuthQuery {
                    user: user.expect("checked above"),
                    query: config.auth.auth_query.clone(),
                    dbname: config.auth.auth_dbname.clone(),
                })
            }
        };
        Ok(UserStore {
            method: config.auth.method,
            users,
            auth_query,
            mock_key: rand::random(),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<User>> {
        self.users.get(name).cloned()
    }

    /// Whether `user` (as a pool holds it) still has the secret this store gives its name:
    /// a pool whose user's password changed on reload logs in with the new one.
    /// A user `auth_query` found is not in the store: its secret is looked up again at
    /// each login, so its pool stays.
    pub fn has_same(&self, user: &User) -> bool {
        match self.users.get(&user.name) {
            Some(now) => now.secret == user.secret,
            None => self.auth_query.is_some() || user.secret.is_none(),
        }
    }
}

/// Parses a PgBouncer `auth_file`: `"user" "secret"` per line, `""` escapes a quote, lines
/// starting with `;` or `#` and blank lines are ignored.
pub fn parse_auth_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let mut rest = line;
        let mut fields = Vec::new();
        while fields.len() < 2 {
            rest = rest.trim_start();
            let Some(body) = rest.strip_prefix('"') else {
                return Err(format!("line {}: expected \"user\" \"secret\"", n + 1));
            };
            let mut value = String::new();
            let mut chars = body.char_indices().peekable();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => {
                        if let Some((_, '"')) = chars.peek() {
                            chars.next();
                            value.push('"');
                        } else {
                            break i + 1;
                        }
                    }
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("line {}: unterminated quote", n + 1)),
                }
            };
            fields.push(value);
            rest = &body[end..];
        }
        let secret = fields.pop().expect("two fields");
        let user = fields.pop().expect("two fields");
        out.push((user, secret));
    }
    Ok(out)
}

fn read_auth_file(path: &Path) -> Result<Vec<(String, String)>, Problem> {
    let problem = |message: String| Problem {
        key: "auth.file".into(),
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| problem(format!("cannot read {}: {e}", path.display())))?;
    parse_auth_file(&text).map_err(|e| problem(format!("{}: {e}", path.display())))
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("certificate authentication failed for user \"{user}\": {why}")]
    Certificate { user: String, why: String },
    #[error("user \"{0}\" has no password pgvane can check with {1}")]
    NoUsableSecret(String, &'static str),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl From<std::io::Error> for AuthError {
    fn from(e: std::io::Error) -> Self {
        AuthError::Protocol(e.into())
    }
}

/// Runs the server side of authentication with a client that sent a StartupMessage for
/// `user`. On success the closing messages (SCRAM's server signature, AuthenticationOk)
/// are appended to `reply`, not sent: the caller sends them with what follows, so that a
/// login costs one write less. `certificate`: the common name of the client's verified
/// TLS certificate, if it has one.
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    store: &UserStore,
    user: &str,
    known: Option<&User>,
    certificate: Option<&str>,
    reply: &mut BytesMut,
) -> Result<(), AuthError> {
    match store.method {
        AuthMethod::Trust => {}
        AuthMethod::Cert => match certificate {
            Some(cn) if cn == user => {}
            Some(cn) => {
                return Err(AuthError::Certificate {
                    user: user.into(),
                    why: format!("the certificate is for \"{cn}\""),
                })
            }
            None => {
                return Err(AuthError::Certificate {
                    user: user.into(),
                    why: "no client certificate".into(),
                })
            }
        },
        AuthMethod::Md5 => match known.and_then(|u| u.secret.as_ref()) {
            // PostgreSQL too switches to SCRAM when only a SCRAM verifier is stored.
            Some(Secret::Scram(_)) => scram_exchange(stream, store, user, known, reply).await?,
            secret => md5_exchange(stream, secret, user).await?,
        },
        AuthMethod::ScramSha256 => {
            if matches!(known.and_then(|u| u.secret.as_ref()), Some(Secret::Md5(_))) {
                return Err(AuthError::NoUsableSecret(user.into(), "scram-sha-256"));
            }
            scram_exchange(stream, store, user, known, reply).await?
        }
    }
    backend::authentication_ok(reply);
    Ok(())
}

async fn read_password_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, AuthError> {
    let m = read_message(stream, MAX_AUTH_MESSAGE).await?;
    if m.tag != b'p' {
        return Err(ProtocolError::Unexpected {
            tag: m.tag,
            context: "during authentication (expected a password message)",
        }
        .into());
    }
    Ok(m.body)
}

async fn md5_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: Option<&Secret>,
    user: &str,
) -> Result<(), AuthError> {
    let salt: [u8; 4] = rand::random();
    let mut buf = BytesMut::new();
    backend::authentication_md5(&mut buf, salt);
    stream.write_all(&buf).await?;
    let body = read_password_message(stream).await?;
    let answer = body.strip_suffix(&[0]).unwrap_or(&body);
    let expected = match secret {
        Some(Secret::Plain(p)) => {
            postgres_protocol::authentication::md5_hash(user.as_bytes(), p.as_bytes(), salt)
        }
        Some(Secret::Md5(stored)) => {
            let mut h = Md5::new();
            h.update(&stored.as_bytes()[3..]);
            h.update(salt);
            format!("md5{}", hex(&h.finalize()))
        }
        _ => return Err(AuthError::Failed(user.into())),
    };
    if constant_time_eq(answer, expected.as_bytes()) {
        Ok(())
    } else {
        Err(AuthError::Failed(user.into()))
    }
}

/// SCRAM-SHA-256 without channel binding (pgvane does not terminate TLS yet). An unknown
/// user goes through the whole exchange against a verifier that cannot match, with a salt
/// fixed per name (derived from a per-process key, as PostgreSQL derives its mock salt from
/// a cluster secret), so neither the answer nor the salt reveals which users exist.
async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    store: &UserStore,
    name: &str,
    user: Option<&User>,
    reply: &mut BytesMut,
) -> Result<(), AuthError> {
    let mock;
    let secret = match user.and_then(|u| u.scram.as_ref()) {
        Some(s) => s,
        None => {
            mock = ScramSecret {
                iterations: MOCK_ITERATIONS,
                salt: hmac_sha256(&store.mock_key, name.as_bytes())[..16].to_vec(),
                stored_key: rand::random(),
                server_key: rand::random(),
            };
            &mock
        }
    };
    let mut buf = BytesMut::new();
    backend::authentication_sasl(&mut buf, "SCRAM-SHA-256");
    stream.write_all(&buf).await?;

    // SASLInitialResponse: mechanism\0, int32 length, client-first-message.
    let body = read_password_message(stream).await?;
    let bad = |what| AuthError::Protocol(ProtocolError::Malformed(what));
    let nul = body
        .iter()
        .position(|&c| c == 0)
        .ok_or(bad("SASL mechanism"))?;
    if &body[..nul] != b"SCRAM-SHA-256" {
        return Err(bad("unsupported SASL mechanism"));
    }
    let rest = &body[nul + 1..];
    let (len, data) = rest
        .split_first_chunk::<4>()
        .ok_or(bad("SASL initial response"))?;
    if i32::from_be_bytes(*len) as usize != data.len() {
        return Err(bad("SASL initial response length"));
    }
    let client_first = std::str::from_utf8(data).map_err(|_| bad("SASL message is not UTF-8"))?;
    // gs2 header: "n,," (no channel binding) or "y,," (client could, server cannot).
    let (gs2, bare) = match client_first.get(..3) {
        Some(h @ ("n,," | "y,,")) => (h, &client_first[3..]),
        _ => return Err(bad("unsupported SCRAM channel binding")),
    };
    let client_nonce = scram_attr(bare, 'r').ok_or(bad("SCRAM client nonce"))?;

    let nonce = format!("{client_nonce}{}", B64.encode(rand::random::<[u8; 18]>()));
    let server_first = format!(
        "r={nonce},s={},i={}",
        B64.encode(&secret.salt),
        secret.iterations
    );
    buf.clear();
    backend::authentication_sasl_continue(&mut buf, server_first.as_bytes());
    stream.write_all(&buf).await?;

    let body = read_password_message(stream).await?;
    let client_final = std::str::from_utf8(&body).map_err(|_| bad("SASL message is not UTF-8"))?;
    let (without_proof, proof) = client_final
        .rsplit_once(",p=")
        .ok_or(bad("SCRAM client proof"))?;
    let binding = scram_attr(without_proof, 'c').ok_or(bad("SCRAM channel binding"))?;
    if B64.decode(binding).ok().as_deref() != Some(gs2.as_bytes())
        || scram_attr(without_proof, 'r') != Some(nonce.as_str())
    {
        return Err(bad("SCRAM final message does not match"));
    }
    let proof: [u8; 32] = B64
        .decode(proof)
        .ok()
        .and_then(|p| p.try_into().ok())
        .ok_or(bad("SCRAM client proof"))?;

    let auth_message = format!("{bare},{server_first},{without_proof}");
    let client_signature = hmac_sha256(&secret.stored_key, auth_message.as_bytes());
    let client_key: Vec<u8> = proof
        .iter()
        .zip(client_signature)
        .map(|(p, s)| p ^ s)
        .collect();
    let stored_key = <Sha256 as sha2::Digest>::digest(&client_key);
    let matched = constant_time_eq(&stored_key, &secret.stored_key);
    let Some(user) = user.filter(|_| matched) else {
        return Err(AuthError::Failed(name.into()));
    };
    if let Ok(key) = client_key.try_into() {
        let _ = user.client_key.set(key);
    }
    let server_signature = hmac_sha256(&secret.server_key, auth_message.as_bytes());
    backend::authentication_sasl_final(
        reply,
        format!("v={}", B64.encode(server_signature)).as_bytes(),
    );
    Ok(())
}

/// PostgreSQL's default `scram_iterations`, which most verifiers have.
const MOCK_ITERATIONS: u32 = 4096;

fn scram_attr(message: &str, name: char) -> Option<&str> {
    message
        .split(',')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why pgvane could not log in to a PostgreSQL server.
#[derive(Debug, thiserror::Error)]
pub enum ServerLoginError {
    /// The server refused; its ErrorResponse body is passed on to the client unchanged.
    #[error("server refused login: {message}")]
    Refused { message: String, body: Vec<u8> },
    #[error("server asks for a password but pgvane has none for user \"{0}\": give it in plain text, or a SCRAM secret (then pgvane logs in with the keys of a client's SCRAM login)")]
    NoPassword(String),
    #[error("server asked for unsupported authentication (code {0})")]
    Unsupported(u32),
    #[error("SCRAM with the server failed: {0}")]
    Scram(std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl From<std::io::Error> for ServerLoginError {
    fn from(e: std::io::Error) -> Self {
        ServerLoginError::Protocol(e.into())
    }
}

/// What a server says about itself at login.
#[derive(Debug, Default, Clone)]
pub struct ServerHello {
    pub params: Vec<(String, String)>,
    pub process_id: u32,
    pub secret_key: u32,
}

/// Logs in to a PostgreSQL server as `user` on `database`, up to its first ReadyForQuery.
pub async fn login_to_server<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    database: &str,
    credential: ServerCredential<'_>,
) -> Result<ServerHello, ServerLoginError> {
    use postgres_protocol::message::frontend;
    let mut buf = BytesMut::new();
    frontend::startup_message([("user", user), ("database", database)], &mut buf)?;
    stream.write_all(&buf).await?;
    let plain = match credential {
        ServerCredential::Password(p) => Some(p),
        _ => None,
    };
    let password = || plain.ok_or_else(|| ServerLoginError::NoPassword(user.into()));
    let mut scram: Option<ServerScram> = None;
    let mut hello = ServerHello::default();
    loop {
        let m = read_message(stream, 64 * 1024).await?;
        buf.clear();
        match m.tag {
            b'R' => {
                let (code, data) = m
                    .body
                    .split_first_chunk::<4>()
                    .ok_or(ProtocolError::Malformed("authentication request"))?;
                match u32::from_be_bytes(*code) {
                    0 => {}
                    3 => frontend::password_message(password()?.as_bytes(), &mut buf)?,
                    5 => {
                        let salt: [u8; 4] = data
                            .try_into()
                            .map_err(|_| ProtocolError::Malformed("md5 salt"))?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            password()?.as_bytes(),
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut buf)?;
                    }
                    10 => {
                        if !crate::protocol::cstrings(data).any(|m| m == "SCRAM-SHA-256") {
                            return Err(ServerLoginError::Unsupported(10));
                        }
                        let s = match credential {
                            ServerCredential::Password(p) => ServerScram::Password(Some(Box::new(
                                ScramSha256::new(p.as_bytes(), ChannelBinding::unsupported()),
                            ))),
                            ServerCredential::ScramKeys { secret, client_key } => {
                                ServerScram::Keys(KeyedScram::new(secret, client_key))
                            }
                            ServerCredential::None => {
                                return Err(ServerLoginError::NoPassword(user.into()))
                            }
                        };
                        frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut buf)?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram
                            .as_mut()
                            .ok_or(ProtocolError::Malformed("SASL continue"))?;
                        s.update(data).await?;
                        frontend::sasl_response(s.message(), &mut buf)?;
                    }
                    12 => {
                        let s = scram
                            .as_mut()
                            .ok_or(ProtocolError::Malformed("SASL final"))?;
                        s.finish(data)?;
                    }
                    other => return Err(ServerLoginError::Unsupported(other)),
                }
                if !buf.is_empty() {
                    stream.write_all(&buf).await?;
                }
            }
            b'S' => {
                // application_name is reported empty when not set: it still counts.
                if let Some((k, v)) = crate::protocol::parameter_status(&m.body) {
                    hello.params.push((k.to_owned(), v.to_owned()));
                }
            }
            b'K' => {
                let (pid, rest) = m
                    .body
                    .split_first_chunk::<4>()
                    .ok_or(ProtocolError::Malformed("BackendKeyData"))?;
                let key = rest
                    .first_chunk::<4>()
                    .ok_or(ProtocolError::Malformed("BackendKeyData"))?;
                hello.process_id = u32::from_be_bytes(*pid);
                hello.secret_key = u32::from_be_bytes(*key);
            }
            b'Z' => return Ok(hello),
            b'E' => {
                return Err(ServerLoginError::Refused {
                    message: error_message(&m.body),
                    body: m.body,
                })
            }
            // NoticeResponse, NegotiateProtocolVersion: nothing to act on.
            _ => {}
        }
    }
}

/// The client side of SCRAM with a server: from the plain password (postgres-protocol), or
/// from keys learned from a client's login.
enum ServerScram<'a> {
    /// `None` only while the key derivation runs on the blocking pool.
    Password(Option<Box<ScramSha256>>),
    Keys(KeyedScram<'a>),
}

impl ServerScram<'_> {
    fn message(&self) -> &[u8] {
        match self {
            ServerScram::Password(s) => s.as_ref().map_or(&[], |s| s.message()),
            ServerScram::Keys(k) => k.message.as_bytes(),
        }
    }

    async fn update(&mut self, server_first: &[u8]) -> Result<(), ServerLoginError> {
        match self {
            ServerScram::Password(slot) => {
                let mut s = slot
                    .take()
                    .ok_or(ProtocolError::Malformed("SASL continue"))?;
                let server_first = server_first.to_vec();
                // The password's key derivation is PBKDF2 (4096 rounds by default, 2-3 ms
                // of CPU): on the blocking pool, not on a thread that runs sessions (with
                // worker_threads = 1 it would stall every one of them).
                let (s, updated) = tokio::task::spawn_blocking(move || {
                    let updated = s.update(&server_first);
                    (s, updated)
                })
                .await
                .map_err(|e| ServerLoginError::Scram(std::io::Error::other(e)))?;
                *slot = Some(s);
                updated.map_err(ServerLoginError::Scram)
            }
            ServerScram::Keys(k) => k.update(server_first),
        }
    }

    fn finish(&mut self, server_final: &[u8]) -> Result<(), ServerLoginError> {
        match self {
            ServerScram::Password(s) => s
                .as_mut()
                .ok_or(ProtocolError::Malformed("SASL final"))?
                .finish(server_final)
                .map_err(ServerLoginError::Scram),
            ServerScram::Keys(k) => k.finish(server_final),
        }
    }
}

/// SCRAM-SHA-256 client from a verifier and a ClientKey (RFC 5802 with the keys instead of
/// the password). postgres-protocol's client needs the password, hence this.
struct KeyedScram<'a> {
    secret: &'a ScramSecret,
    client_key: &'a [u8; 32],
    client_first_bare: String,
    /// The message to send next.
    message: String,
    auth_message: String,
}

impl<'a> KeyedScram<'a> {
    fn new(secret: &'a ScramSecret, client_key: &'a [u8; 32]) -> Self {
        let client_first_bare = format!("n=,r={}", B64.encode(rand::random::<[u8; 18]>()));
        Self {
            secret,
            client_key,
            message: format!("n,,{client_first_bare}"),
            client_first_bare,
            auth_message: String::new(),
        }
    }

    fn update(&mut self, server_first: &[u8]) -> Result<(), ServerLoginError> {
        let fail = |what: &str| ServerLoginError::Scram(std::io::Error::other(what.to_owned()));
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| fail("server-first is not UTF-8"))?;
        let nonce = scram_attr(server_first, 'r').ok_or_else(|| fail("no server nonce"))?;
        let ours = scram_attr(&self.client_first_bare, 'r').unwrap_or_default();
        if !nonce.starts_with(ours) {
            return Err(fail("server nonce does not extend ours"));
        }
        let salt = scram_attr(server_first, 's').and_then(|s| B64.decode(s).ok());
        let iterations = scram_attr(server_first, 'i').and_then(|i| i.parse::<u32>().ok());
        // The keys only fit the verifier they came from.
        if salt.as_deref() != Some(self.secret.salt.as_slice())
            || iterations != Some(self.secret.iterations)
        {
            return Err(fail(
                "the server's SCRAM secret is not the one in the auth_file; copy it from pg_authid",
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let stored_key = <Sha256 as sha2::Digest>::digest(self.client_key);
        let signature = hmac_sha256(&stored_key, self.auth_message.as_bytes());
        let proof: Vec<u8> = self
            .client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.message = format!("{without_proof},p={}", B64.encode(proof));
        Ok(())
    }

    fn finish(&mut self, server_final: &[u8]) -> Result<(), ServerLoginError> {
        let expected = hmac_sha256(&self.secret.server_key, self.auth_message.as_bytes());
        let verifier = std::str::from_utf8(server_final)
            .ok()
            .and_then(|f| scram_attr(f, 'v'))
            .and_then(|v| B64.decode(v).ok());
        match verifier {
            Some(v) if constant_time_eq(&v, &expected) => Ok(()),
            _ => Err(ServerLoginError::Scram(std::io::Error::other(
                "the server's SCRAM signature is wrong",
            ))),
        }
    }
}

/// The SQLSTATE ('C' field) of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> Option<String> {
    body.split(|&c| c == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

/// The 'M' field of an ErrorResponse/NoticeResponse body.
pub fn error_message(body: &[u8]) -> String {
    body.split(|&c| c == 0)
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default()
}

/// Reads an auth stream for tests without a real socket.
#[cfg(test)]
async fn drain<R: AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v).await;
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn auth_file_parses_pgbouncer_format() {
        let text = "; comment\n\"alice\" \"plain\"\n\n\"bob\"  \"md5aabbccddeeff00112233445566778899\" extra\n\
                    \"q\"\"uote\" \"SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n";
        let users = parse_auth_file(text).unwrap();
        assert_eq!(users[0], ("alice".into(), "plain".into()));
        assert_eq!(users[2].0, "q\"uote");
        assert!(matches!(Secret::parse(&users[0].1), Secret::Plain(_)));
        assert!(matches!(Secret::parse(&users[1].1), Secret::Md5(_)));
        assert!(matches!(Secret::parse(&users[2].1), Secret::Scram(_)));
        assert!(parse_auth_file("alice plain")
            .unwrap_err()
            .contains("line 1"));
        assert!(parse_auth_file("\"alice\" \"pl")
            .unwrap_err()
            .contains("unterminated"));
    }

    /// Runs pgvane's server side against postgres-protocol's SCRAM client over a duplex pipe.
    async fn scram_login(stored: &str, tried: &str) -> Result<(), AuthError> {
        use postgres_protocol::message::frontend;
        let text = format!(
            "[auth]\ntype = \"scram-sha-256\"\n[[user]]\nname = \"u\"\npassword = \"{stored}\"\n\
             [[backend]]\nname = \"b\"\nhost = \"h\"\nport = 1\n\
             [[listener]]\nname = \"l\"\naddress = \"127.0.0.1\"\nport = 1\ntarget = \"any\"\nmode = \"transaction\"\n"
        );
        let store = UserStore::load(&Config::parse(&text).unwrap()).unwrap();
        let (mut server, mut client) = tokio::io::duplex(4096);
        let tried = tried.to_owned();
        let client_side = tokio::spawn(async move {
            let m = read_message(&mut client, 1024).await.unwrap();
            assert_eq!(&m.body[..4], &10u32.to_be_bytes());
            let mut scram = ScramSha256::new(tried.as_bytes(), ChannelBinding::unsupported());
            let mut buf = BytesMut::new();
            frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut buf).unwrap();
            client.write_all(&buf).await.unwrap();
            let m = read_message(&mut client, 1024).await.unwrap();
            scram.update(&m.body[4..]).unwrap();
            buf.clear();
            frontend::sasl_response(scram.message(), &mut buf).unwrap();
            client.write_all(&buf).await.unwrap();
            match read_message(&mut client, 1024).await {
                Ok(m) if m.tag == b'R' => scram.finish(&m.body[4..]).is_ok(),
                _ => false,
            }
        });
        let mut reply = BytesMut::new();
        let known = store.get("u");
        let result =
            authenticate_client(&mut server, &store, "u", known.as_deref(), None, &mut reply).await;
        server.write_all(&reply).await.unwrap();
        drop(server);
        let client_verified_server = client_side.await.unwrap();
        if result.is_ok() {
            assert!(client_verified_server, "server signature must verify");
        }
        result
    }

    /// The salt the server offers `user` in a SCRAM exchange.
    async fn scram_salt(store: &UserStore, user: &str) -> String {
        use postgres_protocol::message::frontend;
        let (mut server, mut client) = tokio::io::duplex(4096);
        let client_side = async move {
            read_message(&mut client, 1024).await.unwrap();
            let scram = ScramSha256::new(b"guess", ChannelBinding::unsupported());
            let mut buf = BytesMut::new();
            frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut buf).unwrap();
            client.write_all(&buf).await.unwrap();
            let m = read_message(&mut client, 1024).await.unwrap();
            let first = String::from_utf8(m.body[4..].to_vec()).unwrap();
            scram_attr(&first, 's').unwrap().to_owned()
        };
        let mut reply = BytesMut::new();
        let known = store.get(user);
        let server_side =
            authenticate_client(&mut server, store, user, known.as_deref(), None, &mut reply);
        tokio::select! {
            salt = client_side => salt,
            _ = server_side => panic!("the exchange ended before the salt"),
        }
    }

    /// An unknown user is offered the same salt at every attempt, as a known one is, so the
    /// salt does not tell who exists; two unknown names get different ones.
    #[tokio::test]
    async fn scram_salts_do_not_reveal_which_users_exist() {
        let text = "[auth]\ntype = \"scram-sha-256\"\n[[user]]\nname = \"u\"\npassword = \"p\"\n\
             [[backend]]\nname = \"b\"\nhost = \"h\"\nport = 1\n\
             [[listener]]\nname = \"l\"\naddress = \"127.0.0.1\"\nport = 1\ntarget = \"any\"\nmode = \"transaction\"\n";
        let store = UserStore::load(&Config::parse(text).unwrap()).unwrap();
        for user in ["u", "ghost"] {
            assert_eq!(
                scram_salt(&store, user).await,
                scram_salt(&store, user).await,
                "{user}"
            );
        }
        assert_ne!(
            scram_salt(&store, "ghost").await,
            scram_salt(&store, "ghost2").await
        );
    }

    #[tokio::test]
    async fn scram_accepts_the_right_password_and_refuses_a_wrong_one() {
        scram_login("s3cret", "s3cret").await.unwrap();
        let err = scram_login("s3cret", "wrong").await.unwrap_err();
        assert!(matches!(err, AuthError::Failed(ref u) if u == "u"), "{err}");
    }

    #[tokio::test]
    async fn scram_works_from_a_stored_verifier() {
        let verifier = postgres_protocol::password::scram_sha_256(b"from-pg-authid");
        scram_login(&verifier, "from-pg-authid").await.unwrap();
        assert!(scram_login(&verifier, "nope").await.is_err());
    }

    #[tokio::test]
    async fn md5_verifies_plain_and_hashed_secrets() {
        use postgres_protocol::message::frontend;
        for stored in [
            "pw".to_string(),
            postgres_protocol::password::md5(b"pw", "u"),
        ] {
            for (tried, ok) in [("pw", true), ("px", false)] {
                let (mut server, mut client) = tokio::io::duplex(4096);
                let secret = Secret::parse(&stored);
                let tried = tried.to_owned();
                let c = tokio::spawn(async move {
                    let m = read_message(&mut client, 64).await.unwrap();
                    let salt: [u8; 4] = m.body[4..8].try_into().unwrap();
                    let hash =
                        postgres_protocol::authentication::md5_hash(b"u", tried.as_bytes(), salt);
                    let mut buf = BytesMut::new();
                    frontend::password_message(hash.as_bytes(), &mut buf).unwrap();
                    client.write_all(&buf).await.unwrap();
                    drain(&mut client).await
                });
                let r = md5_exchange(&mut server, Some(&secret), "u").await;
                drop(server);
                c.await.unwrap();
                assert_eq!(r.is_ok(), ok, "stored {stored}, ok {ok}");
            }
        }
    }
}
