//! The topology model: roles in file order, their nodes and hooks, and how each serializes.

use crate::home::Home;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A parsed, validated topology with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// `name:` in the file (optional; the import name wins and a mismatch is refused by [`Topology::check_name`]).
    pub name: Option<String>,
    /// `version:` in the file (the deployed cluster version, shown by `display`).
    pub version: Option<String>,
    /// How the controller reaches agents.
    pub agent: AgentSettings,
    /// Roles in file order (= rollout order).
    pub roles: Vec<Role>,
    /// `databases:` by name, for upgrade runbooks (`sql` steps and checks).
    pub databases: Vec<Database>,
}

/// A database named in `databases:`. The password is never in the topology, the store or a log: only where to
/// read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Database {
    /// The key under `databases:`.
    pub name: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
    /// Where the password comes from.
    pub password: PasswordSource,
}

/// Where a database password is read when a step needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PasswordSource {
    /// No password.
    None,
    /// `password_file:` (its first line).
    File(PathBuf),
    /// `password_env:` an environment variable of `patchctl`.
    Env(String),
}

/// `agent:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentSettings {
    /// Default agent port of every node.
    pub port: u16,
    /// Directory with `ca.crt`, `controller.crt`, `controller.key`; `None` = `$PATCHCTL_HOME/tls`.
    pub tls_dir: Option<PathBuf>,
}

impl AgentSettings {
    /// The TLS directory to use: `tls_dir` with `~/` expanded (relative paths are taken under the home), else the
    /// home's `tls/`.
    pub fn tls_dir(&self, home: &Home) -> PathBuf {
        let Some(dir) = &self.tls_dir else {
            return home.tls_dir();
        };
        if let Ok(rest) = dir.strip_prefix("~")
            && let Some(user_home) = std::env::var_os("HOME")
        {
            return PathBuf::from(user_home).join(rest);
        }
        if dir.is_absolute() {
            dir.clone()
        } else {
            home.root().join(dir)
        }
    }
}

/// A role: nodes running the same service, patched together with the same hooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Role {
    /// Role name (the `roles:` key).
    pub name: String,
    /// Package component this role runs (default: the role name).
    pub component: String,
    /// Agent service name (default: the role name; a node may override it).
    pub service: String,
    /// Cluster-API hooks.
    pub hooks: Hooks,
    /// Nodes in file order.
    pub nodes: Vec<Node>,
}

/// Cluster-API hooks of a role. Every hook is optional.
///
/// * `offline`: take the node out (evict leader, deregister, drain). Called once.
/// * `wait_offline`: polled every `interval` until it succeeds or `timeout` passes (drain timeout).
/// * `online`: put the node back. Called once.
/// * `wait_online`: polled until the cluster reports the node back.
/// * `health`: the node is serving (polled after apply; also used by `display`).
/// * `leader`: read from any node of the role; `field` holds the leader's name, ID or `host:port`.
///
/// A call succeeds when the status is `expect_status` (default: any 2xx) and, when `equals`/`not_equals` is set,
/// the JSON `field` (a dotted path such as `data.state`) compares as asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Hooks {
    /// Take the node out of the cluster.
    pub offline: Option<HookSpec>,
    /// Wait until the cluster says it is out.
    pub wait_offline: Option<HookSpec>,
    /// Put the node back.
    pub online: Option<HookSpec>,
    /// Wait until the cluster says it is back.
    pub wait_online: Option<HookSpec>,
    /// Is the node serving.
    pub health: Option<HookSpec>,
    /// Which node of the role leads.
    pub leader: Option<HookSpec>,
}

impl Hooks {
    /// Every hook that is set, with its key name.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &HookSpec)> {
        [
            ("offline", &self.offline),
            ("wait_offline", &self.wait_offline),
            ("online", &self.online),
            ("wait_online", &self.wait_online),
            ("health", &self.health),
            ("leader", &self.leader),
        ]
        .into_iter()
        .filter_map(|(key, hook)| hook.as_ref().map(|hook| (key, hook)))
    }
}

/// HTTP method of a hook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum HttpMethod {
    /// GET (the default).
    #[default]
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl HttpMethod {
    /// Upper-case name, as on the wire (`reqwest::Method::from_bytes(m.as_str().as_bytes())`).
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
        }
    }
}

impl FromStr for HttpMethod {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [
            HttpMethod::Get,
            HttpMethod::Post,
            HttpMethod::Put,
            HttpMethod::Patch,
            HttpMethod::Delete,
        ]
        .into_iter()
        .find(|method| method.as_str().eq_ignore_ascii_case(text.trim()))
        .ok_or_else(|| format!("unknown HTTP method `{text}`; use GET, POST, PUT, PATCH or DELETE"))
    }
}

impl fmt::Display for HttpMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for HttpMethod {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for HttpMethod {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// One call to the cluster's HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookSpec {
    /// HTTP method (default GET).
    pub method: HttpMethod,
    /// URL template (see [`render_url`]).
    pub url: String,
    /// Request body template, sent as is after rendering (placeholders as in `url`).
    pub body: Option<String>,
    /// JSON field to read, dotted path (`state`, `data.leader`).
    pub field: Option<String>,
    /// The call succeeds only if `field` equals this.
    pub equals: Option<String>,
    /// The call succeeds only if `field` differs from this.
    pub not_equals: Option<String>,
    /// Required HTTP status (default: any 2xx).
    pub expect_status: Option<u16>,
    /// Poll interval of a waiting hook.
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    /// Timeout of one call, or of the whole wait of a `wait_*`/`health` hook.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
}

fn serialize_duration<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*duration))
}

/// One node with its defaults filled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// Unique ID: `host:port` unless the file gives `id`.
    pub id: String,
    /// Its role's name.
    pub role: String,
    /// Host (IP or DNS name) the controller dials, and the name the agent certificate must carry.
    pub host: String,
    /// Service port (`{port}` in templates).
    pub port: u16,
    /// Node name (default: the ID); `-N` accepts it as well as the ID.
    pub name: String,
    /// Ports for display (default: `port`).
    pub ports: String,
    /// Deploy directory (for display; the agent knows the real one per service).
    pub deploy_dir: String,
    /// Data directory (for display).
    pub data_dir: Option<String>,
    /// Agent service name (node's `service`, else the role's).
    pub service: String,
    /// Agent port (node's `agent_port`, else `agent.port`).
    pub agent_port: u16,
    /// `linux/x86_64` style label if the file gives one (display otherwise asks the agent).
    pub os_arch: Option<String>,
}

impl Node {
    /// `host:agent_port`, what the controller dials.
    pub fn agent_address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.agent_port)
        } else {
            format!("{}:{}", self.host, self.agent_port)
        }
    }

    /// Whether `-N` value (or a leader hook's answer) names this node: its ID, its name, or `host:port`.
    pub fn is_named(&self, value: &str) -> bool {
        let value = value.trim();
        value == self.id || value == self.name || value == format!("{}:{}", self.host, self.port)
    }
}
