//! The `[[service]]` section of the agent config: what one managed service is and how to run and probe it.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// How the agent runs a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The agent starts and supervises the command itself.
    #[default]
    Process,
    /// A systemd unit, driven through `systemctl`.
    Systemd,
    /// A Docker container, driven through the Docker Engine API; an apply loads an image package and swaps the
    /// container for one made from the new image with the same configuration.
    Docker,
}

/// Health probation settings of a service.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// The process must stay up at least this long after start, e.g. "1s".
    #[serde(default, with = "humantime_serde_opt")]
    pub min_healthy: Option<std::time::Duration>,
    /// Optional HTTP probe: must answer 2xx.
    pub http: Option<String>,
    /// Optional TCP probe: must accept a connection.
    pub tcp: Option<String>,
    /// Maximum time from start to healthy before the apply is reverted.
    #[serde(default, with = "humantime_serde_opt")]
    pub timeout: Option<std::time::Duration>,
}

/// One managed service, as declared in the agent config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// Package component this service accepts.
    pub component: String,
    /// Where the service's files are (every backend but `docker`, whose files are in its image).
    #[serde(default)]
    pub deploy_dir: PathBuf,
    /// Where the package root lands, relative to `deploy_dir` (default "bin").
    pub install_dir: Option<PathBuf>,
    /// Main binary relative to `deploy_dir` (default `bin/<component>/<component>`).
    pub binary: Option<PathBuf>,
    #[serde(default)]
    pub backend: BackendKind,
    /// Process backend: argv; `{deploy_dir}` is replaced.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_true")]
    pub restart_on_crash: bool,
    #[serde(default, with = "humantime_serde_opt")]
    pub stop_timeout: Option<std::time::Duration>,
    /// Process backend: the account the service runs as (required; `"root"` must be written out to run as root).
    pub user: Option<String>,
    /// Process backend: the group the service runs as (default: the user's primary group).
    pub group: Option<String>,
    /// Process backend: the service's log file is rotated when it grows past this many bytes.
    pub log_max_bytes: Option<u64>,
    /// Process backend: rotated log files kept (`<name>.log.1` is the newest).
    pub log_keep: Option<u32>,
    /// Systemd backend: unit name.
    pub unit: Option<String>,
    #[serde(default)]
    pub health: HealthSpec,
    /// Docker backend: the container's name (the agent touches no other container).
    pub container: Option<String>,
    /// Docker backend: `K=V` variables set in the new container on top of the old one's environment.
    #[serde(default)]
    pub env_add: Vec<String>,
    /// Docker backend: command and entrypoint from the new image instead of the old container.
    #[serde(default)]
    pub use_image_defaults: bool,
    /// Docker backend: the engine's Unix socket (default `/var/run/docker.sock`).
    pub docker_socket: Option<PathBuf>,
}

fn default_true() -> bool {
    true
}

/// serde adapter: optional durations written as humantime strings ("1s", "250ms").
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let raw: Option<String> = Option::deserialize(d)?;
        raw.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Default time the new version must stay up during probation.
pub const DEFAULT_MIN_HEALTHY: Duration = Duration::from_secs(1);
/// Default limit from start to healthy before an apply is reverted.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(15);
/// Default grace period between SIGTERM (or `systemctl stop`) and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Default size past which a process service's log file is rotated.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 64 << 20;
/// Default number of rotated log files kept.
pub const DEFAULT_LOG_KEEP: u32 = 2;
/// Smallest `log_max_bytes` accepted: rotation copies the file, so tiny bounds would only burn CPU.
pub const MIN_LOG_MAX_BYTES: u64 = 4096;
/// Most rotated log files kept.
pub const MAX_LOG_KEEP: u32 = 20;

/// The numeric identity a process service runs as, resolved from `user` / `group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Root: the service keeps the agent's privileges.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// A config value that cannot work, with what to change.
#[derive(Debug, thiserror::Error)]
#[error("service {service:?}: {problem}")]
pub struct SpecError {
    pub service: String,
    pub problem: String,
}

impl HealthSpec {
    /// How long the process must stay up after start.
    pub fn min_healthy(&self) -> Duration {
        self.min_healthy.unwrap_or(DEFAULT_MIN_HEALTHY)
    }

    /// Deadline from start to healthy; never shorter than `min_healthy`.
    pub fn timeout(&self) -> Duration {
        self.timeout
            .unwrap_or(DEFAULT_HEALTH_TIMEOUT)
            .max(self.min_healthy())
    }
}

