//! The pooled upstream client: keep-alive connections over rustls (web PKI
//! roots plus `ca_file`), HTTP/2 by ALPN, plain http for local upstreams, and
//! CONNECT tunnels through the egress proxy where one applies. One pool per
//! worker thread (see `workers`), so an upstream connection is always driven
//! on the thread whose requests use it.

use crate::body::{BoxError, ProxyBody};
use crate::config::OutboundConfig;
use crate::workers;
use http::{Request, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tower_service::Service;

/// One worker's pooled client.
type Pool = Client<HttpsConnector<EgressConnector>, ProxyBody>;

/// The client the hot path forwards with: one pool per worker thread.
#[derive(Clone)]
pub struct UpstreamClient {
    pools: Arc<[Pool]>,
}

impl UpstreamClient {
    /// Sends `req` on the calling worker's own pool (the first pool off the workers).
    pub fn request(&self, req: Request<ProxyBody>) -> ResponseFuture {
        // `build` never makes an empty set; the modulo keeps a stray index in range.
        self.pools[workers::current() % self.pools.len()].request(req)
    }

    /// How many pools (workers) this client serves.
    pub fn pools(&self) -> usize {
        self.pools.len()
    }
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

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector is always ready; each call clones it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Connecting {
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
    let matcher = Arc::new(egress_matcher(outbound));
    let pools = (0..workers.max(1))
        .map(|_| pool(outbound, tls.clone(), matcher.clone()))
        .collect();
    Ok(UpstreamClient { pools })
}

fn pool(outbound: &OutboundConfig, tls: rustls::ClientConfig, matcher: Arc<Matcher>) -> Pool {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let egress = EgressConnector {
        direct: http,
        matcher,
    };
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(egress);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(outbound.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https)
}
