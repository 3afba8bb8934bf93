//! One managed service (spec, backend, journal, quarantine) and the engine state shared by every operation
//! ([`Inner`]), with the helpers the run and recovery use on it.

use super::config::Effects;
use super::error::ApplyError;
use crate::backend::{RunState, ServiceBackend, ServiceRuntime};
use crate::confine::Confinement;
use crate::fsutil::HashCache;
use crate::journal::{JournalError, ServiceJournal};
use crate::spec::{BackendKind, ServiceSpec};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Why a service is quarantined: the agent serves its other services, leaves this one as it is and refuses to
/// change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Quarantine {
    /// What happened and what to do.
    pub(crate) reason: String,
    /// Set by a failed journal write: a later successful write (the whole journal is rewritten each time) makes
    /// the disk agree with memory again and lifts it.
    pub(crate) lifted_by_a_write: bool,
}

/// One managed service.
#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) spec: ServiceSpec,
    pub(crate) backend: Arc<dyn ServiceBackend>,
    pub(super) journal_path: PathBuf,
    pub(super) journal: Mutex<ServiceJournal>,
    /// Serializes applies, rollbacks and recovery of this service.
    pub(super) op_lock: tokio::sync::Mutex<()>,
    pub(super) in_flight: Mutex<Option<String>>,
    pub(super) quarantine: Mutex<Option<Quarantine>>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Service {
    /// A copy of the journal.
    pub(crate) fn journal(&self) -> ServiceJournal {
        lock(&self.journal).clone()
    }

    /// Changes the journal and writes it durably before returning; on a write error the change is kept in
    /// memory only and the service is quarantined until a later write succeeds (or the agent restarts and
    /// reads what is on disk).
    pub(crate) fn persist(
        &self,
        change: impl FnOnce(&mut ServiceJournal),
    ) -> Result<(), JournalError> {
        let written = {
            let mut journal = lock(&self.journal);
            change(&mut journal);
            journal.store(&self.journal_path)
        };
        match &written {
            Ok(()) => {
                let mut quarantine = lock(&self.quarantine);
                if quarantine.as_ref().is_some_and(|q| q.lifted_by_a_write) {
                    tracing::info!(service = %self.spec.name, "the journal is written again: quarantine lifted");
                    *quarantine = None;
                }
            }
            Err(e) => self.quarantine(
                format!(
                    "its journal cannot be written ({e}); the last change is in memory only. Make {} writable \
                     (free space on its file system), then restart patchd: the next start finishes or reverts any \
                     interrupted apply from the journal on disk",
                    self.journal_path.display()
                ),
                true,
            ),
        }
        written
    }

    /// Quarantines the service (the first reason stays: it is the cause, later ones are consequences).
    pub(crate) fn quarantine(&self, reason: String, lifted_by_a_write: bool) {
        let mut quarantine = lock(&self.quarantine);
        if quarantine.is_none() {
            tracing::error!(service = %self.spec.name, "service quarantined: {reason}");
            *quarantine = Some(Quarantine {
                reason,
                lifted_by_a_write,
            });
        }
    }

    /// Replaces the reason of the quarantine: recovery knows better than the journal write that failed in it.
    pub(super) fn requarantine(&self, reason: String) {
        tracing::error!(service = %self.spec.name, "service quarantined: {reason}");
        *lock(&self.quarantine) = Some(Quarantine {
            reason,
            lifted_by_a_write: false,
        });
    }

    pub(crate) fn quarantined(&self) -> Option<Quarantine> {
        lock(&self.quarantine).clone()
    }

    /// Refuses an operation that would change a quarantined service.
    pub(super) fn refuse_if_quarantined(&self) -> Result<(), ApplyError> {
        match self.quarantined() {
            Some(q) => Err(ApplyError::Quarantined {
                service: self.spec.name.clone(),
                reason: q.reason,
            }),
            None => Ok(()),
        }
    }
}

/// Clears the in-flight marker when an operation ends, however it ends.
pub(super) struct InFlightGuard<'a>(&'a Service);

impl<'a> InFlightGuard<'a> {
    pub(super) fn set(service: &'a Service, patch_id: &str) -> Self {
        *lock(&service.in_flight) = Some(patch_id.to_string());
        InFlightGuard(service)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.in_flight) = None;
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) state_dir: PathBuf,
    pub(crate) keep_backups: usize,
    pub(crate) package_limits: patchd_package::Limits,
    pub(crate) confine: Confinement,
    pub(crate) effects: Effects,
    pub(crate) hashes: Arc<HashCache>,
    pub(crate) cache_min_age: std::time::Duration,
    /// Digests a stage or apply is using: the cache pruning skips them.
    pub(crate) pins: Arc<crate::prune::Pins>,
    pub(super) services: BTreeMap<String, Arc<Service>>,
    /// Serialize stages of one digest (Stage, and the publish of a package staged during its upload).
    pub(super) stage_locks: Arc<crate::digest_locks::DigestLocks>,
}

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApplyError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApplyError::Internal(format!("blocking task failed: {e}")))
}

impl Inner {
    /// Digests the cache must keep whatever their age: the apply in flight of every service and the committed
    /// patches whose backups are kept for rollback (the last `keep_backups` per service).
    pub(crate) fn cached_digests_in_use(&self) -> HashSet<String> {
        let mut digests = HashSet::new();
        for service in self.services.values() {
            let journal = service.journal();
            if let Some(current) = journal.current.filter(|c| !c.phase.is_final()) {
                digests.insert(current.digest);
            }
            digests.extend(
                journal
                    .history
                    .into_iter()
                    .filter(|h| h.backup_kept)
                    .map(|h| h.digest),
            );
        }
        digests.remove("");
        digests
    }

    /// Prunes the blob cache and staging (after an apply or rollback finished; see [`crate::prune`]).
    pub(crate) async fn prune_cache(&self) {
        let (state_dir, referenced, pins, min_age) = (
            self.state_dir.clone(),
            self.cached_digests_in_use(),
            Arc::clone(&self.pins),
            self.cache_min_age,
        );
        let pruned = blocking(move || {
            crate::prune::prune_cache(
                &state_dir,
                &referenced,
                &pins,
                min_age,
                std::time::SystemTime::now(),
            )
        })
        .await;
        match pruned {
            Ok(report) => log_prune(&report),
            Err(e) => tracing::warn!("cache pruning failed: {e}"),
        }
    }
}

/// Takes the journal's space reserve if it is missing (see [`crate::reserve`]); a full disk is reported, not fatal.
pub(crate) fn ensure_space_reserve(journal_dir: &Path) {
    match crate::reserve::ensure(journal_dir) {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "the state dir has no room for the journal's {} MiB space reserve in {}: free space there",
            crate::reserve::RESERVE_BYTES >> 20,
            journal_dir.display()
        ),
        Err(e) => tracing::warn!("cannot create the journal's space reserve: {e}"),
    }
}

pub(super) fn log_prune(report: &crate::prune::PruneReport) {
    if !report.removed.is_empty() {
        tracing::info!(
            removed = report.removed.len(),
            bytes_freed = report.bytes_freed,
            "pruned unused blobs, staged packages and partial uploads"
        );
    }
}

/// Whether a service counts as up for recovery's "make sure it runs".
pub(crate) fn is_up(runtime: &ServiceRuntime) -> bool {
    matches!(runtime.state, RunState::Running | RunState::Starting)
}

/// Process services are supervised by the agent: it runs them whenever it runs.
pub(crate) fn agent_supervised(spec: &ServiceSpec) -> bool {
    spec.backend == BackendKind::Process
}
