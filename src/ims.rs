//! The Adobe IMS client: one OAuth Server-to-Server (`client_credentials`) token request.

use crate::config::{CredentialConfig, OutboundConfig};
use crate::secret::Secret;
use serde::Deserialize;
use std::time::Duration;

/// `expires_in` values above this are milliseconds (older IMS endpoints), not seconds.
pub const MILLIS_THRESHOLD: u64 = 864_000;

/// The longest lifetime believed (IMS issues about 24 h).
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// A token as IMS issued it.
#[derive(Debug)]
pub struct IssuedToken {
    /// The access token.
    pub access_token: Secret,
    /// Lifetime from the moment IMS answered.
    pub lifetime: Duration,
}

/// The fixed set of error kinds used as the `error` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchErrorKind {
    /// OAuth `invalid_client` (wrong id or secret).
    InvalidClient,
    /// OAuth `invalid_scope`.
    InvalidScope,
    /// OAuth `unauthorized_client`.
    UnauthorizedClient,
    /// OAuth `invalid_request`.
    InvalidRequest,
    /// Any other OAuth `error` code.
    OtherOauth,
    /// A 4xx without an OAuth body.
    Http4xx,
    /// A 5xx without an OAuth body.
    Http5xx,
    /// A 200 we cannot use.
    BadResponse,
    /// No answer in time.
    Timeout,
    /// Connection or TLS failure.
    Connect,
}

impl FetchErrorKind {
    /// Every kind, for metrics that start at zero.
    pub const ALL: [FetchErrorKind; 10] = [
        FetchErrorKind::InvalidClient,
        FetchErrorKind::InvalidScope,
        FetchErrorKind::UnauthorizedClient,
        FetchErrorKind::InvalidRequest,
        FetchErrorKind::OtherOauth,
        FetchErrorKind::Http4xx,
        FetchErrorKind::Http5xx,
        FetchErrorKind::BadResponse,
        FetchErrorKind::Timeout,
        FetchErrorKind::Connect,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            FetchErrorKind::InvalidClient => "invalid_client",
            FetchErrorKind::InvalidScope => "invalid_scope",
            FetchErrorKind::UnauthorizedClient => "unauthorized_client",
            FetchErrorKind::InvalidRequest => "invalid_request",
            FetchErrorKind::OtherOauth => "other_oauth",
            FetchErrorKind::Http4xx => "http_4xx",
            FetchErrorKind::Http5xx => "http_5xx",
            FetchErrorKind::BadResponse => "bad_response",
            FetchErrorKind::Timeout => "timeout",
            FetchErrorKind::Connect => "connect",
        }
    }

    fn from_oauth(code: &str) -> Self {
        match code {
            "invalid_client" => FetchErrorKind::InvalidClient,
            "invalid_scope" => FetchErrorKind::InvalidScope,
            "unauthorized_client" => FetchErrorKind::UnauthorizedClient,
            "invalid_request" => FetchErrorKind::InvalidRequest,
            _ => FetchErrorKind::OtherOauth,
        }
    }
}

/// Why a token request failed; the message never holds a secret or a token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    /// Metric kind.
    pub kind: FetchErrorKind,
    /// Human-readable reason (IMS's `error` and `error_description`, or the transport error).
    pub message: String,
}

impl FetchError {
    fn new(kind: FetchErrorKind, message: impl Into<String>) -> Self {
        FetchError {
            kind,
            message: message.into(),
        }
    }
}

/// Makes token requests; shared by every credential.
#[derive(Clone)]
pub struct ImsClient {
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OauthError {
    error: String,
    error_description: Option<String>,
}

/// Keeps IMS-provided text short and printable in logs and /tokens.
fn clip(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

impl ImsClient {
    /// Builds the client: web PKI roots plus `ca_file`, the egress proxy, `request_timeout`.
    pub fn new(outbound: &OutboundConfig, request_timeout: Duration) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("ims-proxy/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &outbound.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("outbound.ca_file: {e}"))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("outbound.ca_file: {e}"))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        if let Some(p) = &outbound.proxy {
            let proxy = reqwest::Proxy::all(p).map_err(|e| format!("outbound.proxy: {e}"))?;
            b = b.proxy(proxy.no_proxy(reqwest::NoProxy::from_env()));
        }
        let http = b.build().map_err(|e| format!("IMS client: {e}"))?;
        Ok(ImsClient { http })
    }

    /// One `client_credentials` request with one secret.
    pub async fn fetch(
        &self,
        cred: &CredentialConfig,
        secret: &Secret,
    ) -> Result<IssuedToken, FetchError> {
        let scope = cred.scopes.join(",");
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", cred.client_id.as_str()),
            ("client_secret", secret.expose()),
            ("scope", scope.as_str()),
        ];
        let resp = self
            .http
            .post(&cred.token_url)
            .form(&form)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(transport_error)?;
        parse_answer(status.as_u16(), &body)
    }
}

