//! The local Docker Engine (`DockerEngine`), reached over its Unix socket through the Engine API (`bollard`): what
//! `patchctl package build --image <reference>` (export) and `patchctl demo up --containers` (build, run, list,
//! remove) need from it.

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StartContainerOptions,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// The socket the engine listens on when `DOCKER_HOST` does not name another.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Seconds any single Engine API call may take (exports of large images stream well within it).
const ENGINE_TIMEOUT_SECS: u64 = 600;

/// Why the engine could not do what was asked; each names the socket or the image and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// `DOCKER_HOST` names something other than a Unix socket.
    #[error(
        "DOCKER_HOST={value} is not a Unix socket: patchctl reaches the Docker Engine only over its Unix socket; \
         set DOCKER_HOST=unix:///path/to/docker.sock or unset it (default {DEFAULT_SOCKET})"
    )]
    NotUnixSocket { value: String },

    /// No engine answers on the socket.
    #[error(
        "no Docker Engine answers on {}: {detail}; start the Docker Engine (`systemctl start docker` or `dockerd`), \
         or point DOCKER_HOST=unix://… at its socket",
        socket.display()
    )]
    Unreachable { socket: PathBuf, detail: String },

    /// The engine has no image by that reference.
    #[error(
        "the Docker Engine on {} has no image `{reference}` ({detail}); build or load it first \
         (`docker images` lists what it has), or pass a `docker save` archive instead",
        socket.display()
    )]
    NoSuchImage {
        socket: PathBuf,
        reference: String,
        detail: String,
    },

    /// The engine failed while exporting the image.
    #[error("exporting image `{reference}` from the Docker Engine on {} failed: {detail}", socket.display())]
    Export {
        socket: PathBuf,
        reference: String,
        detail: String,
    },

    /// An Engine API call failed (build, create, start, list, remove).
    #[error("{action} on the Docker Engine on {} failed: {detail}", socket.display())]
    Call {
        action: String,
        socket: PathBuf,
        detail: String,
    },

    /// Writing the exported archive failed.
    #[error("cannot write {}: {cause}", path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// A connection to the local engine that has answered a ping.
pub struct DockerEngine {
    docker: Docker,
    socket: PathBuf,
}

impl DockerEngine {
    /// Connects to the socket `DOCKER_HOST` names (`unix://…`), or [`DEFAULT_SOCKET`], and pings it.
    pub async fn connect() -> Result<Self, DockerError> {
        let socket = match std::env::var("DOCKER_HOST") {
            Ok(value) if !value.is_empty() => match value.strip_prefix("unix://") {
                Some(path) => PathBuf::from(path),
                None => return Err(DockerError::NotUnixSocket { value }),
            },
            _ => PathBuf::from(DEFAULT_SOCKET),
        };
        Self::connect_to(&socket).await
    }

    /// Connects to the engine on `socket` and pings it.
    pub async fn connect_to(socket: &Path) -> Result<Self, DockerError> {
        let unreachable = |detail: String| DockerError::Unreachable {
            socket: socket.to_owned(),
            detail,
        };
        let docker = Docker::connect_with_unix(
            &socket.to_string_lossy(),
            ENGINE_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| unreachable(e.to_string()))?;
        docker
            .ping()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Self {
            docker,
            socket: socket.to_owned(),
        })
    }

    /// The socket this engine answers on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bollard client, for callers that need more of the Engine API (the container demo).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Writes `docker save <reference>` to `dest` (created, or truncated), streaming.
    pub async fn export_image(&self, reference: &str, dest: &Path) -> Result<(), DockerError> {
        self.docker
            .inspect_image(reference)
            .await
            .map_err(|e| DockerError::NoSuchImage {
                socket: self.socket.clone(),
                reference: reference.to_owned(),
                detail: e.to_string(),
            })?;
        let write_error = |cause| DockerError::Write {
            path: dest.to_owned(),
            cause,
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(write_error)?;
        let mut stream = self.docker.export_image(reference);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| DockerError::Export {
                socket: self.socket.clone(),
                reference: reference.to_owned(),
                detail: e.to_string(),
            })?;
            file.write_all(&chunk).await.map_err(write_error)?;
        }
        file.flush().await.map_err(write_error)?;
        file.sync_all().await.map_err(write_error)
    }
}

