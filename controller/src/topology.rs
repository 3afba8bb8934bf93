//! Cluster topology files (`patchctl cluster import <name> <file.yaml>`): parsing, defaults, validation with errors
//! that name the line and the key, and the URL template renderer the cluster-API hooks use.
//!
//! The format is the one in ARCHITECTURE.md ("Topology"). Roles keep their file order: it is the rollout order.

use crate::home::Home;
use patchd_planner::PlanNode;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Default agent port when neither `agent.port` nor a node's `agent_port` is given.
pub const DEFAULT_AGENT_PORT: u16 = 7480;
/// Default poll interval of a hook.
pub const DEFAULT_HOOK_INTERVAL: Duration = Duration::from_secs(1);
/// Default timeout of a hook (a single call, or the whole wait of a `wait_*` hook).
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

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

impl HookSpec {
    /// Roles whose current leader the templates of this hook need (`{<role>.leader.…}`), without duplicates.
    pub fn leader_roles(&self) -> Vec<String> {
        let mut roles = Vec::new();
        for template in std::iter::once(self.url.as_str()).chain(self.body.as_deref()) {
            for placeholder in placeholders(template) {
                if let Ok(Placeholder::Leader { role, .. }) = Placeholder::parse(placeholder)
                    && !roles.iter().any(|known: &String| known == role)
                {
                    roles.push(role.to_string());
                }
            }
        }
        roles
    }
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

/// A URL or body template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Not one of the known placeholders.
    #[error(
        "unknown placeholder `{{{0}}}`; use {{host}} {{port}} {{id}} {{name}} {{role}} or \
         {{<role>.leader.host|port|name|id}}"
    )]
    UnknownPlaceholder(String),
    /// The leader of a role is needed but not known (no leader, or its leader hook failed).
    #[error(
        "the template needs the leader of role {0}, which is not known: check that role's leader hook"
    )]
    NoLeader(String),
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

/// Renders a URL (or body) template for `node`. `leaders(role)` returns the current leader of a role, for
/// `{<role>.leader.host|port|name|id}`. Values are inserted verbatim (IDs and names are checked at import to hold
/// no character that would need escaping in a URL path). Text in braces that is not placeholder-shaped (such as
/// JSON in a body) is left as is.
pub fn render_url<'n>(
    template: &str,
    node: &Node,
    leaders: &dyn Fn(&str) -> Option<&'n Node>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some((before, placeholder, after)) = next_placeholder(rest) {
        out.push_str(before);
        let value = match Placeholder::parse(placeholder)? {
            Placeholder::Node(field) => field.of(node),
            Placeholder::Leader { role, field } => {
                let leader =
                    leaders(role).ok_or_else(|| TemplateError::NoLeader(role.to_string()))?;
                field.of(leader)
            }
        };
        out.push_str(&value);
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeField {
    Host,
    Port,
    Id,
    Name,
    Role,
}

