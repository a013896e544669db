//! Hostile input, written byte by byte on raw sockets: request smuggling,
//! malformed heads, oversized heads, path tricks, and headers a client uses to
//! try to steer the upstream. Where a request is forwarded, a raw upstream
//! records exactly the bytes it received, so the assertions are about the wire,
//! not about what a lenient HTTP library makes of it.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// A raw upstream: records every byte per connection and answers each request
// it can frame with `200 ok`.

/// What the raw upstream received, one entry per connection.
#[derive(Clone)]
struct Wire(Arc<Mutex<Vec<Vec<u8>>>>, SocketAddr);

impl Wire {
    fn connections(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    }

    /// Every request head received, on any connection, in order.
    fn heads(&self) -> Vec<String> {
        self.connections()
            .iter()
            .flat_map(|c| split_requests(c.as_bytes()))
            .collect()
    }

    /// The one request head received; fails if there were more or none.
    fn only_head(&self) -> String {
        let heads = self.heads();
        assert_eq!(heads.len(), 1, "expected exactly one request: {heads:#?}");
        heads[0].clone()
    }
}

/// Lower-case names and values of a head's header lines.
fn header_lines(head: &str) -> Vec<(String, String)> {
    head.split("\r\n")
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line has a colon");
            (n.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect()
}

fn values(head: &str, name: &str) -> Vec<String> {
    header_lines(head)
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect()
}

/// Splits a connection's bytes into request heads (framing each body by its
/// Content-Length or chunked encoding); leftover bytes count as another "head".
fn split_requests(mut buf: &[u8]) -> Vec<String> {
    let mut heads = Vec::new();
    while !buf.is_empty() {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            heads.push(String::from_utf8_lossy(buf).into_owned());
            break;
        };
        let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
        let rest = &buf[end + 4..];
        let consumed = match body_len(&head, rest) {
            Some(n) => n,
            None => rest.len(),
        };
        heads.push(head);
        buf = &rest[consumed.min(rest.len())..];
    }
    heads
}

/// How many bytes of `rest` the body of `head` takes, if it is complete.
fn body_len(head: &str, rest: &[u8]) -> Option<usize> {
    let te = values(head, "transfer-encoding");
    let cl = values(head, "content-length");
    if te.iter().any(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut at = 0;
        loop {
            let line_end = rest[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size_text = std::str::from_utf8(&rest[at..line_end]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                // Trailers (if any) end with an empty line.
                let end = rest[at..].windows(2).position(|w| w == b"\r\n")? + at;
                let mut end = end;
                while end > at {
                    at = end + 2;
                    end = rest[at..].windows(2).position(|w| w == b"\r\n")? + at;
                }
                return Some(end + 2);
            }
            at += size + 2;
            if at > rest.len() {
                return None;
            }
        }
    }
    let n: usize = cl.first().map(|v| v.parse().ok()).unwrap_or(Some(0))?;
    (rest.len() >= n).then_some(n)
}

/// The body of a recorded request (de-chunked).
fn body_of(conn: &str) -> Vec<u8> {
    let b = conn.as_bytes();
    let end = b.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = &conn[..end];
    let rest = &b[end..];
    if values(head, "transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let line_end = rest[at..].windows(2).position(|w| w == b"\r\n").unwrap() + at;
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[at..line_end])
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap(),
                16,
            )
            .unwrap();
            at = line_end + 2;
            if size == 0 {
                return out;
            }
            out.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    }
    let n = body_len(head, rest).unwrap_or(rest.len());
    rest[..n].to_vec()
}

async fn raw_upstream() -> (SocketAddr, Wire) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let wire = Wire(Arc::default(), addr);
    let w = wire.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let index = {
                let mut conns = w.0.lock().unwrap();
                conns.push(Vec::new());
                conns.len() - 1
            };
            let w = w.clone();
            tokio::spawn(async move {
                let mut answered = 0;
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    let n = match tokio::time::timeout(LIMIT, s.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                    let complete = {
                        let mut conns = w.0.lock().unwrap();
                        conns[index].extend_from_slice(&chunk[..n]);
                        complete_requests(&conns[index])
                    };
                    while answered < complete {
                        answered += 1;
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, wire)
}

/// How many whole requests `buf` holds.
fn complete_requests(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
        let rest = &buf[end + 4..];
        let Some(len) = body_len(&head, rest) else {
            break;
        };
        n += 1;
        buf = &rest[len..];
    }
    n
}

/// The proxy in front of a raw upstream.
async fn proxy_to_raw() -> (Harness, Wire) {
    let (addr, wire) = raw_upstream().await;
    let h = Harness::with(Setup {
        upstream_url: Some(format!("http://{addr}")),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    (h, wire)
}

// ---------------------------------------------------------------------------
// Client side.

/// Writes `request` on a fresh connection and reads until the proxy closes or `LIMIT` passes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    raw(addr, request, LIMIT).await
}

fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"))
}

fn statuses(answer: &str) -> Vec<u16> {
    answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| answer[i + 9..].get(..3)?.parse().ok())
        .collect()
}

