//! Thread per core: `server.workers` threads serve the proxy listener. Alone in
//! its own test binary, so the threads it counts are its server's.

mod support;

use std::time::Duration;
use support::*;

/// The tests here count threads and connections of the one server they start.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Live threads of this process named for a proxy worker (Linux: `comm` keeps 15 bytes).
fn worker_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("ims-proxy-worke"))
        .count()
}

#[tokio::test]
async fn workers_serve_every_connection_survive_a_reload_and_stop_with_the_server() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // Another test's server may still be stopping its threads.
    for _ in 0..200 {
        if worker_threads() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let h = Harness::with_file(Setup {
        server: "workers = 3".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    assert_eq!(h.server.workers(), 3);
    if cfg!(target_os = "linux") {
        assert_eq!(worker_threads(), 3);
    }

    // Twelve keep-alive connections at once, five requests each: whichever worker
    // accepted a connection serves it, with its own upstream pool.
    let lanes: Vec<_> = (0..12)
        .map(|lane| {
            let url = h.url(&format!(
                "/workfront/attask/api/v19.0/proj/search?lane={lane}"
            ));
            tokio::spawn(async move {
                let client = client();
                let mut ok = 0;
                for _ in 0..5 {
                    let req = http::Request::get(&url)
                        .header("x-proxy-key", KEY)
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap();
                    if send(&client, req).await.status == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    for lane in lanes {
        assert_eq!(lane.await.unwrap(), 5);
    }
    let seen = h.up().requests();
    assert_eq!(seen.len(), 60);
    assert!(seen.iter().all(|r| r.headers["x-api-key"] == CLIENT_ID
        && r.headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer ")));

    // The count is fixed until restart: a reload says so and changes nothing else.
    h.write_config(&Setup {
        server: "workers = 1".into(),
        ..Setup::default()
    });
    let report = h.server.shared.reload().await;
    assert_eq!(report.result, "ok", "{:?}", report.error);
    assert!(
        report.warnings.iter().any(|w| w.contains("server.workers")),
        "{:?}",
        report.warnings
    );
    assert_eq!(h.server.workers(), 3);
    let after = get(
        &h.url("/workfront/attask/api/v19.0/proj/search"),
        &[("x-proxy-key", KEY)],
    )
    .await;
    assert_eq!(after.status, 200);

    h.server.shutdown().await;
    if cfg!(target_os = "linux") {
        let mut left = worker_threads();
        for _ in 0..200 {
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            left = worker_threads();
        }
        assert_eq!(left, 0, "worker threads outlived the server");
    }
}

#[tokio::test]
async fn a_burst_of_new_connections_is_spread_evenly_over_the_workers() {
    let _alone = ONE_AT_A_TIME.lock().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::with(Setup {
        server: "workers = 2".into(),
        ..Setup::default()
    })
    .await;
    h.ready().await;
    // 16 clients connect at once and each sends a request; whichever worker wins
    // an accept, the connections must end up 8 and 8, all served.
    let connects: Vec<_> = (0..16)
        .map(|_| tokio::net::TcpStream::connect(h.server.proxy_addr))
        .collect();
    let mut streams = Vec::new();
    for c in connects {
        streams.push(c.await.unwrap());
    }
    let request = format!(
        "GET /workfront/attask/api/v19.0/proj/search HTTP/1.1\r\nHost: x\r\nx-proxy-key: {KEY}\r\n\r\n"
    );
    for s in &mut streams {
        s.write_all(request.as_bytes()).await.unwrap();
    }
    for s in &mut streams {
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
    }
    assert_eq!(h.server.connections_per_worker(), vec![8, 8]);
    drop(streams);
    // Closed connections leave the counts (bounded wait: the closes are noticed asynchronously).
    for _ in 0..200 {
        if h.server.connections_per_worker() == vec![0, 0] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("counts stayed at {:?}", h.server.connections_per_worker());
}

#[test]
fn a_worker_count_out_of_range_names_the_key() {
    for bad in ["0", "1025", "-1", "\"many\""] {
        let text = format!("[server]\nworkers = {bad}\n");
        let err = ims_proxy::config::Config::parse(
            &text,
            std::path::Path::new("."),
            &std::collections::HashMap::new(),
        )
        .expect_err(bad)
        .to_string();
        assert!(err.contains("server.workers"), "{bad}: {err}");
    }
}
