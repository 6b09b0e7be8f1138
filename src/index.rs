//! What the cache holds, how big it is and what was used least recently: the eviction
//! decisions, and nothing else. The index names what to delete; the store deletes it.
//!
//! A moka cache with the LRU policy (not moka's default TinyLFU, whose admission filter would
//! refuse a new large layer in favour of old small ones) weighs every blob and manifest by
//! its size. moka's weigher returns a `u32`, so weights are KiB, rounded up: a blob of 5 TiB
//! or less weighs what it occupies, without wrapping at 4 GiB.
//!
//! Pinned content (the images named in `pinned`) is never evicted: it is held outside moka,
//! and the room it takes is one *reservation* entry inside moka, weighing the pinned bytes and
//! kept most recently used, so moka evicts other content to make room for it and the bound
//! still holds for everything together.
//!
//! Recency survives restarts through the files themselves: every use sets the file's mtime,
//! and startup replays the files oldest first, which rebuilds the same LRU order. Tag records
//! are not counted: they are a few hundred bytes each, bounded by the tags pulled.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

use crate::metrics::Metrics;
use crate::reference::Digest;

/// A cache entry: blobs and manifests live in different directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Blob(Digest),
    Manifest(Digest),
}

/// What moka holds: evictable entries, and the room reserved for pinned ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    Entry(Key),
    Reservation,
}

/// Called with each entry evicted to stay under the bound; must delete it.
pub type Evict = Box<dyn Fn(Key) + Send + Sync>;

pub struct Index {
    entries: moka::sync::Cache<Slot, u64>,
    /// Exact bytes and blobs held by evictable entries (moka's weighted size is in rounded
    /// KiB), kept by the insert path and the eviction listener.
    counts: Arc<Counts>,
    /// A std Mutex: nothing awaits while it is held.
    pinned: Mutex<Pinned>,
    max_bytes: u64,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Counts {
    bytes: AtomicU64,
    blobs: AtomicU64,
}

#[derive(Default)]
struct Pinned {
    /// Every key the pinned images reference, cached or not yet.
    wanted: HashSet<Key>,
    /// The pinned keys that are cached, with their sizes.
    held: HashMap<Key, u64>,
}

impl Pinned {
    fn bytes(&self) -> u64 {
        self.held.values().sum()
    }