fn head(addr: SocketAddr, lines: &[&str]) -> String {
    let mut s = format!("Host: {addr}\r\nx-proxy-key: {KEY}\r\n");
    for l in lines {
        s.push_str(l);
        s.push_str("\r\n");
    }
    s
}

// ---------------------------------------------------------------------------
// Request smuggling: the upstream sees one request, with one framing.

/// CL.TE and TE.CL: a chunked body that ends early, followed by a request the
/// attacker hopes the upstream reads as a second one.
#[tokio::test]
async fn content_length_with_transfer_encoding_reaches_the_upstream_once_with_one_framing() {
    for te_first in [false, true] {
        let (h, wire) = proxy_to_raw().await;
        let addr = h.server.proxy_addr;
        let framing = if te_first {
            "Transfer-Encoding: chunked\r\nContent-Length: 4"
        } else {
            "Content-Length: 4\r\nTransfer-Encoding: chunked"
        };
        let smuggled = "GET /workfront/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        let req = format!(
            "POST /workfront/x HTTP/1.1\r\n{}{framing}\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}",
            head(addr, &[])
        );
        let answer = exchange(addr, req.as_bytes()).await;
        assert_eq!(statuses(&answer), vec![200], "{answer:?}");
        let seen = wire.only_head();
        assert!(!seen.contains("smuggled"), "{seen}");
        let cl = values(&seen, "content-length");
        let te = values(&seen, "transfer-encoding");
        assert!(
            cl.len() + te.len() == 1,
            "exactly one framing upstream: {seen}"
        );
        assert_eq!(body_of(&wire.connections()[0]), b"hello");
    }
}

#[tokio::test]
async fn duplicate_equal_content_lengths_are_forwarded_as_one() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let req = format!(
        "POST /workfront/x HTTP/1.1\r\n{}Content-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        head(addr, &[])
    );
    let answer = exchange(addr, req.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer:?}");
    let seen = wire.only_head();
    assert_eq!(values(&seen, "content-length"), vec!["5"], "{seen}");
    assert!(values(&seen, "transfer-encoding").is_empty());
}

/// Framings the proxy refuses outright (400, connection closed, nothing upstream).
#[tokio::test]
async fn ambiguous_or_invalid_framing_is_bad_request_and_never_forwarded() {
    let cases: &[(&str, &str)] = &[
        (
            "differing Content-Length",
            "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        ("Content-Length list", "Content-Length: 5, 5\r\n\r\nhello"),
        ("signed Content-Length", "Content-Length: +5\r\n\r\nhello"),
        ("negative Content-Length", "Content-Length: -1\r\n\r\n"),
        (
            "hex Content-Length",
            "Content-Length: 0x5\r\n\r\nhello",
        ),
        (
            "chunked not last",
            "Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "second TE header not chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "unknown coding",
            "Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "space before colon",
            "Transfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "TE folded onto the next line",
            "Transfer-Encoding:\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "TE with a vertical tab",
            "Transfer-Encoding:\x0bchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    for (what, framing) in cases {
        let req = format!("POST /workfront/x HTTP/1.1\r\n{}{framing}", head(addr, &[]));
        let answer = exchange(addr, req.as_bytes()).await;
        assert_eq!(statuses(&answer), vec![400], "{what}: {answer:?}");
    }
    assert!(wire.heads().is_empty(), "{:#?}", wire.heads());
}

#[tokio::test]
async fn transfer_encoding_on_http_1_0_is_bad_request() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let req = format!(
        "POST /workfront/x HTTP/1.0\r\n{}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        head(addr, &[])
    );
    let answer = exchange(addr, req.as_bytes()).await;
    assert_eq!(statuses(&answer), vec![400], "{answer:?}");
    assert!(wire.heads().is_empty());
}

/// Chunk sizes that overflow, are not hex, or lack their CRLF: the body fails,
/// nothing reaches the upstream as a complete second request, and a held (form)
/// body is never forwarded at all.
#[tokio::test]
async fn malformed_chunks_never_become_a_second_upstream_request() {
    let bodies: &[(&str, &str)] = &[
        ("size overflow", "fffffffffffffffff1\r\nx\r\n0\r\n\r\n"),
        ("size not hex", "zz\r\nhello\r\n0\r\n\r\n"),
        ("negative size", "-5\r\nhello\r\n0\r\n\r\n"),
        ("data longer than size", "2\r\nhello\r\n0\r\n\r\n"),
        (
            "missing CRLF after data",
            "5\r\nhelloGET /workfront/smuggled HTTP/1.1\r\n\r\n",
        ),
    ];
    for form in [false, true] {
        let (h, wire) = proxy_to_raw().await;
        let addr = h.server.proxy_addr;
        let ct = if form {
            "Content-Type: application/x-www-form-urlencoded\r\n"
        } else {
            ""
        };
        for (what, body) in bodies {
            let req = format!(
                "POST /workfront/x HTTP/1.1\r\n{}{ct}Transfer-Encoding: chunked\r\n\r\n{body}",
                head(addr, &[])
            );
            let answer = exchange(addr, req.as_bytes()).await;
            assert_eq!(
                statuses(&answer),
                vec![400],
                "{what} (form {form}): {answer:?}"
            );
            assert!(answer.contains("\"bad_request\""), "{what}: {answer:?}");
        }
        for conn in wire.connections() {
            assert!(!conn.contains("smuggled"), "{conn}");
            assert_eq!(
                complete_requests(conn.as_bytes()),
                0,
                "a broken body was completed upstream: {conn}"
            );
        }
        // The client's broken body is not an upstream failure.
        let metrics = get(&h.admin("/metrics"), &[]).await.text();
        assert!(
            !metrics
                .lines()
                .any(|l| l.starts_with("ims_proxy_upstream_errors_total") && !l.ends_with(" 0")),
            "{metrics}"
        );
        if form {
            assert!(wire.heads().is_empty(), "{:#?}", wire.heads());
        }
    }
}

#[tokio::test]
async fn chunk_extensions_are_dropped_and_the_body_passes_whole() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let req = format!(
        "POST /workfront/x HTTP/1.1\r\n{}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;ext=\"a\r\n\"\r\nhello\r\n6;name=value\r\n world\r\n0\r\n\r\n",
        head(addr, &[])
    );
    let answer = exchange(addr, req.as_bytes()).await;
    // A CR inside an extension breaks the streamed body after the head went upstream:
    // the upstream request is aborted, never completed, and the client is told it was its body.
    assert_eq!(statuses(&answer), vec![400], "{answer:?}");
    assert!(answer.contains("\"bad_request\""), "{answer:?}");
    for conn in wire.connections() {
        assert_eq!(complete_requests(conn.as_bytes()), 0, "{conn:?}");
    }
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let req = format!(
        "POST /workfront/x HTTP/1.1\r\n{}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;ext=1\r\nhello\r\n6;name=value\r\n world\r\n0\r\n\r\n",
        head(addr, &[])
    );
    let answer = exchange(addr, req.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer:?}");
    let conn = &wire.connections()[0];
    assert_eq!(body_of(conn), b"hello world");
    assert!(
        !conn.contains("ext=1") && !conn.contains("name=value"),
        "{conn}"
    );
}

