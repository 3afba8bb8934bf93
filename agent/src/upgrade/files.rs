//! File work of upgrade steps, all through directory handles ([`DirHandle`]): copies that keep the mode and are
//! written to a temporary name, fsynced and renamed into place, hashed (sha256) as they are written.

use super::error::UpgradeError;
use super::paths::{fs_error, symlink_refused};
use patchd_apply::fsutil::{DirHandle, FileType};
use ring::digest::{Context, SHA256};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A file written: where, its size and sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub rel: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// The temporary name a file is written under before it takes `name`.
pub fn temp_name(name: &OsStr, tag: &str) -> OsString {
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(".patchd-{tag}"));
    temp
}

fn io_failed(what: &str, path: &Path, error: std::io::Error) -> UpgradeError {
    UpgradeError::Internal(format!("{what} {}: {error}", path.display()))
}

/// Writes `rel` below `dir` (its parent created) with `mode`: the bytes `fill` writes go to a temporary
/// sibling, are fsynced and renamed over `rel`, and the directory is fsynced. Returns size and sha256.
pub fn write_file(
    dir: &DirHandle,
    rel: &Path,
    mode: u32,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<Written, UpgradeError> {
    let shown = dir.display_path(rel);
    if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        dir.create_dir_all(parent)
            .map_err(|e| fs_error(e, "a directory to write into"))?;
    }
    let (parent, name) = dir
        .parent_of(rel)
        .map_err(|e| fs_error(e, "the file to write"))?;
    let temp = temp_name(name, "write");
    parent
        .remove_file(Path::new(&temp))
        .map_err(|e| fs_error(e, "a leftover temporary file"))?;
    let mut file = parent
        .create_new_file(Path::new(&temp), mode & 0o7777)
        .map_err(|e| fs_error(e, "the file to write"))?;
    let mut hashing = HashingWriter {
        inner: &mut file,
        hash: Context::new(&SHA256),
        size: 0,
    };
    let filled = fill(&mut hashing).and_then(|()| hashing.inner.flush());
    let (size, sha256) = (hashing.size, hex::encode(hashing.hash.finish().as_ref()));
    let finished = filled
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)))
        .and_then(|()| file.sync_all());
    if let Err(error) = finished {
        let _ = parent.remove_file(Path::new(&temp));
        return Err(io_failed("cannot write", &shown, error));
    }
    DirHandle::rename_in(&parent, &temp, name).map_err(|e| fs_error(e, "the file to write"))?;
    parent
        .sync()
        .map_err(|e| fs_error(e, "the file to write"))?;
    Ok(Written {
        rel: rel.to_path_buf(),
        size,
        sha256,
    })
}

struct HashingWriter<'a> {
    inner: &'a mut File,
    hash: Context,
    size: u64,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Opens the regular file `rel` below `dir` and its mode (permission bits).
pub fn open_with_mode(
    dir: &DirHandle,
    rel: &Path,
    what: &str,
) -> Result<(File, u32), UpgradeError> {
    let file = dir.open_file(rel).map_err(|e| fs_error(e, what))?;
    let mode = file
        .metadata()
        .map_err(|e| io_failed("cannot stat", &dir.display_path(rel), e))?
        .permissions()
        .mode();
    Ok((file, mode & 0o7777))
}

/// Reads the whole regular file `rel` below `dir`, with its mode, refusing one of more than `cap` bytes (checked
/// while reading too: a file growing meanwhile cannot get past it).
pub fn read_file_capped(
    dir: &DirHandle,
    rel: &Path,
    cap: u64,
    what: &str,
) -> Result<(Vec<u8>, u32), UpgradeError> {
    let (file, mode) = open_with_mode(dir, rel, what)?;
    let too_big = || {
        UpgradeError::Precondition(format!(
            "{what} {} is larger than {cap} bytes, more than an upgrade step reads: edit it by hand or with a \
             declared action",
            dir.display_path(rel).display()
        ))
    };
    let size = file
        .metadata()
        .map_err(|e| io_failed("cannot stat", &dir.display_path(rel), e))?
        .len();
    if size > cap {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| io_failed("cannot read", &dir.display_path(rel), e))?;
    if bytes.len() as u64 > cap {
        return Err(too_big());
    }
    Ok((bytes, mode))
}

/// Copies the file `from` (below `from_dir`) to `to` (below `to_dir`) byte for byte, mode kept.
pub fn copy_file(
    from_dir: &DirHandle,
    from: &Path,
    to_dir: &DirHandle,
    to: &Path,
    what: &str,
) -> Result<Written, UpgradeError> {
    let (mut source, mode) = open_with_mode(from_dir, from, what)?;
    write_file(to_dir, to, mode, |out| {
        std::io::copy(&mut source, out).map(|_| ())
    })
}

/// Copies the file or directory tree `from` below `from_dir` to `to` below `to_dir`: every regular file (mode
/// kept), every directory; a symlink anywhere is refused. Returns the files written with their sources.
pub fn copy_tree(
    from_dir: &DirHandle,
    from: &Path,
    to_dir: &DirHandle,
    to: &Path,
    what: &str,
) -> Result<Vec<(PathBuf, Written)>, UpgradeError> {
    let stat = from_dir
        .stat(from)
        .map_err(|e| fs_error(e, what))?
        .ok_or_else(|| {
            UpgradeError::Precondition(format!(
                "{what} {} does not exist: fix the runbook's path",
                from_dir.display_path(from).display()
            ))
        })?;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => Ok(vec![(
            from.to_path_buf(),
            copy_file(from_dir, from, to_dir, to, what)?,
        )]),
        FileType::Directory => {
            to_dir
                .create_dir_all(to)
                .map_err(|e| fs_error(e, "the backup directory"))?;
            let below = from_dir.open_dir(from).map_err(|e| fs_error(e, what))?;
            let mut out = Vec::new();
            for (name, _) in below.entries().map_err(|e| fs_error(e, what))? {
                let copied = copy_tree(from_dir, &from.join(&name), to_dir, &to.join(&name), what)?;
                out.extend(copied);
            }
            Ok(out)
        }
        FileType::Symlink => Err(symlink_refused(&from_dir.display_path(from), what)),
        _ => Err(UpgradeError::Precondition(format!(
            "{what} {} is neither a file nor a directory (a device, socket or pipe): back up files only",
            from_dir.display_path(from).display()
        ))),
    }
}
