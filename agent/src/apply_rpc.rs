//! RPC glue between the gRPC service and `patchd-apply`: Stage, Apply, Rollback and Status requests become engine
//! commands, engine results become wire messages, and engine errors become `tonic::Status` (here, once).
//!
//! The engine runs on its own runtime ([`ApplyRuntime`]: its own worker and blocking threads), so uploads that
//! fill the server runtime's blocking pool (hashing, disk writes) can never delay an apply's steps or probation.

use crate::config::Config;
use crate::trust::PackageTrust;
use patchd_apply::backend::RunState;
use patchd_apply::{
    ApplyCommand, ApplyError, ApplyResult, Engine, EngineConfig, ErrorKind, HistoryEntry, Outcome,
    RollbackCommand, ServiceReport,
};
use patchd_proto::v1;
use std::future::Future;
use std::sync::Arc;
use tonic::{Code, Status};

/// Worker threads of the apply runtime: applies of different services run at once, and one may block briefly.
const APPLY_WORKER_THREADS: usize = 2;
/// Blocking threads of the apply runtime (staging, hashing, file swaps); one apply uses a few at a time.
const APPLY_BLOCKING_THREADS: usize = 32;

/// The runtime the apply engine runs on. Shut down without waiting when dropped, which may happen inside the
/// server's runtime (where blocking on a shutdown is not allowed); the engine's tasks end with it.
#[derive(Debug)]
pub struct ApplyRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl ApplyRuntime {
    fn new() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(APPLY_WORKER_THREADS)
            .max_blocking_threads(APPLY_BLOCKING_THREADS)
            .thread_name("patchd-apply")
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    /// Starts `work` on the apply runtime without waiting for it (it ends with the runtime at shutdown).
    fn spawn_detached(&self, work: impl Future<Output = ()> + Send + 'static) {
        if let Some(runtime) = &self.runtime {
            drop(runtime.spawn(work));
        }
    }

    /// Runs `work` on the apply runtime and waits for it from any runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, Status> {
        let Some(runtime) = &self.runtime else {
            return Err(Status::unavailable("the agent is shutting down"));
        };
        runtime
            .spawn(work)
            .await
            .map_err(|e| Status::internal(format!("apply task failed: {e}")))
    }
}

impl Drop for ApplyRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The apply side of the agent, created once at start-up (after crash recovery) and shared by all RPCs.
#[derive(Debug, Clone)]
pub struct ApplyService {
    engine: Engine,
    runtime: Arc<ApplyRuntime>,
    trust: Arc<PackageTrust>,
}

impl ApplyService {
    /// Starts the engine for the agent config: checks the services, recovers every interrupted apply (each
    /// service ends all-old or all-new) and makes sure agent-supervised services run. Call before serving.
    pub async fn start(config: &Config) -> Result<Self, ApplyError> {
        let policy = config.trust.policy().map_err(|problems| {
            let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
            ApplyError::Internal(format!(
                "[trust] cannot be used: {}; fix patchd.toml (`patchd validate` lists every problem)",
                listed.join("; ")
            ))
        })?;
        let trust = Arc::new(PackageTrust::new(policy, &config.state_dir));
        let runtime =
            Arc::new(ApplyRuntime::new().map_err(|e| {
                ApplyError::Internal(format!("cannot start the apply runtime: {e}"))
            })?);
        let package_limits = patchd_package::Limits {
            max_files: config.limits.max_files,
            max_unpacked_bytes: config.limits.max_unpacked_bytes,
            max_entry_bytes: patchd_package::Limits::default()
                .max_entry_bytes
                .min(config.limits.max_unpacked_bytes),
        };
        let engine_config = EngineConfig {
            state_dir: config.state_dir.clone(),
            deploy_roots: config.deploy_roots.clone(),
            services: config.services.clone(),
            keep_backups: usize::try_from(config.limits.keep_backups).unwrap_or(usize::MAX),
            package_limits,
            cache_min_age: config.limits.cache_min_age,
        };
        let engine = runtime
            .run(Engine::start(engine_config))
            .await
            .map_err(|status| ApplyError::Internal(status.message().to_string()))??;
        runtime.spawn_detached({
            let engine = engine.clone();
            async move { engine.warm_hash_cache().await }
        });
        Ok(Self {
            engine,
            runtime,
            trust,
        })
    }

