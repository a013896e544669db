//! Per-thread recycling of the memory a request is served in: header maps, the
//! room a head is written from or parsed with, and the home of the request's
//! future.
//!
//! Kept per thread rather than per connection: with a few hundred connections,
//! what each one kept from its last request was cold by its next, and touching
//! it cost a cache miss per line (measured with `benches/load/profile.sh
//! CACHE=1`, PERFORMANCE.md tenth pass). What was given back last on a thread is
//! still in cache when the next head on that thread takes it.

use http::HeaderMap;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread::LocalKey;

/// The largest room [`give_room`] keeps: a head's, not a body's.
const MAX_ROOM: usize = 16 * 1024;
/// Emptied header maps kept per thread for the next heads, at most this many.
const POOLED_MAPS: usize = 32;
/// A map with room for more fields than this (an unusual head) is not kept.
const POOLED_MAP_ROOM: usize = 128;
/// Empty homes kept per thread for each type of future, at most this many.
const POOLED_SLOTS: usize = 64;

thread_local! {
    /// Room for the head being written (a request's upstream, a response's to the
    /// client): the socket takes a head at once, so the next one reuses it.
    static HEAD_ROOM: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    /// Where the fields of the head being parsed sit.
    static SPOTS: Cell<Spots> = const { Cell::new(Vec::new()) };
    /// Emptied header maps, the most recently emptied last.
    static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
    /// Empty homes of futures: one `Vec<Home<F>>` per type `F`, the most recently
    /// emptied last.
    static HOMES: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// A pinned home for one future at a time.
type Home<F> = Pin<Box<Option<F>>>;

/// Room for a head to be written: the one this thread gave back last, if any.
pub fn take_room() -> Vec<u8> {
    take_one(&HEAD_ROOM)
}

/// Keeps `room` (emptied) for [`take_room`], unless a body made it large.
pub fn give_room(room: Vec<u8>) {
    if room.capacity() <= MAX_ROOM {
        give_one(&HEAD_ROOM, room);
    }
}

/// Where each field of a head sits in its buffer: name start and end, value start
/// and end. Noted while the parser borrows the buffer, used once it is frozen.
pub type Spots = Vec<[usize; 4]>;

/// Room to note where a head's fields sit: the one this thread gave back last.
pub fn take_spots() -> Spots {
    take_one(&SPOTS)
}

/// Keeps `spots` (emptied) for [`take_spots`]; a head has at most 100 fields, so
/// it stays small.
pub fn give_spots(spots: Spots) {
    give_one(&SPOTS, spots);
}

/// The vector kept in `slot` (empty), or a new one.
fn take_one<T: 'static>(slot: &'static LocalKey<Cell<Vec<T>>>) -> Vec<T> {
    slot.try_with(Cell::take).unwrap_or_default()
}

/// Empties `vec` and keeps it in `slot`.
fn give_one<T: 'static>(slot: &'static LocalKey<Cell<Vec<T>>>, mut vec: Vec<T>) {
    vec.clear();
    let _ = slot.try_with(|s| s.set(vec));
}

/// An empty header map with room for `fields`: the one this thread emptied last, if any.
pub fn take_map(fields: usize) -> HeaderMap {
    let pooled = MAPS.try_with(|m| m.borrow_mut().pop()).ok().flatten();
    let mut map = pooled.unwrap_or_default();
    map.reserve(fields);
    map
}

/// Empties `map` and keeps it for [`take_map`]. Give it back right after its last
/// use: the next head on this thread then finds it still in cache.
pub fn give_map(mut map: HeaderMap) {
    if map.capacity() > POOLED_MAP_ROOM {
        return;
    }
    if !map.is_empty() {
        // Clearing resets every index slot, even in a map with nothing in it.
        map.clear();
    }
    let _ = MAPS.try_with(|m| {
        let mut m = m.borrow_mut();
        if m.len() < POOLED_MAPS {
            m.push(map);
        }
    });
}

/// A future in a home of its own that goes back to this thread's stack when the
/// future is done or dropped, so the next one is written into memory still in
/// cache. A request's future is a few KiB written and read once per request; kept
/// inside each connection's task it was cold every time with a few hundred
/// connections, and `malloc` does not hand back blocks of that size last-in
/// first-out.
pub struct Slot<F: 'static> {
    home: Option<Home<F>>,
}

impl<F: 'static> Slot<F> {
    /// Puts the future `make` returns in the home this thread emptied last (or a new
    /// one). A closure rather than the future itself: the future is then built right
    /// where it is moved from, one copy of its few KiB instead of three.
    pub fn new(make: impl FnOnce() -> F) -> Slot<F> {
        let reused = HOMES
            .try_with(|homes| homes_of::<F>(&mut homes.borrow_mut()).and_then(Vec::pop))
            .ok()
            .flatten();
        let mut home = reused.unwrap_or_else(|| Box::pin(None));
        home.set(Some(make()));
        Slot { home: Some(home) }
    }
}

