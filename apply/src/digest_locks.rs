//! Per-digest locks: concurrent uploads of one blob run one after the other (the agent's blob store), so do the
//! stages of one package and the publish of a package staged as it was uploaded ([`crate::prestage`]), and pruning
//! skips a digest in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One async mutex per digest, created on demand and dropped when nobody holds or waits for it.
#[derive(Debug, Default)]
pub struct DigestLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds the lock of one digest until dropped.
pub struct DigestGuard<'a> {
    locks: &'a DigestLocks,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl DigestLocks {
    /// The lock of `digest` if nobody holds it now.
    pub fn try_acquire(&self, digest: &str) -> Option<DigestGuard<'_>> {
        let lock = {
            let mut map = self
                .map
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(map.entry(digest.to_string()).or_default())
        };
        let guard = lock.try_lock_owned().ok();
        let acquired = DigestGuard { locks: self, guard };
        // Dropping a guard that holds nothing still cleans the map entry made above.
        acquired.guard.is_some().then_some(acquired)
    }

    /// Waits for the lock of `digest`.
    pub async fn acquire(&self, digest: &str) -> DigestGuard<'_> {
        let lock = {
            let mut map = self
                .map
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(map.entry(digest.to_string()).or_default())
        };
        DigestGuard {
            locks: self,
            guard: Some(lock.lock_owned().await),
        }
    }

    /// Digests locked or waited for right now (an entry lives only that long).
    pub fn in_use(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }
}

impl Drop for DigestGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self
            .locks
            .map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.retain(|_, lock| Arc::strong_count(lock) > 1);
    }
}
