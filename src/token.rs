//! The token manager: one per credential, holding the current IMS token in an
//! `ArcSwap` so the hot path reads it without locks, and one background task
//! that alone fetches, refreshes, backs off and swaps.

use crate::config::CredentialConfig;
use crate::ims::{FetchError, FetchErrorKind, ImsClient, IssuedToken};
use crate::metrics::Metrics;
use arc_swap::ArcSwapOption;
use http::HeaderValue;
use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// At most one refresh forced by upstream 401s per credential in this window.
pub const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// First retry delay after a failed fetch; doubles per failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// An access token with its deadlines.
#[derive(Debug)]
pub struct Token {
    /// `Bearer <token>`, marked sensitive so hyper never logs it.
    pub header: HeaderValue,
    /// First 8 hex digits of the token's SHA-256, for audit lines (shared: every
    /// request's log line takes a reference, not a copy).
    pub fingerprint: Arc<str>,
    /// When IMS says it expires.
    pub expires_at: Instant,
    /// The same, as wall-clock time for /tokens and metrics.
    pub expires_at_wall: SystemTime,
    /// Lifetime IMS gave it.
    pub lifetime: Duration,
    /// Increments with every new token of this credential.
    pub generation: u64,
}

impl Token {
    /// A token is not sent when less than this is left: it could expire in transit.
    fn safety(&self) -> Duration {
        (self.lifetime / 10).min(Duration::from_secs(5))
    }

    /// True while the token may still be sent.
    pub fn usable_at(&self, now: Instant) -> bool {
        now + self.safety() < self.expires_at
    }

    /// When the background task should replace it.
    pub fn refresh_at(&self, margin: Duration) -> Instant {
        self.expires_at - margin.min(self.lifetime / 2)
    }
}

/// Where tokens come from: IMS in production, a script in unit tests.
pub trait TokenSource: Send + Sync + 'static {
    /// How many client secrets there are to try.
    fn secret_count(&self) -> usize;
    /// One token request with secret number `secret`.
    fn fetch(
        &self,
        secret: usize,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedToken, FetchError>> + Send + '_>>;
}

/// The real source: IMS over HTTPS, through the snapshot's current IMS client.
pub struct ImsSource {
    /// Shared HTTP client cell (replaced when `[ims]`/`[outbound]` settings change).
    pub client: Arc<arc_swap::ArcSwap<ImsClient>>,
    /// The credential to fetch for.
    pub credential: CredentialConfig,
}

impl TokenSource for ImsSource {
    fn secret_count(&self) -> usize {
        self.credential.secrets.len()
    }

    fn fetch(
        &self,
        secret: usize,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedToken, FetchError>> + Send + '_>> {
        Box::pin(async move {
            match self.credential.secrets.get(secret) {
                Some(s) => self.client.load_full().fetch(&self.credential, s).await,
                None => Err(FetchError {
                    kind: FetchErrorKind::InvalidRequest,
                    message: "no such secret".into(),
                }),
            }
        })
    }
}

/// Why a request could not get a token.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable {
    /// When trying again makes sense.
    pub retry_after: Duration,
}

#[derive(Default)]
struct Status {
    last_ok: Option<SystemTime>,
    last_error: Option<String>,
    last_attempt_failed: bool,
    next_retry: Option<Instant>,
    refreshes_ok: u64,
    refreshes_failed: u64,
    last_forced: Option<Instant>,
}

/// Timing rules of a manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Refresh when less than this is left (capped at half the lifetime).
    pub refresh_margin: Duration,
    /// How long a request waits for a fetch in progress.
    pub request_timeout: Duration,
}

struct Inner {
    name: String,
    source: Box<dyn TokenSource>,
    timing: Mutex<Timing>,
    metrics: Arc<Metrics>,
    current: ArcSwapOption<Token>,
    status: Mutex<Status>,
    fetching: AtomicBool,
    force: AtomicBool,
    wake: Notify,
    published: watch::Sender<u64>,
    preferred_secret: AtomicUsize,
    generation: AtomicU64,
    /// Set when the credential leaves the configuration: its metric series are
    /// gone and must not come back from requests still in flight.
    retired: AtomicBool,
}

