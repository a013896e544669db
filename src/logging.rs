//! Logging setup: stderr, text or JSON, level from `RUST_LOG` (default `info`),
//! written in batches by a background thread so the hot path never waits on stderr.
//!
//! The per-request access line is formatted here by hand rather than by
//! `tracing`'s generic field visitor: it is one line per request, and the
//! generic path cost a sixth of a proxied request's instructions. It still obeys
//! `RUST_LOG` (target `ims_proxy::access`) and looks like the other lines.

use serde::Serialize;
use std::io::{self, IsTerminal};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (Loki, ELK).
    Json,
}

/// The installed writer and format, for the access line.
struct Sink {
    format: LogFormat,
    writer: BatchWriter,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// How long the writer thread lets lines gather before one write(2) carries them all.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// Lines held for a stalled stderr before new ones are dropped (and counted).
const MAX_PENDING: usize = 8 << 20;

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// Lines dropped since the last write because `buf` was full.
    dropped: u64,
    /// The writer thread sleeps on the condvar and needs a wake-up.
    idle: bool,
    closing: bool,
}

struct Batch {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// [`MAX_PENDING`] (smaller in tests).
    cap: usize,
}

impl Batch {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Appends whole log lines to a shared buffer that a background thread writes out
/// every [`BATCH_WINDOW`].
///
/// Not `tracing_appender::non_blocking`: its channel wakes the writer thread for
/// every line (a futex wake, spin-yields and a write(2) each). Under load that was
/// a quarter of a proxied request's CPU time; here a request's line costs a short
/// uncontended lock and a copy, and the writer wakes about 50 times a second.
#[derive(Clone)]
pub struct BatchWriter(Arc<Batch>);

impl BatchWriter {
    fn push(&self, line: &[u8]) {
        let mut p = self.0.lock();
        if p.buf.len() + line.len() > self.0.cap {
            p.dropped += 1;
            return;
        }
        p.buf.extend_from_slice(line);
        if p.idle {
            p.idle = false;
            drop(p);
            self.0.wake.notify_one();
        }
    }
}

impl io::Write for BatchWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // tracing-subscriber formats an event whole and writes it with one call.
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> BatchWriter {
        self.clone()
    }
}

/// Keeps the log writer thread; dropping it writes out every pending line.
pub struct LogGuard {
    batch: Arc<Batch>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.batch.lock().closing = true;
        self.batch.wake.notify_one();
        match self.thread.take() {
            Some(t) => {
                let _ = t.join();
            }
            None => write_batches(&self.batch, &mut io::stderr()),
        }
    }
}

/// The writer thread: waits for a first line, lets more gather, writes them in one go.
fn write_batches(batch: &Batch, out: &mut dyn io::Write) {
    let mut spare = Vec::new();
    loop {
        let mut p = batch.lock();
        while p.buf.is_empty() && !p.closing {
            p.idle = true;
            p = batch.wake.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
        p.idle = false;
        if p.buf.is_empty() {
            return; // closing, all written
        }
        if !p.closing {
            drop(p);
            std::thread::sleep(BATCH_WINDOW);
            p = batch.lock();
        }
        std::mem::swap(&mut p.buf, &mut spare);
        let dropped = std::mem::take(&mut p.dropped);
        drop(p);
        let _ = out.write_all(&spare);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "ims-proxy: {dropped} log lines dropped: stderr did not keep up"
            );
        }
        let _ = out.flush();
        spare.clear();
        // A burst's buffer is not kept for good.
        spare.shrink_to(1 << 20);
    }
}

/// Starts the writer thread over `out`.
fn batch_writer(mut out: impl io::Write + Send + 'static, cap: usize) -> (BatchWriter, LogGuard) {
    let batch = Arc::new(Batch {
        pending: Mutex::default(),
        wake: Condvar::new(),
        cap,
    });
    let b = batch.clone();
    let thread = std::thread::Builder::new()
        .name("ims-proxy-log".into())
        .spawn(move || write_batches(&b, &mut out))
        .ok();
    if thread.is_none() {
        // No thread: the guard writes the lines at exit, and the cap bounds them until then.
        eprintln!("ims-proxy: cannot start the log writer thread");
    }
    (BatchWriter(batch.clone()), LogGuard { batch, thread })
}

/// Installs the global subscriber; keep the guard alive until exit so buffered lines are flushed.
pub fn init(format: LogFormat) -> LogGuard {
    let (writer, guard) = batch_writer(io::stderr(), MAX_PENDING);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a terminal: into a file or a pipe they are noise, and
        // they were 16 % of a proxied request's instructions.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer.clone());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_ok() {
        let _ = SINK.set(Sink { format, writer });
    }
    guard
}

