//! Simulated Adobe IMS: `POST /ims/token/v3` with the client credentials grant.
//!
//! Answers the way Adobe's IMS does (`{"access_token","token_type","expires_in"}`
//! on success, `{"error","error_description"}` on failure) and can be told to
//! fail, go down, answer slowly, or express `expires_in` in milliseconds as
//! older IMS endpoints did.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde_json::json;

use super::{json_response, random_hex, serve_on, ServerHandle, SimBody};

/// Path of the token endpoint, as on `ims-na1.adobelogin.com`.
pub const TOKEN_PATH: &str = "/ims/token/v3";

/// Default `expires_in` (seconds), as Adobe's v3 endpoint answers.
pub const DEFAULT_EXPIRES_IN: u64 = 86399;

/// Largest token request body read; larger ones are refused.
const MAX_BODY: usize = 64 * 1024;

/// A running simulated IMS on `127.0.0.1`; stops when dropped.
pub struct SimIms {
    state: Arc<ImsState>,
    server: ServerHandle,
}

impl SimIms {
    /// Bind `127.0.0.1:0` and start serving. No clients are known until
    /// [`ImsState::add_client`] is called.
    pub async fn start() -> std::io::Result<SimIms> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Like [`SimIms::start`] on a chosen address (a compose service binds
    /// `0.0.0.0` so the proxy's container can reach it).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<SimIms> {
        let state = Arc::new(ImsState::new());
        let handler_state = Arc::clone(&state);
        let server = serve_on(addr, move |req| handle(Arc::clone(&handler_state), req)).await?;
        Ok(SimIms { state, server })
    }

    /// The address the simulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT/ims/token/v3`.
    pub fn token_url(&self) -> String {
        format!("http://{}{}", self.addr(), TOKEN_PATH)
    }

    /// Shared, thread-safe control and inspection handle.
    pub fn state(&self) -> Arc<ImsState> {
        Arc::clone(&self.state)
    }
}

/// What one token request looked like, as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The decoded form pairs of the body, in order (lossy UTF-8).
    pub form: Vec<(String, String)>,
}

/// Behaviour switches and counters of a [`SimIms`]; every method takes
/// `&self`.
pub struct ImsState {
    inner: Mutex<Inner>,
    expires_in: AtomicU64,
    millis: AtomicBool,
    fail_next: AtomicUsize,
    down: AtomicBool,
    delay_micros: AtomicU64,
    calls: AtomicUsize,
    issued: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    /// client_id -> live secrets.
    clients: HashMap<String, Vec<String>>,
    /// token -> deadline (`None`: beyond what `Instant` can represent).
    tokens: HashMap<String, Option<Instant>>,
    last_request: Option<TokenRequest>,
    /// The last token request of each `client_id`, for tests where several credentials refresh.
    last_by_client: HashMap<String, TokenRequest>,
}

