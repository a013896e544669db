//! Simulated Workfront/Fusion-style upstream API.
//!
//! Paths (matched on their ending, so any route prefix works):
//! - `.../download?bytes=N`: streams `N` bytes of [`pattern_byte`] (never
//!   allocated whole), with `Content-Length`;
//! - `POST|PUT .../upload`: hashes the streamed body, answers
//!   `{"bytes": n, "sha256": "<hex>"}`;
//! - `.../slow?ms=N`: answers `{"slow":true}` after `N` ms;
//! - `.../status/NNN`: answers status `NNN` (429 as Adobe's gateway does, with
//!   `Retry-After: 2`, or the `?retry_after=` value, `none` for no header);
//! - anything else: a JSON echo of the request plus a Workfront-like `data`
//!   array.
//!
//! With an [`ImsState`], every request must carry
//! `Authorization: Bearer <token valid at that IMS>`, else 401 with the
//! gateway's `{"error_code":"401013","message":"Oauth token is not valid"}`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::ims::ImsState;
use super::{json_response, random_hex, serve_on, ServerHandle, SimBody};

/// Download chunk size.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Period of the download pattern.
const PERIOD: u64 = 251;

/// Request bodies kept in [`SeenRequest::body`] (and echoed) up to this size.
pub const MAX_STORED_BODY: usize = 1024 * 1024;

/// Requests kept by [`UpstreamState::requests`].
pub const MAX_SEEN: usize = 10_000;

/// Byte `i` of every `/download` answer.
pub fn pattern_byte(i: u64) -> u8 {
    (i % PERIOD) as u8
}

/// One chunk + one period of the pattern, so that any chunk is a zero-copy
/// slice of it.
fn pattern_buffer() -> &'static Bytes {
    static BUF: OnceLock<Bytes> = OnceLock::new();
    BUF.get_or_init(|| {
        (0..(CHUNK as u64 + PERIOD))
            .map(pattern_byte)
            .collect::<Vec<u8>>()
            .into()
    })
}

/// `len` (at most [`CHUNK`]) pattern bytes starting at byte `offset`.
pub(crate) fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    let len = len.min(CHUNK);
    let start = (offset % PERIOD) as usize;
    pattern_buffer().slice(start..start + len)
}

/// Lower-case hex SHA-256 of the first `n` pattern bytes, computed in chunks.
pub fn pattern_sha256(n: u64) -> String {
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    while offset < n {
        let len = (n - offset).min(CHUNK as u64);
        hasher.update(pattern_chunk(offset, len as usize));
        offset += len;
    }
    hex::encode(hasher.finalize())
}

/// A running simulated upstream API on `127.0.0.1`; stops when dropped.
pub struct SimUpstream {
    state: Arc<UpstreamState>,
    server: ServerHandle,
}

impl SimUpstream {
    /// Bind `127.0.0.1:0` and start serving. With `Some(ims)`, every request
    /// must carry a bearer token that is valid at that IMS.
    pub async fn start(ims: Option<Arc<ImsState>>) -> std::io::Result<SimUpstream> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), ims).await
    }

    /// Like [`SimUpstream::start`] on a chosen address (a compose service
    /// binds `0.0.0.0` so the proxy's container can reach it).
    pub async fn bind(
        addr: SocketAddr,
        ims: Option<Arc<ImsState>>,
    ) -> std::io::Result<SimUpstream> {
        let state = Arc::new(UpstreamState::new(ims));
        let handler_state = Arc::clone(&state);
        let server = serve_on(addr, move |req| handle(Arc::clone(&handler_state), req)).await?;
        Ok(SimUpstream { state, server })
    }

    /// The address the simulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Shared, thread-safe control and inspection handle.
    pub fn state(&self) -> Arc<UpstreamState> {
        Arc::clone(&self.state)
    }
}

