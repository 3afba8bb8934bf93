//! Per-node status for `display` (and the observed status the planner needs): the agent's Info and Status and
//! the role's health, leader and member-state hooks, probed for every node in parallel, each probe bounded by a
//! timeout so one dead host does not stall the others.

use crate::agent::client::AgentClient;
use crate::agent::ops::{self, RunState, ServiceInfo};
use crate::hooks::{ClusterHooks, value_text};
use crate::tls_files::ControllerTls;
use crate::topology::{HookSpec, Node};
use crate::untrusted::escaped;
use futures::future::join_all;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

/// What the agent of a node reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    /// `linux/x86_64` style.
    pub os_arch: String,
    /// The node's service, if the agent manages one of that name.
    pub service: Option<ServiceInfo>,
}

/// Asks a node's agent about itself and its service.
pub trait AgentProbe: Sync {
    /// Info + Status of the node's service. `Err` carries why the agent could not be asked.
    fn probe(&self, node: &Node) -> impl Future<Output = Result<AgentView, String>> + Send;
}

/// Probes agents over mutual TLS.
#[derive(Debug, Clone)]
pub struct LiveAgentProbe {
    tls: ControllerTls,
}

impl LiveAgentProbe {
    /// A probe with the controller's identity.
    pub fn new(tls: ControllerTls) -> Self {
        Self { tls }
    }
}

impl AgentProbe for LiveAgentProbe {
    async fn probe(&self, node: &Node) -> Result<AgentView, String> {
        let mut client = AgentClient::connect(&node.agent_address(), &self.tls)
            .await
            .map_err(|e| e.to_string())?;
        let info = client.info().await.map_err(|e| e.to_string())?;
        let services = ops::status(client.raw(), Some(&node.service))
            .await
            .map_err(|status| {
                format!("Status: {:?}: {}", status.code(), escaped(status.message()))
            })?;
        Ok(AgentView {
            os_arch: format!("{}/{}", info.os, info.arch),
            service: services
                .into_iter()
                .find(|service| service.name == node.service),
        })
    }
}

/// One row of `display`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// Node ID.
    pub id: String,
    /// Role.
    pub role: String,
    /// Marked `(patched)` by a successful rollout.
    pub patched: bool,
    /// Host.
    pub host: String,
    /// Ports label.
    pub ports: String,
    /// `linux/x86_64`, from the agent or the topology; `-` when unknown.
    pub os_arch: String,
    /// `Up`, `Down`, `Healthy`, `Healthy|L`, `Unreachable`, `Offline`, or the member state the cluster reports.
    pub status: String,
    /// Data directory.
    pub data_dir: String,
    /// Deploy directory.
    pub deploy_dir: String,
    /// Version label of the running patch, or the first 12 hex digits of the binary's sha256.
    pub version: String,
    /// The role's leader hook names this node.
    pub leader: bool,
    /// Service as the agent reports it (pid, uptime, last patch…); absent when unreachable.
    pub service: Option<ServiceInfo>,
    /// Why a probe failed, if one did.
    pub problems: Vec<String>,
}

impl NodeStatus {
    /// Counted as down by the planner: the agent does not answer, the service is not running, its health check
    /// fails, or the cluster reports the member `Offline` (e.g. left offline by an earlier rollout). The leader
    /// mark `|L` is ignored, and member states are compared without regard to case as clusters spell them freely.
    pub fn is_down(&self) -> bool {
        let base = self.status.strip_suffix("|L").unwrap_or(&self.status);
        [
            "Unreachable",
            "Down",
            "Failed",
            "Stopped",
            "Offline",
            "Unhealthy",
        ]
        .iter()
        .any(|down| base.eq_ignore_ascii_case(down))
    }
}

/// Probes every node (in parallel), each probe within `timeout`.
pub async fn collect<P: AgentProbe>(
    hooks: &ClusterHooks,
    nodes: &[&Node],
    probe: &P,
    patched: &dyn Fn(&Node) -> bool,
    timeout: Duration,
) -> Vec<NodeStatus> {
    let mut roles: Vec<&str> = nodes.iter().map(|node| node.role.as_str()).collect();
    roles.sort_unstable();
    roles.dedup();
    let leader_lookups = roles.iter().map(|role| async move {
        let leader = tokio::time::timeout(timeout, hooks.leader(role, timeout)).await;
        (
            role.to_string(),
            leader
                .ok()
                .and_then(Result::ok)
                .flatten()
                .map(|node| node.id),
        )
    });
    let node_probes = nodes
        .iter()
        .map(|node| probe_node(hooks, node, probe, timeout));
    let (leaders, probed) = futures::join!(join_all(leader_lookups), join_all(node_probes));
    let leaders: HashMap<String, Option<String>> = leaders.into_iter().collect();
    probed
        .into_iter()
        .zip(nodes)
        .map(|(probed, node)| {
            let leader = leaders
                .get(&node.role)
                .and_then(Option::as_ref)
                .is_some_and(|id| id == &node.id);
            build_row(node, probed, leader, patched(node))
        })
        .collect()
}

