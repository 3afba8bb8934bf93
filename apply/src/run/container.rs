//! The container swap of a `docker` service, through the same [`ApplyPhase`]s as the file swap and journaled the
//! same way ([`ContainerSwap`] in the record says which container is which): `Prepared` verify and load the
//! staged image archive (a rollback uses the kept image), check the engine has the manifest's image ID, create
//! the new container from the old one's configuration; `Stopping` stop the old one; `Swapping{1}` rename it aside;
//! `Swapping{2}` give the new one the service's name; `Starting`; `Probation`; `Committed` remove the old
//! container (its image is kept for rollback). A revert removes the new container, renames the old one back and
//! starts it: the same container ID runs again. Fault points as in the file swap.
//!
//! The new container's environment is the old one's plus the spec's `env_add` plus the request's (`ApplyRequest.
//! env_add`, journaled in [`ContainerSwap`]), later ones winning. A container that was stopped before the apply
//! (an upgrade runbook stops it first) is swapped the same way: the new one is started and must pass probation.
//! Its revert puts the old container back under its name and leaves it stopped, as it was.

use super::{ProbationEnd, Run, millis};
use crate::container::recreate::{Recreate, new_container_body};
use crate::container::{ContainerEngine, ContainerError, bare_name};
use crate::effects::FaultPoint;
use crate::engine::error::ApplyError;
use crate::engine::service::blocking;
use crate::journal::{ApplyPhase, ApplyResult, ContainerSwap, Outcome};
use std::sync::Arc;