/// One request as the simulated upstream received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path only.
    pub path: String,
    /// Raw query as received.
    pub query: Option<String>,
    /// Headers exactly as received.
    pub headers: HeaderMap,
    /// HTTP version of the request.
    pub version: http::Version,
    /// First 1 MiB of the body (always empty for `/upload`).
    pub body: Bytes,
    /// Full body length.
    pub body_len: u64,
}

/// Behaviour switches and records of a [`SimUpstream`]; every method takes
/// `&self`.
pub struct UpstreamState {
    ims: Option<Arc<ImsState>>,
    reject_all: AtomicBool,
    reject_next: AtomicUsize,
    invalid_tokens: AtomicUsize,
    seen: Mutex<VecDeque<SeenRequest>>,
    count: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl UpstreamState {
    fn new(ims: Option<Arc<ImsState>>) -> Self {
        UpstreamState {
            ims,
            reject_all: AtomicBool::new(false),
            reject_next: AtomicUsize::new(0),
            invalid_tokens: AtomicUsize::new(0),
            seen: Mutex::new(VecDeque::new()),
            count: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    fn seen(&self) -> MutexGuard<'_, VecDeque<SeenRequest>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// While on, answer every request 401 (gateway-style body).
    pub fn reject_tokens(&self, on: bool) {
        self.reject_all.store(on, Ordering::SeqCst);
    }

    /// Answer the next `n` requests that would otherwise pass the token check
    /// with 401.
    pub fn reject_next(&self, n: usize) {
        self.reject_next.store(n, Ordering::SeqCst);
    }

    /// Every request seen since the last [`UpstreamState::clear`], oldest first
    /// (at most the last 10 000).
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen().iter().cloned().collect()
    }

    /// The most recent request.
    pub fn last(&self) -> Option<SeenRequest> {
        self.seen().back().cloned()
    }

    /// Requests seen since the last [`UpstreamState::clear`] (not capped).
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Requests that arrived without exactly one `Authorization` carrying a
    /// token the simulated IMS considers valid at arrival (expired, revoked,
    /// unknown or missing); never reset.
    pub fn invalid_tokens(&self) -> usize {
        self.invalid_tokens.load(Ordering::SeqCst)
    }

    /// Highest number of requests in flight at once since the last
    /// [`UpstreamState::clear`]. A request is in flight from its arrival until
    /// its response body has been fully produced or dropped.
    pub fn max_concurrent(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Forget the recorded requests, the count and the concurrency high-water
    /// mark (reset to the requests in flight now).
    pub fn clear(&self) {
        self.seen().clear();
        self.count.store(0, Ordering::SeqCst);
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn record(&self, parts: &Parts, body: Bytes, body_len: u64) {
        let seen = SeenRequest {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers.clone(),
            version: parts.version,
            body,
            body_len,
        };
        let mut list = self.seen();
        if list.len() >= MAX_SEEN {
            list.pop_front();
        }
        list.push_back(seen);
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// The token check; consumes one `reject_next` when the token is fine.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        if let Some(ims) = &self.ims {
            let mut values = headers.get_all(header::AUTHORIZATION).iter();
            let token = match (values.next(), values.next()) {
                (Some(v), None) => v.to_str().ok().and_then(bearer_token),
                // Missing, or sent twice (a client credential leaking through).
                _ => None,
            };
            if !token.is_some_and(|t| ims.token_is_valid(t)) {
                self.invalid_tokens.fetch_add(1, Ordering::SeqCst);
                return false;
            }
        }
        if self.reject_all.load(Ordering::SeqCst) {
            return false;
        }
        self.reject_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
    }
}

fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Counts a request as in flight until dropped.
struct InFlight(Arc<UpstreamState>);

impl InFlight {
    fn enter(state: &Arc<UpstreamState>) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Read the whole body, keeping the first [`MAX_STORED_BODY`] bytes.
async fn read_body(mut body: Incoming) -> (Bytes, u64) {
    let mut kept = BytesMut::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            let room = MAX_STORED_BODY.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    (kept.freeze(), len)
}

/// Hash the body as it streams in; nothing is kept.
async fn hash_body(mut body: Incoming) -> (u64, String) {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    (len, hex::encode(hasher.finalize()))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `NNN` of a path ending in `/status/NNN`, if a valid final status.
fn status_of(path: &str) -> Option<StatusCode> {
    let mut segments = path.rsplit('/');
    let code = segments.next()?;
    if segments.next()? != "status" {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
}

/// Add the headers every answer carries, and the in-flight guard.
fn finish(mut resp: Response<SimBody>, guard: InFlight) -> Response<SimBody> {
    let headers = resp.headers_mut();
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_static("session=sim-upstream; Path=/"),
    );
    if let Ok(id) = HeaderValue::from_str(&random_hex(16)) {
        headers.insert("x-upstream-request-id", id);
    }
    // Hop-by-hop: the proxy must strip it.
    headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    resp.map(|body| body.with_guard(guard))
}

fn unauthorized() -> Response<SimBody> {
    json_response(
        StatusCode::UNAUTHORIZED,
        &json!({ "error_code": "401013", "message": "Oauth token is not valid" }),
    )
}

fn bad_request(message: &str) -> Response<SimBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({ "error_code": "400", "message": message }),
    )
}

async fn handle(state: Arc<UpstreamState>, req: Request<Incoming>) -> Response<SimBody> {
    let guard = InFlight::enter(&state);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let authorized = state.authorized(&parts.headers);

    if path.ends_with("/upload") && (parts.method == Method::POST || parts.method == Method::PUT) {
        let (len, digest) = hash_body(body).await;
        state.record(&parts, Bytes::new(), len);
        let resp = if authorized {
            json_response(StatusCode::OK, &json!({ "bytes": len, "sha256": digest }))
        } else {
            unauthorized()
        };
        return finish(resp, guard);
    }

    let (kept, len) = read_body(body).await;
    state.record(&parts, kept.clone(), len);
    if !authorized {
        return finish(unauthorized(), guard);
    }
    let query = parts.uri.query();

    let resp = if path.ends_with("/download")
        && (parts.method == Method::GET || parts.method == Method::HEAD)
    {
        match query_param(query, "bytes").and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => {
                let mut resp = Response::new(SimBody::pattern(n));
                let headers = resp.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                resp
            }
            None => bad_request("download needs ?bytes=N"),
        }
    } else if path.ends_with("/slow") {
        let ms = query_param(query, "ms")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        json_response(StatusCode::OK, &json!({ "slow": true }))
    } else if let Some(status) = status_of(path) {
        if status == StatusCode::TOO_MANY_REQUESTS {
            let mut resp = json_response(
                status,
                &json!({ "error_code": "429050", "message": "Too many requests" }),
            );
            // `?retry_after=` picks the value (seconds or an HTTP-date), `none` omits it.
            let retry_after = query_param(query, "retry_after")
                .map(|v| {
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned()
                })
                .unwrap_or_else(|| "2".into());
            if let Ok(v) = HeaderValue::from_str(&retry_after) {
                if retry_after != "none" {
                    resp.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            resp
        } else if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            let mut resp = Response::new(SimBody::empty());
            *resp.status_mut() = status;
            resp
        } else {
            json_response(
                status,
                &json!({ "error_code": status.as_str(), "message": "simulated status" }),
            )
        }
    } else {
        echo(&parts, &kept)
    };
    finish(resp, guard)
}

fn echo(parts: &Parts, body: &Bytes) -> Response<SimBody> {
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_owned(), joined.into());
    }
    json_response(
        StatusCode::OK,
        &json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(body),
            "data": [{
                "ID": "4c78821c0000d6fa8d5e52f07a1d54d0",
                "name": "Demo project",
                "objCode": "PROJ",
            }],
        }),
    )
}
