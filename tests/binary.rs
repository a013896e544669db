//! The real `ims-proxy` binary as a child process: `check`, `hash-key`, `run`
//! (signals, logs) and `demo`.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use ims_proxy::sim::{SimIms, SimUpstream};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

/// A child process that is killed and reaped however the test ends.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        Proc {
            child: cmd.spawn().expect("spawn ims-proxy"),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits at most `limit` for the exit; kills the child and panics past it.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.exited() {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "ims-proxy (pid {}) did not exit within {limit:?}",
                    self.pid()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Exit status, stdout and stderr of a run that must end within `limit`.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn spawn_reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = r.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// Runs `cmd` to the end with `stdin` fed in, bounded by `limit`.
fn run(cmd: &mut Command, stdin: &[u8], limit: Duration) -> Outcome {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Proc::spawn(cmd);
    let mut input = p.child.stdin.take().unwrap();
    let _ = input.write_all(stdin);
    drop(input);
    let out = spawn_reader(p.child.stdout.take().unwrap());
    let err = spawn_reader(p.child.stderr.take().unwrap());
    let status = p.wait(limit);
    Outcome {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `ims-proxy ARGS...` to the end (10 s at most).
fn ims_proxy(args: &[&str]) -> Outcome {
    run(bin().args(args), b"", Duration::from_secs(10))
}

/// `ims-proxy check --config FILE [extra]` on `text` written to a temp file.
fn check(text: &str, extra: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ims-proxy.toml");
    std::fs::write(&path, text).unwrap();
    let mut args = vec!["check", "--config", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    ims_proxy(&args)
}

/// Static config text for tests that never reach IMS or the upstream.
fn static_config(setup: &Setup) -> String {
    config_text(
        setup,
        "http://127.0.0.1:9/ims/token/v3",
        "http://127.0.0.1:9",
    )
}

/// A loopback port nobody listened on a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `config_text` with fixed listen addresses (the child cannot tell us the real port of `:0`).
fn with_ports(text: &str, listen: SocketAddr, admin: SocketAddr) -> String {
    let t = text.replacen(
        "admin_listen = \"127.0.0.1:0\"",
        &format!("admin_listen = \"{admin}\""),
        1,
    );
    let t = t.replacen(
        "\nlisten = \"127.0.0.1:0\"",
        &format!("\nlisten = \"{listen}\""),
        1,
    );
    assert!(
        t.contains(&format!("\nlisten = \"{listen}\""))
            && t.contains(&format!("admin_listen = \"{admin}\"")),
        "{t}"
    );
    t
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn check_names_the_bad_key() {
    let cases: Vec<(String, &str)> = vec![
        (
            static_config(&Setup::default()).replacen(
                "credential = \"workfront\"",
                "credential = \"fusoin\"",
                1,
            ),
            "routes[0].credential: no credential named \"fusoin\"",
        ),
        (
            static_config(&Setup {
                server: "listn = \"127.0.0.1:1\"".into(),
                ..Setup::default()
            }),
            "listn",
        ),
        (
            static_config(&Setup {
                server: "idle_timeout = \"ten seconds\"".into(),
                ..Setup::default()
            }),
            "server.idle_timeout",
        ),
        (
            static_config(&Setup {
                route: "upstream_timeout = \"5 parsecs\"".into(),
                ..Setup::default()
            }),
            "routes[0].upstream_timeout",
        ),
    ];
    for (text, named) in cases {
        let o = check(&text, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", o.all());
        assert!(
            o.all().contains(named),
            "`{named}` not named in:\n{}",
            o.all()
        );
        assert!(!o.all().contains(SECRET), "{}", o.all());
    }
    // The typo'd key is reported under its section.
    let o = check(
        &static_config(&Setup {
            server: "listn = \"127.0.0.1:1\"".into(),
            ..Setup::default()
        }),
        &[],
    );
    assert!(o.all().contains("server"), "{}", o.all());
}

#[test]
fn check_prints_routes_and_never_the_secret() {
    let o = check(
        &static_config(&Setup {
            server: "workers = 3".into(),
            ..Setup::default()
        }),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", o.all());
    let out = o.all();
    for expected in [
        "valid",
        "(plain HTTP, 3 workers)",
        "routes:",
        "workfront",
        "/workfront",
        "fusion",
        "/fusion",
        "http://127.0.0.1:9",
        "credentials:",
        CLIENT_ID,
        "fusion-client-id",
        "etl",
        "fusion-team",
    ] {
        assert!(out.contains(expected), "`{expected}` missing from:\n{out}");
    }
    for secret in [SECRET, "fusion-secret", KEY, FUSION_KEY] {
        assert!(!out.contains(secret), "`{secret}` printed:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fetch_tokens_reports_ok_and_invalid_client() {
    let ims = SimIms::start().await.expect("sim IMS");
    ims.state().add_client(CLIENT_ID, SECRET);
    ims.state().add_client("fusion-client-id", "fusion-secret");
    let url = ims.token_url();

    let good = config_text(&Setup::default(), &url, "http://127.0.0.1:9");
    let o = tokio::task::spawn_blocking(move || check(&good, &["--fetch-tokens"]))
        .await
        .unwrap();
    let out = o.all();
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("workfront: ok"), "{out}");
    assert!(out.contains("fusion: ok"), "{out}");
    let issued_after_good = ims.state().issued();
    assert!(issued_after_good >= 2, "tokens were really fetched");
    assert!(
        !out.contains(SECRET) && !out.contains("fusion-secret"),
        "{out}"
    );
    assert!(!out.contains("sim-"), "a token was printed:\n{out}");

    let wrong = "p8e-WrongSecretForTheTest";
    let bad = config_text(
        &Setup {
            secrets: Some(vec![wrong.to_string()]),
            ..Setup::default()
        },
        &url,
        "http://127.0.0.1:9",
    );
    let o = tokio::task::spawn_blocking(move || check(&bad, &["--fetch-tokens"]))
        .await
        .unwrap();
    let out = o.all();
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("invalid_client"), "{out}");
    assert!(
        out.contains("fusion: ok"),
        "the other credential is still reported ok:\n{out}"
    );
    assert!(
        !out.contains(wrong) && !out.contains(SECRET) && !out.contains("fusion-secret"),
        "{out}"
    );
    assert!(!out.contains("sim-"), "a token was printed:\n{out}");
}

#[test]
fn hash_key_prints_the_config_line() {
    let o = run(bin().arg("hash-key"), b"test", Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(0), "{}", o.all());
    assert_eq!(
        o.stdout.trim_end(),
        "sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\""
    );

    let o = ims_proxy(&["hash-key", "--generate"]);
    assert_eq!(o.status.code(), Some(0), "{}", o.all());
    let lines: Vec<&str> = o.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "{}", o.stdout);
    let key = lines[0].trim();
    assert!(key.len() >= 32, "weak key: {key}");
    assert_eq!(lines[1], format!("sha256 = \"{}\"", sha(key)));
    // Each run makes a new key.
    let again = ims_proxy(&["hash-key", "--generate"]);
    assert_ne!(again.stdout.lines().next(), Some(key));
}

/// `ims-proxy run` on a config written to a temp dir, stderr captured to a file.
struct Running {
    proc: Proc,
    proxy: SocketAddr,
    admin: SocketAddr,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }
}

/// Starts `ims-proxy run` against the simulators and waits until `/readyz` says 200.
async fn start_run(ims: &SimIms, upstream: &SimUpstream, rust_log: &str) -> Running {
    start_run_with(ims, upstream, rust_log, &[]).await
}

/// Like `start_run`, with global flags (e.g. `--log-format json`) before `run`.
async fn start_run_with(
    ims: &SimIms,
    upstream: &SimUpstream,
    rust_log: &str,
    flags: &[&str],
) -> Running {
    // `free_port` can lose a race with another test's bind: then new ports, a few times.
    for _ in 0..3 {
        match try_start(ims, upstream, rust_log, flags).await {
            Ok(running) => return running,
            Err(stderr) if stderr.contains("Address already in use") => continue,
            Err(stderr) => panic!("ims-proxy run exited early:\n{stderr}"),
        }
    }
    panic!("ims-proxy run found its ports taken three times");
}

/// One start of `ims-proxy run`; its stderr if it exits before it is ready.
async fn try_start(
    ims: &SimIms,
    upstream: &SimUpstream,
    rust_log: &str,
    flags: &[&str],
) -> Result<Running, String> {
    let dir = tempfile::tempdir().unwrap();
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let text = with_ports(
        &config_text(&Setup::default(), &ims.token_url(), &upstream.url()),
        proxy,
        admin,
    );
    let config = dir.path().join("ims-proxy.toml");
    std::fs::write(&config, text).unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let mut cmd = bin();
    cmd.args(flags)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut running = Running {
        proc: Proc::spawn(&mut cmd),
        proxy,
        admin,
        stderr_path,
        _dir: dir,
    };
    wait_ready(&mut running).await?;
    Ok(running)
}

/// Waits until `/readyz` says 200; the stderr if the process exits first.
async fn wait_ready(r: &mut Running) -> Result<(), String> {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(st) = r.proc.exited() {
            return Err(format!("({st}) {}", r.stderr()));
        }
        let req = Request::get(format!("http://{}/readyz", r.admin))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(1), c.request(req)).await {
            if resp.status() == 200 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ims-proxy run never became ready:\n{}", r.stderr());
}

/// Sends SIGTERM and waits (bounded, off the runtime) for the exit.
async fn terminate(r: Running) -> (ExitStatus, String) {
    r.proc.signal("TERM");
    tokio::task::spawn_blocking(move || {
        let mut r = r;
        let st = r.proc.wait(Duration::from_secs(15));
        (st, r.stderr())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let (ims, upstream) = simulators().await;
    let r = start_run(&ims, &upstream, "trace").await;

    let basic = {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("user:{KEY}"))
        )
    };
    let replies = [
        get(
            &r.url("/workfront/attask/api/v19.0/proj/search?fields=name"),
            &[("x-proxy-key", KEY)],
        )
        .await,
        get(
            &r.url(&format!(
                "/workfront/attask/api/v19.0/task/search?apiKey={KEY}&fields=name"
            )),
            &[],
        )
        .await,
        post(
            &r.url("/workfront/attask/api/v19.0/proj"),
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("name=Logged+project&apiKey={KEY}"),
        )
        .await,
        get(
            &r.url("/workfront/attask/api/v19.0/user/search"),
            &[("authorization", &basic)],
        )
        .await,
        get(
            &r.url("/fusion/api/v3/scenarios"),
            &[("authorization", &format!("Bearer {KEY}"))],
        )
        .await,
        get(
            &r.url("/workfront/attask/api/v19.0/proj/search"),
            &[("x-proxy-key", "not-the-key-at-all-1234")],
        )
        .await,
    ];
    let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 401]);

    let (status, log) = terminate(r).await;
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}\n{log}"
    );

    let tokens: Vec<String> = upstream
        .state()
        .requests()
        .iter()
        .filter_map(|s| {
            s.headers
                .get("authorization")?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        tokens.len(),
        5,
        "the upstream saw five requests with tokens"
    );
    assert!(tokens.iter().all(|t| t.starts_with("sim-")), "{tokens:?}");
    assert!(
        log.lines().count() > 10,
        "RUST_LOG=trace logged next to nothing:\n{log}"
    );
    for (what, secret) in [
        ("client secret", SECRET),
        ("fusion client secret", "fusion-secret"),
        ("client key", KEY),
        ("wrong client key", "not-the-key-at-all-1234"),
    ] {
        assert!(!log.contains(secret), "the {what} is in the log:\n{log}");
    }
    for t in &tokens {
        assert!(
            !log.contains(t.as_str()),
            "an IMS token is in the log:\n{log}"
        );
    }
    // Whatever a token looks like, none of the ones IMS issued can be in the log.
    assert!(
        !log.contains("sim-"),
        "something token-like is in the log:\n{log}"
    );
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ims_proxy::access"))
        .collect();
    assert!(
        access.len() >= 6,
        "one access log line per request expected, got:\n{}",
        access.join("\n")
    );
    assert!(
        access
            .iter()
            .any(|l| l.contains("status=200") && l.contains("etl") && l.contains("workfront")),
        "{}",
        access.join("\n")
    );
    assert!(
        access.iter().any(|l| l.contains("status=401")),
        "{}",
        access.join("\n")
    );
    // The access log shows the path without the apiKey value.
    assert!(
        access.iter().any(|l| l.contains("/task/search")),
        "{}",
        access.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let (ims, upstream) = simulators().await;
    let r = start_run(&ims, &upstream, "info").await;
    let slow_url = r.url("/workfront/slow?ms=1000");
    let slow = tokio::spawn(async move { get(&slow_url, &[("x-proxy-key", KEY)]).await });
    // Wait until the request is in flight at the upstream.
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.state().count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let (status, log) = terminate(r).await;
    let reply = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("slow request finished")
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["slow"], true);
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}\n{log}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "exited before the in-flight request could finish"
    );
}

