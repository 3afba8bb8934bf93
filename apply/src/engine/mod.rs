//! The apply engine: one per agent, shared by every RPC. It owns the managed services (spec, backend, journal),
//! serializes operations per service, runs each apply or rollback in its own task (so a controller that
//! disconnects does not cancel it), replays finished patch ids, and recovers interrupted applies at start.

mod config;
mod container;
pub(crate) mod error;
mod recovery;
pub(crate) mod service;

pub use config::{BackendFactory, Effects, EngineConfig};
pub use error::{ApplyError, ErrorKind};

use crate::backend::{self, ServiceRuntime};
use crate::confine::Confinement;
use crate::file_plan::{self, PlanError};
use crate::fsutil::{FsError, HashCache};
use crate::journal::{
    ApplyKind, ApplyPhase, ApplyRecord, ApplyResult, HistoryEntry, ServiceJournal,
};
use crate::layout::{StateLayout, is_digest};
use crate::prestage::PreStager;
use crate::spec::is_safe_name;
use crate::stage::{self, StageError, Staged};
use patchd_package::ContentAlgorithm;
use service::{InFlightGuard, Inner, Quarantine, Service, blocking, ensure_space_reserve, lock};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Default number of committed patches whose backups are kept for rollback.
pub const DEFAULT_KEEP_BACKUPS: usize = 3;

/// Apply a staged package to a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyCommand {
    pub service: String,
    pub digest: String,
    pub patch_id: String,
    /// Swap files only; no stop, start or probation.
    pub offline: bool,
    /// Who asked (recorded in the journal, shown by Status).
    pub caller: String,
    /// Docker services only: `K=V` set in the new container on top of the old environment and the spec's
    /// `env_add` (an upgrade runbook's `IS_UPGRADE=true`); journaled with the swap, so recovery recreates the
    /// same container.
    pub env_add: Vec<String>,
}

