//! HTTP/1.1 exchanges with an upstream, driven by the request's own task.
//!
//! hyper's client runs each connection as a task of its own and hands it the
//! request and takes the response back over channels: per request, two tasks
//! wake each other several times. Here the request's future writes the request
//! and reads the response head, and the response body reads the rest from the
//! socket when the client's connection polls it. Used for requests whose body
//! the proxy holds whole (none, or a scrubbed form), where nothing has to go up
//! while the answer comes down; streamed uploads stay on hyper's client, which
//! drives both directions at once.
//!
//! Framing follows RFC 9112 §6.3; a response whose framing is in doubt
//! (`Transfer-Encoding` with `Content-Length`, no length at all) is read to the
//! connection's close and the connection is never reused, so a confused
//! upstream cannot make one response run into the next.

use crate::body::BoxError;
use crate::recycle;
use crate::rewrite::list_elements;
use crate::upstream::Home;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{request, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Any byte stream an upstream connection runs on (TCP, TLS, a tunnel).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Longest response head accepted (hyper's client default, so no upstream that worked before fails now).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Most header fields in a response head or trailer section (hyper's default).
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (extensions included) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// First read size: doubled while reads fill it (large bodies), halved when they stay small.
const MIN_READ: usize = 8 * 1024;
/// Largest read size: large downloads move in few, large frames.
const MAX_READ: usize = 256 * 1024;
/// Largest held body sent on this exchange, in the same write as the head: small
/// enough that the socket takes it at once, so the request is never stuck going
/// up while an early answer (a 413, a 401) waits to come down. Larger forms go
/// through hyper's client, which reads and writes at the same time.
pub const MAX_BODY: usize = 16 * 1024;

/// An HTTP/1.1 connection to an upstream, between exchanges.
pub struct Conn {
    io: Box<dyn Io>,
    /// Bytes read and not used yet.
    buf: BytesMut,
    read_size: usize,
    /// The deadline of the exchange in flight, kept from one exchange to the next:
    /// moving a registered timer later is one atomic write, where a new timer per
    /// request takes the timer wheel's lock twice (register, cancel). It belongs to
    /// the runtime that made it, so a connection stays in that worker's pool.
    timer: Option<Pin<Box<Sleep>>>,
}

/// Why an exchange got no usable response head.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection failed or closed before any byte of a response: the
    /// upstream may never have seen the request.
    #[error("connection closed before a response: {0}")]
    Unanswered(#[source] io::Error),
    /// The connection failed or closed in the middle of the response head.
    #[error("connection failed during the response head: {0}")]
    Io(#[source] io::Error),
    /// The upstream's response is not valid HTTP/1.1.
    #[error("invalid upstream response: {0}")]
    Invalid(&'static str),
    /// No complete response head before the deadline.
    #[error("no response head before the deadline")]
    TimedOut,
}

impl Conn {
    /// A connection over `io`, ready for its first request.
    pub fn new(io: impl Io) -> Conn {
        Conn {
            io: Box::new(io),
            buf: BytesMut::new(),
            read_size: MIN_READ,
            timer: None,
        }
    }

    /// False when the upstream closed this idle connection, or sent bytes nobody
    /// asked for. Looks without waiting: a read that would block means open.
    pub fn is_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut byte = ReadBuf::new(&mut byte);
        let io = &mut *self.io;
        // Unconstrained: a task out of tokio's cooperative budget would see Pending,
        // and a closed connection would look open.
        let mut probe = tokio::task::unconstrained(std::future::poll_fn(|cx| {
            Pin::new(&mut *io).poll_read(cx, &mut byte)
        }));
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        Pin::new(&mut probe).poll(&mut cx).is_pending()
    }

    /// Sends the request (`body` held whole, at most [`MAX_BODY`]) and reads the
    /// response head by `deadline`; the body then comes from [`ResponseBody`],
    /// which owns the connection.
    pub async fn send(
        mut self,
        req: &request::Parts,
        body: &Bytes,
        deadline: Instant,
    ) -> Result<(http::response::Parts, Framing, Conn), ExchangeError> {
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        let mut out = recycle::take_room();
        encode_head(req, body.len(), &mut out);
        out.extend_from_slice(body);
        let written = std::future::poll_fn(|cx| self.poll_write_out(cx, &mut out)).await;
        recycle::give_room(out);
        written?;
        let mut parts = self.read_head().await?;
        let framing = Framing::of(req.method == Method::HEAD, &parts)?;
        if let State::Chunked(_) | State::UntilClose = framing.body {
            // A length the body does not have must not reach the client (RFC 9112 §6.3).
            parts.headers.remove(CONTENT_LENGTH);
        }
        Ok((parts, framing, self))
    }

    /// Writes all of `out` and flushes it, unless the deadline comes first.
    fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<u8>,
    ) -> Poll<Result<(), ExchangeError>> {
        let mut io = Pin::new(&mut *self.io);
        let written = loop {
            if out.is_empty() {
                break io.as_mut().poll_flush(cx);
            }
            match io.as_mut().poll_write(cx, out) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => drop(out.drain(..n)),
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        match written {
            Poll::Ready(done) => Poll::Ready(done.map_err(ExchangeError::Unanswered)),
            Poll::Pending => self.poll_deadline(cx),
        }
    }

    /// Ready with [`ExchangeError::TimedOut`] once the exchange's deadline has passed.
    fn poll_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, ExchangeError>> {
        match self.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(ExchangeError::TimedOut)),
            _ => Poll::Pending,
        }
    }

    /// Reads up to the end of a final response head, skipping interim (1xx) ones.
    async fn read_head(&mut self) -> Result<http::response::Parts, ExchangeError> {
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                match parse_head(&mut self.buf)? {
                    Some(parts) if parts.status.is_informational() => {
                        // 101 would switch protocols: the proxy never asks for that.
                        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                            return Err(ExchangeError::Invalid("unrequested protocol switch"));
                        }
                        continue;
                    }
                    Some(parts) => return Ok(parts),
                    None if self.buf.len() > MAX_HEAD => {
                        return Err(ExchangeError::Invalid("response head too large"));
                    }
                    None => {}
                }
            }
            let read = std::future::poll_fn(|cx| match self.poll_fill(cx) {
                Poll::Ready(read) => Poll::Ready(Ok(read)),
                Poll::Pending => self.poll_deadline(cx),
            })
            .await?;
            let failed = match read {
                Ok(0) => io::Error::from(io::ErrorKind::UnexpectedEof),
                Ok(_) => continue,
                Err(e) => e,
            };
            return Err(if answered {
                ExchangeError::Io(failed)
            } else {
                ExchangeError::Unanswered(failed)
            });
        }
    }

    /// Ready to wait in a pool: after a large body, the next response starts small
    /// again, and an idle connection holds no large buffer.
    fn idle(mut self) -> Conn {
        // After large reads the empty buffer is the tail of a large block, which
        // stays allocated as long as the buffer does, however little it can still take.
        if self.read_size > MIN_READ || self.buf.capacity() > 2 * MIN_READ {
            self.buf = BytesMut::new();
        }
        self.read_size = MIN_READ;
        self
    }

    /// Reads what the socket has into `buf`; `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(self.read_size);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *self.io),
            cx,
            &mut self.buf
        ))?;
        // Adapt to the traffic: a read that fills the buffer suggests a large body.
        if n >= self.read_size {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        } else if n < self.read_size / 4 {
            self.read_size = (self.read_size / 2).max(MIN_READ);
        }
        Poll::Ready(Ok(n))
    }
}

