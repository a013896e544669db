//! Every row of the spec's "Requests the proxy refuses" table, and its edges:
//! the status, the JSON code, the request id, the metrics, and that a refused
//! request never reaches the upstream.

mod support;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RAW_LIMIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 helpers (clients normalise paths and refuse CONNECT, so some
// requests have to be written by hand).

/// The first response in `buf` (an interim 1xx counts) and the bytes it took,
/// once it is complete.
fn parse_response(buf: &[u8]) -> Option<(Reply, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end - 4]).expect("response head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut words = status_line.splitn(3, ' ');
    assert_eq!(words.next(), Some("HTTP/1.1"), "status line: {status_line}");
    let status: u16 = words
        .next()
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut headers = HeaderMap::new();
    for line in lines {
        let (n, v) = line.split_once(':').expect("header line");
        headers.append(
            HeaderName::from_bytes(n.trim().as_bytes()).expect("header name"),
            HeaderValue::from_str(v.trim()).expect("header value"),
        );
    }
    let status = StatusCode::from_u16(status).expect("status");
    let rest = &buf[head_end..];
    if status.is_informational() {
        return Some((
            Reply {
                status,
                headers,
                body: Bytes::new(),
            },
            head_end,
        ));
    }
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.to_str().unwrap().to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = rest[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size_text = std::str::from_utf8(&rest[at..line_end]).expect("chunk size");
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            at = line_end + 2;
            if size == 0 {
                // No trailers expected: just the final CRLF.
                if rest.len() < at + 2 {
                    return None;
                }
                return Some((
                    Reply {
                        status,
                        headers,
                        body: body.into(),
                    },
                    head_end + at + 2,
                ));
            }
            if rest.len() < at + size + 2 {
                return None;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    }
    let len: usize = headers
        .get("content-length")
        .map(|v| v.to_str().unwrap().parse().expect("content-length"))
        .unwrap_or(0);
    if rest.len() < len {
        return None;
    }
    Some((
        Reply {
            status,
            headers,
            body: Bytes::copy_from_slice(&rest[..len]),
        },
        head_end + len,
    ))
}

/// Reads from `s` into `buf` until `done(buf)` or the peer closes or `limit` passes.
async fn read_until(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    limit: Duration,
    done: impl Fn(&[u8]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut chunk = [0u8; 16 * 1024];
    while !done(buf) {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` (which should say `Connection: close`) and parses the one response.
async fn raw_reply(addr: SocketAddr, request: &str) -> Reply {
    let text = raw(addr, request.as_bytes(), RAW_LIMIT).await;
    let (reply, used) = parse_response(text.as_bytes())
        .unwrap_or_else(|| panic!("no complete response in {text:?}"));
    assert!(
        !reply.status.is_informational(),
        "unexpected interim response: {text:?}"
    );
    assert_eq!(used, text.len(), "one response only: {text:?}");
    reply
}

/// A GET with the valid key written by hand, for a path a client library would normalise.
async fn raw_get(h: &Harness, target: &str) -> Reply {
    let addr = h.server.proxy_addr;
    raw_reply(addr, &format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nx-proxy-key: {KEY}\r\nConnection: close\r\n\r\n")).await
}

async fn metrics(h: &Harness) -> String {
    get(&h.admin("/metrics"), &[]).await.text()
}

fn assert_metric(metrics: &str, line: &str) {
    assert!(
        metrics.lines().any(|l| l == line),
        "missing metric line {line:?} in:\n{metrics}"
    );
}

fn retry_after(r: &Reply) -> u64 {
    r.headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("Retry-After missing: {:?}", r.headers))
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds")
}

// ---------------------------------------------------------------------------
// 400 bad_request

async fn assert_dot_segment_refused(target: &str) {
    let h = Harness::start().await;
    let r = raw_get(&h, target).await;
    r.assert_refusal(400, "bad_request");
    assert_eq!(h.up().count(), 0, "{target} reached the upstream");
}

#[tokio::test]
async fn dot_dot_segment_is_bad_request() {
    assert_dot_segment_refused("/workfront/../x").await;
}

#[tokio::test]
async fn single_dot_segment_is_bad_request() {
    assert_dot_segment_refused("/workfront/./x").await;
}

#[tokio::test]
async fn encoded_dot_dot_segment_is_bad_request() {
    assert_dot_segment_refused("/workfront/%2e%2e/x").await;
}

#[tokio::test]
async fn encoded_upper_case_single_dot_segment_is_bad_request() {
    assert_dot_segment_refused("/workfront/%2E/x").await;
}

#[tokio::test]
async fn half_encoded_dot_dot_segment_is_bad_request() {
    assert_dot_segment_refused("/workfront/.%2e/x").await;
}

#[tokio::test]
async fn dots_inside_a_segment_are_not_dot_segments() {
    let h = Harness::start().await;
    let r = raw_get(&h, "/workfront/file.json/...").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.up().last().unwrap().path, "/file.json/...");
}

#[tokio::test]
async fn absolute_form_target_naming_another_host_is_bad_request() {
    let h = Harness::start().await;
    let addr = h.server.proxy_addr;
    let r = raw_reply(
        addr,
        &format!("GET http://evil.example/workfront/x HTTP/1.1\r\nHost: {addr}\r\nx-proxy-key: {KEY}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    r.assert_refusal(400, "bad_request");
    assert_eq!(h.up().count(), 0);
}

#[tokio::test]
async fn absolute_form_target_naming_the_proxy_itself_is_served() {
    let h = Harness::start().await;
    let addr = h.server.proxy_addr;
    let r = raw_reply(
        addr,
        &format!("GET http://{addr}/workfront/x?a=1 HTTP/1.1\r\nHost: {addr}\r\nx-proxy-key: {KEY}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = h.up().last().expect("forwarded");
    assert_eq!(seen.path, "/x");
    assert_eq!(seen.query.as_deref(), Some("a=1"));
    assert_eq!(seen.headers["host"], h.upstream.addr().to_string());
}

#[tokio::test]
async fn malformed_form_body_is_bad_request() {
    let h = Harness::start().await;
    let r = post(
        &h.url("/workfront/attask/api/v19.0/proj"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-proxy-key", KEY),
        ],
        "a=%zz",
    )
    .await;
    r.assert_refusal(400, "bad_request");
    assert_eq!(h.up().count(), 0);
}

#[tokio::test]
async fn malformed_form_body_carrying_the_key_is_bad_request() {
    let h = Harness::start().await;
    let r = post(
        &h.url("/workfront/attask/api/v19.0/proj"),
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("apiKey={KEY}&name=%4"),
    )
    .await;
    r.assert_refusal(400, "bad_request");
    assert_eq!(h.up().count(), 0);
}

// ---------------------------------------------------------------------------
// 401 unauthorized

#[tokio::test]
async fn no_key_is_unauthorized_with_bearer_challenge() {
    let h = Harness::start().await;
    let r = get(&h.url("/workfront/x"), &[]).await;
    r.assert_refusal(401, "unauthorized");
    assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="ims-proxy""#);
    assert_eq!(h.up().count(), 0);
    let m = metrics(&h).await;
    assert_metric(&m, r#"ims_proxy_auth_failures_total{reason="missing"} 1"#);
    assert_metric(
        &m,
        r#"ims_proxy_requests_total{client="none",method="GET",route="workfront",status="401"} 1"#,
    );
}

#[tokio::test]
async fn wrong_key_is_unauthorized() {
    let h = Harness::start().await;
    for headers in [
        vec![("x-proxy-key", "not-the-key")],
        vec![("authorization", "Bearer not-the-key")],
        vec![("x-api-key", "not-the-key")],
    ] {
        let r = get(&h.url("/workfront/x"), &headers).await;
        r.assert_refusal(401, "unauthorized");
        assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="ims-proxy""#);
    }
    let r = get(&h.url("/workfront/x?apiKey=not-the-key"), &[]).await;
    r.assert_refusal(401, "unauthorized");
    assert_eq!(h.up().count(), 0);
    let m = metrics(&h).await;
    assert_metric(&m, r#"ims_proxy_auth_failures_total{reason="invalid"} 4"#);
    assert_metric(&m, r#"ims_proxy_auth_failures_total{reason="missing"} 0"#);
    assert!(
        !m.contains("not-the-key"),
        "a client-sent key must never reach the metrics"
    );
}

#[tokio::test]
async fn wrong_key_in_form_body_is_unauthorized() {
    let h = Harness::start().await;
    let r = post(
        &h.url("/workfront/x"),
        &[("content-type", "application/x-www-form-urlencoded")],
        "apiKey=not-the-key&a=1",
    )
    .await;
    r.assert_refusal(401, "unauthorized");
    assert_eq!(h.up().count(), 0);
    assert_metric(
        &metrics(&h).await,
        r#"ims_proxy_auth_failures_total{reason="invalid"} 1"#,
    );
}

#[tokio::test]
async fn disabled_key_is_unauthorized_as_if_unknown() {
    let h = Harness::with(Setup {
        key: "disabled = true".into(),
        ..Setup::default()
    })
    .await;
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    r.assert_refusal(401, "unauthorized");
    assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="ims-proxy""#);
    assert_eq!(h.up().count(), 0);
    assert_metric(
        &metrics(&h).await,
        r#"ims_proxy_auth_failures_total{reason="invalid"} 1"#,
    );
    // The other key is unaffected.
    assert_eq!(
        get(&h.url("/fusion/x"), &[("x-proxy-key", FUSION_KEY)])
            .await
            .status,
        200
    );
}

// ---------------------------------------------------------------------------
// 403 forbidden

#[tokio::test]
async fn key_limited_to_another_route_is_forbidden() {
    let h = Harness::start().await;
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", FUSION_KEY)]).await;
    r.assert_refusal(403, "forbidden");
    assert_eq!(h.up().count(), 0);
    assert_eq!(
        get(&h.url("/fusion/x"), &[("x-proxy-key", FUSION_KEY)])
            .await
            .status,
        200
    );
    let m = metrics(&h).await;
    assert_metric(&m, r#"ims_proxy_auth_failures_total{reason="forbidden"} 1"#);
    assert_metric(
        &m,
        r#"ims_proxy_requests_total{client="fusion-team",method="GET",route="workfront",status="403"} 1"#,
    );
}

#[tokio::test]
async fn source_address_outside_allow_cidrs_is_forbidden_even_with_a_valid_key() {
    let h = Harness::with(Setup {
        access: r#"allow_cidrs = ["10.0.0.0/8"]"#.into(),
        ..Setup::default()
    })
    .await;
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    r.assert_refusal(403, "forbidden");
    assert!(!r.headers.contains_key("www-authenticate"));
    assert_eq!(h.up().count(), 0);
    assert_metric(
        &metrics(&h).await,
        r#"ims_proxy_auth_failures_total{reason="forbidden"} 1"#,
    );
}

#[tokio::test]
async fn source_address_inside_allow_cidrs_is_admitted() {
    let h = Harness::with(Setup {
        access: r#"allow_cidrs = ["127.0.0.0/8"]"#.into(),
        ..Setup::default()
    })
    .await;
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.up().count(), 1);
    // Allowed sources still need a key.
    get(&h.url("/workfront/x"), &[])
        .await
        .assert_refusal(401, "unauthorized");
    assert_eq!(h.up().count(), 1);
}

// ---------------------------------------------------------------------------
// 404 no_route

#[tokio::test]
async fn path_matching_no_route_is_no_route() {
    let h = Harness::start().await;
    let r = get(&h.url("/nothing/here"), &[("x-proxy-key", KEY)]).await;
    r.assert_refusal(404, "no_route");
    // Prefixes match whole segments only.
    get(&h.url("/workfrontx/y"), &[("x-proxy-key", KEY)])
        .await
        .assert_refusal(404, "no_route");
    assert_eq!(h.up().count(), 0);
    assert_metric(
        &metrics(&h).await,
        r#"ims_proxy_requests_total{client="none",method="GET",route="none",status="404"} 2"#,
    );
}

// ---------------------------------------------------------------------------
// 405 method_not_allowed

#[tokio::test]
async fn connect_is_method_not_allowed() {
    let h = Harness::start().await;
    let r = raw_reply(
        h.server.proxy_addr,
        &format!("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nx-proxy-key: {KEY}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    r.assert_refusal(405, "method_not_allowed");
    assert_eq!(h.up().count(), 0);
}

// ---------------------------------------------------------------------------
// 413 payload_too_large

fn small_scrub_limit() -> Setup {
    Setup {
        server: "max_scrub_body_bytes = 1024".into(),
        ..Setup::default()
    }
}

#[tokio::test]
async fn form_body_over_max_scrub_body_bytes_is_payload_too_large() {
    let h = Harness::with(small_scrub_limit()).await;
    let body = format!("name={}", "x".repeat(1995));
    assert_eq!(body.len(), 2000);
    let r = post(
        &h.url("/workfront/x"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-proxy-key", KEY),
        ],
        body,
    )
    .await;
    r.assert_refusal(413, "payload_too_large");
    assert_eq!(h.up().count(), 0);
    // At the limit it is fine.
    let body = format!("name={}", "x".repeat(1019));
    let r = post(
        &h.url("/workfront/x"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-proxy-key", KEY),
        ],
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.up().last().unwrap().body_len, 1024);
}

#[tokio::test]
async fn declared_content_length_over_the_limit_is_refused_before_the_body_is_sent() {
    let h = Harness::with(small_scrub_limit()).await;
    let addr = h.server.proxy_addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /workfront/x HTTP/1.1\r\nHost: {addr}\r\nx-proxy-key: {KEY}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 5000000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, RAW_LIMIT, |b| parse_response(b).is_some()).await;
    let (r, _) = parse_response(&buf).unwrap_or_else(|| {
        panic!(
            "no answer without the body: {:?}",
            String::from_utf8_lossy(&buf)
        )
    });
    r.assert_refusal(413, "payload_too_large");
    assert_eq!(h.up().count(), 0);
}

#[tokio::test]
async fn chunked_form_body_over_the_limit_is_payload_too_large() {
    let h = Harness::with(small_scrub_limit()).await;
    let addr = h.server.proxy_addr;
    let mut req = format!(
        "POST /workfront/x HTTP/1.1\r\nHost: {addr}\r\nx-proxy-key: {KEY}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for _ in 0..4 {
        req.push_str(&format!("200\r\n{}\r\n", "a".repeat(0x200)));
    }
    req.push_str("0\r\n\r\n");
    let r = raw_reply(addr, &req).await;
    r.assert_refusal(413, "payload_too_large");
    assert_eq!(h.up().count(), 0);
}

// ---------------------------------------------------------------------------
// 429 rate_limited

#[tokio::test]
async fn key_over_its_rate_is_rate_limited_with_retry_after() {
    let h = Harness::with(Setup {
        key: "rate_per_second = 1\nburst = 2".into(),
        ..Setup::default()
    })
    .await;
    for _ in 0..2 {
        let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    r.assert_refusal(429, "rate_limited");
    assert!(retry_after(&r) >= 1);
    assert_eq!(
        h.up().count(),
        2,
        "the refused request never reached the upstream"
    );
    // The limit is per key: the other key is untouched.
    assert_eq!(
        get(&h.url("/fusion/x"), &[("x-proxy-key", FUSION_KEY)])
            .await
            .status,
        200
    );
    let m = metrics(&h).await;
    assert_metric(
        &m,
        r#"ims_proxy_auth_failures_total{reason="rate_limited"} 1"#,
    );
    assert_metric(
        &m,
        r#"ims_proxy_requests_total{client="etl",method="GET",route="workfront",status="429"} 1"#,
    );
}

// ---------------------------------------------------------------------------
// 502 upstream_unreachable

#[tokio::test]
async fn unreachable_upstream_is_upstream_unreachable() {
    let h = Harness::with(Setup {
        upstream_url: Some("http://127.0.0.1:1".into()),
        ..Setup::default()
    })
    .await;
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    r.assert_refusal(502, "upstream_unreachable");
    assert_eq!(h.up().count(), 0);
    assert_metric(
        &metrics(&h).await,
        r#"ims_proxy_upstream_errors_total{kind="connect",route="workfront"} 1"#,
    );
}

// ---------------------------------------------------------------------------
// 503 overloaded

#[tokio::test]
async fn queue_wait_past_queue_timeout_is_overloaded_with_retry_after() {
    let h = Harness::with(Setup {
        credential: "max_in_flight = 1\nqueue_timeout = \"200ms\"".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let slow_url = h.url("/workfront/slow?ms=1500");
    let slow = tokio::spawn(async move { get(&slow_url, &[("x-proxy-key", KEY)]).await.status });
    let t0 = Instant::now();
    while h.up().count() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the slow request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    let waited = started.elapsed();
    r.assert_refusal(503, "overloaded");
    assert!(retry_after(&r) >= 1);
    assert!(
        waited >= Duration::from_millis(190),
        "refused after queueing for queue_timeout, not at once ({waited:?})"
    );
    assert!(
        waited < Duration::from_millis(1200),
        "refused at queue_timeout, not after the slow request ({waited:?})"
    );
    assert_eq!(
        h.up().count(),
        1,
        "the overloaded request never reached the upstream"
    );
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn max_in_flight_queues_excess_requests_instead_of_refusing_them() {
    let h = Harness::with(Setup {
        credential: "max_in_flight = 2".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let url = h.url("/workfront/slow?ms=300");
            tokio::spawn(async move { get(&url, &[("x-proxy-key", KEY)]).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let elapsed = started.elapsed();
    assert_eq!(h.up().count(), 6);
    assert!(
        h.up().max_concurrent() <= 2,
        "max_concurrent = {}",
        h.up().max_concurrent()
    );
    assert!(
        elapsed >= Duration::from_millis(850),
        "six 300 ms requests two at a time take three rounds ({elapsed:?})"
    );
}

// ---------------------------------------------------------------------------
// 504 upstream_timeout

/// Both upstream paths keep the deadline: a GET on the proxy's own HTTP/1.1
/// exchange, and a streamed upload through hyper's client.
#[tokio::test]
async fn upstream_slower_than_upstream_timeout_is_upstream_timeout() {
    let h = Harness::with(Setup {
        route: "upstream_timeout = \"200ms\"".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let url = h.url("/workfront/slow?ms=2000");
    let upload = [
        ("x-proxy-key", KEY),
        ("content-type", "application/octet-stream"),
    ];
    for streamed in [false, true] {
        let started = Instant::now();
        let r = if streamed {
            post(&url, &upload, vec![7u8; 64 * 1024]).await
        } else {
            get(&url, &[("x-proxy-key", KEY)]).await
        };
        let waited = started.elapsed();
        r.assert_refusal(504, "upstream_timeout");
        assert!(
            waited < Duration::from_millis(1500),
            "answered at upstream_timeout ({waited:?}, streamed: {streamed})"
        );
    }
    assert_metric(
        &metrics(&h).await,
        r#"ims_proxy_upstream_errors_total{kind="timeout",route="workfront"} 2"#,
    );
}

// ---------------------------------------------------------------------------
// Expect: 100-continue

fn upload_head(addr: SocketAddr, key: Option<&str>) -> String {
    let key = key
        .map(|k| format!("x-proxy-key: {k}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /workfront/upload HTTP/1.1\r\nHost: {addr}\r\n{key}Content-Type: application/octet-stream\r\n\
         Expect: 100-continue\r\nContent-Length: 1000000\r\n\r\n"
    )
}

#[tokio::test]
async fn refused_client_never_uploads_body() {
    let h = Harness::start().await;
    let addr = h.server.proxy_addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upload_head(addr, None).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, RAW_LIMIT, |b| {
        parse_response(b).is_some_and(|(r, _)| !r.status.is_informational())
    })
    .await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(text.starts_with("HTTP/1.1 401 "), "{text:?}");
    assert!(
        !text.contains("100 Continue"),
        "a refused client was invited to send its body: {text:?}"
    );
    let (r, _) = parse_response(&buf).unwrap();
    r.assert_refusal(401, "unauthorized");
    assert_eq!(h.up().count(), 0);
}

#[tokio::test]
async fn admitted_client_gets_100_continue_and_its_upload_streams_through() {
    let h = Harness::start().await;
    let addr = h.server.proxy_addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upload_head(addr, Some(KEY)).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, RAW_LIMIT, |b| parse_response(b).is_some()).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 100 Continue\r\n"),
        "expected 100 Continue first: {text:?}"
    );
    let (_, used) = parse_response(&buf).unwrap();
    assert_eq!(
        used,
        buf.len(),
        "nothing but the interim response before the body: {text:?}"
    );
    buf.clear();

    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    s.write_all(&body).await.unwrap();
    read_until(&mut s, &mut buf, Duration::from_secs(10), |b| {
        parse_response(b).is_some()
    })
    .await;
    let (r, _) = parse_response(&buf)
        .unwrap_or_else(|| panic!("no final response: {:?}", String::from_utf8_lossy(&buf)));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["bytes"], 1_000_000);
    assert_eq!(v["sha256"], hex::encode(Sha256::digest(&body)));
    let seen = h.up().last().unwrap();
    assert_eq!(seen.body_len, 1_000_000);
    assert!(
        !seen.headers.contains_key("expect"),
        "the proxy answers Expect itself"
    );
}

// ---------------------------------------------------------------------------
// Request ids

#[tokio::test]
async fn refusal_request_id_is_the_clients_when_it_sent_one() {
    let h = Harness::start().await;
    let r = get(&h.url("/workfront/x"), &[("x-request-id", "client-req-42")]).await;
    r.assert_refusal(401, "unauthorized");
    assert_eq!(r.json()["request_id"], "client-req-42");
    let r = get(
        &h.url("/nothing"),
        &[("x-request-id", "client-req-43"), ("x-proxy-key", KEY)],
    )
    .await;
    r.assert_refusal(404, "no_route");
    assert_eq!(r.json()["request_id"], "client-req-43");
}

#[tokio::test]
async fn refusals_get_distinct_fresh_request_ids() {
    let h = Harness::start().await;
    let a = get(&h.url("/workfront/x"), &[]).await;
    let b = get(&h.url("/workfront/x"), &[]).await;
    a.assert_refusal(401, "unauthorized");
    b.assert_refusal(401, "unauthorized");
    assert_ne!(a.json()["request_id"], b.json()["request_id"]);
    // An unusable client id (control characters are refused by the client library;
    // an over-long one is not) is replaced, not echoed.
    let long = "x".repeat(300);
    let c = get(&h.url("/workfront/x"), &[("x-request-id", &long)]).await;
    c.assert_refusal(401, "unauthorized");
    assert_ne!(c.json()["request_id"], long.as_str());
}

#[tokio::test]
async fn form_request_with_a_wrong_header_key_never_uploads_body() {
    let h = Harness::start().await;
    let addr = h.server.proxy_addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /workfront/attask/api/v19.0/proj HTTP/1.1\r\nHost: {addr}\r\nx-proxy-key: wrong-key\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 500\r\nExpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, RAW_LIMIT, |b| {
        parse_response(b).is_some_and(|(r, _)| !r.status.is_informational())
    })
    .await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(
        !text.contains("100 Continue"),
        "a refused client was invited to send its body: {text:?}"
    );
    let (r, _) = parse_response(&buf).unwrap();
    r.assert_refusal(401, "unauthorized");
    assert_eq!(h.up().count(), 0);
}

#[tokio::test]
async fn a_streaming_response_holds_its_slot_until_the_body_ends() {
    let h = Harness::with(Setup {
        credential: "max_in_flight = 1\nqueue_timeout = \"200ms\"".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    // Head received, body (64 MiB) not read: the exchange is still in flight.
    let req = http::Request::get(h.url("/workfront/download?bytes=67108864"))
        .header("x-proxy-key", KEY)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let first = client().request(req).await.unwrap();
    assert_eq!(first.status(), 200);
    let m = metrics(&h).await;
    assert_metric(&m, r#"ims_proxy_inflight_requests{route="workfront"} 1"#);
    get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)])
        .await
        .assert_refusal(503, "overloaded");
    drop(first);
    let mut freed = false;
    for _ in 0..100 {
        if get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)])
            .await
            .status
            == 200
        {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(freed, "the slot was not released when the client went away");
}

#[tokio::test]
async fn a_trickled_form_body_is_cut_off() {
    let h = Harness::with(Setup {
        server: "header_read_timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    let addr = h.server.proxy_addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /workfront/attask/api/v19.0/proj HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nname"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, std::time::Duration::from_secs(3), |b| {
        parse_response(b).is_some()
    })
    .await;
    let (r, _) = parse_response(&buf).expect("an answer before the body completed");
    r.assert_refusal(400, "bad_request");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(h.up().count(), 0);
}

#[tokio::test]
async fn a_wrong_header_key_does_not_hide_a_valid_form_key() {
    let h = Harness::start().await;
    let r = post(
        &h.url("/workfront/attask/api/v19.0/proj"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-api-key", "adobe-client-id-not-a-proxy-key"),
        ],
        format!("apiKey={KEY}&name=x"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&h.up().last().unwrap().body[..], b"name=x");
}
