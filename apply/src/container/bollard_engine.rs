//! The real [`ContainerEngine`]: the Docker Engine API on a Unix socket through bollard. The connection is made
//! (and the API version negotiated) at the first call, so an agent starts while the engine is down and says
//! which socket did not answer when a call needs it.

use super::{ContainerEngine, ContainerError, ImageFacts};
use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ImportImageOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, RenameContainerOptionsBuilder, StartContainerOptions,
    StopContainerOptionsBuilder,
};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::OnceCell;

/// Seconds a single engine call may take: loading a large image is the longest.
const CALL_TIMEOUT_SECS: u64 = 600;

/// The Docker Engine on a Unix socket.
#[derive(Debug)]
pub struct BollardEngine {
    socket: PathBuf,
    client: OnceCell<Docker>,
}

impl BollardEngine {
    /// An engine on `socket`; nothing is connected until the first call.
    pub fn new(socket: &Path) -> Self {
        BollardEngine {
            socket: socket.to_path_buf(),
            client: OnceCell::new(),
        }
    }

    fn unreachable(&self, detail: impl std::fmt::Display) -> ContainerError {
        ContainerError::Unreachable {
            socket: self.socket.clone(),
            detail: detail.to_string(),
        }
    }

    async fn client(&self) -> Result<&Docker, ContainerError> {
        self.client
            .get_or_try_init(|| async {
                let path = self.socket.to_string_lossy();
                let docker = Docker::connect_with_unix(
                    &path,
                    CALL_TIMEOUT_SECS,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| self.unreachable(e))?;
                docker
                    .negotiate_version()
                    .await
                    .map_err(|e| self.unreachable(e))
            })
            .await
    }

    /// A failed call: a transport error means the engine went away; an answer is reported as it came.
    fn call_error(&self, op: &'static str, target: &str, error: DockerError) -> ContainerError {
        match error {
            DockerError::HyperResponseError { .. }
            | DockerError::IOError { .. }
            | DockerError::SocketNotFoundError(_)
            | DockerError::RequestTimeoutError => self.unreachable(error),
            DockerError::DockerResponseServerError { message, .. } => ContainerError::Call {
                op,
                target: target.to_string(),
                detail: message,
            },
            other => ContainerError::Call {
                op,
                target: target.to_string(),
                detail: other.to_string(),
            },
        }
    }
}

fn is_not_found(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn is_not_modified(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 304,
            ..
        }
    )
}

#[async_trait]
impl ContainerEngine for BollardEngine {
    fn socket(&self) -> &Path {
        &self.socket
    }

    async fn load_image(&self, archive: &Path) -> Result<(), ContainerError> {
        let docker = self.client().await?;
        let file =
            tokio::fs::File::open(archive)
                .await
                .map_err(|source| ContainerError::Archive {
                    path: archive.to_path_buf(),
                    source,
                })?;
        // 1 MiB reads: the engine, not this copy, should be what a load costs.
        let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        let options = ImportImageOptionsBuilder::default().quiet(true).build();
        let mut progress = docker.import_image(options, bollard::body_try_stream(body), None);
        let target = archive.display().to_string();
        while let Some(item) = progress.next().await {
            item.map_err(|e| self.call_error("load", &target, e))?;
        }
        Ok(())
    }

    async fn inspect_image(&self, reference: &str) -> Result<Option<ImageFacts>, ContainerError> {
        let docker = self.client().await?;
        match docker.inspect_image(reference).await {
            Ok(image) => Ok(Some(ImageFacts {
                id: image.id.unwrap_or_default(),
                repo_tags: image.repo_tags.unwrap_or_default(),
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.call_error("image inspect", reference, e)),
        }
    }

    async fn inspect_container(
        &self,
        name: &str,
    ) -> Result<Option<ContainerInspectResponse>, ContainerError> {
        let docker = self.client().await?;
        match docker.inspect_container(name, None).await {
            Ok(found) => Ok(Some(found)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.call_error("inspect", name, e)),
        }
    }

    async fn create_container(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, ContainerError> {
        let docker = self.client().await?;
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        docker
            .create_container(Some(options), body)
            .await
            .map(|created| created.id)
            .map_err(|e| self.call_error("create", name, e))
    }

    async fn start_container(&self, name: &str) -> Result<(), ContainerError> {
        let docker = self.client().await?;
        match docker
            .start_container(name, None::<StartContainerOptions>)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_modified(&e) => Ok(()),
            Err(e) => Err(self.call_error("start", name, e)),
        }
    }

    async fn stop_container(&self, name: &str, grace: Duration) -> Result<(), ContainerError> {
        let docker = self.client().await?;
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        match docker.stop_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_modified(&e) => Ok(()),
            Err(e) => Err(self.call_error("stop", name, e)),
        }
    }

    async fn rename_container(&self, name: &str, new_name: &str) -> Result<(), ContainerError> {
        let docker = self.client().await?;
        let options = RenameContainerOptionsBuilder::default()
            .name(new_name)
            .build();
        docker
            .rename_container(name, options)
            .await
            .map_err(|e| self.call_error("rename", name, e))
    }

    async fn remove_container(&self, name: &str) -> Result<(), ContainerError> {
        let docker = self.client().await?;
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.call_error("rm", name, e)),
        }
    }

    async fn remove_image(&self, id: &str) -> Result<(), ContainerError> {
        let docker = self.client().await?;
        let options = RemoveImageOptionsBuilder::default().build();
        match docker.remove_image(id, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.call_error("rmi", id, e)),
        }
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
