//! The proxy's own HTTP/1.1 server side, for the usual exchange: a request
//! without a body (a GET, a HEAD, a DELETE, a POST with `Content-Length: 0`). Its
//! head is parsed straight into the request the journey takes, and the response
//! is written from one buffer, without hyper's dispatcher in between.
//!
//! A request it does not take whole goes to hyper with every byte read (see
//! [`parse_request`]): a body of any kind, `Transfer-Encoding`, `Expect`,
//! `Upgrade`, HTTP/1.0, any target but a path, anything the parser doubts, and
//! heads too large. The framing that request smuggling plays on stays hyper's;
//! so do hyper's automatic 400/414/431 answers.

use crate::body::BoxError;
use crate::h1;
use crate::rewrite::list_elements;
use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{request, response, Method, StatusCode, Uri};
use http_body::{Body, SizeHint};
use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Most header fields this server parses; hyper takes a head with more (and
/// answers 431 beyond its own limit, the same number).
const MAX_HEADERS: usize = 100;

/// Response bytes gathered before they are written: small responses go out in one
/// `send`, large bodies in writes of about this size.
const WRITE_AT: usize = 64 * 1024;

/// What the head at the start of the read buffer is.
// Not boxed: one is made per request and moved straight into it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Head {
    /// A request without a body, taken from the buffer; `close` if the client asked
    /// for the connection to end after it.
    Ours {
        /// Method, target, version and fields.
        parts: request::Parts,
        /// `Connection: close`.
        close: bool,
    },
    /// Not complete yet.
    Partial,
    /// For hyper: the bytes stay in the buffer.
    Hyper,
}

/// Parses the request head at the start of `buf`. A request this server takes is
/// removed from `buf`, its fields put in a map from [`crate::recycle::take_map`].
/// Leading empty lines are skipped, as RFC 9112 §2.2 allows.
pub fn parse_request(buf: &mut BytesMut) -> Head {
    // Uninitialised: zeroing 100 fields for every request cost more than parsing it.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Hyper,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Head::Hyper;
    };
    // Origin form only: `*`, authority and absolute forms are hyper's.
    if !path.starts_with('/') || len > crate::server::MAX_HEAD_BYTES {
        return Head::Hyper;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Head::Hyper;
    };
    if method == Method::CONNECT {
        return Head::Hyper;
    }
    let mut close = false;
    let mut zero_length = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let doubtful = if name.eq_ignore_ascii_case(b"content-length") {
            // A single `0`: anything else is a body, or a length to be doubted.
            let repeated = zero_length;
            zero_length = true;
            repeated || h.value != b"0"
        } else if name.eq_ignore_ascii_case(b"connection") {
            let mut upgrade = false;
            for token in list_elements(h.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                upgrade |= token.eq_ignore_ascii_case(b"upgrade");
            }
            upgrade
        } else {
            name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"upgrade")
        };
        if doubtful {
            return Head::Hyper;
        }
    }
    let start = buf.as_ptr() as usize;
    let at = |s: &[u8]| s.as_ptr() as usize - start;
    let target = at(path.as_bytes())..at(path.as_bytes()) + path.len();
    let spots = h1::note_fields(start, req.headers);
    let head = buf.split_to(len).freeze();
    let headers = h1::fields_map(&head, spots, 8);
    let (Some(uri), Ok(headers)) = (Uri::from_maybe_shared(head.slice(target)).ok(), headers)
    else {
        // Put back whole: hyper answers what this server cannot represent (400, 414).
        let mut back = BytesMut::with_capacity(head.len() + buf.len());
        back.extend_from_slice(&head);
        back.extend_from_slice(buf);
        *buf = back;
        return Head::Hyper;
    };
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.headers = headers;
    Head::Ours { parts, close }
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked: the length was not known when the head went out.
    Chunked,
    /// None at all (HEAD, 204, 304).
    Nothing,
}

