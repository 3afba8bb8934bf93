//! The agent as a real systemd service, installed the way an operator installs it: `systemd-nspawn` boots a
//! systemd, `packaging/install.sh` installs `patchd` inside (binary into /usr/bin, config, certificates issued by
//! `patchctl cert issue` outside, the hardened `patchd.service`, enabled and started), the agent manages
//! `demo-worker.service` with its `systemd` backend, and `patchctl` outside imports a one-node cluster, displays it
//! and patches it. Checks: the unit restarted onto the new binary (MainPID and start timestamp changed, the
//! process runs the deployed file, `/version` reports the new label), and `systemctl` inside agrees with
//! `patchctl display --format json` (running, same pid, version).
//!
//! The container shares the host's network, so the agent and the worker listen on a loopback address
//! (`127.0.82.1`) that `patchctl` on the host dials directly.
//!
//! The agent also runs a second demo-worker itself (`process` backend, `user = "nobody"`): it runs as nobody, and
//! it keeps its pid across `systemctl restart patchd` (the unit's `KillMode=process`), the new agent adopting it
//! (its `Status` reports the same pid running) instead of starting another.
//!
//! Needs root and `systemd-nspawn` (installed when missing). If the container cannot run, the test FAILS.

use patchd_e2e::apply_support::{AgentRpc, http_get};
use patchd_e2e::cluster_fixture::{free_port, stamp};
use patchd_e2e::nspawn::{Boot, Container, ensure_nspawn};
use patchd_e2e::{
    Pki, bin, patchctl, patchctl_ok, sha256_file, toml_string, wait_for, workspace_root,
};
use patchd_proto::v1::ServiceState;
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// The "host" the container plays (loopback, shared network).
const HOST: &str = "127.0.82.1";
const UNIT: &str = "demo-worker.service";
/// The service the agent runs itself (process backend).
const PROC_SERVICE: &str = "proc-worker";
const CLUSTER: &str = "nspawn";
const ORIGINAL: &str = "v1.0.0";
const HOTFIX: &str = "v1.0.1-hotfix";

/// Where things are seen inside the container.
const SRC_INSIDE: &str = "/mnt/patchd-src";
const BIN_INSIDE: &str = "/mnt/patchd-bin";
const INSTALL_INSIDE: &str = "/mnt/patchd-install";
const DEPLOY_ROOT: &str = "/opt/demo";

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `/version` of the worker, as JSON (None when it does not answer).
fn worker_version(port: u16) -> Option<Value> {
    let (status, body) = http_get(&format!("{HOST}:{port}"), "/version")?;
    (status == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

/// The one node of `patchctl --format json display`.
fn displayed_node(home: &Path) -> Value {
    let out = patchctl_ok(home, &["--format", "json", "display", CLUSTER]);
    let document: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("display JSON ({e}):\n{out}"));
    let nodes = document["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {document}"));
    assert_eq!(nodes.len(), 1, "{document}");
    nodes[0].clone()
}

/// Everything useful to read when something inside failed.
fn diagnostics(container: &Container) -> String {
    format!(
        "--- journalctl -u patchd\n{}\n--- journalctl -u {UNIT}\n{}\n--- systemctl --failed\n{}",
        container.journal("patchd.service", 40),
        container.journal(UNIT, 20),
        String::from_utf8_lossy(
            &container
                .exec(&["systemctl", "--failed", "--no-pager"])
                .stdout
        )
    )
}

