//! The containerized demo, end to end on the real Docker Engine: `patchctl demo up --containers` runs the demo
//! workers as containers of an image built locally from `demo-worker`; a hotfix image of the worker is packaged
//! with `package build --image` and rolled out with `patch -R demo-worker`; afterwards every worker container runs
//! the new image with its Mounts, Env (plus `env_add`), Privileged, Ulimits and NetworkMode unchanged, serves the
//! new version, and `display` shows it `(patched)`. A second hotfix whose worker exits at once halts the rollout
//! with exit 3, every worker running its container (same ID) again. `demo down` removes the containers.
//!
//! Runs on `127.0.82.k` (not the default `127.0.1.k`) so it never meets a demo someone runs by hand. Fails (never
//! skips) without a Docker Engine.

use patchd_e2e::apply_support::stamp_worker;
use patchd_e2e::cluster_fixture::http;
use patchd_e2e::docker::DockerTest;
use patchd_e2e::patchctl;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Output;

const PREFIX: &str = "127.0.82";
const DEMO_LABEL: &str = "io.patchd.demo";

/// Runs `demo down` on drop (it removes the containers), so a failing test leaks no container or agent.
struct DemoGuard {
    home: PathBuf,
    dir: PathBuf,
}

impl DemoGuard {
    fn demo(&self, args: &[&str]) -> Output {
        let mut full = vec!["demo"];
        full.extend_from_slice(args);
        let dir = self.dir.to_string_lossy().into_owned();
        full.extend_from_slice(&["--dir", &dir]);
        patchctl(&self.home, &full)
    }
}

impl Drop for DemoGuard {
    fn drop(&mut self) {
        let _ = self.demo(&["down"]);
    }
}

fn assert_ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// What a container swap must keep: mounts, environment, privileged, ulimits, network mode.
fn kept(docker: &DockerTest, name: &str) -> Value {
    let inspected = docker
        .inspect_container(name)
        .unwrap_or_else(|| panic!("no container {name}"));
    let host = inspected.host_config.unwrap_or_default();
    serde_json::json!({
        "Mounts": serde_json::to_value(inspected.mounts).unwrap(),
        "Privileged": host.privileged,
        "Ulimits": serde_json::to_value(host.ulimits).unwrap(),
        "NetworkMode": host.network_mode,
    })
}

fn env_of(docker: &DockerTest, name: &str) -> Vec<String> {
    docker
        .inspect_container(name)
        .and_then(|c| c.config)
        .and_then(|c| c.env)
        .unwrap_or_default()
}

fn served_version(addr: &str) -> Option<String> {
    let (status, body) = http("GET", &format!("http://{addr}/version"), None).ok()?;
    (status == 200)
        .then(|| serde_json::from_str::<Value>(&body).ok())
        .flatten()
        .and_then(|v| v["version"].as_str().map(str::to_owned))
}

