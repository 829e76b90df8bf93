//! PostgreSQL wire protocol: framing, the messages pgvane speaks itself, and a scanner that
//! follows message boundaries in a forwarded byte stream.
//!
//! Passthrough listeners never parse a healthy session. Pooled listeners read whole messages
//! only while logging a client or a server in; afterwards [`Scanner`] walks the forwarded
//! bytes in place, looking at message headers and capturing the bodies of the few messages
//! the pooler must understand (ReadyForQuery, ParameterStatus). Every length read from the
//! network is bounded before anything is allocated for it.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Request codes that take the place of a protocol version in the first packet.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0, the only major version PostgreSQL speaks since 7.4.
pub const PROTOCOL_MAJOR_3: u16 = 3;

/// PostgreSQL's own limit (`MAX_STARTUP_PACKET_LENGTH`); a longer packet is hostile or broken.
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;

/// The first packet a client sends, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    CancelRequest {
        process_id: u32,
        secret_key: u32,
    },
    Startup {
        major: u16,
        minor: u16,
        /// Parameters in the order sent: `user`, `database`, `application_name`, options...
        params: Vec<(String, String)>,
    },
}

impl StartupPacket {
    /// The value of a startup parameter, e.g. `user`.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed by peer")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid startup packet length {0} (allowed 8 to {MAX_STARTUP_PACKET_LEN})")]
    BadLength(u32),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("message '{tag}' of length {len} exceeds the limit of {max} bytes", tag = *.tag as char)]
    TooLong { tag: u8, len: u32, max: usize },
    #[error("unexpected message '{tag}' {context}", tag = *.tag as char)]
    Unexpected { tag: u8, context: &'static str },
}

/// One whole message read during a login or an internal exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
}

/// Reads one typed message (tag, length, body), refusing bodies longer than `max_len`.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: usize,
) -> Result<Message, ProtocolError> {
    let tag = match r.read_u8().await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed)
        }
        Err(e) => return Err(e.into()),
    };
    let len = r.read_u32().await?;
    if len < 4 {
        return Err(ProtocolError::BadLength(len));
    }
    if (len - 4) as usize > max_len {
        return Err(ProtocolError::TooLong {
            tag,
            len,
            max: max_len,
        });
    }
    let mut body = vec![0; len as usize - 4];
    r.read_exact(&mut body).await?;
    Ok(Message { tag, body })
}

/// Appends one message: tag, length, then what `body` writes.
pub fn put_message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let len_at = buf.len();
    buf.put_u32(0);
    body(buf);
    let len = (buf.len() - len_at) as u32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside a value would end the string early; drop it rather than corrupt.
    buf.extend(s.bytes().filter(|&c| c != 0));
    buf.put_u8(0);
}

/// Messages pgvane sends to clients as if it were the server.
pub mod backend {
    use super::{put_cstr, put_message};
    use bytes::{BufMut, BytesMut};

    pub fn authentication_ok(buf: &mut BytesMut) {
        put_message(buf, b'R', |b| b.put_u32(0));
    }

    pub fn authentication_md5(buf: &mut BytesMut, salt: [u8; 4]) {
        put_message(buf, b'R', |b| {
            b.put_u32(5);
            b.put_slice(&salt);
        });
    }

    pub fn authentication_sasl(buf: &mut BytesMut, mechanism: &str) {
        put_message(buf, b'R', |b| {
            b.put_u32(10);
            put_cstr(b, mechanism);
            b.put_u8(0);
        });
    }

    pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
        put_message(buf, b'R', |b| {
            b.put_u32(11);
            b.put_slice(data);
        });
    }

    pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
        put_message(buf, b'R', |b| {
            b.put_u32(12);
            b.put_slice(data);
        });
    }

    pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
        put_message(buf, b'S', |b| {
            put_cstr(b, name);
            put_cstr(b, value);
        });
    }

    pub fn backend_key_data(buf: &mut BytesMut, process_id: u32, secret_key: u32) {
        put_message(buf, b'K', |b| {
            b.put_u32(process_id);
            b.put_u32(secret_key);
        });
    }

    /// The newest protocol version pgvane speaks, and the protocol options it declines.
    pub fn negotiate_protocol_version(buf: &mut BytesMut, version: u32, options: &[&str]) {
        put_message(buf, b'v', |b| {
            b.put_u32(version);
            b.put_u32(options.len() as u32);
            for o in options {
                put_cstr(b, o);
            }
        });
    }

    pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
        put_message(buf, b'Z', |b| b.put_u8(status));
    }
}

