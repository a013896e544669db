//! The hot path, in the order a request lives it:
//! accept → route → admit → rewrite → forward → stream back → record.

use crate::access::{api_key_candidates, Client, Refusal};
use crate::body::{full, streamed, AnyBody, ClientBody, Counted, ProxyBody};
use crate::conn::{ConnInfo, ExchangeGuard};
use crate::error::ProxyError;
use crate::metrics::{Chargeback, Metrics};
use crate::recycle;
use crate::rewrite::{self, has_dot_segment, is_form, redacted_target, scrub_form, scrub_query};
use crate::route::Route;
use crate::slots::{Slot, TimedOut};
use crate::state::{CredentialRuntime, Shared, Snapshot};
use crate::token::Token;
use crate::upstream::{Answer, Checkin, Outgoing, UpstreamError};
use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use prometheus::IntGauge;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static X_GW_IMS_ORG_ID: HeaderName = HeaderName::from_static("x-gw-ims-org-id");
static X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 ims-proxy");

/// Decrements a gauge when dropped.
struct GaugeGuard(IntGauge);

impl GaugeGuard {
    fn new(g: &IntGauge) -> Self {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The per-request context handed along the journey.
pub struct RequestCtx {
    /// Request id (the client's `x-request-id` if sane, else a new one).
    pub request_id: HeaderValue,
    /// When the request head arrived.
    pub start: Instant,
    /// Request method.
    pub method: Method,
    /// The request target as received (logged with credentials redacted).
    pub uri: Uri,
    /// Matched route.
    pub route: Option<Arc<Route>>,
    /// Admitted client.
    pub client: Option<Client>,
    /// Time to the upstream's response head.
    pub upstream_time: Option<Duration>,
    /// Fingerprint of the token sent.
    pub token_fingerprint: Option<Arc<str>>,
    /// The upstream's own request id, if it sent one.
    pub upstream_request_id: Option<String>,
}

fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    fresh_request_id()
}

/// A random per-process prefix and a counter, 32 hex digits: unique without a
/// random draw and a `format!` per request. Each thread counts in a range of its
/// own (2^40 ids wide), so workers do not pass one shared counter back and forth
/// between their cores on every request.
fn fresh_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static RANGES: AtomicU64 = AtomicU64::new(0);
    const RANGE: u64 = 1 << 40;
    thread_local! {
        static NEXT: std::cell::Cell<u64> =
            std::cell::Cell::new(RANGES.fetch_add(RANGE, Ordering::Relaxed));
    }
    let prefix = *PREFIX.get_or_init(rand::random);
    let counted = NEXT.try_with(|next| {
        let n = next.get();
        // At the end of a range (a trillion ids), the thread takes a new one.
        let following = n.wrapping_add(1);
        next.set(if following % RANGE == 0 {
            RANGES.fetch_add(RANGE, Ordering::Relaxed)
        } else {
            following
        });
        n
    });
    // A thread already tearing down its locals draws one id from the shared count.
    let n = counted.unwrap_or_else(|_| RANGES.fetch_add(1, Ordering::Relaxed));
    let mut hex = [0u8; 32];
    let halves = hex::encode_to_slice(prefix.to_be_bytes(), &mut hex[..16])
        .and_then(|()| hex::encode_to_slice(n.to_be_bytes(), &mut hex[16..]));
    match halves {
        // Owned by a shared buffer from the start: the id is cloned into the upstream
        // request and the response, and a copied `Bytes` would allocate again on its
        // first clone to become shareable.
        Ok(()) => HeaderValue::from_maybe_shared(Bytes::from_owner(hex))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        Err(_) => HeaderValue::from_static("unknown"),
    }
}

