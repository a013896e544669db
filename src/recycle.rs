//! Per-thread recycling of the memory heads are built in: header maps and the
//! room a head is written from.
//!
//! Kept per thread rather than per connection: with a few hundred connections,
//! what each one kept from its last request was cold by its next, and touching
//! it cost a cache miss per line (measured with `benches/load/profile.sh
//! CACHE=1`, PERFORMANCE.md tenth pass). What was given back last on a thread is
//! still in cache when the next head on that thread takes it.

use http::HeaderMap;
use std::cell::{Cell, RefCell};

/// The largest room [`give_room`] keeps: a head's, not a body's.
const MAX_ROOM: usize = 16 * 1024;
/// Emptied header maps kept per thread for the next heads, at most this many.
const POOLED_MAPS: usize = 32;
/// A map with room for more fields than this (an unusual head) is not kept.
const POOLED_MAP_ROOM: usize = 128;

thread_local! {
    /// Room for the head being written (a request's upstream, a response's to the
    /// client): the socket takes a head at once, so the next one reuses it.
    static HEAD_ROOM: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    /// Emptied header maps, the most recently emptied last.
    static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// Room for a head to be written: the one this thread gave back last, if any.
pub fn take_room() -> Vec<u8> {
    HEAD_ROOM.try_with(Cell::take).unwrap_or_default()
}

/// Keeps `room` (emptied) for [`take_room`], unless a body made it large.
pub fn give_room(mut room: Vec<u8>) {
    if room.capacity() <= MAX_ROOM {
        room.clear();
        let _ = HEAD_ROOM.try_with(|r| r.set(room));
    }
}

/// An empty header map with room for `fields`: the one this thread emptied last, if any.
pub fn take_map(fields: usize) -> HeaderMap {
    let pooled = MAPS.try_with(|m| m.borrow_mut().pop()).ok().flatten();
    let mut map = pooled.unwrap_or_default();
    map.reserve(fields);
    map
}

/// Empties `map` and keeps it for [`take_map`]; given back right after its last use,
/// it is still in cache.
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
}