/// A ParameterStatus body: the parameter's name and value (which may be empty).
pub fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut fields = body.split(|&c| c == 0);
    let name = std::str::from_utf8(fields.next()?).ok()?;
    let value = std::str::from_utf8(fields.next().unwrap_or_default()).ok()?;
    (!name.is_empty()).then_some((name, value))
}

/// Splits a body made of NUL-terminated strings (ParameterStatus, SASL mechanism lists).
pub fn cstrings(body: &[u8]) -> impl Iterator<Item = &str> {
    body.split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| std::str::from_utf8(s).ok())
}

/// Finds the Syncs a server never answers: those a client sends during a COPY FROM STDIN
/// that an Execute started (tokio-postgres sends its Sync before the copy data), which the
/// server ignores while in copy-in mode.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyInSyncs {
    since_execute: u32,
}

impl CopyInSyncs {
    /// Follows one frontend message by its tag. At CopyDone or CopyFail, returns how many
    /// Syncs sent since the Execute went unanswered; otherwise 0.
    pub fn frontend(&mut self, tag: u8) -> u32 {
        match tag {
            b'S' => self.since_execute += 1,
            b'E' | b'Q' | b'F' => self.since_execute = 0,
            b'c' | b'f' => return std::mem::take(&mut self.since_execute),
            _ => {}
        }
        0
    }
}

/// What [`Scanner::feed`] reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A message header was completed. `at` is the index of the tag byte in the chunk just
    /// fed; negative when the header began in an earlier chunk.
    Start { tag: u8, at: isize },
    /// The whole body of a message whose tag the scanner was asked to capture.
    Complete { tag: u8, body: &'a [u8] },
}

/// Follows message boundaries in a byte stream that arrives in arbitrary chunks, without
/// copying it: only the headers and the bodies of a few small captured messages are kept.
pub struct Scanner {
    header: [u8; 5],
    have: u8,
    /// Body bytes of the current message not seen yet; `None` between messages. Narrow
    /// types: two scanners are part of every transaction's link future.
    remaining: Option<u32>,
    tag: u8,
    capturing: bool,
    captured: Vec<u8>,
    /// The kinds of message captured, up to three (0: none); inline rather than a slice,
    /// since two scanners are part of every transaction's link future.
    capture_tags: [u8; 3],
    /// Longest message length accepted (`max_packet_size`).
    max_len: u32,
}

/// Longest body the scanner captures; longer ones of a captured kind are only followed.
const CAPTURE_LIMIT: usize = 4096;

impl Scanner {
    /// A scanner capturing the bodies of small messages of the kinds in `capture` (at most
    /// three).
    pub fn new(capture: &[u8]) -> Self {
        let mut capture_tags = [0; 3];
        capture_tags[..capture.len()].copy_from_slice(capture);
        Self {
            header: [0; 5],
            have: 0,
            remaining: None,
            tag: 0,
            capturing: false,
            captured: Vec::new(),
            capture_tags,
            max_len: u32::MAX,
        }
    }

    /// A scanner that fails on a message longer than `max_len` bytes, before any of it is
    /// passed on.
    pub fn limited(capture: &[u8], max_len: u32) -> Self {
        Self {
            max_len,
            ..Self::new(capture)
        }
    }

    fn check_len(&self, tag: u8, len: u32) -> Result<(), ProtocolError> {
        if len < 4 {
            return Err(ProtocolError::BadLength(len));
        }
        if len > self.max_len {
            let max = self.max_len as usize;
            return Err(ProtocolError::TooLong { tag, len, max });
        }
        Ok(())
    }

