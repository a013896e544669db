//! The upstream connection pool, seen from a raw upstream that numbers its
//! connections: reuse, upstreams that close kept-alive connections, the idle
//! limit, responses abandoned half-way, and HTTP/1.1 framing (chunked, interim
//! responses, doubtful lengths) that must never let one response run into the next.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(5);

/// How long the raw upstream keeps a silent connection: longer than any wait here,
/// so a connection that closes sooner was closed by the proxy.
const UPSTREAM_IDLE: Duration = Duration::from_secs(30);

/// How the raw upstream treats each connection.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers every request and keeps the connection open.
    KeepAlive,
    /// Answers one request (without `Connection: close`), then closes.
    CloseAfterOne,
}

/// A raw HTTP/1.1 upstream. Each answer says which connection served it
/// (`conn=N req=M`); `/big` starts a 64 MiB body and sends it slowly; the
/// paths of [`framed`] answer with unusual framing.
struct RawUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(mode: Mode) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (a, o) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let conn = a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    serve(s, conn, mode).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        RawUpstream {
            addr,
            accepted,
            open,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Serves requests without bodies until the peer leaves, `UPSTREAM_IDLE` passes, or `mode` says close.
async fn serve(mut s: TcpStream, conn: usize, mode: Mode) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    for req in 0.. {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match tokio::time::timeout(UPSTREAM_IDLE, s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        if head.starts_with("GET /big") {
            let size = 64u64 << 20;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            // Slow enough that the client gives up long before the end.
            for _ in 0..(size >> 16) {
                if s.write_all(&[b'x'; 1 << 16]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            return;
        }
        let body = format!("conn={conn} req={req}");
        let path = head.split(' ').nth(1).unwrap_or("/");
        let (answer, close) = framed(path, &body).unwrap_or_else(|| {
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            (answer, false)
        });
        if s.write_all(answer.as_bytes()).await.is_err() || close || mode == Mode::CloseAfterOne {
            return;
        }
    }
}

/// The answer for a path with unusual framing, with `body` in it, and whether the
/// upstream closes the connection after it.
fn framed(path: &str, body: &str) -> Option<(String, bool)> {
    let n = body.len();
    let (left, right) = body.split_at(n / 2);
    Some(match path.strip_prefix("/x/")? {
        // Chunks split mid-body, an extension, and a trailer section.
        "chunked" => (
            format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x};ext=1\r\n{left}\r\n{:x}\r\n{right}\r\n0\r\nx-checksum: 1\r\n\r\n",
                left.len(),
                right.len()
            ),
            false,
        ),
        // Interim responses come before the final one and are not it.
        "interim" => (
            format!("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n{body}"),
            false,
        ),
        // Both lengths: chunked wins (RFC 9112 §6.3), and the connection is not trusted again.
        "both-lengths" => (
            format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 999\r\n\r\n{n:x}\r\n{body}\r\n0\r\n\r\n"),
            false,
        ),
        // No length: the body ends when the upstream closes.
        "until-close" => (format!("HTTP/1.1 200 OK\r\n\r\n{body}"), true),
        // HTTP/1.0 without keep-alive: the proxy must not reuse it, even left open.
        "http10" => (
            format!("HTTP/1.0 200 OK\r\ncontent-length: {n}\r\n\r\n{body}"),
            false,
        ),
        // `Connection: close`, the upstream leaving the connection open anyway.
        "close" => (
            format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {n}\r\n\r\n{body}"),
            false,
        ),
        // Bytes after the response that nobody asked for: an answer to no request.
        "extra" => (
            format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n{body}HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"),
            false,
        ),
        "conflicting-lengths" => (
            format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\ncontent-length: 1\r\n\r\n{body}"),
            false,
        ),
        "garbage" => ("HTTP/1.1 two hundred\r\n\r\n".to_string(), false),
        _ => return None,
    })
}

/// One worker (so one pool) in front of the raw upstream, with extra `[outbound]` lines.
async fn proxy_to(up: &RawUpstream, outbound: &str) -> Harness {
    let h = Harness::with(Setup {
        server: "workers = 1".into(),
        outbound: outbound.into(),
        upstream_url: Some(format!("http://{}", up.addr)),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    h
}

/// Waits (at most `LIMIT`) until the proxy has closed every connection to `up`.
async fn wait_all_closed(up: &RawUpstream, what: &str) {
    let deadline = Instant::now() + LIMIT;
    while up.open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.open(), 0, "{what} is still open after {LIMIT:?}");
}

async fn wf_get(h: &Harness) -> Reply {
    get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = RawUpstream::start(Mode::KeepAlive).await;
    let h = proxy_to(&up, "").await;
    for i in 0..10 {
        let r = wf_get(&h).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("conn=0 req={i}"));
    }
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn an_upstream_closing_each_kept_alive_connection_fails_no_request() {
    // No pause between requests: the next one races the upstream's close, and is
    // either given a fresh connection or retried on one, never refused.
    let up = RawUpstream::start(Mode::CloseAfterOne).await;
    let h = proxy_to(&up, "").await;
    for i in 0..30 {
        let r = wf_get(&h).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert!(r.text().ends_with(" req=0"), "{}", r.text());
    }
    assert_eq!(up.accepted(), 30);
}

#[tokio::test]
async fn idle_upstream_connections_close_after_pool_idle_timeout() {
    let up = RawUpstream::start(Mode::KeepAlive).await;
    let h = proxy_to(&up, "pool_idle_timeout = \"200ms\"").await;
    assert_eq!(wf_get(&h).await.text(), "conn=0 req=0");
    assert_eq!(up.open(), 1);
    wait_all_closed(&up, "the idle connection").await;
    // The next request opens a new connection.
    assert_eq!(wf_get(&h).await.text(), "conn=1 req=0");
}

// The idle limit holds when a connection is taken, not only when the sweep (every
// half limit) runs: an operator sets it below the upstream's keep-alive so that the
// upstream never closes a connection the proxy is about to reuse.
#[tokio::test]
async fn a_connection_past_the_idle_limit_is_never_reused() {
    let up = RawUpstream::start(Mode::KeepAlive).await;
    let h = proxy_to(&up, "pool_idle_timeout = \"1s\"").await;
    // The sweep starts with the first connection and looks every 0.5 s.
    assert_eq!(wf_get(&h).await.text(), "conn=0 req=0");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(wf_get(&h).await.text(), "conn=0 req=1");
    // Idle since 0.6 s: the sweeps at 1 s and 1.5 s find it younger than the limit,
    // so at 1.75 s only the check when it is taken keeps it from being reused.
    tokio::time::sleep(Duration::from_millis(1150)).await;
    assert_eq!(wf_get(&h).await.text(), "conn=1 req=0");
    assert_eq!(up.accepted(), 2);
}

#[tokio::test]
async fn a_response_abandoned_half_way_never_answers_the_next_request() {
    let up = RawUpstream::start(Mode::KeepAlive).await;
    let h = proxy_to(&up, "").await;
    // A client reads the head of a long download and leaves.
    let mut c = TcpStream::connect(h.server.proxy_addr).await.unwrap();
    c.write_all(
        format!("GET /workfront/big HTTP/1.1\r\nhost: p\r\nx-proxy-key: {KEY}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 16384];
    while seen.len() < 100_000 {
        let n = tokio::time::timeout(LIMIT, c.read(&mut chunk))
            .await
            .expect("the download starts")
            .unwrap();
        assert!(n > 0, "the proxy closed early");
        seen.extend_from_slice(&chunk[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(up.open(), 1);
    drop(c);
    // The half-read upstream connection is closed, not kept.
    wait_all_closed(&up, "the abandoned upstream connection").await;
    // The half-read connection cannot carry another exchange: a new one does.
    for i in 0..3 {
        let r = wf_get(&h).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("conn=1 req={i}"));
    }
    assert_eq!(up.accepted(), 2);
}

// Each unusual framing is read whole, and the connection is kept only where the
// response's end was certain: a doubtful one never carries the next request.
#[tokio::test]
async fn every_framing_is_read_whole_and_a_doubtful_one_never_carries_the_next_request() {
    let up = RawUpstream::start(Mode::KeepAlive).await;
    let h = proxy_to(&up, "").await;
    let (mut conn, mut req) = (0, 0);
    for (path, kept) in [
        ("chunked", true),
        ("interim", true),
        ("both-lengths", false),
        ("until-close", false),
        ("http10", false),
        ("close", false),
        ("extra", false),
    ] {
        let r = get(
            &h.url(&format!("/workfront/x/{path}")),
            &[("x-proxy-key", KEY)],
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.text(), format!("conn={conn} req={req}"), "{path}");
        if kept {
            req += 1;
        } else {
            (conn, req) = (conn + 1, 0);
        }
        // The next plain request shows whether the connection was kept.
        let r = wf_get(&h).await;
        assert_eq!(r.text(), format!("conn={conn} req={req}"), "after {path}");
        req += 1;
    }
    // Connections the proxy gave up on are closed by it, not left to the upstream.
    let deadline = Instant::now() + LIMIT;
    while up.open() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.open(), 1, "only the last connection stays open");
}

#[tokio::test]
async fn an_invalid_response_is_a_502_and_its_connection_is_dropped() {
    let up = RawUpstream::start(Mode::KeepAlive).await;
    let h = proxy_to(&up, "").await;
    for (i, path) in ["conflicting-lengths", "garbage"].into_iter().enumerate() {
        let r = get(
            &h.url(&format!("/workfront/x/{path}")),
            &[("x-proxy-key", KEY)],
        )
        .await;
        r.assert_refusal(502, "upstream_unreachable");
        assert_eq!(
            wf_get(&h).await.text(),
            format!("conn={} req=0", i + 1),
            "after {path}"
        );
    }
}
