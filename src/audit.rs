//! The optional audit log: one JSON line per request, appended to a file by a
//! background thread and synced in batches, so the hot path only enqueues.
//! Reloads (SIGHUP, `POST /reload`) reopen the file, for logrotate.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// Lines waiting for the writer; beyond this, lines are dropped and counted, never blocking requests.
const QUEUE: usize = 16_384;

enum Msg {
    Line(String),
    /// Wakes the writer to look at the reopen flag.
    Reopen,
}

/// Handle to the audit writer.
pub struct AuditLog {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl AuditLog {
    /// Opens (appends to, creating) `path` and starts the writer thread.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let file = open_append(path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            out: BufWriter::new(file),
            path: path.to_path_buf(),
            reopen: Arc::clone(&reopen),
        };
        std::thread::Builder::new()
            .name("ims-proxy-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(AuditLog {
            tx,
            dropped,
            reopen,
        })
    }

    /// Queues one JSON line.
    pub fn record(&self, line: &serde_json::Value) {
        match self.tx.try_send(Msg::Line(line.to_string())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "audit log cannot keep up; lines dropped");
                }
            }
        }
    }

    /// Asks the writer to close the file and open the path again (after
    /// logrotate moved it); lines already queued go to the old file.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
        // A full queue means the writer is busy and sees the flag after its batch.
        let _ = self.tx.try_send(Msg::Reopen);
    }
}

struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        // Each batch is what arrived while the previous one was written; one sync per batch.
        while let Ok(first) = rx.recv() {
            let mut ok = self.write(first);
            while let Ok(msg) = rx.try_recv() {
                ok &= self.write(msg);
            }
            ok &= self.out.flush().is_ok() && self.out.get_ref().sync_data().is_ok();
            if !ok {
                tracing::error!(file = %self.path.display(), "cannot write the audit log");
            }
            if self.reopen.swap(false, Ordering::SeqCst) {
                self.reopen_file();
            }
        }
    }

    fn write(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Line(line) => writeln!(self.out, "{line}").is_ok(),
            Msg::Reopen => true,
        }
    }

    fn reopen_file(&mut self) {
        match open_append(&self.path) {
            Ok(file) => {
                // The batch was flushed and synced just before: nothing is lost with the old handle.
                self.out = BufWriter::new(file);
                tracing::info!(file = %self.path.display(), "audit log reopened");
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "cannot reopen the audit log; still writing to the old file");
            }
        }
    }
}