/// Why a response could not be written whole: the connection cannot carry another exchange.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The client's connection failed or closed.
    #[error("writing the response: {0}")]
    Io(#[from] io::Error),
    /// The body failed or did not match its stated length.
    #[error("response body: {0}")]
    Body(BoxError),
    /// The response head states a length that is not a number.
    #[error("malformed content-length in the response")]
    Length,
}

/// A response head written: how its body follows, and whether the connection
/// ends after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    /// How the body goes on the wire.
    pub framing: Framing,
    /// The connection closes after this response.
    pub close: bool,
}

/// Writes the status line and fields, the way hyper's server does: a reason phrase
/// always; the body's length from the body when it knows it, else chunked; no body
/// for HEAD, 204 and 304; `connection: close` when the connection ends after this
/// response (`close`, or the response says so); and `date` when the response has
/// none. A 1xx status cannot end an exchange: like hyper, it becomes a 500 that
/// closes the connection.
pub fn encode_head(
    parts: &response::Parts,
    size: SizeHint,
    head_request: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Encoded, WriteError> {
    let status = parts.status;
    if status.is_informational() {
        out.extend_from_slice(b"HTTP/1.1 500 Internal Server Error\r\n");
        push_field(out, b"content-length", b"0");
        push_field(out, b"connection", b"close");
        push_date(out);
        out.extend_from_slice(b"\r\n");
        return Ok(Encoded {
            framing: Framing::Nothing,
            close: true,
        });
    }
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(r) => out.extend_from_slice(r.as_bytes()),
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let (mut declared, mut says_close, mut dated) = (None, false, false);
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH && declared.is_none() {
            declared = Some(value);
        }
        if name == TRANSFER_ENCODING || (name == CONTENT_LENGTH && !head_request) {
            // The framing is this server's to state (below), except that a HEAD
            // response tells the length a GET would have had, as it was given.
            continue;
        }
        if name == CONNECTION {
            says_close |= list_elements(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close"));
        }
        dated |= name == DATE;
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = if bodiless {
        Framing::Nothing
    } else if head_request {
        // No length given: the body's own, as hyper states it (a refusal answering a HEAD).
        if let (None, Some(n @ 1..)) = (declared, size.exact()) {
            push_length(out, n);
        }
        Framing::Nothing
    } else {
        // The body's own count wins over the header's.
        let length = match (size.exact(), declared) {
            (Some(n), _) => Some(n),
            (None, Some(v)) => Some(
                std::str::from_utf8(v.as_bytes())
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(WriteError::Length)?,
            ),
            (None, None) => None,
        };
        match length {
            Some(n) => {
                push_length(out, n);
                Framing::Length(n)
            }
            None => {
                push_field(out, b"transfer-encoding", b"chunked");
                Framing::Chunked
            }
        }
    };
    if close && !says_close {
        push_field(out, b"connection", b"close");
    }
    if !dated {
        push_date(out);
    }
    out.extend_from_slice(b"\r\n");
    Ok(Encoded {
        framing,
        close: close || says_close,
    })
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_length(out: &mut Vec<u8>, n: u64) {
    push_field(
        out,
        b"content-length",
        itoa::Buffer::new().format(n).as_bytes(),
    );
}

/// Writes a chunk-size line.
fn push_hex(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(rest & 0xf) as usize];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Adds a `date` field; the text is made once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = CACHED.try_with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        push_field(out, b"date", cached.1.as_bytes());
    });
}

