//! `has_dot_segment`: never panics, and a path it lets through has no segment that
//! one, two or three rounds of percent-decoding turn into `.`/`..` or a separator.
#![no_main]

use ims_proxy::rewrite::has_dot_segment;
use libfuzzer_sys::fuzz_target;

fn decode(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fuzz_target!(|path: &str| {
    if has_dot_segment(path) {
        return;
    }
    for seg in path.split('/') {
        let mut d = seg.as_bytes().to_vec();
        for _ in 0..3 {
            let bare = d.split(|b| *b == b';').next().unwrap_or_default().to_vec();
            assert!(
                bare != b"." && bare != b"..",
                "{path:?} passed with a dot segment"
            );
            assert!(
                !d.contains(&b'/') && !d.contains(&b'\\') && !d.contains(&0),
                "{path:?} passed with an encoded separator"
            );
            d = decode(&d);
        }
    }
});
