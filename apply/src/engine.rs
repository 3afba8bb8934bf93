//! The apply engine: one per agent, shared by every RPC. It owns the managed services (spec, backend, journal),
//! serializes operations per service, runs each apply or rollback in its own task (so a controller that
//! disconnects does not cancel it), replays finished patch ids, and recovers interrupted applies at start.

use crate::backend::{self, BackendError, RunState, ServiceBackend, ServiceRuntime};
use crate::confine::{Confinement, ConfinementError};
use crate::effects::{
    Clock, FaultHook, HealthProbe, NetProbe, SimulatedCrash, SystemClock, default_fault_hook,
};
use crate::file_plan::{self, PlanError};
use crate::fsutil::{FsError, HashCache};
use crate::journal::{
    ApplyKind, ApplyPhase, ApplyRecord, ApplyResult, HistoryEntry, JournalError, ServiceJournal,
};
use crate::spec::{BackendKind, ServiceSpec, SpecError, is_safe_name};
use crate::stage::{self, StageError, Staged};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Default number of committed patches whose backups are kept for rollback.
pub const DEFAULT_KEEP_BACKUPS: usize = 3;

/// What the engine needs from the agent config.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub state_dir: PathBuf,
    pub deploy_roots: Vec<PathBuf>,
    pub services: Vec<ServiceSpec>,
    /// Committed patches whose backups are kept (at least 1).
    pub keep_backups: usize,
    pub package_limits: patchd_package::Limits,
    /// Cached blobs and staged packages touched more recently are never pruned, referenced or not.
    pub cache_min_age: std::time::Duration,
}

/// The host effects besides files: clock, probe, faults.
#[derive(Debug, Clone)]
pub struct Effects {
    pub clock: Arc<dyn Clock>,
    pub probe: Arc<dyn HealthProbe>,
    pub faults: Arc<dyn FaultHook>,
}

impl Effects {
    /// The real ones: system clock, network probe, and this build's fault hook.
    pub fn real() -> Result<Self, ApplyError> {
        Ok(Effects {
            clock: Arc::new(SystemClock),
            probe: Arc::new(NetProbe::new().map_err(ApplyError::Internal)?),
            faults: default_fault_hook(),
        })
    }
}

/// Builds the backend of a service.
pub type BackendFactory =
    Box<dyn Fn(&ServiceSpec, &Path) -> Result<Arc<dyn ServiceBackend>, BackendError> + Send + Sync>;

/// How an engine error maps onto an RPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    PermissionDenied,
    /// Not enough disk space (or another bound) for the operation now: free some, then retry.
    ResourceExhausted,
    Internal,
}