/// What the probes of one node found.
#[derive(Debug, Default)]
struct Probed {
    agent: Option<Result<AgentView, String>>,
    health: Option<Result<(), String>>,
    member_state: Option<Result<String, String>>,
}

async fn probe_node<P: AgentProbe>(
    hooks: &ClusterHooks,
    node: &Node,
    probe: &P,
    timeout: Duration,
) -> Probed {
    let timed_out = || format!("no answer within {}", humantime::format_duration(timeout));
    let agent = async {
        tokio::time::timeout(timeout, probe.probe(node))
            .await
            .unwrap_or_else(|_| Err(format!("agent: {}", timed_out())))
    };
    let health = async {
        let spec = hooks.topology().role(&node.role)?.hooks.health.as_ref()?;
        let checked = tokio::time::timeout(timeout, hooks.check_once(spec, node, timeout)).await;
        Some(match checked {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("health: {error}")),
            Err(_) => Err(format!("health: {}", timed_out())),
        })
    };
    let member_state = async {
        let spec = member_state_hook(hooks, node)?;
        let read = tokio::time::timeout(timeout, hooks.check_once(&spec, node, timeout)).await;
        Some(match read {
            Ok(Ok(answer)) => answer
                .field_value
                .as_ref()
                .map(value_text)
                .ok_or_else(|| "no state".to_string()),
            Ok(Err(error)) => Err(format!("member state: {error}")),
            Err(_) => Err(format!("member state: {}", timed_out())),
        })
    };
    let (agent, health, member_state) = futures::join!(agent, health, member_state);
    Probed {
        agent: Some(agent),
        health,
        member_state,
    }
}

/// The role's `wait_online` (else `wait_offline`) hook read as a plain GET of its field: the member state the
/// cluster reports (`Free`, `Bound`, `Offline`…), as tiup shows DM workers.
fn member_state_hook(hooks: &ClusterHooks, node: &Node) -> Option<HookSpec> {
    let role = hooks.topology().role(&node.role)?;
    let spec = role
        .hooks
        .wait_online
        .as_ref()
        .or(role.hooks.wait_offline.as_ref())?;
    spec.field.as_ref()?;
    let mut read = spec.clone();
    read.equals = None;
    read.not_equals = None;
    Some(read)
}

