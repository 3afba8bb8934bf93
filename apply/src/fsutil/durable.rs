//! Durable atomic writes and the small path helpers around them (sibling temporaries, removal that tolerates
//! absence).

use super::{FsError, IoContext};
use rustix::fs::OFlags;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// fsync of a directory, so a rename or unlink inside it is durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// Writes `bytes` to `path` durably and atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let dir = parent_of(path)?;
    fs::create_dir_all(dir).ctx("create directory", dir)?;
    let tmp = sibling_temp(path, "tmp");
    // A leftover temporary is removed rather than truncated, and the new one is created exclusively without
    // following a symlink: whatever sits at that name is never written through.
    remove_if_exists(&tmp)?;
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc_o_nofollow())
            .open(&tmp)
            .ctx("create", &tmp)?;
        file.write_all(bytes).ctx("write", &tmp)?;
        file.sync_all().ctx("fsync", &tmp)?;
    }
    fs::rename(&tmp, path).ctx("rename into place", path)?;
    fsync_dir(dir)
}

/// `O_NOFOLLOW` as `OpenOptionsExt::custom_flags` takes it.
fn libc_o_nofollow() -> i32 {
    // The flag's bits fit an i32 on every Linux target.
    i32::try_from(OFlags::NOFOLLOW.bits()).unwrap_or(0)
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
