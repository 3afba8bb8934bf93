//! DEMO ONLY: the files `patchctl demo up` writes: each agent's `patchd.toml` (format: ARCHITECTURE.md "Agent
//! config") and the cluster topology (from `demo/topology.yaml.tmpl`, the worked example of hooks).

use super::DemoError;
use super::containers::{ENV_ADD, container_name};
use super::layout::{
    DemoHost, DemoLayout, DemoService, MASTER_PEER_PORT, ORIGINAL_VERSION, ServiceRole,
};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The topology template (shipped in the repository as `demo/topology.yaml.tmpl`).
pub const TOPOLOGY_TEMPLATE: &str = include_str!("../../../demo/topology.yaml.tmpl");

#[derive(Debug, Serialize)]
struct AgentConfigFile {
    listen: String,
    state_dir: PathBuf,
    deploy_roots: Vec<PathBuf>,
    tls: TlsFile,
    service: Vec<ServiceEntry>,
}

/// A process service, or (`--containers`) a container service.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ServiceEntry {
    Process(ServiceFile),
    Docker(DockerServiceFile),
}

#[derive(Debug, Serialize)]
struct DockerServiceFile {
    name: String,
    component: String,
    backend: &'static str,
    container: String,
    env_add: Vec<String>,
    stop_timeout: &'static str,
    health: HealthFile,
}

#[derive(Debug, Serialize)]
struct TlsFile {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Serialize)]
struct ServiceFile {
    name: String,
    component: String,
    deploy_dir: PathBuf,
    backend: &'static str,
    command: Vec<String>,
    user: String,
    restart_on_crash: bool,
    stop_timeout: &'static str,
    health: HealthFile,
}

#[derive(Debug, Serialize)]
struct HealthFile {
    min_healthy: &'static str,
    http: String,
    timeout: &'static str,
}

/// The argv the agent runs for a service (`{deploy_dir}` is replaced by the agent).
pub fn service_command(layout: &DemoLayout, service: &DemoService) -> Vec<String> {
    let component = service.role.component();
    let mut argv = vec![
        format!("{{deploy_dir}}/bin/{component}/{component}"),
        "serve".to_string(),
        "--listen".to_string(),
        service.addr(),
        "--name".to_string(),
        service.name.clone(),
    ];
    match service.role {
        ServiceRole::Master => {
            for peer in layout
                .services_of(ServiceRole::Master)
                .filter(|peer| peer.name != service.name)
            {
                argv.push("--peer".to_string());
                argv.push(format!("{}={}", peer.name, peer.url()));
            }
            argv.push("--tasks".to_string());
            argv.push(layout.task_count().to_string());
        }
        ServiceRole::Worker => {
            for master in layout.services_of(ServiceRole::Master) {
                argv.push("--master".to_string());
                argv.push(master.url());
            }
        }
    }
    argv
}

