//! What fair sharing costs when it is not limiting: a key's token bucket, a
//! `max_in_flight` slot taken and handed back, and whole requests through the
//! real server with and without both (limits set far above the load), measured
//! side by side in one run.
//!
//! Run: `cargo bench --bench limiter` (add `-- --quick` for short runs).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ims_proxy::access::{digest_hex, Access};
use ims_proxy::config::Config;
use ims_proxy::server::{self, ServerHandle};
use ims_proxy::sim::{SimIms, SimUpstream};
use ims_proxy::slots::Slots;
use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const KEY: &str = "limiter-bench-key-0123";

fn config(ims: &str, upstream: &str, limited: bool) -> String {
    let (cred, key) = if limited {
        (
            "max_in_flight = 10000\nqueue_timeout = \"5s\"\n",
            "rate_per_second = 1000000\nburst = 1000000\n",
        )
    } else {
        ("", "")
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [ims]\ntoken_url = \"{ims}\"\n\
         [credentials.wf]\nclient_id = \"bench-client\"\nclient_secret = \"bench-secret\"\nscopes = [\"openid\"]\n{cred}\
         [[routes]]\nname = \"wf\"\nprefix = \"/wf\"\nupstream = \"{upstream}\"\ncredential = \"wf\"\n\
         [[access.keys]]\nname = \"bench\"\nsha256 = \"{}\"\n{key}",
        digest_hex(KEY)
    )
}

fn micro(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter");
    let counter = AtomicU64::new(0);
    // The floor: one uncontended atomic add, what any per-request counter costs.
    g.bench_function("baseline_atomic_add", |b| {
        b.iter(|| black_box(counter.fetch_add(1, Ordering::Relaxed)))
    });
    let text = format!(
        "[credentials.c]\nclient_id = \"id\"\nclient_secret = \"s\"\nscopes = [\"openid\"]\n\
         [[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"http://127.0.0.1:1\"\ncredential = \"c\"\n\
         [[access.keys]]\nname = \"k\"\nsha256 = \"{}\"\nrate_per_second = 1000000000\nburst = 1000000000\n",
        digest_hex(KEY)
    );
    let config = Config::parse(&text, Path::new("."), &HashMap::new()).expect("config");
    let access = Access::new(&config.access, None);
    let client = access.match_key(KEY.as_bytes()).expect("key");
    g.bench_function("bucket_take_under_limit", |b| {
        b.iter(|| black_box(client.take_rate()))
    });
    let slots = Slots::new(1000);
    g.bench_function("slot_take_and_release", |b| {
        b.iter(|| drop(black_box(slots.try_acquire())))
    });
    g.finish();
}

struct Setup {
    _ims: SimIms,
    _upstream: SimUpstream,
    server: ServerHandle,
}

async fn start(limited: bool) -> Setup {
    let ims = SimIms::start().await.expect("sim IMS");
    ims.state().add_client("bench-client", "bench-secret");
    let upstream = SimUpstream::start(None).await.expect("sim upstream");
    let text = config(&ims.token_url(), &upstream.url(), limited);
    let config = Config::parse(&text, Path::new("."), &HashMap::new()).expect("config");
    let server = server::start(config, None).await.expect("server");
    for _ in 0..200 {
        if server.shared.ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Setup {
        _ims: ims,
        _upstream: upstream,
        server,
    }
}

/// `n` GETs through the proxy, 8 at a time over kept-alive connections.
async fn drive(url: &str, n: u64) -> Duration {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let lanes = 8;
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let (client, url) = (client.clone(), url.to_string());
        let count = n / lanes + u64::from(lane < n % lanes);
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                let req = Request::get(&url)
                    .header("x-proxy-key", KEY)
                    .body(Empty::new())
                    .expect("request");
                let resp = client.request(req).await.expect("response");
                assert_eq!(resp.status(), 200);
                let _ = resp.into_body().collect().await.expect("body");
            }
        }));
    }
    for t in tasks {
        t.await.expect("lane");
    }
    started.elapsed()
}

fn end_to_end(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let plain = rt.block_on(start(false));
    let limited = rt.block_on(start(true));
    let mut g = c.benchmark_group("request");
    g.sample_size(10);
    // Alternating rounds, so a slower stretch of a noisy machine hits both alike.
    for round in 1..=3 {
        for (name, setup) in [("no_limits", &plain), ("limits_not_reached", &limited)] {
            let url = format!("http://{}/wf/api/echo", setup.server.proxy_addr);
            g.bench_function(format!("{name}/{round}"), |b| {
                b.iter_custom(|n| rt.block_on(drive(&url, n)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, micro, end_to_end);
criterion_main!(benches);