/// One credential's token holder; dropping the last handle stops its task.
pub struct TokenManager {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for TokenManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What /tokens shows for one credential; never the token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenReport {
    /// Credential name.
    pub credential: String,
    /// `valid`, `refreshing`, `expired`, `failed` or `empty`.
    pub state: &'static str,
    /// RFC 3339 expiry of the current token.
    pub expires_at: Option<String>,
    /// Seconds left on the current token.
    pub expires_in_seconds: Option<i64>,
    /// RFC 3339 time of the last successful fetch.
    pub last_refresh: Option<String>,
    /// Reason of the last failed attempt, if the last attempt failed.
    pub last_error: Option<String>,
    /// Successful fetches.
    pub refreshes_ok: u64,
    /// Failed fetch rounds.
    pub refreshes_failed: u64,
    /// Which configured secret is in use (1-based).
    pub secret_index: usize,
    /// True when the proxy can serve this credential and is not about to lose it.
    pub ready: bool,
}

fn fingerprint(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    hex::encode(&d[..4])
}

/// Backoff before retry number `failures` (1-based): 1 s doubling to 60 s, jittered to 50–100 %.
pub fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let factor = rand::thread_rng().gen_range(0.5..=1.0);
    base.mul_f64(factor)
}

impl TokenManager {
    /// Starts the manager: its task fetches the first token at once.
    pub fn start(
        name: &str,
        source: Box<dyn TokenSource>,
        timing: Timing,
        metrics: Arc<Metrics>,
    ) -> Arc<TokenManager> {
        for result in ["ok", "error"] {
            metrics.token_refreshes.with_label_values(&[name, result]);
        }
        metrics.token_forced_refreshes.with_label_values(&[name]);
        for kind in FetchErrorKind::ALL {
            metrics
                .token_fetch_errors
                .with_label_values(&[name, kind.label()]);
        }
        metrics.token_fetch_duration.with_label_values(&[name]);
        let (published, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            name: name.to_string(),
            source,
            timing: Mutex::new(timing),
            metrics,
            current: ArcSwapOption::empty(),
            status: Mutex::new(Status::default()),
            fetching: AtomicBool::new(true),
            force: AtomicBool::new(false),
            wake: Notify::new(),
            published,
            preferred_secret: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        });
        let task = tokio::spawn(inner.clone().run());
        Arc::new(TokenManager { inner, task })
    }

    /// Applies new `[ims]` timing (on reload); the refresh schedule is recomputed at once.
    pub fn set_timing(&self, timing: Timing) {
        *self.inner.timing.lock().unwrap_or_else(|e| e.into_inner()) = timing;
        self.inner.wake.notify_one();
    }

    /// Stops writing metrics (the credential left the configuration or got a new
    /// manager); requests still holding this manager keep being served by it.
    pub fn retire(&self) {
        // The task keeps refreshing while requests still hold this manager, so a 401
        // among them can still be answered with a fresh token.
        self.inner.retired.store(true, Ordering::SeqCst);
    }

    /// Sets the expiry gauge from the token held now (after a failed reload's candidates overwrote it).
    pub fn publish_expiry(&self) {
        if let Some(t) = self.inner.current.load_full() {
            self.inner.publish_expiry(&t);
        }
    }

    /// The credential's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current token if it may still be sent; never blocks.
    pub fn current(&self) -> Option<Arc<Token>> {
        let t = self.inner.current.load_full()?;
        t.usable_at(Instant::now()).then_some(t)
    }

    /// A usable token: at once when one is held, else after the fetch in progress
    /// (bounded by `request_timeout`); `Unavailable` while IMS is failing.
    pub async fn token(&self) -> Result<Arc<Token>, Unavailable> {
        if let Some(t) = self.current() {
            return Ok(t);
        }
        self.wait_for(|_| true).await
    }

    /// After an upstream 401 with `used`: force one refresh (at most one per
    /// credential per 5 s, shared by all callers) and return a newer token, if one comes.
    pub async fn refresh_after_rejection(&self, used: &Token) -> Option<Arc<Token>> {
        let newer = |t: &Token| t.generation > used.generation;
        if let Some(t) = self.current().filter(|t| newer(t)) {
            return Some(t);
        }
        let should_force = {
            let mut st = self.inner.lock_status();
            let now = Instant::now();
            if st
                .last_forced
                .is_some_and(|at| now < at + FORCED_REFRESH_INTERVAL)
            {
                false
            } else {
                st.last_forced = Some(now);
                // Set under the lock so concurrent callers see a refresh in progress and wait for it.
                self.inner.force.store(true, Ordering::SeqCst);
                true
            }
        };
        if should_force {
            if let Some(metrics) = self.inner.metrics() {
                metrics
                    .token_forced_refreshes
                    .with_label_values(&[&self.inner.name])
                    .inc();
            }
            tracing::warn!(credential = %self.inner.name, "upstream rejected the current token; forcing a refresh");
            self.inner.wake.notify_one();
        } else if !self.inner.force.load(Ordering::SeqCst)
            && !self.inner.fetching.load(Ordering::SeqCst)
        {
            // No refresh under way: one may have finished since the first look.
            return self.current().filter(|t| newer(t));
        }
        self.wait_for(newer).await.ok()
    }

    async fn wait_for(&self, accept: impl Fn(&Token) -> bool) -> Result<Arc<Token>, Unavailable> {
        let inner = &self.inner;
        let mut rx = inner.published.subscribe();
        let deadline = Instant::now() + inner.timing().request_timeout;
        inner.wake.notify_one();
        loop {
            if let Some(t) = self.current().filter(|t| accept(t)) {
                return Ok(t);
            }
            // Read `force` before `fetching`: the task raises `fetching` before lowering `force`.
            if !inner.force.load(Ordering::SeqCst) && !inner.fetching.load(Ordering::SeqCst) {
                let st = inner.lock_status();
                if let Some(next) = st.next_retry.filter(|n| *n > Instant::now()) {
                    // IMS is failing and the task is backing off: answer now, not after a wait.
                    return Err(Unavailable {
                        retry_after: next - Instant::now(),
                    });
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(Unavailable {
                        retry_after: Duration::from_secs(1),
                    })
                }
            }
        }
    }

    /// The /tokens view.
    pub fn report(&self) -> TokenReport {
        let inner = &self.inner;
        let st = inner.lock_status();
        let token = inner.current.load_full();
        let now = Instant::now();
        let fetching = inner.fetching.load(Ordering::SeqCst);
        let usable = token.as_ref().is_some_and(|t| t.usable_at(now));
        let state = if fetching {
            "refreshing"
        } else {
            match &token {
                None if st.last_attempt_failed => "failed",
                None => "empty",
                Some(_) if !usable => "expired",
                Some(_) if st.last_attempt_failed => "failed",
                Some(_) => "valid",
            }
        };
        let in_margin = token
            .as_ref()
            .is_some_and(|t| now >= t.refresh_at(inner.timing().refresh_margin));
        let ready = usable && !(in_margin && st.last_attempt_failed);
        TokenReport {
            credential: inner.name.clone(),
            state,
            expires_at: token
                .as_ref()
                .map(|t| humantime::format_rfc3339_seconds(t.expires_at_wall).to_string()),
            expires_in_seconds: token.as_ref().map(|t| {
                if t.expires_at > now {
                    (t.expires_at - now).as_secs() as i64
                } else {
                    -((now - t.expires_at).as_secs() as i64)
                }
            }),
            last_refresh: st
                .last_ok
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            last_error: st
                .last_attempt_failed
                .then(|| st.last_error.clone())
                .flatten(),
            refreshes_ok: st.refreshes_ok,
            refreshes_failed: st.refreshes_failed,
            secret_index: inner.preferred_secret.load(Ordering::SeqCst) + 1,
            ready,
        }
    }
}

