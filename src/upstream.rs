//! The pooled upstream client: keep-alive connections over rustls (web PKI
//! roots plus `ca_file`), HTTP/2 by ALPN, plain http for local upstreams, and
//! CONNECT tunnels through the egress proxy where one applies. One pool per
//! worker thread (see `workers`), so an upstream connection is always driven
//! on the thread whose requests use it.

use crate::body::{full, AnyBody, BoxError, ProxyBody};
use crate::config::OutboundConfig;
use crate::{h1, workers};
use bytes::Bytes;
use futures_util::FutureExt;
use http::uri::{Authority, Scheme};
use http::{request, Request, Response, Uri};
use hyper::client::conn::TrySendError;
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tower_service::Service;

/// Connections to upstreams: TLS (or plain http) over TCP, directly or tunnelled.
type Connector = HttpsConnector<EgressConnector>;

/// The client the hot path forwards with: one pool per worker thread.
///
/// Our own pool rather than hyper-util's: a worker's requests look up their
/// upstream among a handful by comparing the authority (no hashing), and a
/// connection goes back to its pool when the response body ends, without a task
/// spawned to wait for it (61.9k -> 53.0k instructions per proxied request).
#[derive(Clone)]
pub struct UpstreamClient {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    h2: http2::Builder<TokioExecutor>,
    idle_timeout: Duration,
    /// One per worker: only that worker's thread locks it (but the main runtime may share the first).
    pools: Box<[Mutex<Pool>]>,
}

/// One worker's connections, by upstream.
#[derive(Default)]
struct Pool {
    /// Appended to, never reordered: a `Checkin` keeps its upstream's index.
    hosts: Vec<Host>,
    /// Whether this pool's idle sweep is running.
    sweeping: bool,
}

/// One upstream's connections in one worker.
struct Host {
    scheme: Scheme,
    authority: Authority,
    /// Idle HTTP/1 connections on hyper's client, the most recently used last (reused first).
    idle: Vec<Idle>,
    /// Idle HTTP/1 connections for our own exchanges (`h1`), likewise.
    own_idle: Vec<OwnIdle>,
    /// The upstream's HTTP/2 connection, shared by all requests, and when it was last used.
    h2: Option<(http2::SendRequest<ProxyBody>, Instant)>,
    /// Whether the last TLS handshake chose HTTP/1.1 (ALPN); unknown until one did.
    speaks_http1: bool,
    /// A connect in progress that may bring an HTTP/2 connection: other requests
    /// wait for it rather than each opening one (see `Taken::Wait`).
    connecting: Option<Arc<Notify>>,
}

/// What a checkout gives a request.
enum Taken {
    /// A connection ready for it.
    Conn(Conn),
    /// Nothing kept: open a connection, holding the guard if others wait for it.
    Connect(Option<Connecting>),
    /// Another request is opening what may be a shared HTTP/2 connection: wait, then look again.
    Wait(OwnedNotified),
}

/// Marks a host's connect in progress; dropping it (done, failed or cancelled)
/// clears the mark and wakes the requests waiting on it.
struct Connecting {
    shared: Arc<Shared>,
    worker: usize,
    host: usize,
    notify: Arc<Notify>,
}

impl Drop for Connecting {
    fn drop(&mut self) {
        self.shared
            .with_host(self.worker, self.host, |h| h.connecting = None);
        self.notify.notify_waiters();
    }
}

struct Idle {
    tx: http1::SendRequest<ProxyBody>,
    since: Instant,
}

struct OwnIdle {
    conn: h1::Conn,
    since: Instant,
}

/// A connection taken for one request.
enum Conn {
    /// Through hyper's client.
    Hyper(HyperConn),
    /// Our own HTTP/1.1 exchange: requests with a body the proxy holds.
    Own(h1::Conn),
}

/// A connection hyper's client drives.
enum HyperConn {
    /// HTTP/1: requests with a streamed body.
    H1(http1::SendRequest<ProxyBody>),
    /// HTTP/2: every request to an upstream that chose it.
    H2(http2::SendRequest<ProxyBody>),
}

