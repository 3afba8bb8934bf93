//! DEMO ONLY: which host runs what in the demo cluster, on which addresses, and where each file lives. Pure.

use super::DemoError;
use std::path::{Path, PathBuf};

/// Largest `--nodes` (hosts are `127.0.1.1` … `127.0.1.<n>`).
pub const MAX_NODES: usize = 64;
/// Default agent port on every demo host.
pub const DEFAULT_AGENT_PORT: u16 = 7480;
/// Service port of a demo master.
pub const MASTER_PORT: u16 = 8261;
/// Second port of a master (shown by `display` as `8261/8291`, as in DM; nothing listens on it).
pub const MASTER_PEER_PORT: u16 = 8291;
/// Service port of a demo worker.
pub const WORKER_PORT: u16 = 8262;
/// Version label stamped into the "original" binaries the demo deploys.
pub const ORIGINAL_VERSION: &str = "v1.0.0";
/// Default first three octets of the demo hosts' addresses (host k is `127.0.1.k`).
pub const DEFAULT_HOSTS_PREFIX: &str = "127.0.1";
/// Name the topology is imported under.
pub const CLUSTER_NAME: &str = "demo";

/// The two roles of the demo cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceRole {
    Master,
    Worker,
}

impl ServiceRole {
    /// Role, component and agent service name (all the same in the demo).
    pub fn component(self) -> &'static str {
        match self {
            ServiceRole::Master => "demo-master",
            ServiceRole::Worker => "demo-worker",
        }
    }

    /// Port the service listens on.
    pub fn port(self) -> u16 {
        match self {
            ServiceRole::Master => MASTER_PORT,
            ServiceRole::Worker => WORKER_PORT,
        }
    }
}

/// One demo service (one topology node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoService {
    pub role: ServiceRole,
    /// Node name in the topology and member name in the master (`master-1`, `worker-2`).
    pub name: String,
    pub host: String,
    pub port: u16,
    /// `<deploy root>/<component>-<port>`.
    pub deploy_dir: PathBuf,
}

impl DemoService {
    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Base URL of the service's HTTP API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The deployed main binary (`<deploy_dir>/bin/<component>/<component>`, as tiup lays it out).
    pub fn binary(&self) -> PathBuf {
        let component = self.role.component();
        self.deploy_dir.join("bin").join(component).join(component)
    }
}

/// One demo host: an agent on `127.0.1.<index>` and the services it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoHost {
    /// 1-based.
    pub index: usize,
    pub ip: String,
    pub agent_port: u16,
    /// `hosts/host-<k>`.
    pub dir: PathBuf,
    pub services: Vec<DemoService>,
}

impl DemoHost {
    /// `ip:agent_port`, what the agent listens on and the controller dials.
    pub fn agent_addr(&self) -> String {
        format!("{}:{}", self.ip, self.agent_port)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("patchd.toml")
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn deploy_root(&self) -> PathBuf {
        self.dir.join("deploy")
    }

    /// Certificate name of the agent (file stem in the agent's TLS directory).
    pub fn cert_name(&self) -> &'static str {
        "agent"
    }
}

/// The whole demo: hosts, services and file locations, computed from the directory and the node count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoLayout {
    /// Absolute demo directory.
    pub dir: PathBuf,
    pub hosts: Vec<DemoHost>,
}

/// Masters for a cluster of `nodes` hosts: one, or three from six hosts on (a leader and two followers).
pub fn master_count(nodes: usize) -> usize {
    if nodes >= 6 { 3 } else { 1 }
}

impl DemoLayout {
    /// Lays out `nodes` hosts `<hosts_prefix>.1`… under `dir` (which must be absolute): masters on the first
    /// hosts, workers on the rest.
    pub fn new(
        dir: &Path,
        nodes: usize,
        agent_port: u16,
        hosts_prefix: &str,
    ) -> Result<DemoLayout, DemoError> {
        if !(2..=MAX_NODES).contains(&nodes) {
            return Err(DemoError::NodeCount(nodes));
        }
        check_hosts_prefix(hosts_prefix)?;
        let masters = master_count(nodes);
        let hosts = (1..=nodes)
            .map(|index| {
                let ip = format!("{hosts_prefix}.{index}");
                let host_dir = dir.join("hosts").join(format!("host-{index}"));
                let (role, name) = if index <= masters {
                    (ServiceRole::Master, format!("master-{index}"))
                } else {
                    (ServiceRole::Worker, format!("worker-{}", index - masters))
                };
                let deploy_dir =
                    host_dir
                        .join("deploy")
                        .join(format!("{}-{}", role.component(), role.port()));
                let service = DemoService {
                    role,
                    name,
                    host: ip.clone(),
                    port: role.port(),
                    deploy_dir,
                };
                DemoHost {
                    index,
                    ip,
                    agent_port,
                    dir: host_dir,
                    services: vec![service],
                }
            })
            .collect();
        Ok(DemoLayout {
            dir: dir.to_path_buf(),
            hosts,
        })
    }

