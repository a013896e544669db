//! In-process simulators of Adobe IMS ([`ims`]) and of a Workfront/Fusion-style
//! API ([`upstream`]).
//!
//! Both speak real HTTP/1.1 (and h2c) on `127.0.0.1` with a random port, run in
//! spawned tokio tasks and stop when their handle is dropped. They back the
//! `demo` command, the integration tests and the benchmarks; [`standalone`]
//! runs them as processes of their own (`ims-proxy sim-ims`, `sim-upstream`)
//! for docker compose.

pub mod ims;
pub mod standalone;
pub mod upstream;

pub use ims::{ImsState, SimIms, TokenRequest};
pub use upstream::{pattern_byte, pattern_sha256, SeenRequest, SimUpstream, UpstreamState};

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::rt::Executor;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Response body of every simulator: a whole buffer, or the deterministic
/// download pattern generated chunk by chunk (never allocated whole).
///
/// It may carry a guard (the upstream's in-flight counter) that is released
/// when the body has been fully produced or is dropped.
pub(crate) struct SimBody {
    data: BodyData,
    guard: Option<Box<dyn Any + Send + Sync>>,
}

enum BodyData {
    Full(Option<Bytes>),
    Pattern { offset: u64, remaining: u64 },
}

impl SimBody {
    /// A body made of one buffer.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        SimBody {
            data: BodyData::Full((!bytes.is_empty()).then_some(bytes)),
            guard: None,
        }
    }

    /// An empty body.
    pub(crate) fn empty() -> Self {
        SimBody {
            data: BodyData::Full(None),
            guard: None,
        }
    }

    /// `len` bytes of [`upstream::pattern_byte`], streamed in 64 KiB chunks.
    pub(crate) fn pattern(len: u64) -> Self {
        SimBody {
            data: BodyData::Pattern {
                offset: 0,
                remaining: len,
            },
            guard: None,
        }
    }

    /// Attach a value that is dropped when the body ends or is dropped.
    pub(crate) fn with_guard(mut self, guard: impl Any + Send + Sync) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }

    fn remaining(&self) -> u64 {
        match &self.data {
            BodyData::Full(b) => b.as_ref().map_or(0, |b| b.len() as u64),
            BodyData::Pattern { remaining, .. } => *remaining,
        }
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let chunk = match &mut this.data {
            BodyData::Full(b) => b.take(),
            BodyData::Pattern { offset, remaining } => {
                if *remaining == 0 {
                    None
                } else {
                    let len = (*remaining).min(upstream::CHUNK as u64);
                    let chunk = upstream::pattern_chunk(*offset, len as usize);
                    *offset += len;
                    *remaining -= len;
                    Some(chunk)
                }
            }
        };
        if chunk.is_none() {
            // Fully sent: release the in-flight guard now rather than at drop.
            this.guard = None;
        }
        Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining())
    }
}

/// A JSON response with the given status.
pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<SimBody> {
    let mut resp = Response::new(SimBody::full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Random lower-case hex of `bytes` random bytes (`2 * bytes` characters).
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::thread_rng(), buf.as_mut_slice());
    hex::encode(buf)
}

/// Spawns tasks that end when the owning server's handle is dropped.
#[derive(Clone)]
struct ShutdownExec(watch::Receiver<()>);

impl<F> Executor<F> for ShutdownExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut stop = self.0.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                // Never sent on: only fires (with Err) when the sender is dropped.
                _ = stop.changed() => {}
            }
        });
    }
}

/// A running simulator server; dropping it stops the accept loop and every
/// connection it serves.
pub(crate) struct ServerHandle {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    // Dropping the sender ends every connection and HTTP/2 stream task.
    _stop: watch::Sender<()>,
}

impl ServerHandle {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Bind `addr` (`127.0.0.1:0` for tests) and serve `handler` over HTTP/1.1 and h2c.
pub(crate) async fn serve_on<F, Fut>(addr: SocketAddr, handler: F) -> std::io::Result<ServerHandle>
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<SimBody>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(());
    let accept = tokio::spawn(accept_loop(listener, Arc::new(handler), stop_rx));
    Ok(ServerHandle {
        addr,
        accept,
        _stop: stop_tx,
    })
}