/// Why an upstream request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection: DNS, TCP, TLS or the egress proxy's tunnel failed.
    #[error("connect: {0}")]
    Connect(#[source] BoxError),
    /// The exchange failed on an established connection (or its HTTP/2 handshake did).
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// Our own HTTP/1.1 exchange failed on an established connection.
    #[error(transparent)]
    Exchange(#[from] h1::ExchangeError),
    /// No response head by the deadline (connecting included).
    #[error("no response head before the deadline")]
    TimedOut,
}

/// `fut`'s output, or [`UpstreamError::TimedOut`] at `deadline`. A combinator, not
/// an `async fn`: that would hold `fut` twice (argument and awaited), in every
/// request's future.
fn timeout_at<F: Future>(
    deadline: tokio::time::Instant,
    fut: F,
) -> impl Future<Output = Result<F::Output, UpstreamError>> {
    tokio::time::timeout_at(deadline, fut).map(|r| r.map_err(|_| UpstreamError::TimedOut))
}

impl UpstreamError {
    /// True when no connection to the upstream could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }

    /// True when the deadline passed before a response head came.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::TimedOut | UpstreamError::Exchange(h1::ExchangeError::TimedOut)
        )
    }
}

/// Returns an HTTP/1 connection to its pool when dropped, if it is ready for the
/// next request (the response came in whole). Held by the response body, so it
/// drops when the body ends; a connection dropped mid-response closes instead.
pub struct Checkin {
    back: Option<(Arc<Shared>, usize, usize, http1::SendRequest<ProxyBody>)>,
}

impl Drop for Checkin {
    fn drop(&mut self) {
        let Some((shared, worker, host, tx)) = self.back.take() else {
            return;
        };
        // Not ready means the response was not read to its end (or the request body is
        // still going up): closing costs one connect; reusing could mix two exchanges.
        if !tx.is_ready() {
            return;
        }
        let since = Instant::now();
        shared.with_host(worker, host, |h| h.idle.push(Idle { tx, since }));
    }
}

/// Where an own-exchange connection goes back to when its response body ends.
pub struct Home {
    shared: Arc<Shared>,
    worker: usize,
    host: usize,
}

impl Home {
    /// Back to the idle list it came from, the most recent.
    pub fn put(self, conn: h1::Conn) {
        let since = Instant::now();
        self.shared.with_host(self.worker, self.host, |h| {
            h.own_idle.push(OwnIdle { conn, since })
        });
    }
}

/// How many times one request is tried again after meeting a kept-alive
/// connection the upstream had just closed.
const MAX_STALE_RETRIES: usize = 3;

/// What goes upstream: a request head (origin-form target) and its body.
// Moved once, into the request's future: boxing the large variant would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Outgoing<'a> {
    /// A body the proxy holds whole (none, or a scrubbed form): borrowed, so the
    /// caller can send the same request again (a fresh token after a 401).
    Held {
        parts: &'a request::Parts,
        body: &'a Bytes,
    },
    /// A streamed body: it can go only once. Boxed: unboxed, it made `Outgoing`
    /// 416 bytes where the held variant needs 16, and each future that holds one
    /// (several, down to the exchange) carried that room twice.
    Streamed(Box<Request<ProxyBody>>),
}

/// The response head with its body, and the connection's way back to the pool.
pub type Answer = (Response<AnyBody>, Checkin);

