//! sha256 of deployed files, and the stat-keyed [`HashCache`] that hashes a large unchanged binary once.

use super::durable::sibling_temp;
use super::{FsError, IoContext, hash_reader};
use ring::digest::SHA256;
use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// sha256 (hex) of a file's content; for a symlink, of its target path string.
pub fn sha256_file(path: &Path) -> Result<String, FsError> {
    let meta = fs::symlink_metadata(path).ctx("stat", path)?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path).ctx("read symlink", path)?;
        let digest = ring::digest::digest(&SHA256, target.as_os_str().as_encoded_bytes());
        return Ok(hex::encode(digest.as_ref()));
    }
    let file = File::open(path).ctx("open", path)?;
    hash_reader(file, path)
}

/// What identifies one version of a file on disk without reading it: replacing the file (rename over it) changes
/// the inode, writing into it changes the mtime, and any change to the inode at all (a write, a chmod, a
/// `touch` that sets the mtime back) changes the ctime, which no user can set. The ctime also changes when a
/// hard link is added or removed (backups, staging) or the file is renamed, which costs one more hashing: on any
/// doubt the file is hashed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(super) struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

/// A file time (seconds and nanoseconds, as `stat` gives them) in nanoseconds since the epoch.
pub fn nanos(secs: i64, nsec: i64) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nsec)
}

impl StatKey {
    /// The key of an `lstat` made through a directory handle.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    fn of_stat(stat: &rustix::fs::Stat) -> Self {
        StatKey {
            dev: stat.st_dev as u64,
            ino: stat.st_ino as u64,
            size: stat.st_size as u64,
            mtime_ns: nanos(stat.st_mtime as i64, stat.st_mtime_nsec as i64),
            ctime_ns: nanos(stat.st_ctime as i64, stat.st_ctime_nsec as i64),
        }
    }

    fn of(meta: &fs::Metadata) -> Self {
        StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Changed so shortly before `hashed_at` that a further change within the same timestamp tick could leave
    /// the key unchanged ("racily clean", as git calls it): such a hash is used once but not cached.
    fn is_racy(&self, hashed_at: std::time::SystemTime) -> bool {
        let Ok(since_epoch) = hashed_at.duration_since(std::time::UNIX_EPOCH) else {
            return true;
        };
        let hashed_ns = i128::try_from(since_epoch.as_nanos()).unwrap_or(i128::MAX);
        hashed_ns - self.ctime_ns.max(self.mtime_ns) < self.racy_window_ns()
    }

    /// One timestamp tick with margin. Both times on a whole second means the file system may keep only seconds
    /// (ext4 with small inodes, FAT, some NFS servers): one second, like git. Otherwise the times have sub-second
    /// resolution, stamped from the kernel's clock tick (1-10 ms), and [`RACY_WINDOW_FINE_NS`] covers several.
    fn racy_window_ns(&self) -> i128 {
        let whole_second = |ns: i128| ns % 1_000_000_000 == 0;
        if whole_second(self.mtime_ns) && whole_second(self.ctime_ns) {
            RACY_WINDOW_COARSE_NS
        } else {
            RACY_WINDOW_FINE_NS
        }
    }
}

/// See [`StatKey::racy_window_ns`].
const RACY_WINDOW_COARSE_NS: i128 = 1_000_000_000;
/// See [`StatKey::racy_window_ns`].
const RACY_WINDOW_FINE_NS: i128 = 20_000_000;

/// sha256 of files by path, reused while the file's stat key (with its ctime) is unchanged, like git's index: a
/// file rewritten in place with its mtime set back has a new ctime and is hashed again.
/// Optionally kept in a file across agent restarts (every entry is checked against `stat` before use).
#[derive(Debug, Default)]
pub struct HashCache {
    pub(super) entries: Mutex<HashMap<PathBuf, (StatKey, String)>>,
    file: Option<PathBuf>,
}

/// One persisted cache entry.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedHash {
    path: PathBuf,
    key: StatKey,
    sha256: String,
}

/// Most entries persisted (a host has few deployed files of interest).
const MAX_PERSISTED_HASHES: usize = 4096;

