//! PostgreSQL wire protocol: the parts pgvane speaks itself.
//!
//! Passthrough listeners never parse the byte stream of a healthy session. pgvane only speaks
//! the protocol when it must answer a client on its own: it declines SSL/GSS encryption,
//! reads the StartupMessage and sends an ErrorResponse. Every length read from the network
//! is bounded before anything is allocated for it.

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
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
}

/// Reads one startup-phase packet (length-prefixed, no type byte).
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

/// Severity of an ErrorResponse. pgvane only ever ends connections with its own errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
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
        buf.put_u8(b'E');
        let len_at = buf.len();
        buf.put_u32(0);
        let mut field = |tag: u8, value: &str| {
            buf.put_u8(tag);
            // A NUL inside a value would end the field early; drop it rather than corrupt.
            buf.extend(value.bytes().filter(|&c| c != 0));
            buf.put_u8(0);
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
        buf.put_u8(0);
        let len = (buf.len() - len_at) as u32;
        buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
