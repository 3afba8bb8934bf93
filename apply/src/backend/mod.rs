//! Service backends behind one trait: `process` (the agent runs and supervises the command itself), `systemd`
//! (a unit driven through `systemctl`/`journalctl`) and `docker` (one container, through the Docker Engine API).
//! The engine only sees [`ServiceBackend`].

pub mod docker;
pub mod process;
pub mod systemd;

use crate::container::ContainerEngine;
use crate::fsutil::FsError;
use crate::spec::{BackendKind, ServiceSpec};
use async_trait::async_trait;
use std::path::Path;
use std::sync::Arc;

/// Coarse run state of a service, as reported in Status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Stopped,
    Failed,
    Starting,
    Unknown,
}

/// What a backend knows about its service right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRuntime {
    pub state: RunState,
    pub pid: Option<u32>,
    pub uptime_seconds: Option<u64>,
    /// Identifies the current run (changes when the service is restarted, by us or by a supervisor).
    pub instance: Option<String>,
    /// How the previous run ended, e.g. "exited with status 3" or "killed by signal SIGKILL".
    pub last_exit: Option<String>,
}

impl ServiceRuntime {
    /// Nothing known.
    pub fn unknown() -> Self {
        ServiceRuntime {
            state: RunState::Unknown,
            pid: None,
            uptime_seconds: None,
            instance: None,
            last_exit: None,
        }
    }
}

/// A backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "cannot start {command:?}: {source}; check the service's `command` in the agent config"
    )]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` did not finish within {seconds}s")]
    CommandTimeout { command: String, seconds: u64 },
    #[error("pid {pid} is still alive after SIGKILL")]
    Unkillable { pid: u32 },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error("service {service:?} has no {what}; fix the agent config")]
    Misconfigured { service: String, what: &'static str },
    #[error(transparent)]
    Container(Box<crate::container::ContainerError>),
}

/// Starts, stops and observes one service.
#[async_trait]
pub trait ServiceBackend: Send + Sync + std::fmt::Debug {
    /// Starts the service if it is not running; returns once it is launched (health is the engine's business).
    async fn start(&self) -> Result<(), BackendError>;
    /// Stops the service (polite first, forceful after the stop timeout); `Ok` means it is not running.
    async fn stop(&self) -> Result<(), BackendError>;
    /// The current state.
    async fn status(&self) -> Result<ServiceRuntime, BackendError>;
    /// The last `lines` lines of the service's output (empty when unknown).
    async fn log_tail(&self, lines: usize) -> Vec<String>;
    /// Turns the backend's own restart-on-crash on or off; the engine turns it off during an apply so a crashing
    /// new version is seen (and reverted) rather than restarted in a loop.
    fn set_auto_restart(&self, enabled: bool);
    /// A `docker` service's engine and container name: its applies swap containers, not files.
    fn containers(&self) -> Option<(Arc<dyn ContainerEngine>, String)> {
        None
    }
}

/// The real backend for a service spec.
pub fn real_backend(
    spec: &ServiceSpec,
    state_dir: &Path,
) -> Result<Arc<dyn ServiceBackend>, BackendError> {
    Ok(match spec.backend {
        BackendKind::Process => Arc::new(process::ProcessBackend::open(spec.clone(), state_dir)?),
        BackendKind::Systemd => Arc::new(systemd::SystemdBackend::new(spec)?),
        BackendKind::Docker => {
            let engine = Arc::new(crate::container::bollard_engine::BollardEngine::new(
                &spec.docker_socket(),
            ));
            Arc::new(docker::DockerBackend::new(spec, engine)?)
        }
    })
}

/// The last `lines` lines of a text file, reading at most its last 64 KiB.
pub fn tail_file(path: &Path, lines: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(WINDOW)))
        .is_err()
    {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    // The first line of a window that does not start at 0 is probably cut.
    let skip_first = usize::from(len > WINDOW && all.len() > lines);
    let start = all.len().saturating_sub(lines).max(skip_first);
    all[start..].iter().map(|l| l.to_string()).collect()
}