/// One request, as the access line shows it.
#[derive(Serialize)]
pub struct AccessLine<'a> {
    /// Request id (the client's or a fresh one).
    pub request_id: &'a str,
    /// Key name, `anonymous`, or `none` when refused before admission.
    pub client: &'a str,
    /// Route name, or `none`.
    pub route: &'a str,
    /// Request method.
    pub method: &'a str,
    /// Path and query, credentials redacted.
    pub path: &'a str,
    /// Status sent to the client.
    pub status: u16,
    /// Request head in to response head out, µs.
    pub duration_us: u64,
    /// Request sent upstream to its response head, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_us: Option<u64>,
    /// Fingerprint of the token sent (never the token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<&'a str>,
    /// The upstream's own request id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_request_id: Option<&'a str>,
}

/// The JSON form: the same keys `tracing`'s JSON lines have around the fields.
#[derive(Serialize)]
struct JsonLine<'a> {
    timestamp: &'a str,
    level: &'static str,
    message: &'static str,
    #[serde(flatten)]
    fields: &'a AccessLine<'a>,
    target: &'static str,
}

const TARGET: &str = "ims_proxy::access";

/// Logs the access line at INFO under target `ims_proxy::access`.
pub fn access(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: "ims_proxy::access", tracing::Level::INFO) {
        return;
    }
    let Some(sink) = SINK.get() else {
        // No installed sink (a library user, tests): go through tracing as usual.
        tracing::info!(
            target: "ims_proxy::access",
            request_id = line.request_id,
            client = line.client,
            route = line.route,
            method = line.method,
            path = line.path,
            status = line.status,
            duration_us = line.duration_us,
            upstream_us = line.upstream_us,
            token = line.token,
            upstream_request_id = line.upstream_request_id,
            "request"
        );
        return;
    };
    let now = std::time::SystemTime::now();
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => write_access(sink, &mut scratch, now, line),
        // Never expected (the line is built without re-entering): a fresh buffer
        // rather than a lost line.
        Err(_) => write_access(sink, &mut Scratch::default(), now, line),
    });
}

/// Builds the line in `scratch` and hands it to the writer.
fn write_access(
    sink: &Sink,
    scratch: &mut Scratch,
    now: std::time::SystemTime,
    line: &AccessLine<'_>,
) {
    let Scratch { line: out, second } = scratch;
    out.clear();
    match sink.format {
        LogFormat::Json => {
            let timestamp = humantime::format_rfc3339_micros(now).to_string();
            let json = JsonLine {
                timestamp: &timestamp,
                level: "INFO",
                message: "request",
                fields: line,
                target: TARGET,
            };
            if serde_json::to_writer(&mut *out, &json).is_err() {
                return;
            }
        }
        LogFormat::Text => text_line(out, second, now, line),
    }
    out.push(b'\n');
    sink.writer.push(out);
}

