//! `scrub_form`: never panics; on success leaves no credential field and keeps
//! every other non-empty field byte-identical and in order.
#![no_main]

use ims_proxy::rewrite::{is_credential_pair, scrub_form};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(out) = scrub_form(body) {
        let expected: Vec<&[u8]> = body
            .split(|b| *b == b'&')
            .filter(|p| !p.is_empty() && !is_credential_pair(p))
            .collect();
        let kept: Vec<&[u8]> = if out.is_empty() {
            vec![]
        } else {
            out.split(|b| *b == b'&').collect()
        };
        assert_eq!(kept, expected, "body {body:?}");
    }
});
