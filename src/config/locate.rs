//! Finds the line of a key path (`routes[1].credential`) in TOML source text.
//!
//! Validation works on deserialised values, which have lost their positions;
//! rather than carry a span through every field, errors are located afterwards
//! by reading the table headers and `key =` lines again. It is a best effort:
//! a key that is not written (a missing required one) is located at its
//! table's header, and anything it cannot place gets no line at all.

use std::collections::HashMap;

/// The 1-based line where `key` (or, failing that, its nearest written
/// parent) is defined in `text`.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let target = key_segments(key);
    if target.is_empty() {
        return None;
    }
    let mut arrays: HashMap<Vec<String>, usize> = HashMap::new();
    let mut table: Vec<String> = Vec::new();
    let mut best: Option<(usize, usize)> = None; // (matched segments, line)
    let mut consider = |path: &[String], line: usize| {
        if path.len() <= target.len()
            && target.starts_with(path)
            && best.is_none_or(|(len, _)| path.len() > len)
        {
            best = Some((path.len(), line));
        }
    };
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("[[") {
            let Some(end) = rest.find("]]") else { continue };
            table = header_path(&split_dotted(&rest[..end]), true, &mut arrays);
            consider(&table, n + 1);
        } else if let Some(rest) = line.strip_prefix('[') {
            let Some(end) = rest.find(']') else { continue };
            table = header_path(&split_dotted(&rest[..end]), false, &mut arrays);
            consider(&table, n + 1);
        } else if let Some(eq) = unquoted_equals(line) {
            let mut path = table.clone();
            path.extend(split_dotted(&line[..eq]));
            consider(&path, n + 1);
        }
    }
    best.map(|(_, line)| line)
}

/// `routes[1].headers.x-gw-region` → `routes`, `1`, `headers`, `x-gw-region`.
fn key_segments(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let mut rest = part;
        let name_end = rest.find('[').unwrap_or(rest.len());
        if name_end > 0 {
            out.push(rest[..name_end].to_string());
        }
        rest = &rest[name_end..];
        while let Some(open) = rest.strip_prefix('[') {
            let Some(close) = open.find(']') else { break };
            out.push(open[..close].to_string());
            rest = &open[close + 1..];
        }
    }
    out
}

/// A table header's path, with the current index after every array of tables
/// (`[[routes]]` twice → `routes`, `1`).
fn header_path(
    segments: &[String],
    is_array: bool,
    arrays: &mut HashMap<Vec<String>, usize>,
) -> Vec<String> {
    let mut path = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        path.push(seg.clone());
        if is_array && i + 1 == segments.len() {
            let count = arrays.entry(path.clone()).or_insert(0);
            *count += 1;
            let index = *count - 1;
            path.push(index.to_string());
        } else if let Some(count) = arrays.get(&path) {
            path.push((count.saturating_sub(1)).to_string());
        }
    }
    path
}

/// Splits a dotted key (`a."b.c".d`) on the dots outside quotes, unquoting.
fn split_dotted(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    for c in key.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => current.push(c),
            (None, '"' | '\'') => quote = Some(c),
            (None, '.') => out.push(std::mem::take(&mut current).trim().to_string()),
            (None, c) => current.push(c),
        }
    }
    out.push(current.trim().to_string());
    out
}

/// Position of the first `=` outside quotes: where a `key = value` line's key ends.
fn unquoted_equals(line: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '=') => return Some(i),
            (None, '#') => return None,
            _ => {}
        }
    }
    None
}
