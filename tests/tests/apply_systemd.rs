//! The `systemd` backend against a real systemd: `systemd-nspawn` boots one (systemd as PID 1 of a container
//! with a private network), the agent runs inside it next to a `demo-worker.service` unit, and the test drives the
//! agent over mutual TLS from a thread that entered the container's network namespace. Checks: status reads the
//! unit (MainPID), an apply restarts the unit with the new binary and commits, a crashing version is reverted
//! (reason and journald log tail included), a rollback commits.
//!
//! Needs root and `systemd-nspawn` (Debian package `systemd-container`; installed here when missing). When the
//! container cannot run, the test FAILS with the reason: it never passes silently.

use patchd_e2e::apply_support::{
    AgentRpc, http_get, outcome, package_hashes, push, stamp_worker, worker_conf, worker_package,
};
use patchd_e2e::nspawn::{Boot, Container, ensure_nspawn};
use patchd_e2e::{Pki, bin, sha256_file, toml_string, wait_for};
use patchd_proto::v1::{ApplyOutcome, ServiceState};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

const UNIT: &str = "demo-worker.service";
const LISTEN: &str = "127.0.0.1:8262";
/// The unit properties the test reads.
const SHOWN: &[&str] = &["MainPID", "ActiveState", "SubState", "NRestarts"];

/// Runs `patchd run` inside the container and returns its listening address (inside the container's network).
fn start_agent(container: &Container, config: &Path, log: &Path) -> (Child, String) {
    let stderr = std::fs::File::create(log).unwrap();
    let mut child = container
        .command(&[
            &bin("patchd").to_string_lossy(),
            "run",
            "--config",
            &config.to_string_lossy(),
        ])
        .env("PATCHD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start patchd in the container: {e}"));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("patchd listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "patchd in the container printed no ready line:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
    (child, addr)
}