/// Writes `out` (a head from [`encode_head`]) and the body after it, framed as
/// `framing` says. Small responses go out in one write; `out` is left empty. A
/// body that fails, or ends short of or beyond its stated length, is an error:
/// the client's connection cannot be trusted with another exchange.
///
/// While the body has nothing to send, the client is watched, as hyper does: one
/// that closes its connection ends the exchange (and releases the upstream's)
/// instead of waiting on a stalled upstream. Bytes it sends meanwhile (a
/// pipelined request) go to `buf`, up to a head's limit.
pub async fn write_response<W, B>(
    io: &mut W,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    body: B,
    framing: Framing,
) -> Result<(), WriteError>
where
    W: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut left = match framing {
        Framing::Nothing => {
            drop(body);
            return flush(io, out).await;
        }
        Framing::Length(n) => n,
        Framing::Chunked => u64::MAX,
    };
    let mut body = pin!(body);
    loop {
        // Gathers what the body has ready; writes when it has nothing more for now,
        // when enough is gathered, and at its end.
        let ended = std::future::poll_fn(|cx| loop {
            if out.len() >= WRITE_AT {
                return Poll::Ready(Ok(false));
            }
            match body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        // Trailers: not sent (hyper sends only those a client asked for).
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    let n = data.len() as u64;
                    if framing == Framing::Chunked {
                        push_hex(out, n);
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    } else if n > left {
                        return Poll::Ready(Err(WriteError::Body(
                            "the body is longer than its content-length".into(),
                        )));
                    } else {
                        left -= n;
                        out.extend_from_slice(&data);
                    }
                    if body.is_end_stream() {
                        return Poll::Ready(Ok(true));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(WriteError::Body(e.into()))),
                Poll::Ready(None) => return Poll::Ready(Ok(true)),
                Poll::Pending if !out.is_empty() => return Poll::Ready(Ok(false)),
                Poll::Pending if buf.len() > crate::server::MAX_HEAD_BYTES => return Poll::Pending,
                Poll::Pending => match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(WriteError::Io(
                            io::ErrorKind::ConnectionAborted.into(),
                        )))
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(WriteError::Io(e))),
                    // Read: the body may have become ready meanwhile.
                    Poll::Ready(Ok(_)) => {}
                    Poll::Pending => return Poll::Pending,
                },
            }
        })
        .await?;
        if ended {
            match framing {
                Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                _ if left != 0 => {
                    return Err(WriteError::Body(
                        "the body ended before its content-length".into(),
                    ))
                }
                _ => {}
            }
            return flush(io, out).await;
        }
        flush(io, out).await?;
    }
}