#[tokio::test]
async fn endless_chunk_extensions_are_cut_off_with_bounded_reading() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let start = format!(
        "POST /workfront/x HTTP/1.1\r\n{}Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n5;",
        head(addr, &[])
    );
    s.write_all(start.as_bytes()).await.unwrap();
    let filler = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    while sent < 16 * 1024 * 1024 {
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(&filler)).await {
            Ok(Ok(())) => sent += filler.len(),
            _ => break,
        }
    }
    assert!(
        sent < 16 * 1024 * 1024,
        "the proxy kept reading an endless chunk extension"
    );
    assert!(wire.heads().is_empty());
}

// ---------------------------------------------------------------------------
// Malformed heads.

#[tokio::test]
async fn control_characters_and_folding_in_heads_are_bad_request() {
    let cases: &[(&str, &[u8])] = &[
        ("CR in a value", b"x-a: b\rc\r\n"),
        ("NUL in a value", b"x-a: b\0c\r\n"),
        ("LF alone inside a value", b"x-a: b\nc d\r\n"),
        ("NUL in a name", b"x-\0a: b\r\n"),
        ("space in a name", b"x a: b\r\n"),
        ("separator in a name", b"x(a): b\r\n"),
        ("empty name", b": b\r\n"),
        ("obs-fold", b"x-a: b\r\n c\r\n"),
        ("obs-fold with a tab", b"x-a: b\r\n\tc\r\n"),
        ("folded key header", b"x-api-key: one\r\n two\r\n"),
        ("DEL in a value", b"x-a: b\x7fc\r\n"),
    ];
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    for (what, line) in cases {
        let mut req = format!("GET /workfront/x HTTP/1.1\r\n{}", head(addr, &[])).into_bytes();
        req.extend_from_slice(line);
        req.extend_from_slice(b"Connection: close\r\n\r\n");
        let answer = exchange(addr, &req).await;
        assert_eq!(statuses(&answer), vec![400], "{what}: {answer:?}");
    }
    assert!(wire.heads().is_empty(), "{:#?}", wire.heads());
}

