//! Where upgrade steps may read and write: below the declared `[upgrade] roots`, and the agent's backup area
//! `<state_dir>/upgrade/`. A path is first checked lexically (clean absolute, strictly below a root), then every
//! access goes through a handle on the root (`DirHandle`: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), so
//! a symlink planted anywhere below a root is refused, never followed.

use super::error::UpgradeError;
use patchd_apply::fsutil::{DirHandle, FileType, FsError};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The backup area below `state_dir`.
pub const BACKUP_AREA: &str = "upgrade";

/// The declared roots and the state dir.
#[derive(Debug, Clone)]
pub struct Roots {
    roots: Vec<PathBuf>,
    state_dir: PathBuf,
}

impl Roots {
    pub fn new(roots: &[PathBuf], state_dir: &Path) -> Self {
        Roots {
            roots: roots.to_vec(),
            state_dir: state_dir.to_path_buf(),
        }
    }

    fn roots_text(&self) -> String {
        if self.roots.is_empty() {
            return "none declared".into();
        }
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The root `path` lies strictly below (lexically) and the path relative to it.
    fn split<'p>(&self, path: &'p Path, what: &str) -> Result<(&Path, &'p Path), UpgradeError> {
        if path.as_os_str().as_bytes().contains(&0) {
            return Err(UpgradeError::Invalid(format!(
                "{what} {path:?} holds a NUL byte: no file is named so; fix the runbook's path"
            )));
        }
        if !patchd_apply::confine::is_clean_absolute(path) {
            return Err(UpgradeError::Denied(format!(
                "{what} `{}` is not a clean absolute path (no `.`, `..` or relative parts); upgrade steps touch \
                 only paths under the declared roots ({})",
                path.display(),
                self.roots_text()
            )));
        }
        self.roots
            .iter()
            .find_map(|root| {
                path.strip_prefix(root)
                    .ok()
                    .filter(|rel| !rel.as_os_str().is_empty())
                    .map(|rel| (root.as_path(), rel))
            })
            .ok_or_else(|| {
                UpgradeError::Denied(format!(
                    "{what} {} lies outside the declared upgrade roots ({}): declare its directory in \
                     patchd.toml [upgrade] roots, or fix the runbook",
                    path.display(),
                    self.roots_text()
                ))
            })
    }

    /// A handle on the root `path` lies below and the rest of the path.
    pub fn locate(&self, path: &str, what: &str) -> Result<(DirHandle, PathBuf), UpgradeError> {
        let (root, rel) = self.split(Path::new(path), what)?;
        let handle = DirHandle::open_trusted(root).map_err(|e| fs_error(e, what))?;
        Ok((handle, rel.to_path_buf()))
    }

    /// `path` is under a root and no symlink lies on its way below the root (what does not exist yet is fine).
    pub fn check_path(&self, path: &str, what: &str) -> Result<(), UpgradeError> {
        let (root, rel) = self.locate(path, what)?;
        match root.stat(&rel) {
            Ok(Some(stat)) if FileType::from_raw_mode(stat.st_mode) == FileType::Symlink => {
                Err(symlink_refused(&root.display_path(&rel), what))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(fs_error(e, what)),
        }
    }

    /// The state dir, holding the backup area.
    pub fn state_handle(&self) -> Result<DirHandle, UpgradeError> {
        DirHandle::open_trusted(&self.state_dir).map_err(|e| fs_error(e, "the state directory"))
    }

    /// Where a backup of `source` by step `step` of upgrade `upgrade_id` goes, relative to the state dir:
    /// `upgrade/<upgrade_id>/<step>/<source without its leading />`.
    pub fn backup_rel(upgrade_id: &str, step: &str, source: &Path) -> PathBuf {
        let below = source.strip_prefix("/").unwrap_or(source);
        Path::new(BACKUP_AREA)
            .join(upgrade_id)
            .join(step)
            .join(below)
    }

    /// The absolute path of `rel` below the state dir (what a backup record names).
    pub fn state_path(&self, rel: &Path) -> PathBuf {
        self.state_dir.join(rel)
    }

    /// A handle and relative path for a file a backup record names: in the backup area, or under a root.
    pub fn locate_saved(&self, path: &str) -> Result<(DirHandle, PathBuf), UpgradeError> {
        let area = self.state_dir.join(BACKUP_AREA);
        let candidate = Path::new(path);
        if patchd_apply::confine::is_clean_absolute(candidate)
            && let Ok(rel) = candidate.strip_prefix(&area)
            && !rel.as_os_str().is_empty()
        {
            return Ok((self.state_handle()?, Path::new(BACKUP_AREA).join(rel)));
        }
        self.locate(path, "backup file").map_err(|error| match error {
            UpgradeError::Denied(_) => UpgradeError::Denied(format!(
                "backup file {path} lies neither in the agent's backup area ({}) nor under the declared upgrade \
                 roots ({}): restore only what a backup step recorded",
                area.display(),
                self.roots_text()
            )),
            other => other,
        })
    }
}

/// A symlink where upgrade steps were asked to read or write.
pub fn symlink_refused(path: &Path, what: &str) -> UpgradeError {
    UpgradeError::Denied(format!(
        "{what} {}: refused, a symlink lies on the path below the upgrade root (the agent never follows one); \
         replace it with the real file or directory",
        path.display()
    ))
}

/// A file-system failure in the words of the RPC: a symlink or escape is `PERMISSION_DENIED`, an absent file or
/// one that is not a regular file `FAILED_PRECONDITION`, anything else `INTERNAL`.
pub fn fs_error(error: FsError, what: &str) -> UpgradeError {
    match error.source.kind() {
        std::io::ErrorKind::PermissionDenied => UpgradeError::Denied(format!(
            "{what}: {error}; upgrade steps never follow a symlink below a declared root"
        )),
        std::io::ErrorKind::NotFound => UpgradeError::Precondition(format!(
            "{what}: {error}; check the path exists on this host"
        )),
        std::io::ErrorKind::InvalidInput => UpgradeError::Precondition(format!(
            "{what}: {error}; upgrade steps read and write regular files only (not a directory, pipe, socket \
             or device): fix the runbook's path"
        )),
        _ => UpgradeError::Internal(format!("{what}: {error}")),
    }
}