impl ServiceSpec {
    /// Where the package's archive root lands, relative to `deploy_dir`.
    pub fn install_dir(&self) -> PathBuf {
        self.install_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("bin"))
    }

    /// The main binary, relative to `deploy_dir`.
    pub fn binary_rel(&self) -> PathBuf {
        self.binary.clone().unwrap_or_else(|| {
            self.install_dir()
                .join(&self.component)
                .join(&self.component)
        })
    }

    /// The main binary, absolute.
    pub fn binary_path(&self) -> PathBuf {
        self.deploy_dir.join(self.binary_rel())
    }

    /// Grace period between a polite stop and SIGKILL.
    pub fn stop_timeout(&self) -> Duration {
        self.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT)
    }

    /// Size past which the process backend rotates the log file.
    pub fn log_max_bytes(&self) -> u64 {
        self.log_max_bytes.unwrap_or(DEFAULT_LOG_MAX_BYTES)
    }

    /// Rotated log files kept.
    pub fn log_keep(&self) -> u32 {
        self.log_keep.unwrap_or(DEFAULT_LOG_KEEP)
    }

    /// Resolves `user` / `group` to ids through the host's user database (NSS). Only the process backend runs
    /// anything itself, so only it needs (and accepts) them; a process service without `user` is refused rather
    /// than silently run as root, the agent's own user.
    pub fn run_as(&self) -> Result<Option<RunAs>, SpecError> {
        let fail = |problem: String| SpecError {
            service: self.name.clone(),
            problem,
        };
        if self.backend != BackendKind::Process {
            if self.user.is_some() || self.group.is_some() {
                return Err(fail(
                    "`user` and `group` apply to backend \"process\" only; for a systemd unit set User=/Group= in the unit"
                        .into(),
                ));
            }
            return Ok(None);
        }
        let Some(user_name) = self.user.as_deref() else {
            return Err(fail(
                "backend \"process\" needs `user`, the account the service runs as (e.g. \"tidb\" or \"nobody\"); write `user = \"root\"` to run it as root on purpose"
                    .into(),
            ));
        };
        let user = match nix::unistd::User::from_name(user_name) {
            Ok(Some(user)) => user,
            Ok(None) => {
                return Err(fail(format!(
                    "user {user_name:?} does not exist on this host: create the account or name an existing one"
                )));
            }
            Err(e) => {
                return Err(fail(format!(
                    "cannot look up user {user_name:?} ({e}): check /etc/passwd and /etc/nsswitch.conf"
                )));
            }
        };
        let gid = match self.group.as_deref() {
            None => user.gid,
            Some(group_name) => match nix::unistd::Group::from_name(group_name) {
                Ok(Some(group)) => group.gid,
                Ok(None) => {
                    return Err(fail(format!(
                        "group {group_name:?} does not exist on this host: create it or name an existing one (or drop `group` to use the user's primary group)"
                    )));
                }
                Err(e) => {
                    return Err(fail(format!(
                        "cannot look up group {group_name:?} ({e}): check /etc/group and /etc/nsswitch.conf"
                    )));
                }
            },
        };
        Ok(Some(RunAs {
            uid: user.uid.as_raw(),
            gid: gid.as_raw(),
        }))
    }

    /// The identity (see [`ServiceSpec::run_as`]) and log rotation bounds, checked together: what `patchd
    /// validate` and the engine both require before a service is run.
    pub fn check_run_settings(&self) -> Result<Option<RunAs>, SpecError> {
        let fail = |problem: String| SpecError {
            service: self.name.clone(),
            problem,
        };
        let run_as = self.run_as()?;
        if let Some(max) = self.log_max_bytes
            && max < MIN_LOG_MAX_BYTES
        {
            return Err(fail(format!(
                "log_max_bytes {max} is too small: use at least {MIN_LOG_MAX_BYTES} (default {DEFAULT_LOG_MAX_BYTES})"
            )));
        }
        if self.log_keep.is_some_and(|keep| keep > MAX_LOG_KEEP) {
            return Err(fail(format!(
                "log_keep must be at most {MAX_LOG_KEEP} (default {DEFAULT_LOG_KEEP})"
            )));
        }
        Ok(run_as)
    }

    /// The process backend's argv with `{deploy_dir}` replaced.
    pub fn resolved_command(&self) -> Vec<String> {
        let deploy_dir = self.deploy_dir.to_string_lossy();
        self.command
            .iter()
            .map(|arg| arg.replace("{deploy_dir}", &deploy_dir))
            .collect()
    }

    /// Checks everything that can be checked without touching the host, plus confinement of `deploy_dir`
    /// under one of `deploy_roots` (lexically; the engine checks again with symlinks resolved).
    pub fn validate(&self, deploy_roots: &[PathBuf]) -> Result<(), SpecError> {
        let fail = |problem: String| SpecError {
            service: self.name.clone(),
            problem,
        };
        if !is_safe_name(&self.name) {
            return Err(fail(
                "name must be 1-128 characters of A-Z a-z 0-9 . _ @ - (it names journal, log and pid files); rename the service"
                    .into(),
            ));
        }
        if self.component.is_empty() {
            return Err(fail(
                "component is empty; set it to the package component this service accepts".into(),
            ));
        }
        self.check_docker_keys()?;
        if self.backend == BackendKind::Docker {
            return self.check_health();
        }
        if self.deploy_dir.as_os_str().is_empty() {
            return Err(fail(
                "deploy_dir is missing: set it to the directory the service's files are in".into(),
            ));
        }
        if !self.deploy_dir.is_absolute() || has_parent_or_dot(&self.deploy_dir) {
            return Err(fail(format!(
                "deploy_dir {} must be an absolute path without `.` or `..`",
                self.deploy_dir.display()
            )));
        }
        if !deploy_roots
            .iter()
            .any(|root| self.deploy_dir.starts_with(root) && self.deploy_dir != *root)
        {
            return Err(fail(format!(
                "deploy_dir {} is not under any deploy root ({}); move it or add a deploy root that contains it",
                self.deploy_dir.display(),
                display_paths(deploy_roots)
            )));
        }
        for (what, rel) in [
            ("install_dir", self.install_dir()),
            ("binary", self.binary_rel()),
        ] {
            if rel.is_absolute() || has_parent_or_dot(&rel) || rel.as_os_str().is_empty() {
                return Err(fail(format!(
                    "{what} {} must be a relative path inside deploy_dir without `.` or `..`",
                    rel.display()
                )));
            }
        }
        match self.backend {
            BackendKind::Process if self.command.is_empty() => {
                return Err(fail(
                    "backend \"process\" needs `command` (argv; `{deploy_dir}` is replaced)".into(),
                ));
            }
            BackendKind::Systemd if self.unit.as_deref().is_none_or(str::is_empty) => {
                return Err(fail(
                    "backend \"systemd\" needs `unit` (e.g. \"demo-worker.service\")".into(),
                ));
            }
            _ => {}
        }
        self.check_run_settings()?;
        self.check_health()
    }

    /// The health probes must be usable addresses.
    fn check_health(&self) -> Result<(), SpecError> {
        let fail = |problem: String| SpecError {
            service: self.name.clone(),
            problem,
        };
        if let Some(url) = &self.health.http
            && !url.starts_with("http://")
        {
            return Err(fail(format!("health.http {url:?} must be an http:// URL")));
        }
        if let Some(addr) = &self.health.tcp
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(fail(format!(
                "health.tcp {addr:?} must be an ip:port address, e.g. \"127.0.0.1:8262\""
            )));
        }
        Ok(())
    }
}

