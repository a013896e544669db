//! The pooled upstream client: keep-alive connections over rustls (web PKI
//! roots plus `ca_file`), HTTP/2 by ALPN, plain http for local upstreams.

use crate::body::ProxyBody;
use crate::config::OutboundConfig;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::Duration;

/// The client the hot path forwards with.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

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

/// Builds the pooled client.
pub fn build(outbound: &OutboundConfig) -> Result<UpstreamClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls_client_config(outbound)?)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(outbound.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}