/// Writes the request line and headers. The body's length is ours to state: any
/// `Content-Length` or `Transfer-Encoding` the request carries is replaced by it.
fn encode_head(req: &request::Parts, body_len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut stated_length = false;
    for (name, value) in &req.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            stated_length |= name == CONTENT_LENGTH;
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // An empty body gets `content-length: 0` only if the request said so (a POST may need it).
    if body_len > 0 || stated_length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Parses a response head at the start of `buf` and removes it; `None` if it is
/// not complete yet. Header values share the head's bytes (one allocation).
fn parse_head(buf: &mut BytesMut) -> Result<Option<http::response::Parts>, ExchangeError> {
    // Uninitialised: zeroing 100 fields on every response cost more than parsing it.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Invalid("too many header fields"))
        }
        Err(_) => return Err(ExchangeError::Invalid("malformed response head")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ExchangeError::Invalid("malformed status code"))?;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let custom_reason = resp
        .reason
        .filter(|r| !r.is_empty() && Some(*r) != status.canonical_reason())
        .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes().to_vec()).ok());
    let spots = note_fields(buf.as_ptr() as usize, resp.headers);
    let head = buf.split_to(len).freeze();
    // Room for the headers the proxy adds.
    let map = fields_map(&head, spots, 8).map_err(|bad| {
        ExchangeError::Invalid(match bad {
            BadField::Name => "malformed header name",
            BadField::Value => "malformed header value",
        })
    })?;
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = map;
    if let Some(reason) = custom_reason {
        // hyper's server writes it instead of the standard one, as hyper's client would have kept it.
        parts.extensions.insert(reason);
    }
    Ok(Some(parts))
}