    fn blobs(&self) -> u64 {
        self.held.keys().filter(|k| matches!(k, Key::Blob(_))).count() as u64
    }
}

const KIB: u64 = 1024;

impl Index {
    pub fn new(max_bytes: u64, metrics: Arc<Metrics>, evict: Evict) -> Index {
        let counts = Arc::new(Counts::default());
        let listener_counts = counts.clone();
        let listener_metrics = metrics.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes / KIB)
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_slot: &Slot, size: &u64| u32::try_from(size.div_ceil(KIB).max(1)).unwrap_or(u32::MAX))
            .eviction_listener(move |slot: Arc<Slot>, size: u64, cause: RemovalCause| {
                let Slot::Entry(key) = *slot else { return };
                listener_counts.bytes.fetch_sub(size, Ordering::Relaxed);
                if let Key::Blob(_) = key {
                    listener_counts.blobs.fetch_sub(1, Ordering::Relaxed);
                }
                if cause == RemovalCause::Size {
                    listener_metrics.evictions.inc();
                    listener_metrics.evicted_bytes.inc_by(size);
                    evict(key);
                }
            })
            .build();
        Index { entries, counts, pinned: Mutex::default(), max_bytes, metrics }
    }

    /// Records an entry (or a use of it) as the most recent.
    pub fn insert(&self, key: Key, size: u64) {
        {
            let mut pinned = self.pinned.lock().expect("pins poisoned");
            if pinned.wanted.contains(&key) {
                pinned.held.insert(key, size);
                self.reserve(&pinned);
                return;
            }
        }
        self.insert_evictable(key, size);
    }

    fn insert_evictable(&self, key: Key, size: u64) {
        // Counted before the entry exists, so the eviction listener never subtracts first.
        let blobs = u64::from(matches!(key, Key::Blob(_)));
        self.counts.bytes.fetch_add(size, Ordering::Relaxed);
        self.counts.blobs.fetch_add(blobs, Ordering::Relaxed);
        if !self.entries.entry(Slot::Entry(key)).or_insert(size).is_fresh() {
            self.counts.bytes.fetch_sub(size, Ordering::Relaxed);
            self.counts.blobs.fetch_sub(blobs, Ordering::Relaxed);
        }
    }

    /// Records a use of an entry; false if the index does not know it.
    pub fn touch(&self, key: &Key) -> bool {
        self.pinned.lock().expect("pins poisoned").held.contains_key(key)
            || self.entries.get(&Slot::Entry(*key)).is_some()
    }

    /// Forgets an entry without deleting it (the caller removed or quarantined it).
    pub fn remove(&self, key: &Key) {
        let mut pinned = self.pinned.lock().expect("pins poisoned");
        if pinned.held.remove(key).is_some() {
            self.reserve(&pinned);
        }
        drop(pinned);
        self.entries.invalidate(&Slot::Entry(*key));
    }

    /// Sets what is pinned: every key the pinned images reference. Newly pinned entries
    /// leave the LRU; entries no longer pinned join it as most recently used.
    pub fn set_pinned(&self, wanted: HashSet<Key>) {
        let mut pinned = self.pinned.lock().expect("pins poisoned");
        let released: Vec<(Key, u64)> =
            pinned.held.iter().filter(|(k, _)| !wanted.contains(k)).map(|(k, s)| (*k, *s)).collect();
        for (key, _) in &released {
            pinned.held.remove(key);
        }
        for key in &wanted {
            let slot = Slot::Entry(*key);
            if let Some(size) = self.entries.get(&slot) {
                self.entries.invalidate(&slot);
                pinned.held.insert(*key, size);
            }
        }
        pinned.wanted = wanted;
        self.reserve(&pinned);
        drop(pinned);
        for (key, size) in released {
            self.insert_evictable(key, size);
        }
    }

    /// Sizes the reservation for the pinned bytes (at most the bound: pinned content beyond
    /// it is kept all the same, and everything else is evicted).
    fn reserve(&self, pinned: &Pinned) {
        match pinned.bytes().min(self.max_bytes) {
            0 => self.entries.invalidate(&Slot::Reservation),
            bytes => self.entries.insert(Slot::Reservation, bytes),
        }
    }

    /// Applies pending evictions now. Blocking (it may delete files).
    pub fn enforce(&self) {
        // The reservation stays the most recently used, so it is never the one to go.
        self.entries.get(&Slot::Reservation);
        self.entries.run_pending_tasks();
        self.publish();
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.pinned.lock().expect("pins poisoned").held.contains_key(key)
            || self.entries.contains_key(&Slot::Entry(*key))
    }

    /// Bytes held, pinned content included.
    pub fn bytes(&self) -> u64 {
        self.counts.bytes.load(Ordering::Relaxed) + self.pinned.lock().expect("pins poisoned").bytes()
    }

    fn blobs(&self) -> u64 {
        self.counts.blobs.load(Ordering::Relaxed) + self.pinned.lock().expect("pins poisoned").blobs()
    }

    fn publish(&self) {
        self.metrics.cache_size_bytes.set(i64::try_from(self.bytes()).unwrap_or(i64::MAX));
        self.metrics.cache_blobs.set(i64::try_from(self.blobs()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(max: u64) -> (Index, Arc<Mutex<Vec<Key>>>) {
        let evicted = Arc::new(Mutex::new(Vec::new()));
        let log = evicted.clone();
        let index = Index::new(max, Arc::new(Metrics::new()), Box::new(move |k| log.lock().unwrap().push(k)));
        (index, evicted)
    }

    fn key(n: u8) -> Key {
        Key::Blob(Digest::of(&[n]))
    }

    #[test]
    fn least_recently_used_goes_first() {
        let (index, evicted) = index(300 * KIB);
        for n in 1..=3 {
            index.insert(key(n), 100 * KIB);
            index.enforce();
        }
        assert!(index.touch(&key(1)));
        index.enforce();
        index.insert(key(4), 100 * KIB);
        index.enforce();
        assert_eq!(*evicted.lock().unwrap(), vec![key(2)]);
        assert_eq!(index.bytes(), 300 * KIB);
    }

    #[test]
    fn a_large_entry_evicts_as_many_as_needed() {
        let (index, evicted) = index(300 * KIB);
        for n in 1..=3 {
            index.insert(key(n), 100 * KIB);
            index.enforce();
        }
        index.insert(key(9), 250 * KIB);
        index.enforce();
        assert_eq!(*evicted.lock().unwrap(), vec![key(1), key(2), key(3)]);
        assert!(index.contains(&key(9)));
        assert_eq!(index.bytes(), 250 * KIB);
    }

    #[test]
    fn pinned_entries_are_never_evicted_and_still_count() {
        let (index, evicted) = index(300 * KIB);
        index.insert(key(1), 100 * KIB);
        index.enforce();
        index.set_pinned([key(1), key(5)].into_iter().collect());
        index.enforce();
        for n in 2..=4 {
            index.insert(key(n), 100 * KIB);
            index.enforce();
        }
        // Pinned 1 holds a third of the room: of 2, 3, 4 only two fit.
        assert_eq!(*evicted.lock().unwrap(), vec![key(2)]);
        index.insert(key(5), 100 * KIB);
        index.enforce();
        assert_eq!(*evicted.lock().unwrap(), vec![key(2), key(3)]);
        assert!(index.contains(&key(1)) && index.contains(&key(5)));
        assert_eq!(index.bytes(), 300 * KIB);
        // Unpinned, 1 is the most recent entry; 4 is now the oldest.
        index.set_pinned(HashSet::new());
        index.insert(key(6), 100 * KIB);
        index.enforce();
        assert_eq!(evicted.lock().unwrap().last(), Some(&key(4)));
    }

    #[test]
    fn weights_do_not_wrap_above_4_gib() {
        let (index, evicted) = index(10 << 30);
        index.insert(key(1), 1 << 30);
        index.enforce();
        index.insert(key(2), 5 << 30);
        index.enforce();
        assert!(evicted.lock().unwrap().is_empty());
        index.insert(key(3), 5 << 30);
        index.enforce();
        assert_eq!(*evicted.lock().unwrap(), vec![key(1)]);
        assert_eq!(index.bytes(), 10 << 30);
    }
}