impl HashCache {
    /// A cache loaded from (and saved to, by [`HashCache::save`]) `file`; an unreadable file is an empty cache.
    pub fn persistent(file: &Path) -> Self {
        let entries = fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<CachedHash>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.path, (e.key, e.sha256)))
            .collect();
        HashCache {
            entries: Mutex::new(entries),
            file: Some(file.to_path_buf()),
        }
    }

    /// Writes the entries whose file is still unchanged. Not fsynced: it is a cache (a lost or torn file only
    /// means hashing again).
    pub fn save(&self) {
        let Some(file) = &self.file else { return };
        let current: Vec<CachedHash> = match self.entries.lock() {
            Ok(mut entries) => {
                entries.retain(|path, (key, _)| {
                    fs::symlink_metadata(path).is_ok_and(|m| StatKey::of(&m) == *key)
                });
                entries
                    .iter()
                    .take(MAX_PERSISTED_HASHES)
                    .map(|(path, (key, sha256))| CachedHash {
                        path: path.clone(),
                        key: *key,
                        sha256: sha256.clone(),
                    })
                    .collect()
            }
            Err(_) => return,
        };
        let Ok(bytes) = serde_json::to_vec(&current) else {
            return;
        };
        let temp = sibling_temp(file, "tmp");
        if fs::write(&temp, bytes)
            .and_then(|()| fs::rename(&temp, file))
            .is_err()
        {
            let _ = fs::remove_file(&temp);
        }
    }

    /// sha256 of `path` (None when absent), from the cache when the file is unchanged since it was hashed.
    pub fn sha256(&self, path: &Path) -> Result<Option<String>, FsError> {
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(FsError {
                    op: "stat",
                    path: path.to_path_buf(),
                    source: e,
                });
            }
        };
        let key = StatKey::of(&meta);
        if let Some(hit) = self.lookup(path, key) {
            return Ok(Some(hit));
        }
        let hashed_at = std::time::SystemTime::now();
        let digest = sha256_file(path)?;
        // Only cache the hash if the file did not change while it was read and cannot change unnoticed.
        if let Ok(after) = fs::symlink_metadata(path)
            && StatKey::of(&after) == key
            && !key.is_racy(hashed_at)
            && let Ok(mut entries) = self.entries.lock()
        {
            entries.insert(path.to_path_buf(), (key, digest.clone()));
        }
        Ok(Some(digest))
    }

    /// Records that `path`, as it is on disk now, has content `sha256` (tests only: production code records
    /// only hashes it computed itself, or that stage verified, see [`HashCache::vouch`]).
    #[cfg(test)]
    pub fn remember(&self, path: &Path, sha256: &str) {
        if let Ok(meta) = fs::symlink_metadata(path)
            && let Ok(mut entries) = self.entries.lock()
        {
            entries.insert(path.to_path_buf(), (StatKey::of(&meta), sha256.to_string()));
        }
    }

    /// Records that `path`, as `stat` (an `lstat` through a directory handle) shows it, has content `sha256`
    /// without hashing it: for a file swapped in by an apply whose temporary was verified (stage's record, or
    /// hashed while prepared) and whose inode, size and mtime are still the verified ones (see
    /// `file_plan::remember_swapped`).
    pub fn vouch(&self, path: &Path, stat: &rustix::fs::Stat, sha256: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                path.to_path_buf(),
                (StatKey::of_stat(stat), sha256.to_string()),
            );
        }
    }

    /// The sha256 recorded for `path` when `stat` (an `lstat` of it through a directory handle) shows the very
    /// version that was hashed; `None` when it was not hashed or has changed since.
    pub fn recorded(&self, path: &Path, stat: &rustix::fs::Stat) -> Option<String> {
        self.lookup(path, StatKey::of_stat(stat))
    }

    fn lookup(&self, path: &Path, key: StatKey) -> Option<String> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(path)
            .filter(|(k, _)| *k == key)
            .map(|(_, d)| d.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::StatKey;
    use std::time::{Duration, UNIX_EPOCH};

    fn key(mtime_ns: i128, ctime_ns: i128) -> StatKey {
        StatKey {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns,
            ctime_ns,
        }
    }

    #[test]
    fn the_racy_window_is_a_second_for_whole_second_times_and_a_few_ticks_otherwise() {
        let second = 1_700_000_000_i128 * 1_000_000_000;
        let at = |ns: i128| UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap());
        let fine = key(second + 1_000, second + 2_000);
        assert!(fine.is_racy(at(second + 2_000 + 10_000_000)), "10 ms later");
        assert!(
            !fine.is_racy(at(second + 2_000 + 30_000_000)),
            "30 ms later"
        );
        let coarse = key(second, second);
        assert!(
            coarse.is_racy(at(second + 500_000_000)),
            "half a second later"
        );
        assert!(
            !coarse.is_racy(at(second + 1_000_000_000)),
            "a second later"
        );
        assert!(fine.is_racy(at(second - 1)), "a clock set back");
    }
}
