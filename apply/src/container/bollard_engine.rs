//! The real [`ContainerEngine`]: the Docker Engine on a Unix socket through the workspace's one client
//! (`patchd_docker::Engine`). The connection is made (and the API version negotiated) at the first call, so an
//! agent starts while the engine is down and says which socket did not answer when a call needs it.

use super::{ContainerEngine, ContainerError, ImageFacts};
use async_trait::async_trait;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse};
use patchd_docker::{DockerError, Engine};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::OnceCell;

/// The Docker Engine on a Unix socket.
#[derive(Debug)]
pub struct BollardEngine {
    socket: PathBuf,
    engine: OnceCell<Engine>,
}

impl BollardEngine {
    /// An engine on `socket`; nothing is connected until the first call.
    pub fn new(socket: &Path) -> Self {
        BollardEngine {
            socket: socket.to_path_buf(),
            engine: OnceCell::new(),
        }
    }

    async fn engine(&self) -> Result<&Engine, ContainerError> {
        self.engine
            .get_or_try_init(|| Engine::connect(&self.socket))
            .await
            .map_err(|e| self.container_error("connect", &self.socket.display().to_string(), e))
    }

    /// The agent's words for a failed call: the service's `docker_socket` is what to fix when the engine does not
    /// answer; an answer is reported as `docker <op> <target>` with the engine's message.
    fn container_error(
        &self,
        op: &'static str,
        target: &str,
        error: DockerError,
    ) -> ContainerError {
        match error {
            DockerError::Unreachable { detail, .. } => ContainerError::Unreachable {
                socket: self.socket.clone(),
                detail,
            },
            DockerError::File { path, source, .. } => ContainerError::Archive { path, source },
            DockerError::Call { detail, .. } => ContainerError::Call {
                op,
                target: target.to_string(),
                detail,
            },
            other => ContainerError::Call {
                op,
                target: target.to_string(),
                detail: other.to_string(),
            },
        }
    }
}

#[async_trait]
impl ContainerEngine for BollardEngine {
    fn socket(&self) -> &Path {
        &self.socket
    }

    async fn load_image(&self, archive: &Path) -> Result<(), ContainerError> {
        let target = archive.display().to_string();
        self.engine()
            .await?
            .load_image(archive)
            .await
            .map_err(|e| self.container_error("load", &target, e))
    }

    async fn inspect_image(&self, reference: &str) -> Result<Option<ImageFacts>, ContainerError> {
        let found = self
            .engine()
            .await?
            .inspect_image(reference)
            .await
            .map_err(|e| self.container_error("image inspect", reference, e))?;
        Ok(found.map(|image| ImageFacts {
            id: image.id.unwrap_or_default(),
            repo_tags: image.repo_tags.unwrap_or_default(),
        }))
    }

    async fn inspect_container(
        &self,
        name: &str,
    ) -> Result<Option<ContainerInspectResponse>, ContainerError> {
        self.engine()
            .await?
            .inspect_container(name)
            .await
            .map_err(|e| self.container_error("inspect", name, e))
    }

    async fn create_container(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, ContainerError> {
        self.engine()
            .await?
            .create_container(name, body)
            .await
            .map_err(|e| self.container_error("create", name, e))
    }

    async fn start_container(&self, name: &str) -> Result<(), ContainerError> {
        self.engine()
            .await?
            .start_container(name)
            .await
            .map_err(|e| self.container_error("start", name, e))
    }

    async fn stop_container(&self, name: &str, grace: Duration) -> Result<(), ContainerError> {
        self.engine()
            .await?
            .stop_container(name, grace)
            .await
            .map_err(|e| self.container_error("stop", name, e))
    }

    async fn rename_container(&self, name: &str, new_name: &str) -> Result<(), ContainerError> {
        self.engine()
            .await?
            .rename_container(name, new_name)
            .await
            .map_err(|e| self.container_error("rename", name, e))
    }

    async fn remove_container(&self, name: &str) -> Result<(), ContainerError> {
        self.engine()
            .await?
            .remove_container(name)
            .await
            .map_err(|e| self.container_error("rm", name, e))
    }

    async fn remove_image(&self, id: &str) -> Result<(), ContainerError> {
        self.engine()
            .await?
            .remove_image(id, false)
            .await
            .map_err(|e| self.container_error("rmi", id, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_engine_that_does_not_answer_is_named_by_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let engine = BollardEngine::new(&socket);
        let err = engine.inspect_container("oms").await.unwrap_err();
        assert!(matches!(err, ContainerError::Unreachable { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("unix://{}", socket.display()))
                && text.contains("docker_socket"),
            "{text}"
        );
    }
}
