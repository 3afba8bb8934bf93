//! Which files an apply or rollback changes, and the blocking file operations of each phase: prepare (backups
//! and temporaries, nothing live), swap (one rename per file), restore (put the backup back; idempotent).

use crate::confine::{Confinement, ConfinementError, is_clean_relative};
use crate::fsutil::{self, FsError, HashCache, IoContext};
use crate::journal::{FileChange, HistoryEntry};
use crate::spec::ServiceSpec;
use patchd_package::Manifest;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Planning failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Confinement(#[from] ConfinementError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("package path {path:?} is not a clean relative path; the package is refused")]
    BadPath { path: String },
    #[error("{} is a directory in the deploy dir but a file in the package; remove or rename it first", path.display())]
    TargetIsDirectory { path: PathBuf },
    #[error("nothing to roll back on service {service:?}: no committed patch is recorded")]
    NothingToRollBack { service: String },
    #[error(
        "patch {patch_id:?} is not in service {service:?}'s history (known: {known}); pass one of those or none for the last"
    )]
    UnknownPatch {
        service: String,
        patch_id: String,
        known: String,
    },
    #[error(
        "cannot roll back past patch {patch_id:?}: its backup was pruned (only the last keep_backups are kept); roll back to a later patch"
    )]
    BackupPruned { patch_id: String },
    #[error("backup {} of patch {patch_id:?} is damaged: {detail}; it cannot be restored", path.display())]
    BackupDamaged {
        patch_id: String,
        path: PathBuf,
        detail: String,
    },
}

/// `<backup_dir>/<index>-<file name>`: flat, so preparing a backup set creates one directory (the journal maps
/// each backup to its target).
pub fn backup_path(backup_dir: &Path, index: usize, rel: &Path) -> PathBuf {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    backup_dir.join(format!("{index}-{name}"))
}

/// The temporary holding the new content of `target` for apply `patch_id`.
pub fn new_temp(target: &Path, patch_id: &str) -> PathBuf {
    fsutil::sibling_temp(target, &format!("patchd-{patch_id}.new"))
}

/// The temporary used to restore `target` during a revert of apply `patch_id`.
pub fn restore_temp(target: &Path, patch_id: &str) -> PathBuf {
    fsutil::sibling_temp(target, &format!("patchd-{patch_id}.restore"))
}

/// sha256 and mode of what is at `target` now (`None` when absent); a directory there is an error.
fn current_state(
    hashes: &HashCache,
    target: &Path,
) -> Result<Option<(String, Option<u32>)>, PlanError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::symlink_metadata(target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(FsError {
                op: "stat",
                path: target.to_path_buf(),
                source: e,
            }
            .into());
        }
    };
    if meta.is_dir() {
        return Err(PlanError::TargetIsDirectory {
            path: target.to_path_buf(),
        });
    }
    let mode = (!meta.file_type().is_symlink()).then(|| meta.permissions().mode() & 0o7777);
    Ok(hashes.sha256(target)?.map(|sha| (sha, mode)))
}

/// Directories that must be created for `targets`, parents first.
fn missing_dirs(deploy_dir: &Path, targets: &[PathBuf]) -> Vec<PathBuf> {
    let mut missing = BTreeSet::new();
    for target in targets {
        let mut dir = target.parent();
        while let Some(d) = dir {
            if !d.starts_with(deploy_dir) || fsutil::exists_no_follow(d) {
                break;
            }
            missing.insert(d.to_path_buf());
            dir = d.parent();
        }
    }
    // BTreeSet order puts every parent before its children.
    missing.into_iter().collect()
}

