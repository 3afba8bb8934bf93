//! The sender's cache of package chunk hashes, so that pushing a file patchctl has hashed before starts sending at
//! once instead of reading and hashing the whole file again (the tree digest is the agent's cache key and must be
//! known before the first byte goes out: resume and dedup rest on it).
//!
//! An entry is keyed by the file's identity as the kernel reports it: device, inode, size, modification and
//! change times in nanoseconds, plus the chunk size. Any write to the file moves its change time, which no caller
//! can set back, so a changed file misses the cache. The kernel stamps those times from a clock that advances in
//! ticks of a few milliseconds, so a file changed less than [`RACY_WINDOW`] before it was hashed is not
//! remembered: a second write within the same tick would leave its identity unchanged (git's "racy" entries).
//!
//! An entry is a hint trusted like the rest of `$PATCHCTL_HOME`: the agent still verifies every chunk's hash and
//! the tree digest, so wrong hashes make it refuse the upload (`DATA_LOSS`; `patchctl agent push` then forgets
//! the entry and hashes the file again) and never make it store other bytes under a digest. Entries are checked
//! for internal consistency (their chunk hashes must give their digest) when read; at most [`MAX_ENTRIES`] are
//! kept.

use patchd_package::digest::{TreeDigest, TreeHasher, chunk_count};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Header line of an entry file: `v2` holds tree version 2 (BLAKE3) hashes. Entries of `v1` (sha256, from a
/// patchctl before version 2) are not read: their files are hashed again.
const MAGIC: &[u8] = b"patchd-digests-v2\n";
/// Entries kept; the least recently written go first.
const MAX_ENTRIES: usize = 256;
/// A file whose modification or change time is this close to the moment its hashes would be stored is not
/// remembered (many timestamp ticks of margin).
pub const RACY_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// Who a file is, as far as the cache can tell without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    /// The identity of an open file (`fstat`), so it names the very file that is hashed.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        let ns = |secs: i64, nsec: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the file changed less than [`RACY_WINDOW`] ago (or in the future, by a clock set back).
    fn changed_recently(&self) -> bool {
        let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
            return true;
        };
        let now_ns = i128::try_from(now.as_nanos()).unwrap_or(i128::MAX);
        self.mtime_ns.max(self.ctime_ns) > now_ns - RACY_WINDOW.as_nanos() as i128
    }

    /// The fixed-size encoding written into an entry and hashed for its file name.
    fn key_bytes(&self, chunk_size: u32) -> Vec<u8> {
        let mut key = Vec::with_capacity(8 * 3 + 16 * 2 + 4);
        key.extend_from_slice(&self.dev.to_be_bytes());
        key.extend_from_slice(&self.ino.to_be_bytes());
        key.extend_from_slice(&self.size.to_be_bytes());
        key.extend_from_slice(&self.mtime_ns.to_be_bytes());
        key.extend_from_slice(&self.ctime_ns.to_be_bytes());
        key.extend_from_slice(&chunk_size.to_be_bytes());
        key
    }
}

/// Chunk hashes and tree digest of one file, as remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedDigest {
    pub digest: TreeDigest,
    pub chunk_hashes: Vec<[u8; 32]>,
}

/// A directory of entries, one file each (`<sha256 of the key>`). Every operation is best effort: a cache that
/// cannot be read or written only costs a hashing pass.
#[derive(Debug, Clone)]
pub struct DigestCache {
    dir: PathBuf,
}

impl DigestCache {
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn entry_path(&self, identity: &FileIdentity, chunk_size: u32) -> PathBuf {
        let name = ring::digest::digest(&ring::digest::SHA256, &identity.key_bytes(chunk_size));
        self.dir.join(hex::encode(name.as_ref()))
    }

    /// The remembered hashes of the file with this identity, if any and consistent.
    pub fn lookup(&self, identity: &FileIdentity, chunk_size: u32) -> Option<CachedDigest> {
        let bytes = std::fs::read(self.entry_path(identity, chunk_size)).ok()?;
        let rest = bytes.strip_prefix(MAGIC)?;
        let key = identity.key_bytes(chunk_size);
        let rest = rest.strip_prefix(key.as_slice())?;
        let (digest_hex, hashes) = rest.split_at_checked(64)?;
        let digest: TreeDigest = std::str::from_utf8(digest_hex).ok()?.parse().ok()?;
        let expected = chunk_count(identity.size, chunk_size);
        if hashes.len() as u64 != expected.checked_mul(32)? {
            return None;
        }
        let chunk_hashes: Vec<[u8; 32]> = hashes
            .chunks_exact(32)
            .filter_map(|hash| hash.try_into().ok())
            .collect();
        let mut tree = TreeHasher::new(chunk_size, identity.size);
        for hash in &chunk_hashes {
            tree.push_chunk_hash(hash);
        }
        (tree.finish_digest()? == digest).then_some(CachedDigest {
            digest,
            chunk_hashes,
        })
    }

    /// Remembers the hashes of the file with this identity (atomically: a reader sees a whole entry or none),
    /// unless the file changed within [`RACY_WINDOW`]. Call it after checking that the identity did not change
    /// while the file was hashed.
    pub fn store(&self, identity: &FileIdentity, chunk_size: u32, cached: &CachedDigest) {
        if identity.changed_recently() {
            return;
        }
        if let Err(error) = self.try_store(identity, chunk_size, cached) {
            tracing::debug!(dir = %self.dir.display(), %error, "digest cache not written");
        }
        self.prune();
    }

