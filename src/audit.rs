//! The optional audit log: one JSON line per request, appended to a file by a
//! background thread and synced in batches, so the hot path only enqueues.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// Lines waiting for the writer; beyond this, lines are dropped and counted, never blocking requests.
const QUEUE: usize = 16_384;

/// Handle to the audit writer.
pub struct AuditLog {
    tx: SyncSender<String>,
    dropped: Arc<AtomicU64>,
}

impl AuditLog {
    /// Opens (appends to, creating) `path` and starts the writer thread.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let name = path.display().to_string();
        std::thread::Builder::new()
            .name("ims-proxy-audit".into())
            .spawn(move || write_loop(rx, BufWriter::new(file), &name))?;
        Ok(AuditLog { tx, dropped })
    }

    /// Queues one JSON line.
    pub fn record(&self, line: &serde_json::Value) {
        match self.tx.try_send(line.to_string()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "audit log cannot keep up; lines dropped");
                }
            }
        }
    }
}

fn write_loop(rx: Receiver<String>, mut out: BufWriter<std::fs::File>, name: &str) {
    // Each batch is what arrived while the previous one was written; one sync per batch.
    while let Ok(first) = rx.recv() {
        let mut ok = writeln!(out, "{first}").is_ok();
        while let Ok(line) = rx.try_recv() {
            ok &= writeln!(out, "{line}").is_ok();
        }
        ok &= out.flush().is_ok() && out.get_ref().sync_data().is_ok();
        if !ok {
            tracing::error!(file = name, "cannot write the audit log");
        }
    }
}
