//! Pruning of the agent's disk cache: complete blobs (`blobs/<digest>`), staged packages (`staging/<digest>/`)
//! and interrupted uploads (`blobs/partial/*`), so a host patched often does not run out of space.
//!
//! A blob or staging directory is removed only when all of these hold: no journal refers to its digest (an apply
//! in flight, or a committed patch whose backups are still kept for rollback), no stage or apply of this agent
//! is using it right now (a [`Pins`] entry), and it was last touched (the later of mtime and ctime) at least
//! `cache_min_age` ago. A blob reported complete by `QueryBlob` and a package staged again are touched, so what a
//! controller is about to use stays young. Partial uploads are only pruned at agent start, before any upload runs.

use crate::layout::{StateLayout, is_digest};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Default `limits.cache_min_age`: anything touched more recently is kept, referenced or not.
pub const DEFAULT_CACHE_MIN_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// What one pruning pass removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// Every path removed (blob files, staging directories, partial-upload files).
    pub removed: Vec<PathBuf>,
    /// Bytes given back to the file system (files still hard-linked elsewhere, e.g. deployed, are not counted).
    pub bytes_freed: u64,
}

impl PruneReport {
    fn merge(&mut self, other: PruneReport) {
        self.removed.extend(other.removed);
        self.bytes_freed = self.bytes_freed.saturating_add(other.bytes_freed);
    }
}

/// Digests a stage or an apply is using right now; pruning skips them. Checking a pin and removing the files
/// happen under one lock, so a stage or apply that pins a digest either sees its files intact or absent.
#[derive(Debug, Default)]
pub struct Pins {
    counts: Mutex<HashMap<String, usize>>,
}

/// Keeps a digest pinned until dropped.
#[derive(Debug)]
pub struct PinGuard {
    pins: Arc<Pins>,
    digest: String,
}

impl Pins {
    fn counts(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pins `digest` until the guard is dropped (pins of one digest nest).
    pub fn pin(self: &Arc<Self>, digest: &str) -> PinGuard {
        *self.counts().entry(digest.to_string()).or_default() += 1;
        PinGuard {
            pins: Arc::clone(self),
            digest: digest.to_string(),
        }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut counts = self.pins.counts();
        if let Some(count) = counts.get_mut(&self.digest) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.digest);
            }
        }
    }
}

/// The later of a file's mtime and ctime: a rename or a touch both count as use.
fn last_touched(meta: &std::fs::Metadata) -> SystemTime {
    let seconds = meta.mtime().max(meta.ctime());
    u64::try_from(seconds)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .unwrap_or(UNIX_EPOCH)
}

/// Old enough to go: touched at least `min_age` before `now` (a clock in the past keeps everything).
fn is_old(meta: &std::fs::Metadata, min_age: Duration, now: SystemTime) -> bool {
    now.duration_since(last_touched(meta))
        .is_ok_and(|age| age >= min_age)
}

/// Sets the mtime of a blob or staging directory to now, so the age rule keeps it (best effort: a failure only
/// means it may be pruned earlier).
pub fn touch(path: &Path) {
    let touched = std::fs::File::open(path).and_then(|file| file.set_modified(SystemTime::now()));
    if let Err(e) = touched {
        tracing::debug!(path = %path.display(), "cannot touch: {e}");
    }
}

/// Bytes freed by deleting `path`: regular files not linked elsewhere (deployed files share staged inodes).
fn freeable_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        let Ok(listing) = std::fs::read_dir(path) else {
            return 0;
        };
        listing
            .flatten()
            .map(|entry| freeable_bytes(&entry.path()))
            .fold(0, u64::saturating_add)
    } else if meta.is_file() && meta.nlink() <= 1 {
        meta.len()
    } else {
        0
    }
}

