//! [`Engine`]: a connection to the Docker Engine on its Unix socket that has negotiated the API version and
//! answered a ping, and the calls the workspace makes through it. An absent object is `None` (inspect) or fine
//! (remove); a transport failure is [`DockerError::Unreachable`], an answer the engine refused is
//! [`DockerError::Call`] with its message.

use crate::DockerError;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, ImageInspect};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, ImportImageOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    RenameContainerOptionsBuilder, StartContainerOptions, StopContainerOptionsBuilder,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Seconds a single call may take: loading or saving a large image is the longest.
const CALL_TIMEOUT_SECS: u64 = 600;

/// The Docker Engine on one Unix socket.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: Docker,
    socket: PathBuf,
}

impl Engine {
    /// Connects to the engine on `socket`, negotiates the API version and pings it.
    pub async fn connect(socket: &Path) -> Result<Self, DockerError> {
        let unreachable = |detail: String| DockerError::Unreachable {
            socket: socket.to_owned(),
            detail,
        };
        let docker = Docker::connect_with_unix(
            &socket.to_string_lossy(),
            CALL_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| unreachable(e.to_string()))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        docker
            .ping()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Engine {
            docker,
            socket: socket.to_owned(),
        })
    }

    /// Connects to the socket `DOCKER_HOST=unix://…` names, or [`crate::DEFAULT_SOCKET`] (see
    /// [`crate::socket::resolve`]).
    pub async fn connect_default() -> Result<Self, DockerError> {
        Self::connect(&crate::socket::resolve(None)?).await
    }

    /// The socket this engine answers on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bollard client, for the few calls not wrapped here.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// A failed call: a transport error means the engine went away; an answer is reported with its message.
    fn call_error(&self, action: &'static str, target: &str, error: BollardError) -> DockerError {
        let detail = match error {
            BollardError::HyperResponseError { .. }
            | BollardError::IOError { .. }
            | BollardError::SocketNotFoundError(_)
            | BollardError::RequestTimeoutError => {
                return DockerError::Unreachable {
                    socket: self.socket.clone(),
                    detail: error.to_string(),
                };
            }
            BollardError::DockerResponseServerError { message, .. } => message,
            other => other.to_string(),
        };
        DockerError::Call {
            action,
            target: target.to_owned(),
            socket: self.socket.clone(),
            detail,
        }
    }

    /// `docker build -t tag` of a build context (an uncompressed tar holding a `Dockerfile`, see
    /// [`crate::context`]); returns the image ID (`sha256:…`).
    pub async fn build_image(&self, tag: &str, context: Vec<u8>) -> Result<String, DockerError> {
        let options = BuildImageOptionsBuilder::default()
            .dockerfile("Dockerfile")
            .t(tag)
            .rm(true)
            .forcerm(true)
            .build();
        let mut stream =
            self.docker
                .build_image(options, None, Some(bollard::body_full(context.into())));
        let mut log = String::new();
        while let Some(step) = stream.next().await {
            let step = step.map_err(|e| self.call_error("build", tag, e))?;
            if let Some(line) = step.stream {
                log.push_str(&line);
            }
            if let Some(message) = step.error_detail.and_then(|detail| detail.message) {
                return Err(DockerError::Call {
                    action: "build",
                    target: tag.to_owned(),
                    socket: self.socket.clone(),
                    detail: format!("{message}\n{log}"),
                });
            }
        }
        let image = self
            .docker
            .inspect_image(tag)
            .await
            .map_err(|e| self.call_error("build", tag, e))?;
        image.id.ok_or_else(|| DockerError::Call {
            action: "build",
            target: tag.to_owned(),
            socket: self.socket.clone(),
            detail: "the built image has no ID".to_owned(),
        })
    }

    /// `docker save reference > dest` (created, or truncated), streamed and synced; an image the engine does not
    /// have is [`DockerError::NoSuchImage`].
    pub async fn save_image(&self, reference: &str, dest: &Path) -> Result<(), DockerError> {
        self.docker
            .inspect_image(reference)
            .await
            .map_err(|e| match e {
                BollardError::DockerResponseServerError {
                    status_code: 404, ..
                } => DockerError::NoSuchImage {
                    socket: self.socket.clone(),
                    reference: reference.to_owned(),
                    detail: e.to_string(),
                },
                other => self.call_error("image inspect", reference, other),
            })?;
        let write_error = |source| DockerError::File {
            action: "cannot write",
            path: dest.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(write_error)?;
        let mut stream = self.docker.export_image(reference);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.call_error("save", reference, e))?;
            file.write_all(&chunk).await.map_err(write_error)?;
        }
        file.flush().await.map_err(write_error)?;
        file.sync_all().await.map_err(write_error)
    }

    /// `docker load -i archive` of a `docker save` archive, streamed.
    pub async fn load_image(&self, archive: &Path) -> Result<(), DockerError> {
        let file = tokio::fs::File::open(archive)
            .await
            .map_err(|source| DockerError::File {
                action: "cannot read image archive",
                path: archive.to_owned(),
                source,
            })?;
        // 1 MiB reads: the engine, not this copy, should be what a load costs.
        let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        let options = ImportImageOptionsBuilder::default().quiet(true).build();
        let mut progress = self
            .docker
            .import_image(options, bollard::body_try_stream(body), None);
        let target = archive.display().to_string();
        while let Some(item) = progress.next().await {
            item.map_err(|e| self.call_error("load", &target, e))?;
        }
        Ok(())
    }

    /// `docker image inspect`; `None` when there is no such image.
    pub async fn inspect_image(
        &self,
        reference: &str,
    ) -> Result<Option<ImageInspect>, DockerError> {
        match self.docker.inspect_image(reference).await {
            Ok(image) => Ok(Some(image)),
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(self.call_error("image inspect", reference, e)),
        }
    }

    /// `docker inspect` of a container by name or ID; `None` when there is none.
    pub async fn inspect_container(
        &self,
        name: &str,
    ) -> Result<Option<ContainerInspectResponse>, DockerError> {
        match self.docker.inspect_container(name, None).await {
            Ok(found) => Ok(Some(found)),
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(self.call_error("inspect", name, e)),
        }
    }

    /// `docker create --name name`; the new container's ID.
    pub async fn create_container(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        self.docker
            .create_container(Some(options), body)
            .await
            .map(|created| created.id)
            .map_err(|e| self.call_error("create", name, e))
    }

    /// `docker run -d --name name`: create, then start; the new container's ID.
    pub async fn run_container(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let id = self.create_container(name, body).await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    /// `docker start` (a running container is fine).
    pub async fn start_container(&self, name: &str) -> Result<(), DockerError> {
        match self
            .docker
            .start_container(name, None::<StartContainerOptions>)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 304) => Ok(()),
            Err(e) => Err(self.call_error("start", name, e)),
        }
    }

    /// `docker stop -t grace` (a stopped container is fine).
    pub async fn stop_container(&self, name: &str, grace: Duration) -> Result<(), DockerError> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        match self.docker.stop_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 304) => Ok(()),
            Err(e) => Err(self.call_error("stop", name, e)),
        }
    }

    /// `docker rename name new_name`.
    pub async fn rename_container(&self, name: &str, new_name: &str) -> Result<(), DockerError> {
        let options = RenameContainerOptionsBuilder::default()
            .name(new_name)
            .build();
        self.docker
            .rename_container(name, options)
            .await
            .map_err(|e| self.call_error("rename", name, e))
    }

    /// `docker rm -f` (an absent container is fine).
    pub async fn remove_container(&self, name: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(self.call_error("rm", name, e)),
        }
    }

    /// `docker rmi` (`force`: also an image a container uses); an absent image is fine.
    pub async fn remove_image(&self, image: &str, force: bool) -> Result<(), DockerError> {
        let options = RemoveImageOptionsBuilder::default().force(force).build();
        match self.docker.remove_image(image, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(self.call_error("rmi", image, e)),
        }
    }

    /// `docker exec` of `argv` in the running container `name` with exactly `env` (no shell, no TTY, no stdin),
    /// waiting for it to end. Standard output is kept up to `stdout_cap` bytes (the rest is read and dropped),
    /// standard error's last `stderr_cap` bytes. The caller bounds the wait: the engine's API cannot kill an exec.
    pub async fn exec(
        &self,
        name: &str,
        argv: &[String],
        env: &[String],
        stdout_cap: usize,
        stderr_cap: usize,
    ) -> Result<ExecOutput, DockerError> {
        use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
        let created = self
            .docker
            .create_exec(
                name,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    attach_stdin: Some(false),
                    tty: Some(false),
                    env: Some(env.to_vec()),
                    cmd: Some(argv.to_vec()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.call_error("exec", name, e))?;
        let started = self
            .docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: None,
                }),
            )
            .await
            .map_err(|e| self.call_error("exec", name, e))?;
        let mut out = ExecOutput::default();
        if let StartExecResults::Attached { mut output, .. } = started {
            while let Some(chunk) = output.next().await {
                match chunk.map_err(|e| self.call_error("exec", name, e))? {
                    bollard::container::LogOutput::StdOut { message } => {
                        let room = stdout_cap.saturating_sub(out.stdout.len());
                        out.stdout
                            .extend_from_slice(&message[..room.min(message.len())]);
                        out.stdout_bytes += message.len() as u64;
                    }
                    bollard::container::LogOutput::StdErr { message } => {
                        out.stderr_tail.extend_from_slice(&message);
                        let excess = out.stderr_tail.len().saturating_sub(stderr_cap);
                        out.stderr_tail.drain(..excess);
                    }
                    _ => {}
                }
            }
        }
        let inspected = self
            .docker
            .inspect_exec(&created.id)
            .await
            .map_err(|e| self.call_error("exec inspect", name, e))?;
        out.exit_code = inspected.exit_code;
        Ok(out)
    }

    /// Names (without the leading `/`), sorted, of every container, running or not, that `filters` select
    /// (`docker ps -a --filter key=value`, e.g. `label` or `name`).
    pub async fn container_names(
        &self,
        filters: &HashMap<&str, Vec<&str>>,
    ) -> Result<Vec<String>, DockerError> {
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(filters)
            .build();
        let target = format!("{filters:?}");
        let listed = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.call_error("ps", &target, e))?;
        let mut names: Vec<String> = listed
            .into_iter()
            .flat_map(|container| container.names.unwrap_or_default())
            .map(|name| name.trim_start_matches('/').to_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

fn is_status(error: &BollardError, status: u16) -> bool {
    matches!(error, BollardError::DockerResponseServerError { status_code, .. } if *status_code == status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_absent_engine_is_named_by_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("no-engine.sock");
        let err = Engine::connect(&socket).await.err().unwrap();
        assert!(matches!(err, DockerError::Unreachable { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&socket.display().to_string()), "{message}");
        assert!(
            message.contains("DOCKER_HOST") && message.contains("dockerd"),
            "{message}"
        );
    }
}

/// What a finished [`Engine::exec`] gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// `None` when the engine could not tell.
    pub exit_code: Option<i64>,
    /// Standard output, at most the cap asked for.
    pub stdout: Vec<u8>,
    /// How many bytes of standard output there were in all.
    pub stdout_bytes: u64,
    /// The last bytes of standard error.
    pub stderr_tail: Vec<u8>,
}