impl ServiceSpec {
    /// The Docker Engine socket of a `docker` service.
    pub fn docker_socket(&self) -> PathBuf {
        self.docker_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(patchd_docker::DEFAULT_SOCKET))
    }

    /// The `docker` keys belong to backend "docker" alone, which needs `container` and takes neither a deploy
    /// dir nor the other backends' keys.
    pub fn check_docker_keys(&self) -> Result<(), SpecError> {
        let fail = |problem: String| SpecError {
            service: self.name.clone(),
            problem,
        };
        if self.backend != BackendKind::Docker {
            let docker_only = [
                ("container", self.container.is_some()),
                ("env_add", !self.env_add.is_empty()),
                ("use_image_defaults", self.use_image_defaults),
                ("docker_socket", self.docker_socket.is_some()),
            ];
            if let Some((key, _)) = docker_only.iter().find(|(_, set)| *set) {
                return Err(fail(format!(
                    "`{key}` applies to backend \"docker\" only; remove it or set `backend = \"docker\"`"
                )));
            }
            return Ok(());
        }
        let Some(container) = self.container.as_deref() else {
            return Err(fail(
                "backend \"docker\" needs `container`, the name of the container to patch (as in `docker run --name`)"
                    .into(),
            ));
        };
        if !crate::container::is_container_name(container) {
            return Err(fail(format!(
                "container {container:?} is not a Docker container name: use letters, digits, `_`, `.` and `-`, \
                 starting with a letter or digit"
            )));
        }
        let other_backends = [
            ("deploy_dir", !self.deploy_dir.as_os_str().is_empty()),
            ("install_dir", self.install_dir.is_some()),
            ("binary", self.binary.is_some()),
            ("command", !self.command.is_empty()),
            ("env", !self.env.is_empty()),
            ("user", self.user.is_some()),
            ("group", self.group.is_some()),
            ("log_max_bytes", self.log_max_bytes.is_some()),
            ("log_keep", self.log_keep.is_some()),
            ("unit", self.unit.is_some()),
        ];
        if let Some((key, _)) = other_backends.iter().find(|(_, set)| *set) {
            return Err(fail(format!(
                "`{key}` does not apply to backend \"docker\" (the container's own configuration is carried over \
                 to the new one; add variables with `env_add`); remove it"
            )));
        }
        for entry in &self.env_add {
            let key = crate::container::recreate::env_key(entry);
            if !entry.contains('=')
                || key.is_empty()
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(fail(format!(
                    "env_add entry {entry:?} must be KEY=VALUE with a KEY of letters, digits and `_`, e.g. \"IS_UPGRADE=true\""
                )));
            }
        }
        if let Some(socket) = &self.docker_socket
            && !socket.is_absolute()
        {
            return Err(fail(format!(
                "docker_socket {} must be an absolute path, e.g. \"/var/run/docker.sock\"",
                socket.display()
            )));
        }
        Ok(())
    }
}

/// Names used as file names under the state dir: no separators, no dot-only names.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
}

fn has_parent_or_dot(path: &std::path::Path) -> bool {
    path.components().any(|c| {
        matches!(
            c,
            std::path::Component::ParentDir | std::path::Component::CurDir
        )
    })
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "none configured".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
