//! Thread per core: `server.workers` threads serve the proxy listener. Alone in
//! its own test binary, so the threads it counts are its server's.

mod support;

use std::time::Duration;
use support::*;

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