#[test]
fn a_containerized_demo_is_patched_keeping_each_containers_configuration() {
    let docker = DockerTest::connect("demo-containers");
    let tmp = tempfile::tempdir().unwrap();
    let demo = DemoGuard {
        home: tmp.path().join("home"),
        dir: tmp.path().join("demo"),
    };

    let up = demo.demo(&[
        "up",
        "--containers",
        "--nodes",
        "3",
        "--hosts-prefix",
        PREFIX,
    ]);
    assert_ok(&up, "demo up --containers");
    let demo_dir = demo.dir.canonicalize().unwrap();
    let label = demo_dir.to_string_lossy().into_owned();
    let filters = HashMap::from([("label", vec![format!("{DEMO_LABEL}={label}")])]);
    let listed = |docker: &DockerTest| -> Vec<String> {
        docker.block_on(async {
            let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            let mut names: Vec<String> = docker
                .client()
                .list_containers(Some(options))
                .await
                .unwrap()
                .into_iter()
                .filter_map(|c| c.names?.into_iter().next())
                .map(|n| n.trim_start_matches('/').to_owned())
                .collect();
            names.sort();
            names
        })
    };
    let containers = listed(&docker);
    assert_eq!(
        containers.len(),
        2,
        "one container per worker: {containers:?}"
    );
    // The demo's own image goes with this test.
    if let Some(original) = docker
        .inspect_image("demo-worker:v1.0.0")
        .and_then(|i| i.id)
    {
        docker.track_image(&original);
    }
    let workers = [format!("{PREFIX}.2:8262"), format!("{PREFIX}.3:8262")];
    for addr in &workers {
        assert_eq!(served_version(addr).as_deref(), Some("v1.0.0"), "{addr}");
    }
    let before: Vec<(Value, Vec<String>, String)> = containers
        .iter()
        .map(|name| {
            let id = docker.inspect_container(name).unwrap().id.unwrap();
            (kept(&docker, name), env_of(&docker, name), id)
        })
        .collect();

    // A hotfix image of the worker, packaged from the engine by reference.
    let hotfix = tmp.path().join("hotfix/demo-worker");
    stamp_worker(&hotfix, "v1.0.1-hotfix", "ok", 0);
    let tag = docker.name("worker:v1.0.1-hotfix");
    let hotfix_id = docker.build_image(&tag, &hotfix, &["/demo-worker"]);
    let package = tmp.path().join("demo-worker-v1.0.1-hotfix-image.tar.gz");
    assert_ok(
        &patchctl(
            &demo.home,
            &[
                "package",
                "build",
                "--image",
                &tag,
                "--component",
                "demo-worker",
                "--version",
                "v1.0.1-hotfix",
                "-o",
                package.to_str().unwrap(),
            ],
        ),
        "package build --image",
    );

    let patched = patchctl(
        &demo.home,
        &[
            "patch",
            "demo",
            package.to_str().unwrap(),
            "-R",
            "demo-worker",
            "-y",
        ],
    );
    assert_ok(&patched, "patch");

    assert_eq!(
        listed(&docker),
        containers,
        "the same names, nothing left aside"
    );
    for (name, (kept_before, env_before, id_before)) in containers.iter().zip(&before) {
        let now = docker.inspect_container(name).unwrap();
        assert_eq!(
            now.image.as_deref(),
            Some(hotfix_id.as_str()),
            "{name} runs the hotfix image"
        );
        assert_ne!(
            now.id.as_ref(),
            Some(id_before),
            "{name} is a new container"
        );
        assert_eq!(now.state.and_then(|s| s.running), Some(true), "{name} runs");
        assert_eq!(
            &kept(&docker, name),
            kept_before,
            "{name} keeps its configuration"
        );
        let mut expected_env = env_before.clone();
        expected_env.push("IS_UPGRADE=true".to_owned());
        let mut env_now = env_of(&docker, name);
        env_now.sort();
        expected_env.sort();
        assert_eq!(
            env_now, expected_env,
            "{name}: the old environment plus env_add"
        );
    }
    for addr in &workers {
        assert_eq!(
            served_version(addr).as_deref(),
            Some("v1.0.1-hotfix"),
            "{addr}"
        );
    }
    let display = assert_ok(&patchctl(&demo.home, &["display", "demo"]), "display");
    for addr in &workers {
        let line = display
            .lines()
            .find(|line| line.starts_with(addr.as_str()))
            .unwrap_or_else(|| panic!("{addr} missing from:\n{display}"));
        assert!(line.contains("(patched)"), "{line}");
        assert!(line.contains("v1.0.1-hotfix"), "{line}");
        let short_id = &hotfix_id.trim_start_matches("sha256:")[..12];
        assert!(line.contains(short_id), "display shows the image: {line}");
    }

    // A hotfix whose worker exits at once: the rollout halts with exit 3 and every worker runs the container it
    // ran before, same ID, nothing left aside.
    let ids_before: Vec<Option<String>> = containers
        .iter()
        .map(|name| docker.inspect_container(name).unwrap().id)
        .collect();
    let broken = tmp.path().join("broken/demo-worker");
    stamp_worker(&broken, "v1.0.2-broken", "crash", 0);
    let broken_tag = docker.name("worker:v1.0.2-broken");
    docker.build_image(&broken_tag, &broken, &["/demo-worker"]);
    let broken_package = tmp.path().join("demo-worker-v1.0.2-broken-image.tar.gz");
    assert_ok(
        &patchctl(
            &demo.home,
            &[
                "package",
                "build",
                "--image",
                &broken_tag,
                "--component",
                "demo-worker",
                "--version",
                "v1.0.2-broken",
                "-o",
                broken_package.to_str().unwrap(),
            ],
        ),
        "package build --image (broken)",
    );
    let halted = patchctl(
        &demo.home,
        &[
            "patch",
            "demo",
            broken_package.to_str().unwrap(),
            "-R",
            "demo-worker",
            "-y",
        ],
    );
    assert_eq!(
        halted.status.code(),
        Some(3),
        "{}{}",
        String::from_utf8_lossy(&halted.stdout),
        String::from_utf8_lossy(&halted.stderr)
    );
    assert_eq!(listed(&docker), containers, "nothing left aside");
    for (name, id_before) in containers.iter().zip(&ids_before) {
        let now = docker.inspect_container(name).unwrap();
        assert_eq!(&now.id, id_before, "{name} runs its container again");
        assert_eq!(now.state.and_then(|s| s.running), Some(true), "{name} runs");
    }
    for addr in &workers {
        assert_eq!(
            served_version(addr).as_deref(),
            Some("v1.0.1-hotfix"),
            "{addr}"
        );
    }

    let down = demo.demo(&["down"]);
    assert_ok(&down, "demo down");
    assert_eq!(
        listed(&docker),
        Vec::<String>::new(),
        "demo down removes the containers"
    );
}