impl NodeField {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "host" => NodeField::Host,
            "port" => NodeField::Port,
            "id" => NodeField::Id,
            "name" => NodeField::Name,
            "role" => NodeField::Role,
            _ => return None,
        })
    }

    fn of(self, node: &Node) -> String {
        match self {
            NodeField::Host => node.host.clone(),
            NodeField::Port => node.port.to_string(),
            NodeField::Id => node.id.clone(),
            NodeField::Name => node.name.clone(),
            NodeField::Role => node.role.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder<'t> {
    Node(NodeField),
    Leader { role: &'t str, field: NodeField },
}

impl<'t> Placeholder<'t> {
    fn parse(text: &'t str) -> Result<Self, TemplateError> {
        let unknown = || TemplateError::UnknownPlaceholder(text.to_string());
        if let Some(field) = NodeField::parse(text) {
            return Ok(Placeholder::Node(field));
        }
        let (role, field) = text.rsplit_once('.').ok_or_else(unknown)?;
        let role = role
            .strip_suffix(".leader")
            .filter(|role| !role.is_empty())
            .ok_or_else(unknown)?;
        let field = NodeField::parse(field)
            .filter(|field| *field != NodeField::Role)
            .ok_or_else(unknown)?;
        Ok(Placeholder::Leader { role, field })
    }
}

/// Placeholder-shaped text: `{` + letters, digits, `_ - .` + `}`.
fn next_placeholder(text: &str) -> Option<(&str, &str, &str)> {
    let mut search_from = 0;
    while let Some(offset) = text[search_from..].find('{') {
        let open = search_from + offset;
        let inner_start = open + 1;
        let inner_len = text[inner_start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
            .unwrap_or(text.len() - inner_start);
        let close = inner_start + inner_len;
        if inner_len > 0 && text[close..].starts_with('}') {
            return Some((&text[..open], &text[inner_start..close], &text[close + 1..]));
        }
        search_from = inner_start;
    }
    None
}

fn placeholders(template: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some((_, placeholder, after)) = next_placeholder(rest) {
        found.push(placeholder);
        rest = after;
    }
    found
}

// ----- raw file shape (serde checks types and unknown keys, with locations) -----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    #[serde(default, deserialize_with = "optional_scalar")]
    name: Option<String>,
    #[serde(default, deserialize_with = "optional_scalar")]
    version: Option<String>,
    #[serde(default)]
    agent: RawAgent,
    roles: OrderedRoles,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    port: Option<u16>,
    tls_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    component: Option<String>,
    service: Option<String>,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    nodes: Vec<RawNode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    offline: Option<RawHook>,
    wait_offline: Option<RawHook>,
    online: Option<RawHook>,
    wait_online: Option<RawHook>,
    health: Option<RawHook>,
    leader: Option<RawHook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    #[serde(default)]
    method: HttpMethod,
    url: String,
    body: Option<String>,
    field: Option<String>,
    #[serde(default, deserialize_with = "optional_scalar")]
    equals: Option<String>,
    #[serde(default, deserialize_with = "optional_scalar")]
    not_equals: Option<String>,
    expect_status: Option<u16>,
    #[serde(default, deserialize_with = "optional_duration")]
    interval: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default, deserialize_with = "optional_scalar")]
    id: Option<String>,
    host: String,
    port: u16,
    #[serde(default, deserialize_with = "optional_scalar")]
    name: Option<String>,
    #[serde(default, deserialize_with = "optional_scalar")]
    ports: Option<String>,
    deploy_dir: String,
    data_dir: Option<String>,
    service: Option<String>,
    agent_port: Option<u16>,
    os_arch: Option<String>,
}

/// `roles:` as a mapping whose order is kept (it is the rollout order).
#[derive(Debug)]
struct OrderedRoles(Vec<(String, RawRole)>);

impl<'de> Deserialize<'de> for OrderedRoles {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RolesVisitor;
        impl<'de> Visitor<'de> for RolesVisitor {
            type Value = OrderedRoles;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping from role name to role (component, service, hooks, nodes)")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut roles: Vec<(String, RawRole)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if roles.iter().any(|(known, _)| *known == name) {
                        return Err(de::Error::custom(format!(
                            "role `{name}` is defined twice; merge its nodes into one entry"
                        )));
                    }
                    let role = map.next_value::<RawRole>()?;
                    roles.push((name, role));
                }
                Ok(OrderedRoles(roles))
            }
        }
        deserializer.deserialize_map(RolesVisitor)
    }
}

/// A string, also accepting a number or a boolean written without quotes (`version: 1.0`, `equals: true`).
fn optional_scalar<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct ScalarVisitor;
    impl<'de> Visitor<'de> for ScalarVisitor {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string, number or boolean")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_any(self)
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
        fn visit_bool<E: de::Error>(self, value: bool) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
        fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
        fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
    }
    deserializer.deserialize_option(ScalarVisitor)
}