/// Serves one request; never fails (refusals are responses).
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<ClientBody>,
) -> Result<Response<ProxyBody>, Infallible> {
    let exchange = ExchangeGuard::new(&conn);
    let snap = shared.snapshot.load_full();
    let (mut parts, body) = req.into_parts();
    let mut ctx = RequestCtx {
        request_id: request_id(&parts.headers),
        start: Instant::now(),
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        route: None,
        client: None,
        upstream_time: None,
        token_fingerprint: None,
        upstream_request_id: None,
    };
    let outcome = journey(&snap, &shared.metrics, &conn, &mut ctx, &mut parts, body).await;
    // The request's map holds a later head's fields on this thread.
    recycle::give_map(std::mem::take(&mut parts.headers));
    let resp = match outcome {
        // One box for all the guards the response body carries.
        Ok((resp, guards)) => resp.map(|b| b.with_guard((guards, exchange))),
        Err(e) => {
            if matches!(
                e,
                ProxyError::UpstreamProtocol
                    | ProxyError::UpstreamUnreachable
                    | ProxyError::UpstreamTimeout(_)
            ) {
                tracing::warn!(request_id = ?ctx.request_id, error = %e, "upstream failure");
            }
            let id = ctx.request_id.to_str().unwrap_or("unknown");
            e.to_response(id).map(|b| full(b).with_guard(exchange))
        }
    };
    record(&shared, &ctx, resp.status());
    Ok(resp)
}

async fn journey(
    snap: &Snapshot,
    metrics: &Metrics,
    conn: &ConnInfo,
    ctx: &mut RequestCtx,
    // Borrowed: an async fn holds an argument taken by value twice.
    parts: &mut Parts,
    body: ClientBody,
) -> Result<(Response<ProxyBody>, JourneyGuards), ProxyError> {
    refuse_unsafe_target(parts)?;
    if !snap.access.source_allowed(conn.peer.ip()) {
        metrics
            .auth_failures
            .with_label_values(&["forbidden"])
            .inc();
        return Err(ProxyError::SourceForbidden);
    }
    let route = snap
        .router
        .find(parts.uri.path())
        .ok_or(ProxyError::NoRoute)?
        .clone();
    ctx.route = Some(route.clone());
    let inflight = GaugeGuard::new(&route.inflight);
    let (client, held) = admit(snap, metrics, &route, parts, body, ctx).await?;
    let cred = snap
        .credentials
        .get(&route.config.credential)
        .cloned()
        .ok_or_else(|| ProxyError::TokenUnavailable {
            credential: route.config.credential.clone(),
            retry_after: Duration::from_secs(1),
        })?;
    hold_back(&cred)?;
    let slot = acquire_slot(&cred, &client.name).await?;
    let token = cred
        .manager
        .token()
        .await
        .map_err(|u| ProxyError::TokenUnavailable {
            credential: cred.config.name.clone(),
            retry_after: u.retry_after,
        })?;
    let form_len = match &held {
        Held::Form(b) => Some(b.len()),
        _ => None,
    };
    rewrite_request(parts, &route, &cred, &token, ctx, form_len);
    let chargeback = snap.chargeback.get(metrics, route.name(), &client.name);
    let counter = chargeback.request_bytes.clone();
    let upstream = Upstream {
        snap,
        metrics,
        route: &route,
        cred: &cred,
    };
    // One await point per path: each awaited future takes room in this one, which
    // is copied whole when created.
    let (resp, checkin) = match held {
        Held::Stream(body) => {
            let body = streamed(body, Some(counter)).without_trailers();
            // Boxed: every request's future would otherwise carry the rarer path's state.
            let parts = std::mem::replace(parts, Request::new(()).into_parts().0);
            Box::pin(upstream.send_streamed(ctx, parts, body, token)).await?
        }
        held => {
            let body = match held {
                Held::Form(bytes) => {
                    counter.inc_by(bytes.len() as u64);
                    bytes
                }
                _ => Bytes::new(),
            };
            upstream.send_held(ctx, parts, body, &token).await?
        }
    };
    Ok((
        stream_back(resp, &route, &cred, &chargeback, ctx),
        (inflight, slot, checkin),
    ))
}

/// What a proxied response's body keeps alive besides the exchange: the route's
/// in-flight gauge, the credential's `max_in_flight` slot, and the upstream
/// connection's way back to its pool.
type JourneyGuards = (GaugeGuard, Option<Slot>, Checkin);

/// Where a request goes once rewritten: the route's upstream, with its credential.
struct Upstream<'a> {
    snap: &'a Snapshot,
    metrics: &'a Metrics,
    route: &'a Route,
    cred: &'a CredentialRuntime,
}