#[tokio::test]
async fn bad_request_lines_are_refused() {
    let cases: &[(&str, &str)] = &[
        ("HTTP/0.9", "GET /workfront/x\r\n\r\n"),
        (
            "unknown version",
            "GET /workfront/x HTTP/1.2\r\nHost: x\r\n\r\n",
        ),
        (
            "two spaces",
            "GET  /workfront/x HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "tab separated",
            "GET\t/workfront/x HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "raw backslash",
            "GET /workfront\\..\\x HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "space in target",
            "GET /workfront/a b HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "NUL in target",
            "GET /workfront/a\0b HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ];
    let (h, wire) = proxy_to_raw().await;
    for (what, req) in cases {
        let answer = exchange(h.server.proxy_addr, req.as_bytes()).await;
        let st = statuses(&answer);
        assert_eq!(st, vec![400], "{what}: {answer:?}");
    }
    assert!(wire.heads().is_empty(), "{:#?}", wire.heads());
}

/// A request head written with bare LF line ends is re-written upstream with CRLF
/// only: the upstream never has to guess where a line ends.
#[tokio::test]
async fn bare_lf_line_ends_reach_the_upstream_as_clean_crlf() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let req = format!(
        "GET /workfront/x HTTP/1.1\nHost: {addr}\nx-proxy-key: {KEY}\nConnection: close\n\n"
    );
    let answer = exchange(addr, req.as_bytes()).await;
    let st = statuses(&answer);
    assert_eq!(st, vec![200], "{answer:?}");
    assert_eq!(wire.heads().len(), 1);
    for conn in wire.connections() {
        let head = &conn[..conn.find("\r\n\r\n").unwrap()];
        assert!(!head.replace("\r\n", "").contains('\n'), "{conn:?}");
        assert!(!head.replace("\r\n", "").contains('\r'), "{conn:?}");
    }
}

// ---------------------------------------------------------------------------
// Oversized heads: 431, bounded reading.

#[tokio::test]
async fn one_huge_header_is_431() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let big = "a".repeat(ims_proxy::server::MAX_HEAD_BYTES + 1024);
    let req = format!(
        "GET /workfront/x HTTP/1.1\r\n{}x-big: {big}\r\nConnection: close\r\n\r\n",
        head(addr, &[])
    );
    let answer = exchange(addr, req.as_bytes()).await;
    assert_eq!(
        statuses(&answer),
        vec![431],
        "{:?}",
        &answer[..answer.len().min(200)]
    );
    assert!(wire.heads().is_empty());
}

#[tokio::test]
async fn a_huge_target_is_refused_as_too_large() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let path = "/workfront/".to_string() + &"a".repeat(ims_proxy::server::MAX_HEAD_BYTES + 1024);
    let req = format!(
        "GET {path} HTTP/1.1\r\n{}Connection: close\r\n\r\n",
        head(addr, &[])
    );
    let answer = exchange(addr, req.as_bytes()).await;
    let st = statuses(&answer);
    assert_eq!(st, vec![431]);
    assert!(wire.heads().is_empty());
}

#[tokio::test]
async fn a_head_just_under_the_limit_is_served() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let big = "a".repeat(ims_proxy::server::MAX_HEAD_BYTES / 2);
    let req = format!(
        "GET /workfront/x HTTP/1.1\r\n{}x-big: {big}\r\nConnection: close\r\n\r\n",
        head(addr, &[])
    );
    let answer = exchange(addr, req.as_bytes()).await;
    assert_eq!(statuses(&answer), vec![200]);
    assert_eq!(values(&wire.only_head(), "x-big"), vec![big]);
}

/// An endless head: the proxy answers 431 and stops reading long before the
/// client runs out of bytes to send, so memory per connection stays bounded.
#[tokio::test]
async fn an_endless_head_is_cut_off_after_a_bounded_read() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "GET /workfront/x HTTP/1.1\r\n{}x-endless: ",
            head(addr, &[])
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let filler = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    let cap = 64 * 1024 * 1024;
    while sent < cap {
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(&filler)).await {
            Ok(Ok(())) => sent += filler.len(),
            _ => break,
        }
    }
    assert!(sent < cap, "the proxy kept reading an endless head");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 431, "{answer:?}");
    assert!(wire.heads().is_empty());
}

#[tokio::test]
async fn more_headers_than_the_limit_is_431() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let many: Vec<String> = (0..ims_proxy::server::MAX_HEADERS)
        .map(|i| format!("x-h{i}: {i}"))
        .collect();
    let lines: Vec<&str> = many.iter().map(String::as_str).collect();
    let req = format!(
        "GET /workfront/x HTTP/1.1\r\n{}Connection: close\r\n\r\n",
        head(addr, &lines)
    );
    let answer = exchange(addr, req.as_bytes()).await;
    assert_eq!(statuses(&answer), vec![431], "{answer:?}");
    assert!(wire.heads().is_empty());
    // Well under the limit is fine.
    let lines: Vec<&str> = many.iter().take(50).map(String::as_str).collect();
    let req = format!(
        "GET /workfront/x HTTP/1.1\r\n{}Connection: close\r\n\r\n",
        head(addr, &lines)
    );
    assert_eq!(status_of(&exchange(addr, req.as_bytes()).await), 200);
}

// ---------------------------------------------------------------------------
// Paths and targets.

#[tokio::test]
async fn dot_segments_and_encoded_separators_in_every_spelling_are_bad_request() {
    let targets = [
        "/workfront/a/../b",
        "/workfront/a/./b",
        "/workfront/..",
        "/workfront/a/%2e%2e/b",
        "/workfront/a/%2E%2E/b",
        "/workfront/a/%2e%2E/b",
        "/workfront/a/.%2E/b",
        "/workfront/a/%2e./b",
        "/workfront/a/%2E/b",
        "/workfront/a/..;/b",
        "/workfront/a/%2e%2e;x=1/b",
        "/workfront/a%2fb",
        "/workfront/a%2Fb",
        "/workfront/..%2f..%2fadmin",
        "/workfront/..%2F..%2Fadmin",
        "/workfront/a%5cb",
        "/workfront/a%5C..%5Cb",
        "/workfront/%252e%252e/admin",
        "/workfront/%252E%252e/admin",
        "/workfront/a%252fb",
        "/workfront/a%00b",
        "/workfront/%c0%ae%c0%ae/admin",
        "/workfront/%C0%AF",
        "/workfront/%e0%80%ae%e0%80%ae/admin",
    ];
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    for t in targets {
        let req = format!(
            "GET {t} HTTP/1.1\r\n{}Connection: close\r\n\r\n",
            head(addr, &[])
        );
        let answer = exchange(addr, req.as_bytes()).await;
        assert_eq!(statuses(&answer), vec![400], "{t}: {answer:?}");
        assert!(answer.contains("\"bad_request\""), "{t}: {answer:?}");
    }
    assert!(wire.heads().is_empty(), "{:#?}", wire.heads());
}