fn transport_error(e: reqwest::Error) -> FetchError {
    // reqwest's Display may include the URL, never the form body; the URL holds no secret.
    let kind = if e.is_timeout() {
        FetchErrorKind::Timeout
    } else {
        FetchErrorKind::Connect
    };
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    FetchError::new(kind, clip(&msg))
}

/// Reads IMS's answer: a token on 200, an OAuth error or HTTP error otherwise.
pub fn parse_answer(status: u16, body: &[u8]) -> Result<IssuedToken, FetchError> {
    if status != 200 {
        if let Ok(err) = serde_json::from_slice::<OauthError>(body) {
            let kind = FetchErrorKind::from_oauth(&err.error);
            let desc = err
                .error_description
                .map(|d| format!(": {}", clip(&d)))
                .unwrap_or_default();
            return Err(FetchError::new(
                kind,
                format!("IMS answered {status} {}{desc}", clip(&err.error)),
            ));
        }
        let kind = if status >= 500 {
            FetchErrorKind::Http5xx
        } else {
            FetchErrorKind::Http4xx
        };
        return Err(FetchError::new(kind, format!("IMS answered HTTP {status}")));
    }
    let bad = |m: &str| {
        FetchError::new(
            FetchErrorKind::BadResponse,
            format!("IMS answer unusable: {m}"),
        )
    };
    let answer: TokenAnswer =
        serde_json::from_slice(body).map_err(|_| bad("not a JSON token answer"))?;
    let token = answer
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("no access_token"))?;
    if let Some(tt) = &answer.token_type {
        if !tt.eq_ignore_ascii_case("bearer") {
            return Err(bad(&format!("token_type {:?} is not bearer", clip(tt))));
        }
    }
    if http::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
        return Err(bad("access_token is not a valid header value"));
    }
    let raw = match answer.expires_in {
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .ok_or_else(|| bad("no usable expires_in"))?;
    let lifetime = if raw > MILLIS_THRESHOLD {
        Duration::from_millis(raw)
    } else {
        Duration::from_secs(raw)
    };
    // A lifetime beyond any real token's is treated as the longest we believe, so the
    // token is still refreshed and its expiry stays printable.
    let lifetime = lifetime.min(MAX_LIFETIME);
    if lifetime.is_zero() {
        return Err(bad("expires_in is zero"));
    }
    Ok(IssuedToken {
        access_token: Secret::new(token),
        lifetime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds_are_told_apart() {
        let t = parse_answer(
            200,
            br#"{"access_token":"tok","token_type":"bearer","expires_in":86399}"#,
        )
        .unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(86399));
        let t = parse_answer(
            200,
            br#"{"access_token":"tok","token_type":"bearer","expires_in":86399000}"#,
        )
        .unwrap();
        assert_eq!(t.lifetime, Duration::from_millis(86_399_000));
        let t = parse_answer(200, br#"{"access_token":"tok","expires_in":"3600"}"#).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn absurd_lifetimes_are_capped() {
        let t = parse_answer(200, br#"{"access_token":"t","expires_in":1e15}"#).unwrap();
        assert_eq!(t.lifetime, MAX_LIFETIME);
    }

    #[test]
    fn unusable_answers_are_bad_response() {
        for body in [
            &br#"{"token_type":"bearer","expires_in":10}"#[..],
            br#"{"access_token":"t","token_type":"mac","expires_in":10}"#,
            br#"{"access_token":"t","token_type":"bearer"}"#,
            br#"{"access_token":"t","expires_in":0}"#,
            br#"<html>"#,
        ] {
            let e = parse_answer(200, body).unwrap_err();
            assert_eq!(
                e.kind,
                FetchErrorKind::BadResponse,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn oauth_errors_keep_their_code() {
        let e = parse_answer(
            400,
            br#"{"error":"invalid_client","error_description":"invalid client_secret parameter"}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::InvalidClient);
        assert!(e.message.contains("invalid client_secret parameter"));
        let e = parse_answer(400, br#"{"error":"weird_thing"}"#).unwrap_err();
        assert_eq!(e.kind.label(), "other_oauth");
        assert_eq!(
            parse_answer(503, b"down").unwrap_err().kind,
            FetchErrorKind::Http5xx
        );
        assert_eq!(
            parse_answer(404, b"").unwrap_err().kind,
            FetchErrorKind::Http4xx
        );
    }
}
