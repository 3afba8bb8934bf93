//! File-system primitives the apply engine's crash safety rests on: durable atomic writes, file placement by
//! rename, and sha256 of deployed files (with a stat-keyed cache so large unchanged binaries are hashed once).
//!
//! Placement rule (documented in ARCHITECTURE.md, "Apply state machine"): a file is put at `target` by first
//! creating a temporary sibling in `target`'s directory and then `rename`-ing it over `target`, so `target`
//! always names either the complete old or the complete new content. The temporary is a hard link of the
//! source when source and target directory are on the same file system (no data copied; the source is
//! immutable: nothing here ever writes into an existing file), otherwise a copy that is fsynced before the
//! rename. Either way the temporary is fsynced before the rename and the directory after it.

use ring::digest::{Context, SHA256};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// An I/O error with the operation and path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct FsError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Attaches an operation and a path to an `io::Error`.
pub trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, FsError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, FsError> {
        self.map_err(|source| FsError {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// fsync of a directory, so a rename or unlink inside it is durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// Creates `dir` (whose parent must exist) and fsyncs the parent so the new entry is durable; an existing
/// directory is fine.
pub fn create_dir_durable(dir: &Path) -> Result<(), FsError> {
    match fs::create_dir(dir) {
        Ok(()) => fsync_dir(parent_of(dir)?),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(FsError {
            op: "create directory",
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Creates `dir` and its missing ancestors, each made durable (its parent fsynced).
pub fn create_dir_all_durable(dir: &Path) -> Result<(), FsError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all_durable(parent)?;
    }
    create_dir_durable(dir)
}

/// Writes `bytes` to `path` durably and atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let dir = parent_of(path)?;
    fs::create_dir_all(dir).ctx("create directory", dir)?;
    let tmp = sibling_temp(path, "tmp");
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .ctx("create", &tmp)?;
        file.write_all(bytes).ctx("write", &tmp)?;
        file.sync_all().ctx("fsync", &tmp)?;
    }
    fs::rename(&tmp, path).ctx("rename into place", path)?;
    fsync_dir(dir)
}

/// `<dir>/.<name>.<tag>`: a hidden sibling used as the temporary of an atomic replace.
pub fn sibling_temp(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}"))
}

/// The directory containing `path`.
pub fn parent_of(path: &Path) -> Result<&Path, FsError> {
    path.parent().ok_or_else(|| FsError {
        op: "find parent directory of",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no parent"),
    })
}

/// True when both existing paths live on the same file system (so `link`/`rename` between them work).
pub fn same_filesystem(a: &Path, b: &Path) -> Result<bool, FsError> {
    let da = fs::metadata(a).ctx("stat", a)?.dev();
    let db = fs::metadata(b).ctx("stat", b)?.dev();
    Ok(da == db)
}

/// Creates `temp` (in `temp`'s directory, which must exist) with the content of `source`, mode `mode` when
/// given, durable on disk: hard link on the same file system, otherwise copy. Symlinks are recreated as
/// symlinks. An existing `temp` (left by an earlier attempt) is replaced.
pub fn materialize(source: &Path, temp: &Path, mode: Option<u32>) -> Result<(), FsError> {
    remove_if_exists(temp)?;
    let meta = fs::symlink_metadata(source).ctx("stat", source)?;
    if meta.file_type().is_symlink() {
        let link_target = fs::read_link(source).ctx("read symlink", source)?;
        std::os::unix::fs::symlink(&link_target, temp).ctx("create symlink", temp)?;
        return Ok(());
    }
    let temp_dir = parent_of(temp)?;
    let linked =
        same_filesystem(parent_of(source)?, temp_dir)? && fs::hard_link(source, temp).is_ok();
    if !linked {
        copy_file(source, temp)?;
    }
    if let Some(mode) = mode {
        let current = fs::metadata(temp).ctx("stat", temp)?.permissions().mode() & 0o7777;
        if current != mode & 0o7777 {
            fs::set_permissions(temp, fs::Permissions::from_mode(mode & 0o7777))
                .ctx("chmod", temp)?;
        }
    }
    if linked {
        // Same inode as the source, whose data is as durable as it was (staged files are fsynced when
        // unpacked); the new name becomes durable with the directory fsync the caller does.
        return Ok(());
    }
    File::open(temp)
        .and_then(|f| f.sync_all())
        .ctx("fsync", temp)
}

/// Copies a regular file's bytes and permissions (not its inode).
fn copy_file(source: &Path, dest: &Path) -> Result<(), FsError> {
    fs::copy(source, dest).ctx("copy to", dest)?;
    Ok(())
}

/// Atomically puts `source`'s content at `target` (see the module doc) using the temporary `temp`, then fsyncs
/// the directory. `temp` must be in `target`'s directory.
pub fn place(source: &Path, temp: &Path, target: &Path, mode: Option<u32>) -> Result<(), FsError> {
    materialize(source, temp, mode)?;
    commit_temp(temp, target)
}

/// Renames a prepared temporary over `target` and fsyncs the directory.
pub fn commit_temp(temp: &Path, target: &Path) -> Result<(), FsError> {
    fs::rename(temp, target).ctx("rename into place", target)?;
    fsync_dir(parent_of(target)?)
}

/// Removes a file or symlink; absent is fine.
pub fn remove_if_exists(path: &Path) -> Result<(), FsError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError {
            op: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Removes a directory tree; absent is fine.
pub fn remove_tree_if_exists(path: &Path) -> Result<(), FsError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError {
            op: "remove directory",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// True when something (file, dir or dangling symlink) exists at `path`.
pub fn exists_no_follow(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// sha256 (hex) of a file's content; for a symlink, of its target path string.
pub fn sha256_file(path: &Path) -> Result<String, FsError> {
    let meta = fs::symlink_metadata(path).ctx("stat", path)?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path).ctx("read symlink", path)?;
        let digest = ring::digest::digest(&SHA256, target.as_os_str().as_encoded_bytes());
        return Ok(hex::encode(digest.as_ref()));
    }
    let mut file = File::open(path).ctx("open", path)?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).ctx("read", path)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

/// What identifies one version of a file on disk without reading it: replacing the file (rename over it) changes
/// the inode, writing into it changes the mtime (to the nanosecond). The ctime is left out on purpose: it also
/// changes when a hard link to the same inode is added or removed (backups and staging share inodes with
/// deployed files), which does not change the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl StatKey {
    fn of(meta: &fs::Metadata) -> Self {
        StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// sha256 of files by path, reused while the file's stat key is unchanged (like git's index). A file rewritten in
/// place within the same nanosecond with its mtime forged back would not be noticed; nothing here does that.
/// Optionally kept in a file across agent restarts (every entry is checked against `stat` before use).
#[derive(Debug, Default)]
pub struct HashCache {
    entries: Mutex<HashMap<PathBuf, (StatKey, String)>>,
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
        let digest = sha256_file(path)?;
        // Only trust the hash if the file did not change while it was read.
        if let Ok(after) = fs::symlink_metadata(path)
            && StatKey::of(&after) == key
            && let Ok(mut entries) = self.entries.lock()
        {
            entries.insert(path.to_path_buf(), (key, digest.clone()));
        }
        Ok(Some(digest))
    }

    /// Moves the hash computed for `from` to `to`, which `from` was renamed to: kept only while `to` is still
    /// the very file that was hashed (a rename keeps the inode, size and mtime), so only a hash actually
    /// computed from the content is ever recorded.
    pub fn carry_over(&self, from: &Path, to: &Path) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let Some((key, sha256)) = entries.remove(from) else {
            return;
        };
        if fs::symlink_metadata(to).is_ok_and(|meta| StatKey::of(&meta) == key) {
            entries.insert(to.to_path_buf(), (key, sha256));
        }
    }

    /// Records that `path`, as it is on disk now, has content `sha256` (tests only: production code records
    /// only hashes it computed, see [`HashCache::carry_over`]).
    #[cfg(test)]
    pub fn remember(&self, path: &Path, sha256: &str) {
        if let Ok(meta) = fs::symlink_metadata(path)
            && let Ok(mut entries) = self.entries.lock()
        {
            entries.insert(path.to_path_buf(), (StatKey::of(&meta), sha256.to_string()));
        }
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
    use super::*;

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn place_keeps_old_inode_reachable_through_backup_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("bin");
        let backup = dir.path().join("backup");
        let staged = dir.path().join("staged");
        fs::write(&target, b"old").unwrap();
        fs::write(&staged, b"new").unwrap();
        materialize(&target, &backup, None).unwrap();
        place(&staged, &sibling_temp(&target, "new"), &target, Some(0o755)).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::read(&backup).unwrap(), b"old");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // restore is repeatable: the backup stays
        place(&backup, &sibling_temp(&target, "restore"), &target, None).unwrap();
        place(&backup, &sibling_temp(&target, "restore"), &target, None).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert!(backup.exists());
    }

    #[test]
    fn persisted_hash_cache_survives_a_restart_but_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"content").unwrap();
        let store = dir.path().join("hashes.json");
        let cache = HashCache::persistent(&store);
        cache.remember(&file, "not-the-real-hash");
        cache.save();
        // The remembered value is used after a reload (proving it came from the file), while the file is unchanged.
        let reloaded = HashCache::persistent(&store);
        assert_eq!(
            reloaded.sha256(&file).unwrap().as_deref(),
            Some("not-the-real-hash")
        );
        let other = dir.path().join("g");
        fs::write(&other, b"changed").unwrap();
        fs::rename(&other, &file).unwrap();
        let reloaded = HashCache::persistent(&store);
        assert_eq!(
            reloaded.sha256(&file).unwrap(),
            Some(sha256_file(&file).unwrap())
        );
    }

    #[test]
    fn hash_cache_notices_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"a").unwrap();
        let cache = HashCache::default();
        let a = cache.sha256(&path).unwrap().unwrap();
        assert_eq!(a, sha256_file(&path).unwrap());
        let other = dir.path().join("g");
        fs::write(&other, b"b").unwrap();
        fs::rename(&other, &path).unwrap();
        let b = cache.sha256(&path).unwrap().unwrap();
        assert_ne!(a, b);
        assert_eq!(cache.sha256(&dir.path().join("missing")).unwrap(), None);
    }
}
