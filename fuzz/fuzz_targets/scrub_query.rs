//! `scrub_query`: never panics, leaves no credential pair, keeps every other pair
//! byte-identical and in order.
#![no_main]

use ims_proxy::rewrite::{is_credential_pair, scrub_query};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|query: &str| {
    let expected: Vec<&str> = query
        .split('&')
        .filter(|p| !is_credential_pair(p.as_bytes()))
        .collect();
    let out = scrub_query(query);
    assert_eq!(
        out.as_deref().unwrap_or(""),
        expected.join("&"),
        "query {query:?}"
    );
    if let Some(out) = out {
        assert!(!out.is_empty());
        assert!(out.split('&').all(|p| !is_credential_pair(p.as_bytes())));
    }
});
