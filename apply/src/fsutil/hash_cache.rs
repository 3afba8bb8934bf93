//! Content digests of deployed files, and the [`HashCache`] keyed by [`FileIdentity`] that hashes a large unchanged
//! binary once.

use super::durable::sibling_temp;
use super::{FileIdentity, FsError, IoContext, hash_reader};
use patchd_package::ContentAlgorithm;
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The `algorithm` digest of a file's content; for a symlink, of its target path string.
pub fn digest_file(path: &Path, algorithm: ContentAlgorithm) -> Result<String, FsError> {
    let meta = fs::symlink_metadata(path).ctx("stat", path)?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path).ctx("read symlink", path)?;
        return Ok(algorithm.digest(target.as_os_str().as_encoded_bytes()));
    }
    let file = File::open(path).ctx("open", path)?;
    hash_reader(file, algorithm, path)
}

/// Content digests of files by path and algorithm, reused while the file's [`FileIdentity`] (ctime included) is unchanged, like git's
/// index: a file rewritten in place with its mtime set back has a new ctime and is hashed again.
/// Optionally kept in a file across agent restarts (every entry is checked against `stat` before use).
#[derive(Debug, Default)]
pub struct HashCache {
    pub(super) entries: Mutex<HashMap<(PathBuf, ContentAlgorithm), (FileIdentity, String)>>,
    file: Option<PathBuf>,
}

/// One persisted cache entry.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedHash {
    path: PathBuf,
    key: FileIdentity,
    /// Its algorithm is in its form ([`ContentAlgorithm::of`]); an agent before manifest format 2 wrote only
    /// sha256 digests, under the name `sha256`.
    #[serde(alias = "sha256")]
    digest: String,
}

/// Most entries persisted (a host has few deployed files of interest).
const MAX_PERSISTED_HASHES: usize = 4096;

impl HashCache {
    /// A cache loaded from (and saved to, by [`HashCache::save`]) `file`; an unreadable file is an empty cache (so
    /// is one written by an agent whose entries had no `mode`: its files are hashed once more).
    pub fn persistent(file: &Path) -> Self {
        let entries = fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<CachedHash>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|e| ((e.path, ContentAlgorithm::of(&e.digest)), (e.key, e.digest)))
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
                entries.retain(|(path, _), (key, _)| {
                    fs::symlink_metadata(path).is_ok_and(|m| FileIdentity::of_metadata(&m) == *key)
                });
                entries
                    .iter()
                    .take(MAX_PERSISTED_HASHES)
                    .map(|((path, _), (key, digest))| CachedHash {
                        path: path.clone(),
                        key: *key,
                        digest: digest.clone(),
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

    /// The `algorithm` digest of `path` (None when absent), from the cache when the file is unchanged since it was
    /// hashed.
    pub fn digest(
        &self,
        path: &Path,
        algorithm: ContentAlgorithm,
    ) -> Result<Option<String>, FsError> {
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
        let key = FileIdentity::of_metadata(&meta);
        if let Some(hit) = self.lookup(path, key, algorithm) {
            return Ok(Some(hit));
        }
        let hashed_at = std::time::SystemTime::now();
        let digest = digest_file(path, algorithm)?;
        // Only cache the hash if the file did not change while it was read and cannot change unnoticed.
        if let Ok(after) = fs::symlink_metadata(path)
            && FileIdentity::of_metadata(&after) == key
            && !key.is_racy(hashed_at)
            && let Ok(mut entries) = self.entries.lock()
        {
            entries.insert((path.to_path_buf(), algorithm), (key, digest.clone()));
        }
        Ok(Some(digest))
    }

    /// Records that `path`, as it is on disk now, has content `digest` (tests only: production code records
    /// only hashes it computed itself, or that stage verified, see [`HashCache::vouch`]).
    #[cfg(test)]
    pub fn remember(&self, path: &Path, digest: &str) {
        if let Ok(meta) = fs::symlink_metadata(path)
            && let Ok(mut entries) = self.entries.lock()
        {
            entries.insert(
                (path.to_path_buf(), ContentAlgorithm::of(digest)),
                (FileIdentity::of_metadata(&meta), digest.to_string()),
            );
        }
    }

    /// Records that `path`, as `stat` (an `lstat` through a directory handle) shows it, has content `digest`
    /// without hashing it: for a file swapped in by an apply whose temporary was verified (stage's record, or
    /// hashed while prepared) and whose inode, size and mtime are still the verified ones (see
    /// `file_plan::remember_swapped`).
    pub fn vouch(&self, path: &Path, stat: &rustix::fs::Stat, digest: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                (path.to_path_buf(), ContentAlgorithm::of(digest)),
                (FileIdentity::of_stat(stat), digest.to_string()),
            );
        }
    }

    /// The `algorithm` digest recorded for `path` when `stat` (an `lstat` of it through a directory handle) shows the very
    /// version that was hashed; `None` when it was not hashed or has changed since.
    pub fn recorded(
        &self,
        path: &Path,
        stat: &rustix::fs::Stat,
        algorithm: ContentAlgorithm,
    ) -> Option<String> {
        self.lookup(path, FileIdentity::of_stat(stat), algorithm)
    }

    fn lookup(
        &self,
        path: &Path,
        key: FileIdentity,
        algorithm: ContentAlgorithm,
    ) -> Option<String> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(&(path.to_path_buf(), algorithm))
            .filter(|(k, _)| *k == key)
            .map(|(_, d)| d.clone())
    }
}