    /// True between two messages: nothing of a next message has been seen yet.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining.is_none()
    }

    /// Body bytes of the current message not seen yet (0 between messages); `None` in the
    /// middle of a header.
    pub fn body_left(&self) -> Option<usize> {
        (self.have == 0).then(|| self.remaining.unwrap_or(0) as usize)
    }

    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on: impl FnMut(Event<'_>),
    ) -> Result<(), ProtocolError> {
        let mut i = 0;
        while i < chunk.len() {
            if let Some(remaining) = self.remaining {
                let take = (remaining as usize).min(chunk.len() - i);
                if self.capturing {
                    self.captured.extend_from_slice(&chunk[i..i + take]);
                }
                i += take;
                self.remaining = Some(remaining - take as u32);
                if remaining as usize == take {
                    self.finish_message(&mut on);
                }
                continue;
            }
            // The common case, a whole message within the chunk: read in place, with no
            // copy of its header and no state kept.
            if self.have == 0 {
                if let Some(&[tag, a, b, c, d]) = chunk.get(i..i + 5) {
                    let len = u32::from_be_bytes([a, b, c, d]);
                    self.check_len(tag, len)?;
                    let body = len as usize - 4;
                    if body <= chunk.len() - i - 5 {
                        on(Event::Start {
                            tag,
                            at: i as isize,
                        });
                        if body <= CAPTURE_LIMIT && tag != 0 && self.capture_tags.contains(&tag) {
                            on(Event::Complete {
                                tag,
                                body: &chunk[i + 5..i + 5 + body],
                            });
                        }
                        i += 5 + body;
                        continue;
                    }
                }
            }
            let have = self.have as usize;
            let take = (5 - have).min(chunk.len() - i);
            self.header[have..have + take].copy_from_slice(&chunk[i..i + take]);
            self.have += take as u8;
            i += take;
            if self.have < 5 {
                break;
            }
            self.have = 0;
            self.tag = self.header[0];
            let len = u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
            self.check_len(self.tag, len)?;
            on(Event::Start {
                tag: self.tag,
                at: i as isize - 5,
            });
            let body = len as usize - 4;
            self.capturing =
                self.tag != 0 && self.capture_tags.contains(&self.tag) && body <= CAPTURE_LIMIT;
            // A captured body that lies whole in this chunk is handed over from it: no copy,
            // and no allocation for the ReadyForQuery that ends every transaction.
            if self.capturing && body <= chunk.len() - i {
                self.capturing = false;
                on(Event::Complete {
                    tag: self.tag,
                    body: &chunk[i..i + body],
                });
                i += body;
                continue;
            }
            self.captured.clear();
            self.remaining = Some(body as u32);
            if body == 0 {
                self.finish_message(&mut on);
            }
        }
        Ok(())
    }

    fn finish_message(&mut self, on: &mut impl FnMut(Event<'_>)) {
        self.remaining = None;
        if self.capturing {
            self.capturing = false;
            on(Event::Complete {
                tag: self.tag,
                body: &self.captured,
            });
        }
    }
}

/// Reads one startup-phase packet (length-prefixed, no type byte).
/// First byte of a TLS handshake record: a client negotiating TLS directly (PostgreSQL 17's
/// `sslnegotiation=direct`) starts with one instead of a startup packet.
const TLS_HANDSHAKE: u8 = 0x16;

/// Longest TLS record (2^14 bytes of plaintext plus the most expansion allowed).
const MAX_TLS_RECORD: usize = (1 << 14) + 2048;

/// Reads a client's first packet whole, as it is, into `buf`: a startup packet (SSL, GSS and
/// cancel requests included) or, for direct TLS, the first TLS record. For a relay that
/// must not spend a server connection on a client that sends nothing.
pub async fn read_first_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<(), ProtocolError> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header[..4]).await?;
    let len = if header[0] == TLS_HANDSHAKE {
        r.read_exact(&mut header[4..]).await?;
        let record = u16::from_be_bytes([header[3], header[4]]) as usize;
        if record > MAX_TLS_RECORD {
            return Err(ProtocolError::Malformed("TLS record too long"));
        }
        5 + record
    } else {
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
        if !(8..=MAX_STARTUP_PACKET_LEN as u32).contains(&len) {
            return Err(ProtocolError::BadLength(len));
        }
        len as usize
    };
    let have = if header[0] == TLS_HANDSHAKE { 5 } else { 4 };
    buf.extend_from_slice(&header[..have]);
    let start = buf.len();
    buf.resize(start + len - have, 0);
    r.read_exact(&mut buf[start..]).await?;
    Ok(())
}

pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, ProtocolError> {
    let len = match r.read_u32().await {
        Ok(len) => len,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed)
        }
        Err(e) => return Err(e.into()),
    };
    if !(8..=MAX_STARTUP_PACKET_LEN as u32).contains(&len) {
        return Err(ProtocolError::BadLength(len));
    }
    let mut body = vec![0; len as usize - 4];
    r.read_exact(&mut body).await?;
    parse_startup(&body)
}

/// Decodes a startup-phase packet body (everything after the length word).
pub fn parse_startup(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let (code, rest) = split_u32(body).ok_or(ProtocolError::Malformed("missing request code"))?;
    match code {
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            let (process_id, rest) =
                split_u32(rest).ok_or(ProtocolError::Malformed("short cancel request"))?;
            let (secret_key, _) =
                split_u32(rest).ok_or(ProtocolError::Malformed("short cancel request"))?;
            Ok(StartupPacket::CancelRequest {
                process_id,
                secret_key,
            })
        }
        version => Ok(StartupPacket::Startup {
            major: (version >> 16) as u16,
            minor: (version & 0xffff) as u16,
            params: parse_params(rest)?,
        }),
    }
}

fn split_u32(b: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = b.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*head), rest))
}

/// `name\0value\0 ... \0`: pairs of NUL-terminated strings closed by an empty name.
fn parse_params(mut b: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let name = take_cstr(&mut b)?;
        if name.is_empty() {
            return Ok(params);
        }
        let value = take_cstr(&mut b)?;
        params.push((name, value));
    }
}

fn take_cstr(b: &mut &[u8]) -> Result<String, ProtocolError> {
    let nul = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(ProtocolError::Malformed("unterminated string"))?;
    let s = std::str::from_utf8(&b[..nul])
        .map_err(|_| ProtocolError::Malformed("string is not UTF-8"))?
        .to_owned();
    *b = &b[nul + 1..];
    Ok(s)
}

