//! Streams 1 GiB up and 1 GiB down through the real `ims-proxy` binary and
//! prints throughput against the direct path (same run) and the proxy's peak
//! RSS. Run: `cargo bench --bench stream_rss` (IMS_PROXY_BENCH_MIB overrides the size).

use bytes::Bytes;
use futures_util::StreamExt;
use http::Request;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ims_proxy::sim::{SimIms, SimUpstream};
use std::time::Instant;

mod common;
use common::{status_kib, Ports, Proxy, KEY};

type Body = BoxBody<Bytes, std::io::Error>;
const CHUNK: usize = 256 * 1024;

fn upload_body(bytes: u64) -> Body {
    let chunk = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let chunks = bytes / CHUNK as u64;
    let stream = futures_util::stream::iter(0..chunks)
        .map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone())));
    BodyExt::boxed(StreamBody::new(stream))
}

async fn download(client: &Client<HttpConnector, Body>, url: &str, bytes: u64) -> f64 {
    let started = Instant::now();
    let req = Request::get(format!("{url}/download?bytes={bytes}"))
        .header("x-proxy-key", KEY)
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .expect("request");
    let resp = client.request(req).await.expect("download");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.expect("frame").into_data() {
            got += d.len() as u64;
        }
    }
    assert_eq!(got, bytes, "download truncated");
    got as f64 / started.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

async fn upload(client: &Client<HttpConnector, Body>, url: &str, bytes: u64) -> f64 {
    let started = Instant::now();
    let req = Request::post(format!("{url}/upload"))
        .header("x-proxy-key", KEY)
        .header("content-type", "application/octet-stream")
        .body(upload_body(bytes))
        .expect("request");
    let resp = client.request(req).await.expect("upload");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["bytes"].as_u64(), Some(bytes), "upload truncated");
    bytes as f64 / started.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("IMS_PROXY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bytes = mib << 20;
    let ims = SimIms::start().await.expect("sim IMS");
    ims.state().add_client("bench-client", "bench-secret");
    // The direct path has no proxy to check tokens: the upstream simulator checks none.
    let upstream = SimUpstream::start(None).await.expect("sim upstream");
    let ports = Ports::pick();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bench.toml");
    let text = common::config(ports, &ims.token_url(), &upstream.url(), "bench-secret", "");
    std::fs::write(&config, text).expect("write config");
    let proxy = Proxy::spawn(&config);
    let pid = proxy.pid();
    proxy.wait_ready(ports).await;
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let idle_rss = status_kib(pid, "VmRSS:");
    let direct = upstream.url();
    let via = format!("http://127.0.0.1:{}/wf", ports.proxy);
    println!("streaming {mib} MiB each way; direct runs alternate with proxied runs\n");
    let (mut d_down, mut p_down, mut d_up, mut p_up) = (vec![], vec![], vec![], vec![]);
    for _ in 0..2 {
        d_down.push(download(&client, &direct, bytes).await);
        p_down.push(download(&client, &via, bytes).await);
        d_up.push(upload(&client, &direct, bytes).await);
        p_up.push(upload(&client, &via, bytes).await);
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let peak = status_kib(pid, "VmHWM:");
    println!("| direction | direct GiB/s | via ims-proxy GiB/s | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| download | {:.2} | {:.2} | {:.2} |",
        best(&d_down),
        best(&p_down),
        best(&p_down) / best(&d_down)
    );
    println!(
        "| upload   | {:.2} | {:.2} | {:.2} |",
        best(&d_up),
        best(&p_up),
        best(&p_up) / best(&d_up)
    );
    println!(
        "\nims-proxy RSS: idle {:.1} MiB, peak {:.1} MiB after {} GiB through it",
        common::mib(idle_rss),
        common::mib(peak),
        (4 * bytes) as f64 / (1u64 << 30) as f64
    );
}
