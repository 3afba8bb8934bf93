//! One agent managing one container service (backend `docker`), as the container tests need it: images of
//! stamped demo-workers built locally, a container started the way the OMS procedure runs one (three binds in
//! temp dirs, host network, `--privileged`, pids limit, an nproc ulimit, a restart policy, labels), image
//! packages made from `docker save` archives, and the controller's cluster of that one node.

use crate::apply_support::{AgentRpc, free_port, http_get, stamp_worker};
use crate::docker::DockerTest;
use crate::{AgentConfig, AgentProcess, Pki, patchctl_ok, toml_string};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, ResourcesUlimits, RestartPolicy,
    RestartPolicyNameEnum,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The service name in the agent config and the role in the topology.
pub const SERVICE: &str = "demo-worker";
/// The variable the agent adds to the new container (`env_add`).
pub const ENV_ADD: &str = "IS_UPGRADE=true";

/// How the container service is declared.
#[derive(Debug, Clone, Copy, Default)]
pub struct RigOptions {
    /// `use_image_defaults = true`: the new container runs the new image's entrypoint.
    pub use_image_defaults: bool,
}

/// A container service, its agent and a one-node cluster over it. Drop order: agent, then the engine objects.
pub struct ContainerRig {
    pub agent: AgentProcess,
    pub pki: Pki,
    pub config_path: PathBuf,
    pub state: PathBuf,
    /// The container's name.
    pub container: String,
    /// The worker's port (host network).
    pub port: u16,
    /// The container ID the test started.
    pub original_id: String,
    /// The image it runs (v1.0.0).
    pub original_image: String,
    /// Name of the registered cluster.
    pub cluster: String,
    pub docker: DockerTest,
    pub dir: tempfile::TempDir,
}