impl Upstream<'_> {
    /// A body the proxy holds: on an upstream 401, sent once more with a fresh token.
    async fn send_held(
        &self,
        ctx: &mut RequestCtx,
        // Borrowed: an async fn holds an argument taken by value twice.
        parts: &mut Parts,
        body: Bytes,
        token: &Token,
    ) -> Result<Answer, ProxyError> {
        let mut renewed = false;
        // A loop, so that one `send` future serves both tries.
        loop {
            let out = Outgoing::Held { parts, body: &body };
            let answer = self.send(ctx, out).await?;
            if renewed || answer.0.status() != StatusCode::UNAUTHORIZED {
                return Ok(answer);
            }
            // Boxed: a refresh's state is large, and only a 401 needs it.
            let refreshed = Box::pin(self.cred.manager.refresh_after_rejection(token)).await;
            let Some(fresh) = refreshed else {
                return Ok(answer);
            };
            drop(answer);
            tracing::info!(request_id = ?ctx.request_id, "upstream 401: replaying with a fresh token");
            parts
                .headers
                .insert(header::AUTHORIZATION, fresh.header.clone());
            ctx.token_fingerprint = Some(fresh.fingerprint.clone());
            renewed = true;
        }
    }

    /// A streamed body cannot be sent twice: a 401 is passed on, and the token renewed for the next requests.
    async fn send_streamed(
        &self,
        ctx: &mut RequestCtx,
        parts: Parts,
        body: ProxyBody,
        token: Arc<Token>,
    ) -> Result<Answer, ProxyError> {
        let answer = self
            .send(
                ctx,
                Outgoing::Streamed(Box::new(Request::from_parts(parts, body))),
            )
            .await?;
        if answer.0.status() == StatusCode::UNAUTHORIZED {
            let manager = self.cred.manager.clone();
            tokio::spawn(async move {
                manager.refresh_after_rejection(&token).await;
            });
        }
        Ok(answer)
    }

    /// Sends the request and waits for the response head (bounded by `upstream_timeout`).
    async fn send(&self, ctx: &mut RequestCtx, req: Outgoing<'_>) -> Result<Answer, ProxyError> {
        let started = Instant::now();
        let c = &self.route.config;
        let timeout = c.upstream_timeout;
        // The deadline is the upstream client's to keep: its own exchange times
        // out on a timer each connection keeps, not one made per request.
        let result = self
            .snap
            .upstream
            .request(
                &c.upstream_scheme,
                &c.upstream_authority,
                req,
                deadline(started, timeout),
            )
            .await;
        let elapsed = started.elapsed();
        ctx.upstream_time = Some(elapsed);
        let (kind, err) = match result {
            Ok(answer) => {
                self.route.upstream_duration.observe(elapsed.as_secs_f64());
                return Ok(answer);
            }
            Err(e) if e.is_timeout() => ("timeout", ProxyError::UpstreamTimeout(timeout)),
            Err(e) => {
                tracing::debug!(route = self.route.name(), error = %e, "upstream request failed");
                if client_body_failed(&e) {
                    // The client's own body broke (bad chunking, gone mid-upload): its fault,
                    // not the upstream's, so no upstream error is counted.
                    return Err(ProxyError::ClientBody);
                }
                if e.is_connect() {
                    ("connect", ProxyError::UpstreamUnreachable)
                } else {
                    ("protocol", ProxyError::UpstreamProtocol)
                }
            }
        };
        self.metrics
            .upstream_errors
            .with_label_values(&[self.route.name(), kind])
            .inc();
        Err(err)
    }
}

/// When an upstream request that starts at `started` must have its answer: a
/// `timeout` too large to add (the config sets no upper bound) means a year.
fn deadline(started: Instant, timeout: Duration) -> Instant {
    started
        .checked_add(timeout)
        .unwrap_or_else(|| started + Duration::from_secs(365 * 86_400))
}