/// Per-thread buffers of the access line: no allocation per request once warm.
#[derive(Default)]
struct Scratch {
    /// The line being built.
    line: Vec<u8>,
    /// The last whole second formatted (`YYYY-MM-DDTHH:MM:SS`), and which it was.
    second: (u64, String),
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Appends the text form, the layout of tracing's own text lines:
/// `<time>  INFO <target>: request k=v ...`. Pieces are pushed, not formatted:
/// `fmt::write` over a dozen arguments was most of the line's cost.
fn text_line(
    out: &mut Vec<u8>,
    second: &mut (u64, String),
    now: std::time::SystemTime,
    line: &AccessLine<'_>,
) {
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    if second.0 != since.as_secs() || second.1.is_empty() {
        let whole = std::time::UNIX_EPOCH + Duration::from_secs(since.as_secs());
        let mut text = humantime::format_rfc3339_seconds(whole).to_string();
        text.pop(); // the `Z`, written after the fraction
        *second = (since.as_secs(), text);
    }
    let mut put = |s: &str| out.extend_from_slice(s.as_bytes());
    let mut digits = itoa::Buffer::new();
    put(&second.1);
    put(".");
    let micros = digits.format(since.subsec_micros());
    put(&"000000"[micros.len()..]);
    put(micros);
    put("Z  INFO ");
    put(TARGET);
    for (key, value) in [
        (": request request_id=", line.request_id),
        (" client=", line.client),
        (" route=", line.route),
        (" method=", line.method),
        (" path=", line.path),
    ] {
        put(key);
        put(value);
    }
    put(" status=");
    put(digits.format(line.status));
    put(" duration_us=");
    put(digits.format(line.duration_us));
    if let Some(u) = line.upstream_us {
        put(" upstream_us=");
        put(digits.format(u));
    }
    if let Some(t) = line.token {
        put(" token=");
        put(t);
    }
    if let Some(id) = line.upstream_request_id {
        put(" upstream_request_id=");
        put(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back, counting write(2)-like calls.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<(Vec<u8>, usize)>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut c = self.0.lock().unwrap();
            c.0.extend_from_slice(buf);
            c.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sample(upstream: bool) -> AccessLine<'static> {
        AccessLine {
            request_id: "req-1",
            client: "etl",
            route: "workfront",
            method: "GET",
            path: "/workfront/attask/api/v19.0/proj/search?apiKey=REDACTED",
            status: 200,
            duration_us: 1234,
            upstream_us: upstream.then_some(987),
            token: upstream.then_some("9f013b19"),
            upstream_request_id: upstream.then_some("up-42"),
        }
    }

    #[test]
    fn text_access_line_has_tracings_layout_and_humantimes_timestamp() {
        let mut second = (0, String::new());
        let mut out = Vec::new();
        // 5 µs into a second: the fraction keeps its leading zeros.
        let at = std::time::UNIX_EPOCH + Duration::new(1_795_000_000, 5_000);
        text_line(&mut out, &mut second, at, &sample(true));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "{}  INFO ims_proxy::access: request request_id=req-1 client=etl route=workfront \
                 method=GET path=/workfront/attask/api/v19.0/proj/search?apiKey=REDACTED \
                 status=200 duration_us=1234 upstream_us=987 token=9f013b19 upstream_request_id=up-42",
                humantime::format_rfc3339_micros(at)
            )
        );
        // Refused before the upstream: the optional fields are left out.
        let mut out = Vec::new();
        text_line(&mut out, &mut second, at, &sample(false));
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with(" status=200 duration_us=1234"));
    }

    #[test]
    fn the_cached_second_is_renewed_when_the_clock_moves_on() {
        let mut second = (0, String::new());
        let start = std::time::UNIX_EPOCH + Duration::new(1_795_000_000, 999_999_000);
        for at in [
            start,
            start + Duration::from_micros(1),
            start + Duration::from_secs(3600),
            start - Duration::from_secs(86_400),
        ] {
            let mut out = Vec::new();
            text_line(&mut out, &mut second, at, &sample(false));
            let text = String::from_utf8(out).unwrap();
            let stamp = humantime::format_rfc3339_micros(at).to_string();
            assert!(
                text.starts_with(&format!("{stamp}  INFO ")),
                "{text} / {stamp}"
            );
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_batched_and_flushed_at_drop() {
        let cap = Capture::default();
        let (w, guard) = batch_writer(cap.clone(), MAX_PENDING);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        w.push(format!("t{t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let (text, writes) = cap.0.lock().unwrap().clone();
        let text = String::from_utf8(text).unwrap();
        assert_eq!(text.lines().count(), 2000);
        for t in 0..4 {
            let prefix = format!("t{t} line ");
            let seq: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(seq, (0..500).collect::<Vec<_>>(), "thread {t}'s lines");
        }
        assert!(writes < 200, "{writes} writes for 2000 lines: not batched");
    }

    #[test]
    fn a_quiet_line_appears_without_waiting_for_more() {
        let cap = Capture::default();
        let (w, _guard) = batch_writer(cap.clone(), MAX_PENDING);
        w.push(b"alone\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cap.0.lock().unwrap().0.is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(cap.0.lock().unwrap().0, b"alone\n");
    }

    #[test]
    fn lines_past_the_cap_are_dropped_and_counted() {
        // No writer thread: the buffer only fills, as behind a stalled stderr.
        let batch = Arc::new(Batch {
            pending: Mutex::default(),
            wake: Condvar::new(),
            cap: 64,
        });
        let w = BatchWriter(batch.clone());
        for _ in 0..10 {
            w.push(b"xxxxxxxxxxxxxxxxxxx\n");
        }
        batch.lock().closing = true;
        let cap = Capture::default();
        write_batches(&batch, &mut cap.clone());
        let text = String::from_utf8(cap.0.lock().unwrap().0.clone()).unwrap();
        let mut lines = text.lines();
        for _ in 0..3 {
            assert_eq!(lines.next(), Some("xxxxxxxxxxxxxxxxxxx"));
        }
        assert_eq!(
            lines.next(),
            Some("ims-proxy: 7 log lines dropped: stderr did not keep up")
        );
        assert_eq!(lines.next(), None);
    }
}