    fn try_store(
        &self,
        identity: &FileIdentity,
        chunk_size: u32,
        cached: &CachedDigest,
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        let mut bytes = Vec::with_capacity(MAGIC.len() + 64 + 64 + cached.chunk_hashes.len() * 32);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&identity.key_bytes(chunk_size));
        bytes.extend_from_slice(cached.digest.as_str().as_bytes());
        for hash in &cached.chunk_hashes {
            bytes.extend_from_slice(hash);
        }
        file.write_all(&bytes)?;
        file.persist(self.entry_path(identity, chunk_size))
            .map_err(|e| e.error)?;
        Ok(())
    }

    /// How long to wait before a file whose last change was at `identity` can be remembered (the rest of
    /// [`RACY_WINDOW`]), or `None` when there is nothing to wait for or the wait would be unreasonably long.
    pub fn settle_wait(identity: &FileIdentity) -> Option<std::time::Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
            .unwrap_or(0);
        let settled_at = identity.mtime_ns.max(identity.ctime_ns) + RACY_WINDOW.as_nanos() as i128;
        u64::try_from(settled_at.saturating_sub(now) + 1_000_000)
            .ok()
            .filter(|wait| *wait <= 2 * RACY_WINDOW.as_nanos() as u64)
            .map(std::time::Duration::from_nanos)
    }

    /// Forgets the entry of this identity (after an agent refused what it said).
    pub fn forget(&self, identity: &FileIdentity, chunk_size: u32) {
        let _ = std::fs::remove_file(self.entry_path(identity, chunk_size));
    }

    /// Keeps the [`MAX_ENTRIES`] most recently written entries.
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
            .collect();
        if files.len() <= MAX_ENTRIES {
            return;
        }
        files.sort();
        for (_, path) in &files[..files.len() - MAX_ENTRIES] {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The directory of the entries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchd_package::digest::{MIN_CHUNK_SIZE, chunk_hash};

    /// The identity of `path` once its last change is older than the racy window.
    fn settled_identity(path: &Path) -> FileIdentity {
        loop {
            let identity = FileIdentity::of(&std::fs::metadata(path).unwrap());
            if !identity.changed_recently() {
                return identity;
            }
            std::thread::sleep(RACY_WINDOW / 4);
        }
    }

    fn hashed(data: &[u8], chunk_size: u32) -> CachedDigest {
        let chunk_hashes: Vec<[u8; 32]> =
            data.chunks(chunk_size as usize).map(chunk_hash).collect();
        let mut tree = TreeHasher::new(chunk_size, data.len() as u64);
        for hash in &chunk_hashes {
            tree.push_chunk_hash(hash);
        }
        CachedDigest {
            digest: tree.finish_digest().unwrap(),
            chunk_hashes,
        }
    }

    #[test]
    fn an_entry_is_found_for_the_same_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DigestCache::at(dir.path().join("digests"));
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let entry = hashed(&data, MIN_CHUNK_SIZE);
        let mut racy = FileIdentity::of(&std::fs::metadata(&path).unwrap());
        racy.ctime_ns = i128::from(i64::MAX);
        cache.store(&racy, MIN_CHUNK_SIZE, &entry);
        assert_eq!(
            cache.lookup(&racy, MIN_CHUNK_SIZE),
            None,
            "a file changed within the racy window is not remembered"
        );

        let identity = settled_identity(&path);
        assert_eq!(cache.lookup(&identity, MIN_CHUNK_SIZE), None, "empty cache");
        cache.store(&identity, MIN_CHUNK_SIZE, &entry);
        assert_eq!(cache.lookup(&identity, MIN_CHUNK_SIZE), Some(entry));
        assert_eq!(
            cache.lookup(&identity, MIN_CHUNK_SIZE * 2),
            None,
            "another chunk size is another key"
        );

        // Any write moves the change time: the rewritten file misses the cache.
        std::fs::write(&path, &data).unwrap();
        let rewritten = settled_identity(&path);
        assert_ne!(rewritten, identity);
        assert_eq!(cache.lookup(&rewritten, MIN_CHUNK_SIZE), None);

        cache.forget(&identity, MIN_CHUNK_SIZE);
        assert_eq!(cache.lookup(&identity, MIN_CHUNK_SIZE), None, "forgotten");
    }

    #[test]
    fn an_inconsistent_entry_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DigestCache::at(dir.path());
        let path = dir.path().join("f");
        let data = vec![7u8; 3 * MIN_CHUNK_SIZE as usize];
        std::fs::write(&path, &data).unwrap();
        let identity = settled_identity(&path);
        let mut entry = hashed(&data, MIN_CHUNK_SIZE);
        entry.chunk_hashes[1][0] ^= 1;
        cache.store(&identity, MIN_CHUNK_SIZE, &entry);
        assert_eq!(
            cache.lookup(&identity, MIN_CHUNK_SIZE),
            None,
            "hashes that do not give the digest"
        );

        let entry = hashed(&data, MIN_CHUNK_SIZE);
        cache.store(&identity, MIN_CHUNK_SIZE, &entry);
        let file = cache.entry_path(&identity, MIN_CHUNK_SIZE);
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(cache.lookup(&identity, MIN_CHUNK_SIZE), None, "a cut entry");
    }
}