/// True when an upstream request failed because the streamed client body did: the
/// client-side hyper error wraps the server-side one that read the client's bytes.
fn client_body_failed(e: &UpstreamError) -> bool {
    let UpstreamError::Http(e) = e else {
        return false;
    };
    let mut hyper_errors = 0;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if hyper_errors == 0 && !h.is_user() {
                return false;
            }
            hyper_errors += 1;
        }
        source = s.source();
    }
    hyper_errors >= 2
}

/// CONNECT, foreign absolute-form targets and dot segments never get further.
fn refuse_unsafe_target(parts: &Parts) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    if parts.version < Version::HTTP_2 {
        if let Some(authority) = parts.uri.authority() {
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            if !host.eq_ignore_ascii_case(authority.as_str()) {
                return Err(ProxyError::BadRequest(
                    "absolute-form target names another host: this is not a forward proxy",
                ));
            }
        }
    }
    let path = parts.uri.path();
    if !path.starts_with('/') {
        return Err(ProxyError::BadRequest("the request target must be a path"));
    }
    if has_dot_segment(path) {
        return Err(ProxyError::BadRequest(
            "dot segments are not allowed in the path",
        ));
    }
    Ok(())
}

/// A request body: held whole (form bodies, empty bodies) or streamed.
enum Held {
    Empty,
    Form(Bytes),
    Stream(Incoming),
}

/// Who is asking, and may they? Reads a form body only when it has to.
async fn admit(
    snap: &Snapshot,
    metrics: &Metrics,
    route: &Route,
    parts: &Parts,
    body: ClientBody,
    ctx: &mut RequestCtx,
) -> Result<(Client, Held), ProxyError> {
    let access = &snap.access;
    let form = is_form(&parts.headers);
    let max = snap.config.server.max_scrub_body_bytes;
    let header_timeout = snap.config.server.header_read_timeout;
    let refused = |r: Refusal| {
        let reason = if r == Refusal::Missing {
            "missing"
        } else {
            "invalid"
        };
        metrics.auth_failures.with_label_values(&[reason]).inc();
        ProxyError::Unauthorized {
            missing: r == Refusal::Missing,
        }
    };
    let mut body = Some(body);
    let mut form_bytes = None;
    let client = if !access.needs_key() {
        access.anonymous()
    } else {
        match access.admit(&parts.headers, parts.uri.query()) {
            Ok(c) => c,
            // A wrong header key with `Expect: 100-continue` is refused before the body is
            // invited; otherwise a form body may still carry the key (any candidate admits).
            Err(r) if !form || (r == Refusal::Invalid && expects_continue(&parts.headers)) => {
                return Err(refused(r))
            }
            Err(r) => {
                // A legacy client may carry its key only in the form body.
                let Some(b) = body.take() else {
                    return Err(refused(r));
                };
                let bytes = read_form(parts, b, max, header_timeout).await?;
                let c = access
                    .first_match(&api_key_candidates(&bytes))
                    .map_err(refused)?;
                form_bytes = Some(bytes);
                c
            }
        }
    };
    ctx.client = Some(client.clone());
    if !client.may_use(route.name()) {
        metrics
            .auth_failures
            .with_label_values(&["forbidden"])
            .inc();
        return Err(ProxyError::RouteForbidden(route.name().to_string()));
    }
    if let Err(wait) = client.take_rate() {
        metrics
            .auth_failures
            .with_label_values(&["rate_limited"])
            .inc();
        return Err(ProxyError::RateLimited { retry_after: wait });
    }
    let held = match (form_bytes, body) {
        (Some(bytes), _) => Held::Form(scrub(&bytes)?),
        (None, Some(b)) if form => {
            Held::Form(scrub(&read_form(parts, b, max, header_timeout).await?)?)
        }
        (None, Some(ClientBody::Incoming(b))) if !b.is_end_stream() => Held::Stream(b),
        (None, _) => Held::Empty,
    };
    Ok((client, held))
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

fn scrub(form: &[u8]) -> Result<Bytes, ProxyError> {
    scrub_form(form)
        .map_err(|_| ProxyError::BadRequest("malformed form body (bad percent-encoding)"))
}

/// Reads a form body whole, up to `max` bytes (413 beyond, before reading when the length says so).
/// The whole body must arrive within `deadline` (the head's limit): a client that
/// trickles a form body cannot hold a connection and a buffer open for ever.
async fn read_form(
    parts: &Parts,
    body: ClientBody,
    max: u64,
    deadline: Duration,
) -> Result<Bytes, ProxyError> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(ProxyError::PayloadTooLarge(max));
    }
    if parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(ProxyError::BadRequest(
            "compressed form bodies cannot be scrubbed of credentials",
        ));
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let collected = tokio::time::timeout(deadline, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ProxyError::BadRequest("the form body did not arrive in time"))?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ProxyError::PayloadTooLarge(max))
        }
        Err(_) => Err(ProxyError::ClientBody),
    }
}

