//! Listeners and lifecycle: accept loops (plain or TLS), per-connection idle
//! limits, graceful drain, signals and reload.

use crate::admin;
use crate::body::BoxError;
use crate::body::{full, ClientBody, ProxyBody};
use crate::config::{Config, TlsFiles};
use crate::conn::{ConnInfo, ExchangeGuard, Watched, H2_PREFACE};
use crate::h1_server::{self, Head};
use crate::metrics::Metrics;
use crate::proxy;
use crate::state::Shared;
use crate::workers::{Balance, Handoff, OpenGuard, Workers};
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Binding a listen address failed.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// Config key of the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS files or outbound setup are unusable.
    #[error("{0}")]
    Setup(String),
}

/// Connections the kernel may hold completed but not yet accepted (it caps
/// this at `net.core.somaxconn`). The standard library's 128 overflowed when
/// 256 clients connected at once: the surplus SYNs were dropped and those
/// clients waited a second for their retry. nginx's own default is 511.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`], reusable at once
/// after a restart (`SO_REUSEADDR`, as `TcpListener::bind` sets).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct DrainReport {
    /// Connections still busy at the grace limit, cut.
    pub cut_connections: usize,
}

/// A running proxy and admin server. Dropping it without [`ServerHandle::wait`]
/// stops the proxy's worker threads at once, cutting their connections.
pub struct ServerHandle {
    /// Where the proxy listens (the real port when configured with port 0).
    pub proxy_addr: SocketAddr,
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    /// The shared state (snapshot, metrics).
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    /// One accept loop per worker, each draining its own connections.
    proxy_tasks: Vec<JoinHandle<DrainReport>>,
    admin_task: JoinHandle<DrainReport>,
    /// The proxy's worker threads; dropping the handle stops them.
    workers: Workers,
    /// How the proxy's connections are spread over the workers.
    balance: Arc<Balance>,
}

impl ServerHandle {
    /// Stops accepting and asks every connection to finish (idempotent).
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until both servers have drained (or cut what was left at the grace
    /// limit), then stops the worker threads.
    pub async fn wait(self) -> DrainReport {
        let mut cut = 0;
        for task in self.proxy_tasks {
            cut += task.await.unwrap_or_default().cut_connections;
        }
        cut += self.admin_task.await.unwrap_or_default().cut_connections;
        drop(self.workers);
        DrainReport {
            cut_connections: cut,
        }
    }

    /// How many worker threads serve the proxy listener.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Open client connections on each worker.
    pub fn connections_per_worker(&self) -> Vec<usize> {
        self.balance.open()
    }

    /// `begin_shutdown` then `wait`.
    pub async fn shutdown(self) -> DrainReport {
        self.begin_shutdown();
        self.wait().await
    }
}

/// The client-facing certificate and key, swapped whole on reload: new handshakes
/// use the current pair, connections already open keep theirs.
pub struct TlsCert(ArcSwap<CertifiedKey>);

impl TlsCert {
    /// Replaces the pair new handshakes get.
    pub fn store(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }
}

impl fmt::Debug for TlsCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key: only which certificate is served.
        f.debug_struct("TlsCert")
            .field("chain_len", &self.0.load().cert.len())
            .finish()
    }
}

impl ResolvesServerCert for TlsCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the certificate chain and its key (they must belong together).
pub fn load_certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, String> {
    let certs = CertificateDer::pem_file_iter(&files.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls_cert_file: {}: {e}", files.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls_cert_file: no certificate in {}",
            files.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| format!("server.tls_key_file: {}: {e}", files.key_file.display()))?;
    CertifiedKey::from_der(certs, key, &tls_provider())
        .map(Arc::new)
        .map_err(|e| format!("server.tls_key_file: {e}"))
}

/// The client-facing TLS acceptor (ALPN h2 and http/1.1) and the handle that swaps its certificate.
pub fn tls_acceptor(files: &TlsFiles) -> Result<(TlsAcceptor, Arc<TlsCert>), String> {
    let cert = Arc::new(TlsCert(ArcSwap::new(load_certified_key(files)?)));
    let mut cfg = rustls::ServerConfig::builder_with_provider(tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(cfg)), cert))
}

