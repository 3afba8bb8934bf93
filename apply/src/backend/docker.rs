//! The `docker` backend: a service is one container, known by its name (`container` in the agent config), started,
//! stopped and observed through the Docker Engine ([`ContainerEngine`]). The agent touches no other container.

use super::{BackendError, RunState, ServiceBackend, ServiceRuntime};
use crate::container::{ContainerEngine, ContainerError};
use crate::spec::ServiceSpec;
use async_trait::async_trait;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use std::sync::Arc;
use std::time::Duration;

/// One declared container.
#[derive(Debug)]
pub struct DockerBackend {
    container: String,
    engine: Arc<dyn ContainerEngine>,
    stop_timeout: Duration,
}

impl DockerBackend {
    /// The backend of `spec` on `engine`.
    pub fn new(spec: &ServiceSpec, engine: Arc<dyn ContainerEngine>) -> Result<Self, BackendError> {
        let container = spec
            .container
            .clone()
            .ok_or_else(|| BackendError::Misconfigured {
                service: spec.name.clone(),
                what: "`container` (the Docker container's name)",
            })?;
        Ok(DockerBackend {
            container,
            engine,
            stop_timeout: spec.stop_timeout(),
        })
    }
}

/// What a container's state means for the engine: running and not restarting is `Running`; a restart loop is
/// `Starting` (so probation sees the new version stop running); a run identifies itself by ID and start time.
pub fn runtime_of(inspected: &ContainerInspectResponse) -> ServiceRuntime {
    let state = inspected.state.clone().unwrap_or_default();
    let status = state.status.unwrap_or(ContainerStateStatusEnum::EMPTY);
    let run_state = match status {
        ContainerStateStatusEnum::RUNNING if state.restarting != Some(true) => RunState::Running,
        ContainerStateStatusEnum::RESTARTING | ContainerStateStatusEnum::RUNNING => {
            RunState::Starting
        }
        ContainerStateStatusEnum::CREATED | ContainerStateStatusEnum::EXITED => RunState::Stopped,
        ContainerStateStatusEnum::DEAD => RunState::Failed,
        _ => RunState::Unknown,
    };
    let exited = state
        .finished_at
        .as_deref()
        .is_some_and(|at| !at.starts_with("0001-"));
    let last_exit = exited.then(|| {
        let mut text = format!("exited with status {}", state.exit_code.unwrap_or(0));
        if state.oom_killed == Some(true) {
            text.push_str(" (killed: out of memory)");
        }
        if let Some(error) = state.error.filter(|e| !e.is_empty()) {
            text.push_str(&format!(": {error}"));
        }
        text
    });
    let pid = state
        .pid
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid != 0);
    ServiceRuntime {
        state: run_state,
        pid,
        uptime_seconds: None,
        instance: Some(format!(
            "{}@{}",
            inspected.id.as_deref().unwrap_or_default(),
            state.started_at.unwrap_or_default()
        )),
        last_exit,
    }
}

fn missing(container: &str) -> ServiceRuntime {
    ServiceRuntime {
        state: RunState::Stopped,
        last_exit: Some(format!(
            "container {container:?} does not exist: create it (docker run --name {container} ...) or fix \
             `container` in the agent config"
        )),
        ..ServiceRuntime::unknown()
    }
}

impl From<ContainerError> for BackendError {
    fn from(error: ContainerError) -> Self {
        BackendError::Container(Box::new(error))
    }
}

#[async_trait]
impl ServiceBackend for DockerBackend {
    async fn start(&self) -> Result<(), BackendError> {
        Ok(self.engine.start_container(&self.container).await?)
    }

    async fn stop(&self) -> Result<(), BackendError> {
        Ok(self
            .engine
            .stop_container(&self.container, self.stop_timeout)
            .await?)
    }

    async fn status(&self) -> Result<ServiceRuntime, BackendError> {
        Ok(
            match self.engine.inspect_container(&self.container).await? {
                Some(inspected) => runtime_of(&inspected),
                None => missing(&self.container),
            },
        )
    }

    async fn log_tail(&self, _lines: usize) -> Vec<String> {
        Vec::new()
    }

    /// A container's restart policy is part of its configuration, carried over to the new one: probation sees a
    /// restart as a new start time, so nothing is turned off here.
    fn set_auto_restart(&self, _enabled: bool) {}

    fn containers(&self) -> Option<(Arc<dyn ContainerEngine>, String)> {
        Some((Arc::clone(&self.engine), self.container.clone()))
    }
}
