//! One apply or rollback driven through [`ApplyPhase`], with the journal written before every step that changes
//! something live; the revert path; and recovery of an interrupted apply at agent start.

use crate::backend::{RunState, ServiceRuntime};
use crate::effects::FaultPoint;
use crate::engine::error::ApplyError;
use crate::engine::service::{Inner, Service, agent_supervised, blocking, is_up};
use crate::file_plan;
use crate::journal::{
    ApplyKind, ApplyPhase, ApplyRecord, ApplyResult, HistoryEntry, MAX_HISTORY, Outcome,
};
use crate::layout::StateLayout;
use patchd_package::ContentAlgorithm;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lines of the service's output reported when probation fails.
pub const LOG_TAIL_LINES: usize = 20;
/// First pause between probation checks; doubles up to [`PROBATION_POLL_MAX`] (fast at first, so an instant
/// restart is noticed within milliseconds).
const PROBATION_POLL_START: Duration = Duration::from_millis(5);
const PROBATION_POLL_MAX: Duration = Duration::from_millis(100);

/// Continues with the value on success; a simulated crash ends the run on the spot (like a real one would);
/// any other failure reverts what was done.
macro_rules! or_revert {
    ($run:ident, $result:expr, $what:expr) => {
        match $result {
            Ok(value) => value,
            Err(error) => {
                let error: ApplyError = error.into();
                if let ApplyError::Crash(crash) = error {
                    return Err(crash.into());
                }
                let what: String = $what.into();
                return $run.revert(format!("{what}: {error}")).await;
            }
        }
    };
}

mod container;

/// Why probation ended without success.
enum ProbationEnd {
    Crash(ApplyError),
    Failed(String),
}

struct Run<'a> {
    inner: &'a Inner,
    svc: &'a Service,
    rec: ApplyRecord,
    steps: Vec<(String, u64)>,
    down_since: Option<Instant>,
    downtime_ms: u64,
    /// Time spent writing the journal, reported as the step "journal".
    journal_time: Duration,
}

