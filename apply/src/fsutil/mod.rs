//! File-system primitives the apply engine's crash safety and confinement rest on: durable atomic writes, held
//! directory handles that every write under a deploy or state dir goes through ([`DirHandle`]: nothing resolved
//! below one can be a symlink or lead out of it), file placement by rename, and content digests of deployed files
//! (with a stat-keyed cache so large unchanged binaries are hashed once).
//!
//! Placement rule (documented in ARCHITECTURE.md, "Apply state machine"): a file is put at `target` by first
//! creating a temporary sibling in `target`'s directory and then `rename`-ing it over `target`, so `target`
//! always names either the complete old or the complete new content. The temporary is a hard link of the
//! source when source and target directory are on the same file system and the source already has the owner
//! the new file must have (that of the file it replaces, or of its directory; no data copied; the source is
//! immutable: nothing here ever writes into an existing file), otherwise a copy created with `O_EXCL |
//! O_NOFOLLOW`, chowned and fsynced before the rename. The directory is fsynced after the rename.

mod dir_handle;
mod durable;
mod hash_cache;
mod identity;
mod place;

pub use dir_handle::{DirHandle, Owner};
pub use durable::{
    exists_no_follow, fsync_dir, parent_of, remove_if_exists, remove_tree_if_exists, sibling_temp,
    write_atomic,
};
pub use hash_cache::{HashCache, digest_file};
pub use identity::{FileIdentity, nanos};
pub use place::{At, materialize_at, owner_for};
/// The file type [`DirHandle::entries`] reports.
pub use rustix::fs::FileType;

use patchd_package::ContentAlgorithm;
use std::io::Read;
use std::path::{Path, PathBuf};

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

fn io_err(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// The `algorithm` digest of everything `reader` yields.
pub fn hash_reader(
    reader: impl Read,
    algorithm: ContentAlgorithm,
    shown: &Path,
) -> Result<String, FsError> {
    algorithm.digest_reader(reader).ctx("read", shown)
}

#[cfg(test)]
mod tests;