impl UpstreamClient {
    /// Sends a request to `scheme://authority` on the calling worker's own pool,
    /// and returns the response head with the connection's way back.
    ///
    /// An upstream may close a kept-alive connection just as it is reused (the
    /// keep-alive race). A request it never saw is sent again on another connection;
    /// one it may have seen is sent again only if it is held and idempotent, as
    /// RFC 9110 §9.2.2 allows. A fresh connection's failure is the upstream's
    /// answer and is not retried. All of it, connecting included, ends at `deadline`.
    pub async fn request(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        out: Outgoing<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Answer, UpstreamError> {
        // `build` never makes an empty set; the modulo keeps a stray index in range.
        let worker = workers::current() % self.shared.pools.len();
        match out {
            Outgoing::Held { parts, body } => {
                self.send_held(worker, scheme, authority, parts, body, deadline)
                    .await
            }
            // Boxed: hyper's HTTP/1 send is twice the size of the held path's, and
            // every request's future would otherwise carry it.
            Outgoing::Streamed(req) => {
                Box::pin(self.send_streamed(worker, scheme, authority, *req, deadline)).await
            }
        }
    }

    /// A held request: on our own HTTP/1.1 exchange, nothing goes up while the
    /// answer comes down; on HTTP/2, through hyper.
    async fn send_held(
        &self,
        worker: usize,
        scheme: &Scheme,
        authority: &Authority,
        parts: &request::Parts,
        body: &Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<Answer, UpstreamError> {
        let may_resend = parts.method.is_idempotent();
        let own = body.len() <= h1::MAX_BODY;
        let mut stale = 0;
        loop {
            let (host, conn, reused) = self.take(worker, scheme, authority, own, deadline).await?;
            let again = reused && stale < MAX_STALE_RETRIES;
            // Every arm returns but the keep-alive race's: the loop sends again.
            match conn {
                // The exchange keeps its own timer: see `h1::Conn::send`.
                Conn::Own(conn) => match conn.send(parts, body, deadline).await {
                    Ok((head, framing, conn)) => {
                        let home = Home {
                            shared: self.shared.clone(),
                            worker,
                            host,
                        };
                        let body = h1::ResponseBody::new(conn, framing, Some(home));
                        let resp = Response::from_parts(head, AnyBody::Upstream(body));
                        return Ok((resp, Checkin { back: None }));
                    }
                    Err(h1::ExchangeError::Unanswered(e)) if again && may_resend => {
                        tracing::debug!(error = %e, "kept-alive upstream connection closed under a request; trying another");
                    }
                    Err(e) => return Err(e.into()),
                },
                Conn::Hyper(hyper_conn) => {
                    let req = Request::from_parts(parts.clone(), full(body.clone()));
                    // Boxed: hyper's client future is three times the size of our own
                    // exchange's, and every request's future (several levels up, each
                    // copied when made) would otherwise carry room for it.
                    let sent =
                        Box::pin(self.send_on(hyper_conn, worker, host, scheme, authority, req));
                    match timeout_at(deadline, sent).await? {
                        Ok(answer) => return Ok(answer),
                        Err(mut failed) => {
                            let unsent = failed.take_message().is_some();
                            let maybe_seen = failed.error().is_incomplete_message();
                            if !(again && (unsent || (may_resend && maybe_seen))) {
                                return Err(failed.into_error().into());
                            }
                            tracing::debug!(error = %failed.error(), "kept-alive upstream connection closed under a request; trying another");
                        }
                    }
                }
            }
            stale += 1;
        }
    }

    /// A streamed request, through hyper's client (which moves both directions at
    /// once); sent again only if the upstream certainly never saw it.
    async fn send_streamed(
        &self,
        worker: usize,
        scheme: &Scheme,
        authority: &Authority,
        mut req: Request<ProxyBody>,
        deadline: tokio::time::Instant,
    ) -> Result<Answer, UpstreamError> {
        let mut stale = 0;
        loop {
            let (host, conn, reused) = self
                .take(worker, scheme, authority, false, deadline)
                .await?;
            let Conn::Hyper(conn) = conn else {
                // `checkout` gives own-exchange connections to held requests only.
                return Err(UpstreamError::Connect(
                    "no connection for a streamed body".into(),
                ));
            };
            let sent = self.send_on(conn, worker, host, scheme, authority, req);
            let mut failed = match timeout_at(deadline, sent).await? {
                Ok(answer) => return Ok(answer),
                Err(failed) => failed,
            };
            match failed.take_message() {
                // Never written: the connection was found closed before the request went out.
                Some(unsent) if reused && stale < MAX_STALE_RETRIES => {
                    tracing::debug!(error = %failed.error(), "kept-alive upstream connection closed under a request; trying another");
                    stale += 1;
                    req = unsent;
                    origin_form(&mut req);
                }
                _ => return Err(failed.into_error().into()),
            }
        }
    }

    /// A connection for one request: kept, or newly opened (after waiting for a
    /// connect in progress that may bring a shared HTTP/2 one), and whether it was kept.
    async fn take(
        &self,
        worker: usize,
        scheme: &Scheme,
        authority: &Authority,
        own: bool,
        deadline: tokio::time::Instant,
    ) -> Result<(usize, Conn, bool), UpstreamError> {
        let shared = &self.shared;
        let mut waited = false;
        loop {
            let (host, taken) = shared.checkout(worker, scheme, authority, !waited, own);
            match taken {
                Taken::Conn(conn) => return Ok((host, conn, true)),
                Taken::Connect(guard) => {
                    // Boxed: a connect's state (TLS, tunnel, handshakes) is 6 KiB, and
                    // every request's future would otherwise carry and copy it.
                    let connect = Box::pin(shared.connect(worker, host, scheme, authority, own));
                    let conn = timeout_at(deadline, connect).await;
                    drop(guard);
                    return Ok((host, conn??, false));
                }
                Taken::Wait(done) => {
                    // Once: if that connect failed, each request tries its own, in parallel.
                    timeout_at(deadline, done).await?;
                    waited = true;
                }
            }
        }
    }

    /// Sends `req` through hyper on `conn`; the request comes back in the error when
    /// it never went out.
    async fn send_on(
        &self,
        conn: HyperConn,
        worker: usize,
        host: usize,
        scheme: &Scheme,
        authority: &Authority,
        mut req: Request<ProxyBody>,
    ) -> Result<Answer, TrySendError<Request<ProxyBody>>> {
        match conn {
            HyperConn::H1(mut tx) => {
                let resp = tx.try_send_request(req).await?;
                let back = Some((self.shared.clone(), worker, host, tx));
                Ok((resp.map(AnyBody::Incoming), Checkin { back }))
            }
            HyperConn::H2(mut tx) => {
                with_authority(&mut req, scheme, authority);
                let resp = tx.try_send_request(req).await?;
                Ok((resp.map(AnyBody::Incoming), Checkin { back: None }))
            }
        }
    }

    /// How many pools (workers) this client serves.
    pub fn pools(&self) -> usize {
        self.shared.pools.len()
    }
}

impl Shared {
    /// The upstream's index in the worker's pool, and what the request gets: the
    /// shared HTTP/2 connection, else the last idle HTTP/1 one, else a connect of
    /// its own (or a wait for one in progress that may bring HTTP/2).
    fn checkout(
        self: &Arc<Self>,
        worker: usize,
        scheme: &Scheme,
        authority: &Authority,
        may_wait: bool,
        own: bool,
    ) -> (usize, Taken) {
        let Ok(mut pool) = self.pools[worker].lock() else {
            return (usize::MAX, Taken::Connect(None));
        };
        let index = match pool
            .hosts
            .iter()
            // Byte equality: the route's authority is the same string on every request
            // (`Authority`'s own `==` folds case byte by byte).
            .position(|h| h.authority.as_str() == authority.as_str() && h.scheme == *scheme)
        {
            Some(i) => i,
            None => {
                pool.hosts.push(Host {
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    idle: Vec::new(),
                    own_idle: Vec::new(),
                    h2: None,
                    speaks_http1: false,
                    connecting: None,
                });
                pool.hosts.len() - 1
            }
        };
        let limit = self.idle_timeout;
        let host = &mut pool.hosts[index];
        if let Some((tx, used)) = &mut host.h2 {
            let now = Instant::now();
            // Past the idle limit it is closed like an HTTP/1 one, not used once more.
            if !tx.is_closed() && now.duration_since(*used) < limit {
                *used = now;
                return (index, Taken::Conn(Conn::Hyper(HyperConn::H2(tx.clone()))));
            }
            host.h2 = None;
        }
        // The most recent first; ready unless the upstream closed it since. Past the
        // idle limit it is closed even before the sweep gets to it: an operator sets
        // the limit below the upstream's keep-alive so the upstream never closes first.
        if own && !host.own_idle.is_empty() {
            let now = Instant::now();
            while let Some(mut idle) = host.own_idle.pop() {
                if now.duration_since(idle.since) < limit && idle.conn.is_open() {
                    return (index, Taken::Conn(Conn::Own(idle.conn)));
                }
            }
        }
        if !own && !host.idle.is_empty() {
            let now = Instant::now();
            while let Some(idle) = host.idle.pop() {
                if idle.tx.is_ready() && now.duration_since(idle.since) < limit {
                    return (index, Taken::Conn(Conn::Hyper(HyperConn::H1(idle.tx))));
                }
            }
        }
        // Plain http never negotiates HTTP/2; over TLS, until a handshake chose
        // HTTP/1.1, one connect at a time: the others share what it brings.
        if *scheme != Scheme::HTTPS || host.speaks_http1 {
            return (index, Taken::Connect(None));
        }
        if let Some(notify) = &host.connecting {
            if !may_wait {
                return (index, Taken::Connect(None));
            }
            let done = notify.clone().notified_owned();
            return (index, Taken::Wait(done));
        }
        let notify = Arc::new(Notify::new());
        host.connecting = Some(notify.clone());
        let guard = Connecting {
            shared: self.clone(),
            worker,
            host: index,
            notify,
        };
        (index, Taken::Connect(Some(guard)))
    }

    /// A new connection to the upstream: HTTP/2 when TLS's ALPN chose it (then kept
    /// for every request to that upstream), else HTTP/1.1 (`own`: for our own exchange).
    async fn connect(
        self: &Arc<Self>,
        worker: usize,
        host: usize,
        scheme: &Scheme,
        authority: &Authority,
        own: bool,
    ) -> Result<Conn, UpstreamError> {
        let dst = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        let io = self
            .connector
            .clone()
            .call(dst)
            .await
            .map_err(UpstreamError::Connect)?;
        self.sweep_from_here(worker);
        let h2 = io.connected().is_negotiated_h2();
        self.with_host(worker, host, |h| h.speaks_http1 = !h2);
        if !h2 && own {
            return Ok(Conn::Own(h1::Conn::new(TokioIo::new(io))));
        }
        if !h2 {
            let (tx, conn) = http1::handshake(io).await?;
            drive(conn, "HTTP/1");
            return Ok(Conn::Hyper(HyperConn::H1(tx)));
        }
        let (tx, conn) = self.h2.handshake(io).await?;
        drive(conn, "HTTP/2");
        let kept = (tx.clone(), Instant::now());
        self.with_host(worker, host, |h| h.h2 = Some(kept));
        Ok(Conn::Hyper(HyperConn::H2(tx)))
    }

    /// Runs `f` on a worker's upstream entry under the pool's lock (nothing if the
    /// lock is poisoned: that pool just stops keeping connections).
    fn with_host(&self, worker: usize, host: usize, f: impl FnOnce(&mut Host)) {
        if let Ok(mut pool) = self.pools[worker].lock() {
            if let Some(h) = pool.hosts.get_mut(host) {
                f(h);
            }
        }
    }

    /// Starts the worker's idle sweep on first use, on the worker's own runtime.
    fn sweep_from_here(self: &Arc<Self>, worker: usize) {
        let Ok(mut pool) = self.pools[worker].lock() else {
            return;
        };
        if std::mem::replace(&mut pool.sweeping, true) {
            return;
        }
        let weak = Arc::downgrade(self);
        // Half the limit: an idle connection closes between one and one and a half limits.
        let every = (self.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                // The client was replaced (a reload changed `outbound`): its pools are gone.
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                shared.sweep(worker);
            }
        });
    }