#[tokio::test]
async fn harmless_dots_and_percents_pass_byte_identical() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    for (i, (t, up)) in [
        ("/workfront/a/b.json", "/a/b.json"),
        ("/workfront/a/...", "/a/..."),
        ("/workfront/a/.well", "/a/.well"),
        ("/workfront/a/100%25", "/a/100%25"),
        ("/workfront/a/caf%C3%A9", "/a/caf%C3%A9"),
    ]
    .into_iter()
    .enumerate()
    {
        let req = format!(
            "GET {t} HTTP/1.1\r\n{}Connection: close\r\n\r\n",
            head(addr, &[])
        );
        assert_eq!(status_of(&exchange(addr, req.as_bytes()).await), 200, "{t}");
        // Heads are listed by upstream connection, and each worker has its own pool:
        // the newest head is not necessarily the last one listed.
        let lines: Vec<String> = wire
            .heads()
            .iter()
            .map(|h| h.lines().next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(lines.len(), i + 1, "{lines:?}");
        assert!(
            lines.contains(&format!("GET {up} HTTP/1.1")),
            "{t}: {lines:?}"
        );
    }
}

#[tokio::test]
async fn foreign_absolute_form_asterisk_and_authority_targets_are_refused() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    for (what, line, allowed) in [
        (
            "absolute-form, other host",
            "GET http://evil.example/workfront/x HTTP/1.1",
            &[400][..],
        ),
        (
            "absolute-form https",
            "GET https://evil.example/workfront/x HTTP/1.1",
            &[400][..],
        ),
        (
            "absolute-form with userinfo",
            &format!("GET http://user@{addr}/workfront/x HTTP/1.1"),
            &[400][..],
        ),
        ("asterisk-form", "OPTIONS * HTTP/1.1", &[400][..]),
        (
            "authority-form GET",
            "GET evil.example:443 HTTP/1.1",
            &[400][..],
        ),
        ("CONNECT", "CONNECT evil.example:443 HTTP/1.1", &[405][..]),
        (
            "CONNECT to the upstream",
            &format!("CONNECT {addr} HTTP/1.1"),
            &[405][..],
        ),
    ] {
        let req = format!("{line}\r\n{}Connection: close\r\n\r\n", head(addr, &[]));
        let answer = exchange(addr, req.as_bytes()).await;
        let st = statuses(&answer);
        assert!(
            st.len() == 1 && allowed.contains(&st[0]),
            "{what}: {answer:?}"
        );
        assert!(!answer.contains("HTTP/1.1 200"), "{what}: {answer:?}");
    }
    assert!(wire.heads().is_empty(), "{:#?}", wire.heads());
}

#[tokio::test]
async fn upgrade_requests_are_forwarded_as_plain_requests() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let req = format!(
        "GET /workfront/x HTTP/1.1\r\n{}Connection: Upgrade, HTTP2-Settings\r\nUpgrade: websocket\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        head(addr, &[])
    );
    let answer = exchange(addr, req.as_bytes()).await;
    assert!(!answer.contains(" 101 "), "{answer:?}");
    let seen = wire.only_head();
    for n in ["upgrade", "http2-settings"] {
        assert!(
            values(&seen, n).is_empty(),
            "{n} reached the upstream: {seen}"
        );
    }
    assert!(
        values(&seen, "connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("upgrade")),
        "{seen}"
    );
}

// ---------------------------------------------------------------------------
// Headers a client uses to steer the upstream.

#[tokio::test]
async fn client_credentials_in_any_spelling_never_reach_the_upstream() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let req = format!(
        "GET /workfront/x HTTP/1.1\r\nHost: {addr}\r\n\
         authorization: Bearer {KEY}\r\n\
         AUTHORIZATION: Bearer attacker-token-1\r\n\
         Authorization: Basic YXR0YWNrZXI6dG9rZW4=\r\n\
         X-API-KEY: attacker-client-id\r\n\
         x-api-key: second\r\n\
         x_api_key: cgi-style\r\n\
         X-Proxy-Key: {KEY}\r\n\
         Proxy-Authorization: Basic eDp5\r\n\
         proxy_authorization: x\r\n\
         X-GW-IMS-ORG-ID: ATTACKER@AdobeOrg\r\n\
         x-gw-ims-org-id: ATTACKER2@AdobeOrg\r\n\
         x_gw_ims_org_id: ATTACKER3@AdobeOrg\r\n\
         SessionID: stolen-session\r\n\
         Cookie: session=stolen\r\n\
         Connection: close\r\n\r\n"
    );
    let answer = exchange(addr, req.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer:?}");
    let seen = wire.only_head();
    let auth = values(&seen, "authorization");
    assert_eq!(auth.len(), 1, "{seen}");
    assert!(auth[0].starts_with("Bearer sim-"), "{seen}");
    assert_eq!(values(&seen, "x-api-key"), vec![CLIENT_ID]);
    assert_eq!(values(&seen, "x-gw-ims-org-id"), vec!["ORG123@AdobeOrg"]);
    for gone in [
        "x_api_key",
        "x-proxy-key",
        "proxy-authorization",
        "proxy_authorization",
        "x_gw_ims_org_id",
        "sessionid",
        "cookie",
    ] {
        assert!(
            values(&seen, gone).is_empty(),
            "{gone} reached the upstream: {seen}"
        );
    }
    for secret in [KEY, "attacker", "stolen", "ATTACKER", "cgi-style"] {
        assert!(
            !seen.contains(secret),
            "{secret} reached the upstream: {seen}"
        );
    }
}

