//! Client-facing TLS: rustls with ALPN h2 and http/1.1.

mod support;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::*;

struct Tls {
    _dir: tempfile::TempDir,
    setup: Setup,
    cert_pem: String,
}

fn self_signed() -> Tls {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("proxy.pem"), dir.path().join("proxy.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let setup = Setup {
        server: format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}",
            cert.display().to_string(),
            key.display().to_string()
        ),
        ..Setup::default()
    };
    Tls {
        _dir: dir,
        setup,
        cert_pem: ck.cert.pem(),
    }
}

fn https_client(
    cert_pem: &str,
    h2: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(connector)
}

#[tokio::test]
async fn tls_serves_http1_and_h2_by_alpn() {
    let tls = self_signed();
    let h = Harness::with(tls.setup.clone()).await;
    let url = format!(
        "https://127.0.0.1:{}/workfront/attask/api/v19.0/proj/search",
        h.server.proxy_addr.port()
    );
    for (h2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let client = https_client(&tls.cert_pem, h2);
        let req = Request::get(&url)
            .header("x-proxy-key", KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.expect("TLS request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), version);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("Bearer sim-"));
    }
    assert!(!h.up().last().unwrap().headers.contains_key("x-proxy-key"));
}

#[tokio::test]
async fn plaintext_to_the_tls_port_gets_no_http_answer() {
    let tls = self_signed();
    let h = Harness::with(tls.setup.clone()).await;
    let request = format!("GET /workfront/x HTTP/1.1\r\nHost: x\r\nx-proxy-key: {KEY}\r\n\r\n");
    let answer = raw(
        h.server.proxy_addr,
        request.as_bytes(),
        std::time::Duration::from_secs(3),
    )
    .await;
    // No HTTP at all: a TLS alert at most, then the connection is closed.
    assert!(!answer.contains("HTTP/"), "{answer:?}");
    assert_eq!(h.up().count(), 0);
}

/// An HTTPS upstream with a self-signed certificate, answering with the HTTP version it saw.
async fn https_upstream(tls: &Tls) -> std::net::SocketAddr {
    https_upstream_counted(tls).await.0
}

/// [`https_upstream`], with the number of TLS connections it has accepted.
async fn https_upstream_counted(tls: &Tls) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use rustls_pki_types::pem::PemObject;
    let certs =
        vec![rustls_pki_types::CertificateDer::from_pem_slice(tls.cert_pem.as_bytes()).unwrap()];
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_file(tls._dir.path().join("proxy.key")).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap_or("").to_string())
                            .unwrap_or_default();
                        let version = req.version();
                        // The request body's data and any trailers it carried.
                        let (mut data, mut trailers) = (Vec::new(), Vec::new());
                        let mut incoming = req.into_body();
                        while let Some(Ok(frame)) = incoming.frame().await {
                            if let Some(d) = frame.data_ref() {
                                data.extend_from_slice(d);
                            }
                            if let Some(t) = frame.trailers_ref() {
                                trailers.extend(t.iter().map(|(n, v)| format!("{n}: {v:?}")));
                            }
                        }
                        let body = format!(
                            "{version:?} {auth} body={} trailers={trailers:?}",
                            String::from_utf8_lossy(&data)
                        );
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// A proxy whose routes go to an HTTPS upstream with `tls`'s certificate, trusted through `ca_file`.
async fn proxy_to_trusted_https_upstream(tls: &Tls) -> Harness {
    let upstream = https_upstream(tls).await;
    let ca = tls._dir.path().join("proxy.pem");
    Harness::with(Setup {
        outbound: format!("ca_file = {:?}", ca.display().to_string()),
        upstream_url: Some(format!("https://127.0.0.1:{}", upstream.port())),
        ..Setup::default()
    })
    .await
}

#[tokio::test]
async fn https_upstream_trusted_through_ca_file_is_reached_over_h2() {
    let tls = self_signed();
    let h = proxy_to_trusted_https_upstream(&tls).await;
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("HTTP/2.0 Bearer sim-"), "{}", r.text());
}

