//! Held directory handles ([`DirHandle`]): every lookup below one stays below it and refuses symlinks (`openat2`
//! with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or a component walk where `openat2` is denied).

use super::{FsError, IoContext, hash_reader, io_err};
use patchd_package::ContentAlgorithm;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// A directory held open. Every path below it is resolved by the kernel with `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)`, so no `..`, absolute path or symlink anywhere in it (the last component included) can
/// lead out, whatever a local user who can write the directory swaps in between two steps; names are then
/// changed with `*at` calls relative to the freshly resolved parent, which never follow a last-component
/// symlink either.
#[derive(Debug)]
pub struct DirHandle {
    pub(super) fd: OwnedFd,
    /// For messages only: nothing is ever resolved through it.
    path: PathBuf,
}

/// Owner and group of a file.
pub type Owner = (u32, u32);

/// `openat2` resolution that stays below the handle and refuses every symlink.
fn confined() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
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
    pub(super) fn open_below(
        &self,
        rel: &Path,
        flags: OFlags,
        mode: Mode,
    ) -> std::io::Result<OwnedFd> {
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
    pub(super) fn open_by_components(
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

    /// Opens the regular file `rel` for reading (no symlink anywhere on its way, the last component included).
    /// `O_NONBLOCK` so a FIFO planted there is refused at once instead of blocking until a writer comes (it
    /// changes nothing for a regular file).
    pub fn open_file(&self, rel: &Path) -> Result<File, FsError> {
        let fd = self
            .open_below(rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
            .ctx("open", &self.display_path(rel))?;
        let file = File::from(fd);
        let is_file = file
            .metadata()
            .ctx("stat", &self.display_path(rel))?
            .is_file();
        if !is_file {
            return Err(FsError {
                op: "open",
                path: self.display_path(rel),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        Ok(file)
    }

    /// Creates the file `rel` for writing with `mode`, refusing anything already there (`O_CREAT | O_EXCL |
    /// O_NOFOLLOW`): a write never lands in an existing file or through a planted symlink.
    pub fn create_new_file(&self, rel: &Path, mode: u32) -> Result<File, FsError> {
        let fd = self
            .open_below(
                rel,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                Mode::from_raw_mode(mode),
            )
            .ctx("create", &self.display_path(rel))?;
        Ok(File::from(fd))
    }

    /// The entries of this directory (without `.` and `..`), each with its file type as `lstat` sees it.
    pub fn entries(&self) -> Result<Vec<(std::ffi::OsString, FileType)>, FsError> {
        let dir = rustix::fs::Dir::read_from(&self.fd)
            .map_err(io_err)
            .ctx("read directory", &self.path)?;
        let mut out = Vec::new();
        for entry in dir {
            let entry = entry.map_err(io_err).ctx("read directory", &self.path)?;
            let name = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
            if name == "." || name == ".." {
                continue;
            }
            let kind = match self.stat_entry(&name)? {
                Some(stat) => FileType::from_raw_mode(stat.st_mode),
                None => continue,
            };
            out.push((name, kind));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The `algorithm` digest of `rel`'s content; for a symlink, of its target path string (it is not followed).
    pub fn digest(&self, rel: &Path, algorithm: ContentAlgorithm) -> Result<String, FsError> {
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
            return Ok(algorithm.digest(target.as_bytes()));
        }
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(FsError {
                op: "hash",
                path: shown,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let fd = parent
            .open_below(
                Path::new(name),
                OFlags::RDONLY | OFlags::NONBLOCK,
                Mode::empty(),
            )
            .ctx("open", &shown)?;
        hash_reader(File::from(fd), algorithm, &shown)
    }
}
