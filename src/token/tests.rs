//! Timing rules, checked against a scripted token source on a paused clock.

use super::*;
use std::collections::VecDeque;

#[derive(Default)]
struct Script {
    answers: Mutex<VecDeque<Result<Duration, FetchErrorKind>>>,
    calls: AtomicUsize,
    secrets_tried: Mutex<Vec<usize>>,
    delay: Mutex<Duration>,
    rejected_secrets: Mutex<Vec<usize>>,
    default_lifetime: Mutex<Option<Duration>>,
}

struct Fake(Arc<Script>);

impl TokenSource for Fake {
    fn secret_count(&self) -> usize {
        2
    }
    fn fetch(
        &self,
        secret: usize,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedToken, FetchError>> + Send + '_>> {
        let s = self.0.clone();
        Box::pin(async move {
            let n = s.calls.fetch_add(1, Ordering::SeqCst);
            s.secrets_tried.lock().unwrap().push(secret);
            let delay = *s.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            if s.rejected_secrets.lock().unwrap().contains(&secret) {
                return Err(FetchError {
                    kind: FetchErrorKind::InvalidClient,
                    message: "invalid_client".into(),
                });
            }
            let next = s.answers.lock().unwrap().pop_front();
            let answer = next.unwrap_or_else(|| {
                s.default_lifetime
                    .lock()
                    .unwrap()
                    .ok_or(FetchErrorKind::Http5xx)
            });
            match answer {
                Ok(lifetime) => Ok(IssuedToken {
                    access_token: crate::secret::Secret::new(format!("tok-{n}")),
                    lifetime,
                }),
                Err(kind) => Err(FetchError {
                    kind,
                    message: format!("{kind:?}"),
                }),
            }
        })
    }
}

const HOUR: Duration = Duration::from_secs(3600);

fn start(script: &Arc<Script>, margin: Duration) -> Arc<TokenManager> {
    let timing = Timing {
        refresh_margin: margin,
        request_timeout: Duration::from_secs(10),
    };
    TokenManager::start(
        "wf",
        Box::new(Fake(script.clone())),
        timing,
        Arc::new(Metrics::new()),
    )
}

fn lifetimes(script: &Arc<Script>, default: Duration) {
    *script.default_lifetime.lock().unwrap() = Some(default);
}

