//! The journal's space reserve: a few preallocated megabytes in `<state>/journal/`, given back to the file
//! system when a journal write finds the disk full, so that the write (and the recovery or revert it belongs to)
//! still completes on a state disk filled to the last byte. Re-created at agent start and after each finished
//! apply once space is available again.
//!
//! Deleting a file frees its blocks only where nothing else holds them: on a copy-on-write file system with
//! snapshots of the state dir the reserve frees nothing.

use crate::fsutil::{FsError, IoContext};
use nix::fcntl::FallocateFlags;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes kept in reserve: far more than the journal writes of a recovery need (one journal is tens of KiB),
/// leaving room for the pid file and the first lines a restarted service logs.
pub const RESERVE_BYTES: u64 = 4 << 20;

const RESERVE_NAME: &str = ".space-reserve";

/// `<journal dir>/.space-reserve`.
pub fn reserve_path(journal_dir: &Path) -> PathBuf {
    journal_dir.join(RESERVE_NAME)
}

/// Makes sure the reserve exists at its full size. `Ok(false)` when the disk has not the room for it (the
/// partial file is removed again: a half reserve would only hide how full the disk is).
pub fn ensure(journal_dir: &Path) -> Result<bool, FsError> {
    let path = reserve_path(journal_dir);
    if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == RESERVE_BYTES) {
        return Ok(true);
    }
    let tmp = crate::fsutil::sibling_temp(&path, "tmp");
    match fill(&tmp) {
        Ok(()) => {}
        Err(e) if e.source.kind() == std::io::ErrorKind::StorageFull => {
            crate::fsutil::remove_if_exists(&tmp)?;
            return Ok(false);
        }
        Err(e) => {
            let _ = crate::fsutil::remove_if_exists(&tmp);
            return Err(e);
        }
    }
    std::fs::rename(&tmp, &path).ctx("rename into place", &path)?;
    Ok(true)
}

/// Writes `RESERVE_BYTES` of allocated (not sparse) space to `tmp`: `fallocate` where the file system has it,
/// else real bytes (not zeros, which a compressing file system would store in nothing).
fn fill(tmp: &Path) -> Result<(), FsError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .ctx("create", tmp)?;
    let len = i64::try_from(RESERVE_BYTES).unwrap_or(i64::MAX);
    match nix::fcntl::fallocate(&file, FallocateFlags::empty(), 0, len) {
        Ok(()) => {}
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            let mut block = vec![0u8; 64 * 1024];
            let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
            for byte in block.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state.to_le_bytes()[0];
            }
            for _ in 0..RESERVE_BYTES / block.len() as u64 {
                file.write_all(&block).ctx("write", tmp)?;
            }
        }
        Err(errno) => return Err(std::io::Error::from(errno)).ctx("preallocate", tmp),
    }
    file.sync_all().ctx("fsync", tmp)
}

/// Gives the reserve back to the file system; true when there was one to give.
pub fn release(journal_dir: &Path) -> bool {
    let path = reserve_path(journal_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::error!("cannot release the space reserve {}: {e}", path.display());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_created_once_at_full_size_and_released_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure(dir.path()).unwrap());
        let meta = std::fs::metadata(reserve_path(dir.path())).unwrap();
        assert_eq!(meta.len(), RESERVE_BYTES);
        {
            use std::os::unix::fs::MetadataExt;
            assert!(
                meta.blocks() * 512 >= RESERVE_BYTES,
                "the reserve must be allocated, not sparse: {} blocks",
                meta.blocks()
            );
        }
        assert!(ensure(dir.path()).unwrap());
        assert!(release(dir.path()));
        assert!(!release(dir.path()));
        assert!(!reserve_path(dir.path()).exists());
    }
}