fn flatten<T, E: Into<ApplyError>>(
    result: Result<Result<T, E>, ApplyError>,
) -> Result<T, ApplyError> {
    result.and_then(|inner| inner.map_err(Into::into))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Runs an apply or rollback whose plan is in `record` (phase `Prepared`) to a final phase.
pub(crate) async fn execute(
    inner: &Inner,
    svc: &Service,
    mut record: ApplyRecord,
    steps: Vec<(String, u64)>,
) -> Result<ApplyResult, ApplyError> {
    record.was_running = svc
        .backend
        .status()
        .await
        .map(|rt| is_up(&rt))
        .unwrap_or(false);
    record.phase = ApplyPhase::Prepared;
    svc.backend.set_auto_restart(false);
    let mut run = Run::new(inner, svc, record);
    run.steps = steps;
    let result = run.drive().await;
    svc.backend.set_auto_restart(true);
    result
}

/// Brings an interrupted apply of `svc` to a final phase (the recovery rule of ARCHITECTURE.md), then makes sure
/// an agent-supervised service runs. When the final journal write fails the files are restored and the service
/// started all the same, and the error is returned: the journal on disk still shows the apply unfinished, so the
/// next start restores the same backups again.
pub(crate) async fn recover_service(inner: &Inner, svc: &Service) -> Result<(), ApplyError> {
    let mut failure = None;
    if let Some(record) = svc
        .journal()
        .current
        .filter(|r| r.phase == ApplyPhase::Committed)
        && let Some(swap) = &record.container
        && let Some((engine, _)) = svc.backend.containers()
    {
        container::finish_container_swap(&engine, swap, true, &record.kind).await;
    }
    if let Some(record) = svc.journal().current.filter(|r| !r.phase.is_final()) {
        let phase = record.phase.clone();
        tracing::warn!(service = %svc.spec.name, patch_id = %record.patch_id, phase = phase.name(), "recovering an interrupted apply");
        svc.backend.set_auto_restart(false);
        let mut run = Run::new(inner, svc, record);
        let outcome = match phase {
            ApplyPhase::Prepared => {
                run.fail_before_live("the agent restarted before the swap began; nothing was changed".into()).await
            }
            ApplyPhase::Reverting { reason, .. } => {
                run.revert(format!("{reason} (the agent restarted during the revert and finished it)")).await
            }
            other => {
                run.revert(format!(
                    "the agent restarted during {} before the apply committed; the previous version was restored",
                    other.name()
                ))
                .await
            }
        };
        svc.backend.set_auto_restart(true);
        match outcome {
            Ok(result) => {
                tracing::warn!(service = %svc.spec.name, patch_id = %result.patch_id, outcome = result.outcome.as_str(), "recovered: {}", result.reason);
            }
            Err(ApplyError::Crash(crash)) => return Err(crash.into()),
            Err(e) => failure = Some(e),
        }
    }
    if agent_supervised(&svc.spec) {
        let up = svc
            .backend
            .status()
            .await
            .map(|rt| is_up(&rt))
            .unwrap_or(false);
        if !up && let Err(e) = svc.backend.start().await {
            tracing::error!(service = %svc.spec.name, "cannot start the service: {e}");
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl<'a> Run<'a> {
    /// Where this apply's files are: the service's deploy dir and the agent's state dir.
    fn sites(&self) -> file_plan::Sites {
        file_plan::Sites {
            deploy_dir: self.svc.spec.deploy_dir.clone(),
            state_dir: self.inner.state_dir.clone(),
            confine: self.inner.confine.clone(),
            faults: Arc::clone(&self.inner.effects.faults),
        }
    }

    fn new(inner: &'a Inner, svc: &'a Service, rec: ApplyRecord) -> Self {
        Run {
            inner,
            svc,
            rec,
            steps: Vec::new(),
            down_since: None,
            downtime_ms: 0,
            journal_time: Duration::ZERO,
        }
    }

    fn now(&self) -> Instant {
        self.inner.effects.clock.now()
    }

    fn step(&mut self, name: &str, since: Instant) {
        let elapsed = self.now().saturating_duration_since(since);
        self.steps.push((name.to_string(), millis(elapsed)));
    }

    fn fault(&self, point: FaultPoint) -> Result<(), ApplyError> {
        Ok(self.inner.effects.faults.hit(point)?)
    }

    /// Records the new phase durably before the step it names begins.
    fn set_phase(&mut self, phase: ApplyPhase) -> Result<(), ApplyError> {
        let since = Instant::now();
        self.rec.phase = phase;
        let record = self.rec.clone();
        let written = self.svc.persist(|journal| journal.current = Some(record));
        self.journal_time += since.elapsed();
        Ok(written?)
    }

    /// During a revert the journal is written as far as possible; a failed write must not stop the revert.
    fn set_phase_best_effort(&mut self, phase: ApplyPhase) {
        if let Err(e) = self.set_phase(phase) {
            tracing::error!(service = %self.svc.spec.name, "journal write failed during revert: {e}");
        }
    }

    async fn drive(&mut self) -> Result<ApplyResult, ApplyError> {
        if self.rec.container.is_some() {
            return self.drive_container().await;
        }
        self.set_phase(ApplyPhase::Prepared)?;
        let started = self.now();
        let (files, dirs) = (self.rec.files.clone(), self.rec.created_dirs.clone());
        let sites = self.sites();
        let hashes = Arc::clone(&self.inner.hashes);
        let prepared =
            flatten(blocking(move || file_plan::prepare(&sites, &hashes, &files, &dirs)).await);
        self.step("prepare", started);
        let verified_temps = match prepared {
            Ok(verified) => verified,
            Err(ApplyError::Crash(crash)) => return Err(crash.into()),
            Err(e) => {
                return self
                    .fail_before_live(format!("preparing backups and new files failed: {e}"))
                    .await;
            }
        };
        self.fault(FaultPoint::AfterPrepare)?;
        if self.rec.files.is_empty() {
            return self
                .commit("every file already matches; nothing was swapped or restarted".into())
                .await;
        }
        let offline = self.rec.offline;
        if !offline {
            self.down_since = Some(self.now());
            if let Err(e) = self.set_phase(ApplyPhase::Stopping) {
                return self
                    .fail_before_live(format!("journal write failed: {e}"))
                    .await;
            }
            let since = self.now();
            or_revert!(
                self,
                self.svc.backend.stop().await,
                "stopping the service failed"
            );
            self.step("stop", since);
            self.fault(FaultPoint::AfterStop)?;
        }
        or_revert!(
            self,
            self.set_phase(ApplyPhase::Swapping { done: 0 }),
            "journal write failed"
        );
        let since = self.now();
        for index in 0..self.rec.files.len() {
            let change = self.rec.files[index].clone();
            let what = format!("swapping {} failed", change.rel.display());
            let (swapping, sites) = (change.clone(), self.sites());
            or_revert!(
                self,
                flatten(blocking(move || file_plan::swap_one(&sites, &swapping)).await),
                what
            );
            or_revert!(
                self,
                self.set_phase(ApplyPhase::Swapping { done: index + 1 }),
                "journal write failed"
            );
            self.fault(FaultPoint::AfterSwap)?;
        }
        let (files, sites) = (self.rec.files.clone(), self.sites());
        or_revert!(
            self,
            flatten(blocking(move || file_plan::sync_target_dirs(&sites, &files)).await),
            "syncing the swapped files failed"
        );
        self.step("swap", since);
        if offline {
            self.remember_swapped(verified_temps).await;
            self.fault(FaultPoint::BeforeCommit)?;
            return self.commit(String::new()).await;
        }
        or_revert!(
            self,
            self.set_phase(ApplyPhase::Starting),
            "journal write failed"
        );
        let since = self.now();
        or_revert!(
            self,
            self.svc.backend.start().await,
            "starting the new version failed"
        );
        self.step("start", since);
        self.remember_swapped(verified_temps).await;
        self.probation_then_commit().await
    }

    /// Records the swapped-in files in the hash cache ([`file_plan::remember_swapped`]); once the service is
    /// started, so it adds nothing to its downtime. A failed blocking task only means the next plan or status
    /// hashes the files.
    async fn remember_swapped(&self, verified: Vec<file_plan::VerifiedTemp>) {
        let (sites, hashes) = (self.sites(), Arc::clone(&self.inner.hashes));
        let _ = blocking(move || file_plan::remember_swapped(&sites, &hashes, &verified)).await;
    }

    /// After the start, shared by the file swap and the container swap: journal `Probation`, watch the service
    /// until healthy (then commit) or failed (then revert).
    async fn probation_then_commit(&mut self) -> Result<ApplyResult, ApplyError> {
        self.fault(FaultPoint::AfterStart)?;
        or_revert!(
            self,
            self.set_phase(ApplyPhase::Probation),
            "journal write failed"
        );
        let since = self.now();
        match self.watch(since, true).await {
            Ok(healthy_at) => {
                self.step("healthy", since);
                if let Some(down) = self.down_since {
                    self.downtime_ms = millis(healthy_at.saturating_duration_since(down));
                }
            }
            Err(ProbationEnd::Crash(crash)) => return Err(crash),
            Err(ProbationEnd::Failed(reason)) => {
                self.step("probation", since);
                return self.revert(reason).await;
            }
        }
        self.step("probation", since);
        self.fault(FaultPoint::BeforeCommit)?;
        self.commit(String::new()).await
    }

    /// Watches a started service until it is healthy (and, with `probation`, has stayed up `min_healthy`), or
    /// fails. Returns when it first answered its probes.
    async fn watch(&mut self, started: Instant, probation: bool) -> Result<Instant, ProbationEnd> {
        let health = self.svc.spec.health.clone();
        let min_healthy = if probation {
            health.min_healthy()
        } else {
            Duration::ZERO
        };
        let timeout = health.timeout();
        let clock = self.inner.effects.clock.clone();
        let mut first_seen: Option<ServiceRuntime> = None;
        let mut healthy_at: Option<Instant> = None;
        let mut last_problem = String::from("it did not report running");
        let mut pause = PROBATION_POLL_START;
        loop {
            if probation {
                self.fault(FaultPoint::DuringProbation)
                    .map_err(ProbationEnd::Crash)?;
            }
            match self.svc.backend.status().await {
                Ok(rt) => match rt.state {
                    RunState::Running => match &first_seen {
                        None => first_seen = Some(rt),
                        Some(first)
                            if first.instance.is_some()
                                && rt.instance.is_some()
                                && first.instance != rt.instance =>
                        {
                            return Err(ProbationEnd::Failed(format!(
                                "the new version restarted (pid {} → {}){}",
                                first.pid.unwrap_or(0),
                                rt.pid.unwrap_or(0),
                                rt.last_exit
                                    .map(|e| format!("; previous run {e}"))
                                    .unwrap_or_default()
                            )));
                        }
                        Some(_) => {}
                    },
                    RunState::Starting if first_seen.is_some() => {
                        return Err(ProbationEnd::Failed(format!(
                            "the new version stopped running{}",
                            rt.last_exit.map(|e| format!(": {e}")).unwrap_or_default()
                        )));
                    }
                    RunState::Starting | RunState::Unknown => {
                        last_problem = "it is still starting".into()
                    }
                    RunState::Stopped | RunState::Failed => {
                        return Err(ProbationEnd::Failed(format!(
                            "the new version {}",
                            rt.last_exit.unwrap_or_else(|| "is not running".into())
                        )));
                    }
                },
                Err(e) => last_problem = format!("status unavailable: {e}"),
            }
            if first_seen.is_some() && healthy_at.is_none() {
                match self.inner.effects.probe.check(&health).await {
                    Ok(()) => healthy_at = Some(clock.now()),
                    Err(problem) => last_problem = problem,
                }
            }
            let elapsed = clock.now().saturating_duration_since(started);
            if let Some(at) = healthy_at
                && elapsed >= min_healthy
            {
                return Ok(at);
            }
            if elapsed >= timeout {
                return Err(ProbationEnd::Failed(format!(
                    "the new version was not healthy within {}: {last_problem}",
                    humantime::format_duration(timeout)
                )));
            }
            let remaining = if healthy_at.is_some() {
                min_healthy.saturating_sub(elapsed)
            } else {
                pause
            };
            clock
                .sleep(pause.min(remaining.max(Duration::from_millis(1))))
                .await;
            pause = (pause * 2).min(PROBATION_POLL_MAX);
        }
    }

    /// Nothing live changed: drop what prepare wrote and record `Failed`.
    async fn fail_before_live(&mut self, reason: String) -> Result<ApplyResult, ApplyError> {
        if self.rec.container.is_some() {
            return self.fail_container_before_live(reason).await;
        }
        let (files, dirs, id) = (
            self.rec.files.clone(),
            self.rec.created_dirs.clone(),
            self.rec.patch_id.clone(),
        );
        let sites = self.sites();
        blocking(move || {
            file_plan::remove_temps(&sites, &files, &id);
            file_plan::remove_created_dirs(&sites, &dirs);
        })
        .await?;
        self.finish(Outcome::Failed, reason, Vec::new()).await
    }

    /// Puts every old file back (all of them: restoring is idempotent), restarts the old version if the service
    /// was running when the apply began, records `Reverted` with `reason`.
    async fn revert(&mut self, mut reason: String) -> Result<ApplyResult, ApplyError> {
        if self.rec.container.is_some() {
            return self.revert_container(reason).await;
        }
        tracing::warn!(service = %self.svc.spec.name, patch_id = %self.rec.patch_id, "reverting: {reason}");
        let since = self.now();
        let offline = self.rec.offline;
        let log_tail = if offline {
            Vec::new()
        } else {
            self.svc.backend.log_tail(LOG_TAIL_LINES).await
        };
        self.set_phase_best_effort(ApplyPhase::Reverting {
            restored: 0,
            reason: reason.clone(),
        });
        if !offline && let Err(e) = self.svc.backend.stop().await {
            reason.push_str(&format!("; stopping the new version failed: {e}"));
        }
        for index in 0..self.rec.files.len() {
            let change = self.rec.files[index].clone();
            let id = self.rec.patch_id.clone();
            let (restoring, sites) = (change.clone(), self.sites());
            // Not recorded in the hash cache: the restored file has a new ctime, so it is hashed again.
            match flatten(blocking(move || file_plan::restore_one(&sites, &restoring, &id)).await) {
                Ok(()) => {}
                Err(ApplyError::Crash(crash)) => return Err(crash.into()),
                Err(e) => {
                    reason.push_str(&format!("; restoring {} failed: {e}", change.rel.display()))
                }
            }
            self.set_phase_best_effort(ApplyPhase::Reverting {
                restored: index + 1,
                reason: reason.clone(),
            });
            self.fault(FaultPoint::DuringRevert)?;
        }
        let (files, dirs, id) = (
            self.rec.files.clone(),
            self.rec.created_dirs.clone(),
            self.rec.patch_id.clone(),
        );
        let sites = self.sites();
        blocking(move || {
            file_plan::remove_temps(&sites, &files, &id);
            file_plan::remove_created_dirs(&sites, &dirs);
        })
        .await?;
        if !offline && !self.rec.was_running {
            reason
                .push_str("; the service was not running before the apply, so it was left stopped");
        }
        if !offline && self.rec.was_running {
            let started = self.now();
            match self.svc.backend.start().await {
                Err(e) => reason.push_str(&format!("; the previous version did not start: {e}")),
                Ok(()) => match self.watch(started, false).await {
                    Ok(healthy_at) => {
                        if let Some(down) = self.down_since {
                            self.downtime_ms = millis(healthy_at.saturating_duration_since(down));
                        }
                    }
                    Err(ProbationEnd::Crash(crash)) => return Err(crash),
                    Err(ProbationEnd::Failed(problem)) => {
                        reason.push_str(&format!(
                            "; the previous version is not healthy either: {problem}"
                        ));
                    }
                },
            }
        }
        self.step("revert", since);
        self.finish(Outcome::Reverted, reason, log_tail).await
    }

    async fn commit(&mut self, note: String) -> Result<ApplyResult, ApplyError> {
        let outcome = if self.rec.offline {
            Outcome::OfflineSwapped
        } else {
            Outcome::Committed
        };
        self.finish(outcome, note, Vec::new()).await
    }

    /// The sha256 of `target` without reading it, when a patch of a format-1 package (sha256 digests) placed it as
    /// a hard link of its staged file: that inode's content was checked against the manifest when it was staged,
    /// and staged files are never written in place. Anything else (a BLAKE3 digest, a copy, a rollback's backup, a
    /// file changed since) is `None`: hash it.
    fn staged_sha256(&self, target: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        if self.rec.kind != ApplyKind::Patch {
            return None;
        }
        let change = self
            .rec
            .files
            .iter()
            .find(|change| change.target == target)?;
        let (source, sha256) = (change.source.as_deref()?, change.new_digest.as_ref()?);
        if ContentAlgorithm::of(sha256) != ContentAlgorithm::Sha256 {
            return None;
        }
        let placed = std::fs::symlink_metadata(target).ok()?;
        let staged = std::fs::symlink_metadata(source).ok()?;
        let same_inode = placed.file_type().is_file()
            && (placed.dev(), placed.ino()) == (staged.dev(), staged.ino());
        same_inode.then(|| sha256.clone())
    }

    /// Writes the final phase, the result and the history in one journal write, then deletes what is no
    /// longer needed (backups of pruned, rolled-back or reverted applies).
    async fn finish(
        &mut self,
        outcome: Outcome,
        reason: String,
        log_tail: Vec<String>,
    ) -> Result<ApplyResult, ApplyError> {
        let since = self.now();
        let binary = self.svc.spec.binary_path();
        let committed = matches!(outcome, Outcome::Committed | Outcome::OfflineSwapped);
        // A container's files are in its image: there is no deployed binary to hash.
        let binary_sha256 = if self.rec.container.is_some() {
            String::new()
        } else {
            committed
                .then(|| self.staged_sha256(&binary))
                .flatten()
                .unwrap_or_else(|| {
                    let hashes_owner = self.inner.hashes.digest(&binary, ContentAlgorithm::Sha256);
                    hashes_owner.ok().flatten().unwrap_or_default()
                })
        };
        self.rec.phase = match outcome {
            Outcome::Committed | Outcome::OfflineSwapped => ApplyPhase::Committed,
            Outcome::Reverted => ApplyPhase::Reverted,
            Outcome::Failed => ApplyPhase::Failed,
        };
        self.step("finish", since);
        self.steps
            .push(("journal".into(), millis(self.journal_time)));
        let finished_unix = self.inner.effects.clock.unix_now();
        let result = ApplyResult {
            patch_id: self.rec.patch_id.clone(),
            kind: self.rec.kind.clone(),
            digest: self.rec.digest.clone(),
            version: self.rec.version.clone(),
            outcome,
            reason,
            log_tail,
            downtime_ms: self.downtime_ms,
            binary_sha256,
            steps: self.steps.clone(),
            finished_unix,
            caller: self.rec.caller.clone(),
        };
        let record = self.rec.clone();
        let stored = result.clone();
        let keep = self.inner.keep_backups;
        let mut obsolete: Vec<PathBuf> = Vec::new();
        // Directories of rolled-back patches, removed (when empty) only once the rollback's commit is durable:
        // were the rollback reverted instead, its files would need them again.
        let mut emptied_dirs: Vec<PathBuf> = Vec::new();
        // Rollback images of container patches whose history entry is pruned now.
        let mut pruned_images: Vec<String> = Vec::new();
        self.svc.persist(|journal| {
            journal.current = Some(record.clone());
            journal.push_result(stored);
            if !committed {
                obsolete.push(record.backup_dir.clone());
                return;
            }
            match &record.kind {
                ApplyKind::Patch => journal.history.push(HistoryEntry {
                    patch_id: record.patch_id.clone(),
                    digest: record.digest.clone(),
                    version: record.version.clone(),
                    outcome,
                    finished_unix,
                    backup_dir: record.backup_dir.clone(),
                    backup_kept: true,
                    files: record.files.clone(),
                    created_dirs: record.created_dirs.clone(),
                    previous_image: record.container.as_ref().map(|c| c.old_image.clone()),
                    caller: record.caller.clone(),
                }),
                ApplyKind::Rollback { undoes } => {
                    emptied_dirs.extend(
                        journal
                            .history
                            .iter()
                            .filter(|h| undoes.contains(&h.patch_id))
                            .flat_map(|h| h.created_dirs.iter().cloned()),
                    );
                    obsolete.extend(
                        journal
                            .history
                            .iter()
                            .filter(|h| undoes.contains(&h.patch_id))
                            .map(|h| h.backup_dir.clone()),
                    );
                    journal.history.retain(|h| !undoes.contains(&h.patch_id));
                    obsolete.push(record.backup_dir.clone());
                }
            }
            let kept: Vec<usize> = (0..journal.history.len())
                .filter(|&i| journal.history[i].backup_kept)
                .collect();
            for &index in kept.iter().take(kept.len().saturating_sub(keep)) {
                let entry = &mut journal.history[index];
                entry.backup_kept = false;
                entry.files.clear();
                entry.created_dirs.clear();
                pruned_images.extend(entry.previous_image.take());
                obsolete.push(entry.backup_dir.clone());
            }
            let excess = journal.history.len().saturating_sub(MAX_HISTORY);
            for entry in journal.history.drain(..excess) {
                obsolete.push(entry.backup_dir);
            }
        })?;
        let (files, id) = (self.rec.files.clone(), self.rec.patch_id.clone());
        let sites = self.sites();
        blocking(move || {
            file_plan::remove_temps(&sites, &files, &id);
            file_plan::remove_created_dirs(&sites, &emptied_dirs);
            for dir in obsolete {
                if let Err(e) = crate::fsutil::remove_tree_if_exists(&dir) {
                    tracing::warn!("cannot remove backup set {}: {e}", dir.display());
                }
            }
        })
        .await?;
        if self.rec.container.is_some() {
            self.tidy_containers(committed, pruned_images).await;
        }
        self.inner.hashes.save();
        let journal_dir = StateLayout::new(&self.inner.state_dir).journal();
        blocking(move || crate::engine::service::ensure_space_reserve(&journal_dir)).await?;
        tracing::info!(service = %self.svc.spec.name, patch_id = %result.patch_id, outcome = outcome.as_str(), downtime_ms = result.downtime_ms, "apply finished");
        if outcome != Outcome::Failed {
            self.inner.prune_cache().await;
        }
        Ok(result)
    }
}