    /// Every service, host by host.
    pub fn services(&self) -> impl Iterator<Item = &DemoService> {
        self.hosts.iter().flat_map(|host| host.services.iter())
    }

    /// The services of one role.
    pub fn services_of(&self, role: ServiceRole) -> impl Iterator<Item = &DemoService> {
        self.services().filter(move |service| service.role == role)
    }

    /// `demo.json`: what `demo up` started.
    pub fn record_path(&self) -> PathBuf {
        self.dir.join("demo.json")
    }

    pub fn topology_path(&self) -> PathBuf {
        self.dir.join("topology.yaml")
    }

    pub fn packages_dir(&self) -> PathBuf {
        self.dir.join("packages")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Log of agent `host`.
    pub fn agent_log(&self, host: &DemoHost) -> PathBuf {
        self.logs_dir().join(format!("agent-{}.log", host.index))
    }

    /// The original package of a component: `packages/<component>-v1.0.0-linux-<arch>.tar.gz`.
    pub fn original_package(&self, role: ServiceRole) -> PathBuf {
        self.packages_dir().join(format!(
            "{}-{ORIGINAL_VERSION}-{}-{}.tar.gz",
            role.component(),
            std::env::consts::OS,
            std::env::consts::ARCH
        ))
    }

    /// Fake tasks the masters hand out: one fewer than the workers, so one worker is `Free` (as in DM).
    pub fn task_count(&self) -> usize {
        self.services_of(ServiceRole::Worker)
            .count()
            .saturating_sub(1)
            .max(1)
    }
}

/// Accepts `127.<a>.<b>`: the demo only ever uses loopback addresses.
pub fn check_hosts_prefix(prefix: &str) -> Result<(), DemoError> {
    let octets: Vec<&str> = prefix.split('.').collect();
    let valid = octets.len() == 3
        && octets[0] == "127"
        && octets[1..].iter().all(|o| o.parse::<u8>().is_ok());
    if valid {
        Ok(())
    } else {
        Err(DemoError::HostsPrefix(prefix.to_string()))
    }
}

/// Where `demo.json` lives for a demo directory (before the layout is known).
pub fn record_path(dir: &Path) -> PathBuf {
    dir.join("demo.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masters_first_then_workers() {
        let layout =
            DemoLayout::new(Path::new("/d"), 4, DEFAULT_AGENT_PORT, DEFAULT_HOSTS_PREFIX).unwrap();
        let names: Vec<_> = layout
            .services()
            .map(|s| (s.name.as_str(), s.host.as_str(), s.port))
            .collect();
        assert_eq!(
            names,
            [
                ("master-1", "127.0.1.1", 8261),
                ("worker-1", "127.0.1.2", 8262),
                ("worker-2", "127.0.1.3", 8262),
                ("worker-3", "127.0.1.4", 8262)
            ]
        );
        assert_eq!(layout.task_count(), 2);
        let worker = layout.services_of(ServiceRole::Worker).next().unwrap();
        assert_eq!(
            worker.binary(),
            Path::new("/d/hosts/host-2/deploy/demo-worker-8262/bin/demo-worker/demo-worker")
        );
        assert_eq!(layout.hosts[1].agent_addr(), "127.0.1.2:7480");

        let big = DemoLayout::new(Path::new("/d"), 10, DEFAULT_AGENT_PORT, "127.0.9").unwrap();
        assert_eq!(big.services_of(ServiceRole::Master).count(), 3);
        assert_eq!(big.services_of(ServiceRole::Worker).count(), 7);
        assert_eq!(big.hosts[9].ip, "127.0.9.10");
        assert!(
            DemoLayout::new(Path::new("/d"), 1, DEFAULT_AGENT_PORT, DEFAULT_HOSTS_PREFIX).is_err()
        );
        assert!(
            DemoLayout::new(
                Path::new("/d"),
                MAX_NODES + 1,
                DEFAULT_AGENT_PORT,
                DEFAULT_HOSTS_PREFIX
            )
            .is_err()
        );
        for bad in ["10.0.0", "127.0", "127.0.1.1", "127.0.300"] {
            assert!(
                DemoLayout::new(Path::new("/d"), 4, DEFAULT_AGENT_PORT, bad).is_err(),
                "{bad}"
            );
        }
    }
}
