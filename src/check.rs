//! `ims-proxy check` and `ims-proxy hash-key`: operator tools that never print a secret.

use crate::access::digest_hex;
use crate::config::{AccessMode, Config};
use crate::ims::ImsClient;
use base64::Engine;
use std::fmt::Write as _;
use std::path::Path;

/// Validates a config and describes it; with `fetch_tokens`, gets one token per
/// credential. Returns the report and whether everything was valid.
pub async fn check(path: &Path, fetch_tokens: bool) -> (String, bool) {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return (format!("{}: invalid\nerror: {e}\n", path.display()), false),
    };
    let mut out = describe(path, &config);
    let mut ok = true;
    if fetch_tokens {
        let _ = writeln!(out, "\ntokens:");
        match ImsClient::new(&config.outbound, config.ims.request_timeout) {
            Err(e) => {
                let _ = writeln!(out, "  error: {e}");
                ok = false;
            }
            Ok(client) => {
                for (name, c) in &config.credentials {
                    let mut line = String::new();
                    let mut got = false;
                    for (i, secret) in c.secrets.iter().enumerate() {
                        match client.fetch(c, secret).await {
                            Ok(t) => {
                                let _ = write!(
                                    line,
                                    "  {name}: ok with secret {} (expires in {} s)",
                                    i + 1,
                                    t.lifetime.as_secs()
                                );
                                got = true;
                                break;
                            }
                            Err(e) => {
                                let _ = writeln!(
                                    line,
                                    "  {name}: secret {}: error {}: {}",
                                    i + 1,
                                    e.kind.label(),
                                    e.message
                                );
                            }
                        }
                    }
                    ok &= got;
                    let _ = writeln!(out, "{}", line.trim_end());
                }
            }
        }
    }
    (out, ok)
}

fn describe(path: &Path, c: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: valid", path.display());
    let s = &c.server;
    let _ = writeln!(
        out,
        "listen {} ({}), admin {}",
        s.listen,
        if s.tls.is_some() { "TLS" } else { "plain HTTP" },
        s.admin_listen
    );
    let _ = writeln!(out, "\nroutes:");
    for r in &c.routes {
        let keys: Vec<&str> = c
            .access
            .keys
            .iter()
            .filter(|k| !k.disabled && k.routes.as_ref().is_none_or(|rs| rs.contains(&r.name)))
            .map(|k| k.name.as_str())
            .collect();
        let who = match c.access.mode {
            AccessMode::Open => "anyone (open mode)".to_string(),
            AccessMode::Keys if keys.is_empty() => "no key".to_string(),
            AccessMode::Keys => keys.join(", "),
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<20} -> {:<40} credential={:<12} clients: {who}",
            r.name, r.prefix, r.upstream, r.credential
        );
    }
    let _ = writeln!(out, "\ncredentials:");
    for (name, cr) in &c.credentials {
        let _ = writeln!(
            out,
            "  {:<16} client_id={} secrets={} ({}) scopes={} org_id={} token_url={}",
            name,
            cr.client_id,
            cr.secrets.len(),
            cr.secrets
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            cr.scopes.join(","),
            cr.org_id.as_deref().unwrap_or("-"),
            cr.token_url
        );
    }
    let _ = writeln!(
        out,
        "\nclients ({}):",
        if c.access.mode == AccessMode::Keys {
            "keys"
        } else {
            "open"
        }
    );
    for k in &c.access.keys {
        let rate = k
            .rate
            .map(|r| format!(" rate={}/s burst={}", r.per_second, r.burst))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<16} sha256={}… routes={}{rate}{}",
            k.name,
            &hex::encode(k.sha256)[..12],
            k.routes
                .as_ref()
                .map(|r| r.join(","))
                .unwrap_or_else(|| "all".into()),
            if k.disabled { " DISABLED" } else { "" }
        );
    }
    if !c.access.allow_cidrs.is_empty() {
        let cidrs: Vec<String> = c.access.allow_cidrs.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(out, "  source addresses allowed: {}", cidrs.join(", "));
    }
    out
}

/// A new random client key (256 bits, URL-safe).
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "imsp_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The config line for a key.
pub fn sha256_line(key: &str) -> String {
    format!("sha256 = \"{}\"", digest_hex(key))
}

/// `hash-key`: the key from stdin (one trailing newline ignored) or a generated one.
pub fn hash_key(generate: bool, stdin: &mut dyn std::io::Read) -> Result<String, String> {
    if generate {
        let key = generate_key();
        return Ok(format!("{key}\n{}\n", sha256_line(&key)));
    }
    let mut input = String::new();
    stdin
        .read_to_string(&mut input)
        .map_err(|e| format!("cannot read the key from stdin: {e}"))?;
    let key = input.trim_end_matches(['\r', '\n']);
    if key.is_empty() {
        return Err("no key on stdin (pipe one in, or use --generate)".into());
    }
    Ok(format!("{}\n", sha256_line(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_reads_stdin_and_ignores_the_newline() {
        let out = hash_key(false, &mut "test\n".as_bytes()).unwrap();
        assert_eq!(
            out,
            "sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n"
        );
        assert!(hash_key(false, &mut "".as_bytes()).is_err());
    }

    #[test]
    fn generated_keys_are_strong_and_distinct() {
        let a = hash_key(true, &mut "".as_bytes()).unwrap();
        let b = hash_key(true, &mut "".as_bytes()).unwrap();
        assert_ne!(a, b);
        let key = a.lines().next().unwrap();
        assert!(key.len() >= 40, "{key}");
        assert_eq!(a.lines().nth(1).unwrap(), sha256_line(key));
    }
}
