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
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

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
            let (stop, stopped) = oneshot::channel::<()>();
            let (started, handle) = std::sync::mpsc::channel();
            // The runtime is built on its own thread and never leaves it: dropping a
            // runtime inside the caller's async context (a failed spawn) would panic.
            thread::Builder::new()
                .name(format!("ims-proxy-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    let _ = started.send(Ok(runtime.handle().clone()));
                    // Runs the worker's tasks until the stop; the runtime is dropped
                    // here, on its own thread, which cancels whatever is left.
                    let _ = runtime.block_on(stopped);
                })?;
            // A brief wait, once per worker at start-up, for its runtime to exist.
            let handle = handle
                .recv()
                .map_err(|_| io::Error::other("worker thread ended while starting"))??;
            workers.handles.push(handle);
            workers.stops.push(stop);
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

/// A connection passed from the worker that accepted it to the one that serves
/// it, with its place in that worker's count.
pub struct Handoff {
    /// The socket, taken off the accepting worker's reactor.
    pub stream: std::net::TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// Counts the connection against the serving worker until dropped.
    pub open: OpenGuard,
}

/// Spreads connections evenly over the workers. Whichever worker wins the
/// accept race keeps the connection only if no worker has fewer open; else it
/// hands the socket to the one with the fewest. Without this a burst of new
/// connections (a client pool opening 32 at once) could land 2:1 on one core,
/// which then limits the whole proxy while the other idles: there is no work
/// stealing between workers, by design. Costs per connection, never per request.
pub struct Balance {
    open: Box<[AtomicUsize]>,
    inboxes: Box<[mpsc::UnboundedSender<Handoff>]>,
}

impl Balance {
    /// A balance over `count` workers, and each worker's inbox of handed connections.
    pub fn new(count: usize) -> (Arc<Balance>, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..count.max(1)).map(|_| mpsc::unbounded_channel()).unzip();
        let balance = Balance {
            open: (0..count.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            inboxes: inboxes.into(),
        };
        (Arc::new(balance), receivers)
    }

    /// Which worker should serve a connection `me` accepted (`me` unless another
    /// has fewer open), counted against it from now on.
    pub fn place(self: &Arc<Self>, me: usize) -> (usize, OpenGuard) {
        let mine = self.open[me].load(Ordering::Relaxed);
        let to = self
            .open
            .iter()
            .enumerate()
            .map(|(i, n)| (n.load(Ordering::Relaxed), i))
            .min()
            .filter(|(least, _)| *least < mine)
            .map_or(me, |(_, i)| i);
        self.open[to].fetch_add(1, Ordering::Relaxed);
        let guard = OpenGuard {
            balance: self.clone(),
            worker: to,
        };
        (to, guard)
    }

    /// Passes a connection to worker `to`; false if that worker no longer takes any
    /// (it is draining), and the connection is dropped.
    pub fn hand_to(&self, to: usize, handoff: Handoff) -> bool {
        self.inboxes[to].send(handoff).is_ok()
    }

    /// Open connections per worker.
    pub fn open(&self) -> Vec<usize> {
        self.open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

/// One open connection in its worker's count, until dropped.
pub struct OpenGuard {
    balance: Arc<Balance>,
    worker: usize,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.balance.open[self.worker].fetch_sub(1, Ordering::Relaxed);
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

    #[test]
    fn connections_go_to_the_worker_with_fewest_open_and_leave_its_count_when_dropped() {
        let (balance, _inboxes) = Balance::new(3);
        // Worker 0 wins every accept race: it keeps one, then the others fill up.
        let mut held = Vec::new();
        for _ in 0..6 {
            let (to, guard) = balance.place(0);
            held.push((to, guard));
        }
        assert_eq!(balance.open(), vec![2, 2, 2]);
        // A tie stays where it was accepted.
        let (to, guard) = balance.place(1);
        assert_eq!(to, 1);
        drop(guard);
        // Closing worker 2's connections makes it the next target.
        held.retain(|(to, _)| *to != 2);
        assert_eq!(balance.open(), vec![2, 2, 0]);
        assert_eq!(balance.place(0).0, 2);
        held.clear();
        assert_eq!(balance.open(), vec![0, 0, 0]);
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
