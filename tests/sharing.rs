//! One technical account shared by many teams: the `max_in_flight` queue is
//! fair across keys and never exceeded, per-key rate limits are accurate and
//! survive reloads, upstream 429s hold the credential back (seconds or
//! HTTP-date), and the audit log is reopened on reload for logrotate.

mod support;

use bytes::Bytes;
use std::time::Duration;
use support::*;
use tokio::time::Instant;

/// A second team's key on the workfront route.
const OPS_KEY: &str = "ops-team-key-5555555555";

fn ops_key() -> String {
    format!(
        "[[access.keys]]\nname = \"ops\"\nsha256 = \"{}\"\n",
        sha(OPS_KEY)
    )
}

async fn queued(h: &Harness) -> f64 {
    metric(
        &metrics_text(h).await,
        r#"ims_proxy_queued_requests{credential="workfront"}"#,
    )
    .expect("queue gauge exported")
}

/// Polls until the workfront queue holds at least `n` requests (bounded).
async fn wait_queued(h: &Harness, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while queued(h).await < n {
        assert!(Instant::now() < deadline, "the queue never reached {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keys_burst_does_not_starve_another_keys_request() {
    let h = Harness::with(Setup {
        credential: "max_in_flight = 2\nqueue_timeout = \"30s\"".into(),
        access: ops_key(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    // The etl team floods: 2 in flight, 38 waiting, 100 ms each (about 2 s of queue).
    let flood: Vec<_> = (0..40)
        .map(|_| spawn_get(&h, "/workfront/slow?ms=100", KEY))
        .collect();
    wait_queued(&h, 30.0).await;

    // The ops team's single request goes next, not behind the whole burst.
    let started = Instant::now();
    let r = get(
        &h.url("/workfront/slow?ms=100"),
        &[("x-proxy-key", OPS_KEY)],
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let still_queued = queued(&h).await;
    assert!(
        waited < Duration::from_millis(700),
        "the single request waited {waited:?} behind another key's burst"
    );
    assert!(
        still_queued >= 20.0,
        "the burst had drained ({still_queued} left), so the test shows nothing"
    );

    for t in flood {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(h.up().max_concurrent() <= 2, "{}", h.up().max_concurrent());
    assert_eq!(queued(&h).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_holds_for_streams_and_queues_from_two_keys() {
    let h = Harness::with(Setup {
        credential: "max_in_flight = 3\nqueue_timeout = \"30s\"".into(),
        access: ops_key(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let key = if i % 3 == 0 { OPS_KEY } else { KEY };
        let path = match i % 4 {
            0 => "/workfront/files/download?bytes=4194304",
            1 => "/workfront/slow?ms=80",
            _ => "/workfront/attask/api/v19.0/proj/search",
        };
        tasks.push(spawn_get(&h, path, key));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(h.up().count(), 24);
    let most = h.up().max_concurrent();
    assert!(
        (2..=3).contains(&most),
        "max_in_flight = 3, upstream saw {most} at once"
    );
    assert_eq!(queued(&h).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_admits_burst_plus_rate_over_seconds() {
    let h = Harness::with(Setup {
        key: "rate_per_second = 20\nburst = 5".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let client = client();
    let (mut ok, mut limited) = (0u32, 0u32);
    let started = Instant::now();
    let run = Duration::from_secs(3);
    while started.elapsed() < run {
        let req = http::Request::get(h.url("/workfront/attask/api/v19.0/proj/search"))
            .header("x-proxy-key", KEY)
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let r = send(&client, req).await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                r.assert_refusal(429, "rate_limited");
                let secs: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert_eq!(secs, 1, "20/s refills a token well within a second");
                limited += 1;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // burst + rate × time, give or take one request at either end.
    let expected = 5.0 + 20.0 * elapsed;
    assert!(
        (f64::from(ok) - expected).abs() <= 3.0,
        "{ok} admitted in {elapsed:.2} s, expected about {expected:.0}"
    );
    assert!(
        limited > 50,
        "only {limited} refused: the limiter was not pushed"
    );
    assert_eq!(
        metric(
            &metrics_text(&h).await,
            r#"ims_proxy_auth_failures_total{reason="rate_limited"}"#
        ),
        Some(f64::from(limited))
    );
}

#[tokio::test]
async fn retry_after_of_a_rate_limit_tells_the_truth() {
    let h = Harness::with(Setup {
        key: "rate_per_second = 0.5\nburst = 1".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let url = h.url("/workfront/attask/api/v19.0/proj/search");
    assert_eq!(get(&url, &[("x-proxy-key", KEY)]).await.status, 200);
    let r = get(&url, &[("x-proxy-key", KEY)]).await;
    r.assert_refusal(429, "rate_limited");
    let secs: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(secs, 2, "one token every 2 s");
    // Asking early is still refused; asking when told succeeds.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(get(&url, &[("x-proxy-key", KEY)]).await.status, 429);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&url, &[("x-proxy-key", KEY)]).await.status, 200);
}

#[tokio::test]
async fn reload_changes_one_keys_limit_without_refilling_the_others() {
    let limits = |ops_rate: &str| Setup {
        key: "rate_per_second = 0.1\nburst = 2".into(),
        access: format!("{}rate_per_second = {ops_rate}\nburst = 2\n", ops_key()),
        ..Setup::default()
    };
    let h = Harness::with_file(limits("0.1")).await;
    h.ready().await;
    let url = h.url("/workfront/attask/api/v19.0/proj/search");
    for key in [KEY, OPS_KEY] {
        for _ in 0..2 {
            assert_eq!(get(&url, &[("x-proxy-key", key)]).await.status, 200);
        }
        assert_eq!(get(&url, &[("x-proxy-key", key)]).await.status, 429);
    }
    h.write_config(&limits("100"));
    let r = post(&h.admin("/reload"), &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // etl's limit is unchanged: its empty bucket stays empty.
    get(&url, &[("x-proxy-key", KEY)])
        .await
        .assert_refusal(429, "rate_limited");
    // ops got a new limit: it starts with a full new bucket.
    for _ in 0..2 {
        assert_eq!(get(&url, &[("x-proxy-key", OPS_KEY)]).await.status, 200);
    }
}

#[tokio::test]
async fn upstream_429_with_an_http_date_holds_the_credential_back_until_then() {
    let h = Harness::with(Setup {
        credential: "respect_retry_after = true".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let until = std::time::SystemTime::now() + Duration::from_secs(3);
    let date = httpdate::fmt_http_date(until).replace(' ', "%20");
    let r = get(
        &h.url(&format!("/workfront/status/429?retry_after={date}")),
        &[("x-proxy-key", KEY)],
    )
    .await;
    // Adobe's answer reaches the client unchanged.
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error_code"], "429050");
    let sent = h.up().count();

    let url = h.url("/workfront/attask/api/v19.0/proj/search");
    let held = get(&url, &[("x-proxy-key", KEY)]).await;
    held.assert_refusal(429, "rate_limited");
    let secs: u64 = held.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&secs), "Retry-After {secs}");
    assert_eq!(h.up().count(), sent, "a held-back request reached Adobe");
    // The other credential is not held back.
    assert_eq!(
        get(
            &h.url("/fusion/api/v2/scenarios"),
            &[("x-proxy-key", FUSION_KEY)]
        )
        .await
        .status,
        200
    );

    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let r = get(&url, &[("x-proxy-key", KEY)]).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still held back: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        std::time::SystemTime::now() + Duration::from_millis(1100) >= until,
        "released well before the date"
    );
}

#[tokio::test]
async fn audit_log_is_reopened_on_reload_for_logrotate() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let h = Harness::with_file(Setup {
        server: format!("audit_log = \"{}\"", log.display()),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let url = h.url("/workfront/attask/api/v19.0/proj/search");
    assert_eq!(get(&url, &[("x-proxy-key", KEY)]).await.status, 200);
    let lines_in = |path: &std::path::Path, want: usize| {
        let path = path.to_path_buf();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if text.lines().count() >= want || Instant::now() > deadline {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(lines_in(&log, 1).await.lines().count(), 1);

    // logrotate: move the file away, then signal (SIGHUP and POST /reload share the path).
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    let r = post(&h.admin("/reload"), &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..2 {
        assert_eq!(get(&url, &[("x-proxy-key", KEY)]).await.status, 200);
    }
    let fresh = lines_in(&log, 2).await;
    assert_eq!(fresh.lines().count(), 2, "new lines go to the new file");
    for line in fresh.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(v["client"], "etl", "{v}");
        assert_eq!(v["route"], "workfront", "{v}");
        assert_eq!(v["credential"], "workfront", "{v}");
        assert!(
            v["token_fingerprint"]
                .as_str()
                .is_some_and(|f| f.len() == 8),
            "{v}"
        );
        for secret in [KEY, SECRET] {
            assert!(!line.contains(secret), "a secret in the audit log");
        }
    }
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        1,
        "the rotated file kept its line and got no new ones"
    );
}
