//! Which files an apply or rollback changes, and the blocking file operations of each phase: prepare (backups
//! and temporaries, nothing live), swap (one rename per file), restore (put the backup back after checking it;
//! idempotent). Every file operation goes through directory handles ([`Sites`]) that refuse symlinks and `..`.

use crate::confine::{Confinement, ConfinementError, is_clean_relative};
use crate::effects::{FaultHook, FaultPoint, SimulatedCrash};
use crate::fsutil::{self, At, DirHandle, FsError, HashCache};
use crate::journal::{FileChange, HistoryEntry};
use crate::spec::ServiceSpec;
use crate::staged_identity::{self, FileIdentity, Identities};
use patchd_package::{ContentAlgorithm, Manifest};
use rustix::fs::FileType;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// The `algorithm` digest and the mode of what is at `target` now (`None` when absent); a directory there is an
/// error.
fn current_state(
    hashes: &HashCache,
    target: &Path,
    algorithm: ContentAlgorithm,
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
    Ok(hashes
        .digest(target, algorithm)?
        .map(|digest| (digest, mode)))
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
    // Deployed files are compared in the package's own algorithm, so an unchanged file is recognised whatever
    // the format of the package that deployed it.
    let algorithm = manifest.content_algorithm();
    let entries = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), Some(f.digest.clone()), Some(f.mode)))
        .chain(
            manifest
                .symlinks
                .iter()
                .map(|l| (l.path.as_str(), None, None)),
        );
    let mut changes = Vec::new();
    for (path, digest, mode) in entries {
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
        let new_digest = match digest {
            Some(digest) => digest,
            None => fsutil::digest_file(&source, algorithm)?,
        };
        let current = current_state(hashes, &target, algorithm)?;
        if let Some((digest, current_mode)) = &current
            && *digest == new_digest
            && (mode.is_none() || *current_mode == mode)
        {
            continue;
        }
        let index = changes.len();
        changes.push(FileChange {
            backup: current
                .as_ref()
                .map(|_| backup_path(backup_dir, index, &rel)),
            old_digest: current.map(|(digest, _)| digest),
            temp: new_temp(&target, patch_id),
            rel,
            target,
            source: Some(source),
            new_digest: Some(new_digest),
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
            // What the patch recorded is compared in the algorithm it was recorded in.
            let algorithm = change
                .old_digest
                .as_deref()
                .map_or(ContentAlgorithm::CURRENT, ContentAlgorithm::of);
            if let (Some(backup), Some(expected)) = (&change.backup, &change.old_digest) {
                let found = fsutil::digest_file(backup, algorithm).map_err(|e| {
                    PlanError::BackupDamaged {
                        patch_id: entry.patch_id.clone(),
                        path: backup.clone(),
                        detail: e.to_string(),
                    }
                })?;
                if found != *expected {
                    return Err(PlanError::BackupDamaged {
                        patch_id: entry.patch_id.clone(),
                        path: backup.clone(),
                        detail: format!("digest is {found}, expected {expected}"),
                    });
                }
            }
            let current = current_state(hashes, &target, algorithm)?;
            if current.as_ref().map(|(digest, _)| digest) == change.old_digest.as_ref() {
                continue;
            }
            let index = changes.len();
            changes.push(FileChange {
                rel: change.rel.clone(),
                temp: new_temp(&target, rollback_id),
                backup: current
                    .as_ref()
                    .map(|_| backup_path(backup_dir, index, &change.rel)),
                old_digest: current.map(|(digest, _)| digest),
                target,
                source: change.backup.clone(),
                new_digest: change.old_digest.clone(),
                mode: None,
            });
        }
    }
    let targets: Vec<PathBuf> = changes.iter().map(|c| c.target.clone()).collect();
    Ok((changes, missing_dirs(&spec.deploy_dir, &targets)))
}

/// A step of the file work failed, or a test hook simulated a crash in it.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Crash(#[from] SimulatedCrash),
}

/// Where an apply's files are: the service's deploy dir and the agent's state dir, each reached only through a
/// directory handle opened afresh by every step (so nothing swapped in between two steps is trusted), and the
/// fault hook of the steps about a path.
#[derive(Debug, Clone)]
pub struct Sites {
    pub deploy_dir: PathBuf,
    pub state_dir: PathBuf,
    pub confine: Confinement,
    pub faults: Arc<dyn FaultHook>,
}