#[tokio::test]
async fn client_forwarding_claims_never_reach_the_upstream() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let claims = [
        "X-Forwarded-For: 10.0.0.1",
        "x-forwarded-for: 10.0.0.2",
        "X-Forwarded-Host: admin.internal",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Port: 443",
        "X-Forwarded-Prefix: /admin",
        "x_forwarded_for: 10.0.0.3",
        "Forwarded: for=10.0.0.4;host=admin.internal;proto=https",
        "X-Real-IP: 10.0.0.5",
        "True-Client-IP: 10.0.0.6",
        "X-Client-IP: 10.0.0.7",
        "X-Cluster-Client-IP: 10.0.0.8",
        "X-Original-URL: /admin/users",
        "X-Rewrite-URL: /admin/users",
        "X-Original-Host: admin.internal",
        "Host: admin.internal",
        "Via: 1.1 spoofed",
    ];
    let req = format!(
        "GET /workfront/x HTTP/1.1\r\n{}Connection: close\r\n\r\n",
        head(addr, &claims)
    );
    let answer = exchange(addr, req.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer:?}");
    let seen = wire.only_head();
    for n in [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x_forwarded_for",
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-original-host",
    ] {
        assert!(
            values(&seen, n).is_empty(),
            "{n} reached the upstream: {seen}"
        );
    }
    assert!(
        !seen.contains("10.0.0.") && !seen.contains("admin"),
        "{seen}"
    );
    assert_eq!(values(&seen, "host"), vec![wire.1.to_string()]);
    // The client's Via is kept (it is a record of the path), the proxy's is added.
    assert_eq!(
        values(&seen, "via").last().map(String::as_str),
        Some("1.1 ims-proxy")
    );
}

#[tokio::test]
async fn connection_header_cannot_remove_what_the_proxy_adds() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let req = format!(
        "GET /workfront/x HTTP/1.1\r\n{}Connection: close, authorization, x-api-key, x-gw-ims-org-id, host, x-request-id, via\r\n\r\n",
        head(addr, &[])
    );
    assert_eq!(status_of(&exchange(addr, req.as_bytes()).await), 200);
    let seen = wire.only_head();
    assert_eq!(values(&seen, "authorization").len(), 1, "{seen}");
    assert_eq!(values(&seen, "x-api-key"), vec![CLIENT_ID]);
    assert_eq!(values(&seen, "x-gw-ims-org-id"), vec!["ORG123@AdobeOrg"]);
    assert_eq!(values(&seen, "host").len(), 1);
    assert_eq!(values(&seen, "x-request-id").len(), 1);
    assert_eq!(values(&seen, "via"), vec!["1.1 ims-proxy"]);
}

