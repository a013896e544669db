//! Prometheus metrics: the names and labels of the spec, in a registry per server.

use crate::route::Route;
use prometheus::Histogram;
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use rustc_hash::FxHashMap;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Never reused in a process, so a thread's cached series handles know their registry.
    id: u64,
    /// `ims_proxy_requests_total{route,client,method,status}`.
    pub requests_total: IntCounterVec,
    /// `ims_proxy_request_duration_seconds{route,client,method,status}`.
    pub request_duration: HistogramVec,
    /// `ims_proxy_upstream_duration_seconds{route}`.
    pub upstream_duration: HistogramVec,
    /// `ims_proxy_inflight_requests{route}`.
    pub inflight: IntGaugeVec,
    /// `ims_proxy_queued_requests{credential}`.
    pub queued: IntGaugeVec,
    /// `ims_proxy_upstream_errors_total{route,kind}`.
    pub upstream_errors: IntCounterVec,
    /// `ims_proxy_auth_failures_total{reason}`.
    pub auth_failures: IntCounterVec,
    /// `ims_proxy_token_refreshes_total{credential,result}`.
    pub token_refreshes: IntCounterVec,
    /// `ims_proxy_token_fetch_errors_total{credential,error}`.
    pub token_fetch_errors: IntCounterVec,
    /// `ims_proxy_token_fetch_duration_seconds{credential}`.
    pub token_fetch_duration: HistogramVec,
    /// `ims_proxy_token_expiry_timestamp_seconds{credential}`.
    pub token_expiry: GaugeVec,
    /// `ims_proxy_token_forced_refreshes_total{credential}`.
    pub token_forced_refreshes: IntCounterVec,
    /// `ims_proxy_request_bytes_total{route,client}`.
    pub request_bytes: IntCounterVec,
    /// `ims_proxy_response_bytes_total{route,client}`.
    pub response_bytes: IntCounterVec,
    /// `ims_proxy_upstream_throttled_total{route,client}`.
    pub upstream_throttled: IntCounterVec,
    /// `ims_proxy_config_reloads_total{result}`.
    pub config_reloads: IntCounterVec,
}

