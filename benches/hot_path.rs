//! Criterion micro-benchmarks of the per-request hot-path pieces: routing, the
//! client-key check, the request-head rewrite, query and form scrubbing, and the
//! redacted log target. A plain baseline (copying the query string) is measured
//! in the same run, so the pieces can be read as multiples of a trivial
//! allocation even on a noisy machine.
//!
//! Run: `cargo bench --bench hot_path` (all), or e.g.
//! `cargo bench --bench hot_path -- scrub` (a filter), or
//! `cargo bench --bench hot_path -- --quick` (short runs).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use ims_proxy::access::Access;
use ims_proxy::config::Config;
use ims_proxy::metrics::Metrics;
use ims_proxy::rewrite::{
    redacted_target, scrub_form, scrub_query, strip_request_headers, strip_response_headers,
};
use ims_proxy::route::Router;
use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;

const KEY: &str = "bench-key-0123456789";
const PATH: &str = "/workfront/attask/api/v19.0/proj/search";
const QUERY: &str =
    "fields=name,status,plannedCompletionDate&apiKey=legacy-key&status=CUR&$$LIMIT=100";
const CLEAN_QUERY: &str = "fields=name&status=CUR";
const FORM: &[u8] =
    b"name=Project+One&apiKey=legacy-key&status=CUR&description=Some+longer+text+here";

/// Five routes, twenty keys: a realistic config for a shared technical account.
fn config() -> Config {
    let mut text = String::from(
        "[credentials.c]\nclient_id = \"id\"\nclient_secret = \"s\"\nscopes = [\"openid\"]\n",
    );
    for (i, p) in [
        "/workfront",
        "/fusion",
        "/workflow-builder",
        "/workfront/v2",
        "/a/b/c",
    ]
    .iter()
    .enumerate()
    {
        text.push_str(&format!("[[routes]]\nname = \"r{i}\"\nprefix = \"{p}\"\nupstream = \"https://example.com\"\ncredential = \"c\"\n"));
    }
    for i in 0..20 {
        text.push_str(&format!(
            "[[access.keys]]\nname = \"k{i}\"\nsha256 = \"{}\"\n",
            ims_proxy::access::digest_hex(&format!("{KEY}{i}"))
        ));
    }
    Config::parse(&text, Path::new("."), &HashMap::new()).expect("bench config")
}

/// A typical client request head; the key is the last configured one (worst case).
fn request_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (n, v) in [
        ("host", "proxy:8080"),
        ("user-agent", "legacy-tool/1.0"),
        ("accept", "application/json"),
        ("x-proxy-key", "bench-key-012345678919"),
        ("connection", "keep-alive"),
        ("cookie", "a=b"),
        ("x-request-id", "abc"),
    ] {
        headers.insert(n, HeaderValue::from_static(v));
    }
    headers
}

/// A typical upstream response head.
fn response_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (n, v) in [
        ("content-type", "application/json"),
        ("content-length", "1234"),
        ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=60"),
        ("set-cookie", "session=abc; HttpOnly"),
        ("x-upstream-request-id", "0123456789abcdef"),
    ] {
        headers.insert(n, HeaderValue::from_static(v));
    }
    headers
}

fn hot_path(c: &mut Criterion) {
    let config = config();
    let metrics = Metrics::new();
    let router = Router::new(&config.routes, &metrics).expect("router");
    let access = Access::new(&config.access, None);
    let headers = request_headers();
    let resp_headers = response_headers();
    let bearer = HeaderValue::from_static("Bearer eyJhbGciOiJSUzI1NiJ9.bench-token-payload.sig");
    let api_key = HeaderValue::from_static("0123abcd-client-id");
    let x_api_key = HeaderName::from_static("x-api-key");
    let x_request_id = HeaderName::from_static("x-request-id");
    let via = HeaderValue::from_static("1.1 ims-proxy");
    let host = HeaderValue::from_static("example.com");

    let mut g = c.benchmark_group("hot_path");
    g.bench_function("baseline: copy the query string", |b| {
        b.iter(|| black_box(black_box(QUERY).to_string()))
    });
    g.bench_function("route: longest prefix of 5", |b| {
        b.iter(|| black_box(router.find(black_box(PATH)).is_some()))
    });
    let route = router.find(PATH).expect("route").clone();
    g.bench_function("route: upstream path", |b| {
        b.iter(|| black_box(route.upstream_path(black_box(PATH))))
    });
    g.bench_function("key check: candidates + sha256 + 20 compares", |b| {
        b.iter(|| black_box(access.admit(black_box(&headers), None).is_ok()))
    });
    g.bench_function("key check: Access::admit (headers + query)", |b| {
        b.iter(|| black_box(access.admit(black_box(&headers), Some(CLEAN_QUERY)).is_ok()))
    });
    g.bench_function("header strip: request (strip 7 headers)", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                strip_request_headers(&mut h, false);
                h
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("header rewrite: clone + strip + inject", |b| {
        b.iter(|| {
            let mut h = black_box(&headers).clone();
            strip_request_headers(&mut h, false);
            h.insert(header::AUTHORIZATION, bearer.clone());
            h.insert(&x_api_key, api_key.clone());
            h.insert(&x_request_id, HeaderValue::from_static("abc"));
            h.insert(header::HOST, host.clone());
            h.append(header::VIA, via.clone());
            black_box(h)
        })
    });
    g.bench_function("header strip: response (7 headers)", |b| {
        b.iter_batched(
            || resp_headers.clone(),
            |mut h| {
                strip_response_headers(&mut h, false);
                h
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("query scrub (apiKey present)", |b| {
        b.iter(|| black_box(scrub_query(black_box(QUERY)).map(|q| q.len())))
    });
    g.bench_function("query scrub (nothing to remove)", |b| {
        b.iter(|| black_box(scrub_query(black_box(CLEAN_QUERY)).map(|q| q.len())))
    });
    g.bench_function("form scrub (80 bytes, apiKey present)", |b| {
        b.iter(|| black_box(scrub_form(black_box(FORM)).ok()))
    });
    g.bench_function("log target: redacted path + query", |b| {
        b.iter(|| black_box(redacted_target(black_box(PATH), Some(black_box(QUERY)))))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = hot_path
}
criterion_main!(benches);
