//! A map from a key id (or client IP) to its counters, split into shards each behind its own
//! short `std` mutex, so that requests of different keys do not queue behind one lock. A lock
//! is held only to read and bump a few integers, never across an `await`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

/// Shards: a power of two well above the number of cores.
const SHARDS: usize = 64;
/// Past this many entries in a shard, entries idle for a day are dropped.
const SHARD_SOFT_CAP: usize = 4_096;
const DAY_MS: i64 = 86_400_000;

pub(super) trait Touched {
    /// When the entry last counted a request (Unix ms).
    fn touched_ms(&self) -> i64;
}

pub(super) struct Table<E> {
    shards: Box<[Mutex<HashMap<String, E>>]>,
    hasher: RandomState,
}

impl<E: Default + Touched> Default for Table<E> {
    fn default() -> Self {
        Table { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(), hasher: RandomState::new() }
    }
}

impl<E: Default + Touched> Table<E> {
    /// Runs `f` on the entry of `id` (created if missing) under its shard's lock.
    pub(super) fn with<R>(&self, id: &str, now_ms: i64, f: impl FnOnce(&mut E) -> R) -> R {
        let shard = (self.hasher.hash_one(id) as usize) % SHARDS;
        let mut map = self.shards[shard].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !map.contains_key(id) {
            if map.len() >= SHARD_SOFT_CAP {
                map.retain(|_, e| now_ms - e.touched_ms() < DAY_MS);
            }
            map.insert(id.to_owned(), E::default());
        }
        match map.get_mut(id) {
            Some(entry) => f(entry),
            None => f(&mut E::default()),
        }
    }
}