/// Connection settings shared by every connection of one listener.
#[derive(Clone)]
struct ConnSettings {
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// For plain connections known to speak HTTP/1, which can be parked.
    http1: Arc<http1::Builder>,
    tls: Option<TlsAcceptor>,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    grace: Duration,
}

/// Largest request head (HTTP/1 read buffer, HTTP/2 header list) a client may send:
/// generous for long Workfront queries, small enough that a flood of huge heads
/// costs bounded memory per connection. Beyond it the answer is 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header fields in one HTTP/1 request head (431 beyond). This is hyper's
/// own default, left unset on purpose: setting it, even to the same 100, makes
/// hyper fill a 100-slot array for every head it parses (~1k instructions a
/// request). `tests/hostile.rs` checks that a head with 103 fields gets 431 and
/// one with 52 is served.
pub const MAX_HEADERS: usize = 100;

/// How long a plain HTTP/1 connection rests with nothing in flight before it is
/// parked: hyper's state for it (16 KiB of buffers and more) is dropped and only
/// the socket waits for the next request. Busier connections are never parked;
/// 10,000 idle keep-alive clients cost about 3 KiB each instead of about 27.
const PARK_AFTER: Duration = Duration::from_millis(50);

/// Room made in the read buffer of our own HTTP/1.1 server before each read.
const READ_SIZE: usize = 8 * 1024;

/// Both HTTP/1 builders get the same settings. hyper's own head timer is off: it
/// would also cut idle keep-alive connections (see `conn`); the server enforces
/// `header_read_timeout` itself.
macro_rules! http1_settings {
    ($b:expr) => {
        $b.timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            .max_buf_size(MAX_HEAD_BYTES)
    };
}

/// The HTTP/1 builder for plain connections, which can be parked.
fn http1_builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    // The read buffer's cap alone lets a head slightly over it through when it
    // arrives in one large read; the parsed head is checked against this too.
    // Responses are written from one flat buffer, not by `writev` of head and
    // body: a small response is one plain `send`, and in the load bench that cost
    // less CPU for small responses and for a 1 GiB download (PERFORMANCE.md). The
    // buffer keeps the size of the largest body frame it took (up to 256 KiB from
    // an upstream) until hyper lets go of the connection: only parked connections
    // flatten, whose hyper state is dropped once they rest for `PARK_AFTER`.
    http1_settings!(b)
        .max_header_size(MAX_HEAD_BYTES)
        .writev(false);
    b
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    http1_settings!(b.http1());
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Binds both listeners and starts serving; token fetches start at once.
pub async fn start(
    config: Config,
    config_path: Option<PathBuf>,
) -> Result<ServerHandle, StartError> {
    start_with_metrics(config, config_path, Arc::new(Metrics::new())).await
}

