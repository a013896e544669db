//! `ims-proxy demo`: a simulated IMS and two simulated upstream APIs on
//! loopback, the real proxy in front, and curl commands that work when pasted.

use crate::check::{generate_key, sha256_line};
use crate::config::Config;
use crate::server::{self, ServerHandle};
use crate::sim::{SimIms, SimUpstream};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The demo configuration template (`config/demo.toml`).
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// A running demo: simulators, proxy and the client key it made.
pub struct Demo {
    /// The proxy.
    pub server: ServerHandle,
    /// The client key (printed for the user; only its digest is in the config).
    pub key: String,
    /// Simulated IMS.
    pub ims: SimIms,
    /// Simulated Workfront.
    pub workfront: SimUpstream,
    /// Simulated Fusion.
    pub fusion: SimUpstream,
}

impl Demo {
    /// Starts simulators and proxy; waits until the proxy holds its tokens.
    pub async fn start(listen: SocketAddr, admin_listen: SocketAddr) -> Result<Demo, String> {
        let ims = SimIms::start()
            .await
            .map_err(|e| format!("simulated IMS: {e}"))?;
        let state = ims.state();
        let wf_secret = generate_key();
        let fusion_secret = generate_key();
        state.add_client("demo-workfront-client", &wf_secret);
        state.add_client("demo-fusion-client", &fusion_secret);
        let workfront = SimUpstream::start(Some(state.clone()))
            .await
            .map_err(|e| format!("simulated Workfront: {e}"))?;
        let fusion = SimUpstream::start(Some(state.clone()))
            .await
            .map_err(|e| format!("simulated Fusion: {e}"))?;
        let key = generate_key();
        let digest = sha256_line(&key);
        let digest = digest
            .trim_start_matches("sha256 = \"")
            .trim_end_matches('"');
        let text = DEMO_CONFIG
            .replace("{{LISTEN}}", &listen.to_string())
            .replace("{{ADMIN_LISTEN}}", &admin_listen.to_string())
            .replace("{{IMS_TOKEN_URL}}", &ims.token_url())
            .replace("{{WORKFRONT_URL}}", &workfront.url())
            .replace("{{FUSION_URL}}", &fusion.url())
            .replace("{{KEY_SHA256}}", digest);
        let env = HashMap::from([
            ("DEMO_WORKFRONT_SECRET".to_string(), wf_secret),
            ("DEMO_FUSION_SECRET".to_string(), fusion_secret),
        ]);
        let config =
            Config::parse(&text, Path::new("."), &env).map_err(|e| format!("demo config: {e}"))?;
        let server = server::start(config, None)
            .await
            .map_err(|e| e.to_string())?;
        for _ in 0..100 {
            if server.shared.ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Demo {
            server,
            key,
            ims,
            workfront,
            fusion,
        })
    }

    /// The curl commands to paste, one per line after a `#` comment.
    pub fn commands(&self) -> Vec<(&'static str, String)> {
        let p = self.server.proxy_addr;
        let a = self.server.admin_addr;
        let k = &self.key;
        vec![
            (
                "A Workfront search with the proxy key in a header (the upstream echoes what it received: an IMS token, no proxy key)",
                format!("curl -s -H 'x-proxy-key: {k}' 'http://{p}/workfront/attask/api/v19.0/proj/search?fields=name'"),
            ),
            (
                "A legacy Workfront client sending apiKey in a form body: it is the proxy key, and it never reaches the upstream",
                format!("curl -s -d 'apiKey={k}' -d 'name=Demo project' 'http://{p}/workfront/attask/api/v19.0/proj'"),
            ),
            (
                "A Fusion call: x-gw-region and x-organization-id are added by the route",
                format!("curl -s -H 'Authorization: Bearer {k}' 'http://{p}/fusion/api/v3/scenarios?teamId=1'"),
            ),
            ("A request without a key is refused with 401", format!("curl -s -i 'http://{p}/workfront/attask/api/v19.0/proj/search'")),
            ("Token state (never the token itself)", format!("curl -s 'http://{a}/tokens'")),
            ("Metrics", format!("curl -s 'http://{a}/metrics' | grep '^ims_proxy_requests_total'")),
        ]
    }

    /// The banner `demo` prints.
    pub fn banner(&self) -> String {
        let mut out = format!(
            "\nims-proxy demo is running\n\
             \x20 proxy:                   http://{}   (routes /workfront and /fusion)\n\
             \x20 admin:                   http://{}   (/metrics /healthz /readyz /tokens)\n\
             \x20 simulated IMS:           {}\n\
             \x20 simulated Workfront API: {}\n\
             \x20 simulated Fusion API:    {}\n\
             \x20 client key (demo-team):  {}\n\nTry:\n",
            self.server.proxy_addr,
            self.server.admin_addr,
            self.ims.token_url(),
            self.workfront.url(),
            self.fusion.url(),
            self.key
        );
        for (what, cmd) in self.commands() {
            out.push_str(&format!("\n# {what}\n{cmd}\n"));
        }
        out.push_str(
            "\nFrom the demo to a real config:\n\
             \x20 1. copy config/example.toml and fill in your credentials (README: Getting credentials)\n\
             \x20 2. ims-proxy hash-key --generate        # one key per client team; the sha256 line goes in the config\n\
             \x20 3. ims-proxy check --config FILE --fetch-tokens\n\
             \x20 4. ims-proxy run --config FILE\n\
             Ctrl-C stops the demo.\n",
        );
        out
    }
}

/// `ims-proxy demo`: runs until Ctrl-C or SIGTERM.
pub async fn run(listen: SocketAddr, admin_listen: SocketAddr) -> Result<(), String> {
    let demo = Demo::start(listen, admin_listen).await?;
    println!("{}", demo.banner());
    server::wait_for_signals(&demo.server).await;
    let Demo { server, .. } = demo;
    server.wait().await;
    Ok(())
}
