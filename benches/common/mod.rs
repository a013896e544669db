//! What the benchmarks that drive the real `ims-proxy` binary share: ports,
//! a config against the simulators, the child process and its memory.

#![allow(dead_code)]

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The client key every benchmark config admits.
pub const KEY: &str = "bench-client-key";

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`), 0 if unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// KiB as MiB for printing.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Ports of a running proxy.
#[derive(Clone, Copy)]
pub struct Ports {
    pub proxy: u16,
    pub admin: u16,
}

impl Ports {
    /// Two free ports.
    pub fn pick() -> Ports {
        Ports {
            proxy: free_port(),
            admin: free_port(),
        }
    }
}

/// A config with one `wf` route to `upstream` using the `wf` credential, and the bench key.
/// `secret` is the credential's client secret; `extra_route` lines go in the route.
pub fn config(
    ports: Ports,
    token_url: &str,
    upstream: &str,
    secret: &str,
    extra_route: &str,
) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
         [ims]\ntoken_url = \"{token_url}\"\n\
         [credentials.wf]\nclient_id = \"bench-client\"\nclient_secret = \"{secret}\"\nscopes = [\"openid\"]\n\
         [[routes]]\nname = \"wf\"\nprefix = \"/wf\"\nupstream = \"{upstream}\"\ncredential = \"wf\"\n{extra_route}\n\
         [[access.keys]]\nname = \"bench\"\nsha256 = \"{}\"\n",
        ports.proxy,
        ports.admin,
        ims_proxy::access::digest_hex(KEY)
    )
}

/// The proxy child process; killed when dropped.
pub struct Proxy(pub Child);

impl Proxy {
    /// Starts `ims-proxy run --config <config>` with warnings logged to stderr.
    pub fn spawn(config: &Path) -> Proxy {
        let child = Command::new(env!("CARGO_BIN_EXE_ims-proxy"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start ims-proxy");
        Proxy(child)
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits (bounded, 5 s) until `/readyz` on the admin port answers 200.
    pub async fn wait_ready(&self, ports: Ports) {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let ready = format!("http://127.0.0.1:{}/readyz", ports.admin);
        for _ in 0..100 {
            let req = Request::get(&ready).body(Empty::new()).expect("request");
            if let Ok(r) = client.request(req).await {
                let ok = r.status() == 200;
                let _ = r.into_body().collect().await;
                if ok {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("ims-proxy never became ready");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