/// The two directory handles of one step.
struct Handles {
    deploy: DirHandle,
    state: DirHandle,
}

impl Sites {
    fn open(&self) -> Result<Handles, FsError> {
        Ok(Handles {
            deploy: self.confine.open_deploy_dir(&self.deploy_dir)?,
            state: DirHandle::open_trusted(&self.state_dir)?,
        })
    }

    /// `path` relative to the deploy dir (it must be a clean path below it).
    fn deploy_rel<'p>(&self, path: &'p Path) -> Result<&'p Path, FsError> {
        relative_below(&self.deploy_dir, path)
    }

    /// `path` relative to the state dir (it must be a clean path below it).
    fn state_rel<'p>(&self, path: &'p Path) -> Result<&'p Path, FsError> {
        relative_below(&self.state_dir, path)
    }
}

/// `path` relative to `base`, refused unless it is a clean relative path below it.
fn relative_below<'p>(base: &Path, path: &'p Path) -> Result<&'p Path, FsError> {
    match path.strip_prefix(base) {
        Ok(rel) if is_clean_relative(rel) => Ok(rel),
        _ => Err(FsError {
            op: "refuse",
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("the path lies outside {}", base.display()),
            ),
        }),
    }
}

/// The error of a file whose content is not what the journal recorded.
fn not_as_recorded(path: &Path, found: &str, expected: &str, what: &str) -> FsError {
    FsError {
        op: "verify",
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("digest is {found} but {expected} was recorded: {what}"),
        ),
    }
}

/// Creates missing directories (each checked to be a real directory, owned as its parent), the backups of the
/// current files (each checked against the digest the plan recorded; a hard link of the very version the plan
/// hashed is not read again) and the temporaries of the new ones (owned
/// as the file they replace, or as their directory), all durable, every one through a directory handle. Nothing
/// live changes: only new names appear. Each new regular file must match the plan: a staged file shares its
/// inode with earlier deployments, so an in-place edit of a deployed file would otherwise be deployed again. It
/// is hashed, unless it is a hard link of a staged file whose identity is still the one stage recorded after
/// verifying it ([`staged_identity`]): then its bytes are the verified ones.
pub fn prepare(
    sites: &Sites,
    hashes: &HashCache,
    files: &[FileChange],
    created_dirs: &[PathBuf],
) -> Result<Vec<VerifiedTemp>, StepError> {
    crate::space::ensure_copies_fit(files)?;
    // A deploy dir that does not exist yet is created first, from its deploy root.
    if created_dirs.contains(&sites.deploy_dir) {
        sites.confine.create_deploy_dir(&sites.deploy_dir)?;
        sites
            .faults
            .hit_at(FaultPoint::AfterCreateDir, &sites.deploy_dir)?;
    }
    let handles = sites.open()?;
    for dir in created_dirs.iter().filter(|dir| **dir != sites.deploy_dir) {
        handles.deploy.create_dir(sites.deploy_rel(dir)?)?;
        sites.faults.hit_at(FaultPoint::AfterCreateDir, dir)?;
    }
    let mut dirs_to_sync: BTreeMap<PathBuf, DirHandle> = BTreeMap::new();
    let mut records: BTreeMap<PathBuf, Identities> = BTreeMap::new();
    let mut verified_temps = Vec::new();
    for change in files {
        let target_rel = sites.deploy_rel(&change.target)?;
        if let Some(backup) = &change.backup {
            let backup_rel = sites.state_rel(backup)?;
            if let Some(parent) = backup_rel.parent() {
                handles.state.create_dir_all(parent)?;
            }
            let before = handles.deploy.stat(target_rel)?;
            let dir = fsutil::materialize_at(
                At {
                    dir: &handles.deploy,
                    rel: target_rel,
                },
                At {
                    dir: &handles.state,
                    rel: backup_rel,
                },
                None,
                None,
            )?;
            dirs_to_sync.insert(dir.path().to_path_buf(), dir);
            sites.faults.hit_at(FaultPoint::AfterBackup, backup)?;
            if let Some(expected) = &change.old_digest
                && !backup_vouched(
                    &handles,
                    hashes,
                    change,
                    before.as_ref(),
                    backup_rel,
                    expected,
                )?
            {
                let found = handles
                    .state
                    .digest(backup_rel, ContentAlgorithm::of(expected))?;
                if found != *expected {
                    return Err(not_as_recorded(
                        backup,
                        &found,
                        expected,
                        "the file changed while it was backed up, or the backup was replaced; apply again",
                    )
                    .into());
                }
            }
        }
        if let Some(source) = &change.source {
            let temp_rel = sites.deploy_rel(&change.temp)?;
            let source_rel = sites.state_rel(source)?;
            let owner = fsutil::owner_for(&handles.deploy, target_rel)?;
            let verified = unchanged_since_stage(&handles.state, source_rel, &mut records)?;
            let dir = fsutil::materialize_at(
                At {
                    dir: &handles.state,
                    rel: source_rel,
                },
                At {
                    dir: &handles.deploy,
                    rel: temp_rel,
                },
                change.mode,
                Some(owner),
            )?;
            dirs_to_sync.insert(dir.path().to_path_buf(), dir);
            let linked_verified = match (verified, handles.deploy.stat(temp_rel)?) {
                (Some(verified), Some(temp)) => {
                    let temp = FileIdentity::of_stat(&temp);
                    let same = verified.same_content_as(&temp);
                    if same && let Some(digest) = &change.new_digest {
                        verified_temps.push(VerifiedTemp {
                            target: change.target.clone(),
                            identity: temp,
                            digest: digest.clone(),
                        });
                    }
                    same
                }
                _ => false,
            };
            if !linked_verified
                && let Some(hashed) = verify_temp(&handles.deploy, temp_rel, change, source)?
            {
                verified_temps.push(hashed);
            }
        }
    }
    for dir in dirs_to_sync.values() {
        dir.sync()?;
    }
    Ok(verified_temps)
}