/// The part of a head's field that the `http` types refuse.
pub enum BadField {
    /// Not a valid header name.
    Name,
    /// Not a valid header value.
    Value,
}

/// Where each of `fields` sits in the buffer that starts at address `start`, in
/// this thread's room: noted while the parser borrows the buffer, so that the
/// values can share the head's bytes once it is frozen (see [`fields_map`]).
pub fn note_fields(start: usize, fields: &[httparse::Header<'_>]) -> recycle::Spots {
    let mut spots = recycle::take_spots();
    spots.extend(fields.iter().map(|h| {
        let name = h.name.as_ptr() as usize - start;
        let value = h.value.as_ptr() as usize - start;
        [name, name + h.name.len(), value, value + h.value.len()]
    }));
    spots
}

/// The fields noted in `spots` as a map from this thread's pool, with room for
/// `extra` more; the values share `head`'s bytes, and the spots go back.
pub fn fields_map(
    head: &Bytes,
    spots: recycle::Spots,
    extra: usize,
) -> Result<HeaderMap, BadField> {
    let mut map = recycle::take_map(spots.len() + extra);
    let mut bad = None;
    // A plain loop: `try_for_each` here stayed out of line, +300 instructions per request.
    for &[ns, ne, vs, ve] in &spots {
        match (
            HeaderName::from_bytes(&head[ns..ne]),
            HeaderValue::from_maybe_shared(head.slice(vs..ve)),
        ) {
            (Ok(name), Ok(value)) => drop(map.append(name, value)),
            (Err(_), _) => bad = Some(BadField::Name),
            (_, Err(_)) => bad = Some(BadField::Value),
        }
        if bad.is_some() {
            break;
        }
    }
    recycle::give_spots(spots);
    bad.map_or(Ok(map), Err)
}

/// How a response's body is delimited, and whether the connection may carry another exchange.
pub struct Framing {
    body: State,
    keep_alive: bool,
}

impl Framing {
    /// RFC 9112 §6.3, strictly: doubtful framing reads to the close and never reuses the connection.
    fn of(head_request: bool, parts: &http::response::Parts) -> Result<Framing, ExchangeError> {
        let (mut close, mut keep_alive_asked) = (false, false);
        let mut last_coding: Option<&HeaderValue> = None;
        let mut length: Result<Option<u64>, &'static str> = Ok(None);
        let mut stated_length = false;
        // One pass over the fields, comparing names: no hash lookups.
        for (name, value) in &parts.headers {
            if name == CONNECTION {
                for token in list_elements(value.as_bytes()) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name == TRANSFER_ENCODING {
                last_coding = Some(value);
            } else if name == CONTENT_LENGTH {
                stated_length = true;
                length = length.and_then(|seen| add_length(seen, value));
            }
        }
        // `close` always wins; HTTP/1.0 keeps the connection only when it says `keep-alive`.
        let keep_alive = !close && (parts.version == Version::HTTP_11 || keep_alive_asked);
        let status = parts.status;
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok(Framing {
                body: State::Length(0),
                keep_alive,
            });
        }
        if let Some(coding) = last_coding {
            let chunked_last = coding
                .as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            // With a Content-Length too, or in HTTP/1.0, it may be a smuggling attempt: no reuse.
            let clean = !stated_length && parts.version == Version::HTTP_11;
            return Ok(if chunked_last {
                Framing {
                    body: State::Chunked(Chunk::Size),
                    keep_alive: keep_alive && clean,
                }
            } else {
                Framing {
                    body: State::UntilClose,
                    keep_alive: false,
                }
            });
        }
        Ok(match length.map_err(ExchangeError::Invalid)? {
            Some(n) => Framing {
                body: State::Length(n),
                keep_alive,
            },
            None => Framing {
                body: State::UntilClose,
                keep_alive: false,
            },
        })
    }
}

/// The length so far and one more `Content-Length` field (a list is allowed if all agree).
fn add_length(seen: Option<u64>, value: &HeaderValue) -> Result<Option<u64>, &'static str> {
    let mut length = seen;
    for n in value.as_bytes().split(|&b| b == b',') {
        let n = std::str::from_utf8(n.trim_ascii())
            .ok()
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or("malformed content-length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting content-length");
        }
        length = Some(n);
    }
    Ok(length)
}