impl ImsState {
    fn new() -> Self {
        ImsState {
            inner: Mutex::new(Inner::default()),
            expires_in: AtomicU64::new(DEFAULT_EXPIRES_IN),
            millis: AtomicBool::new(false),
            fail_next: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            delay_micros: AtomicU64::new(0),
            calls: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Make `secret` a live secret of `client_id` (a client may hold several).
    pub fn add_client(&self, client_id: &str, secret: &str) {
        let mut inner = self.lock();
        let secrets = inner.clients.entry(client_id.to_owned()).or_default();
        if !secrets.iter().any(|s| s == secret) {
            secrets.push(secret.to_owned());
        }
    }

    /// Stop accepting `secret` for `client_id` (tokens already issued stay valid).
    pub fn revoke_secret(&self, client_id: &str, secret: &str) {
        if let Some(secrets) = self.lock().clients.get_mut(client_id) {
            secrets.retain(|s| s != secret);
        }
    }

    /// Lifetime of tokens issued from now on, in seconds (default 86399).
    pub fn set_expires_in(&self, seconds: u64) {
        self.expires_in.store(seconds, Ordering::SeqCst);
    }

    /// Answer `expires_in` in milliseconds, as older IMS endpoints did. The
    /// token's real lifetime is unchanged.
    pub fn set_expires_in_millis(&self, on: bool) {
        self.millis.store(on, Ordering::SeqCst);
    }

    /// The next `n` token requests answer HTTP 503
    /// `{"error":"temporarily_unavailable","error_description":"simulated outage"}`.
    pub fn fail_next(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// While down, every request answers 503 as in [`ImsState::fail_next`].
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Wait this long before answering any request.
    pub fn set_delay(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.delay_micros.store(micros, Ordering::SeqCst);
    }

    /// Requests received on the token path, failed ones included.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Tokens issued.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    /// Whether `token` was issued here, has not expired and was not revoked.
    pub fn token_is_valid(&self, token: &str) -> bool {
        match self.lock().tokens.get(token) {
            Some(Some(deadline)) => Instant::now() < *deadline,
            Some(None) => true,
            None => false,
        }
    }

    /// Make every token issued so far invalid (an upstream checking against
    /// this IMS then answers 401).
    pub fn revoke_all_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// The last token request received (including ones answered with an error).
    pub fn last_request(&self) -> Option<TokenRequest> {
        self.lock().last_request.clone()
    }

    /// The last token request that named this `client_id` (including ones answered with an error).
    pub fn last_request_from(&self, client_id: &str) -> Option<TokenRequest> {
        self.lock().last_by_client.get(client_id).cloned()
    }

    /// Try to take one of the `fail_next` failures.
    fn take_failure(&self) -> bool {
        self.fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn issue(&self) -> (String, u64) {
        let seconds = self.expires_in.load(Ordering::SeqCst);
        let token = format!("sim-{}", random_hex(16));
        let now = Instant::now();
        let deadline = now.checked_add(Duration::from_secs(seconds));
        {
            let mut inner = self.lock();
            if inner.tokens.len() >= 4096 {
                inner.tokens.retain(|_, d| match d {
                    Some(d) => now < *d,
                    None => true,
                });
            }
            inner.tokens.insert(token.clone(), deadline);
        }
        self.issued.fetch_add(1, Ordering::SeqCst);
        let expires_in = if self.millis.load(Ordering::SeqCst) {
            seconds.saturating_mul(1000)
        } else {
            seconds
        };
        (token, expires_in)
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<SimBody> {
    json_response(
        status,
        &json!({ "error": error, "error_description": description }),
    )
}

fn outage() -> Response<SimBody> {
    oauth_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "simulated outage",
    )
}

/// Decode an `application/x-www-form-urlencoded` body into ordered pairs.
fn decode_form(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        percent_decode_str(&s).decode_utf8_lossy().into_owned()
    };
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.split(';').next().is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    })
}

async fn handle(state: Arc<ImsState>, req: Request<Incoming>) -> Response<SimBody> {
    let is_token_path = req.uri().path() == TOKEN_PATH;
    if is_token_path {
        state.calls.fetch_add(1, Ordering::SeqCst);
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let method = req.method().clone();
    // Read the (small) body first so the connection stays reusable whatever
    // the answer.
    let body: Option<Bytes> = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Some(collected.to_bytes()),
        Err(_) => None,
    };

    let delay = state.delay_micros.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_micros(delay)).await;
    }
    if is_token_path {
        let request = TokenRequest {
            content_type: content_type.clone(),
            form: body.as_deref().map(decode_form).unwrap_or_default(),
        };
        let mut inner = state.lock();
        if let Some((_, id)) = request.form.iter().find(|(k, _)| k == "client_id") {
            inner.last_by_client.insert(id.clone(), request.clone());
        }
        inner.last_request = Some(request);
    }
    if state.down.load(Ordering::SeqCst) {
        return outage();
    }
    if !is_token_path || method != Method::POST {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": "not_found", "error_description": "no such endpoint" }),
        );
    }
    if state.take_failure() {
        return outage();
    }
    let Some(body) = body else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "request body too large or unreadable",
        );
    };
    if !is_form(content_type.as_deref()) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "content type must be application/x-www-form-urlencoded",
        );
    }
    let form = decode_form(&body);
    let param = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if param("grant_type") != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "unsupported grant_type parameter",
        );
    }
    let client_ok = match (param("client_id"), param("client_secret")) {
        (Some(id), Some(secret)) => state
            .lock()
            .clients
            .get(id)
            .is_some_and(|secrets| secrets.iter().any(|s| s == secret)),
        _ => false,
    };
    if !client_ok {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "invalid client_secret parameter",
        );
    }
    let scope_ok = matches!(param("scope"), Some(s) if !s.trim().is_empty());
    if !scope_ok {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "invalid scope parameter",
        );
    }
    let (token, expires_in) = state.issue();
    let mut resp = json_response(
        StatusCode::OK,
        &json!({ "access_token": token, "token_type": "bearer", "expires_in": expires_in }),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