/// Waits for the credential to be usable upstream again after a 429 with Retry-After.
fn hold_back(cred: &CredentialRuntime) -> Result<(), ProxyError> {
    if !cred.config.respect_retry_after {
        return Ok(());
    }
    let until = *cred.hold_until.lock().unwrap_or_else(|e| e.into_inner());
    match until {
        Some(t) if t > Instant::now() => Err(ProxyError::RateLimited {
            retry_after: t - Instant::now(),
        }),
        _ => Ok(()),
    }
}

/// A `max_in_flight` slot, waiting in the key-fair queue up to `queue_timeout`.
async fn acquire_slot(cred: &CredentialRuntime, key: &str) -> Result<Option<Slot>, ProxyError> {
    let Some(slots) = &cred.slots else {
        return Ok(None);
    };
    if let Some(slot) = slots.try_acquire() {
        return Ok(Some(slot));
    }
    // The gauge comes down even when the waiting request is cancelled.
    let _queued = GaugeGuard::new(&cred.queued);
    match slots.acquire(key, cred.config.queue_timeout).await {
        Ok(slot) => Ok(Some(slot)),
        Err(TimedOut) => Err(ProxyError::Overloaded {
            credential: cred.config.name.clone(),
            retry_after: Duration::from_secs(1),
        }),
    }
}

/// Credentials out, the proxy's own in; the upstream URI and Host.
fn rewrite_request(
    parts: &mut Parts,
    route: &Route,
    cred: &CredentialRuntime,
    token: &Token,
    ctx: &mut RequestCtx,
    form_len: Option<usize>,
) {
    let query = parts.uri.query().and_then(scrub_query);
    let pq = route.upstream_target(parts.uri.path(), query.as_deref());
    let c = &route.config;
    // Origin-form: the upstream client adds scheme and authority where HTTP/2 needs them.
    // The path was already validated by hyper and only lost parameters: this cannot fail.
    if let Ok(pq) = PathAndQuery::from_maybe_shared(pq) {
        parts.uri = Uri::from(pq);
    }
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    rewrite::strip_request_headers(h, c.pass_cookies);
    h.insert(header::AUTHORIZATION, token.header.clone());
    if c.send_api_key {
        h.insert(&X_API_KEY, cred.api_key.clone());
    }
    if let Some(org) = &cred.org_id {
        h.insert(&X_GW_IMS_ORG_ID, org.clone());
    }
    for (n, v) in &c.headers {
        h.insert(n, v.clone());
    }
    h.insert(
        &X_REQUEST_ID,
        rewrite::never_indexed(ctx.request_id.clone()),
    );
    h.insert(header::HOST, route.host.clone());
    h.append(header::VIA, VIA_VALUE.clone());
    if let Some(n) = form_len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    ctx.token_fingerprint = Some(token.fingerprint.clone());
}