/// `patchd.toml` of one demo agent: its address, directories, certificates and its services (process backend;
/// with `containers`, the workers are containers: backend `docker`).
pub fn agent_config(
    layout: &DemoLayout,
    host: &DemoHost,
    containers: bool,
) -> Result<String, DemoError> {
    let tls_dir = host.tls_dir();
    // The demo's services run as whoever runs the demo (root included, then written out as the agent requires).
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|user| user.name)
        .ok_or_else(|| DemoError::Render {
            what: "patchd.toml",
            message:
                "the current user has no name in the user database; the agent needs one for `user`"
                    .into(),
        })?;
    let file = AgentConfigFile {
        listen: host.agent_addr(),
        state_dir: host.state_dir(),
        deploy_roots: vec![host.deploy_root()],
        tls: TlsFile {
            ca: tls_dir.join("ca.crt"),
            cert: tls_dir.join(format!("{}.crt", host.cert_name())),
            key: tls_dir.join(format!("{}.key", host.cert_name())),
        },
        service: host
            .services
            .iter()
            .map(|service| {
                let health = HealthFile {
                    min_healthy: "1s",
                    http: format!("{}/health", service.url()),
                    timeout: "15s",
                };
                if containers && service.role == ServiceRole::Worker {
                    return ServiceEntry::Docker(DockerServiceFile {
                        name: service.role.component().to_string(),
                        component: service.role.component().to_string(),
                        backend: "docker",
                        container: container_name(&layout.dir, host, service),
                        env_add: vec![ENV_ADD.to_string()],
                        stop_timeout: "5s",
                        health,
                    });
                }
                ServiceEntry::Process(ServiceFile {
                    name: service.role.component().to_string(),
                    component: service.role.component().to_string(),
                    deploy_dir: service.deploy_dir.clone(),
                    backend: "process",
                    command: service_command(layout, service),
                    user: user.clone(),
                    restart_on_crash: true,
                    stop_timeout: "5s",
                    health,
                })
            })
            .collect(),
    };
    let body = toml::to_string(&file).map_err(|e| DemoError::Render {
        what: "patchd.toml",
        message: e.to_string(),
    })?;
    Ok(format!(
        "# DEMO ONLY: agent {} of the patchd demo cluster, written by `patchctl demo up`.\n{body}",
        host.index
    ))
}

