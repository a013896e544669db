//! Secrets never leave: a full session of the real binary at `RUST_LOG=trace`
//! (keys in every place a client may put them, HTTP/1 and h2c, a forced token
//! refresh, reloads good and bad, `/tokens`, `/metrics`, the audit log, and
//! `check --fetch-tokens`), then every byte it wrote or answered is searched for
//! every client secret, client key and token.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use ims_proxy::sim::{SimIms, SimUpstream};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// A legacy Workfront session id a client might still send.
const SESSION: &str = "SESSION-9f8e7d6c5b4a-secret";
/// A wrong client key: it must not be logged either.
const WRONG_KEY: &str = "wrong-key-0000-aaaa-bbbb-cccc";
/// A wrong client secret tried in a refused reload.
const WRONG_SECRET: &str = "p8e-WrongSecretTriedInAReload";

/// The binary at trace level, colours off.
fn traced() -> Command {
    let mut c = support::bin();
    c.env("RUST_LOG", "trace").env("NO_COLOR", "1");
    c
}

/// Kills and reaps the child however the test ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Two distinct free loopback addresses: both are held at once, so they cannot be the same port.
fn free_addrs() -> (SocketAddr, SocketAddr) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap(), b.local_addr().unwrap())
}

fn config(
    setup: &Setup,
    ims: &SimIms,
    up: &SimUpstream,
    proxy: SocketAddr,
    admin: SocketAddr,
) -> String {
    config_text(setup, &ims.token_url(), &up.url())
        .replacen(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"{admin}\""),
            1,
        )
        .replacen(
            "\nlisten = \"127.0.0.1:0\"",
            &format!("\nlisten = \"{proxy}\""),
            1,
        )
}

