//! Logging setup: stderr, text or JSON, level from `RUST_LOG` (default `info`),
//! written on a background thread so the hot path never waits on stderr.
//!
//! The per-request access line is formatted here by hand rather than by
//! `tracing`'s generic field visitor: it is one line per request, and the
//! generic path cost a sixth of a proxied request's instructions. It still obeys
//! `RUST_LOG` (target `ims_proxy::access`) and looks like the other lines.

use serde::Serialize;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::OnceLock;
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
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
    writer: NonBlocking,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Installs the global subscriber; keep the guard alive until exit so buffered lines are flushed.
pub fn init(format: LogFormat) -> WorkerGuard {
    // The writer thread flushes whenever its queue runs dry: under load, one write(2)
    // carries many lines instead of one each; when quiet, lines still appear at once.
    let stderr = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking(stderr);
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
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    let mut out = String::with_capacity(256);
    match sink.format {
        LogFormat::Json => {
            let timestamp = now.to_string();
            let json = JsonLine {
                timestamp: &timestamp,
                level: "INFO",
                message: "request",
                fields: line,
                target: TARGET,
            };
            match serde_json::to_string(&json) {
                Ok(s) => out = s,
                Err(_) => return,
            }
        }
        LogFormat::Text => {
            // The layout of tracing's own text lines: `<time>  INFO <target>: <message> k=v ...`.
            let _ = write!(
                out,
                "{now}  INFO {TARGET}: request request_id={} client={} route={} method={} path={} status={} duration_us={}",
                line.request_id, line.client, line.route, line.method, line.path, line.status, line.duration_us
            );
            if let Some(u) = line.upstream_us {
                let _ = write!(out, " upstream_us={u}");
            }
            if let Some(t) = line.token {
                let _ = write!(out, " token={t}");
            }
            if let Some(id) = line.upstream_request_id {
                let _ = write!(out, " upstream_request_id={id}");
            }
        }
    }
    out.push('\n');
    // NonBlocking queues the whole line as one message for the writer thread.
    let _ = sink.writer.clone().write_all(out.as_bytes());
}
