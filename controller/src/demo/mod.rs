//! DEMO ONLY: the local demo cluster behind `patchctl demo up|down|status`: where its files go, the agent
//! configs and topology it writes, and how the processes it started are found and stopped again.
//!
//! Layout under the demo directory (default `$PATCHCTL_HOME/demo`):
//!
//! ```text
//! demo.json                       what `demo up` started (agent pids with their start times) and with which settings
//! topology.yaml                   the cluster `demo` as imported (the worked example of hooks)
//! packages/                       the "original" packages (v1.0.0) of demo-master and demo-worker, bases for hotfixes
//! logs/agent-<k>.log              stdout/stderr of agent k
//! hosts/host-<k>/patchd.toml      agent k's config (listen 127.0.1.<k>:7480)
//! hosts/host-<k>/tls/             agent k's certificate and key, and the cluster CA
//! hosts/host-<k>/state/           agent k's state_dir (its services' pid files in run/, logs in logs/)
//! hosts/host-<k>/deploy/<component>-<port>/bin/<component>/<component>   the deployed binary, laid out as tiup does
//! image/                          with --containers: the worker image's build context (Dockerfile, rootfs/)
//! hosts/host-<k>/container-data/  with --containers: bind-mounted as /data into the worker's container
//! ```

pub mod containers;
pub mod layout;
pub mod procs;
pub mod render;

pub use layout::{DemoHost, DemoLayout, DemoService, ServiceRole};
pub use procs::{AgentRecord, DemoRecord, ProcessIdentity};

/// Errors of the demo orchestration library (the CLI adds context with anyhow).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--nodes {0} is out of range: the demo needs 2 to {max} nodes (1-3 masters, the rest workers)", max = layout::MAX_NODES)]
    NodeCount(usize),
    #[error(
        "--hosts-prefix {0} is not a loopback prefix: give three octets starting with 127, e.g. 127.0.1"
    )]
    HostsPrefix(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a valid demo record ({message}); remove it, or run `patchctl demo down` with the processes stopped by hand", path.display())]
    BadRecord {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cannot render {what}: {message}")]
    Render { what: &'static str, message: String },
    #[error(transparent)]
    Docker(#[from] patchd_docker::DockerError),
}

impl DemoError {
    pub(crate) fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        DemoError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}
