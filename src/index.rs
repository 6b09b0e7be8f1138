//! What the cache holds, how big it is and what was used least recently: the eviction
//! decisions, and nothing else. The index names what to delete; the store deletes it.
//!
//! A moka cache with the LRU policy (not moka's default TinyLFU, whose admission filter would
//! refuse a new large layer in favour of old small ones) weighs every blob and manifest by
//! its size. moka's weigher returns a `u32`, so weights are KiB, rounded up: a blob of 5 TiB
//! or less weighs what it occupies, without wrapping at 4 GiB.
//!
//! Recency survives restarts through the files themselves: every use sets the file's mtime,
//! and startup replays the files oldest first, which rebuilds the same LRU order. Tag records
//! are not counted: they are a few hundred bytes each, bounded by the tags pulled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Called with each entry evicted to stay under the bound; must delete it.
pub type Evict = Box<dyn Fn(Key) + Send + Sync>;

pub struct Index {
    entries: moka::sync::Cache<Key, u64>,
    /// Exact bytes held (moka's weighted size is in rounded KiB), and blobs held.
    bytes: Arc<AtomicU64>,
    blobs: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

const KIB: u64 = 1024;

impl Index {
    pub fn new(max_bytes: u64, metrics: Arc<Metrics>, evict: Evict) -> Index {
        let bytes = Arc::new(AtomicU64::new(0));
        let blobs = Arc::new(AtomicU64::new(0));
        let (listener_bytes, listener_blobs) = (bytes.clone(), blobs.clone());
        let listener_metrics = metrics.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes / KIB)
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_key: &Key, size: &u64| u32::try_from(size.div_ceil(KIB).max(1)).unwrap_or(u32::MAX))
            .eviction_listener(move |key: Arc<Key>, size: u64, cause: RemovalCause| {
                listener_bytes.fetch_sub(size, Ordering::Relaxed);
                if let Key::Blob(_) = *key {
                    listener_blobs.fetch_sub(1, Ordering::Relaxed);
                }
                if cause == RemovalCause::Size {
                    listener_metrics.evictions.inc();
                    listener_metrics.evicted_bytes.inc_by(size);
                    evict(*key);
                }
            })
            .build();
        Index { entries, bytes, blobs, metrics }
    }

    /// Records an entry (or a use of it) as the most recent.
    pub fn insert(&self, key: Key, size: u64) {
        // Counted before the entry exists, so the eviction listener never subtracts first.
        let blobs = u64::from(matches!(key, Key::Blob(_)));
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.blobs.fetch_add(blobs, Ordering::Relaxed);
        if !self.entries.entry(key).or_insert(size).is_fresh() {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            self.blobs.fetch_sub(blobs, Ordering::Relaxed);
        }
    }

    /// Records a use of an entry; false if the index does not know it.
    pub fn touch(&self, key: &Key) -> bool {
        self.entries.get(key).is_some()
    }

    /// Forgets an entry without deleting it (the caller removed or quarantined it).
    pub fn remove(&self, key: &Key) {
        self.entries.invalidate(key);
    }

    /// Applies pending evictions now. Blocking (it may delete files).
    pub fn enforce(&self) {
        self.entries.run_pending_tasks();
        self.publish();
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.entries.contains_key(key)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> u64 {
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn publish(&self) {
        self.metrics.cache_size_bytes.set(i64::try_from(self.bytes()).unwrap_or(i64::MAX));
        self.metrics.cache_blobs.set(i64::try_from(self.blobs.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

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
