//! Nothing lost while faults are injected under traffic: token churn on
//! long-lived connections, an IMS outage and its recovery, a slow IMS, secret
//! rotation with the first secret revoked, and reloads during long transfers.

mod support;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ims_proxy::sim::pattern_sha256;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

const PATH: &str = "/workfront/attask/api/v19.0/proj/search";
const MIB: u64 = 1024 * 1024;

/// What the requests of one lane saw.
#[derive(Default)]
struct Tally {
    ok: usize,
    bad: Vec<String>,
    /// `Authorization` values the upstream echoed.
    tokens: HashSet<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.bad.extend(other.bad);
        self.tokens.extend(other.tokens);
    }

    fn assert_clean(&self) {
        assert!(
            self.bad.is_empty(),
            "{} of {} requests failed, e.g. {:?}",
            self.bad.len(),
            self.ok + self.bad.len(),
            &self.bad[..self.bad.len().min(5)]
        );
    }
}

/// One request/response on a lane, or the reason it failed.
enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// One HTTP/1.1 connection that is never replaced: a drop fails the lane.
    async fn h1(addr: SocketAddr) -> Sender {
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        let (send, conn) = http1::handshake(io).await.expect("h1 handshake");
        tokio::spawn(conn);
        Sender::H1(send)
    }

    /// One HTTP/2 (h2c) connection; clones share it as concurrent streams.
    async fn h2(addr: SocketAddr) -> http2::SendRequest<Full<Bytes>> {
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        let (send, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        send
    }

    async fn get(&mut self, addr: SocketAddr) -> Result<(StatusCode, Bytes), String> {
        let req = |uri: String| {
            Request::get(uri)
                .header("host", addr.to_string())
                .header("x-proxy-key", KEY)
                .body(Full::new(Bytes::new()))
                .expect("request")
        };
        let resp = match self {
            Sender::H1(s) => {
                s.ready()
                    .await
                    .map_err(|e| format!("connection lost: {e}"))?;
                s.send_request(req(PATH.to_string())).await
            }
            Sender::H2(s) => {
                s.ready()
                    .await
                    .map_err(|e| format!("connection lost: {e}"))?;
                s.send_request(req(format!("http://{addr}{PATH}"))).await
            }
        }
        .map_err(|e| format!("transport error: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body error after {status}: {e}"))?;
        Ok((status, body.to_bytes()))
    }
}

/// Sends GETs on `sender` until `until`; stops at the first transport error
/// (the connection is gone, which is itself a failure).
async fn lane(mut sender: Sender, addr: SocketAddr, until: Instant) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < until {
        match sender.get(addr).await {
            Err(e) => {
                t.bad.push(e);
                break;
            }
            Ok((StatusCode::OK, body)) => {
                t.ok += 1;
                let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
                let auth = echo["headers"]["authorization"]
                    .as_str()
                    .expect("echoed authorization");
                t.tokens.insert(auth.to_string());
            }
            Ok((status, body)) => t
                .bad
                .push(format!("{status}: {}", String::from_utf8_lossy(&body))),
        }
    }
    t
}

/// `h1` lanes on their own HTTP/1.1 connections plus `h2` lanes sharing one
/// HTTP/2 connection, all running until `until`.
async fn start_lanes(addr: SocketAddr, h1: usize, h2: usize, until: Instant) -> JoinSet<Tally> {
    let mut set = JoinSet::new();
    for _ in 0..h1 {
        set.spawn(lane(Sender::h1(addr).await, addr, until));
    }
    let shared = Sender::h2(addr).await;
    for _ in 0..h2 {
        set.spawn(lane(Sender::H2(shared.clone()), addr, until));
    }
    set
}

async fn finish(mut set: JoinSet<Tally>) -> Tally {
    let mut all = Tally::default();
    while let Some(t) = set.join_next().await {
        all.merge(t.expect("lane task"));
    }
    all
}

async fn wf_get(h: &Harness) -> Reply {
    get(&h.url(PATH), &[("x-proxy-key", KEY)]).await
}

/// Polls `check` every 20 ms until it holds; panics after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dozens_of_token_swaps_on_kept_alive_connections_lose_nothing() {
    // 1 s tokens, refreshed at half their life: a new token every ~0.5 s.
    let h = Harness::with(Setup {
        expires_in: Some(1),
        ims: "refresh_margin = \"1h\"".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let addr = h.server.proxy_addr;
    let issued_before = h.ims().issued();
    let until = Instant::now() + Duration::from_secs(12);
    // Each lane keeps its connection for the whole run: a dropped connection fails it.
    let all = finish(start_lanes(addr, 6, 6, until).await).await;

    all.assert_clean();
    assert!(all.ok >= 2000, "only {} requests in 12 s", all.ok);
    let swaps = h.ims().issued() - issued_before;
    assert!(swaps >= 20, "only {swaps} token swaps in 12 s");
    assert!(
        all.tokens.len() >= 20,
        "only {} distinct tokens reached the upstream",
        all.tokens.len()
    );
    // Every token was valid at the simulated IMS when the upstream received it,
    // and none had to be renewed because the upstream refused it.
    assert_eq!(h.up().invalid_tokens(), 0);
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(
            &m,
            r#"ims_proxy_token_forced_refreshes_total{credential="workfront"}"#
        ),
        Some(0.0),
        "{m}"
    );
}