/// Reads the demo's stdout until the banner's last line (bounded).
fn read_banner(stdout: std::process::ChildStdout) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut banner = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                banner.push_str(&line);
                banner.push('\n');
                if line.trim() == "Ctrl-C stops the demo." {
                    return banner;
                }
            }
            Err(e) => panic!("no complete demo banner ({e}); got:\n{banner}"),
        }
    }
}

#[test]
fn demo_prints_commands_that_work() {
    match Command::new("curl").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(st) if st.success() => {}
        other => panic!("this test runs the demo's curl commands and needs curl on PATH (`curl --version`: {other:?})"),
    }
    let proxy = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = bin();
    cmd.args(["demo", "--listen", &proxy, "--admin-listen", &admin])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut demo = Proc::spawn(&mut cmd);
    let banner = read_banner(demo.child.stdout.take().unwrap());
    assert!(banner.contains(&format!("http://{proxy}")), "{banner}");
    assert!(banner.contains(&format!("http://{admin}")), "{banner}");

    let commands: Vec<&str> = banner
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert!(commands.len() >= 5, "too few curl commands:\n{banner}");
    let mut saw_401 = false;
    let mut saw_workfront = 0;
    for c in &commands {
        let o = run(
            Command::new("sh").arg("-c").arg(c),
            b"",
            Duration::from_secs(15),
        );
        assert!(
            o.status.success(),
            "`{c}` failed ({}):\n{}",
            o.status,
            o.all()
        );
        assert!(!o.stdout.trim().is_empty(), "`{c}` printed nothing");
        if c.contains(" -i ") {
            assert!(o.stdout.contains("401"), "`{c}`:\n{}", o.stdout);
            saw_401 = true;
        } else if c.contains("/workfront/") || c.contains("/fusion/") {
            assert!(
                o.stdout.contains("\"authorization\":\"Bearer sim-"),
                "`{c}`:\n{}",
                o.stdout
            );
            assert!(
                c.contains("/fusion/")
                    || o.stdout.contains("\"x-api-key\":\"demo-workfront-client\""),
                "`{c}`:\n{}",
                o.stdout
            );
            saw_workfront += usize::from(c.contains("/workfront/"));
        }
    }
    assert!(saw_401, "no 401 example in:\n{banner}");
    assert!(
        saw_workfront >= 2,
        "expected at least two Workfront examples in:\n{banner}"
    );

    demo.signal("INT");
    let st = demo.wait(Duration::from_secs(15));
    assert!(st.success(), "demo exit status after SIGINT: {st}");
}