/// A humantime duration (`200ms`, `10s`, `1m 30s`).
fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let Some(text) = optional_scalar(deserializer)? else {
        return Ok(None);
    };
    let duration = humantime::parse_duration(text.trim()).map_err(|error| {
        de::Error::custom(format!(
            "invalid duration `{text}` ({error}); write a duration such as `500ms` or `10s`"
        ))
    })?;
    if duration.is_zero() {
        return Err(de::Error::custom(format!(
            "duration `{text}` is zero; give a positive duration such as `1s`"
        )));
    }
    Ok(Some(duration))
}

fn syntax_error(error: serde_norway::Error) -> TopologyError {
    let location = error.location();
    let mut message = error.to_string();
    // The location is reported in front; drop serde_norway's own " at line L column C" suffix.
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    TopologyError::Syntax {
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
    }
}

// ----- semantic validation -----

/// Characters that would need escaping in a URL path or break `-N a,b` splitting.
fn bad_name_char(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '/' | '?' | '#' | '{' | '}' | ',' | '%' | '"' | '\'' | '\\'
        )
}

fn build(raw: RawTopology, text: &str) -> Result<Topology, TopologyError> {
    let index = SourceIndex::new(text);
    let mut problems = Vec::new();
    let agent_port = raw.agent.port.unwrap_or(DEFAULT_AGENT_PORT);
    if agent_port == 0 {
        problems.push(Problem {
            line: index
                .top_key_line("agent")
                .and_then(|start| index.key_line_from(start, "port", None)),
            key: "agent.port".into(),
            message: "port 0 cannot be dialed; give the port the agents listen on (default 7480)"
                .into(),
        });
    }
    if raw.roles.0.is_empty() {
        problems.push(Problem {
            line: index.top_key_line("roles"),
            key: "roles".into(),
            message: "no role is defined; add at least one role with its nodes".into(),
        });
    }

    let mut roles = Vec::new();
    for (role_name, raw_role) in raw.roles.0 {
        let role_line = index.role_line(&role_name);
        let role_key = format!("roles.{role_name}");
        if role_name.is_empty()
            || !role_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        {
            problems.push(Problem {
                line: role_line,
                key: role_key.clone(),
                message: format!(
                    "role name `{role_name}` may only hold letters, digits, `-` and `_` (it is used in \
                     `{{<role>.leader.host}}` placeholders); rename it"
                ),
            });
        }
        if raw_role.nodes.is_empty() {
            problems.push(Problem {
                line: role_line,
                key: format!("{role_key}.nodes"),
                message: "the role has no node; add its nodes or remove the role".into(),
            });
        }
        let service = raw_role.service.unwrap_or_else(|| role_name.clone());
        let component = raw_role.component.unwrap_or_else(|| role_name.clone());
        let nodes: Vec<Node> = raw_role
            .nodes
            .into_iter()
            .map(|raw_node| {
                let id = raw_node
                    .id
                    .unwrap_or_else(|| format!("{}:{}", raw_node.host, raw_node.port));
                Node {
                    name: raw_node.name.unwrap_or_else(|| id.clone()),
                    id,
                    role: role_name.clone(),
                    ports: raw_node.ports.unwrap_or_else(|| raw_node.port.to_string()),
                    host: raw_node.host,
                    port: raw_node.port,
                    deploy_dir: raw_node.deploy_dir,
                    data_dir: raw_node.data_dir,
                    service: raw_node.service.unwrap_or_else(|| service.clone()),
                    agent_port: raw_node.agent_port.unwrap_or(agent_port),
                    os_arch: raw_node.os_arch,
                }
            })
            .collect();
        let hooks = Hooks {
            offline: raw_role.hooks.offline.map(hook_from_raw),
            wait_offline: raw_role.hooks.wait_offline.map(hook_from_raw),
            online: raw_role.hooks.online.map(hook_from_raw),
            wait_online: raw_role.hooks.wait_online.map(hook_from_raw),
            health: raw_role.hooks.health.map(hook_from_raw),
            leader: raw_role.hooks.leader.map(hook_from_raw),
        };
        roles.push(Role {
            name: role_name,
            component,
            service,
            hooks,
            nodes,
        });
    }

    validate_nodes(&roles, &index, &mut problems);
    validate_hooks(&roles, &index, &mut problems);

    if !problems.is_empty() {
        problems.sort_by_key(|problem| problem.line.unwrap_or(usize::MAX));
        return Err(TopologyError::Invalid { problems });
    }
    Ok(Topology {
        name: raw.name,
        version: raw.version,
        agent: AgentSettings {
            port: agent_port,
            tls_dir: raw.agent.tls_dir,
        },
        roles,
    })
}

