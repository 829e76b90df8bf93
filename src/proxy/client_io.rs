//! A pooled client's connection as the data path drives it: plain TCP, or TLS over it.
//!
//! The link reads and writes a client through the few operations of [`ClientIo`]; each
//! session is compiled for its stream type, so a plain TCP session runs exactly the code
//! it ran before TLS existed, and TLS is confined to [`TlsClient`]'s implementation.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// What the pooled data path needs of a client connection.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    /// Whether the connection is encrypted (TLS).
    const ENCRYPTED: bool;

    type Reader<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    type Writer<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;

    /// Read and write halves, driven concurrently by one task (the link).
    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);

    /// Ready once a read would not wait: data, end of stream or an error. Parks on the
    /// socket's own waker slot (an idle session's whole wait).
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// A request's first read, once the idle wait found the client readable, without
    /// waiting: `None` when that readiness was stale (nothing to read after all).
    fn read_request_start(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>>;

    /// The TCP connection underneath (addresses).
    fn tcp(&self) -> &TcpStream;

    /// The plain TCP connection this is, to hand to another process; a TLS one comes back
    /// (its state cannot leave the process).
    fn into_tcp(self) -> Result<TcpStream, Self>
    where
        Self: Sized;

    /// Resolves when the client hangs up, while its work waits for a server; what it sends
    /// meanwhile is kept in `buf` (up to `limit` bytes), not lost.
    fn watch<'a>(
        &'a self,
        buf: &'a mut BytesMut,
        limit: usize,
    ) -> impl Future<Output = ()> + Send + 'a;

    /// The common name of the client's certificate (verified, when the listener asks for
    /// one).
    fn certificate_cn(&self) -> Option<String> {
        None
    }

    /// Protocol and cipher suite, as PgBouncer's SHOW CLIENTS shows them; empty without TLS.
    fn tls_description(&self) -> Box<str> {
        Box::default()
    }

    /// The client's address, for the log. Asked of the socket rather than kept per session:
    /// idle sessions are what a pooler has most of, and it is only needed when one ends
    /// badly.
    fn peer(&self) -> SocketAddr {
        self.tcp()
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

impl ClientIo for TcpStream {
    const ENCRYPTED: bool = false;

    type Reader<'a> = tcp::ReadHalf<'a>;
    type Writer<'a> = tcp::WriteHalf<'a>;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        TcpStream::split(self)
    }

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    /// A read that leaves the socket empty clears the readiness, as tokio's own
    /// `poll_read` does, so the next idle wait sleeps until the next event instead of
    /// spending a system call to find the socket empty.
    fn read_request_start(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        let room = buf.capacity() - buf.len();
        let mut read = None;
        let tried = self.try_io(tokio::io::Interest::READABLE, || {
            let n = self.try_read_buf(buf)?;
            read = Some(n);
            if n > 0 && n < room {
                // Drained: reported as WouldBlock only so that tokio clears readiness.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match tried {
            Err(e) if read.is_none() && e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(read),
        }
    }

    fn tcp(&self) -> &TcpStream {
        self
    }

    fn into_tcp(self) -> Result<TcpStream, Self> {
        Ok(self)
    }

    fn watch<'a>(
        &'a self,
        buf: &'a mut BytesMut,
        limit: usize,
    ) -> impl Future<Output = ()> + Send + 'a {
        super::watch_client(self, buf, limit)
    }
}

/// A client that negotiated TLS. Boxed: the TLS state is a few KiB, and an idle session
/// should carry a pointer, not all of it.
pub struct TlsClient(pub Box<TlsStream<TcpStream>>);

impl TlsClient {
    /// Whether decrypted bytes (or the client's close) wait in the TLS layer: then a read
    /// would not wait, whatever the socket says.
    fn buffered(&mut self) -> bool {
        let (_, tls) = self.0.get_mut();
        match tls.process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            // A broken record: the next read reports it.
            Err(_) => true,
        }
    }
}

impl ClientIo for TlsClient {
    const ENCRYPTED: bool = true;

    type Reader<'a> = ReadHalf<&'a mut TlsStream<TcpStream>>;
    type Writer<'a> = WriteHalf<&'a mut TlsStream<TcpStream>>;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(&mut *self.0)
    }

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buffered() {
            return Poll::Ready(Ok(()));
        }
        self.0.get_ref().0.poll_read_ready(cx)
    }

    /// A read that registers no waker: pending means the readiness was stale (a partial
    /// record, say); the idle wait that follows registers one again.
    fn read_request_start(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        let mut cx = Context::from_waker(Waker::noop());
        let spare = buf.spare_capacity_mut();
        let mut read = ReadBuf::uninit(spare);
        match Pin::new(&mut *self.0).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                // SAFETY: poll_read initialized the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                Ok(Some(n))
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(None),
        }
    }

    fn tcp(&self) -> &TcpStream {
        self.0.get_ref().0
    }

    fn into_tcp(self) -> Result<TcpStream, Self> {
        Err(self)
    }

    fn certificate_cn(&self) -> Option<String> {
        let certs = self.0.get_ref().1.peer_certificates()?;
        crate::tls::common_name(certs.first()?)
    }

    fn tls_description(&self) -> Box<str> {
        let tls = self.0.get_ref().1;
        let version = match tls.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLS",
        };
        match tls.negotiated_cipher_suite() {
            Some(suite) => format!("{version}/{:?}", suite.suite()).into(),
            None => version.into(),
        }
    }

    /// Hang-ups only: the client's bytes are TLS records, which only the session may
    /// decrypt. Once it sends something (not a hang-up), the watch ends without a verdict:
    /// the work is then dropped only when it would have been anyway (cancel, timeout).
    async fn watch(&self, _buf: &mut BytesMut, _limit: usize) {
        let mut probe = [0u8; 1];
        match self.tcp().peek(&mut probe).await {
            // Hung up.
            Ok(0) | Err(_) => {}
            Ok(_) => std::future::pending().await,
        }
    }
}

impl AsyncRead for TlsClient {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsClient {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}
