//! Bodies stream both ways intact, HTTP/2 works, and the connection lifecycle
//! (drain, grace limit, idle keep-alive, slowloris) behaves as the spec says.

mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ims_proxy::sim::pattern_sha256;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;
const UPLOAD_CHUNK: usize = 64 * 1024;

/// Chunk `i` of the upload: deterministic pseudo-random bytes (xorshift64*).
fn upload_chunk(i: usize) -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let mut out = Vec::with_capacity(UPLOAD_CHUNK);
    while out.len() < UPLOAD_CHUNK {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    Bytes::from(out)
}

/// A client whose request bodies may stream.
fn streaming_client() -> Client<HttpConnector, BoxBody<Bytes, std::io::Error>> {
    Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test]
async fn large_upload_streams_intact() {
    let h = Harness::start().await;
    let chunks = 32 * MIB / UPLOAD_CHUNK;
    let mut expected = Sha256::new();
    for i in 0..chunks {
        expected.update(upload_chunk(i));
    }
    let expected = hex::encode(expected.finalize());

    // Chunks are made one by one as hyper polls for them: the body is never whole in memory.
    let stream = futures_util::stream::iter(0..chunks)
        .map(|i| Ok::<_, std::io::Error>(Frame::data(upload_chunk(i))));
    let body = BoxBody::new(StreamBody::new(stream));
    let req = Request::post(h.url("/workfront/files/upload"))
        .header("x-proxy-key", KEY)
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(120), streaming_client().request(req))
        .await
        .expect("upload answered in time")
        .expect("upload request");
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("answer body")
        .to_bytes();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON answer");
    assert_eq!(v["bytes"], (32 * MIB) as u64, "{v}");
    assert_eq!(v["sha256"], expected.as_str(), "{v}");
    let seen = h.up().last().expect("upstream saw the upload");
    assert_eq!(seen.body_len, (32 * MIB) as u64);
    assert!(!seen.headers.contains_key("x-proxy-key"));
}

/// Reads a body frame by frame (never whole): bytes, largest frame, hex SHA-256.
async fn drain_hashing(mut body: hyper::body::Incoming) -> (u64, usize, String) {
    let (mut hasher, mut got, mut largest) = (Sha256::new(), 0u64, 0usize);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            got += data.len() as u64;
            largest = largest.max(data.len());
            hasher.update(&data);
        }
    }
    (got, largest, hex::encode(hasher.finalize()))
}

#[tokio::test]
async fn large_download_streams_intact() {
    let h = Harness::start().await;
    let n: u64 = 64 * MIB as u64;
    let req = Request::get(h.url(&format!("/workfront/files/download?bytes={n}")))
        .header("x-proxy-key", KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.expect("download request");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], n.to_string().as_str());
    let read =
        tokio::time::timeout(Duration::from_secs(120), drain_hashing(resp.into_body())).await;
    let Ok((got, largest_frame, digest)) = read else {
        panic!("download did not finish in time");
    };
    assert_eq!(got, n);
    assert!(
        largest_frame < 16 * MIB,
        "the body arrived in pieces, not whole ({largest_frame} bytes in one frame)"
    );
    assert_eq!(digest, pattern_sha256(n));
}