static PRUNE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes complete blobs and staging directories that are unreferenced, unpinned and older than `min_age`.
pub fn prune_cache(
    state_dir: &Path,
    referenced: &HashSet<String>,
    pins: &Pins,
    min_age: Duration,
    now: SystemTime,
) -> PruneReport {
    let mut report = PruneReport::default();
    // QueryBlob and Stage touch without the pin lock: the age is checked again, under it, right before removing.
    let still_old =
        |path: &Path| std::fs::symlink_metadata(path).is_ok_and(|meta| is_old(&meta, min_age, now));
    let prunable = |digest: &str, meta: &std::fs::Metadata| {
        is_digest(digest) && !referenced.contains(digest) && is_old(meta, min_age, now)
    };

    let blobs = StateLayout::new(state_dir).blobs();
    for (digest, path, meta) in listing(&blobs) {
        if !meta.is_file() || !prunable(&digest, &meta) {
            continue;
        }
        let bytes = freeable_bytes(&path);
        let removed = {
            let counts = pins.counts();
            if counts.contains_key(&digest) || !still_old(&path) {
                continue;
            }
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), bytes, "removed an unused cached blob");
                report.removed.push(path);
                report.bytes_freed = report.bytes_freed.saturating_add(bytes);
            }
            Err(e) => tracing::warn!(path = %path.display(), "cannot remove an unused blob: {e}"),
        }
    }

    let staging = StateLayout::new(state_dir).staging();
    for (digest, path, meta) in listing(&staging) {
        if !meta.is_dir() || !prunable(&digest, &meta) {
            continue;
        }
        // Renamed aside under the pin lock (instant), deleted after it: a crash in between leaves a `.tmp-*`
        // directory, which the next start removes with the other leftovers of interrupted stages.
        let aside = staging.join(format!(
            ".tmp-prune-{digest}-{}-{}",
            std::process::id(),
            PRUNE_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        {
            let counts = pins.counts();
            if counts.contains_key(&digest) || !still_old(&path) {
                continue;
            }
            if let Err(e) = std::fs::rename(&path, &aside) {
                tracing::warn!(path = %path.display(), "cannot remove an unused staging directory: {e}");
                continue;
            }
        }
        let bytes = freeable_bytes(&aside);
        if let Err(e) = crate::fsutil::remove_tree_if_exists(&aside) {
            tracing::warn!("cannot finish removing an unused staging directory: {e}");
        }
        tracing::info!(path = %path.display(), bytes, "removed an unused staging directory");
        report.removed.push(path);
        report.bytes_freed = report.bytes_freed.saturating_add(bytes);
    }
    report
}

/// Removes interrupted uploads (`blobs/partial/*`) older than `min_age`. Only at agent start: nothing may be
/// uploading.
pub fn prune_partials(state_dir: &Path, min_age: Duration, now: SystemTime) -> PruneReport {
    let mut report = PruneReport::default();
    for (_, path, meta) in listing(&StateLayout::new(state_dir).partial_uploads()) {
        if !meta.is_file() || !is_old(&meta, min_age, now) {
            continue;
        }
        let bytes = freeable_bytes(&path);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), bytes, "removed an old partial upload");
                report.removed.push(path);
                report.bytes_freed = report.bytes_freed.saturating_add(bytes);
            }
            Err(e) => tracing::warn!(path = %path.display(), "cannot remove a partial upload: {e}"),
        }
    }
    report
}

/// Both passes, as run at agent start after recovery.
pub fn prune_at_start(
    state_dir: &Path,
    referenced: &HashSet<String>,
    pins: &Pins,
    min_age: Duration,
    now: SystemTime,
) -> PruneReport {
    let mut report = prune_partials(state_dir, min_age, now);
    report.merge(prune_cache(state_dir, referenced, pins, min_age, now));
    report
}