/// The files a staged package changes in the service's deploy dir, and the directories to create.
pub fn plan_patch(
    spec: &ServiceSpec,
    confine: &Confinement,
    hashes: &HashCache,
    staged_files: &Path,
    manifest: &Manifest,
    patch_id: &str,
    backup_dir: &Path,
) -> Result<(Vec<FileChange>, Vec<PathBuf>), PlanError> {
    confine.check_deploy_dir(&spec.deploy_dir)?;
    let install_dir = spec.install_dir();
    let entries = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), Some(f.sha256.clone()), Some(f.mode)))
        .chain(
            manifest
                .symlinks
                .iter()
                .map(|l| (l.path.as_str(), None, None)),
        );
    let mut changes = Vec::new();
    for (path, sha256, mode) in entries {
        let package_rel = Path::new(path);
        if !is_clean_relative(package_rel) {
            return Err(PlanError::BadPath {
                path: path.to_string(),
            });
        }
        let rel = install_dir.join(package_rel);
        let target = spec.deploy_dir.join(&rel);
        confine.check_target(&spec.deploy_dir, &target)?;
        let source = staged_files.join(package_rel);
        let new_sha256 = match sha256 {
            Some(sha) => sha,
            None => fsutil::sha256_file(&source)?,
        };
        let current = current_state(hashes, &target)?;
        if let Some((sha, current_mode)) = &current
            && *sha == new_sha256
            && (mode.is_none() || *current_mode == mode)
        {
            continue;
        }
        let index = changes.len();
        changes.push(FileChange {
            backup: current
                .as_ref()
                .map(|_| backup_path(backup_dir, index, &rel)),
            old_sha256: current.map(|(sha, _)| sha),
            temp: new_temp(&target, patch_id),
            rel,
            target,
            source: Some(source),
            new_sha256: Some(new_sha256),
            mode,
        });
    }
    let targets: Vec<PathBuf> = changes.iter().map(|c| c.target.clone()).collect();
    Ok((changes, missing_dirs(&spec.deploy_dir, &targets)))
}

/// What undoing `history[from..]` changes: per file, the content before the first of those patches touched it.
pub fn plan_rollback(
    spec: &ServiceSpec,
    confine: &Confinement,
    hashes: &HashCache,
    undo: &[HistoryEntry],
    rollback_id: &str,
    backup_dir: &Path,
) -> Result<(Vec<FileChange>, Vec<PathBuf>), PlanError> {
    confine.check_deploy_dir(&spec.deploy_dir)?;
    let mut seen = BTreeSet::new();
    let mut changes = Vec::new();
    for entry in undo {
        for change in &entry.files {
            if !seen.insert(change.rel.clone()) {
                continue;
            }
            if !is_clean_relative(&change.rel) {
                return Err(PlanError::BadPath {
                    path: change.rel.display().to_string(),
                });
            }
            let target = spec.deploy_dir.join(&change.rel);
            confine.check_target(&spec.deploy_dir, &target)?;
            if let (Some(backup), Some(expected)) = (&change.backup, &change.old_sha256) {
                let found = fsutil::sha256_file(backup).map_err(|e| PlanError::BackupDamaged {
                    patch_id: entry.patch_id.clone(),
                    path: backup.clone(),
                    detail: e.to_string(),
                })?;
                if found != *expected {
                    return Err(PlanError::BackupDamaged {
                        patch_id: entry.patch_id.clone(),
                        path: backup.clone(),
                        detail: format!("sha256 is {found}, expected {expected}"),
                    });
                }
            }
            let current = current_state(hashes, &target)?;
            if current.as_ref().map(|(sha, _)| sha) == change.old_sha256.as_ref() {
                continue;
            }
            let index = changes.len();
            changes.push(FileChange {
                rel: change.rel.clone(),
                temp: new_temp(&target, rollback_id),
                backup: current
                    .as_ref()
                    .map(|_| backup_path(backup_dir, index, &change.rel)),
                old_sha256: current.map(|(sha, _)| sha),
                target,
                source: change.backup.clone(),
                new_sha256: change.old_sha256.clone(),
                mode: None,
            });
        }
    }
    let targets: Vec<PathBuf> = changes.iter().map(|c| c.target.clone()).collect();
    Ok((changes, missing_dirs(&spec.deploy_dir, &targets)))
}