impl ContainerRig {
    /// Builds image v1.0.0, starts the container, starts the agent and imports the cluster.
    pub fn start(test: &str, options: RigOptions) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let docker = DockerTest::connect(test);
        let port = free_port();
        let container = docker.name("worker");
        let original_image = worker_image(&docker, dir.path(), port, "v1.0.0", "ok");
        let mounts = dir.path().join("oms");
        for sub in ["logs", "store"] {
            std::fs::create_dir_all(mounts.join(sub))
                .unwrap_or_else(|e| panic!("cannot create the mount dirs: {e}"));
        }
        std::fs::write(mounts.join("config.yaml"), "cm_location: \"2\"\n")
            .unwrap_or_else(|e| panic!("cannot write the mounted config: {e}"));
        let bind =
            |host: &str, inside: &str| format!("{}:{inside}", mounts.join(host).to_string_lossy());
        let body = ContainerCreateBody {
            image: Some(original_image.clone()),
            env: Some(vec![
                "OMS_HOST_IP=127.0.0.1".into(),
                format!("WORKER_PORT={port}"),
            ]),
            labels: Some(HashMap::from([(
                "patchd-test".to_string(),
                test.to_string(),
            )])),
            host_config: Some(HostConfig {
                binds: Some(vec![
                    bind("config.yaml", "/home/admin/conf/config.yaml"),
                    bind("logs", "/home/admin/logs"),
                    bind("store", "/home/ds/store"),
                ]),
                network_mode: Some("host".into()),
                // `--privileged` itself cannot start in this sandbox (runc may not apply every capability): the flag is
                // still set explicitly so the comparison covers it.
                privileged: Some(false),
                pids_limit: Some(4096),
                ulimits: Some(vec![ResourcesUlimits {
                    name: Some("nproc".into()),
                    soft: Some(65535),
                    hard: Some(65535),
                }]),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let original_id = docker.create_container(&container, body, true);
        wait_serving(port, "v1.0.0");

        let pki = Pki::new(dir.path());
        let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
        let agent_dir = dir.path().join("agent-1");
        let service = format!(
            "[[service]]\nname = \"{SERVICE}\"\ncomponent = \"demo-worker\"\nbackend = \"docker\"\ncontainer = {}\n\
             env_add = [\"{ENV_ADD}\"]\nuse_image_defaults = {}\nstop_timeout = \"2s\"\n[service.health]\n\
             http = \"http://127.0.0.1:{port}/health\"\nmin_healthy = \"1s\"\ntimeout = \"15s\"\n",
            toml_string(&container),
            options.use_image_defaults
        );
        let config = AgentConfig::new(&agent_dir, &tls).extra(&service);
        let config_path = config.write();
        let state = config.state_path().to_path_buf();
        let agent = AgentProcess::start(&config_path);

        let cluster = "ct".to_string();
        let topology = dir.path().join("topology.yaml");
        std::fs::write(
            &topology,
            format!(
                "name: {cluster}\nversion: v1.0.0\nagent:\n  port: {}\n  tls_dir: {}\nroles:\n  {SERVICE}:\n    \
                 hooks:\n      health: {{ url: \"http://{{host}}:{{port}}/health\", interval: 100ms, timeout: 15s }}\n    \
                 nodes:\n      - {{ host: 127.0.0.1, port: {port}, name: worker-1, deploy_dir: /opt/container }}\n",
                agent.addr.port(),
                serde_json::Value::String(pki.tls_dir().to_string_lossy().into_owned())
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write the topology: {e}"));
        patchctl_ok(
            pki.home(),
            &["cluster", "import", &cluster, &topology.to_string_lossy()],
        );
        ContainerRig {
            agent,
            pki,
            config_path,
            state,
            container,
            port,
            original_id,
            original_image,
            cluster,
            docker,
            dir,
        }
    }

    /// An image package of demo-worker `version` (`mode` ok, crash, …) built from a `docker save` archive;
    /// returns the package and the image ID.
    pub fn image_package(&self, version: &str, mode: &str) -> (PathBuf, String) {
        let image = worker_image(&self.docker, self.dir.path(), self.port, version, mode);
        self.package_of(&image, version)
    }

    /// An image package of an image built from `files` with `entrypoint` (the tests' broken images).
    pub fn package_of(&self, image: &str, version: &str) -> (PathBuf, String) {
        let packages = self.dir.path().join("packages");
        std::fs::create_dir_all(&packages)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", packages.display()));
        let archive = packages.join(format!("{version}.tar"));
        self.docker.save_image(image, &archive);
        let out = packages.join(format!("demo-worker-{version}.tar.gz"));
        patchd_package::build_image(&archive, "demo-worker", version, &out)
            .unwrap_or_else(|e| panic!("cannot build the image package of {version}: {e}"));
        (out, image.to_string())
    }

    /// `docker inspect` of the container under the service's name.
    pub fn current(&self) -> ContainerInspectResponse {
        self.docker
            .inspect_container(&self.container)
            .unwrap_or_else(|| panic!("no container is named {}", self.container))
    }

    /// Every container of this test, by name.
    pub fn containers(&self) -> Vec<String> {
        self.docker
            .containers_named(&format!("{}-", self.docker.prefix()))
    }

    /// Exactly one container of the test exists, under the service's name, running: none is left renamed aside.
    pub fn assert_one_running(&self) -> ContainerInspectResponse {
        assert_eq!(
            self.containers(),
            vec![self.container.clone()],
            "one container, under its name"
        );
        let current = self.current();
        let state = current.state.clone().unwrap_or_default();
        assert_eq!(state.running, Some(true), "running: {state:?}");
        current
    }

    /// A blocking RPC client of the agent.
    pub fn rpc(&self) -> AgentRpc {
        AgentRpc::connect(&self.pki, self.agent.addr)
    }

    /// `patchctl` in this rig's controller home.
    pub fn patchctl(&self, args: &[&str]) -> std::process::Output {
        crate::patchctl(self.pki.home(), args)
    }

    /// What `GET /version` of the worker reports as its version.
    pub fn served_version(&self) -> Option<String> {
        served_version(self.port)
    }

    /// Waits until the worker serves `version`.
    pub fn wait_serving(&self, version: &str) {
        wait_serving(self.port, version);
    }

    /// The agent's journal of the service.
    pub fn journal_phase(&self) -> String {
        crate::apply_support::journal_phase(&self.state, SERVICE)
    }

    /// Where the rig keeps its files.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Image `<prefix>-worker:<version>`: a demo-worker stamped `version`/`mode` serving on `port`.
pub fn worker_image(
    docker: &DockerTest,
    dir: &Path,
    port: u16,
    version: &str,
    mode: &str,
) -> String {
    let binary = dir.join("binaries").join(version).join("demo-worker");
    stamp_worker(&binary, version, mode, 0);
    let listen = format!("127.0.0.1:{port}");
    docker.build_image(
        &format!("{}:{version}", docker.name("worker")),
        &binary,
        &["/demo-worker", "serve", "--listen", &listen],
    )
}

/// The version a worker on `port` serves, if it answers.
pub fn served_version(port: u16) -> Option<String> {
    let (status, body) = http_get(&format!("127.0.0.1:{port}"), "/version")?;
    if status != 200 {
        return None;
    }
    let info: serde_json::Value = serde_json::from_str(&body).ok()?;
    info["version"].as_str().map(str::to_string)
}

/// Waits (60 s at most) until the worker on `port` serves `version`.
pub fn wait_serving(port: u16, version: &str) {
    crate::wait_for(
        Duration::from_secs(60),
        &format!("the worker on port {port} serving {version}"),
        || served_version(port).as_deref() == Some(version),
    );
}

/// What must be identical between the old and the new container: Mounts, Env (the new one plus `env_add`),
/// privileged, ulimits, pids limit, network mode, restart policy, labels, user, working dir.
pub fn carried_config(inspected: &ContainerInspectResponse) -> serde_json::Value {
    let host = inspected.host_config.clone().unwrap_or_default();
    let config = inspected.config.clone().unwrap_or_default();
    let mut mounts: Vec<serde_json::Value> = inspected
        .mounts
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|m| serde_json::to_value(m).unwrap_or_default())
        .collect();
    mounts.sort_by_key(|m| m.to_string());
    serde_json::json!({
        "Mounts": mounts,
        "Binds": host.binds,
        "Privileged": host.privileged,
        "Ulimits": serde_json::to_value(&host.ulimits).unwrap_or_default(),
        "PidsLimit": host.pids_limit,
        "NetworkMode": host.network_mode,
        "RestartPolicy": serde_json::to_value(&host.restart_policy).unwrap_or_default(),
        "Labels": serde_json::to_value(&config.labels).unwrap_or_default(),
        "User": config.user,
        "WorkingDir": config.working_dir,
    })
}

/// The container's environment.
pub fn env_of(inspected: &ContainerInspectResponse) -> Vec<String> {
    inspected
        .config
        .clone()
        .unwrap_or_default()
        .env
        .unwrap_or_default()
}