/// Writes all of `out` and empties it.
async fn flush<W: AsyncWrite + Unpin>(io: &mut W, out: &mut Vec<u8>) -> Result<(), WriteError> {
    io.write_all(out).await?;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::{full, AnyBody, Counted};
    use http::{HeaderName, HeaderValue, Response};
    use http_body_util::StreamBody;

    fn parse(bytes: &[u8]) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let head = parse_request(&mut buf);
        (head, buf)
    }

    #[test]
    fn a_request_without_a_body_is_taken_and_what_follows_it_stays() {
        let wire = b"\r\nGET /api/v1/items?a=b HTTP/1.1\r\nHost: x\r\nX-Proxy-Key: k\r\nAccept: */*\r\naccept: text/plain\r\n\r\nGET /next";
        let (head, rest) = parse(wire);
        let Head::Ours { parts, close } = head else {
            panic!("not taken: {head:?}");
        };
        assert!(!close);
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.uri, "/api/v1/items?a=b");
        assert_eq!(parts.version, http::Version::HTTP_11);
        assert_eq!(parts.headers["x-proxy-key"], "k");
        assert_eq!(parts.headers.get_all("accept").iter().count(), 2);
        assert_eq!(parts.headers.len(), 4);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn a_recycled_map_carries_nothing_into_the_next_request() {
        let (Head::Ours { parts, .. }, _) =
            parse(b"GET /a HTTP/1.1\r\nX-Proxy-Key: k1\r\nCookie: c\r\n\r\n")
        else {
            panic!("first request not taken");
        };
        crate::recycle::give_map(parts.headers);
        let (Head::Ours { parts, .. }, _) = parse(b"GET /b HTTP/1.1\r\nAccept: */*\r\n\r\n") else {
            panic!("second request not taken");
        };
        assert_eq!(parts.headers.len(), 1, "{:?}", parts.headers);
        assert!(parts.headers.get("x-proxy-key").is_none());
        assert!(parts.headers.get("cookie").is_none());
    }

    #[test]
    fn a_head_arriving_in_pieces_is_partial_until_it_is_whole() {
        let wire =
            b"DELETE /x HTTP/1.1\r\nContent-Length: 0\r\nConnection: keep-alive, Close\r\n\r\n";
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            match parse_request(&mut buf) {
                Head::Partial => assert!(i + 1 < wire.len(), "whole head still partial"),
                Head::Ours { parts, close } => {
                    assert_eq!(i + 1, wire.len());
                    assert_eq!(parts.method, Method::DELETE);
                    assert!(close, "Connection: close among other tokens");
                    assert!(buf.is_empty());
                }
                Head::Hyper => panic!("handed over at byte {i}"),
            }
        }
    }

    #[test]
    fn anything_with_a_body_or_a_doubt_is_hyper_s_with_every_byte_kept() {
        for wire in [
            &b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"POST /x HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /x HTTP/1.1\r\ntransfer-encoding: identity\r\n\r\n",
            b"GET /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"GET /x HTTP/1.1\r\nConnection: keep-alive, upgrade\r\n\r\n",
            b"GET /x HTTP/1.0\r\n\r\n",
            b"GET http://other.example/x HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nBad Name: v\r\n\r\n",
            b"GET /x HTTP/1.1\r\nFolded: a\r\n b\r\n\r\n",
            b"GET /x\r\n\r\n",
        ] {
            let (head, rest) = parse(wire);
            assert!(
                matches!(head, Head::Hyper),
                "{:?}: {head:?}",
                String::from_utf8_lossy(wire)
            );
            assert_eq!(&rest[..], wire, "bytes lost on the way to hyper");
        }
    }

    #[test]
    fn a_target_the_uri_parser_refuses_is_put_back_whole_for_hyper() {
        // Bytes the head parser lets into a target and `Uri` does not.
        let refused: Vec<u8> = (0x21..0x7f)
            .filter(|b| {
                let target = [b'/', *b];
                httparse::Request::new(&mut [])
                    .parse(&[b"GET ", &target[..], b" HTTP/1.1\r\n\r\n"].concat())
                    .is_ok()
                    && Uri::try_from(&target[..]).is_err()
            })
            .collect();
        assert!(!refused.is_empty());
        for b in refused {
            let wire = [
                b"GET /a",
                &[b][..],
                b" HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            ]
            .concat();
            let (head, rest) = parse(&wire);
            assert!(matches!(head, Head::Hyper), "{:?}: {head:?}", b as char);
            assert_eq!(&rest[..], &wire[..], "bytes lost on the way to hyper");
        }
    }

    #[test]
    fn a_head_over_the_limit_is_hyper_s_to_refuse() {
        let mut wire = b"GET /x HTTP/1.1\r\nbig: ".to_vec();
        wire.resize(wire.len() + crate::server::MAX_HEAD_BYTES, b'a');
        wire.extend_from_slice(b"\r\n\r\n");
        let (head, rest) = parse(&wire);
        assert!(matches!(head, Head::Hyper));
        assert_eq!(rest.len(), wire.len());
    }

    fn encoded(
        resp: Response<ProxyBodyForTest>,
        head_request: bool,
        close: bool,
    ) -> (String, Framing) {
        let (parts, body) = resp.into_parts();
        let mut out = Vec::new();
        let head =
            encode_head(&parts, body.size_hint(), head_request, close, &mut out).expect("encodes");
        assert!(head.close || !close, "a closing connection must close");
        (String::from_utf8(out).unwrap(), head.framing)
    }

    type ProxyBodyForTest = Counted<AnyBody>;

    fn response(
        status: u16,
        headers: &[(&str, &str)],
        body: ProxyBodyForTest,
    ) -> Response<ProxyBodyForTest> {
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        for (n, v) in headers {
            resp.headers_mut().append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        resp
    }

    #[test]
    fn the_length_is_the_body_s_own_and_stated_once() {
        let body = full("hello");
        let (head, framing) = encoded(
            response(
                200,
                &[("content-length", "5"), ("date", "then"), ("x-a", "1")],
                body,
            ),
            false,
            false,
        );
        assert_eq!(framing, Framing::Length(5));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(head.matches("content-length").count(), 1, "{head}");
        assert!(head.contains("content-length: 5\r\n") && head.contains("date: then\r\n"));
        assert!(
            head.ends_with("\r\n\r\n") && !head.contains("connection"),
            "{head}"
        );
        // An empty body states its zero; a body of unknown length is chunked.
        let (head, framing) = encoded(response(401, &[], full("")), false, false);
        assert_eq!(framing, Framing::Length(0));
        assert!(
            head.starts_with("HTTP/1.1 401 Unauthorized\r\n")
                && head.contains("content-length: 0\r\n")
        );
        assert!(
            head.contains("\r\ndate: ") && head.contains(" GMT\r\n"),
            "a date is added: {head}"
        );
        let (parts, _) = response(200, &[("transfer-encoding", "chunked")], full("")).into_parts();
        let mut out = Vec::new();
        let framing = encode_head(&parts, SizeHint::new(), false, false, &mut out)
            .unwrap()
            .framing;
        assert_eq!(framing, Framing::Chunked);
        let head = String::from_utf8(out).unwrap();
        assert_eq!(
            head.matches("transfer-encoding: chunked\r\n").count(),
            1,
            "{head}"
        );
    }

    #[test]
    fn head_204_and_304_answers_have_no_body_and_keep_what_they_were_given() {
        let (head, framing) = encoded(
            response(200, &[("content-length", "310")], full("")),
            true,
            false,
        );
        assert_eq!(framing, Framing::Nothing);
        assert!(
            head.contains("content-length: 310\r\n"),
            "HEAD keeps the GET's length: {head}"
        );
        for status in [204, 304] {
            let (head, framing) = encoded(
                response(
                    status,
                    &[("content-length", "7"), ("etag", "\"e\"")],
                    full(""),
                ),
                false,
                false,
            );
            assert_eq!(framing, Framing::Nothing);
            assert!(
                !head.contains("content-length") && !head.contains("transfer-encoding"),
                "{head}"
            );
            assert!(head.contains("etag: \"e\"\r\n"));
        }
    }

    #[test]
    fn a_closing_connection_says_so_once_and_custom_reasons_are_kept() {
        let (head, _) = encoded(response(503, &[], full("x")), false, true);
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert_eq!(head.matches("connection: close").count(), 1, "{head}");
        let (head, _) = encoded(
            response(200, &[("connection", "close")], full("x")),
            false,
            true,
        );
        assert_eq!(head.matches("close").count(), 1, "{head}");
        let mut resp = response(299, &[], full("x"));
        resp.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(b"Fine Really"));
        let (head, _) = encoded(resp, false, false);
        assert!(head.starts_with("HTTP/1.1 299 Fine Really\r\n"), "{head}");
        let (head, _) = encoded(response(299, &[], full("x")), false, false);
        assert!(head.starts_with("HTTP/1.1 299 <none>\r\n"), "{head}");
    }

    #[test]
    fn an_interim_status_cannot_end_an_exchange_and_a_closing_response_closes() {
        let (parts, body) = response(103, &[("link", "</a>")], full("x")).into_parts();
        let mut out = Vec::new();
        let head = encode_head(&parts, body.size_hint(), false, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            head,
            Encoded {
                framing: Framing::Nothing,
                close: true
            }
        );
        assert!(
            text.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{text}"
        );
        assert!(
            text.contains("connection: close\r\n") && !text.contains("link"),
            "{text}"
        );
        let (parts, body) = response(200, &[("connection", "Close")], full("x")).into_parts();
        let head = encode_head(&parts, body.size_hint(), false, false, &mut Vec::new()).unwrap();
        assert!(
            head.close,
            "the response's own Connection: close is honoured"
        );
    }

    #[test]
    fn a_refusal_answering_head_states_its_own_length() {
        let (head, framing) = encoded(response(401, &[], full("{\"error\":1}")), true, false);
        assert_eq!(framing, Framing::Nothing);
        assert!(head.contains("content-length: 11\r\n"), "{head}");
        let (head, _) = encoded(response(200, &[], full("")), true, false);
        assert!(!head.contains("content-length"), "{head}");
    }

    #[tokio::test]
    async fn a_client_that_leaves_while_the_body_stalls_ends_the_exchange() {
        let (mut client, mut proxy) = tokio::io::duplex(1024);
        let stalled = StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >());
        let writing = tokio::spawn(async move {
            let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n".to_vec();
            write_response(
                &mut proxy,
                &mut BytesMut::new(),
                &mut out,
                stalled,
                Framing::Length(9),
            )
            .await
        });
        let mut head = [0u8; 38];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut head)
            .await
            .unwrap();
        drop(client);
        let done = tokio::time::timeout(std::time::Duration::from_secs(5), writing)
            .await
            .expect("the exchange outlived its client")
            .unwrap();
        assert!(matches!(done, Err(WriteError::Io(_))), "{done:?}");
    }

    #[test]
    fn a_malformed_stated_length_without_the_body_s_own_is_an_error() {
        let (parts, _) = response(200, &[("content-length", "ten")], full("")).into_parts();
        let mut out = Vec::new();
        assert!(matches!(
            encode_head(&parts, SizeHint::new(), false, false, &mut out),
            Err(WriteError::Length)
        ));
    }

    fn frames(
        chunks: &[&'static str],
    ) -> StreamBody<
        impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
    > {
        let items: Vec<_> = chunks
            .iter()
            .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(items))
    }

    async fn written<B>(body: B, framing: Framing) -> (Vec<u8>, Result<(), WriteError>)
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let mut client = Client(Vec::new());
        let mut out = b"HEAD\r\n".to_vec();
        let done = write_response(&mut client, &mut BytesMut::new(), &mut out, body, framing).await;
        assert!(done.is_err() || out.is_empty(), "out not drained");
        (client.0, done)
    }

    /// A client that takes every byte written and sends nothing.
    struct Client(Vec<u8>);

    impl AsyncRead for Client {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Client {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bodies_go_out_framed_as_the_head_says() {
        let (wire, done) = written(frames(&["hello", "", "world!"]), Framing::Chunked).await;
        done.unwrap();
        assert_eq!(wire, b"HEAD\r\n5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n");
        let (wire, done) = written(frames(&["hello", "world!"]), Framing::Length(11)).await;
        done.unwrap();
        assert_eq!(wire, b"HEAD\r\nhelloworld!");
        let (wire, done) = written(frames(&["never"]), Framing::Nothing).await;
        done.unwrap();
        assert_eq!(wire, b"HEAD\r\n");
        let mut big = Vec::new();
        push_hex(&mut big, 0x1_0000_abcd);
        assert_eq!(big, b"10000abcd\r\n");
    }

    #[tokio::test]
    async fn a_body_off_its_stated_length_is_an_error_not_a_shorter_or_longer_answer() {
        let (_, done) = written(frames(&["hello"]), Framing::Length(6)).await;
        assert!(matches!(done, Err(WriteError::Body(_))), "short: {done:?}");
        let (_, done) = written(frames(&["hello", "!"]), Framing::Length(5)).await;
        assert!(matches!(done, Err(WriteError::Body(_))), "long: {done:?}");
    }
}
