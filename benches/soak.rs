//! Soak: runs the real `ims-proxy` binary against the simulated IMS and
//! upstream for a while with short-lived tokens, reloads (SIGHUP and
//! `POST /reload`, alternating secrets), an IMS outage longer than a token's
//! life, and a revoked-token 401 storm, under steady HTTP/1.1, HTTP/2 and
//! download traffic. First it measures the proxy's memory with 2000 idle
//! keep-alive connections.
//!
//! Run: `cargo bench --bench soak` (5 minutes; `SOAK_SECS=60` for a short run).
//! Exits non-zero if any request failed outside the deliberate outage.

mod common;

use bytes::Bytes;
use common::{mib, status_kib, Ports, Proxy, KEY};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ims_proxy::sim::{ImsState, SimIms, SimUpstream};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const SECRETS: [&str; 2] = ["soak-secret-a", "soak-secret-b"];
/// Token lifetime: a swap every 5 s (refresh at half the life).
const TOKEN_SECS: u64 = 10;
const IDLE_CONNECTIONS: usize = 2000;
const H1_LANES: usize = 12;
const H2_LANES: usize = 4;
const DOWNLOAD_MIB: u64 = 16;

type Empty0 = Empty<Bytes>;

/// A request that did not get its 200.
struct Failure {
    at: Instant,
    what: String,
}

/// What every lane adds to.
#[derive(Default)]
struct Record {
    ok: u64,
    latencies_us: Vec<u32>,
    failures: Vec<Failure>,
    downloads: u64,
}

/// The outage window: from IMS going down until the first 200 after it came back.
#[derive(Default)]
struct Outage {
    started: Option<Instant>,
    recovered: Option<Instant>,
}

impl Outage {
    /// A 503 `token_unavailable` inside the window is the outage doing its job.
    fn excuses(&self, f: &Failure) -> bool {
        let slack = Duration::from_millis(200);
        let inside = match (self.started, self.recovered) {
            (Some(s), Some(r)) => f.at >= s && f.at <= r + slack,
            (Some(s), None) => f.at >= s,
            _ => false,
        };
        inside && f.what.starts_with("503") && f.what.contains("token_unavailable")
    }
}

fn get(addr: SocketAddr, path: &str, absolute: bool) -> Request<Empty0> {
    let uri = if absolute {
        format!("http://{addr}{path}")
    } else {
        path.to_string()
    };
    Request::get(uri)
        .header("host", addr.to_string())
        .header("x-proxy-key", KEY)
        .body(Empty::new())
        .expect("request")
}

enum Conn {
    H1(http1::SendRequest<Empty0>),
    H2(http2::SendRequest<Empty0>),
}

async fn connect(addr: SocketAddr, h2: bool) -> std::io::Result<Conn> {
    let io = TokioIo::new(TcpStream::connect(addr).await?);
    let conn = if h2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Conn::H2(send)
    } else {
        let (send, conn) = http1::handshake(io).await.map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Conn::H1(send)
    };
    Ok(conn)
}

impl Conn {
    async fn get(&mut self, addr: SocketAddr, path: &str) -> Result<(StatusCode, Bytes), String> {
        let resp = match self {
            Conn::H1(s) => {
                s.ready()
                    .await
                    .map_err(|e| format!("connection lost: {e}"))?;
                s.send_request(get(addr, path, false)).await
            }
            Conn::H2(s) => {
                s.ready()
                    .await
                    .map_err(|e| format!("connection lost: {e}"))?;
                s.send_request(get(addr, path, true)).await
            }
        }
        .map_err(|e| format!("transport: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body after {status}: {e}"))?;
        Ok((status, body.to_bytes()))
    }
}