/// Like [`start`], with a given metrics registry.
pub async fn start_with_metrics(
    config: Config,
    config_path: Option<PathBuf>,
    metrics: Arc<Metrics>,
) -> Result<ServerHandle, StartError> {
    let s = &config.server;
    let worker_count = s.workers;
    let bind = |key, addr| listen(addr).map_err(|source| StartError::Bind { key, addr, source });
    let proxy_listener = bind("server.listen", s.listen)?;
    let admin_listener = bind("server.admin_listen", s.admin_listen)?;
    let (tls, tls_cert) = match s.tls.as_ref().map(tls_acceptor).transpose() {
        Ok(Some((acceptor, cert))) => (Some(acceptor), Some(cert)),
        Ok(None) => (None, None),
        Err(e) => return Err(StartError::Setup(e)),
    };
    let settings = ConnSettings {
        builder: Arc::new(http_builder()),
        http1: Arc::new(http1_builder()),
        tls,
        idle_timeout: s.idle_timeout,
        header_read_timeout: s.header_read_timeout,
        grace: s.shutdown_grace,
    };
    let admin_settings = ConnSettings {
        tls: None,
        ..settings.clone()
    };
    let proxy_addr = proxy_listener
        .local_addr()
        .map_err(|e| StartError::Setup(e.to_string()))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| StartError::Setup(e.to_string()))?;
    let shared = Shared::start(config, config_path, metrics).map_err(StartError::Setup)?;
    if let Some(cert) = tls_cert {
        // Reloads re-read the certificate files into this handle.
        let _ = shared.tls.set(cert);
    }
    let (shutdown, _) = watch::channel(false);
    let workers = Workers::start(worker_count)
        .map_err(|e| StartError::Setup(format!("server.workers: cannot start threads: {e}")))?;
    // Every worker accepts on the same socket: whichever is free takes the next connection.
    let listener = proxy_listener
        .into_std()
        .map_err(|e| StartError::Setup(format!("server.listen: {e}")))?;
    let mut proxy_tasks = Vec::with_capacity(workers.len());
    let (balance, inboxes) = Balance::new(workers.len());
    for ((me, worker), inbox) in workers.handles().iter().enumerate().zip(inboxes) {
        let own = {
            // Registered with the worker's own reactor.
            let _in_worker = worker.enter();
            listener.try_clone().and_then(TcpListener::from_std)
        }
        .map_err(|e| StartError::Setup(format!("server.listen: {e}")))?;
        let sh = shared.clone();
        proxy_tasks.push(worker.spawn(accept_loop(
            own,
            settings.clone(),
            move |conn, req| proxy::handle(sh.clone(), conn, req),
            shutdown.subscribe(),
            Some(Balanced {
                me,
                balance: balance.clone(),
                inbox,
            }),
        )));
    }
    drop(listener);
    let sh = shared.clone();
    let admin_task = tokio::spawn(accept_loop(
        admin_listener,
        admin_settings,
        move |conn, req| {
            // Admin exchanges count as activity too: the head timer and idle limit see them.
            let (sh, exchange) = (sh.clone(), ExchangeGuard::new(&conn));
            async move {
                let resp = admin::handle(sh, req).await?;
                Ok::<_, Infallible>(resp.map(|b| -> ProxyBody { full(b).with_guard(exchange) }))
            }
        },
        shutdown.subscribe(),
        None,
    ));
    tracing::info!(listen = %proxy_addr, admin = %admin_addr, tls = shared.snapshot.load().config.server.tls.is_some(), workers = workers.len(), "ims-proxy serving");
    Ok(ServerHandle {
        proxy_addr,
        admin_addr,
        shared,
        shutdown,
        proxy_tasks,
        admin_task,
        workers,
        balance,
    })
}

/// Where a worker's accept loop stands among the others: its index, the balance,
/// and its inbox of connections other workers accepted for it.
struct Balanced {
    me: usize,
    balance: Arc<Balance>,
    inbox: mpsc::UnboundedReceiver<Handoff>,
}