#[tokio::test]
async fn http2_prior_knowledge_works() {
    let h = Harness::start().await;
    let c = h2_client();

    // An echo.
    let req = Request::get(h.url("/workfront/attask/api/v19.0/proj/search?fields=name"))
        .header("x-proxy-key", KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.expect("h2 request");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-request-id"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/attask/api/v19.0/proj/search");
    assert_eq!(v["query"], "fields=name");
    assert!(
        v["headers"]["authorization"]
            .as_str()
            .is_some_and(|a| a.starts_with("Bearer sim-")),
        "{v}"
    );
    assert!(v["headers"].get("x-proxy-key").is_none(), "{v}");

    // 8 MiB down over h2.
    let n: u64 = 8 * MIB as u64;
    let req = Request::get(h.url(&format!("/workfront/download?bytes={n}")))
        .header("x-proxy-key", KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.expect("h2 download");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let (got, _, digest) = drain_hashing(resp.into_body()).await;
    assert_eq!(got, n);
    assert_eq!(digest, pattern_sha256(n));

    // Many concurrent requests multiplexed on one explicit h2 connection.
    let tcp = TcpStream::connect(h.server.proxy_addr)
        .await
        .expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    let conn_task = tokio::spawn(conn);
    h.up().clear();
    let started = Instant::now();
    let mut tasks = Vec::new();
    const CONCURRENT: usize = 40;
    for i in 0..CONCURRENT {
        let mut sender = sender.clone();
        let url = h.url(&format!("/workfront/slow?ms=400&n={i}"));
        tasks.push(tokio::spawn(async move {
            sender.ready().await.expect("h2 connection ready");
            let req = Request::get(url)
                .header("x-proxy-key", KEY)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = sender.send_request(req).await.expect("h2 stream");
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .expect("h2 stream body")
                .to_bytes();
            (status, body)
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(&body[..], br#"{"slow":true}"#);
    }
    let elapsed = started.elapsed();
    // One after the other would take CONCURRENT * 400 ms = 16 s.
    assert!(
        elapsed < Duration::from_secs(5),
        "h2 streams were not concurrent: {elapsed:?}"
    );
    assert_eq!(h.up().count(), CONCURRENT);
    assert!(
        h.up().max_concurrent() >= 4,
        "upstream saw at most {} at once",
        h.up().max_concurrent()
    );
    drop(sender);
    conn_task.abort();
}

/// One HTTP/2 frame: its type, flags, stream and payload.
async fn read_frame(s: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.expect("frame head");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.expect("frame payload");
    (head[3], head[4], stream, payload)
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A request id never repeats, so the h2 server sends it as a never-indexed literal
/// (RFC 7541 §6.2.3): indexed, every response would add an entry to the connection's
/// HPACK table that is never used again, evicting the ones that are, and the encoder
/// would search a growing chain of old ids for each response.
#[tokio::test]
async fn http2_request_ids_are_sent_never_indexed() {
    use httlib_hpack::{Decoder, Encoder};
    const HEADERS: u8 = 0x1;
    const END_STREAM_AND_HEADERS: u8 = 0x1 | 0x4;
    let h = Harness::start().await;
    h.ready().await;
    let mut s = TcpStream::connect(h.server.proxy_addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[])); // SETTINGS, all defaults
    s.write_all(&hello).await.unwrap();

    let authority = h.server.proxy_addr.to_string();
    let mut encoder = Encoder::default();
    let mut decoder = Decoder::default();
    let mut ids = Vec::new();
    for stream in [1u32, 3, 5] {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", authority.as_str()),
            (":path", "/workfront/attask/api/v19.0/proj/search"),
            ("x-proxy-key", KEY),
        ] {
            let field = (name.as_bytes().to_vec(), value.as_bytes().to_vec(), 0x0);
            encoder.encode(field, &mut block).unwrap();
        }
        s.write_all(&frame(HEADERS, END_STREAM_AND_HEADERS, stream, &block))
            .await
            .unwrap();
        // The response's head; SETTINGS, WINDOW_UPDATE and the earlier bodies pass by.
        let mut head = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let (kind, _, on, payload) = read_frame(&mut s).await;
                if kind == HEADERS && on == stream {
                    break payload;
                }
            }
        })
        .await
        .expect("a response head within 10 s");
        let mut fields = Vec::new();
        decoder.decode(&mut head, &mut fields).expect("valid HPACK");
        let status = fields.iter().find(|(n, _, _)| n == b":status");
        assert_eq!(status.map(|f| f.1.as_slice()), Some(&b"200"[..]));
        let (_, id, flags) = fields
            .into_iter()
            .find(|(n, _, _)| n == b"x-request-id")
            .expect("x-request-id on every response");
        assert_ne!(
            flags & Decoder::NEVER_INDEXED,
            0,
            "id sent with flags {flags:#x}"
        );
        assert_eq!(flags & Decoder::WITH_INDEXING, 0);
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three distinct ids");
}

/// True when a new connection to `addr` is refused, or accepted and closed without an answer.
async fn refused_or_closed(addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
    else {
        return true;
    };
    let req = format!("GET /workfront/x HTTP/1.1\r\nHost: proxy\r\nx-proxy-key: {KEY}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        // Neither answered nor closed: the connection hangs, which is not "refused" either.
        Err(_) => false,
    }
}

#[tokio::test]
async fn graceful_drain_finishes_in_flight_requests() {
    let h = Harness::start().await;
    let slow_url = h.url("/workfront/slow?ms=1500");
    let Harness {
        server,
        ims: _ims,
        upstream: _upstream,
        ..
    } = h;
    let addr = server.proxy_addr;
    let slow = tokio::spawn(async move { get(&slow_url, &[("x-proxy-key", KEY)]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.begin_shutdown();

    let deadline = Instant::now() + Duration::from_secs(1);
    let mut refused = false;
    while Instant::now() < deadline {
        if refused_or_closed(addr).await {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "new connections were still served after begin_shutdown"
    );

    let r = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("slow request finished")
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["slow"], true);
    let report = tokio::time::timeout(Duration::from_secs(5), server.wait())
        .await
        .expect("drain finished");
    assert_eq!(report.cut_connections, 0);
}

#[tokio::test]
async fn grace_limit_cuts_requests_still_running() {
    let h = Harness::with(Setup {
        server: "shutdown_grace = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    assert!(h.config_text.contains("shutdown_grace = \"300ms\""));
    h.ready().await;
    let slow_url = h.url("/workfront/slow?ms=5000");
    let Harness {
        server,
        ims: _ims,
        upstream: _upstream,
        ..
    } = h;
    let slow = tokio::spawn(async move {
        let req = Request::get(slow_url)
            .header("x-proxy-key", KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        match client().request(req).await {
            Err(e) => Err(format!("request: {e}")),
            Ok(resp) => {
                let status = resp.status();
                match resp.into_body().collect().await {
                    Ok(b) => Ok((status, b.to_bytes())),
                    Err(e) => Err(format!("body: {e}")),
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    server.begin_shutdown();
    let report = tokio::time::timeout(Duration::from_secs(3), server.wait())
        .await
        .expect("wait() returned at the grace limit");
    let elapsed = started.elapsed();
    assert!(report.cut_connections >= 1, "{report:?}");
    assert!(
        elapsed < Duration::from_millis(1500),
        "drain took {elapsed:?} with a 300 ms grace"
    );
    let outcome = tokio::time::timeout(Duration::from_secs(3), slow)
        .await
        .expect("client saw the cut")
        .unwrap();
    assert!(
        outcome.is_err(),
        "the cut request got a complete answer: {outcome:?}"
    );
}

/// Reads one response head (up to the blank line) from `s`.
async fn read_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before a whole head: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let h = Harness::with(Setup {
        server: "idle_timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let mut s = TcpStream::connect(h.server.proxy_addr)
        .await
        .expect("connect");
    // 204: a complete response is just its head.
    let req =
        format!("GET /workfront/status/204 HTTP/1.1\r\nHost: proxy\r\nx-proxy-key: {KEY}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    // Kept alive at first...
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the connection was not kept alive: {early:?}"
    );
    // ...and closed by the server once idle past the limit.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let late = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
    assert!(
        matches!(late, Ok(Ok(0))),
        "idle connection still open after 1 s: {late:?}"
    );
}

#[tokio::test]
async fn slowloris_is_cut_off() {
    let h = Harness::with(Setup {
        server: "header_read_timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let s = TcpStream::connect(h.server.proxy_addr)
        .await
        .expect("connect");
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(b"GET /workfront/x HTTP/1.1\r\n")
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        (started.elapsed(), out)
    });
    let normal_url = h.url("/workfront/x");
    let normal = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        get(&normal_url, &[("x-proxy-key", KEY)]).await
    });
    // One header byte every 100 ms, until the server gives up on us (or 3 s pass).
    let header = b"X-Slowloris: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut i = 0;
    while !reader.is_finished() && started.elapsed() < Duration::from_secs(3) {
        if wr
            .write_all(&header[i % header.len()..i % header.len() + 1])
            .await
            .is_err()
        {
            break;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (closed_after, answer) = tokio::time::timeout(Duration::from_secs(2), reader)
        .await
        .expect("server closed the slowloris connection")
        .unwrap();
    assert!(
        closed_after < Duration::from_secs(2),
        "cut off only after {closed_after:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("200 OK"),
        "the incomplete request was answered: {answer}"
    );
    let r = normal.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn keep_alive_outlives_the_header_timeout_until_idle_timeout() {
    // Pooled clients keep idle connections for long; the head limit must not cut them.
    let h = Harness::with(Setup {
        server: "header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let mut s = TcpStream::connect(h.server.proxy_addr).await.unwrap();
    let request =
        format!("GET /workfront/status/204 HTTP/1.1\r\nHost: x\r\nx-proxy-key: {KEY}\r\n\r\n");
    for round in 0..2 {
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 204"),
            "round {round}"
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
}

#[tokio::test]
async fn admin_keep_alive_and_silent_clients_follow_the_limits() {
    let h = Harness::with(Setup {
        server: "header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"".into(),
        ..Setup::default()
    })
    .await;
    // An admin keep-alive connection (a Prometheus scraper) outlives the head limit.
    let mut admin = TcpStream::connect(h.server.admin_addr).await.unwrap();
    for round in 0..2 {
        admin
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(3), admin.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "round {round}"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // A client that connects and says nothing is cut at the head limit, not the idle one.
    let mut silent = TcpStream::connect(h.server.proxy_addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// Reads one whole response with a `content-length` body (or none) from `s`.
async fn read_response(s: &mut TcpStream) -> String {
    let mut head = read_head(s).await;
    let len: usize = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .map_or(0, |v| v.parse().unwrap());
    let body_start = head.find("\r\n\r\n").unwrap() + 4;
    let mut have = head.len() - body_start;
    let mut buf = vec![0u8; 4096];
    while have < len {
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("body within 3 s")
            .unwrap();
        assert!(n > 0, "closed mid-body");
        head.push_str(&String::from_utf8_lossy(&buf[..n]));
        have += n;
    }
    head
}

#[tokio::test]
async fn a_resting_keep_alive_connection_is_parked_and_loses_nothing() {
    // A connection at rest is handed back by hyper and parked (only the socket is
    // kept); the next request must find it as it was: same connection, still
    // keep-alive, and bytes of a pipelined request that hyper had already read
    // across the park are served, not dropped.
    let h = Harness::with(Setup {
        server: "header_read_timeout = \"5s\"\nidle_timeout = \"30s\"".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let before = h.up().requests().len();
    let mut s = TcpStream::connect(h.server.proxy_addr).await.unwrap();
    let req = |path: &str| {
        format!("GET /workfront/{path} HTTP/1.1\r\nHost: x\r\nx-proxy-key: {KEY}\r\n\r\n")
    };
    // One request, then a pipelined one cut inside its head, in a single write.
    let second = req("second");
    let (second_a, second_b) = second.split_at(30);
    s.write_all(format!("{}{second_a}", req("first")).as_bytes())
        .await
        .unwrap();
    let first = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Long past the park delay: the partial head was carried over the park.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(second_b.as_bytes()).await.unwrap();
    let second = read_response(&mut s).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    // Rest, park, wake: three more times on the same socket.
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(req("again").as_bytes()).await.unwrap();
        let r = read_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "round {round}: {r}");
        assert!(
            !r.to_ascii_lowercase().contains("connection: close"),
            "round {round}: {r}"
        );
    }
    let seen: Vec<String> = h.up().requests()[before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        seen,
        ["/first", "/second", "/again", "/again", "/again"],
        "what the upstream got"
    );
}

#[tokio::test]
async fn parked_connections_close_at_once_on_shutdown() {
    let h = Harness::start().await;
    h.ready().await;
    let mut s = TcpStream::connect(h.server.proxy_addr).await.unwrap();
    s.write_all(
        format!("GET /workfront/x HTTP/1.1\r\nHost: x\r\nx-proxy-key: {KEY}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    h.server.begin_shutdown();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("closed within 2 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(1));
}