/// The upstream's response, cleaned, streamed to the client.
fn stream_back(
    resp: Response<AnyBody>,
    route: &Route,
    cred: &CredentialRuntime,
    chargeback: &Chargeback,
    ctx: &mut RequestCtx,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    ctx.upstream_request_id = parts
        .headers
        .get(&X_REQUEST_ID)
        .or_else(|| parts.headers.get(&X_UPSTREAM_REQUEST_ID))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if parts.status == StatusCode::TOO_MANY_REQUESTS {
        chargeback.upstream_throttled.inc();
        if cred.config.respect_retry_after {
            if let Some(wait) = parts
                .headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after_delay(v, SystemTime::now()))
            {
                let until = Instant::now() + wait;
                let mut held = cred.hold_until.lock().unwrap_or_else(|e| e.into_inner());
                // Concurrent 429s: the latest deadline wins.
                *held = Some(held.map_or(until, |t| t.max(until)));
            }
        }
    }
    // The upstream may have answered over HTTP/2; the client's connection decides the framing.
    parts.version = Version::HTTP_11;
    rewrite::strip_response_headers(&mut parts.headers, route.config.pass_cookies);
    parts.headers.insert(
        &X_REQUEST_ID,
        rewrite::never_indexed(ctx.request_id.clone()),
    );
    Response::from_parts(
        parts,
        Counted::new(body, Some(chargeback.response_bytes.clone())),
    )
}

/// Longest hold-back a `Retry-After` can impose, whatever it says.
const MAX_HOLD_BACK: Duration = Duration::from_secs(3600);

/// How long a `Retry-After` value (delay-seconds or HTTP-date, RFC 9110 §10.2.3)
/// asks to wait from `now`, capped at an hour; `None` if unreadable.
fn retry_after_delay(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_HOLD_BACK))
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Metrics, the access-log line and the audit line.
fn record(shared: &Shared, ctx: &RequestCtx, status: StatusCode) {
    let route = ctx.route.as_ref().map(|r| r.name()).unwrap_or("none");
    let client = ctx.client.as_ref().map(|c| &*c.name).unwrap_or("none");
    let elapsed = ctx.start.elapsed();
    shared.metrics.observe_request(
        ctx.route.as_ref(),
        ctx.client.as_ref().map(|c| &c.name),
        method_label(&ctx.method),
        status.as_u16(),
        elapsed.as_secs_f64(),
    );
    let request_id = ctx.request_id.to_str().unwrap_or("-");
    // Whole microseconds: integer fields format several times faster than floats.
    let duration_us = elapsed.as_micros() as u64;
    let upstream_us = ctx.upstream_time.map(|d| d.as_micros() as u64);
    let target = redacted_target(ctx.uri.path(), ctx.uri.query());
    crate::logging::access(&crate::logging::AccessLine {
        request_id,
        client,
        route,
        method: ctx.method.as_str(),
        path: &target,
        status: status.as_u16(),
        duration_us,
        upstream_us,
        token: ctx.token_fingerprint.as_deref(),
        upstream_request_id: ctx.upstream_request_id.as_deref(),
    });
    if let Some(audit) = &shared.audit {
        audit.record(&serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "request_id": request_id,
            "client": client,
            "route": route,
            "credential": ctx.route.as_ref().map(|r| r.config.credential.as_str()),
            "method": ctx.method.as_str(),
            "path": target,
            "status": status.as_u16(),
            "duration_ms": duration_us as f64 / 1000.0,
            "upstream_ms": upstream_us.map(|u| u as f64 / 1000.0),
            "upstream_request_id": ctx.upstream_request_id,
            "token_fingerprint": ctx.token_fingerprint.as_deref(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        assert_eq!(retry_after_delay(" 7 ", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after_delay(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after_delay(&past, now), Some(Duration::ZERO));
        assert_eq!(retry_after_delay("86400", now), Some(MAX_HOLD_BACK));
        assert_eq!(retry_after_delay("soon", now), None);
        assert_eq!(retry_after_delay("-1", now), None);
    }

    #[test]
    fn fresh_request_ids_are_distinct_within_and_across_threads() {
        let draw = || (0..1000).map(|_| fresh_request_id()).collect::<Vec<_>>();
        let others = std::thread::spawn(draw).join().expect("thread");
        let mine = draw();
        let mut all = std::collections::HashSet::new();
        for id in mine.iter().chain(&others) {
            assert_eq!(id.len(), 32, "{id:?}");
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
            assert!(all.insert(id.clone()), "repeated: {id:?}");
        }
        // One process prefix for all.
        assert_eq!(mine[0].as_bytes()[..16], others[0].as_bytes()[..16]);
    }

    #[test]
    fn an_upstream_deadline_never_overflows() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(86_400));
    }
}