async fn accept_loop<F, Fut, B>(
    listener: TcpListener,
    settings: ConnSettings,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    mut balanced: Option<Balanced>,
) -> DrainReport
where
    F: Fn(Arc<ConnInfo>, Request<ClientBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut conns = JoinSet::new();
    // Each connection watches its own receiver; the loop's own one stays free to wait on.
    let for_conns = shutdown.clone();
    let serve =
        |conns: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr, open: Option<OpenGuard>| {
            let _ = stream.set_nodelay(true);
            let (settings, handler, shutdown) =
                (settings.clone(), handler.clone(), for_conns.clone());
            conns.spawn(async move {
                let _counted = open;
                let conn = Arc::new(ConnInfo::new(peer));
                match settings.tls.clone() {
                    None => serve_plain(stream, conn, settings, handler, shutdown).await,
                    // Boxed: a parked plain connection's task should not be as large as this.
                    Some(acceptor) => {
                        Box::pin(async move {
                            match tokio::time::timeout(
                                settings.header_read_timeout,
                                acceptor.accept(stream),
                            )
                            .await
                            {
                                Ok(Ok(tls)) => {
                                    serve_connection(tls, conn, settings.clone(), handler, shutdown)
                                        .await
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        })
                        .await
                    }
                }
            });
        };
    loop {
        let handed = async {
            match balanced.as_mut() {
                Some(b) => b.inbox.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match &balanced {
                    None => serve(&mut conns, stream, peer, None),
                    Some(b) => match b.balance.place(b.me) {
                        (to, open) if to == b.me => serve(&mut conns, stream, peer, Some(open)),
                        (to, open) => match stream.into_std() {
                            Ok(stream) => {
                                // Refused by a worker that is draining: the connection is dropped, closed.
                                let _ = b.balance.hand_to(to, Handoff { stream, peer, open });
                            }
                            Err(e) => tracing::debug!(%peer, error = %e, "could not hand a connection over"),
                        },
                    },
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(Handoff { stream, peer, open }) = handed => match TcpStream::from_std(stream) {
                Ok(stream) => serve(&mut conns, stream, peer, Some(open)),
                Err(e) => tracing::debug!(%peer, error = %e, "could not take a connection over"),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if let Some(b) = balanced.as_mut() {
        // No more hand-overs: a worker still accepting gets `false` and closes the
        // connection at once, and those already queued are closed now, not after the grace.
        b.inbox.close();
        while b.inbox.try_recv().is_ok() {}
    }
    let open = conns.len();
    let drained = tokio::time::timeout(settings.grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    let cut = if drained.is_err() { conns.len() } else { 0 };
    if cut > 0 {
        tracing::warn!(
            cut,
            "shutdown grace elapsed; cutting connections still busy"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    } else if open > 0 {
        tracing::info!(connections = open, "drained");
    }
    DrainReport {
        cut_connections: cut,
    }
}

/// A plain connection: parked (only the socket) while it rests, served by hyper's
/// HTTP/1 connection while it works; HTTP/2 goes to the auto builder for good.
async fn serve_plain<F, Fut, B>(
    mut stream: TcpStream,
    conn: Arc<ConnInfo>,
    settings: ConnSettings,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn(Arc<ConnInfo>, Request<ClientBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut carried = Bytes::new();
    loop {
        if carried.is_empty() {
            let mut first = [0u8; H2_PREFACE.len()];
            match parked(&stream, &mut first, &conn, &settings, &mut shutdown).await {
                0 => return,
                n if H2_PREFACE.starts_with(&first[..n]) => {
                    // HTTP/2 (or too few bytes to tell): the auto builder reads the
                    // preface itself; an HTTP/2 connection multiplexes and is not parked.
                    Box::pin(serve_connection(stream, conn, settings, handler, shutdown)).await;
                    return;
                }
                _ => {}
            }
        }
        // Our own server first; hyper takes what it does not, with the bytes read.
        // Boxed, as hyper's path is: a parked connection's task holds neither.
        let own = Box::pin(serve_own(
            stream,
            carried,
            &conn,
            &settings,
            &handler,
            &mut shutdown,
        ));
        let (s, read) = match own.await {
            Own::Park(s) => {
                (stream, carried) = (s, Bytes::new());
                continue;
            }
            Own::Hyper(s, read) => (s, read),
            Own::Closed => return,
        };
        let served = Box::pin(serve_http1(
            s,
            read,
            &conn,
            &settings,
            handler.clone(),
            &mut shutdown,
        ))
        .await;
        match served {
            Some((s, rest)) => (stream, carried) = (s, rest),
            None => return,
        }
    }
}

/// What [`serve_own`] left of a connection.
enum Own {
    /// It rested long enough to park; nothing was left unread.
    Park(TcpStream),
    /// A request for hyper, and every byte read of it (and of any after it).
    Hyper(TcpStream, Bytes),
    /// Closed: by the client, an error, a limit, or the drain.
    Closed,
}

/// Serves a plain HTTP/1.1 connection's requests without a body on the proxy's own
/// exchange ([`h1_server`]), until it rests long enough to park or a request comes
/// that hyper must take. Limits, parking and the drain are the same as on hyper's
/// path (`serve_http1`), and checked by the same one timer.
async fn serve_own<F, Fut, B>(
    stream: TcpStream,
    carried: Bytes,
    conn: &Arc<ConnInfo>,
    settings: &ConnSettings,
    handler: &F,
    shutdown: &mut watch::Receiver<bool>,
) -> Own
where
    F: Fn(Arc<ConnInfo>, Request<ClientBody>) -> Fut,
    Fut: Future<Output = Result<Response<B>, Infallible>> + 'static,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut io = Watched::with_prefix(stream, conn.clone(), carried);
    let mut buf = BytesMut::new();
    let period = limits_period(settings);
    let timer = tokio::time::sleep(period.min(PARK_AFTER));
    tokio::pin!(timer);
    let mut draining = *shutdown.borrow();
    // One wait for the drain for the whole stretch, not one per request: each new
    // `changed()` future registers with the channel's waiter list (a lock) and
    // leaves it again when dropped.
    let mut watch = shutdown.clone();
    let mut drain = std::pin::pin!(watch.changed());
    let for_hyper = |io: Watched<TcpStream>, buf: BytesMut| {
        let (stream, unread) = io.into_parts();
        // Copied at its size: hyper keeps the prefix as long as it serves the
        // connection, and the read buffer may be far larger than what it holds.
        let mut read = Vec::with_capacity(buf.len() + unread.len());
        read.extend_from_slice(&buf);
        read.extend_from_slice(&unread);
        Own::Hyper(stream, Bytes::from(read))
    };
    loop {
        let (parts, close) = loop {
            match h1_server::parse_request(&mut buf) {
                Head::Ours { parts, close } => break (parts, close),
                Head::Partial if buf.len() <= MAX_HEAD_BYTES => {}
                Head::Partial | Head::Hyper => return for_hyper(io, buf),
            }
            if buf.iter().all(|b| *b == b'\r' || *b == b'\n') {
                // Stray line ends between requests (RFC 9112 §2.2): nothing under way,
                // so the connection may park, or close now in a drain as hyper's does.
                buf.clear();
                if draining && !io.has_prefix() {
                    return Own::Closed;
                }
            }
            buf.reserve(READ_SIZE);
            tokio::select! {
                biased;
                read = io.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return Own::Closed,
                    Ok(_) => {}
                },
                _ = &mut drain, if !draining => draining = true,
                _ = &mut timer => {
                    match check_limits(conn, settings, !draining) {
                        Limits::HeadOverdue | Limits::Idle => return Own::Closed,
                        Limits::Fine => {}
                    }
                    let mut next = period;
                    if !draining {
                        let may_park = buf.is_empty() && conn.at_rest();
                        match park_check(may_park, conn.idle_for()) {
                            None if !io.has_prefix() => {
                                tracing::trace!(peer = %conn.peer, "parking");
                                return Own::Park(io.into_parts().0);
                            }
                            // Bytes not read yet: the next read takes them.
                            None => {}
                            Some(again) => next = next.min(again),
                        }
                    }
                    timer.as_mut().reset(tokio::time::Instant::now() + next);
                }
            }
        };
        let head_request = parts.method == Method::HEAD;
        // While the request is served, a client that closes its connection cancels it,
        // as on hyper's path; bytes it sends meanwhile (a pipelined request) are kept.
        let request = Request::from_parts(parts, ClientBody::Empty);
        let mut served = crate::recycle::Slot::new(|| handler(conn.clone(), request));
        let resp = loop {
            tokio::select! {
                biased;
                resp = &mut served => break resp,
                read = io.read_buf(&mut buf), if buf.len() <= MAX_HEAD_BYTES => match read {
                    Ok(0) | Err(_) => return Own::Closed,
                    Ok(_) => {}
                },
            }
        };
        let Ok(resp) = resp;
        let (resp, body) = resp.into_parts();
        let mut close = close || draining || *shutdown.borrow();
        let mut out = crate::recycle::take_room();
        let written =
            match h1_server::encode_head(&resp, body.size_hint(), head_request, close, &mut out) {
                Ok(head) => {
                    close = head.close;
                    h1_server::write_response(&mut io, &mut buf, &mut out, body, head.framing).await
                }
                Err(e) => Err(e),
            };
        crate::recycle::give_room(out);
        if let Err(e) = written {
            tracing::debug!(peer = %conn.peer, error = %e, "response not written whole; closing");
            return Own::Closed;
        }
        if close {
            let _ = io.shutdown().await;
            return Own::Closed;
        }
        // The response's map holds a later request's fields on this thread.
        crate::recycle::give_map(resp.headers);
    }
}

/// Waits, holding nothing but the socket, for the next request's first bytes and
/// peeks at them into `first` (how many), or returns 0 when the client closed or the
/// idle or first-head limit or a shutdown closes the connection.
async fn parked(
    stream: &TcpStream,
    first: &mut [u8],
    conn: &ConnInfo,
    settings: &ConnSettings,
    shutdown: &mut watch::Receiver<bool>,
) -> usize {
    if *shutdown.borrow() {
        return 0;
    }
    let left = conn.wait_left(settings.idle_timeout, settings.header_read_timeout);
    tokio::select! {
        peeked = stream.peek(first) => peeked.unwrap_or(0),
        _ = shutdown.changed() => 0,
        _ = tokio::time::sleep(left) => {
            tracing::debug!(peer = %conn.peer, "closing idle connection");
            0
        }
    }
}

/// `handler` as hyper's service for the requests of `conn`. Its future is boxed:
/// hyper moves it through several owners (on HTTP/2, where each stream is a task
/// of its own: the stream's state, the executor, the task's cell), and at the
/// handler's size (2 KiB) every move copied it whole.
fn hyper_service<F, Fut, B>(
    handler: F,
    conn: &Arc<ConnInfo>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<B>,
    Error = Infallible,
    Future = Pin<Box<Fut>>,
>
where
    F: Fn(Arc<ConnInfo>, Request<ClientBody>) -> Fut,
    Fut: Future<Output = Result<Response<B>, Infallible>>,
    B: Body,
{
    let conn = conn.clone();
    hyper::service::service_fn(move |req: Request<Incoming>| {
        Box::pin(handler(conn.clone(), req.map(ClientBody::Incoming)))
    })
}

/// Serves HTTP/1 exchanges until the connection ends (None) or has rested for
/// [`PARK_AFTER`]: then hyper lets go of it and the socket comes back, with any
/// bytes hyper had read but not used.
async fn serve_http1<F, Fut, B>(
    stream: TcpStream,
    carried: Bytes,
    conn: &Arc<ConnInfo>,
    settings: &ConnSettings,
    handler: F,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, Bytes)>
where
    F: Fn(Arc<ConnInfo>, Request<ClientBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let service = hyper_service(handler, conn);
    let io = TokioIo::new(Watched::with_prefix(stream, conn.clone(), carried));
    let mut connection = settings.http1.serve_connection(io, service);
    // One timer for the connection's limits and for parking, so each wake-up of a
    // busy connection polls one timer, not two. It is not re-armed per exchange (that
    // cost a wake-up and a timer reset on every request): when it fires it checks the
    // limits and parks a connection that has rested long enough, or looks again when
    // it could have. A busy connection sees it every min(PARK_AFTER, limits period).
    let period = limits_period(settings);
    let timer = tokio::time::sleep(period.min(PARK_AFTER));
    tokio::pin!(timer);
    let mut draining = *shutdown.borrow();
    let mut parking = false;
    // Only a connection that has finished an exchange is idle in hyper's eyes; one that
    // has not would answer its next request with `Connection: close` instead.
    let first_exchange = conn.exchanges();
    if draining {
        Pin::new(&mut connection).graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
                    return None;
                }
                break;
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                conn.set_parking(false);
                Pin::new(&mut connection).graceful_shutdown();
            }
            _ = &mut timer => {
                match check_limits(conn, settings, !draining && !parking) {
                    Limits::HeadOverdue => return None,
                    Limits::Idle => {
                        draining = true;
                        Pin::new(&mut connection).graceful_shutdown();
                    }
                    Limits::Fine => {}
                }
                let mut next = period;
                if !draining && !parking {
                    let may_park = conn.at_rest() && conn.exchanges() > first_exchange;
                    match park_check(may_park, conn.idle_for()) {
                        None => {
                            // hyper closes an idle connection at once; Watched keeps the socket open.
                            parking = true;
                            tracing::trace!(peer = %conn.peer, "parking");
                            conn.set_parking(true);
                            Pin::new(&mut connection).graceful_shutdown();
                        }
                        Some(again) => next = next.min(again),
                    }
                }
                timer.as_mut().reset(tokio::time::Instant::now() + next);
            }
        }
    }
    conn.set_parking(false);
    if !parking || draining {
        return None;
    }
    let parts = connection.into_parts();
    let (stream, not_yet_read) = parts.io.into_inner().into_parts();
    // Copied out: a slice would keep hyper's whole read buffer alive while parked.
    let mut unread = Vec::with_capacity(parts.read_buf.len() + not_yet_read.len());
    unread.extend_from_slice(&parts.read_buf);
    unread.extend_from_slice(&not_yet_read);
    Some((stream, Bytes::from(unread)))
}

/// What the periodic check of a connection's limits found.
enum Limits {
    Fine,
    /// A request head trickled in past `header_read_timeout` (slowloris): drop the connection.
    HeadOverdue,
    /// Idle past `idle_timeout`: close it gracefully.
    Idle,
}

/// The tick that checks a connection's head and idle limits.
fn limits_tick(settings: &ConnSettings) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(limits_period(settings));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Whether a resting HTTP/1 connection parks now (`None`) or when to look again.
/// One that may not park (a head arriving, nothing served yet) is looked at every
/// `PARK_AFTER`, never sooner: a head trickled in for seconds must not spin the timer.
fn park_check(may_park: bool, rested: Duration) -> Option<Duration> {
    if !may_park {
        Some(PARK_AFTER)
    } else if rested >= PARK_AFTER {
        None
    } else {
        // Busy (`idle_for` is zero then) or rested only briefly.
        Some((PARK_AFTER - rested).max(Duration::from_millis(1)))
    }
}

/// How often a connection's head and idle limits are checked.
fn limits_period(settings: &ConnSettings) -> Duration {
    (settings.idle_timeout.min(settings.header_read_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(5))
}

/// Checks the head limit, then (when `idle_closes`) the idle limit.
fn check_limits(conn: &ConnInfo, settings: &ConnSettings, idle_closes: bool) -> Limits {
    if conn.head_overdue(settings.header_read_timeout) {
        tracing::debug!(peer = %conn.peer, "request head not complete within header_read_timeout; closing");
        Limits::HeadOverdue
    } else if idle_closes && conn.idle_for() >= settings.idle_timeout {
        tracing::debug!(peer = %conn.peer, "closing idle connection");
        Limits::Idle
    } else {
        Limits::Fine
    }
}

async fn serve_connection<I, F, Fut, B>(
    io: I,
    conn: Arc<ConnInfo>,
    settings: ConnSettings,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Arc<ConnInfo>, Request<ClientBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let service = hyper_service(handler, &conn);
    let connection = settings
        .builder
        .serve_connection(TokioIo::new(Watched::new(io, conn.clone())), service);
    tokio::pin!(connection);
    let mut tick = limits_tick(&settings);
    let mut draining = *shutdown.borrow();
    if draining {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => match check_limits(&conn, &settings, !draining) {
                Limits::HeadOverdue => break,
                Limits::Idle => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
                Limits::Fine => {}
            },
        }
    }
}

/// `ims-proxy run`: serve until SIGTERM/SIGINT, reload on SIGHUP.
pub async fn run(config_path: PathBuf) -> Result<(), String> {
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let handle = start(config, Some(config_path))
        .await
        .map_err(|e| e.to_string())?;
    wait_for_signals(&handle).await;
    let report = handle.wait().await;
    tracing::info!(cut_connections = report.cut_connections, "stopped");
    Ok(())
}

/// Serves signals until SIGTERM/SIGINT starts the drain.
pub async fn wait_for_signals(handle: &ServerHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            handle.begin_shutdown();
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    let shared = handle.shared.clone();
                    tokio::spawn(async move { shared.reload().await });
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    handle.begin_shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_queues_a_burst_of_connections_beyond_the_old_128() {
        // Nothing accepts: every connection must complete from the queue
        // alone. With a backlog of 128, the 130th SYN was dropped and its
        // connect hung for the client's one-second retry.
        let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("local addr");
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let burst = 300.min(somaxconn);
        let mut tries = JoinSet::new();
        for _ in 0..burst {
            tries.spawn(tokio::time::timeout(
                Duration::from_millis(800),
                TcpStream::connect(addr),
            ));
        }
        let mut connected = 0;
        while let Some(done) = tries.join_next().await {
            if matches!(done, Ok(Ok(Ok(_)))) {
                connected += 1;
            }
        }
        assert_eq!(connected, burst, "connections completed from the queue");
        drop(listener);
    }

    #[test]
    fn a_connection_that_may_not_park_is_looked_at_every_park_interval_never_sooner() {
        // A head trickling in for seconds, or no exchange served yet.
        for rested in [Duration::ZERO, PARK_AFTER, Duration::from_secs(5)] {
            assert_eq!(park_check(false, rested), Some(PARK_AFTER));
        }
    }

    #[test]
    fn a_resting_connection_parks_once_it_has_rested_long_enough() {
        assert_eq!(park_check(true, Duration::ZERO), Some(PARK_AFTER));
        assert_eq!(
            park_check(true, Duration::from_millis(30)),
            Some(PARK_AFTER - Duration::from_millis(30))
        );
        assert_eq!(park_check(true, PARK_AFTER), None);
        assert_eq!(park_check(true, Duration::from_secs(5)), None);
    }
}