#[tokio::test]
async fn ims_outage_keeps_the_old_token_then_refuses_then_recovers() {
    // 3 s tokens: refresh due at 1.5 s, not sent in their last 0.3 s.
    let h = Harness::with(Setup {
        expires_in: Some(3),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    h.ims().set_down(true);
    let calls_before = h.ims().calls();

    // The refresh fails; the old token keeps serving, and the failure shows.
    eventually(Duration::from_secs(4), "a failed refresh", || async {
        token_entry(&h, "workfront").await["refreshes_failed"].as_u64() >= Some(1)
    })
    .await;
    let wf = token_entry(&h, "workfront").await;
    assert_eq!(wf["state"], "failed", "{wf}");
    assert!(
        wf["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{wf}"
    );
    assert_eq!(wf_get(&h).await.status, 200, "the old token still serves");
    assert_eq!(get(&h.admin("/readyz"), &[]).await.status, 503);
    let m = metrics_text(&h).await;
    assert!(
        metric(
            &m,
            r#"ims_proxy_token_refreshes_total{credential="workfront",result="error"}"#
        ) >= Some(1.0),
        "{m}"
    );

    // Once the old token is past use: 503 token_unavailable, nothing sent upstream.
    let deadline = Instant::now() + Duration::from_secs(3);
    let r = loop {
        let r = wf_get(&h).await;
        if r.status == 503 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(Instant::now() < deadline, "the old token never ran out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    r.assert_refusal(503, "token_unavailable");
    let retry: u64 = r.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let sent = h.up().count();
    for _ in 0..20 {
        wf_get(&h).await.assert_refusal(503, "token_unavailable");
    }
    assert_eq!(
        h.up().count(),
        sent,
        "a request went upstream without a token"
    );
    assert_eq!(h.up().invalid_tokens(), 0, "an expired token was sent");
    // Backing off (1 s doubling, jittered), not one IMS call per request.
    let outage_calls = h.ims().calls() - calls_before;
    assert!(
        (2..=5).contains(&outage_calls),
        "{outage_calls} IMS calls in a ~3 s outage"
    );

    // IMS returns: service resumes at the next retry, whose delay is bounded by the backoff step.
    // Both credentials failed through the outage; the longer backoff bounds readiness.
    let failures = get(&h.admin("/tokens"), &[])
        .await
        .json()
        .as_array()
        .expect("/tokens is a list")
        .iter()
        .filter_map(|e| e["refreshes_failed"].as_u64())
        .max()
        .unwrap();
    let step = Duration::from_secs(1 << (failures.clamp(1, 7) - 1)).min(Duration::from_secs(60));
    h.ims().set_down(false);
    let back = Instant::now();
    eventually(step + Duration::from_secs(2), "recovery", || async {
        wf_get(&h).await.status == 200
    })
    .await;
    assert!(back.elapsed() <= step + Duration::from_secs(2));
    let wf = token_entry(&h, "workfront").await;
    assert_eq!(wf["state"], "valid", "{wf}");
    assert!(wf["last_error"].is_null(), "{wf}");
    // Ready once every credential (fusion too) has its token again.
    eventually(step + Duration::from_secs(2), "readiness", || async {
        get(&h.admin("/readyz"), &[]).await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_ims_never_delays_requests_that_hold_a_valid_token() {
    // 4 s tokens: the refresh starts at 2 s and takes 1 s; the old token is usable until 3.6 s.
    let h = Harness::with(Setup {
        expires_in: Some(4),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    h.ims().set_delay(Duration::from_secs(1));
    let issued = h.ims().issued();
    let until = Instant::now() + Duration::from_millis(3500);
    let client = client();
    let mut slowest = Duration::ZERO;
    let mut ok = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let req = Request::get(h.url(PATH))
            .header("x-proxy-key", KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(&client, req).await;
        assert_eq!(r.status, 200, "{}", r.text());
        slowest = slowest.max(started.elapsed());
        ok += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        h.ims().issued() > issued,
        "the slow refresh never completed"
    );
    assert!(ok > 50, "only {ok} requests");
    assert!(
        slowest < Duration::from_millis(500),
        "a request waited {slowest:?} on the slow IMS"
    );
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// Current-thread runtime: every task of the proxy logs into this thread's subscriber.
#[tokio::test]
async fn revoked_first_secret_falls_back_to_the_second_without_a_failed_request() {
    const OLD: &str = "rotation-old-secret-7f3a9c";
    const NEW: &str = "rotation-new-secret-2b8e41";
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // 2 s tokens: a refresh about every second.
    let h = Harness::with(Setup {
        secrets: Some(vec![OLD.into(), NEW.into()]),
        expires_in: Some(2),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    assert_eq!(token_entry(&h, "workfront").await["secret_index"], 1);
    let addr = h.server.proxy_addr;
    let until = Instant::now() + Duration::from_secs(4);
    let lanes = start_lanes(addr, 3, 2, until).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Adobe's rotation: the old secret is deleted in Developer Console.
    h.ims().revoke_secret(CLIENT_ID, OLD);
    let all = finish(lanes).await;

    all.assert_clean();
    assert!(all.ok > 100, "only {} requests", all.ok);
    let wf = token_entry(&h, "workfront").await;
    assert_eq!(wf["secret_index"], 2, "{wf}");
    assert_eq!(wf["state"], "valid", "{wf}");
    let m = metrics_text(&h).await;
    // Refreshed several times since, yet the revoked secret was refused only once:
    // the working one is tried first from then on.
    assert!(wf["refreshes_ok"].as_u64() >= Some(4), "{wf}");
    assert_eq!(
        metric(
            &m,
            r#"ims_proxy_token_fetch_errors_total{credential="workfront",error="invalid_client"}"#
        ),
        Some(1.0),
        "{m}"
    );
    // The fusion credential refreshes as often: its request may be the very last one.
    let last = h
        .ims()
        .last_request_from(CLIENT_ID)
        .expect("a workfront token request");
    assert!(last.form.contains(&("client_secret".into(), NEW.into())));
    let text = logs.text();
    assert!(
        text.contains("the next configured secret worked"),
        "the fallback is not logged:\n{text}"
    );
    for secret in [OLD, NEW] {
        assert!(!text.contains(secret), "a secret reached the log");
    }
}

/// Reads a body to the end, at most `per_mib` per MiB slower than it could, and hashes it.
async fn hash_slowly(
    mut body: hyper::body::Incoming,
    per_mib: Duration,
) -> Result<(u64, String), String> {
    let (mut hasher, mut got, mut next_pause) = (Sha256::new(), 0u64, MIB);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body error after {got} bytes: {e}"))?;
        if let Ok(data) = frame.into_data() {
            got += data.len() as u64;
            hasher.update(&data);
            while got >= next_pause {
                tokio::time::sleep(per_mib).await;
                next_pause += MIB;
            }
        }
    }
    Ok((got, hex::encode(hasher.finalize())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_during_a_512_mib_download_and_an_h2_stream_lose_nothing() {
    let h = Harness::with_file(Setup::default()).await;
    h.ready().await;
    h.ims().add_client(CLIENT_ID, "second-secret");
    let download =
        |client: hyper_util::client::legacy::Client<_, Full<Bytes>>, n: u64, per_mib: Duration| {
            let url = h.url(&format!("/workfront/files/download?bytes={n}"));
            tokio::spawn(async move {
                let req = Request::get(url)
                    .header("x-proxy-key", KEY)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = client.request(req).await.map_err(|e| e.to_string())?;
                if resp.status() != StatusCode::OK {
                    return Err(format!("status {}", resp.status()));
                }
                let version = resp.version();
                hash_slowly(resp.into_body(), per_mib)
                    .await
                    .map(|r| (r, version))
            })
        };
    // Paced so both are still streaming when the last reload lands (≥ 2.5 s each).
    let big = download(client(), 512 * MIB, Duration::from_millis(5));
    let h2 = download(h2_client(), 64 * MIB, Duration::from_millis(40));
    eventually(Duration::from_secs(5), "both transfers started", || async {
        h.up().count() >= 2
    })
    .await;

    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Each reload changes the route and swaps the workfront token manager.
        let secret = if i % 2 == 0 { "second-secret" } else { SECRET };
        h.write_config(&Setup {
            secrets: Some(vec![secret.into()]),
            route: format!("headers = {{ \"x-reload\" = \"{i}\" }}"),
            ..Setup::default()
        });
        let r = if i % 2 == 0 {
            post(&h.admin("/reload"), &[], Bytes::new()).await
        } else {
            // The same path SIGHUP takes.
            let report = h.server.shared.reload().await;
            assert_eq!(report.result, "ok", "reload {i}: {:?}", report.error);
            continue;
        };
        assert_eq!(r.status, 200, "reload {i}: {}", r.text());
    }
    assert!(
        !big.is_finished() && !h2.is_finished(),
        "a transfer ended before the reloads did; the test proves nothing"
    );

    let ((got, digest), version) = tokio::time::timeout(Duration::from_secs(120), big)
        .await
        .expect("512 MiB download finished in time")
        .unwrap()
        .expect("512 MiB download intact");
    assert_eq!(version, http::Version::HTTP_11);
    assert_eq!(got, 512 * MIB);
    assert_eq!(digest, pattern_sha256(512 * MIB));
    let ((got, digest), version) = tokio::time::timeout(Duration::from_secs(60), h2)
        .await
        .expect("h2 download finished in time")
        .unwrap()
        .expect("h2 download intact");
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(got, 64 * MIB);
    assert_eq!(digest, pattern_sha256(64 * MIB));

    // The reloads took effect while the transfers ran.
    let r = wf_get(&h).await;
    assert_eq!(r.status, 200);
    assert_eq!(h.up().last().unwrap().headers["x-reload"], "4");
}

/// The harness config without the fusion credential, route and key.
fn without_fusion(text: &str) -> String {
    text.split("\n\n")
        .filter(|block| {
            !block.contains("[credentials.fusion]")
                && !block.contains("name = \"fusion\"")
                && !block.contains("name = \"fusion-team\"")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn series_of<'a>(metrics: &'a str, credential: &str) -> Vec<&'a str> {
    let label = format!("credential=\"{credential}\"");
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .collect()
}

#[tokio::test]
async fn a_refused_reload_leaves_no_series_for_the_credential_it_tried_to_add() {
    let h = Harness::with_file(Setup::default()).await;
    h.ready().await;
    let text = format!(
        "{}\n[credentials.newcomer]\nclient_id = \"unknown-client\"\nclient_secret = \"nope\"\nscopes = [\"openid\"]\n",
        h.config_text
    );
    h.write_config_text(&text);
    let r = post(&h.admin("/reload"), &[], Bytes::new()).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["result"], "error", "{}", r.text());
    let m = metrics_text(&h).await;
    assert!(
        series_of(&m, "newcomer").is_empty(),
        "{:?}",
        series_of(&m, "newcomer")
    );
    assert!(!series_of(&m, "workfront").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_credentials_series_stay_gone_while_its_requests_finish() {
    // 2 s tokens: the removed credential's manager would refresh (and write its
    // series) while its slow request still waits for the upstream.
    let h = Harness::with_file(Setup {
        expires_in: Some(2),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let slow = spawn_get(&h, "/fusion/slow?ms=2500", FUSION_KEY);
    eventually(
        Duration::from_secs(5),
        "the slow request started",
        || async { h.up().count() >= 1 },
    )
    .await;
    h.write_config_text(&without_fusion(&h.config_text));
    let r = post(&h.admin("/reload"), &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["removed"][0], "fusion", "{}", r.text());
    assert!(series_of(&metrics_text(&h).await, "fusion").is_empty());

    // Past a refresh time of the removed credential, its request still running.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !slow.is_finished(),
        "the request ended too soon to prove anything"
    );
    let m = metrics_text(&h).await;
    assert!(
        series_of(&m, "fusion").is_empty(),
        "{:?}",
        series_of(&m, "fusion")
    );
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(series_of(&metrics_text(&h).await, "fusion").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_across_a_reload_still_recovers_from_a_401() {
    // One slot: the second request waits in the queue, holding the configuration it began with.
    let with_secret = |secret: &str| Setup {
        credential: "max_in_flight = 1".into(),
        secrets: Some(vec![secret.into()]),
        ..Setup::default()
    };
    let h = Harness::with_file(with_secret(SECRET)).await;
    h.ready().await;
    h.ims().add_client(CLIENT_ID, "second-secret");
    let first = spawn_get(&h, "/workfront/slow?ms=800", KEY);
    eventually(
        Duration::from_secs(5),
        "the first request started",
        || async { h.up().count() >= 1 },
    )
    .await;
    let queued = spawn_get(&h, PATH, KEY);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A new secret renews the credential's manager; then every token is revoked.
    h.write_config(&with_secret("second-secret"));
    let r = post(&h.admin("/reload"), &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["renewed"][0], "workfront", "{}", r.text());
    h.ims().revoke_all_tokens();

    assert_eq!(first.await.unwrap().status, 200);
    // Sent with the old manager's revoked token: 401, forced refresh, replay.
    let r = tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .expect("the queued request finished")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        h.up().invalid_tokens() >= 1,
        "no 401 happened; the test shows nothing"
    );
}