impl DockerEngine {
    fn call_error(&self, action: String, detail: impl std::fmt::Display) -> DockerError {
        DockerError::Call {
            action,
            socket: self.socket.clone(),
            detail: detail.to_string(),
        }
    }

    /// `docker build -t tag` of a build context (an uncompressed tar holding a `Dockerfile`); returns the image ID.
    pub async fn build_image(&self, tag: &str, context: Vec<u8>) -> Result<String, DockerError> {
        let options = BuildImageOptionsBuilder::default()
            .dockerfile("Dockerfile")
            .t(tag)
            .rm(true)
            .forcerm(true)
            .build();
        let action = || format!("building image {tag}");
        let mut stream =
            self.docker
                .build_image(options, None, Some(bollard::body_full(context.into())));
        while let Some(step) = stream.next().await {
            let step = step.map_err(|e| self.call_error(action(), e))?;
            if let Some(message) = step.error_detail.and_then(|detail| detail.message) {
                return Err(self.call_error(action(), message));
            }
        }
        let image = self
            .docker
            .inspect_image(tag)
            .await
            .map_err(|e| self.call_error(action(), e))?;
        image
            .id
            .ok_or_else(|| self.call_error(action(), "the built image has no ID"))
    }

    /// `docker run -d --name name` of `body`; returns the container ID.
    pub async fn run_container(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| self.call_error(format!("creating container {name}"), e))?;
        self.docker
            .start_container(&created.id, None::<StartContainerOptions>)
            .await
            .map_err(|e| self.call_error(format!("starting container {name}"), e))?;
        Ok(created.id)
    }

    /// Names of every container (running or not) carrying label `key=value`.
    pub async fn containers_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<String>, DockerError> {
        let label = format!("{key}={value}");
        let filters = HashMap::from([("label", vec![label.as_str()])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let listed = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.call_error(format!("listing containers labelled {label}"), e))?;
        let mut names: Vec<String> = listed
            .into_iter()
            .filter_map(|container| container.names?.into_iter().next())
            .map(|name| name.trim_start_matches('/').to_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// `docker rm -f name`; a container already gone is fine.
    pub async fn remove_container(&self, name: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(name, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(self.call_error(format!("removing container {name}"), e)),
        }
    }
}

/// `(component, version)` from an image reference or repo tag: `registry:5000/team/demo-worker:v2` gives
/// `("demo-worker", "v2")`; without a tag the version is `latest`; a digest reference gives no version.
pub fn component_and_version(reference: &str) -> (String, Option<String>) {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    match last.split_once(':') {
        Some((name, tag)) => (name.to_owned(), Some(tag.to_owned())),
        None if without_digest.len() < reference.len() => (last.to_owned(), None),
        None => (last.to_owned(), Some("latest".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_and_version_come_from_the_last_path_segment() {
        assert_eq!(
            component_and_version("demo-worker:v2"),
            ("demo-worker".to_owned(), Some("v2".to_owned()))
        );
        assert_eq!(
            component_and_version("registry:5000/team/demo-worker:v2.1-hotfix"),
            ("demo-worker".to_owned(), Some("v2.1-hotfix".to_owned()))
        );
        assert_eq!(
            component_and_version("demo-worker"),
            ("demo-worker".to_owned(), Some("latest".to_owned()))
        );
        assert_eq!(
            component_and_version("demo-worker@sha256:abcd"),
            ("demo-worker".to_owned(), None)
        );
    }

    #[tokio::test]
    async fn an_absent_engine_is_named_by_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("no-engine.sock");
        let err = DockerEngine::connect_to(&socket).await.err().unwrap();
        let message = err.to_string();
        assert!(message.contains(&socket.display().to_string()), "{message}");
        assert!(message.contains("DOCKER_HOST"), "{message}");
    }
}