/// Where a response body stands.
#[derive(Clone, Copy)]
enum State {
    /// This many bytes to go.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes the connection.
    UntilClose,
    Done,
}

/// Where a chunked body stands.
#[derive(Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// A response body read straight from the upstream connection, which goes back
/// to its pool when the body ends cleanly (and closes if the body is dropped early).
pub struct ResponseBody {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    home: Option<Home>,
}

impl ResponseBody {
    /// The body of the response `conn` just read the head of; `home` takes the
    /// connection back if it may carry another exchange (none: it closes).
    pub fn new(conn: Conn, framing: Framing, home: Option<Home>) -> ResponseBody {
        let mut body = ResponseBody {
            conn: Some(conn),
            state: framing.body,
            keep_alive: framing.keep_alive,
            home,
        };
        if let State::Length(0) = body.state {
            // Nothing to read: the connection is free at once.
            body.finish();
        }
        body
    }

    /// The body ended: the connection goes home if it may carry another exchange.
    fn finish(&mut self) {
        self.state = State::Done;
        let (Some(conn), Some(home)) = (self.conn.take(), self.home.take()) else {
            return;
        };
        // Bytes past the response's end were never asked for: that connection is confused.
        if self.keep_alive && conn.buf.is_empty() {
            home.put(conn.idle());
        }
    }

    /// The body failed: the connection closes.
    fn fail(&mut self, why: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(why.into())))
    }
}

