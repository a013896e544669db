//! Thread per core: the proxy listener is served by `server.workers` OS
//! threads, each running its own single-threaded tokio runtime with its own
//! accept loop on the shared listening socket and its own upstream pool.
//!
//! A connection, the requests on it and the upstream connections they use
//! then live on one thread: no work stealing, no wake-ups across cores on
//! every hop between a client connection and its upstream connection. On the
//! load rig that is the difference between a bare hyper proxy at 0.7× nginx
//! (one multi-thread runtime) and at parity (PERFORMANCE.md, fourth pass).
//! Token managers, reloads, signals and the admin server stay on the main
//! runtime; they share the snapshot with the workers through the `ArcSwap`.

use std::cell::Cell;
use std::io;
use std::thread;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// Which worker this thread is (0 on threads that are not workers).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The calling thread's worker index: selects its own upstream pool.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// The worker count `server.workers` defaults to: the CPUs this process may use.
pub fn default_count() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Running worker threads. Dropping this stops them, and with them every task
/// (connection) still on their runtimes.
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `count` (at least one) worker threads, each with a current-thread runtime.
    pub fn start(count: usize) -> io::Result<Workers> {
        let mut workers = Workers {
            handles: Vec::new(),
            stops: Vec::new(),
        };
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            workers.stops.push(stop);
            thread::Builder::new()
                .name(format!("ims-proxy-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    // Runs the worker's tasks until the stop; the runtime is dropped
                    // here, on its own thread, which cancels whatever is left.
                    let _ = runtime.block_on(stopped);
                })?;
        }
        Ok(workers)
    }

    /// Handles to spawn onto each worker's runtime, in index order.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never true: there is always at least one worker.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_worker_runs_its_tasks_on_its_own_thread_and_knows_its_index() {
        let workers = Workers::start(3).unwrap();
        assert_eq!(workers.len(), 3);
        let mut seen = Vec::new();
        for (i, handle) in workers.handles().iter().enumerate() {
            let (index, name) = handle
                .spawn(async { (current(), thread::current().name().map(str::to_owned)) })
                .await
                .unwrap();
            assert_eq!(index, i);
            seen.push(name.unwrap());
        }
        seen.dedup();
        assert_eq!(seen.len(), 3, "three distinct threads: {seen:?}");
        assert_eq!(current(), 0, "a thread that is not a worker reads 0");
    }

    #[tokio::test]
    async fn dropping_the_workers_cancels_their_tasks() {
        let workers = Workers::start(1).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = workers.handles()[0].spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await
        });
        drop(workers);
        // The sender is dropped with the cancelled task.
        assert!(rx.await.is_err());
        assert!(task.await.unwrap_err().is_cancelled());
    }
}
