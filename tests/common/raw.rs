//! A raw-socket PostgreSQL client: the tests decide exactly which bytes go out in which
//! write, and read back every message as the server (or pgvane) sent it.

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Long enough for a busy machine; a test that hits it has found a hang.
pub const ANSWER_LIMIT: Duration = super::PATIENCE;

/// One backend message: its tag and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// An ErrorResponse's (or NoticeResponse's) field, e.g. `b'C'` for the SQLSTATE.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&c, tail)) = rest.split_first() {
            if c == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }

    /// A DataRow's first column as text.
    pub fn first_column(&self) -> Option<String> {
        let len = i32::from_be_bytes(self.body.get(2..6)?.try_into().ok()?);
        let len = usize::try_from(len).ok()?;
        Some(String::from_utf8_lossy(self.body.get(6..6 + len)?).into_owned())
    }
}

pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects and logs in with trust authentication (the listener must allow it), reading
    /// up to the first ReadyForQuery. Returns the login's messages too.
    pub async fn login(port: u16, user: &str, database: &str) -> (RawClient, Vec<Msg>) {
        Self::login_with(port, &[("user", user), ("database", database)]).await
    }

    pub async fn login_with(port: u16, params: &[(&str, &str)]) -> (RawClient, Vec<Msg>) {
        Self::connect(port).await.start(params).await
    }

    /// As [`RawClient::login`], from local address `source` (127.0.0.2, ...): a client
    /// another address than the other tests' clients.
    pub async fn login_from(
        port: u16,
        source: &str,
        user: &str,
        database: &str,
    ) -> (RawClient, Vec<Msg>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let c = RawClient {
            stream,
            buf: Vec::new(),
        };
        c.start(&[("user", user), ("database", database)]).await
    }

    /// Sends the startup packet and logs in (see [`RawClient::authenticate`]).
    async fn start(self, params: &[(&str, &str)]) -> (RawClient, Vec<Msg>) {
        let mut c = self;
        let mut out = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut out).unwrap();
        c.send(&out).await;
        let login = c.authenticate().await;
        (c, login)
    }

    /// Answers a SCRAM-SHA-256 exchange with the harness password (if the server asks for
    /// one), then reads up to the first ReadyForQuery.
    async fn authenticate(&mut self) -> Vec<Msg> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let mut scram = None;
        let mut got = Vec::new();
        loop {
            let m = self.next().await.expect("login answered");
            if m.tag == b'R' {
                let kind = u32::from_be_bytes(m.body[..4].try_into().unwrap());
                let data = &m.body[4..];
                let mut out = BytesMut::new();
                match kind {
                    0 => {}
                    10 => {
                        let s = ScramSha256::new(
                            super::PASSWORD.as_bytes(),
                            ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                            .unwrap();
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().expect("SASL started");
                        s.update(data).unwrap();
                        frontend::sasl_response(s.message(), &mut out).unwrap();
                    }
                    12 => scram.as_mut().expect("SASL started").finish(data).unwrap(),
                    other => panic!("authentication method {other} not supported here"),
                }
                if !out.is_empty() {
                    self.send(&out).await;
                }
                continue;
            }
            let done = m.tag == b'Z' || (m.tag == b'E' && got.is_empty());
            got.push(m);
            if done {
                return got;
            }
        }
    }

    /// The BackendKeyData of a login's messages: (process id, secret key).
    pub fn key(login: &[Msg]) -> (i32, i32) {
        let k = login
            .iter()
            .find(|m| m.tag == b'K')
            .expect("BackendKeyData");
        let int = |at: usize| i32::from_be_bytes(k.body[at..at + 4].try_into().unwrap());
        (int(0), int(4))
    }

    /// Sends a CancelRequest for `key` on a connection of its own.
    pub async fn cancel(port: u16, key: (i32, i32)) {
        let mut out = BytesMut::new();
        frontend::cancel_request(key.0, key.1, &mut out);
        let mut c = Self::connect(port).await;
        c.send(&out).await;
        c.until_closed().await;
    }

    pub async fn connect(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next message; `None` when the peer closed the connection.
    pub async fn next(&mut self) -> Option<Msg> {
        // Boxed: its 64 KiB read buffer would otherwise be part of every caller's future.
        tokio::time::timeout(ANSWER_LIMIT, Box::pin(self.next_unbounded()))
            .await
            .expect("no message within the answer limit")
    }

    async fn next_unbounded(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let body = self.buf[5..1 + len].to_vec();
                    let tag = self.buf[0];
                    self.buf.drain(..1 + len);
                    return Some(Msg { tag, body });
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Messages up to and including the next ReadyForQuery; panics if the connection closes
    /// first (the messages so far are in the panic message).
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut got = Vec::new();
        loop {
            match self.next().await {
                Some(m) => {
                    let done = m.tag == b'Z';
                    got.push(m);
                    if done {
                        return got;
                    }
                }
                None => panic!("connection closed before ReadyForQuery; got {}", show(&got)),
            }
        }
    }

    /// Waits for the peer to close the connection, returning what it sent before.
    pub async fn until_closed(&mut self) -> Vec<Msg> {
        let mut got = Vec::new();
        while let Some(m) = self.next().await {
            got.push(m);
        }
        got
    }
}

