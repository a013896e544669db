//! Tokens: cached, refreshed and swapped without dropping a request, never
//! sent expired, renewed on an upstream 401, reported without being shown,
//! and kept or renewed across reloads.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use ims_proxy::sim::SimIms;
use std::collections::HashSet;
use std::time::Duration;
use support::*;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The default workfront route's echo path.
const PATH: &str = "/workfront/attask/api/v19.0/proj/search";

/// A GET on the workfront route with the client key, on a fresh connection.
async fn wf_get(h: &Harness) -> Reply {
    get(&h.url(PATH), &[("x-proxy-key", KEY)]).await
}

/// The bearer token an upstream request carried.
fn bearer_of(seen: &ims_proxy::sim::SeenRequest) -> String {
    let auth = seen.headers["authorization"]
        .to_str()
        .expect("ascii authorization");
    auth.strip_prefix("Bearer ")
        .expect("a bearer token")
        .to_string()
}

/// The bearer token of the last request the upstream saw.
fn last_token(h: &Harness) -> String {
    bearer_of(&h.up().last().expect("upstream saw a request"))
}

/// `/tokens` as text.
async fn tokens_text(h: &Harness) -> String {
    let r = get(&h.admin("/tokens"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// `POST /reload` on the admin port.
async fn reload(h: &Harness) -> Reply {
    post(&h.admin("/reload"), &[], Bytes::new()).await
}

/// A simulated IMS that knows the harness's fusion client and the given workfront secrets.
async fn ims_knowing(workfront_secrets: &[&str]) -> SimIms {
    let ims = SimIms::start().await.expect("sim IMS");
    for s in workfront_secrets {
        ims.state().add_client(CLIENT_ID, s);
    }
    ims.state().add_client("fusion-client-id", "fusion-secret");
    ims
}

/// What request loops saw.
#[derive(Default)]
struct Tally {
    /// 200 answers.
    ok: usize,
    /// Anything else, described.
    bad: Vec<String>,
    /// `Authorization` values the upstream received, as it echoed them.
    tokens: HashSet<String>,
}

/// GETs `url` with the client key until `until`.
async fn request_loop(client: HttpClient, url: String, until: Instant) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < until {
        let req = Request::get(&url)
            .header("x-proxy-key", KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        match client.request(req).await {
            Err(e) => t.bad.push(format!("transport error: {e}")),
            Ok(resp) => {
                let status = resp.status();
                match resp.into_body().collect().await {
                    Err(e) => t.bad.push(format!("body error after {status}: {e}")),
                    Ok(b) if status == 200 => {
                        t.ok += 1;
                        let echo: serde_json::Value =
                            serde_json::from_slice(&b.to_bytes()).expect("echo JSON");
                        let auth = echo["headers"]["authorization"]
                            .as_str()
                            .expect("echoed authorization");
                        t.tokens.insert(auth.to_string());
                    }
                    Ok(b) => t.bad.push(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&b.to_bytes())
                    )),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    t
}

/// Starts `http1` HTTP/1.1 loops and `h2` HTTP/2 loops, running for `dur`.
fn spawn_loops(
    h: &Harness,
    http1: usize,
    h2: usize,
    dur: Duration,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    let until = Instant::now() + dur;
    let c1 = client();
    let c2 = h2_client();
    (0..http1)
        .map(|_| c1.clone())
        .chain((0..h2).map(|_| c2.clone()))
        .map(|c| tokio::spawn(request_loop(c, h.url(PATH), until)))
        .collect()
}

/// Waits for the loops and adds up what they saw.
async fn join_loops(loops: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut all = Tally::default();
    for l in loops {
        let t = l.await.expect("request loop");
        all.ok += t.ok;
        all.bad.extend(t.bad);
        all.tokens.extend(t.tokens);
    }
    all
}

// ---------------------------------------------------------------- caching

#[tokio::test]
async fn hundred_requests_cost_one_ims_call() {
    let h = Harness::start().await;
    h.ready().await;
    // One token request per credential (workfront and fusion), at start.
    assert_eq!(h.ims().calls(), 2);
    let c = client();
    for _ in 0..100 {
        let req = Request::get(h.url(PATH))
            .header("x-proxy-key", KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(h.up().count(), 100);
    let tokens: HashSet<_> = h.up().requests().iter().map(bearer_of).collect();
    assert_eq!(
        tokens.len(),
        1,
        "every request carried the one cached token"
    );
    assert_eq!(h.ims().calls(), 2, "100 requests cost no further IMS call");
    assert_eq!(h.ims().issued(), 2);
}

#[tokio::test]
async fn token_request_is_a_client_credentials_form_with_comma_joined_scopes() {
    let h = Harness::start().await;
    h.ready().await;
    // Force one workfront refresh so the last token request is certainly the workfront one.
    h.up().reject_next(1);
    assert_eq!(wf_get(&h).await.status, 200);
    assert_eq!(h.ims().calls(), 3);
    let req = h.ims().last_request().expect("IMS saw a token request");
    let ct = req.content_type.expect("a content type");
    assert_eq!(
        ct.split(';').next().unwrap().trim(),
        "application/x-www-form-urlencoded"
    );
    let mut form = req.form.clone();
    form.sort();
    let mut want = vec![
        ("client_id".to_string(), CLIENT_ID.to_string()),
        ("client_secret".to_string(), SECRET.to_string()),
        ("grant_type".to_string(), "client_credentials".to_string()),
        (
            "scope".to_string(),
            "openid,AdobeID,profile,additional_info.projectedProductContext".to_string(),
        ),
    ];
    want.sort();
    assert_eq!(form, want, "exactly these four fields");
}

// ---------------------------------------------------------------- refresh

#[tokio::test]
async fn token_swap_drops_no_request() {
    // 2 s tokens; the 1 h margin is capped at half the lifetime: a new token about every second.
    let h = Harness::with(Setup {
        expires_in: Some(2),
        ims: "refresh_margin = \"1h\"".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let Tally { ok, bad, tokens } =
        join_loops(spawn_loops(&h, 8, 3, Duration::from_millis(3500))).await;
    assert!(
        bad.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        bad.len(),
        ok + bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests went through");
    assert!(
        tokens.len() >= 3,
        "only {} distinct tokens reached the upstream in 3.5 s",
        tokens.len()
    );
    let upstream_tokens: HashSet<_> = h.up().requests().iter().map(bearer_of).collect();
    assert!(upstream_tokens.len() >= 3, "{upstream_tokens:?}");
    assert!(h.ims().issued() >= 3, "issued {}", h.ims().issued());
    let wf = token_entry(&h, "workfront").await;
    let refreshes = wf["refreshes_ok"].as_u64().unwrap();
    // About one a second: the margin is capped, not refreshing back to back.
    assert!(
        (3..=8).contains(&refreshes),
        "{refreshes} refreshes in about 3.5 s: {wf}"
    );
}

#[tokio::test]
async fn readyz_fails_before_expiry_when_refresh_fails() {
    // 4 s tokens: refresh due after 2 s (margin capped at half the lifetime).
    let h = Harness::with(Setup {
        expires_in: Some(4),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    assert_eq!(get(&h.admin("/readyz"), &[]).await.status, 200);
    h.ims().set_down(true);
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let r = get(&h.admin("/readyz"), &[]).await;
        if r.status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never turned 503: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not ready, yet the old token still serves.
    let r = wf_get(&h).await;
    assert_eq!(
        r.status,
        200,
        "the old token is used while valid: {}",
        r.text()
    );
    let wf = token_entry(&h, "workfront").await;
    assert!(wf["expires_in_seconds"].as_i64().unwrap() >= 0, "{wf}");
    assert_eq!(wf["ready"], false, "{wf}");
    assert!(wf["last_error"].as_str().is_some(), "{wf}");
}

#[tokio::test]
async fn ims_down_at_start_then_recovering() {
    let ims = ims_knowing(&[SECRET]).await;
    ims.state().set_down(true);
    let h = Harness::with_ims(Setup::default(), ims).await;
    let r = wf_get(&h).await;
    r.assert_refusal(503, "token_unavailable");
    let retry: u64 = r.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        h.up().count(),
        0,
        "nothing reached the upstream without a token"
    );
    let ready = get(&h.admin("/readyz"), &[]).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(
        get(&h.admin("/healthz"), &[]).await.status,
        200,
        "healthy though not ready"
    );

    h.ims().set_down(false);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = r;
    while last.status != 200 {
        assert!(
            Instant::now() < deadline,
            "no recovery within 5 s: {} {}",
            last.status,
            last.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = wf_get(&h).await;
        if last.status != 200 {
            last.assert_refusal(503, "token_unavailable");
        }
    }
    loop {
        let ready = get(&h.admin("/readyz"), &[]).await;
        if ready.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {} after 5 s: {}",
            ready.status,
            ready.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(token_entry(&h, "workfront").await["state"], "valid");
}

#[tokio::test]
async fn expired_token_is_never_sent() {
    let h = Harness::with(Setup {
        expires_in: Some(2),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    h.ims().set_down(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut ok, mut refused) = (0usize, 0usize);
    // Until a few refusals after the token ran out.
    while refused < 5 {
        assert!(
            Instant::now() < deadline,
            "the 2 s token was still used after 5 s ({ok} answered 200)"
        );
        let r = wf_get(&h).await;
        if r.status == 200 {
            assert_eq!(
                refused, 0,
                "a 200 after the token was given up: an expired token went out"
            );
            ok += 1;
        } else {
            r.assert_refusal(503, "token_unavailable");
            assert!(r.headers.contains_key("retry-after"));
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok > 0, "the token was good for a while");
    // Every request the upstream saw carried a live token (else it would have answered 401
    // and the proxy would have had to pass a 401 or replay).
    assert_eq!(
        h.up().count(),
        ok,
        "each upstream request answered one client with 200"
    );
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(
            &m,
            r#"ims_proxy_token_forced_refreshes_total{credential="workfront"}"#
        )
        .unwrap_or(0.0),
        0.0,
        "{m}"
    );
    assert_eq!(token_entry(&h, "workfront").await["ready"], false);
    assert_eq!(get(&h.admin("/readyz"), &[]).await.status, 503);
}

// ---------------------------------------------------------------- upstream 401

#[tokio::test]
async fn upstream_401_forces_one_refresh_and_replays() {
    let h = Harness::start().await;
    h.ready().await;
    let calls = h.ims().calls();
    assert_eq!(wf_get(&h).await.status, 200);
    let first = last_token(&h);
    h.up().reject_next(1);
    let r = wf_get(&h).await;
    assert_eq!(r.status, 200, "replayed with a new token: {}", r.text());
    assert_eq!(h.ims().calls(), calls + 1, "exactly one forced refresh");
    let seen = h.up().requests();
    let n = seen.len();
    assert_eq!(n, 3, "the rejected request was sent once more");
    assert_eq!(
        bearer_of(&seen[n - 2]),
        first,
        "rejected with the old token"
    );
    let second = bearer_of(&seen[n - 1]);
    assert_ne!(second, first, "replayed with a new token");
    assert!(h.ims().token_is_valid(&second));
    assert_eq!(
        seen[n - 2].headers["x-request-id"],
        seen[n - 1].headers["x-request-id"],
        "the same request"
    );
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(
            &m,
            r#"ims_proxy_token_forced_refreshes_total{credential="workfront"}"#
        ),
        Some(1.0),
        "{m}"
    );
    // The next request uses the new token at once.
    assert_eq!(wf_get(&h).await.status, 200);
    assert_eq!(last_token(&h), second);
    assert_eq!(h.ims().calls(), calls + 1);
}

#[tokio::test]
async fn forced_refresh_happens_at_most_once_per_five_seconds() {
    let h = Harness::start().await;
    h.ready().await;
    h.up().reject_next(1);
    assert_eq!(wf_get(&h).await.status, 200);
    let calls = h.ims().calls();
    // A second rejection right after: no second refresh, the 401 is passed on.
    h.up().reject_next(1);
    let r = wf_get(&h).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error_code"], "401013");
    assert_eq!(
        h.ims().calls(),
        calls,
        "IMS is not hammered by repeated 401s"
    );
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(
            &m,
            r#"ims_proxy_token_forced_refreshes_total{credential="workfront"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(wf_get(&h).await.status, 200);
}

#[tokio::test]
async fn upstream_401_on_held_form_body_replays_it() {
    let h = Harness::start().await;
    h.ready().await;
    h.up().reject_next(1);
    let r = post(
        &h.url(PATH),
        &[
            ("x-proxy-key", KEY),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        "name=Proj+1&status=CUR",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = h.up().requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        &seen[1].body[..],
        b"name=Proj+1&status=CUR",
        "the same body sent again"
    );
    assert_ne!(bearer_of(&seen[0]), bearer_of(&seen[1]));
}

#[tokio::test]
async fn revoked_tokens_storm_costs_one_ims_call() {
    let h = Harness::start().await;
    h.ready().await;
    assert_eq!(wf_get(&h).await.status, 200);
    let calls = h.ims().calls();
    h.ims().revoke_all_tokens();
    let c = client();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (c, url) = (c.clone(), h.url(PATH));
            tokio::spawn(async move {
                let req = Request::get(url)
                    .header("x-proxy-key", KEY)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                send(&c, req).await
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.expect("request task");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        h.ims().calls(),
        calls + 1,
        "20 rejected requests share one refresh"
    );
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(
            &m,
            r#"ims_proxy_token_forced_refreshes_total{credential="workfront"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn upstream_401_on_streamed_body_is_passed_through() {
    let h = Harness::start().await;
    h.ready().await;
    let calls = h.ims().calls();
    h.up().reject_next(1);
    let r = post(
        &h.url(PATH),
        &[("x-proxy-key", KEY), ("content-type", "application/json")],
        r#"{"name":"x"}"#,
    )
    .await;
    assert_eq!(
        r.status,
        401,
        "a streamed body cannot be sent twice: {}",
        r.text()
    );
    assert_eq!(
        r.json()["error_code"],
        "401013",
        "the upstream's own answer: {}",
        r.text()
    );
    assert_eq!(h.up().count(), 1, "not replayed");
    // The token is renewed for the requests that follow.
    let deadline = Instant::now() + Duration::from_secs(3);
    while h.ims().calls() < calls + 1 {
        assert!(Instant::now() < deadline, "no refresh after the 401");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = post(
        &h.url(PATH),
        &[("x-proxy-key", KEY), ("content-type", "application/json")],
        r#"{"name":"y"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.ims().calls(), calls + 1);
}

// ---------------------------------------------------------------- admin view

#[tokio::test]
async fn tokens_endpoint_never_shows_the_token() {
    let h = Harness::start().await;
    h.ready().await;
    assert_eq!(wf_get(&h).await.status, 200);
    let token = last_token(&h);
    let text = tokens_text(&h).await;
    assert!(!text.contains(&token), "/tokens shows the token: {text}");
    assert!(!text.contains(SECRET), "/tokens shows the secret: {text}");
    assert!(!text.contains("fusion-secret"), "{text}");
    let m = metrics_text(&h).await;
    assert!(
        !m.contains(&token) && !m.contains(SECRET),
        "/metrics shows a token or secret"
    );

    let wf = token_entry(&h, "workfront").await;
    assert_eq!(wf["credential"], "workfront");
    assert_eq!(wf["state"], "valid", "{wf}");
    let expires_at = wf["expires_at"].as_str().expect("expires_at");
    assert!(
        expires_at.len() >= 20 && expires_at.ends_with('Z') && expires_at.contains('T'),
        "RFC 3339: {expires_at}"
    );
    let left = wf["expires_in_seconds"]
        .as_i64()
        .expect("expires_in_seconds");
    assert!((86_300..=86_399).contains(&left), "{left}");
    let last_refresh = wf["last_refresh"].as_str().expect("last_refresh");
    assert!(
        last_refresh.ends_with('Z') && last_refresh.contains('T'),
        "{last_refresh}"
    );
    assert!(wf["last_error"].is_null(), "{wf}");
    assert_eq!(wf["refreshes_ok"], 1);
    assert!(
        m.contains(r#"ims_proxy_token_refreshes_total{credential="workfront",result="ok"} 1"#),
        "{m}"
    );
    let expiry = metric(
        &m,
        r#"ims_proxy_token_expiry_timestamp_seconds{credential="workfront"}"#,
    )
    .expect("expiry gauge");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expiry - now - 86_399.0).abs() < 120.0,
        "expiry {expiry} vs now {now}"
    );
}

#[tokio::test]
async fn readyz_and_healthz_answer_when_tokens_are_held() {
    let h = Harness::start().await;
    h.ready().await;
    let r = get(&h.admin("/healthz"), &[]).await;
    assert_eq!(r.status, 200);
    let r = get(&h.admin("/readyz"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ready"], true);
    assert!(!r.text().contains(SECRET));
}

#[tokio::test]
async fn invalid_client_is_reported() {
    let wrong = "wrong-secret-7f3a9c";
    let ims = ims_knowing(&[SECRET]).await;
    let h = Harness::with_ims(
        Setup {
            secrets: Some(vec![wrong.into()]),
            ..Setup::default()
        },
        ims,
    )
    .await;
    let r = wf_get(&h).await;
    r.assert_refusal(503, "token_unavailable");
    assert!(!r.text().contains(wrong), "the error body shows the secret");
    assert_eq!(h.up().count(), 0);
    // The manager retries with backoff; between attempts the state is "failed".
    let deadline = Instant::now() + Duration::from_secs(3);
    let wf = loop {
        let wf = token_entry(&h, "workfront").await;
        if wf["state"] == "failed" {
            break wf;
        }
        assert!(Instant::now() < deadline, "state never failed: {wf}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let err = wf["last_error"].as_str().expect("last_error");
    assert!(err.contains("invalid_client"), "{err}");
    assert!(wf["expires_at"].is_null(), "{wf}");
    assert!(!tokens_text(&h).await.contains(wrong));
    let m = metrics_text(&h).await;
    let n = metric(
        &m,
        r#"ims_proxy_token_fetch_errors_total{credential="workfront",error="invalid_client"}"#,
    );
    assert!(n.is_some_and(|n| n >= 1.0), "{m}");
    assert!(!m.contains(wrong));
    assert_eq!(get(&h.admin("/readyz"), &[]).await.status, 503);
}

#[tokio::test]
async fn rotation_uses_the_next_secret() {
    let ims = ims_knowing(&["new"]).await;
    let h = Harness::with_ims(
        Setup {
            secrets: Some(vec!["old".into(), "new".into()]),
            ..Setup::default()
        },
        ims,
    )
    .await;
    h.ready().await;
    let r = wf_get(&h).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let wf = token_entry(&h, "workfront").await;
    assert_eq!(wf["secret_index"], 2, "{wf}");
    assert_eq!(wf["state"], "valid", "{wf}");
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(
            &m,
            r#"ims_proxy_token_fetch_errors_total{credential="workfront",error="invalid_client"}"#
        ),
        Some(1.0),
        "{m}"
    );
    // From now on the secret that worked is tried first: a refresh costs one IMS call.
    let calls = h.ims().calls();
    h.up().reject_next(1);
    assert_eq!(wf_get(&h).await.status, 200);
    assert_eq!(
        h.ims().calls(),
        calls + 1,
        "the rejected old secret was not tried again"
    );
    let req = h.ims().last_request().unwrap();
    assert!(
        req.form.contains(&("client_secret".into(), "new".into())),
        "{req:?}"
    );
}

#[tokio::test]
async fn expires_in_in_milliseconds_is_understood() {
    let ims = ims_knowing(&[SECRET]).await;
    ims.state().set_expires_in_millis(true);
    let h = Harness::with_ims(Setup::default(), ims).await;
    h.ready().await;
    assert_eq!(wf_get(&h).await.status, 200);
    let left = token_entry(&h, "workfront").await["expires_in_seconds"]
        .as_i64()
        .expect("expires_in_seconds");
    assert!(
        (86_300..=86_399).contains(&left),
        "86399000 read as milliseconds, got {left} s"
    );
}

// ---------------------------------------------------------------- reload

#[tokio::test]
async fn reload_keeps_unchanged_credentials_token() {
    let h = Harness::with_file(Setup::default()).await;
    h.ready().await;
    assert_eq!(wf_get(&h).await.status, 200);
    let before = last_token(&h);
    let calls = h.ims().calls();
    let r = reload(&h).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"], "ok", "{v}");
    let mut kept: Vec<_> = v["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    kept.sort();
    assert_eq!(kept, ["fusion", "workfront"], "{v}");
    assert_eq!(v["renewed"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(
        h.ims().calls(),
        calls,
        "no token request for unchanged credentials"
    );
    assert_eq!(wf_get(&h).await.status, 200);
    assert_eq!(last_token(&h), before, "the same token after the reload");
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(&m, r#"ims_proxy_config_reloads_total{result="ok"}"#),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn reload_with_changed_secret_gets_new_token_first() {
    let h = Harness::with_file(Setup::default()).await;
    h.ready().await;
    assert_eq!(wf_get(&h).await.status, 200);
    let before = last_token(&h);
    let calls = h.ims().calls();
    h.ims().add_client(CLIENT_ID, "second-secret");
    h.write_config(&Setup {
        secrets: Some(vec!["second-secret".into()]),
        ..Setup::default()
    });
    let r = reload(&h).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"], "ok", "{v}");
    assert_eq!(v["renewed"], serde_json::json!(["workfront"]), "{v}");
    assert_eq!(v["kept"], serde_json::json!(["fusion"]), "{v}");
    // The token was there before the reload answered.
    assert_eq!(h.ims().calls(), calls + 1);
    let req = h.ims().last_request().unwrap();
    assert!(
        req.form
            .contains(&("client_secret".into(), "second-secret".into())),
        "{req:?}"
    );
    assert_eq!(token_entry(&h, "workfront").await["state"], "valid");
    assert_eq!(wf_get(&h).await.status, 200);
    let after = last_token(&h);
    assert_ne!(after, before, "the changed credential uses its new token");
    assert!(h.ims().token_is_valid(&after));
    assert_eq!(h.ims().calls(), calls + 1);
}

#[tokio::test]
async fn invalid_reload_leaves_config_running() {
    let h = Harness::with_file(Setup::default()).await;
    h.ready().await;
    let calls = h.ims().calls();
    h.write_config(&Setup {
        route: "upstream_timeout = \"soon\"".into(),
        ..Setup::default()
    });
    let r = reload(&h).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"], "error", "{v}");
    let err = v["error"].as_str().expect("error");
    assert!(
        err.contains("routes[0].upstream_timeout"),
        "the error names the key: {err}"
    );
    assert_eq!(
        wf_get(&h).await.status,
        200,
        "the running config still serves"
    );
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(&m, r#"ims_proxy_config_reloads_total{result="error"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"ims_proxy_config_reloads_total{result="ok"}"#).unwrap_or(0.0),
        0.0,
        "{m}"
    );

    // Not TOML at all.
    h.write_config_text("this is [not toml");
    let r = reload(&h).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["result"], "error");
    assert_eq!(wf_get(&h).await.status, 200);
    assert_eq!(h.ims().calls(), calls);
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(&m, r#"ims_proxy_config_reloads_total{result="error"}"#),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test]
async fn reload_with_unobtainable_token_is_refused() {
    let h = Harness::with_file(Setup::default()).await;
    h.ready().await;
    assert_eq!(wf_get(&h).await.status, 200);
    let before = last_token(&h);
    h.write_config(&Setup {
        secrets: Some(vec!["secret-ims-never-heard-of".into()]),
        route: "strip_prefix = false".into(),
        ..Setup::default()
    });
    let r = reload(&h).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"], "error", "{v}");
    let err = v["error"].as_str().expect("error");
    assert!(
        err.contains("credentials.workfront") && err.contains("invalid_client"),
        "{err}"
    );
    assert!(
        !r.text().contains("secret-ims-never-heard-of"),
        "the reload answer shows the secret"
    );
    // Old configuration (route and token) still in place.
    assert_eq!(wf_get(&h).await.status, 200);
    let seen = h.up().last().unwrap();
    assert_eq!(
        seen.path, "/attask/api/v19.0/proj/search",
        "the new route was not applied"
    );
    assert_eq!(bearer_of(&seen), before);
    let wf = token_entry(&h, "workfront").await;
    assert_eq!(wf["state"], "valid", "{wf}");
    assert_eq!(get(&h.admin("/readyz"), &[]).await.status, 200);
    let m = metrics_text(&h).await;
    assert_eq!(
        metric(&m, r#"ims_proxy_config_reloads_total{result="error"}"#),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn reload_applies_route_changes() {
    let h = Harness::with_file(Setup::default()).await;
    h.ready().await;
    assert_eq!(wf_get(&h).await.status, 200);
    assert_eq!(h.up().last().unwrap().path, "/attask/api/v19.0/proj/search");
    h.write_config(&Setup {
        route: "strip_prefix = false\nheaders = { \"x-gw-region\" = \"va6\" }".into(),
        ..Setup::default()
    });
    let r = reload(&h).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(wf_get(&h).await.status, 200);
    let seen = h.up().last().unwrap();
    assert_eq!(seen.path, PATH, "strip_prefix = false took effect");
    assert_eq!(seen.headers["x-gw-region"], "va6");
}

#[tokio::test]
async fn reload_drops_no_request() {
    let h = Harness::with_file(Setup::default()).await;
    h.ready().await;
    h.ims().add_client(CLIENT_ID, "second-secret");
    let calls = h.ims().calls();
    let loops = spawn_loops(&h, 4, 2, Duration::from_millis(1500));
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Alternate secrets so every reload also swaps the workfront token manager.
        let secret = if i % 2 == 0 { "second-secret" } else { SECRET };
        h.write_config(&Setup {
            secrets: Some(vec![secret.into()]),
            route: format!("headers = {{ \"x-reload\" = \"{i}\" }}"),
            ..Setup::default()
        });
        let r = reload(&h).await;
        assert_eq!(r.status, 200, "reload {i}: {}", r.text());
    }
    let Tally { ok, bad, tokens } = join_loops(loops).await;
    assert!(
        bad.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        bad.len(),
        ok + bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(ok > 50, "only {ok} requests");
    assert!(tokens.len() >= 2, "tokens changed with the secret");
    assert_eq!(
        h.ims().calls(),
        calls + 5,
        "one token per changed credential per reload"
    );
    assert_eq!(h.up().last().unwrap().headers["x-reload"], "4");
}
