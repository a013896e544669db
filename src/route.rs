//! Routing: the longest route prefix that matches the path on whole segments.

use crate::config::RouteConfig;
use crate::metrics::Metrics;
use bytes::Bytes;
use http::HeaderValue;
use prometheus::{Histogram, IntGauge};
use std::sync::Arc;

/// A configured route with everything the hot path needs pre-built.
pub struct Route {
    /// The validated route.
    pub config: RouteConfig,
    /// `Host` header for the upstream.
    pub host: HeaderValue,
    /// `ims_proxy_inflight_requests{route}`.
    pub inflight: IntGauge,
    /// `ims_proxy_upstream_duration_seconds{route}`.
    pub upstream_duration: Histogram,
}

impl Route {
    /// The route's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The upstream path for a client path this route matched.
    pub fn upstream_path(&self, path: &str) -> String {
        let target = self.upstream_target(path, None);
        String::from_utf8_lossy(&target).into_owned()
    }

    /// The upstream request target: the upstream path, then `?query` if any. In a
    /// buffer of the exact size, which `Bytes` takes over without allocating again.
    pub fn upstream_target(&self, path: &str, query: Option<&str>) -> Bytes {
        let c = &self.config;
        let rest = if c.strip_prefix && c.prefix != "/" {
            &path[c.prefix.len().min(path.len())..]
        } else {
            path
        };
        let base = &c.upstream_base_path;
        let first = if base.is_empty() { rest } else { base };
        let slash = !first.starts_with('/');
        let len = usize::from(slash) + base.len() + rest.len() + query.map_or(0, |q| 1 + q.len());
        let mut out = Vec::with_capacity(len);
        if slash {
            out.push(b'/');
        }
        out.extend_from_slice(base.as_bytes());
        out.extend_from_slice(rest.as_bytes());
        if let Some(q) = query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
        Bytes::from(out)
    }
}

/// All routes, longest prefix first.
pub struct Router {
    routes: Vec<Arc<Route>>,
}

/// True when `prefix` matches `path` on whole segments.
///
/// ```
/// use ims_proxy::route::prefix_matches;
/// assert!(prefix_matches("/workfront", "/workfront/attask/api"));
/// assert!(!prefix_matches("/workfront", "/workfrontx"));
/// ```
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'))
}

impl Router {
    /// Builds the router; `metrics` gives each route its pre-resolved handles.
    pub fn new(routes: &[RouteConfig], metrics: &Metrics) -> Result<Router, String> {
        let mut built = Vec::with_capacity(routes.len());
        for r in routes {
            for kind in ["connect", "timeout", "protocol"] {
                metrics.upstream_errors.with_label_values(&[&r.name, kind]);
            }
            let host = HeaderValue::from_str(r.upstream_authority.as_str()).map_err(|_| {
                format!("route {}: upstream host is not a valid Host header", r.name)
            })?;
            built.push(Arc::new(Route {
                config: r.clone(),
                host,
                inflight: metrics.inflight.with_label_values(&[&r.name]),
                upstream_duration: metrics.upstream_duration.with_label_values(&[&r.name]),
            }));
        }
        built.sort_by_key(|r| std::cmp::Reverse(r.config.prefix.len()));
        Ok(Router { routes: built })
    }

    /// The route for `path`, if any.
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|r| prefix_matches(&r.config.prefix, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, RouteConfig};
    use std::collections::HashMap;
    use std::path::Path;

    fn routes(spec: &[(&str, &str, &str, bool)]) -> Vec<RouteConfig> {
        let mut text = String::from("[credentials.c]\nclient_id = \"id\"\nclient_secret = \"s\"\nscopes = [\"openid\"]\n[access]\nmode = \"open\"\n");
        for (name, prefix, upstream, strip) in spec {
            text.push_str(&format!(
                "[[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\ncredential = \"c\"\nstrip_prefix = {strip}\n"
            ));
        }
        Config::parse(&text, Path::new("."), &HashMap::new())
            .unwrap()
            .routes
    }

    #[test]
    fn longest_prefix_wins_on_whole_segments() {
        let r = Router::new(
            &routes(&[
                ("wf", "/workfront", "http://a", true),
                ("wf2", "/workfront/v2", "http://b", true),
                ("root", "/", "http://c", false),
            ]),
            &Metrics::new(),
        )
        .unwrap();
        assert_eq!(r.find("/workfront/attask/api").unwrap().name(), "wf");
        assert_eq!(r.find("/workfront").unwrap().name(), "wf");
        assert_eq!(r.find("/workfront/v2/x").unwrap().name(), "wf2");
        assert_eq!(
            r.find("/workfrontx/a").unwrap().name(),
            "root",
            "must match whole segments only"
        );
        assert_eq!(r.find("/other").unwrap().name(), "root");
    }

    #[test]
    fn no_route_without_a_matching_prefix() {
        let r = Router::new(
            &routes(&[("wf", "/workfront", "http://a", true)]),
            &Metrics::new(),
        )
        .unwrap();
        assert!(r.find("/fusion/api").is_none());
        assert!(r.find("/workfrontish").is_none());
    }

    #[test]
    fn upstream_path_strips_prefix_and_joins_base() {
        let r = Router::new(
            &routes(&[
                ("wf", "/workfront", "http://a/base", true),
                ("keep", "/keep", "http://a", false),
            ]),
            &Metrics::new(),
        )
        .unwrap();
        let wf = r.find("/workfront").unwrap();
        assert_eq!(
            wf.upstream_path("/workfront/attask/api/v19.0/proj"),
            "/base/attask/api/v19.0/proj"
        );
        assert_eq!(wf.upstream_path("/workfront"), "/base");
        let keep = r.find("/keep/x").unwrap();
        assert_eq!(keep.upstream_path("/keep/x"), "/keep/x");
        // The target adds the query, in a buffer of exactly its length.
        let target = wf.upstream_target("/workfront/x", Some("a=1&b"));
        assert_eq!(&target[..], b"/base/x?a=1&b");
        assert_eq!(&wf.upstream_target("/workfront", None)[..], b"/base");
    }

    #[test]
    fn upstream_path_always_starts_with_a_slash() {
        let r = Router::new(
            &routes(&[
                ("root", "/", "http://a", true),
                ("all", "/all", "http://a", true),
            ]),
            &Metrics::new(),
        )
        .unwrap();
        let all = r.find("/all").unwrap();
        assert_eq!(all.upstream_path("/all"), "/");
        assert_eq!(&all.upstream_target("/all", Some("q"))[..], b"/?q");
        assert_eq!(r.find("/x").unwrap().upstream_path("/x/y"), "/x/y");
    }
}
