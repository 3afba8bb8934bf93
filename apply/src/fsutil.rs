//! File-system primitives the apply engine's crash safety and confinement rest on: durable atomic writes, held
//! directory handles that every write under a deploy or state dir goes through ([`DirHandle`]: nothing resolved
//! below one can be a symlink or lead out of it), file placement by rename, and sha256 of deployed files (with
//! a stat-keyed cache so large unchanged binaries are hashed once).
//!
//! Placement rule (documented in ARCHITECTURE.md, "Apply state machine"): a file is put at `target` by first
//! creating a temporary sibling in `target`'s directory and then `rename`-ing it over `target`, so `target`
//! always names either the complete old or the complete new content. The temporary is a hard link of the
//! source when source and target directory are on the same file system and the source already has the owner
//! the new file must have (that of the file it replaces, or of its directory; no data copied; the source is
//! immutable: nothing here ever writes into an existing file), otherwise a copy created with `O_EXCL |
//! O_NOFOLLOW`, chowned and fsynced before the rename. The directory is fsynced after the rename.

use ring::digest::{Context, SHA256};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// A directory held open. Every path below it is resolved by the kernel with `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)`, so no `..`, absolute path or symlink anywhere in it (the last component included) can
/// lead out, whatever a local user who can write the directory swaps in between two steps; names are then
/// changed with `*at` calls relative to the freshly resolved parent, which never follow a last-component
/// symlink either.
#[derive(Debug)]
pub struct DirHandle {
    fd: OwnedFd,
    /// For messages only: nothing is ever resolved through it.
    path: PathBuf,
}

/// Owner and group of a file.
pub type Owner = (u32, u32);

/// `openat2` resolution that stays below the handle and refuses every symlink.
fn confined() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn io_err(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// Cleared once `openat2` was found denied (seccomp): [`DirHandle::open_below`] then walks components.
static OPENAT2_AVAILABLE: AtomicBool = AtomicBool::new(true);

/// The error of a refused or failed lookup below a handle, saying why in words a person can act on.
fn refusal(errno: rustix::io::Errno, flags: OFlags) -> std::io::Error {
    match errno {
        rustix::io::Errno::LOOP => std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "refused: a symlink lies on the path (the agent never follows one under a deploy or state dir); \
             remove it and apply again",
        ),
        // What `O_DIRECTORY | O_NOFOLLOW` answers for a symlink as the last component.
        rustix::io::Errno::NOTDIR if flags.contains(OFlags::DIRECTORY) => std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "refused: a symlink or a file stands where a directory must be (the agent never follows a \
             symlink under a deploy or state dir); remove it and apply again",
        ),
        rustix::io::Errno::XDEV => std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "refused: the path leads out of its directory",
        ),
        other => io_err(other),
    }
}

