//! The `[[service]]` section of the agent config: what one managed service is and how to run and probe it.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

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
        raw.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom)).transpose()
    }
}