/// One lane of small GETs on one kept-alive connection (reconnecting, and
/// counting a failure, if the connection is lost).
async fn lane(addr: SocketAddr, h2: bool, until: Instant, stop: Arc<AtomicBool>) -> Record {
    let mut rec = Record::default();
    let path = "/wf/attask/api/v19.0/proj/search?fields=name";
    let mut conn = None;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(addr, h2).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    rec.failures.push(Failure {
                        at: Instant::now(),
                        what: format!("connect: {e}"),
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        match c.get(addr, path).await {
            Ok((StatusCode::OK, _)) => {
                rec.ok += 1;
                let us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                rec.latencies_us.push(us);
            }
            Ok((status, body)) => rec.failures.push(Failure {
                at: started,
                what: format!("{} {}", status.as_u16(), String::from_utf8_lossy(&body)),
            }),
            Err(e) => {
                conn = None;
                rec.failures.push(Failure {
                    at: started,
                    what: e,
                });
            }
        }
    }
    rec
}

/// Repeated large downloads, each checked for length.
async fn download_lane(addr: SocketAddr, until: Instant) -> Record {
    let mut rec = Record::default();
    let client: Client<_, Empty0> = Client::builder(TokioExecutor::new()).build_http();
    let n = DOWNLOAD_MIB << 20;
    while Instant::now() < until {
        let started = Instant::now();
        let req = get(addr, &format!("/wf/files/download?bytes={n}"), true);
        let outcome = match client.request(req).await {
            Err(e) => Err(format!("transport: {e}")),
            Ok(resp) if resp.status() != StatusCode::OK => {
                let status = resp.status();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                Err(format!(
                    "{} {}",
                    status.as_u16(),
                    body.map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                ))
            }
            Ok(resp) => {
                let mut body = resp.into_body();
                let mut got = 0u64;
                let mut err = None;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => got += f.data_ref().map_or(0, |d| d.len() as u64),
                        Err(e) => {
                            err = Some(format!("body after {got} bytes: {e}"));
                            break;
                        }
                    }
                }
                match err {
                    Some(e) => Err(e),
                    None if got != n => Err(format!("download truncated at {got} of {n}")),
                    None => Ok(()),
                }
            }
        };
        match outcome {
            Ok(()) => rec.downloads += 1,
            Err(what) => rec.failures.push(Failure { at: started, what }),
        }
    }
    rec
}

/// Opens `n` HTTP/1.1 connections, one request each, and keeps them open.
async fn idle_connections(addr: SocketAddr, n: usize) -> Vec<Conn> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = connect(addr, false).await.expect("connect");
        let (status, _) = c.get(addr, "/wf/ping").await.expect("request");
        assert_eq!(status, StatusCode::OK);
        conns.push(c);
    }
    conns
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Reloads once: rewrites the config with the other secret and a new route
/// header, then sends SIGHUP (even rounds) or `POST /reload` (odd rounds).
async fn reload(
    round: usize,
    proxy: &Proxy,
    ports: Ports,
    ims: &SimIms,
    upstream: &SimUpstream,
    path: &std::path::Path,
) -> bool {
    let header = format!("headers = {{ \"x-soak-reload\" = \"{round}\" }}");
    let text = common::config(
        ports,
        &ims.token_url(),
        &upstream.url(),
        SECRETS[round % 2],
        &header,
    );
    std::fs::write(path, text).expect("write config");
    let admin = format!("http://127.0.0.1:{}", ports.admin);
    let client: Client<_, Empty0> = Client::builder(TokioExecutor::new()).build_http();
    if round % 2 == 0 {
        let before = reload_count(&client, &admin).await;
        let _ = std::process::Command::new("kill")
            .args(["-HUP", &proxy.pid().to_string()])
            .status();
        // SIGHUP answers nobody: watch the reload counters instead (bounded).
        for _ in 0..150 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = reload_count(&client, &admin).await;
            if now.0 > before.0 {
                return true;
            }
            if now.1 > before.1 {
                return false;
            }
        }
        false
    } else {
        let req = Request::post(format!("{admin}/reload"))
            .body(Empty::new())
            .expect("request");
        matches!(client.request(req).await, Ok(r) if r.status() == 200)
    }
}