/// What one decoding step found in the buffered bytes.
enum Step {
    Frame(Frame<Bytes>),
    NeedMore,
    End,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let step = match &mut this.state {
                State::Done => Step::End,
                State::Length(rest) => take_data(&mut conn.buf, rest),
                State::UntilClose if conn.buf.is_empty() => Step::NeedMore,
                State::UntilClose => Step::Frame(Frame::data(conn.buf.split().freeze())),
                State::Chunked(chunk) => match decode_chunked(&mut conn.buf, chunk) {
                    Ok(step) => step,
                    Err(why) => return this.fail(why),
                },
            };
            match step {
                Step::Frame(frame) => {
                    if matches!(this.state, State::Length(0)) || frame.is_trailers() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Step::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Step::NeedMore => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("upstream closed the connection mid-body"),
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Up to `rest` bytes of data from the buffer.
fn take_data(buf: &mut BytesMut, rest: &mut u64) -> Step {
    if *rest == 0 {
        return Step::End;
    }
    if buf.is_empty() {
        return Step::NeedMore;
    }
    let n = usize::try_from(*rest).map_or(buf.len(), |r| r.min(buf.len()));
    *rest -= n as u64;
    Step::Frame(Frame::data(buf.split_to(n).freeze()))
}

/// A complete chunk-size line at the start of `buf` (RFC 9112 §7.1): its length
/// and the size, `None` if incomplete. Stricter than httparse's: at least one hex
/// digit, extensions after `;` only, and no bare CR or LF anywhere, so the proxy
/// and any relay behind it cannot read the same bytes as different chunks.
fn chunk_size_line(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    let Some(lf) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
        if buf.len() >= MAX_CHUNK_LINE {
            return Err("chunk size line too long");
        }
        return Ok(None);
    };
    let line = match buf[..lf].strip_suffix(b"\r") {
        Some(line) if !line.contains(&b'\r') => line,
        _ => return Err("malformed chunk size"),
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // Sixteen hex digits fill a u64: more would overflow.
    if digits == 0 || digits > 16 {
        return Err("malformed chunk size");
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16).unwrap_or(0);
        (n << 4) | u64::from(v)
    });
    let ext = line[digits..].trim_ascii_start();
    if !(ext.is_empty() || ext.starts_with(b";"))
        || ext.iter().any(|&b| b.is_ascii_control() && b != b'\t')
    {
        return Err("malformed chunk size");
    }
    Ok(Some((lf + 1, size)))
}

/// One step of chunked decoding (RFC 9112 §7.1): a data frame, the trailers, the end, or a need for more bytes.
fn decode_chunked(buf: &mut BytesMut, chunk: &mut Chunk) -> Result<Step, &'static str> {
    loop {
        match chunk {
            Chunk::Size => match chunk_size_line(buf)? {
                Some((used, size)) => {
                    buf.advance(used);
                    *chunk = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                None => return Ok(Step::NeedMore),
            },
            Chunk::Data(rest) => {
                let step = take_data(buf, rest);
                if *rest == 0 {
                    *chunk = Chunk::DataEnd;
                }
                match step {
                    Step::End => {}
                    step => return Ok(step),
                }
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data longer than its size");
                }
                buf.advance(2);
                *chunk = Chunk::Size;
            }
            // The usual end: no trailer fields.
            Chunk::Trailers if buf.starts_with(b"\r\n") => {
                buf.advance(2);
                return Ok(Step::End);
            }
            Chunk::Trailers => {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                return match httparse::parse_headers(buf, &mut headers) {
                    Ok(httparse::Status::Complete((used, fields))) => {
                        let mut trailers = HeaderMap::with_capacity(fields.len());
                        for f in fields.iter() {
                            let (Ok(name), Ok(value)) = (
                                HeaderName::from_bytes(f.name.as_bytes()),
                                HeaderValue::from_bytes(f.value),
                            ) else {
                                return Err("malformed trailer field");
                            };
                            trailers.append(name, value);
                        }
                        buf.advance(used);
                        Ok(if trailers.is_empty() {
                            Step::End
                        } else {
                            Step::Frame(Frame::trailers(trailers))
                        })
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                        Err("trailer section too large")
                    }
                    Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
                    Err(_) => Err("malformed trailer section"),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn request(method: Method, headers: &[(&str, &str)]) -> request::Parts {
        let mut b = http::Request::builder()
            .method(method)
            .uri("/api/v1/items?x=1");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    /// A deadline no test reaches.
    fn far() -> Instant {
        Instant::now() + std::time::Duration::from_secs(30)
    }

    /// A GET over a pipe whose other end reads the request head, answers `answer`,
    /// and closes its end if `close`. The request bytes, and the exchange's outcome.
    async fn exchange(
        answer: &'static [u8],
        close: bool,
    ) -> (
        String,
        Result<(http::response::Parts, Framing), ExchangeError>,
        Option<Conn>,
    ) {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let upstream = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut chunk = [0u8; 1024];
            while !seen.ends_with(b"\r\n\r\n") {
                let n = theirs.read(&mut chunk).await.expect("read");
                assert!(n > 0, "request cut short");
                seen.extend_from_slice(&chunk[..n]);
            }
            theirs.write_all(answer).await.expect("write");
            if !close {
                // Keep the pipe open until the test is done with it.
                let _ = theirs.read(&mut chunk).await;
            }
            String::from_utf8(seen).expect("ascii")
        });
        let req = request(Method::GET, &[("host", "up"), ("x-a", "1")]);
        let outcome = Conn::new(ours).send(&req, &Bytes::new(), far()).await;
        let (result, conn) = match outcome {
            Ok((parts, framing, conn)) => (Ok((parts, framing)), Some(conn)),
            Err(e) => (Err(e), None),
        };
        if close || conn.is_none() {
            return (upstream.await.expect("upstream"), result, conn);
        }
        (String::new(), result, conn)
    }

    async fn body_of(conn: Conn, framing: Framing) -> Result<(Bytes, Option<HeaderMap>), BoxError> {
        let collected = ResponseBody::new(conn, framing, None).collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes(), trailers))
    }

    #[tokio::test]
    async fn a_request_goes_out_in_http_1_1_and_interim_responses_are_skipped() {
        let (sent, result, conn) = exchange(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Made It\r\nx-b: 2\r\ncontent-length: 5\r\n\r\nhello",
            true,
        )
        .await;
        assert_eq!(
            sent,
            "GET /api/v1/items?x=1 HTTP/1.1\r\nhost: up\r\nx-a: 1\r\n\r\n"
        );
        let (parts, framing) = result.expect("response");
        assert_eq!(parts.status, 201);
        assert_eq!(parts.headers["x-b"], "2");
        let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Made It"[..]));
        assert!(framing.keep_alive);
        let (body, _) = body_of(conn.expect("conn"), framing).await.expect("body");
        assert_eq!(body, "hello");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_not_a_shorter_body() {
        let (_, result, conn) =
            exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello", true).await;
        let (_, framing) = result.expect("head");
        let err = body_of(conn.expect("conn"), framing)
            .await
            .expect_err("cut short");
        assert!(err.to_string().contains("mid-body"), "{err}");
    }

    #[tokio::test]
    async fn a_body_without_length_ends_at_the_close() {
        let (_, result, conn) = exchange(b"HTTP/1.1 200 OK\r\n\r\nall of it", true).await;
        let (_, framing) = result.expect("head");
        assert!(!framing.keep_alive);
        let (body, _) = body_of(conn.expect("conn"), framing).await.expect("body");
        assert_eq!(body, "all of it");
    }

    #[tokio::test]
    async fn chunked_trailers_are_passed_on_and_a_conflicting_length_dropped() {
        let (_, result, conn) = exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 9\r\n\r\n",
            false,
        )
        .await;
        let (_, framing) = result.expect("head");
        let (body, trailers) = body_of(conn.expect("conn"), framing).await.expect("body");
        assert_eq!(body, "abc");
        assert_eq!(trailers.expect("trailers")["x-sum"], "9");

        let (_, result, _) = exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n0\r\n\r\n",
            false,
        )
        .await;
        let (parts, framing) = result.expect("head");
        assert!(!parts.headers.contains_key(CONTENT_LENGTH));
        assert!(!framing.keep_alive);
    }