#[test]
fn install_sh_agent_as_a_systemd_service_patches_a_unit_from_outside() {
    let started = Instant::now();
    ensure_nspawn();
    let patchd_bin = bin("patchd");
    let _ = bin("demo-worker");
    let tmp = tempfile::Builder::new()
        .prefix("patchd-install-")
        .tempdir_in("/tmp")
        .unwrap();
    let root = tmp.path().to_path_buf();

    // Controller side: CA, controller certificate, and the agent's certificate naming the host it is dialed by.
    let pki = Pki::new(&root);
    let home = pki.home().to_path_buf();
    let agent_tls = pki.issue_agent("agent-nspawn", &[HOST]);
    let agent_port = free_port(HOST);
    let worker_port = free_port(HOST);
    let deploy_dir = format!("{DEPLOY_ROOT}/demo-worker-{worker_port}");

    // The host as tiup left it: the original worker deployed under /opt/demo (bound from here, so the test can
    // read the deployed files), and its release package (the base of hotfixes).
    let opt_demo = root.join("opt-demo");
    let deployed_binary = opt_demo
        .join(format!("demo-worker-{worker_port}"))
        .join("bin/demo-worker/demo-worker");
    stamp("demo-worker", ORIGINAL, "ok", &deployed_binary);
    let release_tree = root.join("release/demo-worker");
    stamp(
        "demo-worker",
        ORIGINAL,
        "ok",
        &release_tree.join("demo-worker"),
    );
    let base = root.join(format!("demo-worker-{ORIGINAL}-linux-x86_64.tar.gz"));
    patchd_package::pack_dir(&release_tree, ORIGINAL, &base).unwrap();
    let original_sha = sha256_file(&deployed_binary);
    let proc_port = free_port(HOST);
    let proc_deploy_dir = format!("{DEPLOY_ROOT}/proc-worker-{proc_port}");
    stamp(
        "demo-worker",
        ORIGINAL,
        "ok",
        &opt_demo
            .join(format!("proc-worker-{proc_port}"))
            .join("bin/demo-worker/demo-worker"),
    );

    // What the operator copies to the host: the unit of the service, the agent's certificate and its config.
    let install = root.join("install");
    std::fs::create_dir_all(&install).unwrap();
    for (from, name) in [
        (&agent_tls.ca, "ca.crt"),
        (&agent_tls.cert, "agent.crt"),
        (&agent_tls.key, "agent.key"),
    ] {
        std::fs::copy(from, install.join(name)).unwrap();
    }
    std::fs::write(
        install.join(UNIT),
        format!(
            "[Unit]\nDescription=demo worker (patchd systemd install test)\n\n[Service]\nType=exec\n\
             ExecStart={deploy_dir}/bin/demo-worker/demo-worker serve --listen {HOST}:{worker_port} --name worker-1\n\
             Restart=on-failure\nRestartSec=200ms\n\n[Install]\nWantedBy=multi-user.target\n"
        ),
    )
    .unwrap();
    std::fs::write(
        install.join("patchd.toml"),
        format!(
            "listen = \"{HOST}:{agent_port}\"\nstate_dir = \"/var/lib/patchd\"\ndeploy_roots = [\"{DEPLOY_ROOT}\"]\n\n\
             [tls]\nca = \"/etc/patchd/tls/ca.crt\"\ncert = \"/etc/patchd/tls/agent.crt\"\nkey = \"/etc/patchd/tls/agent.key\"\n\n\
             [[service]]\nname = \"demo-worker\"\ncomponent = \"demo-worker\"\ndeploy_dir = {dir}\nbackend = \"systemd\"\n\
             unit = \"{UNIT}\"\nstop_timeout = \"10s\"\n\n[service.health]\nmin_healthy = \"1s\"\n\
             http = \"http://{HOST}:{worker_port}/health\"\ntimeout = \"20s\"\n\n\
             [[service]]\nname = \"{PROC_SERVICE}\"\ncomponent = \"demo-worker\"\ndeploy_dir = {proc_dir}\nbackend = \"process\"\n\
             command = [\"{{deploy_dir}}/bin/demo-worker/demo-worker\", \"serve\", \"--listen\", \"{HOST}:{proc_port}\", \"--name\", \"proc-1\"]\n\
             user = \"nobody\"\nstop_timeout = \"5s\"\n\n[service.health]\nmin_healthy = \"1s\"\n\
             http = \"http://{HOST}:{proc_port}/health\"\ntimeout = \"20s\"\n",
            dir = toml_string(&deploy_dir),
            proc_dir = toml_string(&proc_deploy_dir),
        ),
    )
    .unwrap();

    let bin_dir = patchd_bin.parent().unwrap().to_path_buf();
    let machine = format!("patchd-install-{}", std::process::id());
    let container = Container::boot(
        Boot::new(&machine, &root.join("nspawn-console.log"))
            .host_network()
            .writable_usr()
            .bind_ro(&workspace_root(), Path::new(SRC_INSIDE))
            .bind_ro(&bin_dir, Path::new(BIN_INSIDE))
            .bind_ro(&install, Path::new(INSTALL_INSIDE))
            .bind(&opt_demo, Path::new(DEPLOY_ROOT)),
    );
    eprintln!(
        "container {} booted after {:.1}s",
        container.machine(),
        started.elapsed().as_secs_f64()
    );

    // The service, as it ran before patchd came: a unit of its own, enabled and started.
    container.exec_ok(&[
        "install",
        "-m",
        "0644",
        &format!("{INSTALL_INSIDE}/{UNIT}"),
        &format!("/etc/systemd/system/{UNIT}"),
    ]);
    container.systemctl_ok(&["daemon-reload"]);
    container.systemctl_ok(&["enable", "--now", UNIT]);
    wait_for(
        Duration::from_secs(30),
        "the worker unit to serve v1.0.0",
        || worker_version(worker_port).is_some_and(|v| v["version"] == ORIGINAL),
    );

    // The operator's install.
    let installed = container.exec(&[
        &format!("{SRC_INSIDE}/packaging/install.sh"),
        "--binary",
        &format!("{BIN_INSIDE}/patchd"),
        "--ca",
        &format!("{INSTALL_INSIDE}/ca.crt"),
        "--cert",
        &format!("{INSTALL_INSIDE}/agent.crt"),
        "--key",
        &format!("{INSTALL_INSIDE}/agent.key"),
        "--config",
        &format!("{INSTALL_INSIDE}/patchd.toml"),
        "--deploy-root",
        DEPLOY_ROOT,
    ]);
    assert!(
        installed.status.success(),
        "install.sh failed: {}\n{}",
        text(&installed),
        diagnostics(&container)
    );
    eprintln!("{}", String::from_utf8_lossy(&installed.stdout));
    assert_eq!(
        container
            .systemctl_ok(&["is-enabled", "patchd.service"])
            .trim(),
        "enabled"
    );
    let key_mode = container.exec_ok(&["stat", "-c", "%a", "/etc/patchd/tls/agent.key"]);
    assert_eq!(key_mode.trim(), "600", "the agent key is private");

    // From outside: the agent answers over mutual TLS.
    let agent_addr = format!("{HOST}:{agent_port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = patchctl(&home, &["agent", "info", &agent_addr]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the installed agent does not answer: {}\n{}",
            text(&out),
            diagnostics(&container)
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // A one-node cluster, imported and displayed.
    let topology = root.join("topology.yaml");
    std::fs::write(
        &topology,
        format!(
            "name: {CLUSTER}\nversion: {ORIGINAL}\nagent:\n  port: {agent_port}\n  tls_dir: {tls}\nroles:\n  demo-worker:\n    hooks:\n\
             \x20     health: {{ url: \"http://{{host}}:{{port}}/health\", interval: 200ms, timeout: 15s }}\n    nodes:\n\
             \x20     - {{ host: {HOST}, port: {worker_port}, name: worker-1, deploy_dir: {dir} }}\n",
            tls = serde_json::Value::String(pki.tls_dir().to_string_lossy().into_owned()),
            dir = serde_json::Value::String(deploy_dir.clone()),
        ),
    )
    .unwrap();
    patchctl_ok(
        &home,
        &["cluster", "import", CLUSTER, topology.to_str().unwrap()],
    );
    let shown = patchctl_ok(&home, &["display", CLUSTER]);
    assert!(
        shown.contains(HOST) && shown.contains(&worker_port.to_string()),
        "display lists the node:\n{shown}"
    );
    let before = container.show(UNIT, &["MainPID", "ExecMainStartTimestamp", "ActiveState"]);
    assert_eq!(before["ActiveState"], "active", "{before:?}");
    let node = displayed_node(&home);
    assert_eq!(node["service"]["state"], "running", "{node}");
    assert_eq!(
        node["service"]["pid"].to_string(),
        before["MainPID"],
        "display's pid is the unit's MainPID: {node}"
    );
    assert_eq!(
        node["service"]["binary_sha256"],
        original_sha.as_str(),
        "{node}"
    );
    let original_run = worker_version(worker_port).unwrap();
    assert_eq!(
        original_run["pid"].to_string(),
        before["MainPID"],
        "the worker is the unit's main process"
    );

    // A hotfix, built and rolled out from outside.
    let hotfix_binary = root.join("hotfix/demo-worker");
    stamp("demo-worker", HOTFIX, "ok", &hotfix_binary);
    let hotfix = root.join(format!("demo-worker-{HOTFIX}.tar.gz"));
    patchctl_ok(
        &home,
        &[
            "package",
            "build",
            "--base",
            base.to_str().unwrap(),
            "--replace",
            &format!("demo-worker/demo-worker={}", hotfix_binary.display()),
            "--version",
            HOTFIX,
            "-o",
            hotfix.to_str().unwrap(),
        ],
    );
    let patched = patchctl(&home, &["patch", CLUSTER, hotfix.to_str().unwrap(), "-y"]);
    assert_eq!(
        patched.status.code(),
        Some(0),
        "patch failed: {}\n{}",
        text(&patched),
        diagnostics(&container)
    );

    // The unit restarted onto the new binary.
    let after = container.show(
        UNIT,
        &[
            "MainPID",
            "ExecMainStartTimestamp",
            "ActiveState",
            "SubState",
            "NRestarts",
        ],
    );
    assert_eq!(
        (after["ActiveState"].as_str(), after["SubState"].as_str()),
        ("active", "running"),
        "{after:?}"
    );
    assert_ne!(
        after["MainPID"], before["MainPID"],
        "the unit has a new main process"
    );
    assert_ne!(
        after["ExecMainStartTimestamp"], before["ExecMainStartTimestamp"],
        "the unit was started again"
    );
    assert_eq!(
        after["NRestarts"], "0",
        "started by the agent, not by Restart=on-failure: {after:?}"
    );
    assert_eq!(
        sha256_file(&deployed_binary),
        sha256_file(&hotfix_binary),
        "the new binary is deployed"
    );
    let exe = container.exec_ok(&["readlink", &format!("/proc/{}/exe", after["MainPID"])]);
    assert_eq!(
        exe.trim(),
        format!("{deploy_dir}/bin/demo-worker/demo-worker"),
        "the main process runs the deployed file"
    );
    let running = worker_version(worker_port).expect("the worker answers after the patch");
    assert_eq!(running["version"], HOTFIX, "{running}");
    assert_eq!(running["pid"].to_string(), after["MainPID"], "{running}");

    // systemctl inside agrees with patchctl display outside.
    let status = container.exec(&["systemctl", "status", UNIT, "--no-pager"]);
    let status_text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.status.success(),
        "systemctl status: {}",
        text(&status)
    );
    assert!(status_text.contains("active (running)"), "{status_text}");
    assert!(
        status_text.contains(&format!("Main PID: {}", after["MainPID"])),
        "{status_text}"
    );
    let node = displayed_node(&home);
    assert_eq!(node["service"]["state"], "running", "{node}");
    assert_eq!(
        node["service"]["pid"].to_string(),
        after["MainPID"],
        "display's pid is the unit's MainPID: {node}"
    );
    assert_eq!(node["version"], HOTFIX, "{node}");
    assert_eq!(node["service"]["version"], HOTFIX, "{node}");
    assert_eq!(node["patched"], true, "{node}");
    assert!(
        !matches!(
            node["status"].as_str(),
            Some("Unreachable" | "Down" | "Failed" | "Stopped")
        ),
        "display reports the node up: {node}"
    );

    eprintln!(
        "{UNIT}: MainPID {} -> {}, started {} -> {}\n{status_text}\n{}",
        before["MainPID"],
        after["MainPID"],
        before["ExecMainStartTimestamp"],
        after["ExecMainStartTimestamp"],
        patchctl_ok(&home, &["display", CLUSTER])
    );

    // The agent itself stayed up as a service the whole time.
    let agent = container.show("patchd.service", &["ActiveState", "NRestarts"]);
    assert_eq!(
        (agent["ActiveState"].as_str(), agent["NRestarts"].as_str()),
        ("active", "0"),
        "{agent:?}"
    );
    process_service_survives_an_agent_restart(&container, &pki, &agent_addr, proc_port);

    drop(container);
    eprintln!(
        "systemd install test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// The `proc-worker` the agent runs itself: as nobody, and across `systemctl restart patchd` the same process
/// keeps serving and the new agent adopts it.
fn process_service_survives_an_agent_restart(
    container: &Container,
    pki: &Pki,
    agent_addr: &str,
    proc_port: u16,
) {
    let addr = agent_addr.parse().unwrap();
    wait_for(
        Duration::from_secs(30),
        "the process-backend worker to serve",
        || worker_version(proc_port).is_some(),
    );
    let before = AgentRpc::connect(pki, addr).status(PROC_SERVICE);
    assert_eq!(before.state(), ServiceState::Running, "{before:?}");
    let pid = before.pid;
    assert_eq!(
        worker_version(proc_port).unwrap()["pid"].to_string(),
        pid.to_string(),
        "Status reports the pid of the process that serves"
    );
    let proc_status = container.exec_ok(&["cat", &format!("/proc/{pid}/status")]);
    let ids = |field: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {field} in:\n{proc_status}"))
    };
    assert_eq!(ids("Uid:"), "65534 65534 65534 65534", "{proc_status}");
    assert_eq!(ids("Gid:"), "65534 65534 65534 65534", "{proc_status}");
    assert_eq!(ids("Groups:"), "", "no supplementary groups: {proc_status}");

    let agent_before = container.show("patchd.service", &["MainPID"]);
    container.systemctl_ok(&["restart", "patchd.service"]);
    let agent_after = container.show("patchd.service", &["MainPID", "ActiveState"]);
    assert_eq!(agent_after["ActiveState"], "active", "{agent_after:?}");
    assert_ne!(
        agent_after["MainPID"], agent_before["MainPID"],
        "the agent was restarted"
    );
    // The restarted agent answers once it listens; then its Status must name the same process, adopted.
    wait_for(
        Duration::from_secs(30),
        "the restarted agent to answer",
        || {
            patchctl(pki.home(), &["agent", "info", agent_addr])
                .status
                .success()
        },
    );
    let after = AgentRpc::connect(pki, addr).status(PROC_SERVICE);
    assert_eq!(
        (after.state(), after.pid),
        (ServiceState::Running, pid),
        "the new agent adopted the running process: {after:?}\n{}",
        container.journal("patchd.service", 30)
    );
    let serving = worker_version(proc_port).expect("the process-backend worker still serves");
    assert_eq!(
        serving["pid"].to_string(),
        pid.to_string(),
        "the same process serves: it was not killed with the agent nor started again"
    );
    let journal = container.journal("patchd.service", 60);
    assert!(
        journal.contains("adopted the running service process"),
        "the agent says it adopted the process:\n{journal}"
    );
}