/// A new file's temporary whose content is known to be `digest` while its inode keeps `identity`'s size and
/// mtime: a hard link of the staged file stage verified, or a temporary hashed in [`prepare`].
#[derive(Debug, Clone)]
pub struct VerifiedTemp {
    pub target: PathBuf,
    pub identity: FileIdentity,
    pub digest: String,
}

/// After the swap, records in `hashes` the content of each target that is still the verified temporary renamed
/// into place (same inode, size and mtime), so that the next plan, status or backup of it reads nothing: the
/// rename and the link changed its ctime, so the cache would otherwise hash it again. Best effort.
pub fn remember_swapped(sites: &Sites, hashes: &HashCache, verified: &[VerifiedTemp]) {
    let Ok(deploy) = sites.confine.open_deploy_dir(&sites.deploy_dir) else {
        return;
    };
    for temp in verified {
        let Ok(rel) = sites.deploy_rel(&temp.target) else {
            continue;
        };
        if let Ok(Some(now)) = deploy.stat(rel)
            && temp.identity.same_content_as(&FileIdentity::of_stat(&now))
        {
            hashes.vouch(&temp.target, &now, &temp.digest);
        }
    }
}

/// Whether the backup just made at `backup_rel` is known to hold `expected` without reading it: it is a hard link
/// of the deployed file, whose version seen right before linking (`before`) is the one the plan hashed (the hash
/// cache's record for the target, ctime included). Linking changes only the ctime, so the backup must show the
/// same inode, size and mtime; anything else (a copy, a change in between) is hashed.
fn backup_vouched(
    handles: &Handles,
    hashes: &HashCache,
    change: &FileChange,
    before: Option<&rustix::fs::Stat>,
    backup_rel: &Path,
    expected: &str,
) -> Result<bool, FsError> {
    let Some(before) = before else {
        return Ok(false);
    };
    if hashes
        .recorded(&change.target, before, ContentAlgorithm::of(expected))
        .as_deref()
        != Some(expected)
    {
        return Ok(false);
    }
    let Some(backup) = handles.state.stat(backup_rel)? else {
        return Ok(false);
    };
    Ok(FileIdentity::of_stat(before).same_content_as(&FileIdentity::of_stat(&backup)))
}