    /// The signing gate (see [`crate::trust`]), on the apply runtime's blocking threads: it reads the whole blob.
    async fn check_signatures(
        &self,
        digest: &str,
        signatures: Vec<String>,
        fresh: bool,
    ) -> Result<(), Status> {
        if !self.trust.is_enforced() {
            return Ok(());
        }
        let trust = Arc::clone(&self.trust);
        let digest = digest.to_string();
        self.runtime
            .run(async move {
                tokio::task::spawn_blocking(move || trust.check(&digest, &signatures, fresh))
                    .await
                    .map_err(|e| Status::internal(format!("signature check failed: {e}")))?
            })
            .await?
    }

    /// The engine behind the RPCs.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// What lets uploads stage their package as it arrives (`patchd_apply::prestage`), unless packages must be
    /// signed: then nothing is unpacked before Stage has verified the signatures it carries (the signing gate,
    /// [`crate::trust`]), and Stage unpacks the blob as before.
    pub fn prestager(&self) -> Option<patchd_apply::prestage::PreStager> {
        (!self.trust.is_enforced()).then(|| self.engine.prestager())
    }

    /// Prunes unused cached blobs and staged packages now (the periodic pass; see `patchd_apply::prune`).
    pub async fn prune_cache(&self) -> Result<(), Status> {
        let engine = self.engine.clone();
        self.runtime
            .run(async move { engine.prune_cache().await })
            .await
    }

    pub async fn stage(&self, mut req: v1::StageRequest) -> Result<v1::StageResponse, Status> {
        self.check_signatures(&req.digest, std::mem::take(&mut req.signatures), true)
            .await?;
        let engine = self.engine.clone();
        let staged = self
            .runtime
            .run(async move { engine.stage(&req.service, &req.digest).await })
            .await?
            .map_err(to_status)?;
        let manifest = staged.manifest;
        Ok(v1::StageResponse {
            digest: staged.digest,
            manifest: Some(v1::Manifest {
                component: manifest.component,
                version: manifest.version,
                os: manifest.os.unwrap_or_default(),
                arch: manifest.arch.unwrap_or_default(),
                files: manifest
                    .files
                    .into_iter()
                    .map(|f| v1::FileEntry {
                        path: f.path,
                        mode: f.mode,
                        size: f.size,
                        digest: f.digest,
                    })
                    .collect(),
            }),
            already_staged: staged.already_staged,
        })
    }

    /// `caller` (see [`patchd_tls::PeerIdentity::describe`]) is journaled with the apply and shown by Status.
    pub async fn apply(
        &self,
        req: v1::ApplyRequest,
        caller: String,
    ) -> Result<v1::ApplyResponse, Status> {
        self.check_signatures(&req.digest, req.signatures, false)
            .await?;
        let command = ApplyCommand {
            service: req.service,
            digest: req.digest,
            patch_id: req.patch_id,
            offline: req.offline,
            caller,
            env_add: {
                let mut env_add: Vec<String> = req
                    .env_add
                    .into_iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                env_add.sort();
                env_add
            },
        };
        let engine = self.engine.clone();
        let report = self
            .runtime
            .run(async move { engine.apply(command).await })
            .await?
            .map_err(to_status)?;
        Ok(response_of(report.result, report.replayed))
    }

    /// An empty `patch_id` gets a generated one (such a rollback cannot be retried idempotently). `caller` as for
    /// [`ApplyService::apply`].
    pub async fn rollback(
        &self,
        req: v1::RollbackRequest,
        caller: String,
    ) -> Result<v1::ApplyResponse, Status> {
        let patch_id = if req.patch_id.is_empty() {
            let millis = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default();
            format!("rollback-{millis}")
        } else {
            req.patch_id
        };
        let command = RollbackCommand {
            service: req.service,
            to_patch_id: Some(req.to_patch_id).filter(|p| !p.is_empty()),
            patch_id,
            caller,
        };
        let engine = self.engine.clone();
        let report = self
            .runtime
            .run(async move { engine.rollback(command).await })
            .await?
            .map_err(to_status)?;
        Ok(response_of(report.result, report.replayed))
    }

