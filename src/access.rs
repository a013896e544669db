//! Client access: source addresses, client keys (digests only, constant-time
//! compare), per-key route lists and per-key rate limits.

use crate::config::{AccessConfig, AccessMode, KeyConfig, RateLimit};
use crate::rewrite::param_values;
use base64::Engine;
use http::{header, HeaderMap};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// Who a request is, once admitted.
#[derive(Clone)]
pub struct Client {
    /// Key name, or `anonymous` in open mode.
    pub name: Arc<str>,
    key: Option<Arc<Key>>,
}

impl Client {
    /// May this client use the route?
    pub fn may_use(&self, route: &str) -> bool {
        match &self.key {
            Some(k) => k
                .config
                .routes
                .as_ref()
                .is_none_or(|r| r.iter().any(|n| n == route)),
            None => true,
        }
    }

    /// Takes one request from the client's rate limit; `Err(wait)` when spent.
    pub fn take_rate(&self) -> Result<(), Duration> {
        match self.key.as_ref().and_then(|k| k.bucket.as_ref()) {
            Some(b) => b.take(),
            None => Ok(()),
        }
    }
}

struct Key {
    /// The key's name, shared by every request it admits.
    name: Arc<str>,
    config: KeyConfig,
    bucket: Option<Arc<Bucket>>,
}

/// A token bucket.
pub struct Bucket {
    limit: RateLimit,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(limit: RateLimit) -> Self {
        Bucket {
            limit,
            state: Mutex::new((f64::from(limit.burst), Instant::now())),
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.limit.per_second;
        st.0 = (st.0 + refill).min(f64::from(self.limit.burst));
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            Ok(())
        } else {
            Err(
                Duration::try_from_secs_f64((1.0 - st.0) / self.limit.per_second)
                    .unwrap_or(Duration::MAX),
            )
        }
    }
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key candidate at all.
    Missing,
    /// Candidates, none matching.
    Invalid,
}

/// The access rules of one configuration snapshot.
pub struct Access {
    mode: AccessMode,
    cidrs: Vec<IpNet>,
    keys: Vec<Arc<Key>>,
    anonymous: Client,
}

impl Access {
    /// Builds the rules; buckets of keys whose limit is unchanged carry over from `previous`.
    pub fn new(config: &AccessConfig, previous: Option<&Access>) -> Access {
        let old: HashMap<&str, &Arc<Key>> = previous
            .map(|p| p.keys.iter().map(|k| (k.config.name.as_str(), k)).collect())
            .unwrap_or_default();
        let keys = config
            .keys
            .iter()
            .map(|k| {
                let bucket = k.rate.map(|limit| {
                    match old.get(k.name.as_str()).and_then(|o| o.bucket.as_ref()) {
                        Some(b) if b.limit == limit => b.clone(),
                        _ => Arc::new(Bucket::new(limit)),
                    }
                });
                Arc::new(Key {
                    name: Arc::from(k.name.as_str()),
                    config: k.clone(),
                    bucket,
                })
            })
            .collect();
        Access {
            mode: config.mode,
            cidrs: config.allow_cidrs.clone(),
            keys,
            anonymous: Client {
                name: Arc::from("anonymous"),
                key: None,
            },
        }
    }

    /// True when keys are required.
    pub fn needs_key(&self) -> bool {
        self.mode == AccessMode::Keys
    }

    /// The open-mode client.
    pub fn anonymous(&self) -> Client {
        self.anonymous.clone()
    }

    /// Is the source address allowed?
    pub fn source_allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        self.cidrs.is_empty() || self.cidrs.iter().any(|n| n.contains(&ip))
    }

    /// The configured key matching `candidate`, compared in constant time against every key.
    pub fn match_key(&self, candidate: &[u8]) -> Option<Client> {
        let digest = Sha256::digest(candidate);
        let mut found = None;
        for k in &self.keys {
            // No early exit: the time taken does not depend on which key matched.
            let eq: bool = k.config.sha256.ct_eq(digest.as_slice()).into();
            if eq && !k.config.disabled && found.is_none() {
                found = Some(Client {
                    name: Arc::clone(&k.name),
                    key: Some(k.clone()),
                });
            }
        }
        found
    }

    /// Checks the header and query key sources in the spec's order.
    pub fn admit(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Client, Refusal> {
        // Visited in place, not collected: no allocation per request.
        let mut any = false;
        let found = visit_candidates(headers, query, |c| {
            any = true;
            self.match_key(c)
        });
        found.ok_or(if any {
            Refusal::Invalid
        } else {
            Refusal::Missing
        })
    }

    /// The first candidate matching a key, or the refusal reason.
    pub fn first_match(&self, candidates: &[impl AsRef<[u8]>]) -> Result<Client, Refusal> {
        if candidates.is_empty() {
            return Err(Refusal::Missing);
        }
        candidates
            .iter()
            .find_map(|c| self.match_key(c.as_ref()))
            .ok_or(Refusal::Invalid)
    }
}