/// Return a service to the version before `to_patch_id` (or before its last committed patch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackCommand {
    pub service: String,
    pub to_patch_id: Option<String>,
    pub patch_id: String,
    /// Who asked (recorded in the journal, shown by Status).
    pub caller: String,
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
    /// Backend `docker`: the image the container runs, `tag (short id)` (`None` for other backends, or when the
    /// engine cannot tell).
    pub image: Option<String>,
}
/// The apply engine (cheap to clone).
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
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
        for dir in [
            StateLayout::JOURNAL,
            StateLayout::STAGING,
            StateLayout::BACKUPS,
            StateLayout::LOGS,
            StateLayout::RUN,
        ] {
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
            if spec.backend != crate::spec::BackendKind::Docker {
                confine.check_deploy_dir(&spec.deploy_dir)?;
            }
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
        let journal_dir = StateLayout::new(&config.state_dir).journal();
        ensure_space_reserve(&journal_dir);
        let hashes = Arc::new(HashCache::persistent(&journal_dir.join("hashes.json")));
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
                stage_locks: Arc::default(),
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
        if !is_digest(digest) {
            return Err(StageError::BadDigest {
                digest: digest.to_string(),
            }
            .into());
        }
        let _staging = self.inner.stage_locks.acquire(digest).await;
        let _pin = self.inner.pins.pin(digest);
        let state_dir = self.inner.state_dir.clone();
        let owned_digest = digest.to_string();
        let spec = svc.spec.clone();
        let limits = self.inner.package_limits;
        Ok(
            blocking(move || stage::stage_blocking(&state_dir, &owned_digest, &spec, &limits))
                .await??,
        )
    }

    /// What the agent's uploads need to stage a package as it arrives ([`crate::prestage`]), taking the same
    /// stage locks and pins as [`Engine::stage`].
    pub fn prestager(&self) -> PreStager {
        PreStager::new(
            self.inner.state_dir.clone(),
            self.inner.package_limits,
            Arc::clone(&self.inner.stage_locks),
            Arc::clone(&self.inner.pins),
        )
    }

    /// Apply a staged package. Runs in its own task: dropping the returned future does not cancel the apply.
    pub async fn apply(&self, command: ApplyCommand) -> Result<ApplyReport, ApplyError> {
        self.service(&command.service)?;
        check_patch_id(&command.patch_id)?;
        self.check_env_add(&command)?;
        if !is_digest(&command.digest) {
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

    /// A request's `env_add`: docker services only, each `KEY=VALUE` with a key of letters, digits and `_`.
    fn check_env_add(&self, command: &ApplyCommand) -> Result<(), ApplyError> {
        if command.env_add.is_empty() {
            return Ok(());
        }
        if self
            .service(&command.service)?
            .backend
            .containers()
            .is_none()
        {
            return Err(ApplyError::InvalidRequest(format!(
                "env_add applies to docker services only, and {:?} is not one; drop env_add from the request",
                command.service
            )));
        }
        for entry in &command.env_add {
            let key = entry.split_once('=').map_or("", |(key, _)| key);
            if key.is_empty()
                || key.starts_with(|c: char| c.is_ascii_digit())
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(ApplyError::InvalidRequest(format!(
                    "env_add entry {entry:?}: the key must be letters, digits and `_` (e.g. IS_UPGRADE)"
                )));
            }
        }
        Ok(())
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
        let manifest = stage::load_staged(&self.inner.state_dir, &command.digest)?
            // Staged during its upload but never checked by a Stage: not staged as far as Apply goes.
            .filter(|_| !stage::is_prestaged(&self.inner.state_dir, &command.digest))
            .ok_or_else(|| ApplyError::NotStaged {
                digest: command.digest.clone(),
                service: command.service.clone(),
            })?;
        stage::check_component(&command.digest, &svc.spec, &manifest)?;
        let planning = std::time::Instant::now();
        if svc.backend.containers().is_some() {
            let swap = self.plan_container_patch(&svc, &command, &manifest).await?;
            let record = ApplyRecord {
                patch_id: command.patch_id.clone(),
                kind: ApplyKind::Patch,
                digest: command.digest.clone(),
                version: manifest.version.clone(),
                offline: command.offline,
                was_running: false,
                files: Vec::new(),
                created_dirs: Vec::new(),
                backup_dir: self.backups_of(&command.service).join(&command.patch_id),
                phase: ApplyPhase::Prepared,
                started_unix: self.inner.effects.clock.unix_now(),
                container: Some(swap),
                caller: command.caller.clone(),
            };
            return self.execute_record(&svc, record, planning).await;
        }
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
            container: None,
            caller: command.caller.clone(),
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
        if svc.backend.containers().is_some() {
            let swap = self
                .plan_container_rollback(&svc, &command.patch_id, &undo)
                .await?;
            let record = ApplyRecord {
                patch_id: command.patch_id.clone(),
                kind: ApplyKind::Rollback {
                    undoes: undo.iter().map(|h| h.patch_id.clone()).collect(),
                },
                digest: String::new(),
                version: version_before,
                offline: false,
                was_running: false,
                files: Vec::new(),
                created_dirs: Vec::new(),
                backup_dir,
                phase: ApplyPhase::Prepared,
                started_unix: self.inner.effects.clock.unix_now(),
                container: Some(swap),
                caller: command.caller.clone(),
            };
            return self.execute_record(&svc, record, planning).await;
        }
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
            container: None,
            caller: command.caller.clone(),
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

    /// Hashes every service's deployed binary into the hash cache (files only; container services have none),
    /// so that the first `status` after a start answers without reading them: a rollout's first probe of every
    /// node waits for that answer. Errors are left for `status` to report.
    pub async fn warm_hash_cache(&self) {
        for svc in self.inner.services.values() {
            if svc.backend.containers().is_some() {
                continue;
            }
            let binary = svc.spec.binary_path();
            let inner = self.inner.clone();
            let _ = blocking(move || inner.hashes.digest(&binary, ContentAlgorithm::Sha256)).await;
        }
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
            let image = self.running_image(&svc).await;
            let binary = svc.spec.binary_path();
            let inner = self.inner.clone();
            let binary_sha256 = if svc.backend.containers().is_some() {
                None
            } else {
                blocking(move || inner.hashes.digest(&binary, ContentAlgorithm::Sha256))
                    .await?
                    .unwrap_or_else(|e| {
                        tracing::warn!("cannot hash the deployed binary: {e}");
                        None
                    })
            };
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
                image,
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

fn millis_since(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A patch id names a backup directory: a safe name, where `:` may also separate an upgrade's id from its step
/// (`<upgrade_id>:<step>`, the patch id of a runbook's container swap).
fn check_patch_id(patch_id: &str) -> Result<(), ApplyError> {
    if is_safe_name(&patch_id.replace(':', "_")) {
        Ok(())
    } else {
        Err(ApplyError::InvalidRequest(format!(
            "patch_id {patch_id:?} must be 1-128 characters of A-Z a-z 0-9 . _ @ - : (it names the backup directory)"
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