    pub async fn status(&self, req: v1::StatusRequest) -> Result<v1::StatusResponse, Status> {
        let engine = self.engine.clone();
        let reports = self
            .runtime
            .run(async move {
                let service = Some(req.service.as_str()).filter(|s| !s.is_empty());
                engine.status(service).await
            })
            .await?
            .map_err(to_status)?;
        Ok(v1::StatusResponse {
            services: reports.into_iter().map(service_status).collect(),
        })
    }
}

/// Engine errors to gRPC: the code says what kind of failure, the message what to do.
fn to_status(err: ApplyError) -> Status {
    let code = match err.kind() {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Internal => Code::Internal,
    };
    if code == Code::Internal {
        tracing::error!(error = %err, "apply engine error");
    }
    Status::new(code, err.to_string())
}

fn outcome_of(outcome: Outcome) -> v1::ApplyOutcome {
    match outcome {
        Outcome::Committed => v1::ApplyOutcome::Committed,
        Outcome::Reverted => v1::ApplyOutcome::Reverted,
        Outcome::OfflineSwapped => v1::ApplyOutcome::OfflineSwapped,
        Outcome::Failed => v1::ApplyOutcome::Failed,
    }
}

fn response_of(result: ApplyResult, replayed: bool) -> v1::ApplyResponse {
    v1::ApplyResponse {
        patch_id: result.patch_id,
        outcome: outcome_of(result.outcome).into(),
        reason: result.reason,
        log_tail: result.log_tail,
        replayed,
        downtime_ms: result.downtime_ms,
        binary_sha256: result.binary_sha256,
        steps: result
            .steps
            .into_iter()
            .map(|(step, millis)| v1::StepTiming { step, millis })
            .collect(),
    }
}

fn applied_of_result(result: &ApplyResult) -> v1::AppliedPatch {
    v1::AppliedPatch {
        patch_id: result.patch_id.clone(),
        digest: result.digest.clone(),
        // for a rollback: the version it returned to
        version: result.version.clone(),
        outcome: outcome_of(result.outcome).into(),
        reason: result.reason.clone(),
        finished_unix: result.finished_unix,
        caller: result.caller.clone(),
    }
}

fn applied_of_history(entry: &HistoryEntry) -> v1::AppliedPatch {
    v1::AppliedPatch {
        patch_id: entry.patch_id.clone(),
        digest: entry.digest.clone(),
        version: entry.version.clone(),
        outcome: outcome_of(entry.outcome).into(),
        reason: String::new(),
        finished_unix: entry.finished_unix,
        caller: entry.caller.clone(),
    }
}

fn service_status(report: ServiceReport) -> v1::ServiceStatus {
    let state = match report.runtime.state {
        RunState::Running => v1::ServiceState::Running,
        RunState::Stopped => v1::ServiceState::Stopped,
        RunState::Failed => v1::ServiceState::Failed,
        RunState::Starting => v1::ServiceState::Starting,
        RunState::Unknown => v1::ServiceState::Unknown,
    };
    v1::ServiceStatus {
        name: report.name,
        component: report.component,
        state: state.into(),
        pid: report.runtime.pid.unwrap_or(0),
        uptime_seconds: report.runtime.uptime_seconds.unwrap_or(0),
        binary_sha256: report.binary_sha256.unwrap_or_default(),
        version: report.version,
        deploy_dir: report.deploy_dir.display().to_string(),
        last: report.last.as_ref().map(applied_of_result),
        apply_in_flight: report.in_flight.is_some(),
        history: report.history.iter().map(applied_of_history).collect(),
        quarantine: report.quarantine.unwrap_or_default(),
        quarantined_backups: report
            .quarantined_backups
            .iter()
            .map(|path| path.display().to_string())
            .collect(),
        image: report.image.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_map_to_codes() {
        let status = to_status(ApplyError::UnknownService {
            name: "x".into(),
            known: "a".into(),
        });
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("this agent manages: a"));
        let status = to_status(ApplyError::InvalidRequest("patch_id".into()));
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}