/// (ok, error) reload counts from /metrics.
async fn reload_count(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty0>,
    admin: &str,
) -> (f64, f64) {
    let req = Request::get(format!("{admin}/metrics"))
        .body(Empty::new())
        .expect("request");
    let Ok(resp) = client.request(req).await else {
        return (0.0, 0.0);
    };
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let value = |result: &str| {
        let series = format!("ims_proxy_config_reloads_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (value("ok"), value("error"))
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn admin_text(ports: Ports, path: &str) -> String {
    let client: Client<_, Empty0> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("http://127.0.0.1:{}{path}", ports.admin))
        .body(Empty::new())
        .expect("request");
    match client.request(req).await {
        Ok(r) => {
            let b = r.into_body().collect().await.map(|b| b.to_bytes());
            String::from_utf8_lossy(&b.unwrap_or_default()).into_owned()
        }
        Err(e) => format!("unreachable: {e}"),
    }
}

fn sim_ims_clients(state: &ImsState) {
    for s in SECRETS {
        state.add_client("bench-client", s);
    }
    state.set_expires_in(TOKEN_SECS);
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
        .max(30);
    let total = Duration::from_secs(secs);
    let ims = SimIms::start().await.expect("sim IMS");
    sim_ims_clients(&ims.state());
    // The upstream checks every token against the simulated IMS.
    let upstream = SimUpstream::start(Some(ims.state()))
        .await
        .expect("sim upstream");
    let ports = Ports::pick();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("soak.toml");
    let text = common::config(ports, &ims.token_url(), &upstream.url(), SECRETS[1], "");
    std::fs::write(&config, text).expect("write config");
    let proxy = Proxy::spawn(&config);
    let pid = proxy.pid();
    proxy.wait_ready(ports).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], ports.proxy));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = status_kib(pid, "VmRSS:");

    // Memory with many idle keep-alive connections.
    let conns = idle_connections(addr, IDLE_CONNECTIONS).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conns_rss = status_kib(pid, "VmRSS:");
    drop(conns);
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "soak: {secs} s, {H1_LANES} HTTP/1.1 lanes + {H2_LANES} HTTP/2 streams + 1 download lane; \
         {TOKEN_SECS} s tokens; reload every 15 s; IMS outage at 40 %; token revocation at 70 %"
    );
    let started = Instant::now();
    let until = started + total;
    let stop = Arc::new(AtomicBool::new(false));
    let mut lanes = tokio::task::JoinSet::new();
    for i in 0..H1_LANES + H2_LANES {
        lanes.spawn(lane(addr, i >= H1_LANES, until, Arc::clone(&stop)));
    }
    lanes.spawn(download_lane(addr, until));

    let issued_before = ims.state().issued();
    let outage = Arc::new(Mutex::new(Outage::default()));
    let outage_at = started + total.mul_f64(0.4);
    let outage_len = Duration::from_secs(25).min(total / 5);
    let revoke_at = started + total.mul_f64(0.7);
    let (mut reloads_ok, mut reloads_refused, mut reloads_failed_outside) = (0, 0, 0);
    let (mut round, mut next_reload) = (0usize, started + Duration::from_secs(15));
    let (mut outage_done, mut revoked, mut storm_calls) = (false, false, 0usize);
    let mut peak_rss = 0u64;
    let client: Client<_, Empty0> = Client::builder(TokioExecutor::new()).build_http();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_rss = peak_rss.max(status_kib(pid, "VmRSS:"));
        let now = Instant::now();
        if !outage_done && now >= outage_at {
            let began = outage.lock().expect("outage").started;
            match began {
                None => {
                    outage.lock().expect("outage").started = Some(now);
                    ims.state().set_down(true);
                    println!("  {:>5.1} s: IMS down", (now - started).as_secs_f64());
                }
                Some(_) if now >= outage_at + outage_len => {
                    ims.state().set_down(false);
                    println!("  {:>5.1} s: IMS back", (now - started).as_secs_f64());
                    // The window closes at the first request served after IMS returned (bounded by the backoff cap).
                    let deadline = Instant::now() + Duration::from_secs(70);
                    while Instant::now() < deadline {
                        let req = get(addr, "/wf/ping", true);
                        if matches!(client.request(req).await, Ok(r) if r.status() == 200) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let back = Instant::now();
                    outage.lock().expect("outage").recovered = Some(back);
                    println!(
                        "  {:>5.1} s: serving again ({:.1} s after IMS returned)",
                        (back - started).as_secs_f64(),
                        (back - now).as_secs_f64()
                    );
                    outage_done = true;
                }
                Some(_) => {}
            }
        }
        if !revoked && now >= revoke_at {
            revoked = true;
            let calls = ims.state().calls();
            ims.state().revoke_all_tokens();
            tokio::time::sleep(Duration::from_secs(1)).await;
            storm_calls = ims.state().calls() - calls;
            println!(
                "  {:>5.1} s: every token revoked at IMS; {storm_calls} IMS call(s) in the next second",
                (now - started).as_secs_f64()
            );
        }
        if now >= next_reload && now + Duration::from_secs(2) < until {
            next_reload += Duration::from_secs(15);
            let during_outage = {
                let o = outage.lock().expect("outage");
                o.started.is_some() && o.recovered.is_none()
            };
            let ok = reload(round, &proxy, ports, &ims, &upstream, &config).await;
            round += 1;
            match (ok, during_outage) {
                (true, _) => reloads_ok += 1,
                (false, true) => reloads_refused += 1,
                (false, false) => reloads_failed_outside += 1,
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Record::default();
    while let Some(r) = lanes.join_next().await {
        let r = r.expect("lane");
        all.ok += r.ok;
        all.downloads += r.downloads;
        all.latencies_us.extend(r.latencies_us);
        all.failures.extend(r.failures);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let end_rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");
    let metrics = admin_text(ports, "/metrics").await;
    let o = outage.lock().expect("outage");
    let (excused, unexcused): (Vec<_>, Vec<_>) = all.failures.iter().partition(|f| o.excuses(f));
    all.latencies_us.sort_unstable();
    let swaps = ims.state().issued() - issued_before;

    println!("\n| figure | value |\n|---|---|");
    println!("| run | {elapsed:.0} s |");
    println!(
        "| requests served (small GETs) | {} ({:.0}/s) |",
        all.ok,
        all.ok as f64 / elapsed
    );
    println!(
        "| {DOWNLOAD_MIB} MiB downloads intact | {} |",
        all.downloads
    );
    println!("| failures outside the outage | {} |", unexcused.len());
    println!(
        "| 503 token_unavailable during the outage (deliberate) | {} |",
        excused.len()
    );
    println!(
        "| latency p50 / p99 / max (ms) | {:.2} / {:.2} / {:.1} |",
        percentile(&all.latencies_us, 0.5),
        percentile(&all.latencies_us, 0.99),
        percentile(&all.latencies_us, 1.0)
    );
    println!("| token swaps (tokens issued) | {swaps} |");
    println!(
        "| forced refreshes (401 storm) | {} (IMS calls in the storm's second: {storm_calls}) |",
        metric(
            &metrics,
            r#"ims_proxy_token_forced_refreshes_total{credential="wf"}"#
        )
    );
    println!(
        "| reloads ok / refused during outage / failed otherwise | {reloads_ok} / {reloads_refused} / {reloads_failed_outside} |"
    );
    println!("| RSS idle | {:.1} MiB |", mib(idle_rss));
    println!(
        "| RSS with {IDLE_CONNECTIONS} idle keep-alive connections | {:.1} MiB ({:.1} KiB per connection) |",
        mib(conns_rss),
        conns_rss.saturating_sub(idle_rss) as f64 / IDLE_CONNECTIONS as f64
    );
    println!(
        "| RSS peak during soak / at end / high-water mark | {:.1} / {:.1} / {:.1} MiB |",
        mib(peak_rss),
        mib(end_rss),
        mib(hwm)
    );
    for f in unexcused.iter().take(10) {
        println!(
            "  failure at {:.1} s: {}",
            (f.at - started).as_secs_f64(),
            f.what
        );
    }
    let failed = !unexcused.is_empty() || reloads_failed_outside > 0;
    // exit() skips destructors: stop the proxy child first.
    drop(proxy);
    if failed {
        std::process::exit(1);
    }
}