/// Latency buckets from 1 ms to about 65 s (Adobe's gateway gives up at 60 s).
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 17).unwrap_or_default()
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(latency_buckets()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let rcms = &["route", "client", "method", "status"];
        let token_expiry = GaugeVec::new(
            Opts::new(
                "ims_proxy_token_expiry_timestamp_seconds",
                "Unix time at which the current token expires",
            ),
            &["credential"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(token_expiry.clone()))
            .expect("unique metric");
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let m = Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            requests_total: counter("ims_proxy_requests_total", "Requests answered", rcms),
            request_duration: histogram(
                "ims_proxy_request_duration_seconds",
                "Request head in to response head out",
                rcms,
            ),
            upstream_duration: histogram(
                "ims_proxy_upstream_duration_seconds",
                "Request sent upstream to its response head",
                &["route"],
            ),
            inflight: gauge(
                "ims_proxy_inflight_requests",
                "Requests being proxied",
                &["route"],
            ),
            queued: gauge(
                "ims_proxy_queued_requests",
                "Requests waiting for a max_in_flight slot",
                &["credential"],
            ),
            upstream_errors: counter(
                "ims_proxy_upstream_errors_total",
                "Upstream failures",
                &["route", "kind"],
            ),
            auth_failures: counter(
                "ims_proxy_auth_failures_total",
                "Refused clients",
                &["reason"],
            ),
            token_refreshes: counter(
                "ims_proxy_token_refreshes_total",
                "Token refresh attempts",
                &["credential", "result"],
            ),
            token_fetch_errors: counter(
                "ims_proxy_token_fetch_errors_total",
                "Failed IMS token requests by kind",
                &["credential", "error"],
            ),
            token_fetch_duration: histogram(
                "ims_proxy_token_fetch_duration_seconds",
                "IMS token request duration",
                &["credential"],
            ),
            token_expiry,
            token_forced_refreshes: counter(
                "ims_proxy_token_forced_refreshes_total",
                "Refreshes forced by an upstream 401",
                &["credential"],
            ),
            request_bytes: counter(
                "ims_proxy_request_bytes_total",
                "Request body bytes sent upstream",
                &["route", "client"],
            ),
            response_bytes: counter(
                "ims_proxy_response_bytes_total",
                "Response body bytes sent to clients",
                &["route", "client"],
            ),
            upstream_throttled: counter(
                "ims_proxy_upstream_throttled_total",
                "Upstream 429 answers",
                &["route", "client"],
            ),
            config_reloads: counter(
                "ims_proxy_config_reloads_total",
                "Configuration reloads",
                &["result"],
            ),
            registry,
        };
        // Series that only count failures exist from the start at zero, so dashboards
        // and alerts see 0 rather than no data.
        for reason in ["missing", "invalid", "forbidden", "rate_limited"] {
            m.auth_failures.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        let build = IntGaugeVec::new(
            Opts::new("ims_proxy_build_info", "Build information"),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry.register(Box::new(build)).expect("unique metric");
        #[cfg(target_os = "linux")]
        {
            let _ = m.registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        m
    }

    /// The chargeback counters of one route and client.
    pub fn chargeback(&self, route: &str, client: &str) -> Chargeback {
        Chargeback {
            request_bytes: self.request_bytes.with_label_values(&[route, client]),
            response_bytes: self.response_bytes.with_label_values(&[route, client]),
            upstream_throttled: self.upstream_throttled.with_label_values(&[route, client]),
        }
    }

    /// Drops a removed credential's series, so it does not linger as "expired".
    pub fn forget_credential(&self, name: &str) {
        let _ = self.token_expiry.remove_label_values(&[name]);
        let _ = self.token_forced_refreshes.remove_label_values(&[name]);
        let _ = self.token_fetch_duration.remove_label_values(&[name]);
        let _ = self.queued.remove_label_values(&[name]);
        for result in ["ok", "error"] {
            let _ = self.token_refreshes.remove_label_values(&[name, result]);
        }
        for kind in crate::ims::FetchErrorKind::ALL {
            let _ = self
                .token_fetch_errors
                .remove_label_values(&[name, kind.label()]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// A request series' identity: registry, route and client (by address, kept alive
/// by the entry), method label (a static), status.
type SeriesKey = (u64, usize, usize, usize, u16);

/// A request series' handles, and what keeps its key's addresses from being reused.
struct SeriesEntry {
    _pins: (Option<Arc<Route>>, Option<Arc<str>>),
    total: IntCounter,
    duration: Histogram,
}

/// Entries a thread keeps before starting over (reloads leave old routes behind).
const SERIES_CACHE_LIMIT: usize = 4096;

thread_local! {
    static SERIES: RefCell<FxHashMap<SeriesKey, SeriesEntry>> = RefCell::default();
}

impl Metrics {
    /// Counts an answered request and its duration. The two series' handles are
    /// resolved by label once per thread, then found by address: by label, each
    /// request paid two hashes of four strings and two locks.
    pub fn observe_request(
        &self,
        route: Option<&Arc<Route>>,
        client: Option<&Arc<str>>,
        method: &'static str,
        status: u16,
        seconds: f64,
    ) {
        let key = (
            self.id,
            route.map_or(0, |r| Arc::as_ptr(r) as usize),
            client.map_or(0, |c| Arc::as_ptr(c) as *const u8 as usize),
            method.as_ptr() as usize,
            status,
        );
        SERIES.with_borrow_mut(|cache| {
            // The length first: a second lookup only when the cache is full.
            if cache.len() >= SERIES_CACHE_LIMIT && !cache.contains_key(&key) {
                cache.clear();
            }
            let entry = cache.entry(key).or_insert_with(|| {
                let labels = [
                    route.map_or("none", |r| r.name()),
                    client.map_or("none", |c| c),
                    method,
                    status_label(status),
                ];
                SeriesEntry {
                    _pins: (route.cloned(), client.cloned()),
                    total: self.requests_total.with_label_values(&labels),
                    duration: self.request_duration.with_label_values(&labels),
                }
            });
            entry.total.inc();
            entry.duration.observe(seconds);
        });
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A status code's label without formatting on the hot path.
pub fn status_label(code: u16) -> &'static str {
    const COMMON: &[(u16, &str)] = &[
        (200, "200"),
        (201, "201"),
        (202, "202"),
        (204, "204"),
        (206, "206"),
        (301, "301"),
        (302, "302"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (409, "409"),
        (413, "413"),
        (422, "422"),
        (429, "429"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    match COMMON.iter().find(|(c, _)| *c == code) {
        Some((_, s)) => s,
        None => match code {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        },
    }
}

/// A route and client's counters, resolved ahead of the requests that add to them.
#[derive(Clone)]
pub struct Chargeback {
    /// `ims_proxy_request_bytes_total{route,client}`.
    pub request_bytes: IntCounter,
    /// `ims_proxy_response_bytes_total{route,client}`.
    pub response_bytes: IntCounter,
    /// `ims_proxy_upstream_throttled_total{route,client}`.
    pub upstream_throttled: IntCounter,
}

/// Chargeback counters for every route and client that may use it, by route then client.
///
/// Built with each snapshot, so a request takes its counters from a map instead of
/// hashing labels under each metric family's lock.
#[derive(Default)]
pub struct ChargebackTable(FxHashMap<String, FxHashMap<String, Chargeback>>);

impl ChargebackTable {
    /// Creates the route and client's series at zero and keeps their handles.
    pub fn register(&mut self, metrics: &Metrics, route: &str, client: &str) {
        self.0
            .entry(route.to_string())
            .or_default()
            .insert(client.to_string(), metrics.chargeback(route, client));
    }

    /// The route and client's counters; resolved by label for a pair not registered.
    pub fn get(&self, metrics: &Metrics, route: &str, client: &str) -> Cow<'_, Chargeback> {
        match self
            .0
            .get(route)
            .and_then(|by_client| by_client.get(client))
        {
            Some(c) => Cow::Borrowed(c),
            None => Cow::Owned(metrics.chargeback(route, client)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(m: &Metrics, series: &str) -> Option<String> {
        m.render()
            .lines()
            .find(|l| l.starts_with(series))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
    }

    // The per-thread handle cache must never send one registry's counts to another:
    // two servers in one process see the same labels on the same thread.
    #[test]
    fn cached_request_series_stay_with_their_registry() {
        let (a, b) = (Metrics::new(), Metrics::new());
        let alice: Arc<str> = Arc::from("alice");
        for _ in 0..3 {
            a.observe_request(None, Some(&alice), "GET", 200, 0.001);
        }
        b.observe_request(None, Some(&alice), "GET", 200, 0.001);
        b.observe_request(None, None, "POST", 503, 0.002);
        let series =
            r#"ims_proxy_requests_total{client="alice",method="GET",route="none",status="200"}"#;
        assert_eq!(count(&a, series).as_deref(), Some("3"));
        assert_eq!(count(&b, series).as_deref(), Some("1"));
        let refused =
            r#"ims_proxy_requests_total{client="none",method="POST",route="none",status="503"}"#;
        assert_eq!(count(&a, refused), None);
        assert_eq!(count(&b, refused).as_deref(), Some("1"));
        let seconds = r#"ims_proxy_request_duration_seconds_count{client="alice",method="GET",route="none",status="200"}"#;
        assert_eq!(count(&a, seconds).as_deref(), Some("3"));
    }
}