fn hook_from_raw(raw: RawHook) -> HookSpec {
    HookSpec {
        method: raw.method,
        url: raw.url,
        body: raw.body,
        field: raw.field,
        equals: raw.equals,
        not_equals: raw.not_equals,
        expect_status: raw.expect_status,
        interval: raw.interval.unwrap_or(DEFAULT_HOOK_INTERVAL),
        timeout: raw.timeout.unwrap_or(DEFAULT_HOOK_TIMEOUT),
    }
}

fn validate_nodes(roles: &[Role], index: &SourceIndex<'_>, problems: &mut Vec<Problem>) {
    // Every ID and name, with where it was first seen: -N and leader answers match either.
    let mut seen: HashMap<String, (String, &'static str)> = HashMap::new();
    for role in roles {
        for (position, node) in role.nodes.iter().enumerate() {
            let node_line = index.node_line(&role.name, position);
            let key = format!("roles.{}.nodes[{position}]", role.name);
            let field_line = |field: &str| {
                node_line.and_then(|start| {
                    index.key_line_from(start, field, index.node_line(&role.name, position + 1))
                })
            };
            if node.host.is_empty()
                || node
                    .host
                    .chars()
                    .any(|c| bad_name_char(c) || c == '[' || c == ']')
            {
                problems.push(Problem {
                    line: field_line("host").or(node_line),
                    key: format!("{key}.host"),
                    message: format!(
                        "`{}` is not a host name or IP address; give the node's address",
                        node.host
                    ),
                });
            }
            if node.port == 0 {
                problems.push(Problem {
                    line: field_line("port").or(node_line),
                    key: format!("{key}.port"),
                    message:
                        "port 0 is not a service port; give the port the node's service listens on"
                            .into(),
                });
            }
            if node.agent_port == 0 {
                problems.push(Problem {
                    line: field_line("agent_port").or(node_line),
                    key: format!("{key}.agent_port"),
                    message: "agent port 0 cannot be dialed; give the port its agent listens on"
                        .into(),
                });
            }
            if node.deploy_dir.trim().is_empty() {
                problems.push(Problem {
                    line: field_line("deploy_dir").or(node_line),
                    key: format!("{key}.deploy_dir"),
                    message: "deploy_dir is empty; give the node's deploy directory".into(),
                });
            }
            for (field, value) in [("id", &node.id), ("name", &node.name)] {
                if value.is_empty() || value.chars().any(bad_name_char) {
                    problems.push(Problem {
                        line: field_line(field).or(node_line),
                        key: format!("{key}.{field}"),
                        message: format!(
                            "`{value}` cannot be a node {field}: it may not be empty nor hold spaces or any of \
                             / ? # {{ }} , % quotes or backslash; choose another"
                        ),
                    });
                }
            }
            let mut node_values = vec![(node.id.clone(), "id")];
            if node.name != node.id {
                node_values.push((node.name.clone(), "name"));
            }
            for (value, field) in node_values {
                if let Some((first_key, first_field)) = seen.get(&value) {
                    problems.push(Problem {
                        line: field_line(field).or(node_line),
                        key: format!("{key}.{field}"),
                        message: format!(
                            "node {field} `{value}` is already used as the {first_field} of {first_key}; every \
                             node ID and name must be unique in the cluster (give this node another `{field}`)"
                        ),
                    });
                } else {
                    seen.insert(value, (key.clone(), field));
                }
            }
        }
    }
}

fn validate_hooks(roles: &[Role], index: &SourceIndex<'_>, problems: &mut Vec<Problem>) {
    let roles_with_leader: HashSet<&str> = roles
        .iter()
        .filter(|role| role.hooks.leader.is_some())
        .map(|role| role.name.as_str())
        .collect();
    let known_roles: Vec<&str> = roles.iter().map(|role| role.name.as_str()).collect();
    for role in roles {
        let role_line = index.role_line(&role.name);
        let next_role_line = roles
            .iter()
            .skip_while(|other| other.name != role.name)
            .nth(1)
            .and_then(|next| index.role_line(&next.name));
        for (hook_name, hook) in role.hooks.iter() {
            let key = format!("roles.{}.hooks.{hook_name}", role.name);
            let hook_line =
                role_line.and_then(|start| index.key_line_from(start, hook_name, next_role_line));
            let line_of = |field: &str| {
                hook_line
                    .and_then(|start| index.key_line_from(start, field, next_role_line))
                    .or(hook_line)
            };
            let mut problem = |field: &str, message: String| {
                let full_key = if field.is_empty() {
                    key.clone()
                } else {
                    format!("{key}.{field}")
                };
                let line = if field.is_empty() {
                    hook_line
                } else {
                    line_of(field)
                };
                problems.push(Problem {
                    line,
                    key: full_key,
                    message,
                });
            };
            if !(hook.url.starts_with("http://") || hook.url.starts_with("https://")) {
                problem(
                    "url",
                    format!("`{}` must start with http:// or https://", hook.url),
                );
            }
            for (field, template) in std::iter::once(("url", hook.url.as_str()))
                .chain(hook.body.as_deref().map(|b| ("body", b)))
            {
                for placeholder in placeholders(template) {
                    match Placeholder::parse(placeholder) {
                        Err(error) => problem(field, error.to_string()),
                        Ok(Placeholder::Node(_)) => {}
                        Ok(Placeholder::Leader {
                            role: leader_role, ..
                        }) => {
                            if hook_name == "leader" {
                                problem(
                                    field,
                                    format!(
                                        "a leader hook may only use the node's own placeholders ({{host}} {{port}} \
                                         {{id}} {{name}} {{role}}), not `{{{placeholder}}}`: leaders are looked up \
                                         through it"
                                    ),
                                );
                            } else if !known_roles.contains(&leader_role) {
                                problem(
                                    field,
                                    format!(
                                        "`{{{placeholder}}}` names role `{leader_role}`, which does not exist; \
                                         roles are: {}",
                                        known_roles.join(", ")
                                    ),
                                );
                            } else if !roles_with_leader.contains(leader_role) {
                                problem(
                                    field,
                                    format!(
                                        "`{{{placeholder}}}` needs the leader of role `{leader_role}`, which has \
                                         no `leader` hook; add `hooks.leader` to that role"
                                    ),
                                );
                            }
                        }
                    }
                }
            }
            if hook.equals.is_some() && hook.not_equals.is_some() {
                problem(
                    "not_equals",
                    "give either `equals` or `not_equals`, not both".into(),
                );
            }
            if (hook.equals.is_some() || hook.not_equals.is_some()) && hook.field.is_none() {
                problem(
                    "",
                    "`equals`/`not_equals` compare a JSON field: add `field: <name>`".into(),
                );
            }
            if hook_name == "leader" && hook.field.is_none() {
                problem(
                    "",
                    "a leader hook reads the leader from a JSON field: add `field: <name>`".into(),
                );
            }
            if let Some(status) = hook.expect_status
                && !(100..=599).contains(&status)
            {
                problem(
                    "expect_status",
                    format!("{status} is not an HTTP status; give one between 100 and 599"),
                );
            }
            if hook.interval > hook.timeout {
                problem(
                    "interval",
                    format!(
                        "interval {} is longer than timeout {}; shorten the interval or raise the timeout",
                        humantime::format_duration(hook.interval),
                        humantime::format_duration(hook.timeout)
                    ),
                );
            }
        }
    }
}

/// Finds lines of keys in the source text for semantic errors (serde reports locations only for its own errors).
/// Best effort: it knows the file's shape (top-level keys, role keys, one `host:` per node), not YAML.
struct SourceIndex<'t> {
    lines: Vec<&'t str>,
}

