//! Micro-benchmarks of the hot-path pieces, each printed as ns/op and as a
//! ratio against copying the same input (measured in the same run, since
//! machines here are noisy). Run: `cargo bench --bench hot_path`.

use http::{HeaderMap, HeaderValue};
use ims_proxy::access::{header_and_query_candidates, Access};
use ims_proxy::config::Config;
use ims_proxy::metrics::Metrics;
use ims_proxy::rewrite::{scrub_form, scrub_query, strip_request_headers};
use ims_proxy::route::Router;
use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

const ROUNDS: u32 = 200_000;

fn time(name: &str, baseline: Option<f64>, mut f: impl FnMut()) -> f64 {
    for _ in 0..ROUNDS / 10 {
        f();
    }
    let started = Instant::now();
    for _ in 0..ROUNDS {
        f();
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(ROUNDS);
    match baseline {
        Some(b) => println!("{name:<40} {ns:>9.1} ns/op  {:>6.1}x baseline", ns / b),
        None => println!("{name:<40} {ns:>9.1} ns/op  (baseline)"),
    }
    ns
}

fn main() {
    let key = "bench-key-0123456789";
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
            ims_proxy::access::digest_hex(&format!("{key}{i}"))
        ));
    }
    let config = Config::parse(&text, Path::new("."), &HashMap::new()).expect("bench config");
    let router = Router::new(&config.routes, &Metrics::new()).expect("router");
    let access = Access::new(&config.access, None);
    let query = "fields=name,status,plannedCompletionDate&apiKey=legacy-key&status=CUR&$$LIMIT=100";
    let form = b"name=Project+One&apiKey=legacy-key&status=CUR&description=Some+longer+text+here";
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

    println!("{ROUNDS} iterations each\n");
    let base = time("baseline: copy the query string", None, || {
        black_box(black_box(query).to_string());
    });
    time("route: longest prefix of 5", Some(base), || {
        black_box(router.find(black_box("/workfront/attask/api/v19.0/proj/search")));
    });
    time(
        "key check: sha256 + 20 constant-time compares",
        Some(base),
        || {
            let c = header_and_query_candidates(black_box(&headers), None);
            black_box(access.first_match(&c).is_ok());
        },
    );
    time("query scrub (apiKey present)", Some(base), || {
        black_box(scrub_query(black_box(query)));
    });
    time("query scrub (nothing to remove)", Some(base), || {
        black_box(scrub_query(black_box("fields=name&status=CUR")));
    });
    time("form scrub (80 bytes)", Some(base), || {
        black_box(scrub_form(black_box(form)).ok());
    });
    time("header strip (clone + strip 7 headers)", Some(base), || {
        let mut h = black_box(&headers).clone();
        strip_request_headers(&mut h, false);
        black_box(h);
    });
}