/// An operation was refused or could not run. Failures after an apply began are not errors: they are
/// reported as `Failed` or `Reverted` results.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("unknown service {name:?}; this agent manages: {known}")]
    UnknownService { name: String, known: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(
        "package {digest} is not staged on this agent; call Stage for service {service:?} first"
    )]
    NotStaged { digest: String, service: String },
    #[error(transparent)]
    Confinement(#[from] ConfinementError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "patch id {patch_id:?} was already used on service {service:?} ({earlier}); use a new patch id"
    )]
    PatchIdReused {
        patch_id: String,
        service: String,
        earlier: String,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Crash(#[from] SimulatedCrash),
    #[error("service {service:?} is quarantined: {reason}")]
    Quarantined { service: String, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApplyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApplyError::UnknownService { .. } | ApplyError::NotStaged { .. } => ErrorKind::NotFound,
            ApplyError::InvalidRequest(_) | ApplyError::Spec(_) => ErrorKind::InvalidArgument,
            ApplyError::Confinement(_) | ApplyError::Plan(PlanError::Confinement(_)) => {
                ErrorKind::PermissionDenied
            }
            ApplyError::Stage(StageError::BadDigest { .. }) => ErrorKind::InvalidArgument,
            ApplyError::Stage(StageError::NoSpace { .. }) => ErrorKind::ResourceExhausted,
            ApplyError::Stage(StageError::BlobMissing { .. }) => ErrorKind::NotFound,
            ApplyError::Stage(StageError::Fs(_)) => ErrorKind::Internal,
            ApplyError::Stage(_) => ErrorKind::FailedPrecondition,
            ApplyError::Plan(PlanError::Fs(_)) => ErrorKind::Internal,
            ApplyError::Plan(PlanError::UnknownPatch { .. }) => ErrorKind::NotFound,
            ApplyError::Plan(_)
            | ApplyError::PatchIdReused { .. }
            | ApplyError::Quarantined { .. } => ErrorKind::FailedPrecondition,
            ApplyError::Fs(_)
            | ApplyError::Journal(_)
            | ApplyError::Backend(_)
            | ApplyError::Crash(_)
            | ApplyError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Apply a staged package to a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyCommand {
    pub service: String,
    pub digest: String,
    pub patch_id: String,
    /// Swap files only; no stop, start or probation.
    pub offline: bool,
}

/// Return a service to the version before `to_patch_id` (or before its last committed patch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackCommand {
    pub service: String,
    pub to_patch_id: Option<String>,
    pub patch_id: String,
}

/// The answer to Apply and Rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub result: ApplyResult,
    /// The patch id had finished earlier; this is that result.
    pub replayed: bool,
}

/// What Status reports about one service.
#[derive(Debug, Clone)]
pub struct ServiceReport {
    pub name: String,
    pub component: String,
    pub deploy_dir: PathBuf,
    pub runtime: ServiceRuntime,
    /// sha256 of the deployed main binary, read from disk (`None` when the file is absent).
    pub binary_sha256: Option<String>,
    /// Version label of the newest committed patch, "" when never patched.
    pub version: String,
    pub last: Option<ApplyResult>,
    /// Patch id of the apply or rollback in flight.
    pub in_flight: Option<String>,
    /// Committed patches whose backups are kept, newest first.
    pub history: Vec<HistoryEntry>,
    /// Why the service is quarantined and what to do (the agent leaves it alone and refuses Apply and Rollback).
    pub quarantine: Option<String>,
    /// Backup sets kept under `<state>/quarantine/<service>/` because no journal referred to them.
    pub quarantined_backups: Vec<PathBuf>,
}

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
    journal_path: PathBuf,
    journal: Mutex<ServiceJournal>,
    /// Serializes applies, rollbacks and recovery of this service.
    op_lock: tokio::sync::Mutex<()>,
    in_flight: Mutex<Option<String>>,
    quarantine: Mutex<Option<Quarantine>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
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
    fn requarantine(&self, reason: String) {
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
    fn refuse_if_quarantined(&self) -> Result<(), ApplyError> {
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
struct InFlightGuard<'a>(&'a Service);

impl<'a> InFlightGuard<'a> {
    fn set(service: &'a Service, patch_id: &str) -> Self {
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
    services: BTreeMap<String, Arc<Service>>,
    stage_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The apply engine (cheap to clone).
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApplyError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApplyError::Internal(format!("blocking task failed: {e}")))
}

impl Engine {
    /// The production engine: real backends and effects; recovers interrupted applies before returning.
    pub async fn start(config: EngineConfig) -> Result<Engine, ApplyError> {
        let factory: BackendFactory = Box::new(backend::real_backend);
        Self::start_with(config, Effects::real()?, factory).await
    }

    /// An engine with the given effects and backends; recovers interrupted applies before returning.
    pub async fn start_with(
        config: EngineConfig,
        effects: Effects,
        factory: BackendFactory,
    ) -> Result<Engine, ApplyError> {
        let confine = Confinement::new(&config.deploy_roots);
        for dir in ["journal", "staging", "backups", "logs", "run"] {
            let path = config.state_dir.join(dir);
            std::fs::create_dir_all(&path).map_err(|source| FsError {
                op: "create directory",
                path,
                source,
            })?;
        }
        let mut services = BTreeMap::new();
        for spec in config.services {
            spec.validate(&config.deploy_roots)?;
            confine.check_deploy_dir(&spec.deploy_dir)?;
            if services.contains_key(&spec.name) {
                return Err(ApplyError::InvalidRequest(format!(
                    "service {:?} is declared twice in the agent config; give each [[service]] its own name",
                    spec.name
                )));
            }
            let journal_path = ServiceJournal::path(&config.state_dir, &spec.name);
            // One unreadable journal must not keep the agent from serving the other services.
            let (journal, quarantine) = match ServiceJournal::load(&journal_path) {
                Ok(journal) => (journal, None),
                Err(e) => (
                    ServiceJournal::default(),
                    Some(Quarantine {
                        reason: format!(
                            "{e}. Until then patchd leaves this service as it is (no recovery, not started, backups \
                             untouched), serves the others, and refuses Apply and Rollback for it"
                        ),
                        lifted_by_a_write: false,
                    }),
                ),
            };
            if let Some(q) = &quarantine {
                tracing::error!(service = %spec.name, "service quarantined: {}", q.reason);
            }
            let backend = factory(&spec, &config.state_dir)?;
            services.insert(
                spec.name.clone(),
                Arc::new(Service {
                    spec,
                    backend,
                    journal_path,
                    journal: Mutex::new(journal),
                    op_lock: tokio::sync::Mutex::new(()),
                    in_flight: Mutex::new(None),
                    quarantine: Mutex::new(quarantine),
                }),
            );
        }
        let journal_dir = config.state_dir.join("journal");
        ensure_space_reserve(&journal_dir);
        let hashes = Arc::new(HashCache::persistent(
            &config.state_dir.join("journal").join("hashes.json"),
        ));
        let engine = Engine {
            inner: Arc::new(Inner {
                state_dir: config.state_dir,
                keep_backups: config.keep_backups.max(1),
                package_limits: config.package_limits,
                confine,
                effects,
                hashes,
                cache_min_age: config.cache_min_age,
                pins: Arc::default(),
                services,
                stage_locks: Mutex::new(HashMap::new()),
            }),
        };
        engine.recover().await?;
        Ok(engine)
    }

    /// Names of the managed services.
    pub fn services(&self) -> Vec<String> {
        self.inner.services.keys().cloned().collect()
    }

    pub(crate) fn service(&self, name: &str) -> Result<Arc<Service>, ApplyError> {
        self.inner
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| ApplyError::UnknownService {
                name: name.to_string(),
                known: if self.inner.services.is_empty() {
                    "none (add a [[service]] to the agent config)".into()
                } else {
                    self.services().join(", ")
                },
            })
    }

    /// Recovers every service's interrupted apply (ARCHITECTURE.md, "Apply state machine"), makes sure the
    /// services are running, and removes leftovers no journal refers to.
    async fn recover(&self) -> Result<(), ApplyError> {
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
                    "recovering its interrupted apply at agent start did not complete: {e}. Its files were \
                     restored as far as possible and it was started if it ran before; the journal on disk still \
                     describes the interrupted apply, so the next start of patchd restores the previous version \
                     again (restoring is idempotent). Fix the cause (free space in {}), then restart patchd",
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
    fn quarantined_backups(&self, service: &str) -> Vec<PathBuf> {
        let dir = crate::journal::quarantine_dir(&self.inner.state_dir, service);
        let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|listing| listing.flatten().map(|entry| entry.path()).collect())
            .unwrap_or_default();
        sets.sort();
        sets
    }

    /// `<state>/backups/<service>`: backup sets are per service, since one rollout's patch id may reach
    /// several services of a host.
    fn backups_of(&self, service: &str) -> PathBuf {
        self.inner.state_dir.join("backups").join(service)
    }

    /// The idempotency rule for apply and rollback: a patch id already used for the same operation replays its
    /// recorded result; used for anything else, or still naming kept rollback state, it is refused.
    fn replay_or_refuse(
        &self,
        journal: &ServiceJournal,
        service: &str,
        patch_id: &str,
        same_operation: impl Fn(&ApplyResult) -> bool,
    ) -> Result<Option<ApplyReport>, ApplyError> {
        if let Some(earlier) = journal.result_of(patch_id) {
            if same_operation(earlier) {
                return Ok(Some(ApplyReport {
                    result: earlier.clone(),
                    replayed: true,
                }));
            }
            return Err(ApplyError::PatchIdReused {
                patch_id: patch_id.to_string(),
                service: service.to_string(),
                earlier: describe_earlier(earlier),
            });
        }
        self.refuse_kept_patch_id(journal, service, patch_id)?;
        Ok(None)
    }

    /// A patch id whose result left the recent results may still name a history entry or a kept backup set:
    /// reusing it would overwrite, then delete, that rollback backup.
    fn refuse_kept_patch_id(
        &self,
        journal: &ServiceJournal,
        service: &str,
        patch_id: &str,
    ) -> Result<(), ApplyError> {
        let earlier = if journal.history.iter().any(|h| h.patch_id == patch_id) {
            "it is in the committed-patch history"
        } else if self.backups_of(service).join(patch_id).exists() {
            "its backup set is still kept"
        } else {
            return Ok(());
        };
        Err(ApplyError::PatchIdReused {
            patch_id: patch_id.to_string(),
            service: service.to_string(),
            earlier: earlier.to_string(),
        })
    }

    /// Stage: verify and unpack a cached blob for a service. Idempotent.
    pub async fn stage(&self, service: &str, digest: &str) -> Result<Staged, ApplyError> {
        let svc = self.service(service)?;
        if !stage::is_digest(digest) {
            return Err(StageError::BadDigest {
                digest: digest.to_string(),
            }
            .into());
        }
        let digest_lock = {
            let mut locks = lock(&self.inner.stage_locks);
            locks.entry(digest.to_string()).or_default().clone()
        };
        let _staging = digest_lock.lock().await;
        let _pin = self.inner.pins.pin(digest);
        let state_dir = self.inner.state_dir.clone();
        let digest = digest.to_string();
        let spec = svc.spec.clone();
        let limits = self.inner.package_limits;
        Ok(blocking(move || stage::stage_blocking(&state_dir, &digest, &spec, &limits)).await??)
    }

    /// Apply a staged package. Runs in its own task: dropping the returned future does not cancel the apply.
    pub async fn apply(&self, command: ApplyCommand) -> Result<ApplyReport, ApplyError> {
        self.service(&command.service)?;
        check_patch_id(&command.patch_id)?;
        if !stage::is_digest(&command.digest) {
            return Err(StageError::BadDigest {
                digest: command.digest.clone(),
            }
            .into());
        }
        let engine = self.clone();
        tokio::spawn(async move { engine.apply_exclusive(command).await })
            .await
            .map_err(|e| ApplyError::Internal(format!("apply task failed: {e}")))?
    }

    async fn apply_exclusive(&self, command: ApplyCommand) -> Result<ApplyReport, ApplyError> {
        let svc = self.service(&command.service)?;
        let _op = svc.op_lock.lock().await;
        svc.refuse_if_quarantined()?;
        let _pin = self.inner.pins.pin(&command.digest);
        if let Some(replay) = self.replay_or_refuse(
            &svc.journal(),
            &command.service,
            &command.patch_id,
            |earlier| earlier.kind == ApplyKind::Patch && earlier.digest == command.digest,
        )? {
            return Ok(replay);
        }
        let manifest =
            stage::load_staged(&self.inner.state_dir, &command.digest)?.ok_or_else(|| {
                ApplyError::NotStaged {
                    digest: command.digest.clone(),
                    service: command.service.clone(),
                }
            })?;
        stage::check_component(&command.digest, &svc.spec, &manifest)?;
        let planning = std::time::Instant::now();
        let backup_dir = self.backups_of(&command.service).join(&command.patch_id);
        let (files, created_dirs) = {
            let inner = self.inner.clone();
            let spec = svc.spec.clone();
            let staged_files =
                stage::StagedPaths::new(&self.inner.state_dir, &command.digest).files();
            let manifest = manifest.clone();
            let patch_id = command.patch_id.clone();
            let backup_dir = backup_dir.clone();
            blocking(move || {
                file_plan::plan_patch(
                    &spec,
                    &inner.confine,
                    &inner.hashes,
                    &staged_files,
                    &manifest,
                    &patch_id,
                    &backup_dir,
                )
            })
            .await??
        };
        let record = ApplyRecord {
            patch_id: command.patch_id.clone(),
            kind: ApplyKind::Patch,
            digest: command.digest.clone(),
            version: manifest.version.clone(),
            offline: command.offline,
            was_running: false,
            files,
            created_dirs,
            backup_dir,
            phase: ApplyPhase::Prepared,
            started_unix: self.inner.effects.clock.unix_now(),
        };
        self.execute_record(&svc, record, planning).await
    }

    /// Rollback: return the service to the version before `to_patch_id` (or before its newest committed patch),
    /// as a journaled apply with probation. Runs in its own task.
    pub async fn rollback(&self, command: RollbackCommand) -> Result<ApplyReport, ApplyError> {
        self.service(&command.service)?;
        check_patch_id(&command.patch_id)?;
        let engine = self.clone();
        tokio::spawn(async move { engine.rollback_exclusive(command).await })
            .await
            .map_err(|e| ApplyError::Internal(format!("rollback task failed: {e}")))?
    }

    async fn rollback_exclusive(
        &self,
        command: RollbackCommand,
    ) -> Result<ApplyReport, ApplyError> {
        let svc = self.service(&command.service)?;
        let _op = svc.op_lock.lock().await;
        svc.refuse_if_quarantined()?;
        let journal = svc.journal();
        if let Some(replay) =
            self.replay_or_refuse(&journal, &command.service, &command.patch_id, |earlier| {
                matches!(earlier.kind, ApplyKind::Rollback { .. })
            })?
        {
            return Ok(replay);
        }
        let history = &journal.history;
        let from = match &command.to_patch_id {
            Some(target) => history
                .iter()
                .rposition(|h| h.patch_id == *target)
                .ok_or_else(|| PlanError::UnknownPatch {
                    service: command.service.clone(),
                    patch_id: target.clone(),
                    known: if history.is_empty() {
                        "none".into()
                    } else {
                        history
                            .iter()
                            .map(|h| h.patch_id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                })?,
            None => history
                .len()
                .checked_sub(1)
                .ok_or_else(|| PlanError::NothingToRollBack {
                    service: command.service.clone(),
                })?,
        };
        let undo: Vec<HistoryEntry> = history[from..].to_vec();
        if let Some(pruned) = undo.iter().find(|h| !h.backup_kept) {
            return Err(PlanError::BackupPruned {
                patch_id: pruned.patch_id.clone(),
            }
            .into());
        }
        let version_before = from
            .checked_sub(1)
            .map(|i| history[i].version.clone())
            .unwrap_or_default();
        let planning = std::time::Instant::now();
        let backup_dir = self.backups_of(&command.service).join(&command.patch_id);
        let (files, created_dirs) = {
            let inner = self.inner.clone();
            let spec = svc.spec.clone();
            let undo = undo.clone();
            let rollback_id = command.patch_id.clone();
            let backup_dir = backup_dir.clone();
            blocking(move || {
                file_plan::plan_rollback(
                    &spec,
                    &inner.confine,
                    &inner.hashes,
                    &undo,
                    &rollback_id,
                    &backup_dir,
                )
            })
            .await??
        };
        let record = ApplyRecord {
            patch_id: command.patch_id.clone(),
            kind: ApplyKind::Rollback {
                undoes: undo.iter().map(|h| h.patch_id.clone()).collect(),
            },
            digest: String::new(),
            version: version_before,
            offline: false,
            was_running: false,
            files,
            created_dirs,
            backup_dir,
            phase: ApplyPhase::Prepared,
            started_unix: self.inner.effects.clock.unix_now(),
        };
        self.execute_record(&svc, record, planning).await
    }

    /// Runs a journaled record (apply or rollback) with the service marked in flight; `planning` is when its
    /// planning began, reported as the `plan` step.
    async fn execute_record(
        &self,
        svc: &Arc<Service>,
        record: ApplyRecord,
        planning: std::time::Instant,
    ) -> Result<ApplyReport, ApplyError> {
        let _in_flight = InFlightGuard::set(svc, &record.patch_id);
        let steps = vec![("plan".to_string(), millis_since(planning))];
        let result = crate::run::execute(&self.inner, svc, record, steps).await?;
        Ok(ApplyReport {
            result,
            replayed: false,
        })
    }

    /// Status of one service (`Some(name)`) or all.
    pub async fn status(&self, service: Option<&str>) -> Result<Vec<ServiceReport>, ApplyError> {
        let services: Vec<Arc<Service>> = match service {
            Some(name) => vec![self.service(name)?],
            None => self.inner.services.values().cloned().collect(),
        };
        let mut reports = Vec::with_capacity(services.len());
        for svc in services {
            let runtime = match svc.backend.status().await {
                Ok(runtime) => runtime,
                Err(e) => ServiceRuntime {
                    last_exit: Some(format!("status unavailable: {e}")),
                    ..ServiceRuntime::unknown()
                },
            };
            let binary = svc.spec.binary_path();
            let inner = self.inner.clone();
            let binary_sha256 = blocking(move || inner.hashes.sha256(&binary))
                .await?
                .unwrap_or_else(|e| {
                    tracing::warn!("cannot hash the deployed binary: {e}");
                    None
                });
            let journal = svc.journal();
            reports.push(ServiceReport {
                name: svc.spec.name.clone(),
                component: svc.spec.component.clone(),
                deploy_dir: svc.spec.deploy_dir.clone(),
                runtime,
                binary_sha256,
                version: journal.running_version(),
                last: journal.results.last().cloned(),
                in_flight: lock(&svc.in_flight).clone(),
                history: journal
                    .history
                    .iter()
                    .rev()
                    .filter(|h| h.backup_kept)
                    .cloned()
                    .collect(),
                quarantine: svc.quarantined().map(|q| q.reason),
                quarantined_backups: self.quarantined_backups(&svc.spec.name),
            });
        }
        Ok(reports)
    }

    /// Prunes unused cached blobs and staged packages now, by the same rules as after an apply (the agent
    /// calls it on a timer, so a host that stops being patched still gets its space back).
    pub async fn prune_cache(&self) {
        self.inner.prune_cache().await;
    }
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

fn log_prune(report: &crate::prune::PruneReport) {
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

fn millis_since(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn check_patch_id(patch_id: &str) -> Result<(), ApplyError> {
    if is_safe_name(patch_id) {
        Ok(())
    } else {
        Err(ApplyError::InvalidRequest(format!(
            "patch_id {patch_id:?} must be 1-128 characters of A-Z a-z 0-9 . _ @ - (it names the backup directory)"
        )))
    }
}

fn describe_earlier(earlier: &ApplyResult) -> String {
    match &earlier.kind {
        ApplyKind::Patch => format!(
            "for package {} ({})",
            earlier.digest,
            earlier.outcome.as_str()
        ),
        ApplyKind::Rollback { .. } => format!("for a rollback ({})", earlier.outcome.as_str()),
    }
}

#[cfg(test)]
impl Engine {
    /// The engine's hash cache, so a test can seed what an earlier hashing would have cached.
    pub(crate) fn inner_hashes_for_tests(&self) -> &HashCache {
        &self.inner.hashes
    }
}

impl From<crate::file_plan::StepError> for ApplyError {
    fn from(error: crate::file_plan::StepError) -> Self {
        match error {
            crate::file_plan::StepError::Fs(e) => e.into(),
            crate::file_plan::StepError::Crash(crash) => crash.into(),
        }
    }
}
