//! Cluster topology files (`patchctl cluster import <name> <file.yaml>`): parsing, defaults, validation with errors
//! that name the line and the key, and the URL template renderer the cluster-API hooks use.
//!
//! Roles keep their file order: it is the rollout order.
//!
//! # File format
//!
//! ```yaml
//! name: demo                     # optional; the import name wins, a mismatch is an error
//! version: v1.0.0
//! agent:                         # how the controller reaches agents
//!   port: 7480                   # default per node; a node may set agent_port
//!   tls_dir: ~/.patchctl/tls     # optional: ca.crt, controller.crt, controller.key (default $PATCHCTL_HOME/tls)
//! roles:                         # order of roles = rollout order (one role at a time)
//!   demo-master:
//!     component: demo-master     # package component; default = role name
//!     service: demo-master       # agent service name; default = role name (a node may override)
//!     hooks:
//!       health: { url: "http://{host}:{port}/health" }
//!       leader: { url: "http://{host}:{port}/api/leader", field: "leader" }   # value = a node name/id of this role
//!     nodes:
//!       - { host: 127.0.1.1, port: 8261, name: master-1, ports: "8261/8291",
//!           deploy_dir: /opt/demo/master-8261, data_dir: /opt/demo/data/master-8261 }
//!   demo-worker:
//!     hooks:
//!       offline:      { method: POST, url: "http://{demo-master.leader.host}:{demo-master.leader.port}/api/members/{name}/offline" }
//!       wait_offline: { url: "http://{demo-master.leader.host}:{demo-master.leader.port}/api/members/{name}", field: "state", equals: "Offline", interval: 200ms, timeout: 10s }
//!       online:       { method: POST, url: "http://{demo-master.leader.host}:{demo-master.leader.port}/api/members/{name}/online" }
//!       wait_online:  { url: "…/api/members/{name}", field: "state", not_equals: "Offline", interval: 200ms, timeout: 10s }
//!       health:       { url: "http://{host}:{port}/health" }
//!     nodes:
//!       - { host: 127.0.1.2, port: 8262, name: worker-1, deploy_dir: /opt/demo/worker-8262, data_dir: … }
//! ```
//!
//! Node ID = `host:port` unless `id` is given; `name` defaults to the ID. URL placeholders: `{host} {port} {id} {name}
//! {role}` of the node, and `{<role>.leader.host|port|name|id}` for the current leader of another role (resolved
//! through that role's `leader` hook).
//!
//! Parsing (`patchctl::topology`): serde (`serde_norway`, unknown keys refused) reports type errors and typos with
//! line, column and key path; semantic checks (no role, a role without nodes, duplicate node IDs or names, names with
//! characters that would need URL escaping or break `-N a,b`, unknown placeholders, `{<role>.leader.…}` naming a
//! missing role or one without a `leader` hook, a `leader` hook using leader placeholders, `equals` without `field`,
//! `interval > timeout`, zero durations) are all collected and each names its line (found in the source text) and key.
//! Defaults: `method` GET, `interval` 1s, `timeout` 30s (one call, or the whole wait of a `wait_*` hook), success =
//! any 2xx unless `expect_status`; `field` is a dotted JSON path; a `leader` hook's value names a node of its role by
//! name, ID or `host:port`. Text in braces that is not placeholder-shaped (JSON in a `body`) is left as is. An example
//! that is parsed by a unit test: `controller/examples/topology.yaml`.

mod model;
mod raw;
mod template;
#[cfg(test)]
mod tests;
mod validate;

pub use model::*;
use raw::{RawTopology, syntax_error};
pub use template::{TemplateError, render_url};
use validate::{SourceIndex, build};

