//! `ims-proxy check`, `hash-key` and `healthcheck`: operator tools that never print a secret.

use crate::access::digest_hex;
use crate::config::{AccessMode, Config};
use crate::ims::ImsClient;
use base64::Engine;
use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

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

/// Writes rows as aligned columns under a header, two spaces apart.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from(" ");
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(l, " {cell:<w$} ");
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

/// The names of the keys that may use `route`, as `check` shows them.
fn allowed_keys(c: &Config, route: &str) -> String {
    if c.access.mode == AccessMode::Open {
        return "anyone (open mode)".to_string();
    }
    let keys: Vec<&str> = c
        .access
        .keys
        .iter()
        .filter(|k| {
            !k.disabled
                && k.routes
                    .as_ref()
                    .is_none_or(|rs| rs.iter().any(|r| r == route))
        })
        .map(|k| k.name.as_str())
        .collect();
    if keys.is_empty() {
        "no key".to_string()
    } else {
        keys.join(", ")
    }
}

fn describe(path: &Path, c: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: valid", path.display());
    let s = &c.server;
    let _ = writeln!(
        out,
        "listen {} ({}, {} worker{}), admin {}",
        s.listen,
        if s.tls.is_some() { "TLS" } else { "plain HTTP" },
        s.workers,
        if s.workers == 1 { "" } else { "s" },
        s.admin_listen
    );

    let _ = writeln!(out, "\nroutes:");
    let rows: Vec<Vec<String>> = c
        .routes
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.prefix.clone(),
                r.upstream.clone(),
                r.credential.clone(),
                allowed_keys(c, &r.name),
            ]
        })
        .collect();
    table(
        &mut out,
        &["ROUTE", "PREFIX", "UPSTREAM", "CREDENTIAL", "ALLOWED KEYS"],
        &rows,
    );

    let _ = writeln!(out, "\ncredentials:");
    let rows: Vec<Vec<String>> = c
        .credentials
        .iter()
        .map(|(name, cr)| {
            vec![
                name.clone(),
                cr.client_id.clone(),
                // Secret's Display is `[redacted]`: this shows how many, never what.
                format!(
                    "{} ({})",
                    cr.secrets.len(),
                    cr.secrets
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                cr.scopes.join(","),
                cr.org_id.clone().unwrap_or_else(|| "-".into()),
                cr.token_url.clone(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "CREDENTIAL",
            "CLIENT ID",
            "SECRETS",
            "SCOPES",
            "ORG ID",
            "TOKEN URL",
        ],
        &rows,
    );

    let _ = writeln!(
        out,
        "\nclients ({}):",
        if c.access.mode == AccessMode::Keys {
            "keys"
        } else {
            "open"
        }
    );
    let rows: Vec<Vec<String>> = c
        .access
        .keys
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                format!("{}…", &hex::encode(k.sha256)[..12]),
                k.routes
                    .as_ref()
                    .map(|r| r.join(","))
                    .unwrap_or_else(|| "all".into()),
                k.rate
                    .map(|r| format!("{}/s burst {}", r.per_second, r.burst))
                    .unwrap_or_else(|| "-".into()),
                if k.disabled { "disabled" } else { "enabled" }.to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(
            &mut out,
            &["CLIENT", "SHA256", "ROUTES", "RATE", "STATE"],
            &rows,
        );
    }
    if !c.access.allow_cidrs.is_empty() {
        let cidrs: Vec<String> = c.access.allow_cidrs.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(out, "  source addresses allowed: {}", cidrs.join(", "));
    }
    out
}

/// `healthcheck`: GETs `path` on the admin address and succeeds on a 200.
///
/// It is the container image's HEALTHCHECK, which must work in a distroless
/// image without curl. An unspecified admin address (`0.0.0.0`, `[::]`) is
/// reached on loopback.
pub fn healthcheck(admin: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let ip = match admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, admin.port());
    let url = format!("http://{addr}{path}");
    let fail = |e: std::io::Error| format!("{url}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(fail)?;
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    stream.set_write_timeout(Some(timeout)).map_err(fail)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ims-proxy-healthcheck\r\nConnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    // Only the status line matters; it fits in the first read of any sane answer.
    let mut head = [0u8; 256];
    let mut len = 0;
    while len < head.len() && !head[..len].contains(&b'\n') {
        let n = stream.read(&mut head[len..]).map_err(fail)?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&head[..len]);
    let status_line = head.lines().next().unwrap_or_default();
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(code) => Err(format!("{url} answered {code}")),
        None => Err(format!("{url}: no HTTP answer")),
    }
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

    fn sample_config() -> Config {
        let text = format!(
            r#"
[credentials.workfront]
client_id = "wf-client"
client_secret = "wf-S3cret"
scopes = ["openid", "AdobeID"]

[credentials.fusion]
client_id = "fusion-client"
client_secrets = ["new-S3cret", "old-S3cret"]
scopes = ["openid"]

[[routes]]
name = "workfront"
prefix = "/workfront"
upstream = "https://acme.my.workfront.com"
credential = "workfront"

[[routes]]
name = "fusion"
prefix = "/fusion"
upstream = "https://fusion.adobe.io"
credential = "fusion"

[[access.keys]]
name = "etl"
sha256 = "{d}"

[[access.keys]]
name = "reporting"
sha256 = "{d}"
routes = ["fusion"]
rate_per_second = 5

[[access.keys]]
name = "retired"
sha256 = "{d}"
disabled = true
"#,
            d = digest_hex("k")
        );
        Config::parse(&text, Path::new("."), &std::collections::HashMap::new()).unwrap()
    }

    /// The cells of the table row whose first cell is `first` (columns are two spaces apart).
    fn row<'a>(report: &'a str, first: &str) -> Vec<&'a str> {
        report
            .lines()
            .map(|l| {
                l.trim()
                    .split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect::<Vec<_>>()
            })
            .find(|cells| cells.first() == Some(&first))
            .unwrap_or_else(|| panic!("no row {first:?} in:\n{report}"))
    }

    #[test]
    fn check_prints_a_table_of_routes_upstreams_credentials_and_allowed_keys() {
        let report = describe(Path::new("proxy.toml"), &sample_config());
        assert_eq!(
            row(&report, "ROUTE"),
            ["ROUTE", "PREFIX", "UPSTREAM", "CREDENTIAL", "ALLOWED KEYS"]
        );
        assert_eq!(
            row(&report, "workfront"),
            [
                "workfront",
                "/workfront",
                "https://acme.my.workfront.com",
                "workfront",
                "etl"
            ]
        );
        assert_eq!(
            row(&report, "fusion"),
            [
                "fusion",
                "/fusion",
                "https://fusion.adobe.io",
                "fusion",
                "etl, reporting"
            ]
        );
        // Columns line up: every route row starts its UPSTREAM cell where the header's does.
        let header = report.lines().find(|l| l.contains("ROUTE")).unwrap();
        let col = header.find("UPSTREAM").unwrap();
        for l in report.lines().filter(|l| l.contains("https://")) {
            if l.contains("/workfront") || l.contains("/fusion ") {
                assert_eq!(l.find("https://"), Some(col), "{report}");
            }
        }
        assert_eq!(row(&report, "retired")[4], "disabled");
        assert_eq!(row(&report, "reporting")[3], "5/s burst 5");
        assert!(!report.contains("S3cret"), "{report}");
        assert!(report.contains("2 ([redacted], [redacted])"), "{report}");
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