/// The identity of the staged file `source_rel` when it is exactly what stage verified and recorded (so its
/// content is the manifest's, which the plan took its digest from); `None` means it must be hashed.
fn unchanged_since_stage(
    state: &DirHandle,
    source_rel: &Path,
    records: &mut BTreeMap<PathBuf, Identities>,
) -> Result<Option<FileIdentity>, FsError> {
    let Some((staged_rel, package_path)) = staged_identity::staged_source(source_rel) else {
        return Ok(None);
    };
    let record = records
        .entry(staged_rel.clone())
        .or_insert_with(|| staged_identity::load(state, &staged_rel));
    let Some(recorded) = record.get(&package_path) else {
        return Ok(None);
    };
    let now = state
        .stat(source_rel)?
        .map(|stat| FileIdentity::of_stat(&stat));
    Ok((now.as_ref() == Some(recorded)).then_some(*recorded))
}

/// Checks the temporary of a new regular file holds the planned content (hashed through the handle). Returns it
/// as verified when its identity did not move while it was hashed.
fn verify_temp(
    deploy: &DirHandle,
    temp_rel: &Path,
    change: &FileChange,
    source: &Path,
) -> Result<Option<VerifiedTemp>, FsError> {
    let Some(expected) = &change.new_digest else {
        return Ok(None);
    };
    let Some(before) = deploy
        .stat(temp_rel)?
        .filter(|stat| FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile)
    else {
        return Ok(None);
    };
    let found = deploy.digest(temp_rel, ContentAlgorithm::of(expected))?;
    if found == *expected {
        let identity = FileIdentity::of_stat(&before);
        let unmoved = deploy
            .stat(temp_rel)?
            .is_some_and(|after| FileIdentity::of_stat(&after) == identity);
        return Ok(unmoved.then(|| VerifiedTemp {
            target: change.target.clone(),
            identity,
            digest: found,
        }));
    }
    Err(not_as_recorded(
        source,
        &found,
        expected,
        "the file changed after it was staged or backed up (e.g. a deployed copy edited in place); stage the \
         package again",
    ))
}

/// The directory of `rel` below `deploy` (opened) and the names of `rel` and of `temp` in it.
fn target_and_temp<'p>(
    sites: &Sites,
    deploy: &DirHandle,
    change: &'p FileChange,
) -> Result<(DirHandle, &'p std::ffi::OsStr, &'p std::ffi::OsStr), FsError> {
    let target_rel = sites.deploy_rel(&change.target)?;
    let temp_rel = sites.deploy_rel(&change.temp)?;
    let (dir, target_name) = deploy.parent_of(target_rel)?;
    match temp_rel.file_name() {
        Some(temp_name) if temp_rel.parent() == target_rel.parent() => {
            Ok((dir, target_name, temp_name))
        }
        _ => Err(FsError {
            op: "refuse",
            path: change.temp.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a temporary must lie next to its target",
            ),
        }),
    }
}

/// Puts the new content of one file in place (one rename), or removes the file when the change removes it.
/// Not yet durable: [`sync_target_dirs`] makes every swap durable before the apply goes on (recovery restores
/// all files whatever a crash left, so per-file durability is not needed).
pub fn swap_one(sites: &Sites, change: &FileChange) -> Result<(), StepError> {
    let deploy = sites.confine.open_deploy_dir(&sites.deploy_dir)?;
    let (dir, target_name, temp_name) = target_and_temp(sites, &deploy, change)?;
    match &change.source {
        Some(_) => DirHandle::rename_in(&dir, temp_name, target_name)?,
        None => {
            deploy.remove_file(sites.deploy_rel(&change.target)?)?;
        }
    }
    Ok(())
}

/// fsync of every directory a swap changed (once each).
pub fn sync_target_dirs(sites: &Sites, files: &[FileChange]) -> Result<(), StepError> {
    let deploy = sites.confine.open_deploy_dir(&sites.deploy_dir)?;
    let mut dirs = BTreeSet::new();
    for change in files {
        dirs.insert(
            sites
                .deploy_rel(&change.target)?
                .parent()
                .unwrap_or(Path::new("")),
        );
    }
    for dir in dirs {
        deploy.open_dir(dir)?.sync()?;
    }
    Ok(())
}

