//! The OMS upgrade rig (issue 14): a real MariaDB holding `rm`, `cm` and `cm_hb` (user `oms` with a password the
//! agents read from a `--defaults-extra-file` and `patchctl` from the environment), the `demo-oms` console, and three
//! OMS nodes: each a real `patchd` on `127.0.93.<first + i>` (mTLS) managing a `demo-oms` container named like its node
//! (host network, serving on the node's address) whose deploy dir (config.yaml with the old keys, logs, store, run)
//! is mounted into it. Images `v4.3.0`/`v4.3.1` are built locally from the `demo-oms` binary, its libraries, the
//! host's `/bin/sh` and a `/root/docker_upgrade.sh` that only appends a line to the mounted logs directory. The
//! cluster is imported under [`CLUSTER`] with the databases of the example topology; the example runbook is copied
//! with only its `master` param pointing at this rig's console. Drop removes only what the rig made: agents,
//! console, MariaDB, then (through [`DockerTest`]) the containers and images named with its prefix.

use crate::docker::DockerTest;
use crate::mariadb::MariaDb;
use crate::{AgentConfig, AgentProcess, Pki, bin, patchctl_ok, toml_string, wait_for};
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, HostConfig};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The role, the agents' service and the package component.
pub const ROLE: &str = "oms";
/// The registered cluster.
pub const CLUSTER: &str = "oms";
/// The version the nodes run before the upgrade.
pub const OLD_VERSION: &str = "v4.3.0";
/// The version the runbook installs.
pub const NEW_VERSION: &str = "v4.3.1";
/// The environment variable the topology names for the database password.
pub const PASSWORD_ENV: &str = "OMS_DB_PASSWORD";
/// The databases the runbook dumps, in the order of its steps.
pub const DATABASES: [&str; 3] = ["rm", "cm", "cm_hb"];
/// Where `docker_upgrade.sh` appends its line, relative to a node's deploy dir (mounted at /home/admin/logs).
pub const UPGRADE_LOG: &str = "logs/docker_upgrade.log";
/// The sample V4.3.0 config.yaml of the OMS upgrade guide (seed 004): what every node starts with.
pub const CONFIG_430: &str = include_str!("../../runbook/tests/golden/oms_config_430.yaml");
/// The guide's V4.3.1 config.yaml after the key migration.
pub const CONFIG_431: &str = include_str!("../../runbook/tests/golden/oms_config_431.yaml");
/// The example runbook, as shipped.
pub const EXAMPLE_RUNBOOK: &str = include_str!("../../examples/oms/runbook.yaml");
/// The `master` param of the example runbook, replaced by the rig's console.
pub const EXAMPLE_MASTER: &str = "http://127.0.0.1:8261";
/// `docker_upgrade.sh` of the images: one line per run in the mounted logs directory.
pub const DOCKER_UPGRADE_SH: &str =
    "echo \"docker_upgrade.sh ran on $OMS_HOST_IP\" >> /home/admin/logs/docker_upgrade.log\n";

/// One OMS node: its agent, container and deploy dir.
pub struct OmsNode {
    /// Node and container name (`<prefix>-oms-<n>`).
    pub name: String,
    /// `127.0.93.<first + i>`: the agent's and the service's address.
    pub host: String,
    /// The demo-oms port.
    pub port: u16,
    /// Mounted into the container: config.yaml, logs/, store/, run/.
    pub deploy_dir: PathBuf,
    pub agent: AgentProcess,
    /// The container ID before any upgrade.
    pub original_id: String,
}

impl OmsNode {
    /// The node's config.yaml.
    pub fn config(&self) -> PathBuf {
        self.deploy_dir.join("config.yaml")
    }