#[tokio::test]
async fn credential_parameters_in_any_spelling_leave_the_query_and_form() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let q = format!("apiKey={KEY}&APIKEY=a&api%4Bey=b&api%4bEY=c&sessionID=s&SESSIONID=t&session%49D=u&api%E2%84%AAey=k&keep=1&apiKeyX=2");
    let req = format!("GET /workfront/x?{q} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&exchange(addr, req.as_bytes()).await), 200);
    let line = wire.only_head().lines().next().unwrap().to_string();
    assert_eq!(line, "GET /x?keep=1&apiKeyX=2 HTTP/1.1");

    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let body = format!("apiKey={KEY}&name=P+1&ApiKey=x&sessionid=y&api%4bey=z&status=CUR");
    let req = format!(
        "POST /workfront/x HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(status_of(&exchange(addr, req.as_bytes()).await), 200);
    let conn = &wire.connections()[0];
    assert_eq!(body_of(conn), b"name=P+1&status=CUR");
}

#[tokio::test]
async fn form_bodies_over_the_limit_are_413_and_nothing_is_forwarded() {
    let (addr_up, wire) = raw_upstream().await;
    let h = Harness::with(Setup {
        server: "max_scrub_body_bytes = 1024".into(),
        upstream_url: Some(format!("http://{addr_up}")),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let addr = h.server.proxy_addr;
    let body = format!("a={}", "x".repeat(2048));
    for framing in [
        format!("Content-Length: {}\r\n\r\n{body}", body.len()),
        format!(
            "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        ),
        // A small declared length with chunked wins nothing: TE decides, the limit still holds.
        format!(
            "Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        ),
    ] {
        let req = format!(
            "POST /workfront/x HTTP/1.1\r\n{}Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n{framing}",
            head(addr, &[])
        );
        let answer = exchange(addr, req.as_bytes()).await;
        assert_eq!(statuses(&answer), vec![413], "{answer:?}");
        assert!(answer.contains("payload_too_large"));
    }
    assert!(wire.heads().is_empty());
}

#[tokio::test]
async fn pipelined_requests_reach_the_upstream_as_the_same_requests() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let one = format!(
        "POST /workfront/one HTTP/1.1\r\n{}Content-Length: 3\r\n\r\nabc",
        head(addr, &[])
    );
    let two = format!(
        "GET /workfront/two HTTP/1.1\r\n{}Connection: close\r\n\r\n",
        head(addr, &[])
    );
    let answer = exchange(addr, format!("{one}{two}").as_bytes()).await;
    assert_eq!(statuses(&answer), vec![200, 200], "{answer:?}");
    let lines: Vec<String> = wire
        .heads()
        .iter()
        .map(|h| h.lines().next().unwrap().to_string())
        .collect();
    assert_eq!(lines, ["POST /one HTTP/1.1", "GET /two HTTP/1.1"]);
}

// ---------------------------------------------------------------------------
// Access control edges.

/// The proxy listening on `[::1]` with `allow_cidrs` lines.
async fn on_ipv6(
    allow: &str,
) -> (
    ims_proxy::server::ServerHandle,
    ims_proxy::sim::SimIms,
    ims_proxy::sim::SimUpstream,
) {
    let (ims, up) = simulators().await;
    let setup = Setup {
        access: format!("allow_cidrs = {allow}"),
        ..Setup::default()
    };
    let text = config_text(&setup, &ims.token_url(), &up.url()).replacen(
        "\nlisten = \"127.0.0.1:0\"",
        "\nlisten = \"[::1]:0\"",
        1,
    );
    let config = ims_proxy::config::Config::parse(
        &text,
        std::path::Path::new("."),
        &std::collections::HashMap::new(),
    )
    .unwrap();
    let server = ims_proxy::server::start(config, None).await.unwrap();
    (server, ims, up)
}

#[tokio::test]
async fn allow_cidrs_judges_ipv6_sources_before_any_key() {
    let (server, _ims, up) = on_ipv6(r#"["::1/128"]"#).await;
    assert!(server.proxy_addr.is_ipv6());
    let url = format!("http://{}/workfront/x", server.proxy_addr);
    assert_eq!(get(&url, &[("x-proxy-key", KEY)]).await.status, 200);

    let (server, _ims, up2) = on_ipv6(r#"["127.0.0.0/8", "fd00::/8"]"#).await;
    let url = format!("http://{}/workfront/x", server.proxy_addr);
    let r = get(&url, &[("x-proxy-key", KEY)]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "forbidden");
    // Checked before keys: no key at all is 403 too, not 401.
    assert_eq!(get(&url, &[]).await.status, 403);
    let metrics = get(&format!("http://{}/metrics", server.admin_addr), &[])
        .await
        .text();
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"ims_proxy_auth_failures_total{reason="forbidden"} 2"#),
        "{metrics}"
    );
    assert_eq!(up.state().count(), 1);
    assert_eq!(up2.state().count(), 0);
}

#[tokio::test]
async fn disabling_a_key_takes_effect_on_reload_and_keeps_the_token() {
    let h = Harness::with_file(Setup::default()).await;
    h.ready().await;
    assert_eq!(
        get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)])
            .await
            .status,
        200
    );
    let issued = h.ims().issued();
    h.write_config(&Setup {
        key: "disabled = true".into(),
        ..Setup::default()
    });
    let report = h.server.shared.reload().await;
    assert_eq!(report.result, "ok", "{report:?}");
    assert!(report.kept.contains(&"workfront".to_string()), "{report:?}");
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        h.ims().issued(),
        issued,
        "switching a key off must not touch the credential"
    );
    // Switched back on, it works again.
    h.write_config(&Setup::default());
    assert_eq!(h.server.shared.reload().await.result, "ok");
    assert_eq!(
        get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)])
            .await
            .status,
        200
    );
}