/// Puts the old content of one file back (or removes a file the apply added), through the directory handles.
/// Safe to repeat, whatever the file's current state. A backup whose digest is not the one recorded when it was
/// taken is refused: the file keeps its current content and the error says so.
pub fn restore_one(sites: &Sites, change: &FileChange, patch_id: &str) -> Result<(), StepError> {
    if let Some(dir) = change.target.parent() {
        sites.faults.hit_at(FaultPoint::BeforeRestore, dir)?;
    }
    let handles = sites.open()?;
    match &change.backup {
        Some(backup) => {
            let backup_rel = sites.state_rel(backup)?;
            if let Some(expected) = &change.old_digest {
                let found = handles
                    .state
                    .digest(backup_rel, ContentAlgorithm::of(expected))?;
                if found != *expected {
                    return Err(not_as_recorded(
                        backup,
                        &found,
                        expected,
                        &format!(
                            "the backup was tampered with, so it was not restored; {} keeps its new content: put \
                             the old file back by hand",
                            change.target.display()
                        ),
                    )
                    .into());
                }
            }
            let temp = restore_temp(&change.target, patch_id);
            let temp_rel = sites.deploy_rel(&temp)?;
            fsutil::materialize_at(
                At {
                    dir: &handles.state,
                    rel: backup_rel,
                },
                At {
                    dir: &handles.deploy,
                    rel: temp_rel,
                },
                None,
                None,
            )?;
            let restoring = FileChange {
                temp: temp.clone(),
                ..change.clone()
            };
            let (dir, target_name, temp_name) =
                target_and_temp(sites, &handles.deploy, &restoring)?;
            DirHandle::rename_in(&dir, temp_name, target_name)?;
            dir.sync()?;
        }
        None => {
            if let Some(dir) = handles
                .deploy
                .remove_file(sites.deploy_rel(&change.target)?)?
            {
                dir.sync()?;
            }
        }
    }
    handles
        .deploy
        .remove_file(sites.deploy_rel(&change.temp)?)?;
    Ok(())
}

/// Removes temporaries an apply left (after commit or revert nothing of them is needed); best effort.
pub fn remove_temps(sites: &Sites, files: &[FileChange], patch_id: &str) {
    let Ok(deploy) = sites.confine.open_deploy_dir(&sites.deploy_dir) else {
        return;
    };
    for change in files {
        for temp in [change.temp.clone(), restore_temp(&change.target, patch_id)] {
            if let Ok(rel) = sites.deploy_rel(&temp) {
                let _ = deploy.remove_file(rel);
            }
        }
    }
}