/// A YAML string (JSON strings are valid YAML and escape everything that needs it).
fn yaml_string(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

fn yaml_path(path: &Path) -> String {
    yaml_string(&path.to_string_lossy())
}

fn node_line(service: &DemoService) -> String {
    let ports = match service.role {
        ServiceRole::Master => format!(", ports: \"{}/{MASTER_PEER_PORT}\"", service.port),
        ServiceRole::Worker => String::new(),
    };
    format!(
        "      - {{ host: {}, port: {}, name: {}{ports}, deploy_dir: {} }}",
        service.host,
        service.port,
        service.name,
        yaml_path(&service.deploy_dir)
    )
}

/// The topology of the demo cluster (imported as `demo`), with the controller's TLS directory.
pub fn topology(layout: &DemoLayout, controller_tls_dir: &Path) -> String {
    let nodes = |role| {
        layout
            .services_of(role)
            .map(node_line)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let agent_port = layout
        .hosts
        .first()
        .map(|host| host.agent_port)
        .unwrap_or_default();
    TOPOLOGY_TEMPLATE
        .replace("@VERSION@", ORIGINAL_VERSION)
        .replace("@AGENT_PORT@", &agent_port.to_string())
        .replace("@TLS_DIR@", &yaml_path(controller_tls_dir))
        .replace("@MASTER_NODES@", &nodes(ServiceRole::Master))
        .replace("@WORKER_NODES@", &nodes(ServiceRole::Worker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::layout::{DEFAULT_AGENT_PORT, DEFAULT_HOSTS_PREFIX};
    use crate::topology::Topology;

    #[test]
    fn topology_parses_with_every_hook() {
        let layout = DemoLayout::new(
            Path::new("/tmp/demo dir"),
            7,
            DEFAULT_AGENT_PORT,
            DEFAULT_HOSTS_PREFIX,
        )
        .unwrap();
        let text = topology(&layout, Path::new("/home/u/.patchctl/tls"));
        assert!(!text.contains('@'), "every marker filled:\n{text}");
        let parsed = Topology::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        parsed.check_name("demo", &text).unwrap();
        assert_eq!(parsed.role_order(), ["demo-master", "demo-worker"]);
        let masters = parsed.role("demo-master").unwrap();
        assert_eq!(masters.nodes.len(), 3);
        assert_eq!(masters.nodes[0].ports, "8261/8291");
        assert!(masters.hooks.leader.is_some() && masters.hooks.health.is_some());
        let workers = parsed.role("demo-worker").unwrap();
        assert_eq!(workers.nodes.len(), 4);
        assert_eq!(workers.nodes[0].name, "worker-1");
        assert_eq!(
            workers.nodes[0].deploy_dir,
            "/tmp/demo dir/hosts/host-4/deploy/demo-worker-8262"
        );
        assert_eq!(workers.nodes[0].agent_port, 7480);
        let hooks: Vec<_> = workers.hooks.iter().map(|(key, _)| key).collect();
        assert_eq!(
            hooks,
            [
                "offline",
                "wait_offline",
                "online",
                "wait_online",
                "health",
                "leader"
            ][..5]
        );
        assert_eq!(
            workers.hooks.offline.as_ref().unwrap().leader_roles(),
            ["demo-master"]
        );
        assert_eq!(
            parsed.agent.tls_dir.as_deref(),
            Some(Path::new("/home/u/.patchctl/tls"))
        );
    }

    #[test]
    fn agent_config_names_services_and_masters() {
        let layout =
            DemoLayout::new(Path::new("/d"), 6, DEFAULT_AGENT_PORT, DEFAULT_HOSTS_PREFIX).unwrap();
        let worker_host = &layout.hosts[4];
        let text = agent_config(&layout, worker_host, false).unwrap();
        let value: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(value["listen"].as_str(), Some("127.0.1.5:7480"));
        assert_eq!(
            value["deploy_roots"][0].as_str(),
            Some("/d/hosts/host-5/deploy")
        );
        let service = &value["service"][0];
        assert_eq!(service["name"].as_str(), Some("demo-worker"));
        assert_eq!(service["backend"].as_str(), Some("process"));
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap()
            .name;
        assert_eq!(
            service["user"].as_str(),
            Some(me.as_str()),
            "demo services run as whoever runs the demo, written out"
        );
        assert_eq!(
            service["health"]["http"].as_str(),
            Some("http://127.0.1.5:8262/health")
        );
        let argv: Vec<&str> = service["command"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(argv[0], "{deploy_dir}/bin/demo-worker/demo-worker");
        assert_eq!(argv.iter().filter(|a| **a == "--master").count(), 3);
        assert!(argv.contains(&"worker-2"));

        let master_text = agent_config(&layout, &layout.hosts[0], false).unwrap();
        assert!(master_text.contains("master-2=http://127.0.1.2:8261"));
        assert!(!master_text.contains("master-1=http"));
    }

    #[test]
    fn with_containers_the_workers_are_docker_services_and_the_masters_stay_processes() {
        let layout =
            DemoLayout::new(Path::new("/d"), 4, DEFAULT_AGENT_PORT, DEFAULT_HOSTS_PREFIX).unwrap();
        let worker_host = &layout.hosts[1];
        let value: toml::Table =
            toml::from_str(&agent_config(&layout, worker_host, true).unwrap()).unwrap();
        let service = value["service"][0].as_table().unwrap();
        assert_eq!(service["backend"].as_str(), Some("docker"));
        let container = container_name(&layout.dir, worker_host, &worker_host.services[0]);
        assert_eq!(service["container"].as_str(), Some(container.as_str()));
        assert!(container.ends_with("-2-demo-worker"), "{container}");
        assert_eq!(service["env_add"][0].as_str(), Some(ENV_ADD));
        assert_eq!(
            service["health"]["http"].as_str(),
            Some("http://127.0.1.2:8262/health")
        );
        for key in ["deploy_dir", "command", "user", "restart_on_crash"] {
            assert!(!service.contains_key(key), "{key} does not apply to docker");
        }
        let master: toml::Table =
            toml::from_str(&agent_config(&layout, &layout.hosts[0], true).unwrap()).unwrap();
        assert_eq!(master["service"][0]["backend"].as_str(), Some("process"));
        let other_demo = container_name(Path::new("/e"), worker_host, &worker_host.services[0]);
        assert_ne!(
            container, other_demo,
            "two demo directories never share a container name"
        );
    }
}
