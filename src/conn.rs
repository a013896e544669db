//! What the server knows about one client connection: exchanges in flight,
//! when the last one ended, and whether a request head is being trickled in.
//!
//! hyper's own HTTP/1 `header_read_timeout` also runs while a keep-alive
//! connection waits idle for its next request, which would cut pooled client
//! connections at the header limit instead of `idle_timeout`; so the server
//! enforces the head limit itself, from the bytes it sees arrive.

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The HTTP/2 connection preface, up to where it differs from every HTTP/1 method.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// `protocol` values: bytes of the preface matched so far, then one of these.
const HTTP1: u8 = 0xF1;
const HTTP2: u8 = 0xF2;

/// One client connection's state, shared by its requests and its driver.
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    active: AtomicUsize,
    /// Exchanges begun on this connection.
    exchanges: AtomicU64,
    /// Milliseconds since `epoch` when the last exchange ended.
    last_active_ms: AtomicU64,
    /// Milliseconds since `epoch` + 1 when the first byte of a pending HTTP/1 head arrived (0: none).
    head_started_ms: AtomicU64,
    protocol: AtomicU8,
    /// The server is closing hyper's side of an idle connection to park the socket:
    /// the closing must not shut the socket down.
    parking: AtomicBool,
    epoch: Instant,
}

impl ConnInfo {
    /// A new connection from `peer`.
    pub fn new(peer: SocketAddr) -> Self {
        ConnInfo {
            peer,
            active: AtomicUsize::new(0),
            exchanges: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(0),
            // The first head is timed from the accept: a silent client is cut off too.
            head_started_ms: AtomicU64::new(1),
            protocol: AtomicU8::new(0),
            parking: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// How long the connection has had no exchange in flight (zero while one is).
    pub fn idle_for(&self) -> Duration {
        if self.active.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_active_ms.load(Ordering::SeqCst)),
        )
    }

    /// True when an HTTP/1 request head started arriving more than `limit` ago and is still incomplete.
    pub fn head_overdue(&self, limit: Duration) -> bool {
        let started = self.head_started_ms.load(Ordering::SeqCst);
        started != 0
            && self.active.load(Ordering::SeqCst) == 0
            && Duration::from_millis(self.now_ms().saturating_sub(started - 1)) > limit
    }

    /// True when nothing is in flight and no request head has started arriving:
    /// the connection may be parked.
    pub fn at_rest(&self) -> bool {
        self.active.load(Ordering::SeqCst) == 0 && self.head_started_ms.load(Ordering::SeqCst) == 0
    }

    /// How much longer a connection with nothing in flight may wait for a request:
    /// the head limit from the accept for a new one, else the idle limit.
    pub fn wait_left(&self, idle: Duration, head_limit: Duration) -> Duration {
        let now = self.now_ms();
        let started = self.head_started_ms.load(Ordering::SeqCst);
        let (limit, since) = if started != 0 {
            (head_limit, started - 1)
        } else {
            (idle, self.last_active_ms.load(Ordering::SeqCst))
        };
        limit.saturating_sub(Duration::from_millis(now.saturating_sub(since)))
    }

    /// How many exchanges have begun on this connection.
    pub fn exchanges(&self) -> u64 {
        self.exchanges.load(Ordering::SeqCst)
    }

