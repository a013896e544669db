//! Properties of the scrubbers and the router, over generated input: scrubbing
//! never leaves an `apiKey`/`sessionID` behind (in any case or percent-encoding)
//! and never changes, drops or reorders any other parameter; routing always picks
//! the longest prefix that matches on whole segments.

use ims_proxy::config::Config;
use ims_proxy::metrics::Metrics;
use ims_proxy::rewrite::{is_credential_pair, scrub_form, scrub_query};
use ims_proxy::route::{prefix_matches, Router};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// `apiKey` or `sessionID` in a random mix of cases, with any letter percent-encoded
/// (upper or lower hex) or, for `K` and `i`, a Unicode letter Java folds onto it.
fn credential_name() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["apikey", "sessionid"]),
        prop::collection::vec((any::<bool>(), 0u8..4), 9),
    )
        .prop_map(|(name, spell)| {
            name.chars()
                .zip(spell)
                .map(|(c, (upper, how))| {
                    let c = if upper { c.to_ascii_uppercase() } else { c };
                    match how {
                        1 => format!("%{:02X}", c as u8),
                        2 => format!("%{:02x}", c as u8),
                        3 if c == 'k' || c == 'K' => "%E2%84%AA".to_string(), // Kelvin sign
                        _ => c.to_string(),
                    }
                })
                .collect()
        })
}

/// A parameter name that is not a credential (never folds to one).
fn other_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z$_.\\[\\]-]{1,12}",
        Just("apiKeyX".to_string()),
        Just("xapiKey".to_string()),
        Just("session".to_string()),
        Just("api%20key".to_string()),
        Just("fields".to_string()),
        Just("$$LIMIT".to_string()),
    ]
    .prop_filter("not a credential", |n| !is_credential_pair(n.as_bytes()))
}

/// A raw value: anything a query may carry, including `=`, `+` and escapes, but not `&`.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9*,:=+./~!$'()@-]{0,16}",
        "(%[0-9A-F]{2}){0,4}",
        Just(String::new()),
    ]
}

#[derive(Debug, Clone)]
enum Pair {
    Credential(String),
    Other(String),
}

impl Pair {
    fn raw(&self) -> &str {
        match self {
            Pair::Credential(s) | Pair::Other(s) => s,
        }
    }
}

fn pair() -> impl Strategy<Value = Pair> {
    prop_oneof![
        1 => (credential_name(), prop::option::of(value())).prop_map(|(n, v)| Pair::Credential(
            match v {
                Some(v) => format!("{n}={v}"),
                None => n,
            }
        )),
        3 => (other_name(), prop::option::of(value())).prop_map(|(n, v)| Pair::Other(match v {
            Some(v) => format!("{n}={v}"),
            None => n,
        })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn query_scrub_removes_every_credential_and_keeps_everything_else(pairs in prop::collection::vec(pair(), 0..12)) {
        let query: Vec<&str> = pairs.iter().map(Pair::raw).collect();
        let query = query.join("&");
        let kept: Vec<&str> = pairs
            .iter()
            .filter_map(|p| match p {
                Pair::Other(s) => Some(s.as_str()),
                Pair::Credential(_) => None,
            })
            .collect();
        let out = scrub_query(&query);
        let out = out.as_deref().unwrap_or("");
        prop_assert_eq!(out, kept.join("&"));
        for p in out.split('&') {
            prop_assert!(!is_credential_pair(p.as_bytes()), "{} left in {}", p, out);
        }
    }

    #[test]
    fn form_scrub_removes_every_credential_and_keeps_everything_else(pairs in prop::collection::vec(pair(), 0..12)) {
        let body: Vec<&str> = pairs.iter().map(Pair::raw).collect();
        let body = body.join("&");
        let kept: Vec<&str> = pairs
            .iter()
            .filter_map(|p| match p {
                Pair::Other(s) if !s.is_empty() => Some(s.as_str()),
                _ => None,
            })
            .collect();
        let out = scrub_form(body.as_bytes()).expect("well-formed form");
        prop_assert_eq!(String::from_utf8_lossy(&out), kept.join("&"));
    }

    #[test]
    fn scrubbing_arbitrary_text_never_panics_and_never_leaves_a_credential(query in ".{0,64}") {
        if let Some(out) = scrub_query(&query) {
            for p in out.split('&') {
                prop_assert!(!is_credential_pair(p.as_bytes()));
            }
        }
        if let Ok(out) = scrub_form(query.as_bytes()) {
            for p in out.split(|b| *b == b'&') {
                prop_assert!(!is_credential_pair(p));
            }
        }
    }
}

const ROUTES: [(&str, &str); 6] = [
    ("wf", "/workfront"),
    ("wf2", "/workfront/v2"),
    ("fusion", "/fusion"),
    ("deep", "/a/b/c"),
    ("ab", "/a/b"),
    ("root", "/"),
];

fn router(with_root: bool) -> Router {
    let mut text = String::from("[credentials.c]\nclient_id = \"id\"\nclient_secret = \"s\"\nscopes = [\"openid\"]\n[access]\nmode = \"open\"\n");
    for (name, prefix) in ROUTES.iter().filter(|r| with_root || r.0 != "root") {
        text.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"http://u/base\"\ncredential = \"c\"\n"
        ));
    }
    let config = Config::parse(&text, Path::new("."), &HashMap::new()).unwrap();
    Router::new(&config.routes, &Metrics::new()).unwrap()
}

/// Paths built from segments that often share a prefix with a route.
fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("workfront"),
            Just("workfrontx"),
            Just("v2"),
            Just("fusion"),
            Just("a"),
            Just("b"),
            Just("c"),
            Just(""),
            Just("x"),
        ],
        0..6,
    )
    .prop_map(|segs| format!("/{}", segs.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_longest_whole_segment_prefix_wins(p in path(), with_root in any::<bool>()) {
        let r = router(with_root);
        let best = ROUTES
            .iter()
            .filter(|(n, _)| with_root || *n != "root")
            .filter(|(_, prefix)| prefix_matches(prefix, &p))
            .max_by_key(|(_, prefix)| prefix.len())
            .map(|(n, _)| *n);
        prop_assert_eq!(r.find(&p).map(|r| r.name()), best);
        if let Some(route) = r.find(&p) {
            let prefix = &route.config.prefix;
            // Whole segments: the prefix is the path, or a `/` follows it (or it is `/`).
            prop_assert!(
                prefix == "/" || p == *prefix || p[prefix.len()..].starts_with('/'),
                "{} matched {}", prefix, p
            );
            prop_assert!(route.upstream_path(&p).starts_with("/base"));
        }
    }
}