    /// Closes connections idle for longer than `pool_idle_timeout`, and forgets closed ones.
    fn sweep(&self, worker: usize) {
        let Ok(mut pool) = self.pools[worker].lock() else {
            return;
        };
        let limit = self.idle_timeout;
        for h in &mut pool.hosts {
            h.idle
                .retain(|i| i.tx.is_ready() && i.since.elapsed() < limit);
            h.own_idle
                .retain_mut(|i| i.since.elapsed() < limit && i.conn.is_open());
            if h.h2
                .as_ref()
                .is_some_and(|(tx, used)| tx.is_closed() || used.elapsed() >= limit)
            {
                h.h2 = None;
            }
        }
    }
}

/// Runs an upstream connection's I/O on the worker's runtime until it closes.
fn drive<C>(conn: C, protocol: &'static str)
where
    C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, protocol, "upstream connection ended");
        }
    });
}

/// HTTP/2 carries the upstream's scheme and authority in the request (`:scheme`, `:authority`).
fn with_authority(req: &mut Request<ProxyBody>, scheme: &Scheme, authority: &Authority) {
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    // Cannot fail for an origin-form target; if it did, the target is left as it was.
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// HTTP/1.1 to an origin server takes the path and query alone.
fn origin_form(req: &mut Request<ProxyBody>) {
    if req.uri().authority().is_none() {
        return;
    }
    let pq = req.uri().path_and_query().cloned();
    *req.uri_mut() = pq.map(Uri::from).unwrap_or_default();
}

/// Which destinations go through an egress proxy: `outbound.proxy` for all,
/// else `HTTPS_PROXY`/`HTTP_PROXY`; `NO_PROXY` exempts hosts either way.
pub fn egress_matcher(outbound: &OutboundConfig) -> Matcher {
    match &outbound.proxy {
        Some(p) => {
            let no = std::env::var("NO_PROXY")
                .or_else(|_| std::env::var("no_proxy"))
                .unwrap_or_default();
            Matcher::builder().all(p.clone()).no(no).build()
        }
        None => Matcher::from_env(),
    }
}

/// TCP connections to the upstream, directly or through a CONNECT tunnel.
#[derive(Clone)]
pub struct EgressConnector {
    direct: HttpConnector,
    matcher: Arc<Matcher>,
}

type Dialing = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Dialing;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector is always ready; each call clones it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Dialing {
        let mut direct = self.direct.clone();
        let Some(via) = self.matcher.intercept(&dst) else {
            return Box::pin(async move { direct.call(dst).await.map_err(Into::into) });
        };
        let mut tunnel = Tunnel::new(via.uri().clone(), direct);
        if let Some(auth) = via.basic_auth() {
            tunnel = tunnel.with_auth(auth.clone());
        }
        // The tunnel assumes 443 when the URI has no port; say the scheme's port explicitly.
        let port = dst
            .port_u16()
            .unwrap_or(if dst.scheme_str() == Some("http") {
                80
            } else {
                443
            });
        let target = format!(
            "{}://{}:{port}",
            dst.scheme_str().unwrap_or("https"),
            dst.host().unwrap_or_default()
        );
        Box::pin(async move {
            let target: Uri = target.parse()?;
            tunnel.call(target).await.map_err(Into::into)
        })
    }
}