#[tokio::test(start_paused = true)]
async fn many_requests_share_one_fetch() {
    let script = Arc::new(Script::default());
    lifetimes(&script, 24 * HOUR);
    *script.delay.lock().unwrap() = Duration::from_millis(300);
    let mgr = start(&script, HOUR);
    let mut joins = Vec::new();
    for _ in 0..50 {
        let m = mgr.clone();
        joins.push(tokio::spawn(async move {
            m.token().await.map(|t| t.generation)
        }));
    }
    for j in joins {
        assert_eq!(j.await.unwrap().unwrap(), 1);
    }
    for _ in 0..100 {
        mgr.token().await.unwrap();
    }
    assert_eq!(script.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_at_the_margin_not_before() {
    let script = Arc::new(Script::default());
    lifetimes(&script, 24 * HOUR);
    let mgr = start(&script, HOUR);
    assert_eq!(mgr.token().await.unwrap().generation, 1);
    tokio::time::sleep(23 * HOUR - Duration::from_secs(60)).await;
    assert_eq!(
        script.calls.load(Ordering::SeqCst),
        1,
        "refreshed too early"
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        script.calls.load(Ordering::SeqCst),
        2,
        "no refresh inside the margin"
    );
    assert_eq!(mgr.current().unwrap().generation, 2);
}

#[tokio::test(start_paused = true)]
async fn margin_is_capped_at_half_the_lifetime() {
    let script = Arc::new(Script::default());
    lifetimes(&script, Duration::from_secs(100));
    let mgr = start(&script, HOUR);
    mgr.token().await.unwrap();
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(script.calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(script.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn failed_refresh_keeps_old_token_and_backs_off_exponentially() {
    let script = Arc::new(Script::default());
    script
        .answers
        .lock()
        .unwrap()
        .push_back(Ok(Duration::from_secs(1000)));
    let mgr = start(&script, Duration::from_secs(100));
    mgr.token().await.unwrap();
    // Refresh due at 900 s; every answer after the first fails.
    tokio::time::sleep(Duration::from_millis(900_300)).await;
    assert_eq!(script.calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        mgr.current().unwrap().generation,
        1,
        "old token must stay in use"
    );
    assert_eq!(mgr.report().state, "failed");
    assert!(
        !mgr.report().ready,
        "inside the margin with a failed refresh is not ready"
    );
    // Retries at ~0.5-1 s, 1-2 s, 2-4 s, 4-8 s after each failure: 5 more within 16 s, not 16.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let calls = script.calls.load(Ordering::SeqCst);
    assert!((5..=7).contains(&calls), "calls = {calls}");
    assert!(mgr.report().last_error.is_some());
}

#[test]
fn backoff_doubles_to_sixty_seconds_with_jitter() {
    for (n, base) in [(1u32, 1u64), (2, 2), (3, 4), (6, 32), (7, 60), (30, 60)] {
        for _ in 0..20 {
            let d = backoff(n);
            assert!(
                d <= Duration::from_secs(base) && d >= Duration::from_secs(base) / 2,
                "n={n} d={d:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn expired_token_is_never_returned_even_if_the_timer_is_late() {
    let script = Arc::new(Script::default());
    script
        .answers
        .lock()
        .unwrap()
        .push_back(Ok(Duration::from_secs(100)));
    let mgr = start(&script, Duration::from_secs(10));
    let t = mgr.token().await.unwrap();
    // Every later fetch fails: past expiry the token must not be handed out.
    tokio::time::sleep(Duration::from_secs(101)).await;
    assert!(!t.usable_at(Instant::now()));
    assert!(mgr.current().is_none());
    let err = mgr.token().await.unwrap_err();
    assert!(err.retry_after <= BACKOFF_MAX);
    assert_eq!(mgr.report().state, "expired");
}

#[tokio::test(start_paused = true)]
async fn ims_down_at_start_then_recovering() {
    let script = Arc::new(Script::default());
    for _ in 0..3 {
        script
            .answers
            .lock()
            .unwrap()
            .push_back(Err(FetchErrorKind::Connect));
    }
    lifetimes(&script, HOUR);
    let mgr = start(&script, Duration::from_secs(60));
    tokio::task::yield_now().await;
    // First fetch fails; a request during backoff gets Unavailable at once.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(mgr.token().await.is_err());
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(mgr.token().await.unwrap().generation, 1);
    assert_eq!(mgr.report().state, "valid");
    assert!(mgr.report().ready);
}

#[tokio::test(start_paused = true)]
async fn rejection_forces_one_refresh_per_interval() {
    let script = Arc::new(Script::default());
    lifetimes(&script, 24 * HOUR);
    let mgr = start(&script, HOUR);
    let first = mgr.token().await.unwrap();
    let mut joins = Vec::new();
    for _ in 0..20 {
        let (m, f) = (mgr.clone(), first.clone());
        joins.push(tokio::spawn(async move {
            m.refresh_after_rejection(&f).await.map(|t| t.generation)
        }));
    }
    for j in joins {
        assert_eq!(j.await.unwrap(), Some(2));
    }
    assert_eq!(
        script.calls.load(Ordering::SeqCst),
        2,
        "a storm of 401s makes one IMS call"
    );
    let second = mgr.current().unwrap();
    assert!(
        mgr.refresh_after_rejection(&second).await.is_none(),
        "second forced refresh within 5 s"
    );
    tokio::time::sleep(FORCED_REFRESH_INTERVAL).await;
    assert_eq!(
        mgr.refresh_after_rejection(&second)
            .await
            .unwrap()
            .generation,
        3
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_client_moves_to_next_secret_and_remembers_it() {
    let script = Arc::new(Script::default());
    lifetimes(&script, Duration::from_secs(100));
    script.rejected_secrets.lock().unwrap().push(0);
    let mgr = start(&script, Duration::from_secs(10));
    assert_eq!(mgr.token().await.unwrap().generation, 1);
    assert_eq!(mgr.report().secret_index, 2);
    tokio::time::sleep(Duration::from_secs(95)).await;
    assert_eq!(
        *script.secrets_tried.lock().unwrap(),
        vec![0, 1, 1],
        "the working secret is tried first afterwards"
    );
}