/// Entries of `dir` with their names and metadata (not following symlinks); unreadable entries are skipped.
fn listing(dir: &Path) -> Vec<(String, PathBuf, std::fs::Metadata)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let meta = entry.metadata().ok()?;
            Some((name, entry.path(), meta))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: Duration = Duration::from_secs(48 * 60 * 60);
    const MIN_AGE: Duration = Duration::from_secs(24 * 60 * 60);

    fn digest(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    struct Cache {
        _dir: tempfile::TempDir,
        state: PathBuf,
    }

    impl Cache {
        fn new() -> Cache {
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            for sub in ["blobs/partial", "staging"] {
                std::fs::create_dir_all(state.join(sub)).unwrap();
            }
            Cache { _dir: dir, state }
        }

        fn blob(&self, digest: &str, bytes: usize) -> PathBuf {
            let path = self.state.join("blobs").join(digest);
            std::fs::write(&path, vec![7u8; bytes]).unwrap();
            path
        }

        fn staged(&self, digest: &str) -> PathBuf {
            let dir = self.state.join("staging").join(digest);
            std::fs::create_dir_all(dir.join("files/svc")).unwrap();
            std::fs::write(dir.join("files/svc/svc"), vec![1u8; 100]).unwrap();
            std::fs::write(dir.join("manifest.json"), "{}").unwrap();
            dir
        }

        fn partial(&self, name: &str) -> PathBuf {
            let path = self.state.join("blobs/partial").join(name);
            std::fs::write(&path, vec![3u8; 10]).unwrap();
            path
        }
    }

    /// Files are created now; "old" is simulated by pruning from a point in the future.
    fn later(by: Duration) -> SystemTime {
        SystemTime::now() + by
    }

    #[test]
    fn old_unreferenced_blob_and_staging_are_removed_and_bytes_counted() {
        let cache = Cache::new();
        let d = digest(1);
        let blob = cache.blob(&d, 1000);
        let staged = cache.staged(&d);
        let report = prune_cache(
            &cache.state,
            &HashSet::new(),
            &Pins::default(),
            MIN_AGE,
            later(OLD),
        );
        assert!(!blob.exists() && !staged.exists(), "{report:?}");
        assert_eq!(report.removed.len(), 2);
        assert_eq!(report.bytes_freed, 1000 + 100 + 2);
        let leftovers: Vec<_> = std::fs::read_dir(cache.state.join("staging"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn referenced_young_and_pinned_digests_are_kept() {
        let cache = Cache::new();
        let (referenced, unused, pinned) = (digest(1), digest(2), digest(3));
        for d in [&referenced, &unused, &pinned] {
            cache.blob(d, 10);
            cache.staged(d);
        }
        let pins = Arc::new(Pins::default());
        let pin = pins.pin(&pinned);
        // Pruning at "now + 1h" with a 24h minimum age: everything is young.
        let report = prune_cache(
            &cache.state,
            &HashSet::new(),
            &pins,
            MIN_AGE,
            later(Duration::from_secs(3600)),
        );
        assert!(report.removed.is_empty(), "{report:?}");

        let refs = HashSet::from([referenced.clone()]);
        let report = prune_cache(&cache.state, &refs, &pins, MIN_AGE, later(OLD));
        for kept in [&referenced, &pinned] {
            assert!(cache.state.join("blobs").join(kept).is_file(), "{kept}");
            assert!(cache.state.join("staging").join(kept).is_dir(), "{kept}");
        }
        assert!(!cache.state.join("blobs").join(&unused).exists());
        assert!(!cache.state.join("staging").join(&unused).exists());
        assert_eq!(report.removed.len(), 2, "{report:?}");

        drop(pin);
        let report = prune_cache(&cache.state, &refs, &pins, MIN_AGE, later(OLD));
        assert!(!cache.state.join("blobs").join(&pinned).exists());
        assert!(!cache.state.join("staging").join(&pinned).exists());
        assert_eq!(report.removed.len(), 2, "{report:?}");
        assert!(cache.state.join("blobs").join(&referenced).is_file());
    }

    #[test]
    fn partial_uploads_go_only_when_old_and_other_files_stay() {
        let cache = Cache::new();
        let part = cache.partial(&format!("{}.part", digest(5)));
        let chunks = cache.partial(&format!("{}.chunks", digest(5)));
        let report = prune_partials(&cache.state, MIN_AGE, later(Duration::from_secs(60)));
        assert!(report.removed.is_empty() && part.exists() && chunks.exists());
        // Not a digest: the cache prune leaves it alone; so are the partial and staging temp directories.
        let stray = cache.state.join("blobs").join("README");
        std::fs::write(&stray, "x").unwrap();
        let report = prune_at_start(
            &cache.state,
            &HashSet::new(),
            &Pins::default(),
            MIN_AGE,
            later(OLD),
        );
        assert!(!part.exists() && !chunks.exists(), "{report:?}");
        assert_eq!(report.bytes_freed, 20);
        assert!(stray.exists());
        assert!(cache.state.join("blobs/partial").is_dir());
    }

    #[test]
    fn touch_makes_an_old_entry_young_again() {
        let cache = Cache::new();
        let blob = cache.blob(&digest(6), 10);
        let old = SystemTime::now() - OLD;
        std::fs::File::options()
            .write(true)
            .open(&blob)
            .unwrap()
            .set_modified(old)
            .unwrap();
        touch(&blob);
        let meta = std::fs::metadata(&blob).unwrap();
        assert!(meta.modified().unwrap() > old + Duration::from_secs(3600));
    }
}