#[test]
fn run_without_a_config_fails_with_a_message() {
    let o = ims_proxy(&[
        "run",
        "--config",
        Path::new("/nonexistent/ims-proxy.toml").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", o.all());
    assert!(
        o.stderr.contains("/nonexistent/ims-proxy.toml"),
        "{}",
        o.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let (ims, upstream) = simulators().await;
    let r = start_run_with(&ims, &upstream, "info", &["--log-format", "json"]).await;
    let reply = get(
        &r.url("/workfront/attask/api/v19.0/proj/search?apiKey=zzz"),
        &[("x-proxy-key", KEY)],
    )
    .await;
    assert_eq!(reply.status, 200);
    let (status, stderr) = terminate(r).await;
    assert!(status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let access = lines
        .iter()
        .find(|v| v["target"] == "ims_proxy::access")
        .unwrap_or_else(|| panic!("no access line in {stderr}"));
    assert_eq!(access["client"], "etl");
    assert_eq!(access["route"], "workfront");
    assert_eq!(access["status"], 200);
    assert_eq!(
        access["path"],
        "/workfront/attask/api/v19.0/proj/search?apiKey=[redacted]"
    );
    assert!(access["request_id"]
        .as_str()
        .is_some_and(|id| id.len() == 32));
}

/// GETs `url` and reads the body slowly (a pause every MiB), returning (status, bytes, sha256) or the error.
async fn slow_download(url: String, per_mib: Duration) -> Result<(u16, u64, String), String> {
    use http_body_util::BodyExt;
    use sha2::Digest;
    let req = Request::get(url)
        .header("x-proxy-key", KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let (mut hasher, mut got, mut pause_at) = (sha2::Sha256::new(), 0u64, 1u64 << 20);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("cut after {got} bytes: {e}"))?;
        if let Ok(d) = frame.into_data() {
            got += d.len() as u64;
            hasher.update(&d);
            while got >= pause_at {
                tokio::time::sleep(per_mib).await;
                pause_at += 1 << 20;
            }
        }
    }
    Ok((status, got, hex::encode(hasher.finalize())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_downloads_refuses_newcomers_and_cuts_at_the_grace_limit() {
    let (ims, upstream) = simulators().await;
    // The harness config sets shutdown_grace = "5s".
    let r = start_run(&ims, &upstream, "info").await;
    let n: u64 = 32 << 20;
    // About 2 s of paced reading: still running at SIGTERM, done well within the grace.
    let download = tokio::spawn(slow_download(
        r.url(&format!("/workfront/files/download?bytes={n}")),
        Duration::from_millis(60),
    ));
    let slow_url = r.url("/workfront/slow?ms=1500");
    let slow = tokio::spawn(async move { get(&slow_url, &[("x-proxy-key", KEY)]).await });
    // Longer than the grace: cut.
    let stuck = tokio::spawn(slow_download(
        r.url("/workfront/slow?ms=60000"),
        Duration::ZERO,
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.state().count() < 3 {
        assert!(
            Instant::now() < deadline,
            "requests never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let proxy = r.proxy;
    r.proc.signal("TERM");
    let signalled = Instant::now();

    // New connections are refused (the listener is closed) while the others drain.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::net::TcpStream::connect(proxy).await {
            Err(_) => break,
            Ok(_) => {
                assert!(Instant::now() < deadline, "still accepting after SIGTERM");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    let (status, got, digest) = tokio::time::timeout(Duration::from_secs(10), download)
        .await
        .expect("download finished")
        .unwrap()
        .expect("download intact");
    assert_eq!((status, got), (200, n));
    assert_eq!(digest, ims_proxy::sim::pattern_sha256(n));
    assert_eq!(slow.await.unwrap().status, 200);
    let cut = tokio::time::timeout(Duration::from_secs(10), stuck)
        .await
        .expect("the stuck request ended")
        .unwrap();
    assert!(
        cut.is_err(),
        "the request past the grace limit was not cut: {cut:?}"
    );

    let (status, log) = tokio::task::spawn_blocking(move || {
        let mut r = r;
        let st = r.proc.wait(Duration::from_secs(15));
        (st, r.stderr())
    })
    .await
    .unwrap();
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}\n{log}");
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(9),
        "exited {took:?} after SIGTERM with a 5 s grace"
    );
    let stopped = log
        .lines()
        .find(|l| l.contains("stopped"))
        .unwrap_or_else(|| panic!("no 'stopped' line:\n{log}"));
    assert!(stopped.contains("cut_connections=1"), "{stopped}");
}
