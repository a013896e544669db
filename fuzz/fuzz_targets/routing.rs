//! Routing: the route found for any path is the longest prefix matching on whole
//! segments, no path panics `find` or `upstream_path`, and the upstream path stays
//! under the route's base path.
#![no_main]

use ims_proxy::config::Config;
use ims_proxy::metrics::Metrics;
use ims_proxy::route::{prefix_matches, Router};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

const ROUTES: [(&str, &str, &str, bool); 6] = [
    ("wf", "/workfront", "http://a/base", true),
    ("wf2", "/workfront/v2", "http://b", true),
    ("fusion", "/fusion", "http://c/api/v3", true),
    ("keep", "/keep", "http://d", false),
    ("deep", "/a/b/c", "http://e/x", true),
    ("utf", "/caf\u{e9}", "http://f", true),
];

fn router() -> &'static Router {
    static R: OnceLock<Router> = OnceLock::new();
    R.get_or_init(|| {
        let mut text = String::from("[credentials.c]\nclient_id = \"id\"\nclient_secret = \"s\"\nscopes = [\"openid\"]\n[access]\nmode = \"open\"\n");
        for (name, prefix, upstream, strip) in ROUTES {
            text.push_str(&format!(
                "[[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\ncredential = \"c\"\nstrip_prefix = {strip}\n"
            ));
        }
        let config = Config::parse(&text, Path::new("."), &HashMap::new()).expect("fuzz config");
        Router::new(&config.routes, &Metrics::new()).expect("fuzz router")
    })
}

fuzz_target!(|path: &str| {
    let found = router().find(path);
    let best = ROUTES
        .iter()
        .filter(|(_, prefix, _, _)| prefix_matches(prefix, path))
        .max_by_key(|(_, prefix, _, _)| prefix.len());
    assert_eq!(found.map(|r| r.name()), best.map(|b| b.0), "path {path:?}");
    if let Some(r) = found {
        let up = r.upstream_path(path);
        assert!(up.starts_with('/'), "{path:?} -> {up:?}");
        assert!(
            up.starts_with(r.config.upstream_base_path.as_str()),
            "{path:?} -> {up:?}"
        );
    }
});