/// Calls `f` on each non-empty key candidate until it returns something, in the
/// spec's order: Bearer, Basic password, `x-proxy-key`, `x-api-key`, `apiKey`
/// query parameter. Header values are borrowed, not copied.
fn visit_candidates<T>(
    headers: &HeaderMap,
    query: Option<&str>,
    mut f: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    let mut try_one = |c: &[u8]| if c.is_empty() { None } else { f(c) };
    for v in headers.get_all(header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            if let Some(found) = try_one(v[7..].trim_ascii()) {
                return Some(found);
            }
        } else if v.len() > 6 && v[..6].eq_ignore_ascii_case(b"basic ") {
            if let Ok(decoded) =
                base64::engine::general_purpose::STANDARD.decode(v[6..].trim_ascii())
            {
                if let Some(i) = decoded.iter().position(|b| *b == b':') {
                    if let Some(found) = try_one(&decoded[i + 1..]) {
                        return Some(found);
                    }
                }
            }
        }
    }
    for name in [&X_PROXY_KEY, &X_API_KEY] {
        for v in headers.get_all(name) {
            if let Some(found) = try_one(v.as_bytes().trim_ascii()) {
                return Some(found);
            }
        }
    }
    let q = query?;
    api_key_candidates(q.as_bytes())
        .iter()
        .find_map(|c| try_one(c))
}

static X_PROXY_KEY: http::HeaderName = http::HeaderName::from_static("x-proxy-key");
static X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// `apiKey` candidates from a query string or a form body (same encoding).
pub fn api_key_candidates(body: &[u8]) -> Vec<Vec<u8>> {
    param_values(body, "apikey")
        .into_iter()
        .map(String::into_bytes)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The hex SHA-256 line `hash-key` prints for a key.
pub fn digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn access(keys: &[(&str, &str, bool)], cidrs: &[&str]) -> Access {
        let config = AccessConfig {
            mode: AccessMode::Keys,
            allow_open_on_network: false,
            allow_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            keys: keys
                .iter()
                .map(|(name, key, disabled)| {
                    let mut sha256 = [0u8; 32];
                    hex::decode_to_slice(digest_hex(key), &mut sha256).unwrap();
                    KeyConfig {
                        name: name.to_string(),
                        sha256,
                        routes: None,
                        rate: None,
                        disabled: *disabled,
                    }
                })
                .collect(),
        };
        Access::new(&config, None)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn every_key_source_admits() {
        let a = access(&[("etl", "k-123", false)], &[]);
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("user:k-123")
        );
        for h in [
            headers(&[("authorization", "Bearer k-123")]),
            headers(&[("authorization", &basic)]),
            headers(&[("x-proxy-key", "k-123")]),
            headers(&[("x-api-key", "k-123")]),
        ] {
            assert_eq!(&*a.admit(&h, None).ok().unwrap().name, "etl", "{h:?}");
        }
        assert!(a.admit(&HeaderMap::new(), Some("x=1&apiKey=k-123")).is_ok());
        assert_eq!(
            api_key_candidates(b"apiKey=k-123&x=1"),
            vec![b"k-123".to_vec()]
        );
    }

    #[test]
    fn any_matching_candidate_admits_and_wrong_keys_are_invalid() {
        let a = access(&[("etl", "k-123", false)], &[]);
        let h = headers(&[("authorization", "Bearer wrong"), ("x-proxy-key", "k-123")]);
        assert!(a.admit(&h, None).is_ok());
        assert_eq!(
            a.admit(&headers(&[("x-proxy-key", "nope")]), None).err(),
            Some(Refusal::Invalid)
        );
        assert_eq!(
            a.admit(&HeaderMap::new(), None).err(),
            Some(Refusal::Missing)
        );
    }

    #[test]
    fn disabled_key_is_refused_as_unknown() {
        let a = access(&[("etl", "k-123", true)], &[]);
        assert_eq!(
            a.admit(&headers(&[("x-proxy-key", "k-123")]), None).err(),
            Some(Refusal::Invalid)
        );
    }

    #[test]
    fn cidrs_cover_v4_v6_and_mapped_addresses() {
        let a = access(&[], &["10.0.0.0/8", "::1/128"]);
        assert!(a.source_allowed("10.1.2.3".parse().unwrap()));
        assert!(a.source_allowed("::ffff:10.1.2.3".parse().unwrap()));
        assert!(a.source_allowed("::1".parse().unwrap()));
        assert!(!a.source_allowed("192.168.1.1".parse().unwrap()));
        assert!(access(&[], &[]).source_allowed("192.168.1.1".parse().unwrap()));
    }

    #[test]
    fn bucket_allows_burst_then_refuses_with_honest_wait() {
        let b = Bucket::new(RateLimit {
            per_second: 2.0,
            burst: 3,
        });
        for _ in 0..3 {
            assert!(b.take().is_ok());
        }
        let wait = b.take().unwrap_err();
        assert!(
            wait <= Duration::from_millis(500) && wait > Duration::from_millis(400),
            "{wait:?}"
        );
    }
}