    #[tokio::test]
    async fn failures_before_and_during_the_head_are_told_apart() {
        // Nothing at all: the upstream may never have seen the request (a retry may be allowed).
        let (_, result, _) = exchange(b"", true).await;
        assert!(matches!(result, Err(ExchangeError::Unanswered(_))));
        // Half a head: it did see it.
        let (_, result, _) = exchange(b"HTTP/1.1 200 OK\r\ncontent-", true).await;
        assert!(matches!(result, Err(ExchangeError::Io(_))));
        let (_, result, _) = exchange(b"HTTP/1.1 2x0 OK\r\n\r\n", true).await;
        assert!(matches!(result, Err(ExchangeError::Invalid(_))));
        let (_, result, _) = exchange(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", true).await;
        assert!(matches!(result, Err(ExchangeError::Invalid(_))));
    }

    #[tokio::test]
    async fn an_endless_head_is_refused_at_the_limit() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let _ = theirs.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let field = format!("x-long: {}\r\n", "a".repeat(8000));
            for _ in 0..(MAX_HEAD / field.len() + 2) {
                if theirs.write_all(field.as_bytes()).await.is_err() {
                    return;
                }
            }
            let mut sink = [0u8; 1024];
            while theirs.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let req = request(Method::GET, &[]);
        let result = Conn::new(ours).send(&req, &Bytes::new(), far()).await;
        assert!(
            matches!(
                result,
                Err(ExchangeError::Invalid("response head too large"))
            ),
            "{:?}",
            result.err()
        );
    }