/// `rel` as given to `openat2` ("." for the directory itself).
fn at_path(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

impl DirHandle {
    /// Opens a directory the agent's own configuration names (the state dir, a deploy root): its path is
    /// trusted as configured.
    pub fn open_trusted(path: &Path) -> Result<DirHandle, FsError> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)
        .ctx("open directory", path)?;
        Ok(DirHandle {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path this handle was opened at (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` below this directory, for messages.
    pub fn display_path(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    /// Opens `rel` below this directory: `openat2` (retried on `EAGAIN`, the kernel's answer when a rename raced
    /// the lookup), or where a seccomp filter denies `openat2` (systemd-nspawn, older container runtimes answer
    /// `ENOSYS`) one `openat(O_NOFOLLOW)` per component, which is as strict: every component is a plain name
    /// (no `..`) and none may be a symlink.
    fn open_below(&self, rel: &Path, flags: OFlags, mode: Mode) -> std::io::Result<OwnedFd> {
        let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let mut attempts = 0;
        let opened = loop {
            if !OPENAT2_AVAILABLE.load(Ordering::Relaxed) {
                break self.open_by_components(rel, flags, mode);
            }
            match rustix::fs::openat2(&self.fd, at_path(rel), flags, mode, confined()) {
                Err(rustix::io::Errno::AGAIN) if attempts < 16 => attempts += 1,
                Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM)
                    if attempts == 0 && self.openat2_denied() =>
                {
                    OPENAT2_AVAILABLE.store(false, Ordering::Relaxed);
                }
                other => break other,
            }
        };
        opened.map_err(|errno| refusal(errno, flags))
    }

    /// True when `openat2` itself is refused (checked on this directory with a harmless lookup of ".").
    fn openat2_denied(&self) -> bool {
        matches!(
            rustix::fs::openat2(
                &self.fd,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                confined(),
            ),
            Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM)
        )
    }

    /// The `openat2`-less walk of [`DirHandle::open_below`].
    fn open_by_components(
        &self,
        rel: &Path,
        flags: OFlags,
        mode: Mode,
    ) -> Result<OwnedFd, rustix::io::Errno> {
        let names: Vec<&OsStr> = rel
            .components()
            .map(|part| match part {
                std::path::Component::Normal(name) => Ok(name),
                _ => Err(rustix::io::Errno::XDEV),
            })
            .collect::<Result<_, _>>()?;
        let Some((last, parents)) = names.split_last() else {
            return rustix::fs::openat(&self.fd, ".", flags, mode);
        };
        let mut dir: Option<OwnedFd> = None;
        for name in parents {
            let at = dir.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
            dir = Some(rustix::fs::openat(
                at,
                *name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?);
        }
        let at = dir.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
        rustix::fs::openat(at, *last, flags, mode)
    }

    /// Opens the directory `rel` below this one (a real directory, reached without any symlink).
    pub fn open_dir(&self, rel: &Path) -> Result<DirHandle, FsError> {
        let fd = self
            .open_below(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .ctx("open directory", &self.display_path(rel))?;
        Ok(DirHandle {
            fd,
            path: self.display_path(rel),
        })
    }

    /// The directory holding `rel` (opened) and `rel`'s last component.
    pub fn parent_of<'r>(&self, rel: &'r Path) -> Result<(DirHandle, &'r OsStr), FsError> {
        let name = rel.file_name().ok_or_else(|| FsError {
            op: "find the file name of",
            path: self.display_path(rel),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
        })?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.open_dir(parent)?, name))
    }

    /// fsync of this directory, so a rename, link or unlink inside it is durable.
    pub fn sync(&self) -> Result<(), FsError> {
        rustix::fs::fsync(&self.fd)
            .map_err(io_err)
            .ctx("fsync directory", &self.path)
    }

    /// Owner and group of this directory.
    pub fn owner(&self) -> Result<Owner, FsError> {
        let stat = rustix::fs::fstat(&self.fd)
            .map_err(io_err)
            .ctx("stat", &self.path)?;
        Ok((stat.st_uid, stat.st_gid))
    }

    /// `lstat` of the entry `name` of this directory (`None` when absent).
    pub fn stat_entry(&self, name: &OsStr) -> Result<Option<rustix::fs::Stat>, FsError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(io_err(e)).ctx("stat", &self.path.join(name)),
        }
    }

    /// `lstat` of `rel` (`None` when it or a directory on its way is absent).
    pub fn stat(&self, rel: &Path) -> Result<Option<rustix::fs::Stat>, FsError> {
        let (parent, name) = match self.parent_of(rel) {
            Ok(found) => found,
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        parent.stat_entry(name)
    }

    /// Creates the directory `rel` (whose parent must exist) owned as its parent, durable (parent fsynced). An
    /// existing directory is fine; anything else there (a symlink included) is an error. Either way what is
    /// there now is checked to be a real directory by opening it without following symlinks. Returns whether
    /// it was created.
    pub fn create_dir(&self, rel: &Path) -> Result<bool, FsError> {
        let (parent, name) = self.parent_of(rel)?;
        let created = match rustix::fs::mkdirat(&parent.fd, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(io_err(e)).ctx("create directory", &self.display_path(rel)),
        };
        let dir = parent.open_dir(Path::new(name))?;
        if created {
            let owner = parent.owner()?;
            if dir.owner()? != owner {
                rustix::fs::fchown(
                    &dir.fd,
                    Some(rustix::fs::Uid::from_raw(owner.0)),
                    Some(rustix::fs::Gid::from_raw(owner.1)),
                )
                .map_err(io_err)
                .ctx("chown", &self.display_path(rel))?;
            }
            parent.sync()?;
        }
        Ok(created)
    }

    /// Creates `rel` and its missing ancestors, each durable and checked as [`DirHandle::create_dir`] does.
    pub fn create_dir_all(&self, rel: &Path) -> Result<(), FsError> {
        let mut so_far = PathBuf::new();
        for part in rel.components() {
            so_far.push(part);
            self.create_dir(&so_far)?;
        }
        Ok(())
    }

    /// Removes the file or symlink `rel` (never a directory); absent, or a missing directory on its way, is fine.
    /// Returns the directory it was in (to fsync), when there was one.
    pub fn remove_file(&self, rel: &Path) -> Result<Option<DirHandle>, FsError> {
        let (parent, name) = match self.parent_of(rel) {
            Ok(found) => found,
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&parent.fd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(Some(parent)),
            Err(e) => Err(io_err(e)).ctx("remove", &self.display_path(rel)),
        }
    }

    /// Removes the directory `rel` if it is empty (a symlink there is left alone); true when removed, with its
    /// parent fsynced.
    pub fn remove_empty_dir(&self, rel: &Path) -> bool {
        let Ok((parent, name)) = self.parent_of(rel) else {
            return false;
        };
        rustix::fs::unlinkat(&parent.fd, name, AtFlags::REMOVEDIR).is_ok() && parent.sync().is_ok()
    }

    /// Renames `from` over `to`, both names in `dir` (a rename inside one directory).
    pub fn rename_in(dir: &DirHandle, from: &OsStr, to: &OsStr) -> Result<(), FsError> {
        rustix::fs::renameat(&dir.fd, from, &dir.fd, to)
            .map_err(io_err)
            .ctx("rename into place", &dir.path.join(to))
    }

    /// sha256 (hex) of `rel`'s content; for a symlink, of its target path string (it is not followed).
    pub fn sha256(&self, rel: &Path) -> Result<String, FsError> {
        let (parent, name) = self.parent_of(rel)?;
        let shown = self.display_path(rel);
        let stat = parent.stat_entry(name)?.ok_or_else(|| FsError {
            op: "open",
            path: shown.clone(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        if FileType::from_raw_mode(stat.st_mode) == FileType::Symlink {
            let target = rustix::fs::readlinkat(&parent.fd, name, Vec::new())
                .map_err(io_err)
                .ctx("read symlink", &shown)?;
            let digest = ring::digest::digest(&SHA256, target.as_bytes());
            return Ok(hex::encode(digest.as_ref()));
        }
        let fd = parent
            .open_below(Path::new(name), OFlags::RDONLY, Mode::empty())
            .ctx("open", &shown)?;
        hash_reader(File::from(fd), &shown)
    }
}

/// sha256 (hex) of everything `reader` yields.
fn hash_reader(mut reader: impl Read, shown: &Path) -> Result<String, FsError> {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).ctx("read", shown)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

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
/// the inode, writing into it changes the mtime, and any change to the inode at all (a write, a chmod, a
/// `touch` that sets the mtime back) changes the ctime, which no user can set. The ctime also changes when a
/// hard link is added or removed (backups, staging) or the file is renamed, which costs one more hashing: on any
/// doubt the file is hashed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl StatKey {
    fn of(meta: &fs::Metadata) -> Self {
        StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// Changed so shortly before `hashed_at` that a further change within the same timestamp tick could leave
    /// the key unchanged ("racily clean", as git calls it): such a hash is used once but not cached.
    fn is_racy(&self, hashed_at: std::time::SystemTime) -> bool {
        let Ok(since_epoch) = hashed_at.duration_since(std::time::UNIX_EPOCH) else {
            return true;
        };
        let hashed_ns = i128::try_from(since_epoch.as_nanos()).unwrap_or(i128::MAX);
        hashed_ns - self.ctime_ns.max(self.mtime_ns) < RACY_WINDOW_NS
    }
}

/// See [`StatKey::is_racy`]: one second, like git (a file system's timestamps may be that coarse).
const RACY_WINDOW_NS: i128 = 1_000_000_000;

/// sha256 of files by path, reused while the file's stat key (with its ctime) is unchanged, like git's index: a
/// file rewritten in place with its mtime set back has a new ctime and is hashed again.
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

    #[test]
    fn hash_cache_notices_an_in_place_rewrite_with_the_mtime_set_back() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"good").unwrap();
        let good = sha256_file(&path).unwrap();
        let cache = HashCache::default();
        cache.remember(&path, &good);
        assert_eq!(cache.sha256(&path).unwrap().as_deref(), Some(good.as_str()));
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        let mut file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all(b"evil").unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_eq!(
            cache.sha256(&path).unwrap(),
            Some(sha256_file(&path).unwrap())
        );
    }

    #[test]
    fn a_file_changed_just_now_is_hashed_but_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"fresh").unwrap();
        let cache = HashCache::default();
        assert_eq!(
            cache.sha256(&path).unwrap(),
            Some(sha256_file(&path).unwrap())
        );
        assert!(
            cache.entries.lock().unwrap().is_empty(),
            "racily clean: not cached"
        );
    }

    #[test]
    fn a_dir_handle_refuses_symlinks_and_never_copies_over_an_entry() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"outside").unwrap();
        fs::create_dir(dir.path().join("real")).unwrap();
        fs::write(dir.path().join("real/source"), b"new").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let handle = DirHandle::open_trusted(dir.path()).unwrap();
        // A symlinked directory on the way, or as the directory to create, is refused.
        let err = handle.open_dir(Path::new("link")).unwrap_err();
        assert_eq!(
            err.source.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{err}"
        );
        assert!(handle.create_dir(Path::new("link")).is_err());
        assert!(handle.open_dir(Path::new("real/../..")).is_err());
        let source = At {
            dir: &handle,
            rel: Path::new("real/source"),
        };
        let into_link = At {
            dir: &handle,
            rel: Path::new("link/victim"),
        };
        assert!(materialize_at(source, into_link, None, None).is_err());
        // A symlink at the temporary's own name is removed, never written through, even for a copy.
        std::os::unix::fs::symlink(outside.path().join("victim"), dir.path().join("real/temp"))
            .unwrap();
        let temp = At {
            dir: &handle,
            rel: Path::new("real/temp"),
        };
        materialize_at(source, temp, Some(0o640), Some((65534, 65534))).unwrap();
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"outside");
        let meta = fs::symlink_metadata(dir.path().join("real/temp")).unwrap();
        assert!(meta.is_file());
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (65534, 65534, 0o640)
        );
        assert_eq!(fs::read(dir.path().join("real/temp")).unwrap(), b"new");
        assert_eq!(
            handle.sha256(Path::new("real/temp")).unwrap(),
            sha256_file(&dir.path().join("real/source")).unwrap()
        );
    }

    #[test]
    fn the_walk_without_openat2_refuses_the_same_paths() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("a/link")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a/b/f"), dir.path().join("a/flink")).unwrap();
        let handle = DirHandle::open_trusted(dir.path()).unwrap();
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let file_flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let walk =
            |rel: &str, flags| handle.open_by_components(Path::new(rel), flags, Mode::empty());
        assert!(walk("a/b", dir_flags).is_ok());
        assert!(walk("", dir_flags).is_ok());
        assert!(walk("a/b/f", file_flags).is_ok());
        assert!(walk("a/link", dir_flags).is_err());
        assert!(walk("a/link/x", file_flags).is_err());
        assert!(walk("a/flink", file_flags).is_err());
        assert!(walk("a/../..", dir_flags).is_err());
    }
}