async fn accept_loop<F, Fut>(listener: TcpListener, handler: Arc<F>, stop: watch::Receiver<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<SimBody>> + Send + 'static,
{
    let exec = ShutdownExec(stop);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // E.g. EMFILE under a benchmark: back off briefly, keep serving.
                tracing::debug!(error = %err, "simulator accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Latency benchmarks: no Nagle delay on small answers.
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(&handler);
        let conn_exec = exec.clone();
        exec.execute(async move {
            let svc = service_fn(move |req| {
                let fut = (*handler)(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let builder = auto::Builder::new(conn_exec);
            if let Err(err) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::trace!(error = %err, "simulator connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method, Version};
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use serde_json::Value;
    use sha2::{Digest, Sha256};

    type TestClient = Client<HttpConnector, Full<Bytes>>;

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn send(c: &TestClient, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
        let resp = c.request(req).await.expect("request reaches the simulator");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("whole body").to_bytes();
        (parts.status, parts.headers, body)
    }

    fn form_post(url: &str, body: &str) -> Request<Full<Bytes>> {
        Request::post(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("valid request")
    }

    const GOOD_FORM: &str =
        "grant_type=client_credentials&client_id=cid&client_secret=s%2B1&scope=openid,AdobeID";

    async fn fetch_token(c: &TestClient, ims: &SimIms) -> String {
        let (status, _, body) = send(c, form_post(&ims.token_url(), GOOD_FORM)).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_slice(&body).expect("json");
        v["access_token"].as_str().expect("token").to_owned()
    }

    fn get(url: String) -> Request<Full<Bytes>> {
        Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("valid request")
    }

    #[tokio::test]
    async fn ims_issues_valid_tokens() {
        let ims = SimIms::start().await.expect("start ims");
        let st = ims.state();
        st.add_client("cid", "s+1");
        assert!(ims.token_url().ends_with("/ims/token/v3"));
        let c = client();
        let (status, headers, body) = send(&c, form_post(&ims.token_url(), GOOD_FORM)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["token_type"], "bearer");
        assert_eq!(v["expires_in"], 86399);
        let token = v["access_token"].as_str().expect("token");
        assert!(token.starts_with("sim-") && token.len() == 36, "{token}");
        assert!(st.token_is_valid(token));
        assert!(!st.token_is_valid("sim-0000"));
        assert_eq!((st.calls(), st.issued()), (1, 1));

        let last = st.last_request().expect("recorded");
        assert_eq!(
            last.content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );
        let pairs: Vec<(&str, &str)> = last
            .form
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("grant_type", "client_credentials"),
                ("client_id", "cid"),
                ("client_secret", "s+1"),
                ("scope", "openid,AdobeID"),
            ]
        );
        // Kept per client id too: a later request of another client does not hide it.
        let other = "grant_type=client_credentials&client_id=other&client_secret=x";
        send(&c, form_post(&ims.token_url(), other)).await;
        assert_eq!(st.last_request_from("cid"), Some(last));
        let from_other = st.last_request_from("other").expect("recorded");
        assert!(from_other
            .form
            .contains(&("client_secret".into(), "x".into())));
        assert_eq!(st.last_request_from("nobody"), None);

        st.revoke_all_tokens();
        assert!(!st.token_is_valid(token));
        let again = fetch_token(&c, &ims).await;
        assert!(st.token_is_valid(&again));
        st.set_expires_in(0);
        let dead = fetch_token(&c, &ims).await;
        assert!(!st.token_is_valid(&dead));
    }

    #[tokio::test]
    async fn ims_invalid_client_and_secret_rotation() {
        let ims = SimIms::start().await.expect("start ims");
        let st = ims.state();
        st.add_client("cid", "old");
        let c = client();
        let (status, headers, body) = send(&c, form_post(&ims.token_url(), GOOD_FORM)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            &body[..],
            br#"{"error":"invalid_client","error_description":"invalid client_secret parameter"}"#
        );
        st.add_client("cid", "s+1");
        fetch_token(&c, &ims).await;
        st.revoke_secret("cid", "s+1");
        let (status, _, _) = send(&c, form_post(&ims.token_url(), GOOD_FORM)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!((st.calls(), st.issued()), (3, 1));
    }

    #[tokio::test]
    async fn ims_fail_next_down_and_delay() {
        let ims = SimIms::start().await.expect("start ims");
        let st = ims.state();
        st.add_client("cid", "s+1");
        let c = client();
        st.fail_next(2);
        for _ in 0..2 {
            let (status, _, body) = send(&c, form_post(&ims.token_url(), GOOD_FORM)).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            let v: Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["error"], "temporarily_unavailable");
            assert_eq!(v["error_description"], "simulated outage");
        }
        fetch_token(&c, &ims).await;
        assert_eq!((st.calls(), st.issued()), (3, 1));

        st.set_down(true);
        let (status, _, _) = send(&c, form_post(&ims.token_url(), GOOD_FORM)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        st.set_down(false);

        st.set_delay(Duration::from_millis(50));
        let started = std::time::Instant::now();
        fetch_token(&c, &ims).await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!((st.calls(), st.issued()), (5, 2));
    }

    #[tokio::test]
    async fn ims_expires_in_millis() {
        let ims = SimIms::start().await.expect("start ims");
        let st = ims.state();
        st.add_client("cid", "s+1");
        st.set_expires_in(3600);
        st.set_expires_in_millis(true);
        let c = client();
        let (_, _, body) = send(&c, form_post(&ims.token_url(), GOOD_FORM)).await;
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["expires_in"], 3_600_000);
        assert!(st.token_is_valid(v["access_token"].as_str().expect("token")));
    }

    #[tokio::test]
    async fn ims_rejects_malformed_requests() {
        let ims = SimIms::start().await.expect("start ims");
        let st = ims.state();
        st.add_client("cid", "s+1");
        let c = client();
        let url = ims.token_url();

        let req = Request::post(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("valid request");
        let (status, _, body) = send(&c, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"], "invalid_request");

        let form = "grant_type=password&client_id=cid&client_secret=s%2B1&scope=openid";
        let (status, _, body) = send(&c, form_post(&url, form)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"], "unsupported_grant_type");

        let form = "grant_type=client_credentials&client_id=cid&client_secret=s%2B1&scope=";
        let (status, _, body) = send(&c, form_post(&url, form)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"], "invalid_scope");

        let (status, _, body) = send(&c, get(url.clone())).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(serde_json::from_slice::<Value>(&body).is_ok());
        assert_eq!(st.issued(), 0);
    }

    #[tokio::test]
    async fn upstream_checks_tokens_and_echoes() {
        let ims = SimIms::start().await.expect("start ims");
        ims.state().add_client("cid", "s+1");
        let up = SimUpstream::start(Some(ims.state()))
            .await
            .expect("start upstream");
        let st = up.state();
        let c = client();
        let url = format!(
            "{}/attask/api/v19.0/proj/search?name=Demo&$$LIMIT=1",
            up.url()
        );

        let (status, headers, body) = send(&c, get(url.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            &body[..],
            br#"{"error_code":"401013","message":"Oauth token is not valid"}"#
        );
        assert_eq!(st.count(), 1);

        let token = fetch_token(&c, &ims).await;
        let req = Request::post(&url)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header("x-api-key", "cid")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .body(Full::new(Bytes::from_static(b"hello")))
            .expect("valid request");
        let (status, headers, body) = send(&c, req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::SET_COOKIE], "session=sim-upstream; Path=/");
        assert_eq!(headers["keep-alive"], "timeout=5");
        assert_eq!(headers["x-upstream-request-id"].len(), 32);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/attask/api/v19.0/proj/search");
        assert_eq!(v["query"], "name=Demo&$$LIMIT=1");
        assert_eq!(v["headers"]["x-api-key"], "cid");
        assert_eq!(v["headers"]["x-multi"], "a, b");
        assert_eq!(v["body"], "hello");
        assert_eq!(v["data"][0]["objCode"], "PROJ");

        let last = st.last().expect("seen");
        assert_eq!(last.method, "POST");
        assert_eq!(last.path, "/attask/api/v19.0/proj/search");
        assert_eq!(last.query.as_deref(), Some("name=Demo&$$LIMIT=1"));
        assert_eq!(last.version, Version::HTTP_11);
        assert_eq!(&last.body[..], b"hello");
        assert_eq!(last.body_len, 5);
        assert_eq!(st.count(), 2);

        st.reject_next(1);
        let authed = |u: String| {
            Request::get(u)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .expect("valid request")
        };
        assert_eq!(
            send(&c, authed(url.clone())).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(send(&c, authed(url.clone())).await.0, StatusCode::OK);
        st.reject_tokens(true);
        assert_eq!(
            send(&c, authed(url.clone())).await.0,
            StatusCode::UNAUTHORIZED
        );
        st.reject_tokens(false);
        ims.state().revoke_all_tokens();
        assert_eq!(
            send(&c, authed(url.clone())).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(st.requests().len(), 6);
        st.clear();
        assert_eq!((st.count(), st.requests().len()), (0, 0));
        assert!(st.last().is_none());
    }

    #[tokio::test]
    async fn upstream_download_streams_the_pattern() {
        let up = SimUpstream::start(None).await.expect("start upstream");
        let c = client();
        let n: u64 = 1_000_003;
        let resp = c
            .request(get(format!("{}/files/download?bytes={n}", up.url())))
            .await
            .expect("request");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_LENGTH],
            n.to_string().as_str()
        );
        let mut body = resp.into_body();
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                len += data.len() as u64;
                hasher.update(&data);
            }
        }
        assert_eq!(len, n);
        assert_eq!(hex::encode(hasher.finalize()), pattern_sha256(n));
        let direct: Vec<u8> = (0..1000).map(pattern_byte).collect();
        assert_eq!(pattern_sha256(1000), hex::encode(Sha256::digest(&direct)));
        assert_eq!(
            pattern_sha256(0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[tokio::test]
    async fn upstream_upload_hashes_without_storing() {
        let up = SimUpstream::start(None).await.expect("start upstream");
        let c = client();
        let data: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let expect = hex::encode(Sha256::digest(&data));
        let req = Request::put(format!("{}/docs/upload", up.url()))
            .body(Full::new(Bytes::from(data)))
            .expect("valid request");
        let (status, _, body) = send(&c, req).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["bytes"], 1_500_000);
        assert_eq!(v["sha256"], expect.as_str());
        let last = up.state().last().expect("seen");
        assert_eq!(last.method, "PUT");
        assert!(last.body.is_empty());
        assert_eq!(last.body_len, 1_500_000);
    }

    #[tokio::test]
    async fn upstream_status_and_slow() {
        let up = SimUpstream::start(None).await.expect("start upstream");
        let c = client();
        let (status, headers, body) = send(&c, get(format!("{}/x/status/429", up.url()))).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers[header::RETRY_AFTER], "2");
        assert_eq!(
            &body[..],
            br#"{"error_code":"429050","message":"Too many requests"}"#
        );
        let (status, _, _) = send(&c, get(format!("{}/status/503", up.url()))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _, body) = send(&c, get(format!("{}/x/status/204", up.url()))).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());

        let started = std::time::Instant::now();
        let slow = || {
            let c = c.clone();
            let url = format!("{}/api/slow?ms=100", up.url());
            async move { send(&c, get(url)).await }
        };
        let (a, b, d) = tokio::join!(slow(), slow(), slow());
        assert!(started.elapsed() >= Duration::from_millis(100));
        for (status, _, body) in [a, b, d] {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], br#"{"slow":true}"#);
        }
        assert_eq!(up.state().max_concurrent(), 3);
    }

    #[tokio::test]
    async fn upstream_speaks_h2c() {
        let up = SimUpstream::start(None).await.expect("start upstream");
        let c: TestClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let req = Request::builder()
            .method(Method::DELETE)
            .uri(format!("{}/a/b", up.url()))
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        let (status, _, _) = send(&c, req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(up.state().last().expect("seen").version, Version::HTTP_2);
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_server() {
        let up = SimUpstream::start(None).await.expect("start upstream");
        let addr = up.addr();
        let url = format!("{}/x/slow?ms=1", up.url());
        let c = client();
        // Leaves a pooled keep-alive connection behind.
        assert_eq!(send(&c, get(url.clone())).await.0, StatusCode::OK);
        drop(up);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        assert!(
            c.request(get(url)).await.is_err(),
            "kept-alive connection closed"
        );
    }
}
