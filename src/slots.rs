//! A credential's `max_in_flight` slots, with a waiting line that is fair
//! across client keys: each key has its own first-come queue and a freed slot
//! goes to the keys in turn, so one key's burst cannot starve another key's
//! single request.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// The cap and its waiting line; shared by every request on the credential.
pub struct Slots {
    capacity: usize,
    state: Mutex<Line>,
}

#[derive(Default)]
struct Line {
    free: usize,
    /// Per key, its waiters in arrival order.
    queues: HashMap<Arc<str>, VecDeque<oneshot::Sender<Slot>>>,
    /// Keys that have waiters, in the order they get their next turn.
    turns: VecDeque<Arc<str>>,
}

/// One slot, handed on to the next waiter (or freed) when dropped.
pub struct Slot {
    owner: Option<Arc<Slots>>,
}

/// No slot came free within the queue timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

impl Slots {
    /// `capacity` requests may be in flight at once.
    pub fn new(capacity: usize) -> Arc<Slots> {
        Arc::new(Slots {
            capacity,
            state: Mutex::new(Line {
                free: capacity,
                ..Line::default()
            }),
        })
    }

    /// The cap.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn line(&self) -> MutexGuard<'_, Line> {
        // Every critical section leaves the line consistent, even if a panic ends it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot at once if one is free and nobody waits.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut line = self.line();
        if line.free > 0 {
            line.free -= 1;
            return Some(self.slot());
        }
        None
    }

    /// A slot for a request of `key`: at once if free, else in the key's turn,
    /// waiting at most `timeout`. Cancelling the wait gives up the place.
    pub async fn acquire(self: &Arc<Self>, key: &str, timeout: Duration) -> Result<Slot, TimedOut> {
        let rx = {
            let mut line = self.line();
            if line.free > 0 {
                line.free -= 1;
                return Ok(self.slot());
            }
            let (tx, rx) = oneshot::channel();
            match line.queues.get_mut(key) {
                Some(queue) => queue.push_back(tx),
                None => {
                    let key: Arc<str> = Arc::from(key);
                    line.queues.insert(Arc::clone(&key), VecDeque::from([tx]));
                    line.turns.push_back(key);
                }
            }
            rx
        };
        // A slot sent just as the timeout fires is dropped with `rx`, which hands it on.
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(TimedOut),
        }
    }

    fn slot(self: &Arc<Self>) -> Slot {
        Slot {
            owner: Some(Arc::clone(self)),
        }
    }

    /// Gives a released slot to the next live waiter in key order, or frees it.
    fn hand_on(self: &Arc<Self>) {
        let mut line = self.line();
        while let Some(key) = line.turns.pop_front() {
            let Some(queue) = line.queues.get_mut(&key) else {
                continue;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                line.queues.remove(&key);
            } else {
                line.turns.push_back(key);
            }
            let Some(tx) = next else { continue };
            match tx.send(self.slot()) {
                Ok(()) => return,
                // That waiter gave up: the slot goes back without being released again.
                Err(mut slot) => slot.owner = None,
            }
        }
        line.free += 1;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            owner.hand_on();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_more_than_capacity_and_freed_slots_return() {
        let slots = Slots::new(2);
        let a = slots.try_acquire().expect("first");
        let b = slots.try_acquire().expect("second");
        assert!(slots.try_acquire().is_none());
        drop(a);
        let c = slots.try_acquire().expect("freed slot");
        drop((b, c));
        assert_eq!(slots.line().free, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_round_robin_by_key() {
        let slots = Slots::new(1);
        let held = slots.try_acquire().expect("slot");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Key a queues three requests before key b's one arrives.
        for (i, k) in ["a", "a", "a", "b"].into_iter().enumerate() {
            let (slots, order) = (Arc::clone(&slots), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let s = slots
                    .acquire(k, Duration::from_secs(60))
                    .await
                    .expect("slot");
                order.lock().unwrap().push(format!("{k}{i}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(s);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a0", "b3", "a1", "a2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gave_up_loses_no_slot() {
        let slots = Slots::new(1);
        let held = slots.try_acquire().expect("slot");
        let gave_up = slots.acquire("a", Duration::from_millis(5)).await;
        assert_eq!(gave_up.err(), Some(TimedOut));
        // Its stale place is skipped; the slot ends up free, not lost.
        drop(held);
        assert_eq!(slots.line().free, 1);
        assert!(slots.line().queues.is_empty() && slots.line().turns.is_empty());
        let waiter = {
            let slots = Arc::clone(&slots);
            let _only = slots.try_acquire().expect("slot");
            let w = tokio::spawn({
                let slots = Arc::clone(&slots);
                async move { slots.acquire("b", Duration::from_secs(1)).await }
            });
            tokio::task::yield_now().await;
            w
        };
        assert!(waiter.await.unwrap().is_ok(), "the freed slot went to b");
        assert_eq!(slots.line().free, 1);
    }
}