/// Message tags and error codes, for assertion messages.
pub fn show(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(|m| match m.tag {
            b'E' => format!(
                "E({} {})",
                m.field(b'C').unwrap_or_default(),
                m.field(b'M').unwrap_or_default()
            ),
            t => (t as char).to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first column of each DataRow, in order.
pub fn rows(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .filter_map(Msg::first_column)
        .collect()
}

pub fn query(sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).unwrap();
    out
}

/// Parse (named or unnamed), Bind, Execute and Sync of a parameterless statement.
pub fn extended(name: &str, sql: &str) -> BytesMut {
    let mut out = parse(name, sql);
    out.extend_from_slice(&bind_execute_sync(name));
    out
}

pub fn parse(name: &str, sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    frontend::parse(name, sql, std::iter::empty(), &mut out).unwrap();
    out
}

/// Bind of statement `name` to the unnamed portal, Execute, Sync.
pub fn bind_execute_sync(name: &str) -> BytesMut {
    let mut out = BytesMut::new();
    frontend::bind(
        "",
        name,
        std::iter::empty::<i16>(),
        std::iter::empty::<Option<&[u8]>>(),
        |_: Option<&[u8]>,
         _: &mut BytesMut|
         -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            unreachable!()
        },
        std::iter::empty::<i16>(),
        &mut out,
    )
    .map_err(|_| ())
    .unwrap();
    frontend::execute("", 0, &mut out).unwrap();
    frontend::sync(&mut out);
    out
}

pub fn sync() -> BytesMut {
    let mut out = BytesMut::new();
    frontend::sync(&mut out);
    out
}

pub fn terminate() -> BytesMut {
    let mut out = BytesMut::new();
    frontend::terminate(&mut out);
    out
}

pub fn copy_data(data: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    frontend::CopyData::new(data).unwrap().write(&mut out);
    out
}

/// The columns of the first RowDescription: (name, type OID).
pub fn columns(msgs: &[Msg]) -> Vec<(String, u32)> {
    let Some(t) = msgs.iter().find(|m| m.tag == b'T') else {
        return Vec::new();
    };
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..u16::from_be_bytes(t.body[..2].try_into().unwrap()) {
        let end = at + t.body[at..].iter().position(|&b| b == 0).unwrap();
        let name = String::from_utf8_lossy(&t.body[at..end]).into_owned();
        let oid = u32::from_be_bytes(t.body[end + 7..end + 11].try_into().unwrap());
        out.push((name, oid));
        at = end + 19;
    }
    out
}

/// Every DataRow as its values (`None` for NULL).
pub fn table(msgs: &[Msg]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let mut at = 2;
            let n = u16::from_be_bytes(m.body[..2].try_into().unwrap());
            (0..n)
                .map(|_| {
                    let len = i32::from_be_bytes(m.body[at..at + 4].try_into().unwrap());
                    at += 4;
                    let len = usize::try_from(len).ok()?;
                    at += len;
                    Some(String::from_utf8_lossy(&m.body[at - len..at]).into_owned())
                })
                .collect()
        })
        .collect()
}

/// Runs `sql` on a console connection; its messages up to ReadyForQuery.
pub async fn run(console: &mut RawClient, sql: &str) -> Vec<Msg> {
    console.send(&query(sql)).await;
    console.until_ready().await
}

/// A result row as (column name -> value).
pub type Row = std::collections::HashMap<String, Option<String>>;

/// The row of `table` whose first column is `key`.
pub fn row_of(msgs: &[Msg], key: &str) -> Row {
    row_where(msgs, &[key])
}

/// The row of `table` whose first columns are `keys`.
pub fn row_where(msgs: &[Msg], keys: &[&str]) -> Row {
    let names = columns(msgs);
    let row = table(msgs)
        .into_iter()
        .find(|r| keys.iter().zip(r).all(|(k, v)| v.as_deref() == Some(*k)))
        .unwrap_or_else(|| panic!("no row {keys:?}: {:?}", table(msgs)));
    names.into_iter().map(|(n, _)| n).zip(row).collect()
}

/// Column `column` of `row`, a number.
pub fn num(row: &Row, column: &str) -> u64 {
    row[column]
        .as_deref()
        .unwrap_or_else(|| panic!("{column} is NULL"))
        .parse()
        .unwrap_or_else(|_| panic!("{column} is not a number: {:?}", row[column]))
}