/// How long a TCP connect to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The rustls client configuration: web PKI roots plus the extra CA file.
pub fn tls_client_config(outbound: &OutboundConfig) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &outbound.ca_file {
        let mut added = 0;
        for cert in
            CertificateDer::pem_file_iter(ca).map_err(|e| format!("outbound.ca_file: {e}"))?
        {
            let cert = cert.map_err(|e| format!("outbound.ca_file: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("outbound.ca_file: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "outbound.ca_file: no certificate in {}",
                ca.display()
            ));
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// Builds the pooled client, with a pool for each of `workers` (at least one).
pub fn build(outbound: &OutboundConfig, workers: usize) -> Result<UpstreamClient, String> {
    let tls = tls_client_config(outbound)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let egress = EgressConnector {
        direct: http,
        matcher: Arc::new(egress_matcher(outbound)),
    };
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(egress);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new());
    let pools = (0..workers.max(1)).map(|_| Mutex::default()).collect();
    Ok(UpstreamClient {
        shared: Arc::new(Shared {
            connector,
            h2,
            idle_timeout: outbound.pool_idle_timeout,
            pools,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::{Read, Write};
    use std::sync::mpsc;

    /// Reads one request head (no body) from a blocking socket.
    fn read_head(s: &mut std::net::TcpStream) {
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => return,
            }
        }
    }

    fn answer(s: &mut std::net::TcpStream, body: &str) {
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(reply.as_bytes()).expect("upstream writes");
    }

    /// A held request through `client`: a GET (idempotent, may go twice) if
    /// `replayable`, else a POST.
    async fn get(
        client: &UpstreamClient,
        authority: &Authority,
        replayable: bool,
    ) -> Result<String, UpstreamError> {
        let method = if replayable { "GET" } else { "POST" };
        let (parts, ()) = Request::builder()
            .method(method)
            .uri("/x")
            .body(())
            .expect("request")
            .into_parts();
        let out = Outgoing::Held {
            parts: &parts,
            body: &Bytes::new(),
        };
        let (resp, checkin) = client
            .request(
                &Scheme::HTTP,
                authority,
                out,
                tokio::time::Instant::now() + Duration::from_secs(30),
            )
            .await?;
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        drop(checkin);
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// An upstream that answers "first" on its first connection, closes it when told
    /// to, then answers "second" on the next connection if one comes within a second.
    /// The thread returns whether it did.
    struct ClosingUpstream {
        authority: Authority,
        close: mpsc::Sender<()>,
        closed: mpsc::Receiver<()>,
        thread: std::thread::JoinHandle<bool>,
    }

    fn closing_upstream() -> ClosingUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let authority: Authority = listener
            .local_addr()
            .expect("addr")
            .to_string()
            .parse()
            .expect("authority");
        let (close, close_rx) = mpsc::channel::<()>();
        let (closed_tx, closed) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().expect("first connection");
            read_head(&mut first);
            answer(&mut first, "first");
            close_rx.recv().expect("close signal");
            drop(first);
            closed_tx.send(()).expect("ack");
            listener.set_nonblocking(true).expect("nonblocking");
            for _ in 0..100 {
                if let Ok((mut second, _)) = listener.accept() {
                    second.set_nonblocking(false).expect("blocking");
                    read_head(&mut second);
                    answer(&mut second, "second");
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        });
        ClosingUpstream {
            authority,
            close,
            closed,
            thread,
        }
    }

    fn client() -> UpstreamClient {
        let outbound = OutboundConfig {
            ca_file: None,
            proxy: None,
            pool_idle_timeout: Duration::from_secs(90),
        };
        build(&outbound, 1).expect("client")
    }

    /// Through a fresh client: one request to a `closing_upstream`, the close, then a
    /// second request, which may be replayed if `replayable`. Its result, and whether
    /// a second connection carried it.
    async fn second_request_after_a_close(
        replayable: bool,
    ) -> (Result<String, UpstreamError>, bool) {
        let up = closing_upstream();
        let client = client();
        let first = get(&client, &up.authority, replayable).await;
        assert_eq!(first.expect("first"), "first");
        // Blocking here keeps the connection's task from running until the request below.
        up.close.send(()).expect("signal");
        up.closed.recv().expect("closed");
        let second = get(&client, &up.authority, replayable).await;
        (second, up.thread.join().expect("upstream thread"))
    }

    // The upstream closes a kept-alive connection after the pool handed it out but
    // before it read the request: the request goes again on a new connection.
    // A current-thread runtime makes that order certain: the connection's task cannot
    // see the close until the request's task yields, after its checkout.
    #[tokio::test(flavor = "current_thread")]
    async fn a_replayable_request_meeting_a_just_closed_connection_goes_on_a_new_one() {
        let (second, reconnected) = second_request_after_a_close(true).await;
        assert_eq!(second.expect("sent again"), "second");
        assert!(reconnected);
    }

    // The same race for a request that must not go twice (a POST, a streamed body):
    // its failure is reported, and no second connection carries it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_that_cannot_be_replayed_is_not_sent_twice() {
        let (second, reconnected) = second_request_after_a_close(false).await;
        match second {
            Err(UpstreamError::Exchange(h1::ExchangeError::Unanswered(_))) => {}
            other => panic!("expected the closed connection's error, got {other:?}"),
        }
        assert!(!reconnected, "sent twice");
    }
}
