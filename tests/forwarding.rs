//! What reaches the upstream: client credentials out, the proxy's own in.

mod support;

use base64::Engine;
use support::*;

#[tokio::test]
async fn injects_token_and_client_id_and_removes_every_client_credential() {
    let h = Harness::start().await;
    let r = get(
        &h.url("/workfront/attask/api/v19.0/proj/search?fields=name&apiKey=legacy&sessionID=sess&APIKEY=x&$$LIMIT=5"),
        &[
            ("x-proxy-key", KEY),
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("x-api-key", "client-sent-api-key"),
            ("x-gw-ims-org-id", "EVIL@AdobeOrg"),
            ("sessionID", "client-session"),
            ("cookie", "attask=session-cookie"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("connection", "x-hop-header"),
            ("x-hop-header", "1"),
            ("x-custom", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = h.up().last().expect("upstream saw the request");
    assert_eq!(seen.path, "/attask/api/v19.0/proj/search");
    assert_eq!(seen.query.as_deref(), Some("fields=name&$$LIMIT=5"));
    let auth = seen.headers["authorization"].to_str().unwrap();
    let token = auth.strip_prefix("Bearer ").expect("bearer token");
    assert!(
        h.ims().token_is_valid(token),
        "the upstream got a live IMS token"
    );
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(seen.headers["x-api-key"], CLIENT_ID);
    assert_eq!(seen.headers.get_all("x-api-key").iter().count(), 1);
    assert_eq!(seen.headers["x-gw-ims-org-id"], "ORG123@AdobeOrg");
    assert_eq!(seen.headers["via"], "1.1 ims-proxy");
    assert_eq!(seen.headers["host"], h.upstream.addr().to_string());
    assert!(seen.headers.contains_key("x-request-id"));
    assert_eq!(seen.headers["x-custom"], "kept");
    for gone in [
        "x-proxy-key",
        "sessionid",
        "cookie",
        "proxy-authorization",
        "x-hop-header",
        "connection",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    // Response: hop-by-hop and Set-Cookie removed, request id added.
    assert!(!r.headers.contains_key("set-cookie"));
    assert!(!r.headers.contains_key("keep-alive"));
    assert_eq!(r.headers["x-request-id"], seen.headers["x-request-id"]);
}

#[tokio::test]
async fn legacy_form_body_with_api_key_is_admitted_and_scrubbed() {
    let h = Harness::start().await;
    let body = format!("name=Proj+1&apiKey={KEY}&sessionID=abc&status=CUR");
    let r = post(
        &h.url("/workfront/attask/api/v19.0/proj"),
        &[("content-type", "application/x-www-form-urlencoded")],
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = h.up().last().unwrap();
    assert_eq!(&seen.body[..], b"name=Proj+1&status=CUR");
    assert_eq!(seen.headers["content-length"], "22");
    assert!(!String::from_utf8_lossy(&seen.body).contains(KEY));
}

#[tokio::test]
async fn form_credentials_are_scrubbed_even_when_the_key_came_in_a_header() {
    let h = Harness::start().await;
    let r = post(
        &h.url("/workfront/attask/api/v19.0/task"),
        &[
            (
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("x-proxy-key", KEY),
        ],
        "apiKey=old-workfront-key&name=x",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(&h.up().last().unwrap().body[..], b"name=x");
}

#[tokio::test]
async fn request_id_sent_by_client_is_kept() {
    let h = Harness::start().await;
    let r = get(
        &h.url("/workfront/x"),
        &[("x-proxy-key", KEY), ("x-request-id", "abc-123")],
    )
    .await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
    assert_eq!(h.up().last().unwrap().headers["x-request-id"], "abc-123");
}

#[tokio::test]
async fn fusion_route_sets_its_static_headers_replacing_the_clients() {
    let h = Harness::start().await;
    let r = get(
        &h.url("/fusion/api/v3/scenarios"),
        &[("x-proxy-key", KEY), ("x-gw-region", "evil")],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = h.up().last().unwrap();
    assert_eq!(seen.path, "/api/v3/scenarios");
    assert_eq!(seen.headers["x-gw-region"], "or2");
    assert_eq!(seen.headers.get_all("x-gw-region").iter().count(), 1);
    assert_eq!(seen.headers["x-organization-id"], "123456");
    assert_eq!(seen.headers["x-api-key"], "fusion-client-id");
    assert!(
        !seen.headers.contains_key("x-gw-ims-org-id"),
        "fusion credential has no org_id"
    );
}

#[tokio::test]
async fn every_key_source_admits() {
    let h = Harness::start().await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("anyone:{KEY}"))
    );
    let bearer = format!("Bearer {KEY}");
    let url = h.url("/workfront/attask/api/v19.0/user/search");
    for headers in [
        vec![("authorization", bearer.as_str())],
        vec![("authorization", basic.as_str())],
        vec![("x-proxy-key", KEY)],
        vec![("x-api-key", KEY)],
    ] {
        let r = get(&url, &headers).await;
        assert_eq!(r.status, 200, "{headers:?}: {}", r.text());
    }
    assert_eq!(get(&format!("{url}?apiKey={KEY}"), &[]).await.status, 200);
    let r = post(
        &url,
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("apiKey={KEY}"),
    )
    .await;
    assert_eq!(r.status, 200);
    let metrics = get(&h.admin("/metrics"), &[]).await.text();
    assert!(metrics.contains(r#"ims_proxy_requests_total{client="etl",method="GET",route="workfront",status="200"} 5"#), "{metrics}");
}

#[tokio::test]
async fn open_mode_needs_no_key_and_reports_anonymous() {
    let h = Harness::with(Setup {
        access: "mode = \"open\"".into(),
        ..Setup::default()
    })
    .await;
    let r = get(&h.url("/workfront/x?apiKey=whatever"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        h.up().last().unwrap().query,
        None,
        "apiKey is scrubbed in open mode too"
    );
    let metrics = get(&h.admin("/metrics"), &[]).await.text();
    assert!(metrics.contains(r#"client="anonymous""#));
}

#[tokio::test]
async fn pass_cookies_lets_cookies_through_both_ways() {
    let h = Harness::with(Setup {
        route: "pass_cookies = true".into(),
        ..Setup::default()
    })
    .await;
    let r = get(
        &h.url("/workfront/x"),
        &[("x-proxy-key", KEY), ("cookie", "a=1")],
    )
    .await;
    assert_eq!(h.up().last().unwrap().headers["cookie"], "a=1");
    assert!(r.headers.contains_key("set-cookie"));
}

#[tokio::test]
async fn strip_prefix_false_and_send_api_key_false() {
    let h = Harness::with(Setup {
        route: "strip_prefix = false\nsend_api_key = false".into(),
        ..Setup::default()
    })
    .await;
    get(&h.url("/workfront/attask/api"), &[("x-proxy-key", KEY)]).await;
    let seen = h.up().last().unwrap();
    assert_eq!(seen.path, "/workfront/attask/api");
    assert!(!seen.headers.contains_key("x-api-key"));
}

#[tokio::test]
async fn audit_log_gets_one_secret_free_json_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let h = Harness::with(Setup {
        server: format!("audit_log = {:?}", path.display().to_string()),
        ..Setup::default()
    })
    .await;
    get(
        &h.url(&format!(
            "/workfront/attask/api/v19.0/proj/search?apiKey={KEY}"
        )),
        &[],
    )
    .await;
    get(&h.url("/workfront/x"), &[("x-proxy-key", "wrong")]).await;
    let token = h.up().last().unwrap().headers["authorization"]
        .to_str()
        .unwrap()
        .to_string();
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["client"], "etl");
    assert_eq!(first["route"], "workfront");
    assert_eq!(first["credential"], "workfront");
    assert_eq!(first["status"], 200);
    assert_eq!(
        first["path"],
        "/workfront/attask/api/v19.0/proj/search?apiKey=[redacted]"
    );
    assert!(first["upstream_request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(first["token_fingerprint"].as_str().map(str::len), Some(8));
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(
        (second["client"].as_str(), second["status"].as_u64()),
        (Some("none"), Some(401))
    );
    let all = lines.join("\n");
    for secret in [KEY, SECRET, token.trim_start_matches("Bearer ")] {
        assert!(!all.contains(secret), "audit log leaks {secret}");
    }
}

#[tokio::test]
async fn metrics_endpoint_exports_every_metric_of_the_spec() {
    let h = Harness::start().await;
    h.ready().await;
    get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    let text = get(&h.admin("/metrics"), &[]).await.text();
    for name in [
        "ims_proxy_requests_total",
        "ims_proxy_request_duration_seconds",
        "ims_proxy_upstream_duration_seconds",
        "ims_proxy_inflight_requests",
        "ims_proxy_queued_requests",
        "ims_proxy_upstream_errors_total",
        "ims_proxy_auth_failures_total",
        "ims_proxy_token_refreshes_total",
        "ims_proxy_token_fetch_errors_total",
        "ims_proxy_token_fetch_duration_seconds",
        "ims_proxy_token_expiry_timestamp_seconds",
        "ims_proxy_token_forced_refreshes_total",
        "ims_proxy_request_bytes_total",
        "ims_proxy_response_bytes_total",
        "ims_proxy_upstream_throttled_total",
        "ims_proxy_config_reloads_total",
        "ims_proxy_build_info",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics"
        );
    }
    assert!(text.contains(r#"ims_proxy_auth_failures_total{reason="rate_limited"} 0"#));
    assert!(text.contains(r#"ims_proxy_upstream_errors_total{kind="timeout",route="workfront"} 0"#));
    assert!(text.contains(&format!(
        "ims_proxy_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
}

#[tokio::test]
async fn chargeback_bytes_are_counted_exactly_across_a_reload() {
    let h = Harness::start().await;
    let series =
        |kind: &str| format!(r#"ims_proxy_{kind}_bytes_total{{client="etl",route="workfront"}}"#);
    let (mut sent, mut received) = (0usize, 0usize);
    // The second round runs on the snapshot a reload built: same series, no reset.
    for round in 0..2 {
        if round == 1 {
            let report = h.apply(&h.config_text).await;
            assert_eq!(report.result, "ok", "{report:?}");
        }
        let body = vec![b'x'; 1000 + round];
        let r = post(
            &h.url("/workfront/attask/api/upload"),
            &[
                ("x-proxy-key", KEY),
                ("content-type", "application/octet-stream"),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, 200);
        sent += body.len();
        received += r.body.len();
        let r = get(
            &h.url("/workfront/files/download?bytes=5000"),
            &[("x-proxy-key", KEY)],
        )
        .await;
        assert_eq!((r.status.as_u16(), r.body.len()), (200, 5000));
        received += r.body.len();
        let text = metrics_text(&h).await;
        assert_eq!(
            metric(&text, &series("request")),
            Some(sent as f64),
            "{text}"
        );
        assert_eq!(
            metric(&text, &series("response")),
            Some(received as f64),
            "{text}"
        );
    }
}

#[tokio::test]
async fn upstream_429_is_passed_on_and_counted_and_held_back_when_asked() {
    let h = Harness::with(Setup {
        credential: "respect_retry_after = true".into(),
        ..Setup::default()
    })
    .await;
    let r = get(&h.url("/workfront/status/429"), &[("x-proxy-key", KEY)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.json()["error_code"],
        "429050",
        "Adobe's own throttling answer is passed on unchanged"
    );
    let seen = h.up().count();
    let held = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    held.assert_refusal(429, "rate_limited");
    assert!(
        held.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(
        h.up().count(),
        seen,
        "held-back requests do not spend the account's quota"
    );
    let metrics = get(&h.admin("/metrics"), &[]).await.text();
    assert!(
        metrics.contains(r#"ims_proxy_upstream_throttled_total{client="etl",route="workfront"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn upstream_429_without_respect_retry_after_holds_nothing_back() {
    let h = Harness::start().await;
    assert_eq!(
        get(&h.url("/workfront/status/429"), &[("x-proxy-key", KEY)])
            .await
            .status,
        429
    );
    assert_eq!(
        get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)])
            .await
            .status,
        200
    );
}

// Held forms up to 16 KiB go on the proxy's own HTTP/1.1 exchange, larger ones
// through hyper's client: both arrive whole, scrubbed, with their length stated.
#[tokio::test]
async fn forms_on_both_sides_of_the_own_exchange_limit_arrive_whole_and_scrubbed() {
    let h = Harness::start().await;
    for size in [
        ims_proxy::h1::MAX_BODY - 64,
        ims_proxy::h1::MAX_BODY + 1,
        200_000,
    ] {
        let name = "x".repeat(size);
        let body = format!("name={name}&apiKey={KEY}&status=CUR");
        let r = post(
            &h.url("/workfront/attask/api/v19.0/proj"),
            &[("content-type", "application/x-www-form-urlencoded")],
            body,
        )
        .await;
        assert_eq!(r.status, 200, "{size}: {}", r.text());
        let seen = h.up().last().unwrap();
        let expected = format!("name={name}&status=CUR");
        assert!(
            seen.body == expected.as_bytes(),
            "{size}: the form arrived changed"
        );
        assert_eq!(seen.headers["content-length"], expected.len().to_string());
    }
}