use patchd_planner::PlanNode;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default agent port when neither `agent.port` nor a node's `agent_port` is given.
pub const DEFAULT_AGENT_PORT: u16 = 7480;
/// Default poll interval of a hook.
pub const DEFAULT_HOOK_INTERVAL: Duration = Duration::from_secs(1);
/// Default timeout of a hook (a single call, or the whole wait of a `wait_*` hook).
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a topology file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("cannot read topology file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A problem in a file, prefixed with its path.
    #[error("{path}: {error}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// The problem.
        error: Box<TopologyError>,
    },
    /// Not YAML, or a key/value of the wrong shape (serde's own check).
    #[error("{}", syntax_message(*line, *column, message))]
    Syntax {
        /// 1-based line, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
        /// What is wrong (with the key path) and what is expected.
        message: String,
    },
    /// Well-formed YAML whose content is inconsistent; every problem found is listed.
    #[error("{}", problems_message(problems))]
    Invalid {
        /// The problems, in file order where known.
        problems: Vec<Problem>,
    },
}

/// One semantic problem of a topology file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line (found by searching the text; best effort).
    pub line: Option<usize>,
    /// Key path, e.g. `roles.demo-worker.hooks.offline.url`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}, key `{}`: {}", self.key, self.message),
            None => write!(f, "key `{}`: {}", self.key, self.message),
        }
    }
}

fn syntax_message(line: Option<usize>, column: Option<usize>, message: &str) -> String {
    let hint = "correct the file and import it again";
    match (line, column) {
        (Some(line), Some(column)) => format!("line {line}, column {column}: {message}; {hint}"),
        (Some(line), None) => format!("line {line}: {message}; {hint}"),
        _ => format!("{message}; {hint}"),
    }
}

fn problems_message(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut text = format!("{} problems:", many.len());
            for problem in many {
                text.push_str("\n  ");
                text.push_str(&problem.to_string());
            }
            text
        }
    }
}

impl Topology {
    /// Parses and validates topology text. Errors carry the line and the key.
    pub fn parse(text: &str) -> Result<Topology, TopologyError> {
        let raw: RawTopology = serde_norway::from_str(text).map_err(syntax_error)?;
        build(raw, text)
    }

    /// Reads and parses a topology file; errors are prefixed with its path.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Topology::parse(&text).map_err(|error| TopologyError::InFile {
            path: path.to_path_buf(),
            error: Box::new(error),
        })
    }

    /// Refuses a file whose `name:` differs from the name it is imported under.
    pub fn check_name(&self, import_name: &str, text: &str) -> Result<(), TopologyError> {
        match &self.name {
            Some(name) if name != import_name => Err(TopologyError::Invalid {
                problems: vec![Problem {
                    line: SourceIndex::new(text).top_key_line("name"),
                    key: "name".to_string(),
                    message: format!(
                        "the file names the cluster `{name}` but it is imported as `{import_name}`; import it as \
                         `{name}`, or change or remove `name:`"
                    ),
                }],
            }),
            _ => Ok(()),
        }
    }

    /// A role by name.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|role| role.name == name)
    }

    /// Every node, role by role in file order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.roles.iter().flat_map(|role| role.nodes.iter())
    }

    /// A node by ID.
    pub fn node_by_id(&self, id: &str) -> Option<&Node> {
        self.nodes().find(|node| node.id == id)
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.roles.iter().map(|role| role.nodes.len()).sum()
    }

    /// Role names in rollout order.
    pub fn role_order(&self) -> Vec<String> {
        self.roles.iter().map(|role| role.name.clone()).collect()
    }

    /// Roles whose component is `component` (the package's), in rollout order.
    pub fn component_roles(&self, component: &str) -> Vec<String> {
        self.roles
            .iter()
            .filter(|role| role.component == component)
            .map(|role| role.name.clone())
            .collect()
    }

    /// The planner's view of every node, given what was observed (leaders, down nodes).
    pub fn plan_nodes(
        &self,
        is_leader: impl Fn(&Node) -> bool,
        is_down: impl Fn(&Node) -> bool,
    ) -> Vec<PlanNode> {
        self.nodes()
            .map(|node| PlanNode {
                id: node.id.clone(),
                role: node.role.clone(),
                host: node.host.clone(),
                name: node.name.clone(),
                is_leader: is_leader(node),
                is_down: is_down(node),
            })
            .collect()
    }
}

impl Role {
    /// The node of this role a leader hook's answer names (by ID, name or `host:port`).
    pub fn node_named(&self, value: &str) -> Option<&Node> {
        self.nodes.iter().find(|node| node.is_named(value))
    }
}