#[test]
fn systemd_backend_applies_reverts_and_rolls_back_a_unit() {
    ensure_nspawn();
    let dir = tempfile::Builder::new()
        .prefix("patchd-systemd-")
        .tempdir_in("/tmp")
        .unwrap();
    let root = dir.path().to_path_buf();
    let pki = Pki::new(&root);
    let tls = pki.issue_agent("agent-nspawn", &["127.0.0.1"]);
    let deploy_root = root.join("deploy");
    let deploy_dir = deploy_root.join("worker-1");
    let binary = deploy_dir.join("bin/demo-worker/demo-worker");
    stamp_worker(&binary, "v1.0.0", "ok", 0);
    std::fs::create_dir_all(deploy_dir.join("bin/demo-worker/conf")).unwrap();
    std::fs::write(
        deploy_dir.join("bin/demo-worker/conf/worker.toml"),
        worker_conf("v1.0.0"),
    )
    .unwrap();
    let original_sha = sha256_file(&binary);

    let unit = root.join(UNIT);
    std::fs::write(
        &unit,
        format!(
            "[Unit]\nDescription=demo worker (patchd systemd backend test)\n\n[Service]\nType=exec\n\
             ExecStart={} serve --listen {LISTEN} --name worker-1\nRestart=on-failure\nRestartSec=200ms\n",
            binary.display()
        ),
    )
    .unwrap();
    let config = root.join("patchd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {state}\ndeploy_roots = [{deploy}]\n\n[tls]\nca = {ca}\ncert = {cert}\nkey = {key}\n\n\
             [[service]]\nname = \"worker-1\"\ncomponent = \"demo-worker\"\ndeploy_dir = {dir}\nbackend = \"systemd\"\nunit = \"{UNIT}\"\n\n\
             [service.health]\nmin_healthy = \"500ms\"\nhttp = \"http://{LISTEN}/health\"\ntimeout = \"10s\"\n",
            state = toml_string(&root.join("state").to_string_lossy()),
            deploy = toml_string(&deploy_root.to_string_lossy()),
            ca = toml_string(&tls.ca.to_string_lossy()),
            cert = toml_string(&tls.cert.to_string_lossy()),
            key = toml_string(&tls.key.to_string_lossy()),
            dir = toml_string(&deploy_dir.to_string_lossy()),
        ),
    )
    .unwrap();
    let pkgs = root.join("packages");
    let good = worker_package(&pkgs, "v2.0.0", "ok");
    let crash = worker_package(&pkgs, "v2.0.1-crash", "crash");

    let target_debug = bin("patchd").parent().unwrap().to_path_buf();
    let machine = format!("patchd-apply-{}", std::process::id());
    // The default private network: the agent and the worker listen only inside the container.
    let container = Container::boot(
        Boot::new(&machine, &root.join("nspawn-console.log"))
            .bind(&root, &root)
            .bind_ro(&target_debug, &target_debug)
            .bind_ro(&unit, Path::new("/etc/systemd/system/demo-worker.service")),
    );
    container.systemctl_ok(&["daemon-reload"]);
    container.systemctl_ok(&["start", UNIT]);
    let (mut agent, addr) = start_agent(&container, &config, &root.join("patchd-stderr.log"));

    // Everything that talks to the agent or the worker runs in the container's network namespace.
    let netns = container.netns();
    let scenario = {
        let (pki, pkgs, container_ref, original_sha) =
            (&pki, &pkgs, &container, original_sha.clone());
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let ns = std::fs::File::open(&netns).unwrap();
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(
                        |e| panic!("cannot enter the container's network namespace: {e}"),
                    );
                    let version = || {
                        http_get(LISTEN, "/version")
                            .filter(|(status, _)| *status == 200)
                            .and_then(|(_, body)| {
                                serde_json::from_str::<serde_json::Value>(&body).ok()
                            })
                            .and_then(|v| v["version"].as_str().map(str::to_string))
                    };
                    wait_for(Duration::from_secs(30), "the unit to serve v1.0.0", || {
                        version().as_deref() == Some("v1.0.0")
                    });
                    let mut rpc = AgentRpc::connect(pki, addr.parse().unwrap());

                    let status = rpc.status("worker-1");
                    let show = container_ref.show(UNIT, SHOWN);
                    assert_eq!(status.state(), ServiceState::Running);
                    assert_eq!(
                        status.pid.to_string(),
                        show["MainPID"],
                        "status reports the unit's MainPID"
                    );
                    assert_eq!(status.binary_sha256, original_sha);
                    let first_pid = show["MainPID"].clone();

                    // A good version: systemctl stop, swap, systemctl start, probation, commit.
                    let digest = push(pki, &addr, &good);
                    rpc.stage("worker-1", &digest).unwrap();
                    let applied = rpc.apply("worker-1", &digest, "p1", false).unwrap();
                    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
                    assert_eq!(version().as_deref(), Some("v2.0.0"));
                    let show = container_ref.show(UNIT, SHOWN);
                    assert_eq!(show["ActiveState"], "active");
                    assert_ne!(show["MainPID"], first_pid, "the unit was restarted");
                    let status = rpc.status("worker-1");
                    assert_eq!(status.pid.to_string(), show["MainPID"]);
                    assert_eq!(status.binary_sha256, package_hashes(pkgs, "v2.0.0").0);
                    assert_eq!(status.version, "v2.0.0");

                    // A crashing version (Restart=on-failure would loop it): reverted, journald lines reported.
                    let digest = push(pki, &addr, &crash);
                    rpc.stage("worker-1", &digest).unwrap();
                    let reverted = rpc.apply("worker-1", &digest, "p2", false).unwrap();
                    assert_eq!(outcome(&reverted), ApplyOutcome::Reverted, "{reverted:?}");
                    assert!(
                        reverted.reason.contains("exited with status"),
                        "{}",
                        reverted.reason
                    );
                    assert!(
                        reverted
                            .log_tail
                            .iter()
                            .any(|l| l.contains("crashing on start")),
                        "journalctl tail: {:?}",
                        reverted.log_tail
                    );
                    wait_for(Duration::from_secs(20), "v2.0.0 serving again", || {
                        version().as_deref() == Some("v2.0.0")
                    });
                    assert_eq!(container_ref.show(UNIT, SHOWN)["ActiveState"], "active");
                    assert_eq!(
                        rpc.status("worker-1").binary_sha256,
                        package_hashes(pkgs, "v2.0.0").0
                    );

                    // Rollback to the original version.
                    let rolled = rpc.rollback("worker-1", "p1", "r1").unwrap();
                    assert_eq!(outcome(&rolled), ApplyOutcome::Committed, "{rolled:?}");
                    assert_eq!(version().as_deref(), Some("v1.0.0"));
                    assert_eq!(rpc.status("worker-1").binary_sha256, original_sha);
                })
                .join()
        })
    };
    let _ = agent.kill();
    let _ = agent.wait();
    if let Err(panic) = scenario {
        eprintln!(
            "agent log:\n{}",
            std::fs::read_to_string(root.join("patchd-stderr.log")).unwrap_or_default()
        );
        std::panic::resume_unwind(panic);
    }
    assert_eq!(sha256_file(&binary), original_sha);
    drop(container);
}