impl<F: Future + 'static> Future for Slot<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.home.as_mut().and_then(|h| h.as_mut().as_pin_mut()) {
            Some(future) => future.poll(cx),
            // Never empty while the slot exists.
            None => Poll::Pending,
        }
    }
}

impl<F: 'static> Drop for Slot<F> {
    fn drop(&mut self) {
        let Some(mut home) = self.home.take() else {
            return;
        };
        // Dropped before the stack is borrowed: the future's own drop may recycle too.
        home.set(None);
        let _ = HOMES.try_with(|homes| {
            let mut homes = homes.borrow_mut();
            if homes_of::<F>(&mut homes).is_none() {
                homes.push(Box::new(Vec::<Home<F>>::new()));
            }
            if let Some(stack) = homes_of::<F>(&mut homes) {
                if stack.len() < POOLED_SLOTS {
                    stack.push(home);
                }
            }
        });
    }
}

/// This thread's stack of empty homes for futures of type `F`, if it has one.
fn homes_of<F: 'static>(homes: &mut [Box<dyn Any>]) -> Option<&mut Vec<Home<F>>> {
    homes
        .iter_mut()
        .find_map(|h| h.downcast_mut::<Vec<Home<F>>>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{AUTHORIZATION, HOST};
    use http::HeaderValue;

    #[test]
    fn a_map_given_back_comes_back_empty_with_its_room() {
        let mut map = take_map(16);
        map.insert(AUTHORIZATION, HeaderValue::from_static("Bearer secret"));
        map.append(HOST, HeaderValue::from_static("a"));
        let room = map.capacity();
        give_map(map);
        let again = take_map(4);
        assert!(again.is_empty(), "a recycled map kept fields: {again:?}");
        assert!(again.get(AUTHORIZATION).is_none());
        assert_eq!(again.capacity(), room, "not the map given back");
    }

    #[test]
    fn only_a_bounded_number_of_head_sized_maps_is_kept() {
        // A map grown past a head's size is dropped, not kept.
        let big = take_map(POOLED_MAP_ROOM * 4);
        assert!(big.capacity() > POOLED_MAP_ROOM);
        give_map(big);
        assert!(take_map(0).capacity() <= POOLED_MAP_ROOM);
        for _ in 0..POOLED_MAPS * 2 {
            give_map(HeaderMap::with_capacity(8));
        }
        let kept = MAPS.with(|m| m.borrow().len());
        assert_eq!(kept, POOLED_MAPS);
    }

    #[test]
    fn room_comes_back_empty_and_a_body_sized_room_is_not_kept() {
        let mut room = take_room();
        room.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let cap = room.capacity();
        give_room(room);
        let again = take_room();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
        give_room(vec![0; MAX_ROOM + 1]);
        assert_eq!(take_room().capacity(), 0, "a body's room was kept");
    }

    #[test]
    fn spots_come_back_empty_with_their_room() {
        let mut spots = take_spots();
        spots.extend([[0, 4, 6, 9], [11, 15, 17, 20]]);
        let cap = spots.capacity();
        give_spots(spots);
        let again = take_spots();
        assert!(again.is_empty(), "stale spots: {again:?}");
        assert_eq!(again.capacity(), cap);
    }

    #[test]
    fn a_slot_runs_its_future_and_its_home_serves_the_next_one() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Counted(Arc<AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let make = |n: u32| {
            let guard = Counted(dropped.clone());
            async move {
                tokio::task::yield_now().await;
                drop(guard);
                n * 2
            }
        };
        let first = Slot::new(|| make(1));
        let home = first.home.as_ref().map(|h| &**h as *const _ as usize);
        assert_eq!(runtime.block_on(first), 2);
        // Done and dropped: its home went back and the next future of the type moves in.
        let second = Slot::new(|| make(2));
        assert_eq!(
            second.home.as_ref().map(|h| &**h as *const _ as usize),
            home
        );
        assert_eq!(runtime.block_on(second), 4);
        // Dropped unfinished: the future is dropped (cancelled) with it.
        let third = Slot::new(|| make(3));
        drop(third);
        assert_eq!(dropped.load(Ordering::SeqCst), 3);
        let kept = HOMES.with(|h| homes_of::<Unit>(&mut h.borrow_mut()).map(|v| v.len()));
        assert_eq!(kept, None, "a stack for a type never used");
    }

    /// A future type no test puts in a slot.
    type Unit = std::future::Ready<()>;
}
