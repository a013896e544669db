//! Prometheus metrics: the names and labels of the spec, in a registry per server.

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::borrow::Cow;
use std::collections::HashMap;

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
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
        let m = Metrics {
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
pub struct ChargebackTable(HashMap<String, HashMap<String, Chargeback>>);

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