/// Severity of an ErrorResponse pgvane sends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An ErrorResponse ('E') message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub severity: Severity,
    /// Five-character SQLSTATE, e.g. `57P03`.
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorResponse {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            ..Self::fatal(code, message)
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Appends the encoded message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        put_message(buf, b'E', |b| {
            let mut field = |tag: u8, value: &str| {
                b.put_u8(tag);
                put_cstr(b, value);
            };
            field(b'S', self.severity.as_str());
            field(b'V', self.severity.as_str());
            field(b'C', self.code);
            field(b'M', &self.message);
            if let Some(d) = &self.detail {
                field(b'D', d);
            }
            if let Some(h) = &self.hint {
                field(b'H', h);
            }
            b.put_u8(0);
        });
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_first_packet_is_read_whole_as_it_is() {
        let startup = [&[0u8, 0, 0, 9][..], b"abcd\0"].concat();
        let ssl = [0u8, 0, 0, 8, 4, 210, 22, 47];
        let tls = [&[0x16u8, 3, 1, 0, 3][..], b"xyz"].concat();
        for packet in [&startup[..], &ssl, &tls] {
            let input = [packet, b"more"].concat();
            let mut buf = BytesMut::new();
            read_first_packet(&mut &input[..], &mut buf).await.unwrap();
            assert_eq!(&buf[..], packet);
        }
        let huge = [0u8, 1, 0, 0, 0, 0, 0, 0];
        let mut buf = BytesMut::new();
        let err = read_first_packet(&mut &huge[..], &mut buf)
            .await
            .unwrap_err();
        assert!(matches!(err, ProtocolError::BadLength(65536)), "{err}");
    }

    use super::*;

    #[test]
    fn syncs_sent_during_an_extended_copy_in_go_unanswered() {
        let mut c = CopyInSyncs::default();
        // Bind, Execute (COPY FROM STDIN), Sync, CopyData, CopyDone, Sync.
        let ignored: Vec<u32> = b"BESdcS".iter().map(|&t| c.frontend(t)).collect();
        assert_eq!(ignored, [0, 0, 0, 0, 1, 0]);
        // A simple-query COPY after an answered Sync: nothing ignored.
        let ignored: Vec<u32> = b"BESQdc".iter().map(|&t| c.frontend(t)).collect();
        assert_eq!(ignored, [0; 6]);
    }

    fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = ((8 + rest.len()) as u32).to_be_bytes().to_vec();
        v.extend(code.to_be_bytes());
        v.extend(rest);
        v
    }

    #[tokio::test]
    async fn reads_startup_message() {
        let bytes = packet(
            196_608,
            b"user\0alice\0database\0app\0application_name\0psql\0\0",
        );
        let p = read_startup(&mut bytes.as_slice()).await.unwrap();
        assert_eq!(p.param("user"), Some("alice"));
        assert_eq!(p.param("database"), Some("app"));
        assert!(matches!(
            p,
            StartupPacket::Startup {
                major: 3,
                minor: 0,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn reads_ssl_gss_and_cancel_requests() {
        let ssl = packet(SSL_REQUEST_CODE, b"");
        assert_eq!(
            read_startup(&mut ssl.as_slice()).await.unwrap(),
            StartupPacket::SslRequest
        );
        let gss = packet(GSSENC_REQUEST_CODE, b"");
        assert_eq!(
            read_startup(&mut gss.as_slice()).await.unwrap(),
            StartupPacket::GssEncRequest
        );
        let cancel = packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(
            read_startup(&mut cancel.as_slice()).await.unwrap(),
            StartupPacket::CancelRequest {
                process_id: 7,
                secret_key: 9
            }
        );
    }

    #[tokio::test]
    async fn rejects_hostile_lengths_before_allocating() {
        for len in [0u32, 7, 10_001, u32::MAX] {
            let bytes = len.to_be_bytes();
            let err = read_startup(&mut bytes.as_slice()).await.unwrap_err();
            assert!(
                matches!(err, ProtocolError::BadLength(l) if l == len),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn rejects_truncated_and_malformed_packets() {
        let unterminated = packet(196_608, b"user\0alice");
        assert!(matches!(
            read_startup(&mut unterminated.as_slice()).await,
            Err(ProtocolError::Malformed(_))
        ));
        let short_cancel = packet(CANCEL_REQUEST_CODE, &[0, 0]);
        assert!(matches!(
            read_startup(&mut short_cancel.as_slice()).await,
            Err(ProtocolError::Malformed(_))
        ));
        let mut truncated = packet(196_608, b"user\0a\0\0");
        truncated.truncate(9);
        assert!(matches!(
            read_startup(&mut truncated.as_slice()).await,
            Err(ProtocolError::Io(_))
        ));
        assert!(matches!(
            read_startup(&mut [].as_slice()).await,
            Err(ProtocolError::Closed)
        ));
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        put_message(&mut b, tag, |m| m.put_slice(body));
        b.to_vec()
    }

    type Scanned = (Vec<(u8, isize)>, Vec<(u8, Vec<u8>)>);

    /// Feeds `stream` in chunks of `size` and records (tag, at-offset-in-stream) and captures.
    fn scan(stream: &[u8], size: usize) -> Scanned {
        let mut sc = Scanner::new(b"ZS");
        let (mut starts, mut captures) = (Vec::new(), Vec::new());
        for (n, chunk) in stream.chunks(size).enumerate() {
            let base = (n * size) as isize;
            sc.feed(chunk, |e| match e {
                Event::Start { tag, at } => starts.push((tag, base + at)),
                Event::Complete { tag, body } => captures.push((tag, body.to_vec())),
            })
            .unwrap();
        }
        assert!(sc.at_boundary());
        (starts, captures)
    }

    #[test]
    fn scanner_finds_boundaries_whatever_the_chunking() {
        let mut stream = msg(b'T', &[0; 30]);
        stream.extend(msg(b'S', b"TimeZone\0UTC\0"));
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"I"));
        let whole = scan(&stream, stream.len());
        assert_eq!(whole.0, [(b'T', 0), (b'S', 35), (b'C', 53), (b'Z', 67)]);
        assert_eq!(
            whole.1,
            [(b'S', b"TimeZone\0UTC\0".to_vec()), (b'Z', b"I".to_vec())]
        );
        for size in 1..stream.len() {
            assert_eq!(scan(&stream, size), whole, "chunk size {size}");
        }
    }

    #[test]
    fn scanner_skips_large_bodies_without_capturing() {
        let big = vec![7u8; 100_000];
        let mut stream = msg(b'S', &big);
        stream.extend(msg(b'Z', b"T"));
        let (starts, captures) = scan(&stream, 8192);
        assert_eq!(starts.len(), 2);
        assert_eq!(captures, [(b'Z', b"T".to_vec())]);
    }

    #[test]
    fn scanner_rejects_a_length_below_four() {
        let mut sc = Scanner::new(b"");
        let err = sc.feed(&[b'Q', 0, 0, 0, 3], |_| {}).unwrap_err();
        assert!(matches!(err, ProtocolError::BadLength(3)));
    }

    #[tokio::test]
    async fn read_message_bounds_the_body() {
        let bytes = msg(b'p', &[1; 100]);
        let m = read_message(&mut bytes.as_slice(), 100).await.unwrap();
        assert_eq!((m.tag, m.body.len()), (b'p', 100));
        let err = read_message(&mut bytes.as_slice(), 99).await.unwrap_err();
        assert!(
            matches!(err, ProtocolError::TooLong { tag: b'p', .. }),
            "{err}"
        );
    }

    #[test]
    fn encodes_error_response() {
        let mut buf = BytesMut::new();
        ErrorResponse::fatal("57P03", "no primary\0available")
            .with_hint("wait")
            .encode(&mut buf);
        assert_eq!(buf[0], b'E');
        let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 1);
        let body = &buf[5..];
        assert_eq!(
            body,
            b"SFATAL\0VFATAL\0C57P03\0Mno primaryavailable\0Hwait\0\0".as_slice()
        );
    }
}

#[cfg(test)]
mod framing_properties {
    use proptest::prelude::*;

    use super::*;

    /// Messages (tag, body) and the stream they make.
    fn stream(messages: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, body) in messages {
            out.push(*tag);
            out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            out.extend_from_slice(body);
        }
        out
    }

    fn messages() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        let tag = prop::sample::select(b"QPBEDSHCdcfXZTD1n2".to_vec());
        prop::collection::vec((tag, prop::collection::vec(any::<u8>(), 0..300)), 0..40)
    }

    proptest! {
        /// However a stream of messages is cut into chunks, the scanner sees every message
        /// start, in order, where it is, captures small bodies whole, and ends between two
        /// messages.
        #[test]
        fn any_cut_of_a_stream_scans_the_same(
            msgs in messages(),
            cuts in prop::collection::vec(1usize..64, 1..200),
        ) {
            let bytes = stream(&msgs);
            let mut scanner = Scanner::new(b"ZSC");
            let (mut starts, mut captured) = (Vec::new(), Vec::new());
            let (mut at, mut cut) = (0, cuts.iter().cycle());
            while at < bytes.len() {
                let end = (at + cut.next().unwrap()).min(bytes.len());
                scanner
                    .feed(&bytes[at..end], |e| match e {
                        Event::Start { tag, at: i } => starts.push((tag, at as isize + i)),
                        Event::Complete { tag, body } => captured.push((tag, body.to_vec())),
                    })
                    .unwrap();
                at = end;
            }
            let mut offset = 0isize;
            let want: Vec<(u8, isize)> = msgs
                .iter()
                .map(|(tag, body)| {
                    let start = offset;
                    offset += 5 + body.len() as isize;
                    (*tag, start)
                })
                .collect();
            prop_assert_eq!(starts, want);
            let small: Vec<(u8, Vec<u8>)> = msgs
                .iter()
                .filter(|(tag, _)| b"ZSC".contains(tag))
                .cloned()
                .collect();
            prop_assert_eq!(captured, small);
            prop_assert!(scanner.at_boundary());
        }

        /// A length field over the limit, or under 4, is refused wherever the cut falls,
        /// before any of the message's body is reported.
        #[test]
        fn a_bad_length_is_refused_at_any_cut(len in prop_oneof![0u32..4, 1001u32..u32::MAX], cut in 1usize..5) {
            let mut bytes = vec![b'Q'];
            bytes.extend_from_slice(&len.to_be_bytes());
            let mut scanner = Scanner::limited(b"", 1000);
            let first = scanner.feed(&bytes[..cut], |_| {});
            let second = first.and_then(|()| scanner.feed(&bytes[cut..], |_| {}));
            prop_assert!(second.is_err());
        }
    }
}