#[test]
fn open_mode_on_a_network_address_is_refused_by_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &Setup {
            access: "mode = \"open\"".into(),
            ..Setup::default()
        },
        "http://127.0.0.1:1/ims",
        "http://127.0.0.1:2",
    )
    .replacen("\nlisten = \"127.0.0.1:0\"", "\nlisten = \"0.0.0.0:0\"", 1);
    let path = dir.path().join("open.toml");
    std::fs::write(&path, &text).unwrap();
    for cmd in ["check", "run"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ims-proxy"))
            .args([cmd, "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{cmd}` kept running with open mode on 0.0.0.0");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!status.success(), "`{cmd}` accepted open mode on 0.0.0.0");
        assert!(all.contains("allow_open_on_network"), "{cmd}: {all}");
    }
    // With the explicit opt-in, `check` accepts it.
    std::fs::write(
        &path,
        text.replace(
            "mode = \"open\"",
            "mode = \"open\"\nallow_open_on_network = true",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ims-proxy"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The proxy's own HTTP/1.1 server takes requests without a body and hands every
// other one to hyper, with the bytes it has read, on the same connection.

/// Splits the proxy's answers into (head, body) pairs, framed by content-length;
/// the answers to `head_requests` (by position) have no body whatever they state.
fn answers(mut wire: &[u8], head_requests: &[usize]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let end = wire
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("not an answer: {:?}", String::from_utf8_lossy(wire)))
            + 4;
        let head = String::from_utf8_lossy(&wire[..end]).into_owned();
        let len = if head_requests.contains(&out.len()) {
            0
        } else {
            values(&head, "content-length")[0].parse::<usize>().unwrap()
        };
        out.push((head, wire[end..end + len].to_vec()));
        wire = &wire[end + len..];
    }
    out
}

#[tokio::test]
async fn pipelined_requests_with_and_without_bodies_are_answered_in_order_on_one_connection() {
    let (h, wire) = proxy_to_raw().await;
    let addr = h.server.proxy_addr;
    let common = head(addr, &[]);
    // Bodiless (ours), a body (hyper's), bodiless again, HEAD, a zero length, and a
    // last one that closes: all written at once.
    let req = format!(
        "GET /workfront/one HTTP/1.1\r\n{common}\r\n\
         POST /workfront/two HTTP/1.1\r\n{common}content-length: 5\r\n\r\nhello\
         GET /workfront/three HTTP/1.1\r\n{common}\r\n\
         HEAD /workfront/four HTTP/1.1\r\n{common}\r\n\
         DELETE /workfront/five HTTP/1.1\r\n{common}content-length: 0\r\n\r\n\
         GET /workfront/six HTTP/1.1\r\n{common}Connection: close\r\n\r\n"
    );
    let answer = exchange(addr, req.as_bytes()).await;
    let got = answers(answer.as_bytes(), &[3]);
    assert_eq!(got.len(), 6, "{answer}");
    for (i, (head, body)) in got.iter().enumerate() {
        assert_eq!(status_of(head), 200, "{i}: {head}");
        assert_eq!(values(head, "x-request-id").len(), 1, "{head}");
        let expected: &[u8] = if i == 3 { b"" } else { b"ok" };
        assert_eq!(body, expected, "{i}: {head}");
    }
    // The answer to HEAD keeps the upstream's length; only the last one closes.
    assert_eq!(values(&got[3].0, "content-length"), vec!["2"]);
    for (head, _) in &got[..5] {
        assert!(values(head, "connection").is_empty(), "{head}");
    }
    assert_eq!(values(&got[5].0, "connection"), vec!["close"]);
    let seen: Vec<String> = wire
        .heads()
        .iter()
        .map(|h| h.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    for want in [
        "GET /one",
        "POST /two",
        "GET /three",
        "HEAD /four",
        "DELETE /five",
        "GET /six",
    ] {
        assert!(seen.iter().any(|s| s == want), "{want} not seen: {seen:?}");
    }
    let posted = wire
        .connections()
        .iter()
        .find(|c| c.starts_with("POST /two"))
        .cloned()
        .or_else(|| {
            wire.connections()
                .iter()
                .find_map(|c| c.find("POST /two").map(|at| c[at..].to_string()))
        })
        .expect("the POST reached the upstream");
    assert_eq!(body_of(&posted), b"hello");
}

/// A client that gives up on a slow upstream and closes: the in-flight gauge comes
/// back down, whether it left before the response head (`partial: None`) or while
/// the body stalled after its first bytes.
async fn client_leaves(partial: Option<&'static [u8]>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Some(first) = partial {
                    let mut head = [0u8; 4096];
                    let _ = s.read(&mut head).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
                        .await;
                    let _ = s.write_all(first).await;
                }
                tokio::time::sleep(LIMIT).await;
                drop(s);
            });
        }
    });
    let h = Harness::with(Setup {
        upstream_url: Some(format!("http://{upstream}")),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let addr = h.server.proxy_addr;
    let in_flight = || async {
        metric(
            &metrics_text(&h).await,
            "ims_proxy_inflight_requests{route=\"workfront\"}",
        )
    };
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /workfront/slow HTTP/1.1\r\n{}\r\n", head(addr, &[]));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut waited = 0;
    while in_flight().await != Some(1.0) {
        waited += 1;
        assert!(waited < 100, "the request never went in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(first) = partial {
        // The head and the first bytes of the body came through before the stall.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.ends_with(first) {
            let n = tokio::time::timeout(LIMIT, s.read(&mut chunk))
                .await
                .expect("the body's first bytes arrive")
                .unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    }
    drop(s);
    let mut waited = 0;
    while in_flight().await != Some(0.0) {
        waited += 1;
        assert!(waited < 100, "the exchange outlived its client");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_frees_the_exchange() {
    client_leaves(None).await;
}

#[tokio::test]
async fn a_client_that_leaves_while_the_body_stalls_frees_the_exchange() {
    client_leaves(Some(b"partial")).await;
}
