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
    /// Systemd backend: unit name.
    pub unit: Option<String>,
    #[serde(default)]
    pub health: HealthSpec,
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