impl Run<'_> {
    /// The swap in the record, and the service's engine.
    fn container_parts(&self) -> Result<(ContainerSwap, Arc<dyn ContainerEngine>), ApplyError> {
        let swap = self.rec.container.clone().ok_or_else(|| {
            ApplyError::Internal("a container apply without its container swap".into())
        })?;
        let (engine, _) = self.svc.backend.containers().ok_or_else(|| {
            ApplyError::Internal(format!(
                "service {:?} has a container swap in its journal but is not a docker service; restore its \
                 backend = \"docker\" in the agent config",
                self.svc.spec.name
            ))
        })?;
        Ok((swap, engine))
    }

    /// Runs a container apply whose swap is in the record (phase `Prepared`) to a final phase.
    pub(super) async fn drive_container(&mut self) -> Result<ApplyResult, ApplyError> {
        self.set_phase(ApplyPhase::Prepared)?;
        let (_, engine) = self.container_parts()?;
        let started = self.now();
        match self.prepare_container(&engine).await {
            Ok(()) => {}
            Err(ApplyError::Crash(crash)) => return Err(crash.into()),
            Err(e) => return self.fail_before_live(e.to_string()).await,
        }
        self.step("prepare", started);
        self.fault(FaultPoint::AfterPrepare)?;
        let (swap, _) = self.container_parts()?;
        let new_id = swap.new_id.clone().unwrap_or_else(|| swap.new_name.clone());
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
                engine
                    .stop_container(&swap.old_id, self.svc.spec.stop_timeout())
                    .await,
                "stopping the old container failed"
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
        or_revert!(
            self,
            engine
                .rename_container(&swap.old_id, &swap.aside_name)
                .await,
            format!("renaming the old container to {} failed", swap.aside_name)
        );
        or_revert!(
            self,
            self.set_phase(ApplyPhase::Swapping { done: 1 }),
            "journal write failed"
        );
        self.fault(FaultPoint::AfterSwap)?;
        or_revert!(
            self,
            engine.rename_container(&new_id, &swap.container).await,
            format!("renaming the new container to {} failed", swap.container)
        );
        or_revert!(
            self,
            self.set_phase(ApplyPhase::Swapping { done: 2 }),
            "journal write failed"
        );
        self.fault(FaultPoint::AfterSwap)?;
        self.step("swap", since);
        if offline {
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
            engine.start_container(&new_id).await,
            "starting the new container failed"
        );
        self.step("start", since);
        self.probation_then_commit().await
    }

    /// Verifies and loads the staged image (a rollback's image must still be on the host), checks the engine has
    /// exactly the expected image ID, and creates the new container (journaled once created). Nothing live
    /// changes.
    async fn prepare_container(
        &mut self,
        engine: &Arc<dyn ContainerEngine>,
    ) -> Result<(), ApplyError> {
        let (swap, _) = self.container_parts()?;
        if let Some(archive) = swap.archive.clone() {
            let (state_dir, digest) = (self.inner.state_dir.clone(), self.rec.digest.clone());
            let checked = archive.clone();
            blocking(move || -> Result<(), String> {
                let manifest = crate::stage::load_staged(&state_dir, &digest)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!("package {digest} is no longer staged; stage it again")
                    })?;
                let image = manifest
                    .image
                    .ok_or_else(|| format!("package {digest} has no image in its manifest"))?;
                patchd_package::verify_image_archive(&checked, &image).map_err(|e| e.to_string())
            })
            .await?
            .map_err(|problem| {
                ApplyError::InvalidRequest(format!(
                    "the staged image archive {} was refused before loading: {problem}",
                    archive.display()
                ))
            })?;
            engine.load_image(&archive).await?;
        }
        let loaded = engine.inspect_image(&swap.new_image).await?;
        if loaded.as_ref().map(|facts| facts.id.as_str()) != Some(swap.new_image.as_str()) {
            return Err(ApplyError::InvalidRequest(match swap.archive {
                Some(archive) => format!(
                    "loading {} did not give the engine image {} that the package's manifest names; the archive \
                     and its manifest disagree: rebuild the package",
                    archive.display(),
                    swap.new_image
                ),
                None => format!(
                    "image {} is no longer on this host (removed by hand?); it cannot be rolled back to",
                    swap.new_image
                ),
            }));
        }
        let old = engine
            .inspect_container(&swap.old_id)
            .await?
            .ok_or_else(|| ApplyError::ContainerMissing {
                service: self.svc.spec.name.clone(),
                container: swap.container.clone(),
            })?;
        if self.rec.offline && old.state.as_ref().and_then(|s| s.running) == Some(true) {
            return Err(ApplyError::InvalidRequest(format!(
                "an offline apply recreates container {:?} without starting it, but it is running; stop it \
                 first (docker stop {}) or apply online",
                swap.container, swap.container
            )));
        }
        // A container of this name is a leftover of this very apply (the agent died before journaling its ID).
        engine.remove_container(&swap.new_name).await?;
        let env_add: Vec<String> = self
            .svc
            .spec
            .env_add
            .iter()
            .chain(&swap.env_add)
            .cloned()
            .collect();
        let body = new_container_body(
            &old,
            &Recreate {
                image: &swap.new_image,
                env_add: &env_add,
                use_image_defaults: self.svc.spec.use_image_defaults,
            },
        );
        let id = engine.create_container(&swap.new_name, body).await?;
        if let Some(swap) = self.rec.container.as_mut() {
            swap.new_id = Some(id);
        }
        self.set_phase(ApplyPhase::Prepared)
    }

    /// Nothing live changed: remove the new container if it was created, record `Failed`.
    pub(super) async fn fail_container_before_live(
        &mut self,
        mut reason: String,
    ) -> Result<ApplyResult, ApplyError> {
        let (swap, engine) = self.container_parts()?;
        for name in swap.new_id.iter().chain(std::iter::once(&swap.new_name)) {
            match engine.remove_container(name).await {
                Ok(()) => {}
                Err(e @ ContainerError::Unreachable { .. }) => return Err(e.into()),
                Err(e) => reason.push_str(&format!("; removing the new container failed: {e}")),
            }
        }
        self.finish(Outcome::Failed, reason, Vec::new()).await
    }

    /// Removes the new container, puts the old one back under its name and starts it if it ran before: the same
    /// container ID runs again. Idempotent, so recovery can run it again. An engine that does not answer leaves
    /// the journal unfinished (the next start of the agent reverts again) instead of recording a revert that
    /// did not happen.
    pub(super) async fn revert_container(
        &mut self,
        mut reason: String,
    ) -> Result<ApplyResult, ApplyError> {
        tracing::warn!(service = %self.svc.spec.name, patch_id = %self.rec.patch_id, "reverting the container swap: {reason}");
        let since = self.now();
        let (swap, engine) = self.container_parts()?;
        self.set_phase_best_effort(ApplyPhase::Reverting {
            restored: 0,
            reason: reason.clone(),
        });
        let unreachable = |e: ContainerError| -> Result<(), ApplyError> {
            match e {
                ContainerError::Unreachable { .. } => Err(e.into()),
                _ => Ok(()),
            }
        };
        for name in swap.new_id.iter().chain(std::iter::once(&swap.new_name)) {
            if let Err(e) = engine.remove_container(name).await {
                reason.push_str(&format!("; removing the new container failed: {e}"));
                unreachable(e)?;
            }
        }
        match engine.inspect_container(&swap.old_id).await {
            Ok(Some(old)) if bare_name(&old) != swap.container => {
                if let Err(e) = engine.rename_container(&swap.old_id, &swap.container).await {
                    reason.push_str(&format!(
                        "; renaming the previous container back to {} failed: {e}",
                        swap.container
                    ));
                    unreachable(e)?;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => reason.push_str(&format!(
                "; the previous container {} no longer exists",
                crate::container::short_id(&swap.old_id)
            )),
            Err(e) => {
                reason.push_str(&format!(
                    "; the previous container cannot be inspected: {e}"
                ));
                unreachable(e)?;
            }
        }
        self.set_phase_best_effort(ApplyPhase::Reverting {
            restored: 1,
            reason: reason.clone(),
        });
        self.fault(FaultPoint::DuringRevert)?;
        let offline = self.rec.offline;
        if !offline && !self.rec.was_running {
            reason.push_str(
                "; the container was not running before the apply, so it was left stopped",
            );
        }
        if !offline && self.rec.was_running {
            let started = self.now();
            match engine.start_container(&swap.old_id).await {
                Err(e) => {
                    reason.push_str(&format!("; the previous container did not start: {e}"));
                    unreachable(e)?;
                }
                Ok(()) => match self.watch(started, false).await {
                    Ok(healthy_at) => {
                        if let Some(down) = self.down_since {
                            self.downtime_ms = millis(healthy_at.saturating_duration_since(down));
                        }
                    }
                    Err(ProbationEnd::Crash(crash)) => return Err(crash),
                    Err(ProbationEnd::Failed(problem)) => reason.push_str(&format!(
                        "; the previous container is not healthy either: {problem}"
                    )),
                },
            }
        }
        self.step("revert", since);
        self.finish(Outcome::Reverted, reason, Vec::new()).await
    }

    /// After the final journal write of a container apply: a commit removes the old container (and, for a
    /// rollback, the image it ran: nothing refers to it any more); images of pruned history entries go too.
    pub(super) async fn tidy_containers(&self, committed: bool, pruned_images: Vec<String>) {
        let Ok((swap, engine)) = self.container_parts() else {
            return;
        };
        finish_container_swap(&engine, &swap, committed, &self.rec.kind).await;
        for image in pruned_images {
            if let Err(e) = engine.remove_image(&image).await {
                tracing::warn!(service = %self.svc.spec.name, "cannot remove the pruned rollback image {image}: {e}");
            }
        }
    }
}

/// A committed swap's old container is removed (only while it is not the one under the service's name); a
/// rollback's old image too. Also run at agent start for a committed record, after a crash right after its
/// final journal write.
pub(super) async fn finish_container_swap(
    engine: &Arc<dyn ContainerEngine>,
    swap: &ContainerSwap,
    committed: bool,
    kind: &crate::journal::ApplyKind,
) {
    if !committed {
        return;
    }
    match engine.inspect_container(&swap.old_id).await {
        Ok(Some(old)) if bare_name(&old) != swap.container => {
            if let Err(e) = engine.remove_container(&swap.old_id).await {
                tracing::warn!(container = %swap.container, "cannot remove the previous container {}: {e}", swap.aside_name);
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(container = %swap.container, "cannot inspect the previous container {}: {e}", swap.aside_name)
        }
    }
    if matches!(kind, crate::journal::ApplyKind::Rollback { .. })
        && let Err(e) = engine.remove_image(&swap.old_image).await
    {
        tracing::warn!(container = %swap.container, "cannot remove the rolled-back image {}: {e}", swap.old_image);
    }
}