impl<'t> SourceIndex<'t> {
    fn new(text: &'t str) -> Self {
        Self {
            lines: text.lines().collect(),
        }
    }

    /// 1-based line of a top-level key.
    fn top_key_line(&self, key: &str) -> Option<usize> {
        self.lines
            .iter()
            .position(|line| {
                !line.starts_with([' ', '\t', '#'])
                    && line.starts_with(key)
                    && line[key.len()..].trim_start().starts_with(':')
            })
            .map(|index| index + 1)
    }

    /// 1-based line of `<role>:` inside `roles:`.
    fn role_line(&self, role: &str) -> Option<usize> {
        let start = self.top_key_line("roles")?;
        self.key_line_from(start + 1, role, None)
    }

    /// 1-based line of the `position`-th node (0-based) of a role: its `host:` key.
    fn node_line(&self, role: &str, position: usize) -> Option<usize> {
        let role_line = self.role_line(role)?;
        let mut line = role_line;
        for _ in 0..=position {
            line = self.key_line_from(line + 1, "host", None)?;
        }
        Some(line)
    }

    /// First 1-based line at or after `start` (and before `stop`) that holds `key:` as a key.
    fn key_line_from(&self, start: usize, key: &str, stop: Option<usize>) -> Option<usize> {
        let end = stop.unwrap_or(usize::MAX).min(self.lines.len() + 1);
        (start.max(1)..end).find(|&line| has_key(self.lines[line - 1], key))
    }
}