    /// Lines `docker_upgrade.sh` wrote on this node.
    pub fn upgrade_runs(&self) -> usize {
        std::fs::read_to_string(self.deploy_dir.join(UPGRADE_LOG))
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    /// `GET /version` of the node's demo-oms, when it answers.
    pub fn served(&self) -> Option<serde_json::Value> {
        let (status, body) =
            crate::apply_support::http_get(&format!("{}:{}", self.host, self.port), "/version")?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// Waits until the node serves `version`.
    pub fn wait_serving(&self, version: &str) {
        wait_for(
            Duration::from_secs(60),
            &format!("{} serving {version}", self.name),
            || {
                self.served()
                    .is_some_and(|info| info["version"].as_str() == Some(version))
            },
        );
    }
}

/// The console (`demo-oms master`), killed on drop.
pub struct OmsMaster {
    child: Child,
    pub addr: SocketAddr,
}

impl OmsMaster {
    /// Starts `demo-oms master` on `host`, port 0, and waits for its ready line.
    pub fn start(host: &str) -> Self {
        let mut child = Command::new(bin("demo-oms"))
            .args(["master", "--listen", &format!("{host}:0")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start demo-oms master: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("demo-oms master listening on ") {
                        break addr.trim().parse().expect("ready line address");
                    }
                }
                _ => {
                    let _ = child.kill();
                    panic!("demo-oms master exited before its ready line");
                }
            }
        };
        // Keep draining so the console never blocks on a full pipe.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        OmsMaster { child, addr }
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GET /api/stats`: calls to `ha.config` and its value now.
    pub fn stats(&self) -> serde_json::Value {
        let (status, body) = crate::apply_support::http_get(&self.addr.to_string(), "/api/stats")
            .expect("the console answers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("stats JSON")
    }

    /// The value of `ha.config` now.
    pub fn ha_config(&self) -> String {
        self.stats()["value"]
            .as_str()
            .expect("value is a string")
            .to_string()
    }
}

impl Drop for OmsMaster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole rig. Fields drop in order: agents, console, database, then containers and images, then files.
pub struct OmsRig {
    pub nodes: Vec<OmsNode>,
    pub master: OmsMaster,
    pub db: MariaDb,
    pub pki: Pki,
    /// The password of database user `oms` (given to `patchctl` as [`PASSWORD_ENV`]).
    pub db_password: String,
    /// The `--defaults-extra-file` of the agents' database actions.
    pub db_defaults: PathBuf,
    /// The image the nodes start with.
    pub old_image: String,
    pub docker: DockerTest,
    pub dir: tempfile::TempDir,
}

impl OmsRig {
    /// Starts MariaDB and the console, builds image v4.3.0, runs the three containers, starts the agents and
    /// imports the cluster. `test` names the test (container and image names start with its prefix); the nodes
    /// live on `127.0.93.<first_host>` to `<first_host + 2>` and the console on `<first_host + 3>` (tests running at
    /// once use distinct ranges, so a port one picked is never taken by another).
    pub fn start(test: &str, first_host: u8) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let docker = DockerTest::connect(test);
        let db = MariaDb::start(&dir.path().join("mariadb"));
        let db_password = format!("oms-{}", std::process::id());
        seed_databases(&db, &db_password);
        let db_defaults = write_db_defaults(dir.path(), &db, &db_password);
        let master = OmsMaster::start(&format!("127.0.93.{}", first_host + 3));
        let old_image = oms_image(&docker, dir.path(), OLD_VERSION, None);
        let pki = Pki::new(dir.path());

        let mut nodes = Vec::new();
        for index in 1..=3u8 {
            let name = docker.name(&format!("oms-{index}"));
            let host = format!("127.0.93.{}", first_host + index - 1);
            let port = free_port_on(&host);
            let deploy_dir = dir.path().join(format!("oms-{index}")).join("data");
            for sub in ["logs", "store", "run"] {
                std::fs::create_dir_all(deploy_dir.join(sub))
                    .unwrap_or_else(|e| panic!("cannot create the mount dirs: {e}"));
            }
            std::fs::write(deploy_dir.join("config.yaml"), CONFIG_430)
                .unwrap_or_else(|e| panic!("cannot write config.yaml: {e}"));
            let original_id = docker.create_container(
                &name,
                container_body(&old_image, &host, port, &deploy_dir, test),
                true,
            );
            let tls = pki.issue_agent(&format!("agent-{index}"), &[&host]);
            let agent_dir = dir.path().join(format!("oms-{index}")).join("agent");
            let config = AgentConfig::new(&agent_dir, &tls)
                .listen(&format!("{host}:0"))
                .extra(&agent_toml(&name, &host, port, &deploy_dir, &db_defaults));
            let agent = AgentProcess::start(&config.write());
            let node = OmsNode {
                name,
                host,
                port,
                deploy_dir,
                agent,
                original_id,
            };
            node.wait_serving(OLD_VERSION);
            nodes.push(node);
        }
        let rig = OmsRig {
            nodes,
            master,
            db,
            pki,
            db_password,
            db_defaults,
            old_image,
            docker,
            dir,
        };
        let topology = rig.path().join("topology.yaml");
        std::fs::write(&topology, rig.topology())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", topology.display()));
        patchctl_ok(
            rig.pki.home(),
            &["cluster", "import", CLUSTER, &topology.to_string_lossy()],
        );
        rig
    }

    /// The topology: `examples/oms/topology.yaml` with this rig's addresses, ports, deploy dirs and database port.
    pub fn topology(&self) -> String {
        let mut text = format!(
            "name: {CLUSTER}\nversion: {OLD_VERSION}\nagent:\n  port: 7480\n  tls_dir: {}\nroles:\n  {ROLE}:\n    \
             hooks:\n      health: {{ url: \"http://{{host}}:{{port}}/health\", interval: 100ms, timeout: 30s }}\n    \
             nodes:\n",
            json_string(&self.pki.tls_dir().to_string_lossy())
        );
        for node in &self.nodes {
            text.push_str(&format!(
                "      - {{ host: {}, port: {}, name: {}, agent_port: {}, deploy_dir: {} }}\n",
                node.host,
                node.port,
                node.name,
                node.agent.addr.port(),
                json_string(&node.deploy_dir.to_string_lossy())
            ));
        }
        text.push_str("databases:\n");
        for db in DATABASES {
            text.push_str(&format!(
                "  {db}: {{ host: 127.0.0.1, port: {}, user: oms, password_env: {PASSWORD_ENV} }}\n",
                self.db.port
            ));
        }
        text
    }

    /// The example runbook with `master` pointing at this rig's console (the one param a test must change: the
    /// console listens on a port picked at start).
    pub fn example_runbook(&self) -> String {
        assert!(
            EXAMPLE_RUNBOOK.contains(EXAMPLE_MASTER),
            "examples/oms/runbook.yaml no longer names {EXAMPLE_MASTER}"
        );
        EXAMPLE_RUNBOOK.replace(EXAMPLE_MASTER, &self.master.url())
    }

    /// Writes a runbook into the rig's directory and returns its path.
    pub fn write_runbook(&self, file: &str, text: &str) -> PathBuf {
        let path = self.path().join(file);
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Builds image `v4.3.1` (`/health` failing on the node whose address is `unhealthy_on`) and its image
    /// package with `patchctl package build --image`; returns the package.
    pub fn new_package(&self, unhealthy_on: Option<&str>) -> PathBuf {
        let image = oms_image(&self.docker, self.path(), NEW_VERSION, unhealthy_on);
        let reference = self.image_reference(NEW_VERSION, unhealthy_on);
        let out = self.path().join("packages").join(format!(
            "oms-{NEW_VERSION}{}.tar.gz",
            if unhealthy_on.is_some() {
                "-broken"
            } else {
                ""
            }
        ));
        std::fs::create_dir_all(out.parent().expect("a parent"))
            .unwrap_or_else(|e| panic!("cannot create the packages dir: {e}"));
        patchctl_ok(
            self.pki.home(),
            &[
                "package",
                "build",
                "--image",
                &reference,
                "--component",
                ROLE,
                "--version",
                NEW_VERSION,
                "-o",
                &out.to_string_lossy(),
            ],
        );
        assert!(self.docker.inspect_image(&image).is_some());
        out
    }

    fn image_reference(&self, version: &str, unhealthy_on: Option<&str>) -> String {
        image_reference(&self.docker, version, unhealthy_on)
    }

    /// Runs `patchctl` with the database password in its environment (as an operator would).
    pub fn patchctl(&self, args: &[&str]) -> Output {
        Command::new(bin("patchctl"))
            .args(args)
            .env("PATCHCTL_HOME", self.pki.home())
            .env(PASSWORD_ENV, &self.db_password)
            .env_remove("PATCHCTL_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run patchctl {args:?}: {e}"))
    }

    /// `patchctl upgrade oms <runbook> [--package PKG] -y`; returns the output and the upgrade ID it announced
    /// (`Upgrade <ID> started ...` on stderr; `None` when it was refused before starting).
    pub fn upgrade(&self, runbook: &Path, package: Option<&Path>) -> (Output, Option<String>) {
        let runbook = runbook.to_string_lossy().into_owned();
        let package = package.map(|p| p.to_string_lossy().into_owned());
        let mut args = vec!["upgrade", CLUSTER, runbook.as_str(), "-y"];
        if let Some(package) = &package {
            args.extend(["--package", package.as_str()]);
        }
        let out = self.patchctl(&args);
        let id = upgrade_id(&out);
        (out, id)
    }

    /// `audit --rollout ID --format json` of an upgrade.
    pub fn audit(&self, id: &str) -> serde_json::Value {
        let out = self.patchctl(&["--format", "json", "audit", "--rollout", id]);
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice(&out.stdout).expect("audit JSON")
    }

    /// `docker inspect` of a node's container now.
    pub fn container(&self, node: &OmsNode) -> ContainerInspectResponse {
        self.docker
            .inspect_container(&node.name)
            .unwrap_or_else(|| panic!("no container is named {}", node.name))
    }

    /// A snapshot of what the upgrade may change: per node the container ID, image, running state, config bytes
    /// and `docker_upgrade.sh` runs; the tables' contents; the console's value.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            nodes: self
                .nodes
                .iter()
                .map(|node| {
                    let inspected = self.container(node);
                    NodeSnapshot {
                        container_id: inspected.id.clone().unwrap_or_default(),
                        image: inspected.image.clone().unwrap_or_default(),
                        running: inspected.state.and_then(|s| s.running).unwrap_or(false),
                        config: std::fs::read(node.config()).expect("config.yaml"),
                        upgrade_runs: node.upgrade_runs(),
                    }
                })
                .collect(),
            tables: self.tables(),
            ha_config: self.master.ha_config(),
        }
    }

    /// Every table of the three databases with its rows, in a stable order.
    pub fn tables(&self) -> Vec<(String, String)> {
        let mut tables = Vec::new();
        for db in DATABASES {
            for table in self.db.sql(Some(db), "SHOW TABLES").lines() {
                let rows = self
                    .db
                    .sql(Some(db), &format!("SELECT * FROM `{table}` ORDER BY 1"));
                tables.push((format!("{db}.{table}"), rows));
            }
        }
        tables
    }

    /// Where the rig keeps its files.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// What [`OmsRig::snapshot`] records of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub container_id: String,
    pub image: String,
    pub running: bool,
    pub config: Vec<u8>,
    pub upgrade_runs: usize,
}

/// What [`OmsRig::snapshot`] records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: Vec<NodeSnapshot>,
    pub tables: Vec<(String, String)>,
    pub ha_config: String,
}

/// The upgrade ID `patchctl upgrade` announced: `Upgrade <ID> started ...` on stderr.
pub fn upgrade_id(out: &Output) -> Option<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|line| {
            let (id, rest) = line.strip_prefix("Upgrade ")?.split_once(' ')?;
            rest.starts_with("started").then(|| id.to_string())
        })
}

/// Exit code, stdout and stderr of a command, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The databases as an OMS deployment has them: `rm` (resources), `cm` with `task` (every task in a state the
/// upgrade accepts), `cm_hb` with several heartbeat rows; user `oms` owns them.
pub fn seed_databases(db: &MariaDb, password: &str) {
    db.sql(
        None,
        &format!(
            "CREATE DATABASE rm; CREATE DATABASE cm; CREATE DATABASE cm_hb; \
             CREATE TABLE rm.resource (id INT PRIMARY KEY, name VARCHAR(64)); \
             INSERT INTO rm.resource VALUES (1, 'store-1'), (2, 'store-2'); \
             CREATE TABLE cm.task (name VARCHAR(64) PRIMARY KEY, status VARCHAR(32)); \
             INSERT INTO cm.task VALUES ('migrate-orders', 'REVERSE_INCR'), ('sync-users', 'FINISHED'); \
             CREATE TABLE cm_hb.heatbeat_sequence (id BIGINT NOT NULL AUTO_INCREMENT, gmt_created DATETIME NOT NULL, \
               gmt_modified DATETIME NOT NULL, PRIMARY KEY (id)); \
             INSERT INTO cm_hb.heatbeat_sequence (gmt_created, gmt_modified) VALUES \
               ('2026-01-01 00:00:01', '2026-01-01 00:00:01'), ('2026-01-01 00:00:02', '2026-01-01 00:00:02'), \
               ('2026-01-01 00:00:03', '2026-01-01 00:00:03'), ('2026-01-01 00:00:04', '2026-01-01 00:00:04'); \
             CREATE USER 'oms'@'127.0.0.1' IDENTIFIED BY '{password}'; \
             CREATE USER 'oms'@'localhost' IDENTIFIED BY '{password}'; \
             GRANT ALL PRIVILEGES ON rm.* TO 'oms'@'127.0.0.1', 'oms'@'localhost'; \
             GRANT ALL PRIVILEGES ON cm.* TO 'oms'@'127.0.0.1', 'oms'@'localhost'; \
             GRANT ALL PRIVILEGES ON cm_hb.* TO 'oms'@'127.0.0.1', 'oms'@'localhost'; \
             FLUSH PRIVILEGES;"
        ),
    );
}

/// Writes `<dir>/oms-db.cnf`, the `[client]` section (address, user `oms`, password) of the agents' actions.
pub fn write_db_defaults(dir: &Path, db: &MariaDb, password: &str) -> PathBuf {
    let path = dir.join("oms-db.cnf");
    std::fs::write(
        &path,
        format!(
            "[client]\nprotocol=tcp\nhost=127.0.0.1\nport={}\nuser=oms\npassword={password}\n",
            db.port
        ),
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// The agent's service (the container, probed on the node's address) and its `[upgrade]` declarations: roots =
/// the deploy dir; actions `mysqldump`, `mysql-load`, `dump-nothing` (a dump that comes out empty, for the 0-byte
/// test) on the host and `docker-upgrade` in the container.
fn agent_toml(
    container: &str,
    host: &str,
    port: u16,
    deploy_dir: &Path,
    db_defaults: &Path,
) -> String {
    let argv = |args: Vec<String>| {
        let quoted: Vec<String> = args.iter().map(|arg| toml_string(arg)).collect();
        format!("[{}]", quoted.join(", "))
    };
    format!(
        "[[service]]\nname = \"{ROLE}\"\ncomponent = \"{ROLE}\"\nbackend = \"docker\"\ncontainer = {}\n\
         use_image_defaults = true\nstop_timeout = \"2s\"\n[service.health]\nhttp = \"http://{host}:{port}/health\"\n\
         min_healthy = \"1s\"\ntimeout = \"20s\"\n\n\
         [upgrade]\nroots = [{}]\n\n\
         [[upgrade.action]]\nname = \"mysqldump\"\nargv = {}\nparams = [{{ name = \"db\", type = \"word\" }}]\n\n\
         [[upgrade.action]]\nname = \"dump-nothing\"\nargv = {}\nparams = [{{ name = \"db\", type = \"word\" }}]\n\n\
         [[upgrade.action]]\nname = \"mysql-load\"\nargv = {}\nparams = [{{ name = \"db\", type = \"word\" }}]\n\
         stdin = true\n\n\
         [[upgrade.action]]\nname = \"docker-upgrade\"\nargv = [\"sh\", \"/root/docker_upgrade.sh\"]\ncontainer = true\n",
        toml_string(container),
        toml_string(&deploy_dir.to_string_lossy()),
        argv(dump_argv(db_defaults)),
        argv(empty_dump_argv(db_defaults)),
        argv(load_argv(db_defaults)),
    )
}

fn defaults_arg(db_defaults: &Path) -> String {
    format!("--defaults-extra-file={}", db_defaults.to_string_lossy())
}

/// The `mysqldump` action: the database's schema and rows, with its `CREATE DATABASE`/`USE` so a load recreates it.
pub fn dump_argv(db_defaults: &Path) -> Vec<String> {
    let dump = program(&["mariadb-dump", "mysqldump"]);
    [
        &dump,
        &defaults_arg(db_defaults),
        "--triggers=false",
        "--databases",
        "{db}",
    ]
    .map(str::to_string)
    .to_vec()
}

/// The `dump-nothing` action: a query of no rows in the database, an empty output (`mariadb-dump` always writes a
/// header line, even told to dump no table definition and no row).
pub fn empty_dump_argv(db_defaults: &Path) -> Vec<String> {
    let client = program(&["mariadb", "mysql"]);
    [
        &client,
        &defaults_arg(db_defaults),
        "--batch",
        "--skip-column-names",
        "--execute=SELECT 1 FROM DUAL WHERE FALSE",
        "{db}",
    ]
    .map(str::to_string)
    .to_vec()
}

/// The `mysql-load` action: SQL on standard input into the database.
pub fn load_argv(db_defaults: &Path) -> Vec<String> {
    let client = program(&["mariadb", "mysql"]);
    [&client, &defaults_arg(db_defaults), "{db}"]
        .map(str::to_string)
        .to_vec()
}

/// The container as the OMS guide runs one: host network, config.yaml and the three data directories mounted,
/// `OMS_HOST_IP` set; the image's entrypoint serves on `DEMO_OMS_LISTEN`.
pub fn container_body(
    image: &str,
    host: &str,
    port: u16,
    deploy_dir: &Path,
    test: &str,
) -> ContainerCreateBody {
    let bind =
        |from: &str, inside: &str| format!("{}:{inside}", deploy_dir.join(from).to_string_lossy());
    ContainerCreateBody {
        image: Some(image.to_string()),
        env: Some(vec![
            format!("OMS_HOST_IP={host}"),
            format!("DEMO_OMS_LISTEN={host}:{port}"),
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
                bind("run", "/home/ds/run"),
            ]),
            network_mode: Some("host".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn image_reference(docker: &DockerTest, version: &str, unhealthy_on: Option<&str>) -> String {
    let suffix = if unhealthy_on.is_some() {
        "-broken"
    } else {
        ""
    };
    docker.name(&format!("demo-oms:{version}{suffix}"))
}

/// Image `<prefix>-demo-oms:<version>` from scratch: demo-oms (entrypoint `serve --oms-version <version>`), the
/// host's `/bin/sh` and `/root/docker_upgrade.sh`, with their libraries. Returns the image ID.
pub fn oms_image(
    docker: &DockerTest,
    dir: &Path,
    version: &str,
    unhealthy_on: Option<&str>,
) -> String {
    let script = dir.join("docker_upgrade.sh");
    std::fs::write(&script, DOCKER_UPGRADE_SH)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", script.display()));
    let binary = bin("demo-oms");
    let mut entrypoint = vec!["/demo-oms", "serve", "--oms-version", version];
    if let Some(host) = unhealthy_on {
        entrypoint.extend(["--unhealthy-on", host]);
    }
    docker.build_image_with(
        &image_reference(docker, version, unhealthy_on),
        &[
            (&binary, Some("/demo-oms")),
            (Path::new("/bin/sh"), Some("/bin/sh")),
            (&script, Some("/root/docker_upgrade.sh")),
        ],
        &entrypoint,
    )
}

/// A port free on `host` now (the container binds it right after).
pub fn free_port_on(host: &str) -> u16 {
    std::net::TcpListener::bind((host, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("cannot find a free port on {host}: {e}"))
}

/// The first of `names` found in the usual binary directories (MariaDB ships `mariadb-dump`, older ones `mysqldump`).
fn program(names: &[&str]) -> String {
    for name in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
            let path = Path::new(dir).join(name);
            if path.is_file() {
                return path.to_string_lossy().into_owned();
            }
        }
    }
    panic!("none of {names:?} is installed: scripts/mariadb.sh installs mariadb-client");
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}
