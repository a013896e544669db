//! Test support: a simulated IMS, a simulated upstream and the real proxy
//! server, all in-process on 127.0.0.1, started in one line.

#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ims_proxy::config::Config;
use ims_proxy::server::{self, ServerHandle};
use ims_proxy::sim::{ImsState, SimIms, SimUpstream, UpstreamState};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The client key tests use.
pub const KEY: &str = "test-client-key-0123456789";
/// A second key, limited to the `fusion` route.
pub const FUSION_KEY: &str = "fusion-only-key-9876543210";
/// The credential's client id.
pub const CLIENT_ID: &str = "wf-client-id";
/// The credential's secret.
pub const SECRET: &str = "p8e-TopSecretClientSecret";

/// Knobs for the generated config: TOML lines dropped into each section.
#[derive(Default, Clone)]
pub struct Setup {
    /// Lines in `[server]`.
    pub server: String,
    /// Lines in `[ims]`.
    pub ims: String,
    /// Lines in `[outbound]`.
    pub outbound: String,
    /// Lines in `[credentials.workfront]`.
    pub credential: String,
    /// Lines in the `workfront` route.
    pub route: String,
    /// Lines in `[access]`.
    pub access: String,
    /// Lines in the first key.
    pub key: String,
    /// Overrides the workfront route's upstream URL.
    pub upstream_url: Option<String>,
    /// Secrets for the credential (default: `[SECRET]`).
    pub secrets: Option<Vec<String>>,
    /// IMS answers `expires_in` with this many seconds.
    pub expires_in: Option<u64>,
}

/// Proxy + simulators.
pub struct Harness {
    pub ims: SimIms,
    pub upstream: SimUpstream,
    pub server: ServerHandle,
    pub config_text: String,
    pub config_file: Option<tempfile::TempDir>,
}

pub fn sha(key: &str) -> String {
    ims_proxy::access::digest_hex(key)
}

/// The config text for a setup against the given simulators.
pub fn config_text(setup: &Setup, ims_url: &str, upstream_url: &str) -> String {
    let secrets = setup
        .secrets
        .clone()
        .unwrap_or_else(|| vec![SECRET.to_string()]);
    let secret_line = if secrets.len() == 1 {
        format!("client_secret = \"{}\"", secrets[0])
    } else {
        format!(
            "client_secrets = [{}]",
            secrets
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{grace}{server}

[ims]
token_url = "{ims_url}"
request_timeout = "3s"
{ims}

[outbound]
{outbound}

[credentials.workfront]
client_id = "{CLIENT_ID}"
{secret_line}
scopes = ["openid", "AdobeID", "profile", "additional_info.projectedProductContext"]
org_id = "ORG123@AdobeOrg"
{credential}

[credentials.fusion]
client_id = "fusion-client-id"
client_secret = "fusion-secret"
scopes = ["openid", "AdobeID"]

[[routes]]
name = "workfront"
prefix = "/workfront"
upstream = "{upstream}"
credential = "workfront"
{route}

[[routes]]
name = "fusion"
prefix = "/fusion"
upstream = "{upstream_url}"
credential = "fusion"
headers = {{ "x-gw-region" = "or2", "x-organization-id" = "123456" }}

[access]
{access}

[[access.keys]]
name = "etl"
sha256 = "{key_sha}"
{key}

[[access.keys]]
name = "fusion-team"
sha256 = "{fusion_sha}"
routes = ["fusion"]
"#,
        server = setup.server,
        grace = if setup.server.contains("shutdown_grace") {
            ""
        } else {
            "shutdown_grace = \"5s\"\n"
        },
        ims = setup.ims,
        outbound = setup.outbound,
        credential = setup.credential,
        route = setup.route,
        access = setup.access,
        key = setup.key,
        upstream = setup.upstream_url.as_deref().unwrap_or(upstream_url),
        key_sha = sha(KEY),
        fusion_sha = sha(FUSION_KEY),
    )
}

/// A simulated IMS that knows the test credentials, and an upstream that checks its tokens.
pub async fn simulators() -> (SimIms, SimUpstream) {
    let ims = SimIms::start().await.expect("sim IMS");
    ims.state().add_client(CLIENT_ID, SECRET);
    ims.state().add_client("fusion-client-id", "fusion-secret");
    let upstream = SimUpstream::start(Some(ims.state()))
        .await
        .expect("sim upstream");
    (ims, upstream)
}

impl Harness {
    /// Simulators plus proxy with the default setup.
    pub async fn start() -> Harness {
        Self::with(Setup::default()).await
    }

    /// Simulators plus proxy with `setup`; the token fetch has started, call
    /// [`Harness::ready`] to wait for it.
    pub async fn with(setup: Setup) -> Harness {
        let ims = SimIms::start().await.expect("sim IMS");
        let st = ims.state();
        for s in setup
            .secrets
            .clone()
            .unwrap_or_else(|| vec![SECRET.to_string()])
        {
            st.add_client(CLIENT_ID, &s);
        }
        st.add_client("fusion-client-id", "fusion-secret");
        if let Some(e) = setup.expires_in {
            st.set_expires_in(e);
        }
        Self::with_ims(setup, ims).await
    }

    /// Like [`Harness::with`] with an IMS the caller prepared.
    pub async fn with_ims(setup: Setup, ims: SimIms) -> Harness {
        let upstream = SimUpstream::start(Some(ims.state()))
            .await
            .expect("sim upstream");
        let text = config_text(&setup, &ims.token_url(), &upstream.url());
        let config =
            Config::parse(&text, Path::new("."), &HashMap::new()).expect("test config is valid");
        let server = server::start(config, None).await.expect("server starts");
        Harness {
            ims,
            upstream,
            server,
            config_text: text,
            config_file: None,
        }
    }

    /// Like [`Harness::with`], but the config lives in a file, so `/reload` and
    /// `Shared::reload` re-read it; rewrite it with [`Harness::write_config`].
    pub async fn with_file(setup: Setup) -> Harness {
        let ims = SimIms::start().await.expect("sim IMS");
        for s in setup
            .secrets
            .clone()
            .unwrap_or_else(|| vec![SECRET.to_string()])
        {
            ims.state().add_client(CLIENT_ID, &s);
        }
        ims.state().add_client("fusion-client-id", "fusion-secret");
        if let Some(e) = setup.expires_in {
            ims.state().set_expires_in(e);
        }
        let upstream = SimUpstream::start(Some(ims.state()))
            .await
            .expect("sim upstream");
        let text = config_text(&setup, &ims.token_url(), &upstream.url());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ims-proxy.toml");
        std::fs::write(&path, &text).expect("write config");
        let config = Config::load_with_env(&path, &HashMap::new()).expect("test config is valid");
        let server = server::start(config, Some(path))
            .await
            .expect("server starts");
        Harness {
            ims,
            upstream,
            server,
            config_text: text,
            config_file: Some(dir),
        }
    }

    /// Rewrites the config file (for reload tests) from a new setup against the same simulators.
    pub fn write_config(&self, setup: &Setup) -> String {
        let text = config_text(setup, &self.ims.token_url(), &self.upstream.url());
        self.write_config_text(&text);
        text
    }

    /// Rewrites the config file with exactly `text` (broken or hand-edited configs).
    pub fn write_config_text(&self, text: &str) {
        let dir = self
            .config_file
            .as_ref()
            .expect("harness started with_file");
        std::fs::write(dir.path().join("ims-proxy.toml"), text).expect("write config");
    }

    pub fn ims(&self) -> Arc<ImsState> {
        self.ims.state()
    }

    pub fn up(&self) -> Arc<UpstreamState> {
        self.upstream.state()
    }

    /// `http://127.0.0.1:PORT{path}` on the proxy.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.server.proxy_addr, path)
    }

    /// `http://127.0.0.1:PORT{path}` on the admin server.
    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.server.admin_addr, path)
    }

    /// Applies config text to the running proxy, as a reload would.
    pub async fn apply(&self, text: &str) -> ims_proxy::state::ReloadReport {
        let config = Config::parse(text, Path::new("."), &HashMap::new()).expect("config is valid");
        self.server.shared.apply(config).await
    }

    /// Waits until every credential holds a token (bounded).
    pub async fn ready(&self) {
        for _ in 0..200 {
            if self.server.shared.ready() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("proxy never became ready");
    }
}