/// Whether a line holds `key:` as a key (block `key:` or flow `{ key: …, key: … }`), outside comments.
fn has_key(line: &str, key: &str) -> bool {
    let line = match line.find(" #") {
        Some(comment) => &line[..comment],
        None => line,
    };
    let bytes = line.as_bytes();
    let mut from = 0;
    while let Some(offset) = line[from..].find(key) {
        let start = from + offset;
        let end = start + key.len();
        let boundary_before = start == 0
            || matches!(
                bytes[start - 1],
                b' ' | b'\t' | b'{' | b',' | b'-' | b'"' | b'\''
            );
        let after = line[end..].trim_start_matches(['"', '\'']);
        if boundary_before
            && after.starts_with(':')
            && (after.len() == 1 || after[1..].starts_with([' ', '\t']))
        {
            return true;
        }
        from = end;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/topology.yaml");

    fn node(id: &str, host: &str, port: u16, name: &str, role: &str) -> Node {
        Node {
            id: id.into(),
            role: role.into(),
            host: host.into(),
            port,
            name: name.into(),
            ports: port.to_string(),
            deploy_dir: "/opt/x".into(),
            data_dir: None,
            service: role.into(),
            agent_port: 7480,
            os_arch: None,
        }
    }

    #[test]
    fn example_parses_with_defaults_and_order() {
        let topology = Topology::parse(EXAMPLE).expect("example topology parses");
        assert_eq!(topology.name.as_deref(), Some("demo"));
        assert_eq!(topology.role_order(), vec!["demo-master", "demo-worker"]);
        assert_eq!(topology.agent.port, 7480);
        let master = topology.role("demo-master").expect("master role");
        assert_eq!(master.component, "demo-master");
        assert_eq!(master.service, "demo-master");
        assert!(master.hooks.leader.is_some());
        let first = &master.nodes[0];
        assert_eq!(first.id, "127.0.1.1:8261");
        assert_eq!(first.name, "master-1");
        assert_eq!(first.ports, "8261/8291");
        assert_eq!(first.agent_port, 7480);
        let worker = topology.role("demo-worker").expect("worker role");
        let wait_offline = worker
            .hooks
            .wait_offline
            .as_ref()
            .expect("wait_offline hook");
        assert_eq!(wait_offline.interval, Duration::from_millis(200));
        assert_eq!(wait_offline.timeout, Duration::from_secs(10));
        assert_eq!(wait_offline.equals.as_deref(), Some("Offline"));
        let offline = worker.hooks.offline.as_ref().expect("offline hook");
        assert_eq!(offline.method, HttpMethod::Post);
        assert_eq!(offline.timeout, DEFAULT_HOOK_TIMEOUT);
        assert_eq!(offline.leader_roles(), vec!["demo-master"]);
        assert_eq!(topology.component_roles("demo-worker"), vec!["demo-worker"]);
        assert_eq!(topology.node_count(), topology.nodes().count());
        assert!(topology.node_by_id(&worker.nodes[0].id).is_some());
    }

    #[test]
    fn role_order_is_file_order_not_alphabetical() {
        let text = "roles:\n  zeta:\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n  alpha:\n    nodes:\n      - { host: 127.0.1.2, port: 1, deploy_dir: /a }\n";
        let topology = Topology::parse(text).expect("parses");
        assert_eq!(topology.role_order(), vec!["zeta", "alpha"]);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = "roles:\n  w:\n    nodes:\n      - host: 127.0.1.1\n        prot: 8262\n        deploy_dir: /a\n";
        let error = Topology::parse(text).expect_err("typo refused").to_string();
        assert!(error.contains("line 5"), "{error}");
        assert!(error.contains("prot"), "{error}");
        assert!(error.contains("nodes[0]"), "{error}");
    }

    #[test]
    fn bad_duration_names_line() {
        let text = "roles:\n  w:\n    hooks:\n      health: { url: \"http://{host}/h\", timeout: 10 parsecs }\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n";
        let error = Topology::parse(text).expect_err("bad duration").to_string();
        assert!(error.contains("line 4"), "{error}");
        assert!(error.contains("10 parsecs"), "{error}");
        assert!(error.contains("500ms"), "{error}");
    }

    #[test]
    fn duplicate_ids_and_names_are_refused_with_lines() {
        let text = "roles:\n  a:\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a, name: n1 }\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n  b:\n    nodes:\n      - { host: 127.0.1.2, port: 1, deploy_dir: /a, name: n1 }\n";
        let TopologyError::Invalid { problems } = Topology::parse(text).expect_err("duplicates")
        else {
            panic!("expected a semantic error");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].line, Some(5));
        assert_eq!(problems[0].key, "roles.a.nodes[1].id");
        assert!(problems[0].message.contains("127.0.1.1:1"));
        assert_eq!(problems[1].line, Some(8));
        assert_eq!(problems[1].key, "roles.b.nodes[0].name");
    }

    #[test]
    fn placeholders_are_checked() {
        let text = r#"roles:
  m:
    hooks:
      health: { url: "http://{host}:{port}/h" }
    nodes:
      - { host: 127.0.1.1, port: 1, deploy_dir: /a }
  w:
    hooks:
      offline: { method: POST, url: "http://{m.leader.host}/x/{nmae}" }
      online: { method: POST, url: "http://{nope.leader.host}/x" }
      wait_online: { url: "http://{host}/x", field: state, not_equals: Offline, interval: 20s, timeout: 10s }
    nodes:
      - { host: 127.0.1.2, port: 1, deploy_dir: /a }
"#;
        let TopologyError::Invalid { problems } =
            Topology::parse(text).expect_err("bad placeholders")
        else {
            panic!("expected a semantic error");
        };
        let rendered: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 4, "{rendered:#?}");
        // m has no leader hook, so {m.leader.host} is refused as well as the typo.
        assert!(
            rendered[0].starts_with("line 9, key `roles.w.hooks.offline.url`"),
            "{rendered:#?}"
        );
        assert!(
            rendered.iter().any(|p| p.contains("{nmae}")),
            "{rendered:#?}"
        );
        assert!(
            rendered.iter().any(|p| p.contains("no `leader` hook")),
            "{rendered:#?}"
        );
        assert!(
            rendered
                .iter()
                .any(|p| p.starts_with("line 10") && p.contains("`nope`")),
            "{rendered:#?}"
        );
        assert!(
            rendered
                .iter()
                .any(|p| p.starts_with("line 11") && p.contains("interval 20s")),
            "{rendered:#?}"
        );
    }

    #[test]
    fn empty_roles_and_nodeless_roles_are_refused() {
        let error = Topology::parse("roles: {}\n")
            .expect_err("no roles")
            .to_string();
        assert!(error.contains("line 1, key `roles`"), "{error}");
        let error = Topology::parse("version: v1\nroles:\n  w:\n    component: x\n")
            .expect_err("no nodes")
            .to_string();
        assert!(error.contains("line 3, key `roles.w.nodes`"), "{error}");
    }

    #[test]
    fn malformed_yaml_has_a_location() {
        let error = Topology::parse("roles:\n  w: [\n").expect_err("not yaml");
        let TopologyError::Syntax { line, .. } = error else {
            panic!("expected a syntax error, got {error}");
        };
        assert!(line.is_some());
    }

    #[test]
    fn name_mismatch_is_refused() {
        let topology = Topology::parse(EXAMPLE).expect("parses");
        assert!(topology.check_name("demo", EXAMPLE).is_ok());
        let error = topology
            .check_name("prod", EXAMPLE)
            .expect_err("mismatch")
            .to_string();
        assert!(
            error.contains("key `name`") && error.contains("prod"),
            "{error}"
        );
    }

    #[test]
    fn render_url_fills_node_and_leader_fields() {
        let worker = node("w1", "127.0.1.2", 8262, "worker-1", "demo-worker");
        let leader = node(
            "127.0.1.1:8261",
            "127.0.1.1",
            8261,
            "master-1",
            "demo-master",
        );
        let leaders = |role: &str| (role == "demo-master").then_some(&leader);
        let url = render_url(
            "http://{demo-master.leader.host}:{demo-master.leader.port}/api/members/{name}/{id}/{role}/{host}:{port}",
            &worker,
            &leaders,
        )
        .expect("renders");
        assert_eq!(
            url,
            "http://127.0.1.1:8261/api/members/worker-1/w1/demo-worker/127.0.1.2:8262"
        );
        let body =
            render_url(r#"{"member": "{name}", "x": {}}"#, &worker, &leaders).expect("json body");
        assert_eq!(body, r#"{"member": "worker-1", "x": {}}"#);
        assert_eq!(
            render_url("http://{other.leader.host}/", &worker, &leaders),
            Err(TemplateError::NoLeader("other".into()))
        );
        assert_eq!(
            render_url("http://{hots}/", &worker, &leaders),
            Err(TemplateError::UnknownPlaceholder("hots".into()))
        );
    }

    #[test]
    fn node_named_matches_id_name_and_host_port() {
        let topology = Topology::parse(EXAMPLE).expect("parses");
        let master = topology.role("demo-master").expect("role");
        let second = &master.nodes[1];
        assert_eq!(
            master.node_named(&second.name).map(|n| &n.id),
            Some(&second.id)
        );
        assert_eq!(
            master.node_named(&second.id).map(|n| &n.id),
            Some(&second.id)
        );
        assert!(master.node_named("nobody").is_none());
    }

    #[test]
    fn tls_dir_resolution() {
        let home = Home::at("/tmp/h");
        let mut agent = AgentSettings {
            port: 1,
            tls_dir: None,
        };
        assert_eq!(agent.tls_dir(&home), PathBuf::from("/tmp/h/tls"));
        agent.tls_dir = Some(PathBuf::from("certs"));
        assert_eq!(agent.tls_dir(&home), PathBuf::from("/tmp/h/certs"));
        agent.tls_dir = Some(PathBuf::from("/etc/x"));
        assert_eq!(agent.tls_dir(&home), PathBuf::from("/etc/x"));
    }
}