impl Inner {
    /// The metrics to write to, unless retired.
    fn metrics(&self) -> Option<&Metrics> {
        (!self.retired.load(Ordering::SeqCst)).then_some(&*self.metrics)
    }

    fn timing(&self) -> Timing {
        *self.timing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Status> {
        // A panic while holding the lock cannot leave Status inconsistent in a way that matters.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The only writer of `current`.
    async fn run(self: Arc<Self>) {
        let mut failures: u32 = 0;
        loop {
            let wake = self.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let forced = self.force.load(Ordering::SeqCst);
            let due = match self.current.load_full() {
                Some(t) if !forced => t.refresh_at(self.timing().refresh_margin),
                _ => Instant::now(),
            };
            if due > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = &mut wake => {}
                }
                continue;
            }
            // `fetching` goes up before `force` comes down, so waiters never see neither.
            self.fetching.store(true, Ordering::SeqCst);
            self.force.store(false, Ordering::SeqCst);
            let outcome = self.fetch_round().await;
            let retry = match outcome {
                Ok(()) => {
                    failures = 0;
                    None
                }
                Err(()) => {
                    failures = failures.saturating_add(1);
                    Some(backoff(failures))
                }
            };
            self.lock_status().next_retry = retry.map(|d| Instant::now() + d);
            self.fetching.store(false, Ordering::SeqCst);
            self.published.send_modify(|g| *g += 1);
            if let Some(delay) = retry {
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// One refresh: the preferred secret first, the next ones on `invalid_client`.
    async fn fetch_round(&self) -> Result<(), ()> {
        let count = self.source.secret_count().max(1);
        let first = self.preferred_secret.load(Ordering::SeqCst) % count;
        let mut last_err = None;
        for step in 0..count {
            let idx = (first + step) % count;
            let started = Instant::now();
            let result = self.source.fetch(idx).await;
            if let Some(m) = self.metrics() {
                m.token_fetch_duration
                    .with_label_values(&[&self.name])
                    .observe(started.elapsed().as_secs_f64());
            }
            match result {
                Ok(issued) => {
                    if idx != first {
                        tracing::warn!(credential = %self.name, rejected_secret = first + 1, using_secret = idx + 1,
                            "client secret rejected by IMS (invalid_client); the next configured secret worked and is used first from now on");
                        self.preferred_secret.store(idx, Ordering::SeqCst);
                    }
                    self.install(issued, started);
                    return Ok(());
                }
                Err(e) => {
                    if let Some(m) = self.metrics() {
                        m.token_fetch_errors
                            .with_label_values(&[&self.name, e.kind.label()])
                            .inc();
                    }
                    let more = e.kind == FetchErrorKind::InvalidClient && step + 1 < count;
                    if more {
                        tracing::warn!(credential = %self.name, secret = idx + 1, error = %e, "client secret rejected; trying the next one");
                    }
                    last_err = Some(e);
                    if !more {
                        break;
                    }
                }
            }
        }
        let e = last_err
            .map(|e| e.message)
            .unwrap_or_else(|| "no secret configured".into());
        let still_valid = self
            .current
            .load()
            .as_ref()
            .is_some_and(|t| t.usable_at(Instant::now()));
        tracing::error!(credential = %self.name, error = %e, old_token_still_valid = still_valid, "IMS token fetch failed");
        if let Some(m) = self.metrics() {
            m.token_refreshes
                .with_label_values(&[&self.name, "error"])
                .inc();
        }
        let mut st = self.lock_status();
        st.last_error = Some(e);
        st.last_attempt_failed = true;
        st.refreshes_failed += 1;
        Err(())
    }

    fn publish_expiry(&self, token: &Token) {
        let unix = token
            .expires_at_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        if let Some(m) = self.metrics() {
            m.token_expiry.with_label_values(&[&self.name]).set(unix);
        }
    }

    fn install(&self, issued: IssuedToken, requested_at: Instant) {
        // Count the lifetime from when we asked, so transit time never extends it.
        let expires_at = requested_at + issued.lifetime;
        let wall = SystemTime::now() + issued.lifetime.saturating_sub(requested_at.elapsed());
        let mut header =
            match HeaderValue::from_str(&format!("Bearer {}", issued.access_token.expose())) {
                Ok(h) => h,
                Err(_) => return, // parse_answer already refused such tokens
            };
        header.set_sensitive(true);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let token = Token {
            header,
            fingerprint: fingerprint(issued.access_token.expose()).into(),
            expires_at,
            expires_at_wall: wall,
            lifetime: issued.lifetime,
            generation,
        };
        self.publish_expiry(&token);

        if let Some(m) = self.metrics() {
            m.token_refreshes
                .with_label_values(&[&self.name, "ok"])
                .inc();
        }
        tracing::info!(credential = %self.name, expires_in_seconds = issued.lifetime.as_secs(), fingerprint = %token.fingerprint, "new IMS token");
        self.current.store(Some(Arc::new(token)));
        let mut st = self.lock_status();
        st.last_ok = Some(SystemTime::now());
        st.last_attempt_failed = false;
        st.refreshes_ok += 1;
    }
}

#[cfg(test)]
mod tests;