fn build_row(node: &Node, probed: Probed, leader: bool, patched: bool) -> NodeStatus {
    let mut problems = Vec::new();
    let (agent, agent_error) = match probed.agent {
        Some(Ok(view)) => (Some(view), None),
        Some(Err(error)) => (None, Some(error)),
        None => (None, None),
    };
    if let Some(error) = &agent_error {
        problems.push(error.clone());
    }
    let service = agent.as_ref().and_then(|view| view.service.clone());
    if agent.is_some() && service.is_none() {
        problems.push(format!(
            "the agent manages no service named `{}`",
            node.service
        ));
    }
    if let Some(service) = &service {
        if !service.quarantine.is_empty() {
            problems.push(format!("quarantined by its agent: {}", service.quarantine));
        }
        if !service.quarantined_backups.is_empty() {
            problems.push(format!(
                "backup sets kept aside by its agent (no journal referred to them; delete them when not needed): {}",
                service.quarantined_backups.join(", ")
            ));
        }
    }
    let health = probed.health;
    if let Some(Err(error)) = &health {
        problems.push(error.clone());
    }
    let member_state = match probed.member_state {
        Some(Ok(state)) => Some(escaped(&state)),
        Some(Err(error)) => {
            problems.push(error);
            None
        }
        None => None,
    };
    let base = if agent_error.is_some() {
        "Unreachable".to_string()
    } else {
        match service.as_ref().map(|service| service.state) {
            Some(RunState::Stopped) => "Down".to_string(),
            Some(RunState::Failed) => "Failed".to_string(),
            Some(RunState::Starting) => "Starting".to_string(),
            Some(RunState::Running | RunState::Unknown) | None => match (&member_state, &health) {
                (Some(state), _) => state.clone(),
                (None, Some(Ok(()))) => "Healthy".to_string(),
                (None, Some(Err(_))) => "Unhealthy".to_string(),
                (None, None) if service.is_some() => "Up".to_string(),
                (None, None) => "-".to_string(),
            },
        }
    };
    let status = if leader { format!("{base}|L") } else { base };
    let os_arch = agent
        .as_ref()
        .map(|view| view.os_arch.clone())
        .or_else(|| node.os_arch.clone())
        .unwrap_or_else(|| "-".to_string());
    NodeStatus {
        id: node.id.clone(),
        role: node.role.clone(),
        patched,
        host: node.host.clone(),
        ports: node.ports.clone(),
        os_arch,
        status,
        data_dir: node.data_dir.clone().unwrap_or_else(|| "-".to_string()),
        deploy_dir: node.deploy_dir.clone(),
        version: service
            .as_ref()
            .map_or_else(|| "-".to_string(), ServiceInfo::version_label),
        leader,
        service,
        // Problems quote agents and cluster APIs (errors, answers): escaped like all such text.
        problems: problems.iter().map(|problem| escaped(problem)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::HookClient;
    use crate::topology::Topology;
    use std::sync::Arc;

    struct FakeProbe {
        dead: &'static str,
        hang: &'static str,
    }

    impl AgentProbe for FakeProbe {
        async fn probe(&self, node: &Node) -> Result<AgentView, String> {
            if node.name == self.dead {
                return Err("cannot connect: connection refused".to_string());
            }
            if node.name == self.hang {
                std::future::pending::<()>().await;
            }
            Ok(AgentView {
                os_arch: "linux/x86_64".to_string(),
                service: Some(ServiceInfo {
                    name: node.service.clone(),
                    component: node.role.clone(),
                    state: RunState::Running,
                    pid: 42,
                    uptime_seconds: 1,
                    binary_sha256: "abcdef0123456789".to_string(),
                    version: String::new(),
                    deploy_dir: node.deploy_dir.clone(),
                    last: None,
                    apply_in_flight: false,
                    history: vec![],
                    quarantine: String::new(),
                    quarantined_backups: vec![],
                    image: String::new(),
                }),
            })
        }
    }

    #[tokio::test]
    async fn a_dead_or_hanging_agent_does_not_stall_the_others() {
        let topology = Topology::parse(
            "roles:\n  w:\n    nodes:\n      - { host: 127.0.1.1, port: 1, name: a, deploy_dir: /a }\n      - { host: 127.0.1.2, port: 1, name: b, deploy_dir: /b }\n      - { host: 127.0.1.3, port: 1, name: c, deploy_dir: /c }\n",
        )
        .unwrap();
        let hooks = ClusterHooks::new(Arc::new(topology), HookClient::new().unwrap());
        let nodes: Vec<&Node> = hooks.topology().nodes().collect();
        let probe = FakeProbe {
            dead: "b",
            hang: "c",
        };
        let started = std::time::Instant::now();
        let rows = collect(
            &hooks,
            &nodes,
            &probe,
            &|node| node.name == "a",
            Duration::from_millis(300),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        let statuses: Vec<&str> = rows.iter().map(|row| row.status.as_str()).collect();
        assert_eq!(statuses, ["Up", "Unreachable", "Unreachable"]);
        assert_eq!(rows[0].version, "abcdef012345");
        assert!(rows[0].patched && !rows[1].patched);
        assert!(rows[2].problems[0].contains("no answer within"));
        assert!(rows[1].is_down() && !rows[0].is_down());
    }

    #[test]
    fn offline_and_unhealthy_members_count_as_down() {
        let row = |status: &str| NodeStatus {
            id: "w-1".to_string(),
            role: "w".to_string(),
            patched: false,
            host: "127.0.1.1".to_string(),
            ports: "1".to_string(),
            os_arch: "-".to_string(),
            status: status.to_string(),
            data_dir: "-".to_string(),
            deploy_dir: "/a".to_string(),
            version: "-".to_string(),
            leader: status.ends_with("|L"),
            service: None,
            problems: vec![],
        };
        for down in [
            "Offline",
            "OFFLINE",
            "Offline|L",
            "Unhealthy",
            "Unreachable|L",
            "Down",
            "Failed",
            "Stopped",
        ] {
            assert!(row(down).is_down(), "{down} must count as down");
        }
        for up in ["Up", "Healthy", "Healthy|L", "Online", "Starting", "-"] {
            assert!(!row(up).is_down(), "{up} must not count as down");
        }
    }
}