    #[test]
    fn the_body_length_is_ours_to_state() {
        let mut out = Vec::new();
        let form = request(
            Method::POST,
            &[("content-length", "999"), ("transfer-encoding", "chunked")],
        );
        encode_head(&form, 5, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "POST /api/v1/items?x=1 HTTP/1.1\r\ncontent-length: 5\r\n\r\n"
        );
        // An empty POST keeps the zero length it stated; a GET states none.
        encode_head(
            &request(Method::POST, &[("content-length", "0")]),
            0,
            &mut out,
        );
        assert!(String::from_utf8_lossy(&out).contains("content-length: 0\r\n"));
        encode_head(&request(Method::GET, &[]), 0, &mut out);
        assert!(!String::from_utf8_lossy(&out).contains("content-length"));
    }

    fn framing(
        version: Version,
        status: u16,
        headers: &[(&str, &str)],
        head: bool,
    ) -> Result<(String, bool), &'static str> {
        let mut b = Response::builder().version(version).status(status);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let parts = b.body(()).expect("response").into_parts().0;
        match Framing::of(head, &parts) {
            Ok(f) => Ok((
                match f.body {
                    State::Length(n) => format!("length {n}"),
                    State::Chunked(_) => "chunked".into(),
                    State::UntilClose => "until close".into(),
                    State::Done => "done".into(),
                },
                f.keep_alive,
            )),
            Err(ExchangeError::Invalid(why)) => Err(why),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112_and_trusts_no_doubtful_connection() {
        use Version as V;
        let ok = |s: &str, keep: bool| Ok((s.to_string(), keep));
        let h11 = V::HTTP_11;
        assert_eq!(
            framing(h11, 200, &[("content-length", "7")], false),
            ok("length 7", true)
        );
        assert_eq!(
            framing(h11, 200, &[("content-length", "7, 7")], false),
            ok("length 7", true)
        );
        assert_eq!(
            framing(
                h11,
                200,
                &[("content-length", "7"), ("content-length", "8")],
                false
            ),
            Err("conflicting content-length")
        );
        assert_eq!(
            framing(h11, 200, &[("content-length", "+7")], false),
            Err("malformed content-length")
        );
        assert_eq!(
            framing(h11, 200, &[("transfer-encoding", "chunked")], false),
            ok("chunked", true)
        );
        assert_eq!(
            framing(h11, 200, &[("transfer-encoding", "gzip, chunked")], false),
            ok("chunked", true)
        );
        assert_eq!(
            framing(h11, 200, &[("transfer-encoding", "chunked, gzip")], false),
            ok("until close", false)
        );
        assert_eq!(
            framing(
                h11,
                200,
                &[("transfer-encoding", "chunked"), ("content-length", "3")],
                false
            ),
            ok("chunked", false)
        );
        assert_eq!(
            framing(V::HTTP_10, 200, &[("transfer-encoding", "chunked")], false),
            ok("chunked", false)
        );
        assert_eq!(framing(h11, 200, &[], false), ok("until close", false));
        assert_eq!(
            framing(
                h11,
                200,
                &[("content-length", "7"), ("connection", "x, Close")],
                false
            ),
            ok("length 7", false)
        );
        assert_eq!(
            framing(V::HTTP_10, 200, &[("content-length", "7")], false),
            ok("length 7", false)
        );
        assert_eq!(
            framing(
                V::HTTP_10,
                200,
                &[("content-length", "7"), ("connection", "keep-alive")],
                false
            ),
            ok("length 7", true)
        );
        assert_eq!(
            framing(
                V::HTTP_10,
                200,
                &[("content-length", "7"), ("connection", "keep-alive, close")],
                false
            ),
            ok("length 7", false)
        );
        // No body whatever the fields say: HEAD, 204, 304.
        assert_eq!(
            framing(h11, 200, &[("content-length", "7")], true),
            ok("length 0", true)
        );
        assert_eq!(framing(h11, 204, &[], false), ok("length 0", true));
        assert_eq!(
            framing(h11, 304, &[("transfer-encoding", "chunked")], false),
            ok("length 0", true)
        );
    }

    /// Decodes `input` fed `step` bytes at a time: the data, and the trailers.
    fn decode_in_steps(
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), &'static str> {
        let (mut buf, mut chunk, mut fed) = (BytesMut::new(), Chunk::Size, 0);
        let mut data = Vec::new();
        loop {
            match decode_chunked(&mut buf, &mut chunk)? {
                Step::Frame(f) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => return Ok((data, f.into_trailers().ok())),
                },
                Step::End => return Ok((data, None)),
                Step::NeedMore if fed == input.len() => return Err("incomplete"),
                Step::NeedMore => {
                    let next = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn chunked_decoding_is_the_same_however_the_bytes_arrive() {
        let input = b"5;name=v\r\nhello\r\nC\r\n, wide world\r\n0\r\nx-sum: 42\r\nx-n: 1\r\n\r\n";
        for step in 1..=input.len() {
            let (data, trailers) = decode_in_steps(input, step).expect("decodes");
            assert_eq!(data, b"hello, wide world", "step {step}");
            let trailers = trailers.expect("trailers");
            assert_eq!(
                (&trailers["x-sum"], &trailers["x-n"]),
                (
                    &HeaderValue::from_static("42"),
                    &HeaderValue::from_static("1")
                )
            );
        }
        assert_eq!(
            decode_in_steps(b"3\r\nabc\r\n0\r\n\r\n", 1),
            Ok((b"abc".to_vec(), None))
        );
        assert_eq!(
            decode_in_steps(b"3\r\nabcd\r\n0\r\n\r\n", 64),
            Err("chunk data longer than its size")
        );
        assert_eq!(
            decode_in_steps(b"zz\r\nabc\r\n", 64),
            Err("malformed chunk size")
        );
        assert_eq!(decode_in_steps(b"3\r\nab", 64), Err("incomplete"));
        // What httparse would let through: an empty size, bare line ends, an overflow.
        for line in [
            &b"\r\n"[..],
            b";x\r\n",
            b"5;a\nb\r\n",
            b"5\n",
            b"5\rx\r\n",
            b"5 x\r\n",
            b"10000000000000000\r\n",
        ] {
            assert_eq!(
                chunk_size_line(line),
                Err("malformed chunk size"),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            chunk_size_line(b"ffffffffffffffff\r\n"),
            Ok(Some((18, u64::MAX)))
        );
        assert_eq!(
            chunk_size_line(b"1f ; name=\"v\"\r\nrest"),
            Ok(Some((15, 31)))
        );
        assert_eq!(chunk_size_line(b"1f ; name"), Ok(None));
        assert_eq!(
            chunk_size_line(&[b'1'; MAX_CHUNK_LINE]),
            Err("chunk size line too long")
        );
    }

    /// The timer a connection keeps serves each exchange's own deadline: a later
    /// one after the last passed while the connection was idle, and an earlier one.
    #[tokio::test]
    async fn each_exchange_keeps_its_own_deadline() {
        use std::time::Duration;
        let short = Duration::from_millis(50);
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        // Answers the first request at once, the second after a pause, the third never.
        let upstream = tokio::spawn(async move {
            let mut chunk = [0u8; 1024];
            for delay in [Some(Duration::ZERO), Some(short * 2), None] {
                let mut seen = Vec::new();
                while !seen.ends_with(b"\r\n\r\n") {
                    let n = theirs.read(&mut chunk).await.expect("read");
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&chunk[..n]);
                }
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                    let ok = b"HTTP/1.1 204 No Content\r\n\r\n";
                    theirs.write_all(ok).await.expect("write");
                }
            }
            let _ = theirs.read(&mut chunk).await;
        });
        let req = request(Method::GET, &[("host", "up")]);

        let first = Conn::new(ours)
            .send(&req, &Bytes::new(), Instant::now() + short)
            .await;
        let (head, _, conn) = first.expect("first exchange");
        assert_eq!(head.status, StatusCode::NO_CONTENT);
        // The first deadline passes while the connection is idle.
        tokio::time::sleep(short * 3).await;

        // A later deadline: the timer that fired is set again, not left fired.
        let second = conn.send(&req, &Bytes::new(), far()).await;
        let (head, _, conn) = second.expect("second exchange, answered late but in time");
        assert_eq!(head.status, StatusCode::NO_CONTENT);

        // An earlier deadline than the last: kept, not the far one.
        let started = Instant::now();
        let third = conn.send(&req, &Bytes::new(), started + short).await;
        let waited = started.elapsed();
        assert!(
            matches!(third, Err(ExchangeError::TimedOut)),
            "{:?}",
            third.err()
        );
        assert!(
            waited >= short && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        upstream.abort();
    }
}