/// Removes the directories an apply created, children first, when they are empty again (a symlink that took
/// one's place is left alone).
pub fn remove_created_dirs(sites: &Sites, created_dirs: &[PathBuf]) {
    if let Ok(deploy) = sites.confine.open_deploy_dir(&sites.deploy_dir) {
        for dir in created_dirs.iter().rev() {
            if let Ok(rel) = sites.deploy_rel(dir) {
                deploy.remove_empty_dir(rel);
            }
        }
    }
    if created_dirs.contains(&sites.deploy_dir) {
        sites.confine.remove_deploy_dir_if_empty(&sites.deploy_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::NoFaults;
    use patchd_package::ContentAlgorithm;

    /// A deployed file `bin/file` ("old") with a staged replacement ("new"), and the change that backs it up.
    fn backed_up_change(dir: &Path) -> (Sites, FileChange) {
        let root = dir.join("opt");
        let state = dir.join("state");
        let deploy_dir = root.join("svc");
        std::fs::create_dir_all(deploy_dir.join("bin")).unwrap();
        std::fs::create_dir_all(state.join("staging/x")).unwrap();
        std::fs::write(deploy_dir.join("bin/file"), b"old").unwrap();
        std::fs::write(state.join("staging/x/file"), b"new").unwrap();
        let target = deploy_dir.join("bin/file");
        let change = FileChange {
            rel: PathBuf::from("bin/file"),
            temp: new_temp(&target, "p1"),
            target: target.clone(),
            source: Some(state.join("staging/x/file")),
            new_digest: Some(
                fsutil::digest_file(&state.join("staging/x/file"), ContentAlgorithm::CURRENT)
                    .unwrap(),
            ),
            mode: Some(0o644),
            old_digest: Some(fsutil::digest_file(&target, ContentAlgorithm::CURRENT).unwrap()),
            backup: Some(backup_path(
                &state.join("backups/p1"),
                0,
                Path::new("bin/file"),
            )),
        };
        let sites = Sites {
            deploy_dir,
            state_dir: state,
            confine: Confinement::new(std::slice::from_ref(&root)),
            faults: Arc::new(NoFaults),
        };
        (sites, change)
    }

    #[test]
    fn a_backup_linked_from_the_version_the_plan_hashed_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (sites, mut change) = backed_up_change(dir.path());
        // The cache vouches for a digest the bytes do not have: only a backup taken on the cache's word passes.
        let vouched = "ab".repeat(32);
        let hashes = HashCache::default();
        hashes.remember(&change.target, &vouched);
        change.old_digest = Some(vouched);
        prepare(&sites, &hashes, std::slice::from_ref(&change), &[]).unwrap();
        let backup = change.backup.as_ref().unwrap();
        assert_eq!(std::fs::read(backup).unwrap(), b"old");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(backup).unwrap().ino(),
            std::fs::metadata(&change.target).unwrap().ino(),
            "the backup is a hard link of the deployed file"
        );
    }

    #[test]
    fn a_swapped_in_file_is_known_to_the_hash_cache_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (sites, change) = backed_up_change(dir.path());
        let hashes = HashCache::default();
        let verified = prepare(&sites, &hashes, std::slice::from_ref(&change), &[]).unwrap();
        assert_eq!(verified.len(), 1, "the new file's temporary was verified");
        swap_one(&sites, &change).unwrap();
        remember_swapped(&sites, &hashes, &verified);
        let stat = rustix::fs::lstat(&change.target).unwrap();
        assert_eq!(
            hashes.recorded(&change.target, &stat, ContentAlgorithm::CURRENT),
            change.new_digest.clone(),
            "known without hashing the swapped-in file"
        );
        std::fs::write(&change.target, b"edited").unwrap();
        let stat = rustix::fs::lstat(&change.target).unwrap();
        assert_eq!(
            hashes.recorded(&change.target, &stat, ContentAlgorithm::CURRENT),
            None
        );
        assert_eq!(
            hashes
                .digest(&change.target, ContentAlgorithm::CURRENT)
                .unwrap(),
            Some(fsutil::digest_file(&change.target, ContentAlgorithm::CURRENT).unwrap())
        );
    }

    #[test]
    fn a_file_rewritten_in_place_after_planning_is_caught_at_backup_even_with_its_mtime_set_back() {
        let dir = tempfile::tempdir().unwrap();
        let (sites, change) = backed_up_change(dir.path());
        let hashes = HashCache::default();
        let planned = change.old_digest.clone().unwrap();
        hashes.remember(&change.target, &planned);
        let mtime = std::fs::metadata(&change.target)
            .unwrap()
            .modified()
            .unwrap();
        std::fs::write(&change.target, b"odd").unwrap();
        let file = std::fs::File::options()
            .write(true)
            .open(&change.target)
            .unwrap();
        file.set_modified(mtime).unwrap();
        let error = prepare(&sites, &hashes, std::slice::from_ref(&change), &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("changed while it was backed up"), "{error}");
    }

    #[test]
    fn a_missing_deploy_dir_is_created_from_its_root_and_removed_when_undone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("opt");
        let state = dir.path().join("state");
        std::fs::create_dir_all(root.join("svc")).unwrap();
        std::fs::create_dir_all(state.join("staging/x")).unwrap();
        std::fs::write(state.join("staging/x/file"), b"new").unwrap();
        let deploy_dir = root.join("svc/new");
        let sites = Sites {
            deploy_dir: deploy_dir.clone(),
            state_dir: state.clone(),
            confine: Confinement::new(std::slice::from_ref(&root)),
            faults: Arc::new(NoFaults),
        };
        let target = deploy_dir.join("bin/file");
        let change = FileChange {
            rel: PathBuf::from("bin/file"),
            temp: new_temp(&target, "p1"),
            target,
            source: Some(state.join("staging/x/file")),
            new_digest: Some(
                fsutil::digest_file(&state.join("staging/x/file"), ContentAlgorithm::CURRENT)
                    .unwrap(),
            ),
            mode: Some(0o644),
            old_digest: None,
            backup: None,
        };
        let created = vec![deploy_dir.clone(), deploy_dir.join("bin")];
        prepare(
            &sites,
            &HashCache::default(),
            std::slice::from_ref(&change),
            &created,
        )
        .unwrap();
        swap_one(&sites, &change).unwrap();
        assert_eq!(std::fs::read(deploy_dir.join("bin/file")).unwrap(), b"new");
        restore_one(&sites, &change, "p1").unwrap();
        remove_created_dirs(&sites, &created);
        assert!(!deploy_dir.exists());
        assert!(root.join("svc").is_dir());
    }
}
