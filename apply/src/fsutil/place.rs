//! File placement: a temporary sibling made by hard link or confined copy, renamed over the target by the caller
//! (the placement rule in the module doc of [`super`]).

use super::dir_handle::{DirHandle, Owner};
use super::{FsError, IoContext, io_err};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// A file named by a held directory and a clean relative path below it.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    pub dir: &'a DirHandle,
    pub rel: &'a Path,
}

impl At<'_> {
    fn shown(&self) -> PathBuf {
        self.dir.display_path(self.rel)
    }
}

/// Creates `temp` with the content of `source`, mode `mode` when given, owned by `owner` when given (else as
/// the source), durable on disk. A hard link when source and temp are on the same file system and the source
/// already has that owner (a link shares the inode, so it cannot have another owner); otherwise a copy created
/// with `O_CREAT | O_EXCL | O_NOFOLLOW` (never through an existing entry), chowned, chmoded and fsynced.
/// Symlinks are recreated as symlinks. An existing `temp` (left by an earlier attempt) is removed first.
/// Returns the directory holding `temp`, to be fsynced by the caller.
pub fn materialize_at(
    source: At<'_>,
    temp: At<'_>,
    mode: Option<u32>,
    owner: Option<Owner>,
) -> Result<DirHandle, FsError> {
    temp.dir.remove_file(temp.rel)?;
    let (src_dir, src_name) = source.dir.parent_of(source.rel)?;
    let (dst_dir, dst_name) = temp.dir.parent_of(temp.rel)?;
    let src_stat = src_dir.stat_entry(src_name)?.ok_or_else(|| FsError {
        op: "stat",
        path: source.shown(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let src_owner = (src_stat.st_uid, src_stat.st_gid);
    let owner = owner.unwrap_or(src_owner);
    let chown = |fd: BorrowedFd<'_>, flags: Option<AtFlags>| -> Result<(), FsError> {
        let (uid, gid) = (
            Some(rustix::fs::Uid::from_raw(owner.0)),
            Some(rustix::fs::Gid::from_raw(owner.1)),
        );
        match flags {
            Some(flags) => rustix::fs::chownat(fd, dst_name, uid, gid, flags),
            None => rustix::fs::fchown(fd, uid, gid),
        }
        .map_err(io_err)
        .ctx("chown", &temp.shown())
    };
    match FileType::from_raw_mode(src_stat.st_mode) {
        FileType::Symlink => {
            let link_target = rustix::fs::readlinkat(&src_dir.fd, src_name, Vec::new())
                .map_err(io_err)
                .ctx("read symlink", &source.shown())?;
            rustix::fs::symlinkat(link_target.as_c_str(), &dst_dir.fd, dst_name)
                .map_err(io_err)
                .ctx("create symlink", &temp.shown())?;
            let created = dst_dir.stat_entry(dst_name)?;
            if created.is_some_and(|stat| (stat.st_uid, stat.st_gid) != owner) {
                chown(dst_dir.fd.as_fd(), Some(AtFlags::SYMLINK_NOFOLLOW))?;
            }
            return Ok(dst_dir);
        }
        FileType::RegularFile => {}
        other => {
            return Err(FsError {
                op: "copy",
                path: source.shown(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("not a regular file or symlink ({other:?})"),
                ),
            });
        }
    }
    let linked = owner == src_owner
        && rustix::fs::linkat(
            &src_dir.fd,
            src_name,
            &dst_dir.fd,
            dst_name,
            AtFlags::empty(),
        )
        .is_ok();
    let file = if linked {
        File::from(
            dst_dir
                .open_below(Path::new(dst_name), OFlags::RDONLY, Mode::empty())
                .ctx("open", &temp.shown())?,
        )
    } else {
        let mut from = File::from(
            src_dir
                .open_below(Path::new(src_name), OFlags::RDONLY, Mode::empty())
                .ctx("open", &source.shown())?,
        );
        let mut to = File::from(
            rustix::fs::openat(
                &dst_dir.fd,
                dst_name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(io_err)
            .ctx("create", &temp.shown())?,
        );
        std::io::copy(&mut from, &mut to).ctx("copy to", &temp.shown())?;
        chown(to.as_fd(), None)?;
        to
    };
    let wanted = mode.unwrap_or(src_stat.st_mode) & 0o7777;
    let current = rustix::fs::fstat(&file)
        .map_err(io_err)
        .ctx("stat", &temp.shown())?
        .st_mode
        & 0o7777;
    if current != wanted {
        rustix::fs::fchmod(&file, Mode::from_raw_mode(wanted))
            .map_err(io_err)
            .ctx("chmod", &temp.shown())?;
    }
    if !linked {
        // A hard link shares the source's inode, whose data is as durable as it was (staged files are fsynced
        // when unpacked); its new name becomes durable with the directory fsync the caller does.
        file.sync_all().ctx("fsync", &temp.shown())?;
    }
    Ok(dst_dir)
}

/// The owner a new file at `rel` gets: that of the file it replaces, or for a new file that of its directory.
pub fn owner_for(dir: &DirHandle, rel: &Path) -> Result<Owner, FsError> {
    let (parent, name) = dir.parent_of(rel)?;
    match parent.stat_entry(name)? {
        Some(stat) => Ok((stat.st_uid, stat.st_gid)),
        None => parent.owner(),
    }
}