async fn wait_ready(admin: SocketAddr, child: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "ims-proxy exited early"
        );
        let req = Request::get(format!("http://{admin}/readyz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), client().request(req)).await
        {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ims-proxy never became ready");
}

fn signal(child: &Proc, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

/// Every 12-character window of `token`: a token cut short still counts as leaked.
fn windows(token: &str) -> Vec<&str> {
    (0..=token.len().saturating_sub(12))
        .map(|i| &token[i..(i + 12).min(token.len())])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_key_or_token_appears_anywhere_in_a_trace_level_session() {
    let (ims, up) = simulators().await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = free_addrs();
    let audit = dir.path().join("audit.jsonl");
    let setup = Setup {
        server: format!("audit_log = {:?}", audit.display().to_string()),
        ..Setup::default()
    };
    let path = dir.path().join("ims-proxy.toml");
    let good = config(&setup, &ims, &up, proxy, admin);
    std::fs::write(&path, &good).unwrap();
    let (stderr_path, stdout_path) = (dir.path().join("stderr"), dir.path().join("stdout"));
    let mut child = Proc(
        traced()
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_ready(admin, &mut child).await;

    let url = |p: &str| format!("http://{proxy}{p}");
    let basic = {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("user:{KEY}"))
        )
    };
    let bearer = format!("Bearer {KEY}");
    let form = "application/x-www-form-urlencoded";
    let answers = std::cell::RefCell::new(Vec::new());
    let expect = |r: Reply, status: u16, what: &str| {
        assert_eq!(r.status, status, "{what}: {}", r.text());
        // A 200 body is the simulated upstream's echo of what it received (the token
        // included, by design); the proxy's own refusals and every header are checked.
        let body = if r.status == 200 {
            String::new()
        } else {
            r.text()
        };
        answers
            .borrow_mut()
            .push(format!("{:?}\n{body}", r.headers));
    };
    let p = "/workfront/attask/api/v19.0/proj/search";
    expect(
        get(&url(p), &[("x-proxy-key", KEY)]).await,
        200,
        "x-proxy-key",
    );
    expect(get(&url(p), &[("x-api-key", KEY)]).await, 200, "x-api-key");
    expect(
        get(&url(p), &[("authorization", &bearer)]).await,
        200,
        "bearer",
    );
    expect(
        get(&url(p), &[("authorization", &basic)]).await,
        200,
        "basic",
    );
    expect(
        get(&url(&format!("{p}?apiKey={KEY}&sessionID={SESSION}")), &[]).await,
        200,
        "query",
    );
    expect(
        post(
            &url("/workfront/attask/api/v19.0/proj"),
            &[("content-type", form), ("sessionid", SESSION)],
            format!("name=P&apiKey={KEY}&sessionID={SESSION}"),
        )
        .await,
        200,
        "form",
    );
    expect(
        get(&url(p), &[("x-proxy-key", WRONG_KEY)]).await,
        401,
        "wrong key",
    );
    expect(
        get(&url(&format!("{p}?apiKey={WRONG_KEY}")), &[]).await,
        401,
        "wrong query key",
    );
    expect(
        get(&url(p), &[("x-proxy-key", FUSION_KEY)]).await,
        403,
        "other route",
    );
    expect(
        get(
            &url("/fusion/api/v3/scenarios"),
            &[("x-proxy-key", FUSION_KEY)],
        )
        .await,
        200,
        "fusion",
    );
    // HTTP/2 (h2c): hpack and frame tracing must not show the key either.
    let h2 = send(
        &h2_client(),
        Request::get(url(p))
            .header("authorization", &bearer)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    expect(h2, 200, "h2c");
    // An upstream 401 forces a refresh: a second token is issued and the request replayed.
    up.state().reject_next(1);
    expect(
        get(&url(p), &[("x-proxy-key", KEY)]).await,
        200,
        "forced refresh",
    );

    // Reloads: SIGHUP, POST /reload, and one with a wrong secret that IMS refuses.
    signal(&child, "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ok = post(&format!("http://{admin}/reload"), &[], Bytes::new()).await;
    assert_eq!(ok.json()["result"], "ok", "{}", ok.text());
    answers.borrow_mut().push(ok.text());
    let bad_setup = Setup {
        secrets: Some(vec![WRONG_SECRET.to_string()]),
        ..setup.clone()
    };
    std::fs::write(&path, config(&bad_setup, &ims, &up, proxy, admin)).unwrap();
    let refused = post(&format!("http://{admin}/reload"), &[], Bytes::new()).await;
    assert_eq!(refused.json()["result"], "error", "{}", refused.text());
    answers.borrow_mut().push(refused.text());
    std::fs::write(&path, &good).unwrap();
    for p in ["/tokens", "/metrics", "/readyz", "/healthz"] {
        let r = get(&format!("http://{admin}{p}"), &[]).await;
        assert_eq!(r.status, 200, "{p}");
        answers.borrow_mut().push(r.text());
    }
    expect(
        get(&url(p), &[("x-proxy-key", KEY)]).await,
        200,
        "after reloads",
    );

    signal(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // `check --fetch-tokens` at trace level, with the good and the wrong secret.
    let mut check_out = String::new();
    for text in [&good, &config(&bad_setup, &ims, &up, proxy, admin)] {
        let f = dir.path().join("check.toml");
        std::fs::write(&f, text).unwrap();
        let out = traced()
            .args(["check", "--config"])
            .arg(&f)
            .arg("--fetch-tokens")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        check_out.push_str(&String::from_utf8_lossy(&out.stdout));
        check_out.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(check_out.contains("ok"), "{check_out}");

    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let audit_text = std::fs::read_to_string(&audit).unwrap();
    assert!(
        stderr.lines().count() > 100,
        "trace logged next to nothing:\n{stderr}"
    );
    assert!(stderr.contains("TRACE"), "not a trace-level log");
    // The libraries that see raw bytes logged at trace too: their lines were searched.
    for target in ["hyper", "h2::", "reqwest"] {
        assert!(
            stderr.contains(target),
            "no {target} lines in the trace log"
        );
    }
    assert!(audit_text.lines().count() >= 10, "{audit_text}");

    let tokens: Vec<String> = up
        .state()
        .requests()
        .iter()
        .filter_map(|s| {
            let v = s.headers.get("authorization")?.to_str().ok()?;
            v.strip_prefix("Bearer ").map(str::to_owned)
        })
        .collect();
    let distinct: std::collections::HashSet<&String> = tokens.iter().collect();
    assert!(
        distinct.len() >= 3,
        "the session used too few tokens: {tokens:?}"
    );

    let places = [
        ("stderr (trace log)", stderr.as_str()),
        ("stdout", stdout.as_str()),
        ("audit log", audit_text.as_str()),
        ("check output", check_out.as_str()),
        (
            "responses, /tokens, /metrics, /reload",
            &answers.borrow().join("\n"),
        ),
    ];
    let mut secrets = vec![
        ("client secret", SECRET.to_string()),
        ("fusion client secret", "fusion-secret".to_string()),
        ("wrong client secret", WRONG_SECRET.to_string()),
        ("client key", KEY.to_string()),
        ("fusion client key", FUSION_KEY.to_string()),
        ("wrong client key", WRONG_KEY.to_string()),
        ("session id", SESSION.to_string()),
        (
            "basic credentials",
            basic.trim_start_matches("Basic ").to_string(),
        ),
    ];
    for t in &distinct {
        for w in windows(t) {
            secrets.push(("a piece of an IMS token", w.to_string()));
        }
    }
    for (place, text) in places {
        // Any IMS-issued token, whole or as a prefix.
        assert!(!text.contains("sim-"), "something token-like in {place}");
        for (what, s) in &secrets {
            if let Some(at) = text.find(s.as_str()) {
                let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let to = text[at..].find('\n').map_or(text.len(), |i| at + i);
                panic!("{what} found in {place}: {}", &text[from..to]);
            }
        }
    }
}

/// A panic or error that formats the configuration shows no secret either.
#[test]
fn debug_formatting_the_configuration_shows_no_secret() {
    let text = config_text(
        &Setup::default(),
        "http://127.0.0.1:1/ims",
        "http://127.0.0.1:2",
    );
    let config =
        ims_proxy::config::Config::parse(&text, Path::new("."), &std::collections::HashMap::new())
            .unwrap();
    let shown = format!("{config:?} {config:#?}");
    assert!(shown.contains("workfront"), "{shown}");
    for s in [SECRET, "fusion-secret"] {
        assert!(!shown.contains(s), "{s} in {shown}");
    }
}
