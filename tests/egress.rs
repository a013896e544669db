//! `[outbound] proxy`: IMS and upstream traffic go through the egress proxy.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A minimal egress proxy on loopback: CONNECT tunnels and absolute-form forwarding.
async fn egress_proxy(
    deny_connect: bool,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tunnels, forwards) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (t, f) = (tunnels.clone(), forwards.clone());
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (t, f) = (t.clone(), f.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let mut first = text.lines().next().unwrap_or("").split(' ');
                let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
                if method == "CONNECT" {
                    t.fetch_add(1, Ordering::SeqCst);
                    if deny_connect {
                        let _ = client
                            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                } else {
                    f.fetch_add(1, Ordering::SeqCst);
                    let uri: http::Uri = target.parse().unwrap();
                    let Ok(mut upstream) =
                        TcpStream::connect(uri.authority().unwrap().as_str()).await
                    else {
                        return;
                    };
                    let rest = text.split_once("\r\n").map(|x| x.1).unwrap_or("");
                    let origin = format!(
                        "{method} {} HTTP/1.1\r\n{rest}",
                        uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
                    );
                    let _ = upstream.write_all(origin.as_bytes()).await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (addr, tunnels, forwards)
}

#[tokio::test]
async fn ims_and_upstream_calls_go_through_the_configured_egress_proxy() {
    let (proxy, tunnels, forwards) = egress_proxy(false).await;
    let h = Harness::with(Setup {
        outbound: format!("proxy = \"http://{proxy}\""),
        ..Setup::default()
    })
    .await;
    let r = get(
        &h.url("/workfront/attask/api/v19.0/proj/search"),
        &[("x-proxy-key", KEY)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        forwards.load(Ordering::SeqCst) >= 1,
        "the IMS call did not use the egress proxy"
    );
    assert!(
        tunnels.load(Ordering::SeqCst) >= 1,
        "the upstream call did not tunnel through the egress proxy"
    );
}

#[tokio::test]
async fn egress_proxy_refusing_the_tunnel_is_a_502() {
    let (proxy, tunnels, _) = egress_proxy(true).await;
    let h = Harness::with(Setup {
        outbound: format!("proxy = \"http://{proxy}\""),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    let r = get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)]).await;
    r.assert_refusal(502, "upstream_unreachable");
    assert!(tunnels.load(Ordering::SeqCst) >= 1);
    assert_eq!(h.up().count(), 0);
    let metrics = get(&h.admin("/metrics"), &[]).await.text();
    assert!(
        metrics.contains(r#"ims_proxy_upstream_errors_total{kind="connect",route="workfront"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn reload_onto_an_unusable_egress_path_is_refused() {
    let h = Harness::start().await;
    h.ready().await;
    let text = h.config_text.replace(
        "[outbound]\n",
        "[outbound]\nproxy = \"http://127.0.0.1:1\"\n",
    );
    let report = h.apply(&text).await;
    assert_eq!(report.result, "error", "{report:?}");
    assert!(
        report
            .error
            .as_deref()
            .unwrap_or("")
            .contains("cannot get a token"),
        "{report:?}"
    );
    assert_eq!(
        get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)])
            .await
            .status,
        200,
        "the old configuration keeps serving"
    );
}

#[tokio::test]
async fn timeout_changes_on_reload_keep_every_token() {
    let h = Harness::start().await;
    h.ready().await;
    let calls = h.ims().calls();
    let text = h
        .config_text
        .replace("request_timeout = \"3s\"", "request_timeout = \"4s\"")
        .replace("[outbound]\n", "[outbound]\npool_idle_timeout = \"30s\"\n");
    let report = h.apply(&text).await;
    assert_eq!(
        (report.result, report.kept.len(), report.renewed.len()),
        ("ok", 2, 0),
        "{report:?}"
    );
    assert_eq!(h.ims().calls(), calls, "no token was fetched again");
    assert_eq!(
        get(&h.url("/workfront/x"), &[("x-proxy-key", KEY)])
            .await
            .status,
        200
    );
}

fn expiry_gauge(metrics: &str, credential: &str) -> String {
    let prefix =
        format!("ims_proxy_token_expiry_timestamp_seconds{{credential=\"{credential}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_failed_reload_leaves_the_running_tokens_metrics() {
    let h = Harness::start().await;
    h.ready().await;
    let before = expiry_gauge(&get(&h.admin("/metrics"), &[]).await.text(), "workfront");
    assert!(!before.is_empty());
    // workfront gets a new secret IMS knows (its candidate fetches a token with another
    // lifetime); fusion gets one IMS does not know, so the reload as a whole fails.
    h.ims().add_client(CLIENT_ID, "second-secret");
    h.ims().set_expires_in(1000);
    let text = h
        .config_text
        .replacen(
            &format!("client_secret = \"{SECRET}\""),
            "client_secret = \"second-secret\"",
            1,
        )
        .replace(
            "client_secret = \"fusion-secret\"",
            "client_secret = \"unknown\"",
        );
    let report = h.apply(&text).await;
    assert_eq!(report.result, "error", "{report:?}");
    let after = expiry_gauge(&get(&h.admin("/metrics"), &[]).await.text(), "workfront");
    assert_eq!(
        after, before,
        "the gauge describes the token in use, not the discarded candidate's"
    );
}

/// The real binary with only the environment to go by: `HTTP_PROXY` carries IMS and
/// upstream calls through the egress proxy, and `NO_PROXY` exempts hosts from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_and_no_proxy_from_the_environment_are_honoured() {
    let (egress, tunnels, forwards) = egress_proxy(false).await;
    let (ims, up) = simulators().await;
    let dir = tempfile::tempdir().unwrap();
    for no_proxy in [None, Some("localhost,127.0.0.1")] {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (listen, admin) = (free(), free());
        let text = config_text(&Setup::default(), &ims.token_url(), &up.url())
            .replacen(
                "admin_listen = \"127.0.0.1:0\"",
                &format!("admin_listen = \"{admin}\""),
                1,
            )
            .replacen(
                "\nlisten = \"127.0.0.1:0\"",
                &format!("\nlisten = \"{listen}\""),
                1,
            );
        let path = dir.path().join("env-proxy.toml");
        std::fs::write(&path, text).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ims-proxy"));
        for var in [
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
            "http_proxy",
            "no_proxy",
            "NO_PROXY",
            "RUST_LOG",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("HTTP_PROXY", format!("http://{egress}"));
        if let Some(n) = no_proxy {
            cmd.env("NO_PROXY", n);
        }
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _child = Kill(child);
        let before = tunnels.load(Ordering::SeqCst) + forwards.load(Ordering::SeqCst);
        let url = format!("http://{listen}/workfront/attask/api/v19.0/proj/search");
        let mut status = 0;
        for _ in 0..200 {
            if let Ok(Ok(resp)) = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                client().request(
                    http::Request::get(&url)
                        .header("x-proxy-key", KEY)
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap(),
                ),
            )
            .await
            {
                status = resp.status().as_u16();
                if status == 200 {
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(status, 200, "NO_PROXY={no_proxy:?}");
        let through = tunnels.load(Ordering::SeqCst) + forwards.load(Ordering::SeqCst) - before;
        match no_proxy {
            None => assert!(
                through >= 2,
                "IMS and upstream calls should use HTTP_PROXY: {through}"
            ),
            Some(_) => assert_eq!(through, 0, "NO_PROXY hosts went through the egress proxy"),
        }
    }
}
