//! One holder per key at a time: how the mirror makes concurrent misses for the same
//! manifest ask the upstream (or the owner replica) once. The first request takes the lock
//! and fetches; the others wait, then find the answer in the cache.
//!
//! Unlike blobs, manifests are small and answered whole, so a lock plus a second cache look
//! is all the single-flight they need. Entries hold only a `Weak`, and the map is swept as
//! it grows, so keys nobody waits on cost nothing.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

pub struct KeyedLocks<K> {
    /// A std Mutex: held only to find or insert an entry, never across an await.
    locks: Mutex<HashMap<K, Weak<tokio::sync::Mutex<()>>>>,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    pub fn new() -> Self {
        KeyedLocks { locks: Mutex::default() }
    }

    /// Waits until no one else holds `key`, and holds it until the guard drops.
    pub async fn lock(&self, key: K) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().expect("keyed locks poisoned");
            match locks.get(&key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    if locks.len() >= 1024 && locks.len().is_power_of_two() {
                        locks.retain(|_, lock| lock.strong_count() > 0);
                    }
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

impl<K: Eq + Hash + Clone> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_key() {
        let locks = Arc::new(KeyedLocks::new());
        let first = locks.lock("a").await;
        let _other_key = locks.lock("b").await;
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move { drop(locks.lock("a").await) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the second holder of a key waits");
        drop(first);
        waiter.await.unwrap();
    }
}