// A burst of first requests to an upstream that speaks HTTP/2 opens one TLS
// connection, not one each: the first connect is waited for, and its HTTP/2
// connection shared.
#[tokio::test]
async fn a_burst_of_first_requests_shares_one_h2_upstream_connection() {
    let tls = self_signed();
    let (upstream, accepted) = https_upstream_counted(&tls).await;
    let ca = tls._dir.path().join("proxy.pem");
    let h = Harness::with(Setup {
        server: "workers = 1".into(),
        outbound: format!("ca_file = {:?}", ca.display().to_string()),
        upstream_url: Some(format!("https://127.0.0.1:{}", upstream.port())),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let burst: Vec<_> = (0..16)
        .map(|_| spawn_get(&h, "/workfront/x", KEY))
        .collect();
    for r in futures_util::future::join_all(burst).await {
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().starts_with("HTTP/2.0 Bearer sim-"), "{}", r.text());
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn self_signed_upstream_without_ca_file_is_refused_with_502() {
    let tls = self_signed();
    let upstream = https_upstream(&tls).await;
    let h = Harness::with(Setup {
        upstream_url: Some(format!("https://127.0.0.1:{}", upstream.port())),
        ..Setup::default()
    })
    .await;
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    r.assert_refusal(502, "upstream_unreachable");
}

// ---------------------------------------------------------------------------
// Certificate reload: new handshakes get the new pair, open connections keep going.

fn write_pair(dir: &std::path::Path) -> String {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    std::fs::write(dir.join("proxy.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("proxy.key"), ck.signing_key.serialize_pem()).unwrap();
    ck.cert.pem()
}

/// One HTTP/1.1 connection over TLS, trusting only `cert_pem`; also returns the certificate the server showed.
async fn tls_connection(
    addr: std::net::SocketAddr,
    cert_pem: &str,
) -> std::io::Result<(
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    Vec<u8>,
)> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok((send, shown))
}

async fn get_on(send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> u16 {
    let req = Request::get("/workfront/x")
        .header("host", "127.0.0.1")
        .header("x-proxy-key", KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send
        .send_request(req)
        .await
        .expect("request on the open connection");
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

async fn reload(h: &Harness) -> serde_json::Value {
    let r = post(&h.admin("/reload"), &[], Bytes::new()).await;
    r.json()
}

#[tokio::test]
async fn reload_serves_a_new_certificate_without_dropping_open_connections() {
    let certs = tempfile::tempdir().unwrap();
    let old_pem = write_pair(certs.path());
    let setup = Setup {
        server: format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}",
            certs.path().join("proxy.pem").display().to_string(),
            certs.path().join("proxy.key").display().to_string()
        ),
        ..Setup::default()
    };
    let h = Harness::with_file(setup).await;
    h.ready().await;
    let addr = h.server.proxy_addr;
    let (mut open, shown) = tls_connection(addr, &old_pem).await.unwrap();
    assert_eq!(shown, der(&old_pem));
    assert_eq!(get_on(&mut open).await, 200);

    let new_pem = write_pair(certs.path());
    let report = reload(&h).await;
    assert_eq!(report["result"], "ok", "{report}");

    // The connection opened before the reload still works, on the old certificate.
    assert_eq!(get_on(&mut open).await, 200);
    assert_eq!(get_on(&mut open).await, 200);
    // New connections see the new certificate; one that trusts only the old one fails.
    let (mut fresh, shown) = tls_connection(addr, &new_pem).await.unwrap();
    assert_eq!(shown, der(&new_pem));
    assert_eq!(get_on(&mut fresh).await, 200);
    assert!(tls_connection(addr, &old_pem).await.is_err());
}

#[tokio::test]
async fn an_unusable_certificate_on_reload_is_refused_and_the_running_one_stays() {
    let certs = tempfile::tempdir().unwrap();
    let pem = write_pair(certs.path());
    let setup = Setup {
        server: format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}",
            certs.path().join("proxy.pem").display().to_string(),
            certs.path().join("proxy.key").display().to_string()
        ),
        ..Setup::default()
    };
    let h = Harness::with_file(setup).await;
    h.ready().await;
    let addr = h.server.proxy_addr;
    let good_key = std::fs::read(certs.path().join("proxy.key")).unwrap();

    // Not a certificate at all.
    std::fs::write(certs.path().join("proxy.pem"), "not a certificate").unwrap();
    let report = reload(&h).await;
    assert_eq!(report["result"], "error", "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("server.tls_cert_file"),
        "{report}"
    );
    // A certificate with somebody else's key.
    std::fs::write(certs.path().join("proxy.pem"), &pem).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(
        certs.path().join("proxy.key"),
        other.signing_key.serialize_pem(),
    )
    .unwrap();
    let report = reload(&h).await;
    assert_eq!(report["result"], "error", "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("server.tls_key_file"),
        "{report}"
    );
    assert!(!report.to_string().contains("PRIVATE KEY"), "{report}");
    std::fs::write(certs.path().join("proxy.key"), good_key).unwrap();

    // Still the original certificate, still serving.
    let (mut conn, shown) = tls_connection(addr, &pem).await.unwrap();
    assert_eq!(shown, der(&pem));
    assert_eq!(get_on(&mut conn).await, 200);
    let metrics = get(&h.admin("/metrics"), &[]).await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "ims_proxy_config_reloads_total{result=\"error\"} 2"),
        "{metrics}"
    );
}

/// Request trailers could carry a credential past the header scrubbing to an HTTP/2
/// upstream (HTTP/1 upstreams only get declared trailers): the proxy sends none.
#[tokio::test]
async fn client_trailers_never_reach_an_h2_upstream() {
    let tls = self_signed();
    let h = proxy_to_trusted_https_upstream(&tls).await;
    h.ready().await;
    let addr = h.server.proxy_addr;
    let req = format!(
        "POST /workfront/x HTTP/1.1\r\nHost: {addr}\r\nx-proxy-key: {KEY}\r\n\
         Transfer-Encoding: chunked\r\nTrailer: authorization, x-api-key\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n0\r\nauthorization: Bearer attacker-trailer\r\nx-api-key: evil-trailer\r\n\r\n"
    );
    let answer = raw(addr, req.as_bytes(), std::time::Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("HTTP/2.0 Bearer sim-"), "{answer:?}");
    assert!(answer.contains("body=hello trailers=[]"), "{answer:?}");
    assert!(
        !answer.contains("attacker") && !answer.contains("evil"),
        "{answer:?}"
    );
}