/// A whole response.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Asserts a spec refusal: status, code, request id.
    pub fn assert_refusal(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let v = self.json();
        assert_eq!(v["error"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(
            v["request_id"].as_str().is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert_eq!(
            self.headers["x-request-id"].to_str().unwrap(),
            v["request_id"].as_str().unwrap()
        );
    }
}

/// An HTTP/1.1 client (pooled keep-alive).
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends a request and collects the whole response.
pub async fn send(client: &Client<HttpConnector, Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
    let resp: Response<_> = client.request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET with headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(url);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    send(&client(), b.body(Full::new(Bytes::new())).unwrap()).await
}

/// POST a body with headers.
pub async fn post(url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut b = Request::post(url);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    send(&client(), b.body(Full::new(body.into())).unwrap()).await
}

/// Sends raw bytes on a fresh TCP connection and reads until the peer closes or `limit` passes.
pub async fn raw(addr: std::net::SocketAddr, request: &[u8], limit: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of one metric series (`name{labels}`) in Prometheus text, if exported.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("numeric metric value"))
}

/// The admin port's `/metrics` text.
pub async fn metrics_text(h: &Harness) -> String {
    get(&h.admin("/metrics"), &[]).await.text()
}

/// The real binary with an environment that does not depend on the caller's:
/// no inherited log level or format, config path, admin address, simulator
/// secrets or egress proxies.
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ims-proxy"));
    for var in [
        "RUST_LOG",
        "IMS_PROXY_CONFIG",
        "IMS_PROXY_ADMIN",
        "IMS_PROXY_LOG_FORMAT",
        "SIM_IMS_CLIENTS",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ] {
        c.env_remove(var);
    }
    c
}

/// The `/tokens` entry of one credential.
pub async fn token_entry(h: &Harness, credential: &str) -> serde_json::Value {
    let r = get(&h.admin("/tokens"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json();
    list.as_array()
        .expect("/tokens is a JSON list")
        .iter()
        .find(|e| e["credential"] == credential)
        .unwrap_or_else(|| panic!("no {credential} in {list}"))
        .clone()
}

/// A GET with the client key `key`, running in its own task.
pub fn spawn_get(h: &Harness, path: &str, key: &'static str) -> tokio::task::JoinHandle<Reply> {
    let url = h.url(path);
    tokio::spawn(async move { get(&url, &[("x-proxy-key", key)]).await })
}
