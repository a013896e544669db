//! Every refusal the proxy makes, and the one place that turns it into a response.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use std::time::Duration;

/// Why a request was not forwarded (or its forwarding failed).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Malformed or hostile request (dot segments, foreign absolute-form, bad form body).
    #[error("{0}")]
    BadRequest(&'static str),
    /// No key, or no matching key.
    #[error("a valid client key is required")]
    Unauthorized { missing: bool },
    /// The key may not use this route.
    #[error("this client key may not use route {0:?}")]
    RouteForbidden(String),
    /// The source address is not allowed.
    #[error("source address not allowed")]
    SourceForbidden,
    /// No route matches the path.
    #[error("no route matches this path")]
    NoRoute,
    /// CONNECT and friends.
    #[error("method not allowed: the proxy is never a tunnel")]
    MethodNotAllowed,
    /// A form body over `max_scrub_body_bytes`.
    #[error("form body larger than {0} bytes")]
    PayloadTooLarge(u64),
    /// The key's rate limit is spent, or the upstream asked us to hold back.
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    /// Connecting (or TLS) to the upstream failed.
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    /// The upstream broke the exchange after the connection was up.
    #[error("upstream protocol error")]
    UpstreamProtocol,
    /// No response head within `upstream_timeout`.
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// No valid token for the route's credential.
    #[error("no valid IMS token for credential {credential:?}")]
    TokenUnavailable {
        credential: String,
        retry_after: Duration,
    },
    /// The credential's concurrency queue wait ran out.
    #[error("too many concurrent requests for credential {credential:?}")]
    Overloaded {
        credential: String,
        retry_after: Duration,
    },
    /// Reading the client's body failed (client went away).
    #[error("client body error")]
    ClientBody,
}

impl ProxyError {
    /// HTTP status for this refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::ClientBody => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::RouteForbidden(_) | ProxyError::SourceForbidden => StatusCode::FORBIDDEN,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::UpstreamUnreachable | ProxyError::UpstreamProtocol => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::TokenUnavailable { .. } | ProxyError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The spec's error code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) | ProxyError::ClientBody => "bad_request",
            ProxyError::Unauthorized { .. } => "unauthorized",
            ProxyError::RouteForbidden(_) | ProxyError::SourceForbidden => "forbidden",
            ProxyError::NoRoute => "no_route",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::PayloadTooLarge(_) => "payload_too_large",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::UpstreamUnreachable | ProxyError::UpstreamProtocol => {
                "upstream_unreachable"
            }
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::Overloaded { .. } => "overloaded",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::RateLimited { retry_after }
            | ProxyError::TokenUnavailable { retry_after, .. }
            | ProxyError::Overloaded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The JSON refusal `{"error", "message", "request_id"}` with its status and headers.
    pub fn to_response(&self, request_id: &str) -> Response<Bytes> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "request_id": request_id,
        });
        let mut resp = Response::new(Bytes::from(body.to_string()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-request-id", crate::rewrite::never_indexed(v));
        }
        if matches!(self, ProxyError::Unauthorized { .. }) {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ims-proxy\""),
            );
        }
        if let Some(after) = self.retry_after() {
            // Round up: "0" would invite an immediate retry that fails again.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refusal_is_json_with_code_message_and_request_id() {
        let resp = ProxyError::Unauthorized { missing: true }.to_response("req-1");
        assert_eq!(resp.status(), 401);
        assert_eq!(
            resp.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"ims-proxy\""
        );
        let body = resp.into_body();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "unauthorized");
        assert_eq!(v["request_id"], "req-1");
        assert!(v["message"].as_str().unwrap().contains("key"));
    }

    #[test]
    fn retry_after_is_rounded_up_to_whole_seconds() {
        let e = ProxyError::TokenUnavailable {
            credential: "wf".into(),
            retry_after: Duration::from_millis(1500),
        };
        let resp = e.to_response("r");
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
    }
}
