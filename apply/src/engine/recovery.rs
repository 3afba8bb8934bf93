//! Recovery at start: every service's interrupted apply finished or reverted, services running, and backup sets
//! no journal refers to deleted or moved to quarantine.

use super::Engine;
use super::error::ApplyError;
use super::service::{blocking, log_prune};
use crate::fsutil::FsError;
use crate::journal::ApplyKind;
use crate::layout::StateLayout;
use crate::stage::{self};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

impl Engine {
    /// Recovers every service's interrupted apply (ARCHITECTURE.md, "Apply state machine"), makes sure the
    /// services are running, and removes leftovers no journal refers to.
    pub(super) async fn recover(&self) -> Result<(), ApplyError> {
        for service in self.inner.services.values() {
            if service.quarantined().is_some() {
                tracing::warn!(service = %service.spec.name, "quarantined: not recovered, not started");
                continue;
            }
            let _op = service.op_lock.lock().await;
            match crate::run::recover_service(&self.inner, service).await {
                Ok(()) => {}
                // A simulated crash stands for the agent dying here: nothing after it runs.
                Err(ApplyError::Crash(crash)) => return Err(crash.into()),
                Err(e) => service.requarantine(format!(
                    "recovering its interrupted apply at agent start did not complete: {e}. Its files (or its \
                     container) were restored as far as possible and it was started if it ran before; the journal on \
                     disk still describes the interrupted apply, so the next start of patchd restores the previous \
                     version again (restoring is idempotent). Fix the cause (free space in {}, or a Docker Engine \
                     that does not answer), then restart patchd",
                    self.inner.state_dir.display()
                )),
            }
        }
        stage::remove_stale_temps(&self.inner.state_dir);
        self.remove_orphan_backups();
        let (state_dir, referenced, pins, min_age) = (
            self.inner.state_dir.clone(),
            self.inner.cached_digests_in_use(),
            Arc::clone(&self.inner.pins),
            self.inner.cache_min_age,
        );
        let report = blocking(move || {
            crate::prune::prune_at_start(
                &state_dir,
                &referenced,
                &pins,
                min_age,
                std::time::SystemTime::now(),
            )
        })
        .await?;
        log_prune(&report);
        Ok(())
    }

    /// Backup sets of managed services that the journal no longer needs. A set whose patch id the journal knows
    /// as finished with (reverted, failed, rolled back, pruned: left by a crash between the final journal write
    /// and the delete) is deleted; a set the journal does not know at all (a journal moved aside, lost or new)
    /// is never deleted but moved to `<state>/quarantine/<service>/` and listed in Status. Quarantined services
    /// and directories of services no longer in the config are left alone.
    fn remove_orphan_backups(&self) {
        for service in self.inner.services.values() {
            if service.quarantined().is_some() {
                continue;
            }
            let journal = service.journal();
            // By name, not by full path: a kept set must survive a state dir reached through another path.
            let set_name = |dir: &Path| {
                dir.file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            let mut referenced: HashSet<String> = journal
                .history
                .iter()
                .filter(|h| h.backup_kept)
                .map(|h| set_name(&h.backup_dir))
                .collect();
            let mut known: HashSet<String> = journal
                .history
                .iter()
                .map(|h| h.patch_id.clone())
                .chain(journal.results.iter().map(|r| r.patch_id.clone()))
                .collect();
            if let Some(current) = &journal.current {
                known.insert(current.patch_id.clone());
                if let ApplyKind::Rollback { undoes } = &current.kind {
                    known.extend(undoes.iter().cloned());
                }
                if !current.phase.is_final() {
                    referenced.insert(set_name(&current.backup_dir));
                }
            }
            let Ok(listing) = std::fs::read_dir(self.backups_of(&service.spec.name)) else {
                continue;
            };
            for entry in listing.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if referenced.contains(&name) {
                    continue;
                }
                if known.contains(&name) {
                    tracing::info!(path = %path.display(), "removing a backup set its journal no longer needs");
                    let _ = crate::fsutil::remove_tree_if_exists(&path);
                    continue;
                }
                let aside =
                    crate::journal::quarantine_dir(&self.inner.state_dir, &service.spec.name);
                match move_aside(&path, &aside, &name) {
                    Ok(to) => tracing::warn!(
                        service = %service.spec.name,
                        "backup set {} is not known to the service's journal (moved aside, lost or new): kept as {}; \
                         it may hold the previous files of an interrupted apply; delete it when it is not needed",
                        path.display(),
                        to.display()
                    ),
                    Err(e) => tracing::error!(
                        service = %service.spec.name,
                        "backup set {} is not known to the service's journal and could not be moved aside \
                         ({e}); it is left where it is",
                        path.display()
                    ),
                }
            }
        }
    }

    /// Backup sets kept in quarantine for `service`, oldest name first.
    pub(super) fn quarantined_backups(&self, service: &str) -> Vec<PathBuf> {
        let dir = crate::journal::quarantine_dir(&self.inner.state_dir, service);
        let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|listing| listing.flatten().map(|entry| entry.path()).collect())
            .unwrap_or_default();
        sets.sort();
        sets
    }

    /// `<state>/backups/<service>`: backup sets are per service, since one rollout's patch id may reach
    /// several services of a host.
    pub(super) fn backups_of(&self, service: &str) -> PathBuf {
        StateLayout::new(&self.inner.state_dir).backups_of(service)
    }
}

/// Moves the backup set `set` into `aside` under its own name (a numbered suffix when taken); where it went.
fn move_aside(set: &Path, aside: &Path, name: &str) -> Result<PathBuf, FsError> {
    std::fs::create_dir_all(aside).map_err(|source| FsError {
        op: "create directory",
        path: aside.to_path_buf(),
        source,
    })?;
    let mut to = aside.join(name);
    let mut n = 1;
    while to.exists() {
        n += 1;
        to = aside.join(format!("{name}.{n}"));
    }
    std::fs::rename(set, &to).map_err(|source| FsError {
        op: "move aside",
        path: set.to_path_buf(),
        source,
    })?;
    crate::fsutil::fsync_dir(aside)?;
    if let Some(parent) = set.parent() {
        crate::fsutil::fsync_dir(parent)?;
    }
    Ok(to)
}
