//! The engine's side of a `docker` service: planning a container swap for an apply (the staged image package) or
//! a rollback (the image kept from before the undone patches), and the running image for Status.

use super::Engine;
use super::error::ApplyError;
use super::service::Service;
use crate::container::{ImageFacts, aside_name, image_label, new_name};
use crate::file_plan::PlanError;
use crate::journal::{ContainerSwap, HistoryEntry};
use crate::stage::StagedPaths;
use crate::{ApplyCommand, container::ContainerEngine};
use patchd_package::Manifest;
use std::sync::Arc;

impl Engine {
    /// The service's engine and container, and the container as it is now.
    async fn running_container(
        &self,
        svc: &Service,
    ) -> Result<(Arc<dyn ContainerEngine>, String, String, String), ApplyError> {
        let (engine, container) = svc.backend.containers().ok_or_else(|| {
            ApplyError::Internal(format!(
                "service {:?} is not a docker service",
                svc.spec.name
            ))
        })?;
        let old = engine.inspect_container(&container).await?.ok_or_else(|| {
            ApplyError::ContainerMissing {
                service: svc.spec.name.clone(),
                container: container.clone(),
            }
        })?;
        let old_id = old.id.clone().unwrap_or_default();
        let old_image = old.image.clone().unwrap_or_default();
        Ok((engine, container, old_id, old_image))
    }

    /// The swap of an apply: the staged package must be an image package; the container must exist.
    pub(super) async fn plan_container_patch(
        &self,
        svc: &Service,
        command: &ApplyCommand,
        manifest: &Manifest,
    ) -> Result<ContainerSwap, ApplyError> {
        let image = manifest
            .image
            .as_ref()
            .ok_or_else(|| ApplyError::NotAnImage {
                digest: command.digest.clone(),
                service: command.service.clone(),
            })?;
        let archive = StagedPaths::new(&self.inner.state_dir, &command.digest)
            .files()
            .join(&image.archive);
        let (_, container, old_id, old_image) = self.running_container(svc).await?;
        Ok(ContainerSwap {
            env_add: command.env_add.clone(),
            new_name: new_name(&container, &command.patch_id),
            aside_name: aside_name(&container, &command.patch_id),
            container,
            old_id,
            old_image,
            new_image: image.id.clone(),
            archive: Some(archive),
            new_id: None,
        })
    }

    /// The swap of a rollback: back to the image that ran before the oldest undone patch, kept since.
    pub(super) async fn plan_container_rollback(
        &self,
        svc: &Service,
        patch_id: &str,
        undo: &[HistoryEntry],
    ) -> Result<ContainerSwap, ApplyError> {
        let oldest = undo.first().ok_or_else(|| PlanError::NothingToRollBack {
            service: svc.spec.name.clone(),
        })?;
        let previous = oldest
            .previous_image
            .clone()
            .ok_or_else(|| PlanError::BackupPruned {
                patch_id: oldest.patch_id.clone(),
            })?;
        let (_, container, old_id, old_image) = self.running_container(svc).await?;
        Ok(ContainerSwap {
            new_name: new_name(&container, patch_id),
            aside_name: aside_name(&container, patch_id),
            container,
            old_id,
            old_image,
            new_image: previous,
            archive: None,
            new_id: None,
            env_add: Vec::new(),
        })
    }

    /// `tag (short id)` of the image a docker service's container runs; `None` for other backends or when the
    /// engine cannot tell.
    pub(super) async fn running_image(&self, svc: &Service) -> Option<String> {
        let (engine, container) = svc.backend.containers()?;
        let running = engine.inspect_container(&container).await.ok()??;
        let id = running.image?;
        let facts = engine
            .inspect_image(&id)
            .await
            .ok()
            .flatten()
            .unwrap_or(ImageFacts {
                id,
                repo_tags: Vec::new(),
            });
        Some(image_label(&facts))
    }
}