/// Creates missing directories, the backups of the current files and the temporaries of the new ones, all
/// durable. Nothing live changes: only new names appear. Each new regular file is hashed (through `hashes`, so
/// the swap can carry the computed hash over to its target) and must match the plan: a staged file shares its
/// inode with earlier deployments, so an in-place edit of a deployed file would otherwise be deployed again.
pub fn prepare(
    files: &[FileChange],
    created_dirs: &[PathBuf],
    hashes: &HashCache,
) -> Result<(), FsError> {
    crate::space::ensure_copies_fit(files)?;
    for dir in created_dirs {
        fsutil::create_dir_durable(dir)?;
    }
    let mut dirs_to_sync = BTreeSet::new();
    for change in files {
        if let Some(backup) = &change.backup {
            let dir = fsutil::parent_of(backup)?;
            fsutil::create_dir_all_durable(dir)?;
            fsutil::materialize(&change.target, backup, None)?;
            dirs_to_sync.insert(dir.to_path_buf());
        }
        if let Some(source) = &change.source {
            fsutil::materialize(source, &change.temp, change.mode)?;
            dirs_to_sync.insert(fsutil::parent_of(&change.temp)?.to_path_buf());
            verify_temp(change, source, hashes)?;
        }
    }
    for dir in dirs_to_sync {
        fsutil::fsync_dir(&dir)?;
    }
    Ok(())
}

/// Checks the temporary of a new regular file holds the planned content.
fn verify_temp(change: &FileChange, source: &Path, hashes: &HashCache) -> Result<(), FsError> {
    let Some(expected) = &change.new_sha256 else {
        return Ok(());
    };
    let meta = std::fs::symlink_metadata(&change.temp).ctx("stat", &change.temp)?;
    if !meta.file_type().is_file() {
        return Ok(());
    }
    match hashes.sha256(&change.temp)? {
        Some(found) if found == *expected => Ok(()),
        found => Err(FsError {
            op: "verify",
            path: source.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "sha256 is {} but the plan expects {expected}: the file changed after it was staged or \
                     backed up (e.g. a deployed copy edited in place); stage the package again",
                    found.as_deref().unwrap_or("absent")
                ),
            ),
        }),
    }
}

/// Puts the new content of one file in place (one rename), or removes the file when the change removes it.
/// Not yet durable: [`sync_target_dirs`] makes every swap durable before the apply goes on (recovery restores
/// all files whatever a crash left, so per-file durability is not needed).
pub fn swap_one(change: &FileChange) -> Result<(), FsError> {
    match &change.source {
        Some(_) => {
            std::fs::rename(&change.temp, &change.target).ctx("rename into place", &change.target)
        }
        None => fsutil::remove_if_exists(&change.target),
    }
}

/// fsync of every directory a swap changed (once each).
pub fn sync_target_dirs(files: &[FileChange]) -> Result<(), FsError> {
    let dirs: BTreeSet<&Path> = files.iter().filter_map(|c| c.target.parent()).collect();
    for dir in dirs {
        fsutil::fsync_dir(dir)?;
    }
    Ok(())
}

/// Puts the old content of one file back (or removes a file the apply added). Safe to repeat, whatever the
/// file's current state.
pub fn restore_one(change: &FileChange, patch_id: &str) -> Result<(), FsError> {
    match &change.backup {
        Some(backup) => {
            fsutil::place(
                backup,
                &restore_temp(&change.target, patch_id),
                &change.target,
                None,
            )?;
        }
        None => {
            fsutil::remove_if_exists(&change.target)?;
            fsutil::fsync_dir(fsutil::parent_of(&change.target)?)?;
        }
    }
    fsutil::remove_if_exists(&change.temp)
}

/// Removes temporaries an apply left (after commit or revert nothing of them is needed).
pub fn remove_temps(files: &[FileChange], patch_id: &str) {
    for change in files {
        let _ = fsutil::remove_if_exists(&change.temp);
        let _ = fsutil::remove_if_exists(&restore_temp(&change.target, patch_id));
    }
}

/// Removes the directories an apply created, children first, when they are empty again.
pub fn remove_created_dirs(created_dirs: &[PathBuf]) {
    for dir in created_dirs.iter().rev() {
        if std::fs::remove_dir(dir).is_ok()
            && let Some(parent) = dir.parent()
        {
            let _ = fsutil::fsync_dir(parent);
        }
    }
}