    /// Marks (or unmarks) the connection as being parked; see [`Watched`].
    pub fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::SeqCst);
    }

    fn saw_bytes(&self, bytes: &[u8]) {
        let mut protocol = self.protocol.load(Ordering::Relaxed);
        if protocol != HTTP1 && protocol != HTTP2 {
            // HTTP/2 opens with its preface (possibly split across reads); its frames are
            // never request heads to time. Anything else is HTTP/1.
            let matched = usize::from(protocol);
            let take = bytes.len().min(H2_PREFACE.len() - matched);
            protocol = if bytes[..take] != H2_PREFACE[matched..matched + take] {
                HTTP1
            } else if matched + take == H2_PREFACE.len() {
                HTTP2
            } else {
                (matched + take) as u8
            };
            self.protocol.store(protocol, Ordering::Relaxed);
            if protocol == HTTP2 {
                self.head_started_ms.store(0, Ordering::SeqCst);
            }
        }
        // Stray CRLF between keep-alive requests (RFC 9112 §2.2) starts no head.
        if bytes.iter().all(|b| *b == b'\r' || *b == b'\n') {
            return;
        }
        if protocol == HTTP1 && self.active.load(Ordering::SeqCst) == 0 {
            let _ = self.head_started_ms.compare_exchange(
                0,
                self.now_ms() + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }
}

/// Marks an exchange in flight on its connection until dropped (with the response body).
pub struct ExchangeGuard(Arc<ConnInfo>);

impl ExchangeGuard {
    /// A request head is complete and its exchange begins.
    pub fn new(conn: &Arc<ConnInfo>) -> Self {
        conn.active.fetch_add(1, Ordering::SeqCst);
        conn.exchanges.fetch_add(1, Ordering::SeqCst);
        conn.head_started_ms.store(0, Ordering::SeqCst);
        ExchangeGuard(conn.clone())
    }
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        self.0
            .last_active_ms
            .store(self.0.now_ms(), Ordering::SeqCst);
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

pin_project! {
    /// The connection's byte stream, reporting what it reads to its `ConnInfo`.
    pub struct Watched<I> {
        #[pin]
        io: I,
        conn: Arc<ConnInfo>,
        // Bytes read before a park that belong to the next request: read first.
        prefix: Bytes,
    }
}

impl<I> Watched<I> {
    /// Wraps `io` for `conn`.
    pub fn new(io: I, conn: Arc<ConnInfo>) -> Self {
        Watched::with_prefix(io, conn, Bytes::new())
    }

    /// Wraps `io` for `conn`; reads yield `prefix` before anything from `io`.
    pub fn with_prefix(io: I, conn: Arc<ConnInfo>, prefix: Bytes) -> Self {
        Watched { io, conn, prefix }
    }

    /// True while some of the prefix is still to be read.
    pub fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// The wrapped stream and what is left of the prefix, unread.
    pub fn into_parts(self) -> (I, Bytes) {
        (self.io, self.prefix)
    }
}

impl<I: AsyncRead> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.conn.saw_bytes(&buf.filled()[before..]);
            return Poll::Ready(Ok(()));
        }
        let polled = this.io.poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.conn.saw_bytes(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.conn.parking.load(Ordering::SeqCst) {
            // hyper's side closes; the socket stays open, parked for the next request.
            return this.io.poll_flush(cx);
        }
        this.io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ConnInfo {
        ConnInfo::new("127.0.0.1:1".parse().unwrap())
    }

    #[tokio::test]
    async fn a_prefix_read_in_part_hands_back_the_rest() {
        use tokio::io::AsyncReadExt;
        let c = Arc::new(conn());
        let mut w = Watched::with_prefix(&b"tail"[..], c, Bytes::from_static(b"GET /x HT"));
        let mut two = [0u8; 2];
        w.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"GE");
        let (mut io, rest) = w.into_parts();
        assert_eq!(&rest[..], b"T /x HT");
        let mut tail = Vec::new();
        io.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, b"tail");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_timed_from_the_accept() {
        let c = conn();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(c.head_overdue(Duration::from_millis(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stray_crlf_after_an_exchange_starts_no_head() {
        let c = Arc::new(conn());
        c.saw_bytes(b"GET / HTTP/1.1\r\n\r\n");
        drop(ExchangeGuard::new(&c));
        c.saw_bytes(b"\r\n");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!c.head_overdue(Duration::from_millis(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn http1_head_is_timed_from_its_first_byte() {
        let c = Arc::new(conn());
        drop(ExchangeGuard::new(&c));
        c.saw_bytes(b"POST /x HT");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(c.head_overdue(Duration::from_millis(200)));
        assert!(!c.head_overdue(Duration::from_millis(400)));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_is_never_head_timed_even_when_its_preface_comes_in_pieces() {
        let c = conn();
        for piece in [
            &b"PR"[..],
            b"I * HT",
            b"TP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x00\x00\x12\x04",
        ] {
            c.saw_bytes(piece);
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!c.head_overdue(Duration::from_millis(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_completed_head_stops_the_timer() {
        let c = Arc::new(conn());
        c.saw_bytes(b"GET / HTTP/1.1\r\n\r\n");
        let exchange = ExchangeGuard::new(&c);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!c.head_overdue(Duration::from_millis(1)));
        drop(exchange);
        assert!(
            !c.head_overdue(Duration::from_millis(1)),
            "no new head has started"
        );
    }
}
