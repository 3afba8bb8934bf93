//! From the file as read to a [`Topology`](super::Topology): defaults, then every check, each problem naming its
//! line and key.

use super::raw::{RawHook, RawTopology, bad_name_char};
use super::template::{Placeholder, placeholders};
use super::*;
use std::collections::{HashMap, HashSet};

pub(super) fn build(raw: RawTopology, text: &str) -> Result<Topology, TopologyError> {
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

    let mut databases = Vec::new();
    for (name, raw_database) in raw.databases {
        let key = format!("databases.{name}");
        let line = index
            .top_key_line("databases")
            .and_then(|start| index.key_line_from(start + 1, &name, None));
        let mut problem = |field: &str, message: String| {
            problems.push(Problem {
                line,
                key: if field.is_empty() {
                    key.clone()
                } else {
                    format!("{key}.{field}")
                },
                message,
            })
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        {
            problem(
                "",
                format!(
                    "database name `{name}` may only hold letters, digits, `-` and `_`; rename it"
                ),
            );
        }
        if raw_database.port == 0 {
            problem(
                "port",
                "port 0 cannot be dialed; give the database's port".into(),
            );
        }
        let password = match (raw_database.password_file, raw_database.password_env) {
            (Some(_), Some(_)) => {
                problem(
                    "password_env",
                    "give either `password_file` or `password_env`, not both".into(),
                );
                PasswordSource::None
            }
            (Some(file), None) => PasswordSource::File(file),
            (None, Some(variable)) => PasswordSource::Env(variable),
            (None, None) => PasswordSource::None,
        };
        databases.push(Database {
            name,
            host: raw_database.host,
            port: raw_database.port,
            user: raw_database.user,
            password,
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
        databases,
    })
}

pub(super) fn hook_from_raw(raw: RawHook) -> HookSpec {
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

pub(super) fn validate_nodes(roles: &[Role], index: &SourceIndex<'_>, problems: &mut Vec<Problem>) {
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

pub(super) fn validate_hooks(roles: &[Role], index: &SourceIndex<'_>, problems: &mut Vec<Problem>) {
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
pub(super) struct SourceIndex<'t> {
    lines: Vec<&'t str>,
}

impl<'t> SourceIndex<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        Self {
            lines: text.lines().collect(),
        }
    }

    /// 1-based line of a top-level key.
    pub(super) fn top_key_line(&self, key: &str) -> Option<usize> {
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
    pub(super) fn role_line(&self, role: &str) -> Option<usize> {
        let start = self.top_key_line("roles")?;
        self.key_line_from(start + 1, role, None)
    }

    /// 1-based line of the `position`-th node (0-based) of a role: its `host:` key.
    pub(super) fn node_line(&self, role: &str, position: usize) -> Option<usize> {
        let role_line = self.role_line(role)?;
        let mut line = role_line;
        for _ in 0..=position {
            line = self.key_line_from(line + 1, "host", None)?;
        }
        Some(line)
    }

    /// First 1-based line at or after `start` (and before `stop`) that holds `key:` as a key.
    pub(super) fn key_line_from(
        &self,
        start: usize,
        key: &str,
        stop: Option<usize>,
    ) -> Option<usize> {
        let end = stop.unwrap_or(usize::MAX).min(self.lines.len() + 1);
        (start.max(1)..end).find(|&line| has_key(self.lines[line - 1], key))
    }
}

/// Whether a line holds `key:` as a key (block `key:` or flow `{ key: …, key: … }`), outside comments.
pub(super) fn has_key(line: &str, key: &str) -> bool {
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
