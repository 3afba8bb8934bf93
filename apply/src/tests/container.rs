//! Container swaps of a `docker` service against a fake Docker Engine (containers and images in memory; image
//! archives are real `docker save` layouts read by `patchd_package`): commit carries the configuration over and
//! removes the old container, a new image that exits at once is reverted to the same container ID, a crash at
//! every fault point recovers to the old container under its name, rollback returns to the kept image.

use super::{FakeClock, TestFaults};
use crate::backend::ServiceBackend;
use crate::backend::docker::DockerBackend;
use crate::container::{ContainerEngine, ContainerError, ImageFacts};
use crate::effects::{FaultPoint, HealthProbe};
use crate::journal::ServiceJournal;
use crate::spec::{HealthSpec, ServiceSpec};
use crate::*;
use async_trait::async_trait;
use bollard::models::{
    ContainerConfig, ContainerCreateBody, ContainerInspectResponse, ContainerState,
    ContainerStateStatusEnum, HostConfig, ResourcesUlimits,
};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NAME: &str = "oms";

#[derive(Debug, Clone)]
struct FakeContainer {
    id: String,
    name: String,
    body: ContainerCreateBody,
    running: bool,
    starts: u32,
    exit_code: Option<i64>,
}

#[derive(Debug, Default)]
struct FakeDocker {
    containers: Vec<FakeContainer>,
    images: BTreeSet<String>,
    /// Images whose containers exit with status 1 as soon as they start.
    crashing: BTreeSet<String>,
    next_id: u64,
    loads: u32,
}

impl FakeDocker {
    fn find(&mut self, name: &str) -> Option<&mut FakeContainer> {
        self.containers
            .iter_mut()
            .find(|c| c.id == name || c.name == name)
    }

    fn named(&self, name: &str) -> Option<&FakeContainer> {
        self.containers.iter().find(|c| c.name == name)
    }
}

#[derive(Debug, Default, Clone)]
struct FakeEngine {
    docker: Arc<Mutex<FakeDocker>>,
}

fn call(op: &'static str, target: &str, detail: &str) -> ContainerError {
    ContainerError::Call {
        op,
        target: target.to_string(),
        detail: detail.to_string(),
    }
}

#[async_trait]
impl ContainerEngine for FakeEngine {
    fn socket(&self) -> &Path {
        Path::new("/fake/docker.sock")
    }

    async fn load_image(&self, archive: &Path) -> Result<(), ContainerError> {
        let info = patchd_package::read_image_archive(archive)
            .map_err(|e| call("load", &archive.display().to_string(), &e.to_string()))?;
        let mut docker = self.docker.lock().unwrap();
        docker.loads += 1;
        docker.images.insert(info.id);
        Ok(())
    }

    async fn inspect_image(&self, reference: &str) -> Result<Option<ImageFacts>, ContainerError> {
        let docker = self.docker.lock().unwrap();
        Ok(docker.images.contains(reference).then(|| ImageFacts {
            id: reference.to_string(),
            repo_tags: vec![format!("oms:{}", &reference[7..11])],
        }))
    }

    async fn inspect_container(
        &self,
        name: &str,
    ) -> Result<Option<ContainerInspectResponse>, ContainerError> {
        let mut docker = self.docker.lock().unwrap();
        Ok(docker.find(name).map(|c| {
            let body = c.body.clone();
            ContainerInspectResponse {
                id: Some(c.id.clone()),
                name: Some(format!("/{}", c.name)),
                image: body.image.clone(),
                config: Some(ContainerConfig {
                    env: body.env,
                    cmd: body.cmd,
                    entrypoint: body.entrypoint,
                    labels: body.labels,
                    user: body.user,
                    working_dir: body.working_dir,
                    image: body.image,
                    ..Default::default()
                }),
                host_config: body.host_config,
                state: Some(ContainerState {
                    status: Some(if c.running {
                        ContainerStateStatusEnum::RUNNING
                    } else if c.starts == 0 {
                        ContainerStateStatusEnum::CREATED
                    } else {
                        ContainerStateStatusEnum::EXITED
                    }),
                    running: Some(c.running),
                    restarting: Some(false),
                    pid: Some(if c.running {
                        4000 + i64::from(c.starts)
                    } else {
                        0
                    }),
                    exit_code: c.exit_code,
                    started_at: Some(format!("start-{}", c.starts)),
                    finished_at: Some(if c.exit_code.is_some() {
                        "2026-01-01T00:00:00Z".into()
                    } else {
                        "0001-01-01T00:00:00Z".into()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }
        }))
    }

    async fn create_container(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, ContainerError> {
        let mut docker = self.docker.lock().unwrap();
        if docker.named(name).is_some() {
            return Err(call(
                "create",
                name,
                "Conflict. The container name is already in use",
            ));
        }
        if !body
            .image
            .as_ref()
            .is_some_and(|i| docker.images.contains(i))
        {
            return Err(call("create", name, "No such image"));
        }
        docker.next_id += 1;
        let id = format!("{:064x}", docker.next_id);
        docker.containers.push(FakeContainer {
            id: id.clone(),
            name: name.to_string(),
            body,
            running: false,
            starts: 0,
            exit_code: None,
        });
        Ok(id)
    }

    async fn start_container(&self, name: &str) -> Result<(), ContainerError> {
        let mut docker = self.docker.lock().unwrap();
        let crashing = docker.crashing.clone();
        let container = docker
            .find(name)
            .ok_or_else(|| call("start", name, "No such container"))?;
        if container.running {
            return Ok(());
        }
        container.starts += 1;
        if container
            .body
            .image
            .as_ref()
            .is_some_and(|i| crashing.contains(i))
        {
            container.exit_code = Some(1);
        } else {
            container.running = true;
            container.exit_code = None;
        }
        Ok(())
    }

    async fn stop_container(&self, name: &str, _grace: Duration) -> Result<(), ContainerError> {
        let mut docker = self.docker.lock().unwrap();
        let container = docker
            .find(name)
            .ok_or_else(|| call("stop", name, "No such container"))?;
        if container.running {
            container.running = false;
            container.exit_code = Some(0);
        }
        Ok(())
    }

    async fn rename_container(&self, name: &str, new_name: &str) -> Result<(), ContainerError> {
        let mut docker = self.docker.lock().unwrap();
        if docker.named(new_name).is_some() {
            return Err(call("rename", name, "Conflict. The name is already in use"));
        }
        let container = docker
            .find(name)
            .ok_or_else(|| call("rename", name, "No such container"))?;
        container.name = new_name.to_string();
        Ok(())
    }

    async fn remove_container(&self, name: &str) -> Result<(), ContainerError> {
        let mut docker = self.docker.lock().unwrap();
        docker.containers.retain(|c| c.id != name && c.name != name);
        Ok(())
    }

    async fn remove_image(&self, id: &str) -> Result<(), ContainerError> {
        let mut docker = self.docker.lock().unwrap();
        if docker
            .containers
            .iter()
            .any(|c| c.body.image.as_deref() == Some(id))
        {
            return Err(call("rmi", id, "image is being used by a container"));
        }
        docker.images.remove(id);
        Ok(())
    }
}

/// Healthy when the container under the service's name runs an image not listed in `unhealthy_images` (a
/// service that starts but never answers its health endpoint).
#[derive(Debug)]
struct ContainerProbe {
    engine: FakeEngine,
    unhealthy_images: Arc<Mutex<HashSet<String>>>,
}

#[async_trait]
impl HealthProbe for ContainerProbe {
    async fn check(&self, _health: &HealthSpec) -> Result<(), String> {
        let docker = self.engine.docker.lock().unwrap();
        match docker.named(NAME) {
            Some(c) if c.running => {
                let image = c.body.image.clone().unwrap_or_default();
                if self.unhealthy_images.lock().unwrap().contains(&image) {
                    Err("GET /health: 503 Service Unavailable".into())
                } else {
                    Ok(())
                }
            }
            _ => Err("connection refused".into()),
        }
    }
}

struct DockerHost {
    dir: tempfile::TempDir,
    state: PathBuf,
    engine: FakeEngine,
    faults: Arc<TestFaults>,
    unhealthy_images: Arc<Mutex<HashSet<String>>>,
    original_id: String,
    original_image: String,
}

/// A `docker save` archive of a one-layer image labelled `version`; its image ID.
fn image_archive(out: &Path, version: &str) -> String {
    use ring::digest::{SHA256, digest};
    let layer = format!("layer of {version}").into_bytes();
    let mut layer_tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(layer.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    layer_tar
        .append_data(&mut header, "version.txt", layer.as_slice())
        .unwrap();
    let layer_tar = layer_tar.into_inner().unwrap();
    let diff_id = format!("sha256:{}", hex::encode(digest(&SHA256, &layer_tar)));
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Labels": { "version": version } },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    }))
    .unwrap();
    let config_hex = hex::encode(digest(&SHA256, &config));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": [format!("oms:{version}")],
        "Layers": ["layer/layer.tar"],
    }]))
    .unwrap();
    let mut archive = tar::Builder::new(Vec::new());
    for (name, bytes) in [
        ("manifest.json".to_string(), manifest),
        (format!("{config_hex}.json"), config),
        ("layer/layer.tar".to_string(), layer_tar),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive
            .append_data(&mut header, &name, bytes.as_slice())
            .unwrap();
    }
    std::fs::write(out, archive.into_inner().unwrap()).unwrap();
    format!("sha256:{config_hex}")
}

impl DockerHost {
    /// The container `oms` running image v1 with a configuration worth carrying over.
    fn new() -> DockerHost {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let engine = FakeEngine::default();
        let original_image = image_archive(&dir.path().join("v1.tar"), "v1");
        let original_id = {
            let mut docker = engine.docker.lock().unwrap();
            docker.images.insert(original_image.clone());
            docker.containers.push(FakeContainer {
                id: format!("{:064x}", 999),
                name: NAME.into(),
                body: ContainerCreateBody {
                    image: Some(original_image.clone()),
                    env: Some(vec![
                        "OMS_HOST_IP=10.0.0.1".into(),
                        "IS_UPGRADE=false".into(),
                    ]),
                    entrypoint: Some(vec!["/run.sh".into()]),
                    labels: Some([("tier".to_string(), "oms".to_string())].into()),
                    host_config: Some(HostConfig {
                        binds: Some(vec!["/data/oms/oms_logs:/home/admin/logs".into()]),
                        network_mode: Some("host".into()),
                        privileged: Some(true),
                        pids_limit: Some(-1),
                        ulimits: Some(vec![ResourcesUlimits {
                            name: Some("nproc".into()),
                            soft: Some(65535),
                            hard: Some(65535),
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                running: true,
                starts: 1,
                exit_code: None,
            });
            format!("{:064x}", 999)
        };
        DockerHost {
            dir,
            state,
            engine,
            faults: Arc::default(),
            unhealthy_images: Arc::default(),
            original_id,
            original_image,
        }
    }

    fn spec(&self) -> ServiceSpec {
        toml::from_str(&format!(
            "name = \"oms\"\ncomponent = \"oms\"\nbackend = \"docker\"\ncontainer = \"{NAME}\"\n\
             env_add = [\"IS_UPGRADE=true\"]\n[health]\nmin_healthy = \"1s\"\ntimeout = \"5s\"\n"
        ))
        .unwrap()
    }

    async fn engine(&self) -> Result<Engine, ApplyError> {
        let effects = Effects {
            clock: Arc::new(FakeClock {
                base: Instant::now(),
                offset: Mutex::new(Duration::ZERO),
            }),
            probe: Arc::new(ContainerProbe {
                engine: self.engine.clone(),
                unhealthy_images: self.unhealthy_images.clone(),
            }),
            faults: self.faults.clone(),
        };
        let fake = self.engine.clone();
        let factory: BackendFactory = Box::new(move |spec: &ServiceSpec, _state: &Path| {
            Ok(Arc::new(DockerBackend::new(spec, Arc::new(fake.clone()))?)
                as Arc<dyn ServiceBackend>)
        });
        let config = EngineConfig {
            state_dir: self.state.clone(),
            deploy_roots: vec![self.dir.path().join("opt")],
            services: vec![self.spec()],
            keep_backups: 3,
            package_limits: patchd_package::Limits::default(),
            cache_min_age: crate::prune::DEFAULT_CACHE_MIN_AGE,
        };
        Engine::start_with(config, effects, factory).await
    }

    /// An image package of version `version` in the blob cache; its digest and image ID.
    fn package(&self, version: &str) -> (String, String) {
        let archive = self.dir.path().join(format!("{version}.tar"));
        let image = image_archive(&archive, version);
        let out = self.dir.path().join(format!("oms-{version}.tar.gz"));
        let info = patchd_package::build_image(&archive, "oms", version, &out).unwrap();
        let blobs = self.state.join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::copy(&out, blobs.join(&info.tree_digest)).unwrap();
        (info.tree_digest, image)
    }

    fn docker(&self) -> std::sync::MutexGuard<'_, FakeDocker> {
        self.engine.docker.lock().unwrap()
    }

    /// Exactly one container, under the service's name, running; its ID and image.
    fn one_running(&self) -> (String, String) {
        let docker = self.docker();
        let names: Vec<&str> = docker.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec![NAME], "one container, under its name");
        let c = &docker.containers[0];
        assert!(c.running, "{c:?}");
        (c.id.clone(), c.body.image.clone().unwrap())
    }

    fn journal(&self) -> ServiceJournal {
        ServiceJournal::load(&ServiceJournal::path(&self.state, "oms")).unwrap()
    }
}

fn apply_cmd(digest: &str, patch_id: &str) -> ApplyCommand {
    ApplyCommand {
        service: "oms".into(),
        digest: digest.into(),
        patch_id: patch_id.into(),
        offline: false,
        caller: String::new(),
        env_add: Vec::new(),
    }
}

#[tokio::test]
async fn a_committed_swap_carries_the_configuration_over_and_keeps_the_old_image() {
    let host = DockerHost::new();
    let engine = host.engine().await.unwrap();
    let (digest, image) = host.package("v2");
    engine.stage("oms", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    let (id, running_image) = host.one_running();
    assert_ne!(id, host.original_id);
    assert_eq!(running_image, image);
    {
        let docker = host.docker();
        let body = &docker.containers[0].body;
        assert_eq!(
            body.env.clone().unwrap(),
            vec![
                "OMS_HOST_IP=10.0.0.1".to_string(),
                "IS_UPGRADE=true".to_string()
            ],
            "env_add replaces the old value"
        );
        assert_eq!(
            body.entrypoint.clone().unwrap(),
            vec!["/run.sh".to_string()]
        );
        let host_config = body.host_config.clone().unwrap();
        assert_eq!(host_config.privileged, Some(true));
        assert_eq!(host_config.pids_limit, Some(-1));
        assert_eq!(host_config.network_mode.as_deref(), Some("host"));
        assert_eq!(host_config.binds.unwrap().len(), 1);
        assert_eq!(host_config.ulimits.unwrap()[0].soft, Some(65535));
        assert!(
            docker.images.contains(&host.original_image),
            "kept for rollback"
        );
    }
    let journal = host.journal();
    assert_eq!(
        journal.history.last().unwrap().previous_image.as_deref(),
        Some(host.original_image.as_str())
    );
    let status = engine.status(Some("oms")).await.unwrap();
    assert!(
        status[0].image.as_deref().unwrap().contains(&image[7..19]),
        "{:?}",
        status[0].image
    );

    // Rollback: the kept image again, with the same configuration; the rolled-back image goes.
    let report = engine
        .rollback(RollbackCommand {
            service: "oms".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
            caller: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    let (_, running_image) = host.one_running();
    assert_eq!(running_image, host.original_image);
    assert!(
        !host.docker().images.contains(&image),
        "the rolled-back image is removed"
    );
    assert!(host.journal().history.is_empty());
}

#[tokio::test]
async fn a_new_image_that_exits_at_once_is_reverted_to_the_same_container() {
    let host = DockerHost::new();
    let engine = host.engine().await.unwrap();
    let (digest, image) = host.package("v2-broken");
    host.docker().crashing.insert(image);
    engine.stage("oms", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    assert!(
        report.result.reason.contains("exited with status 1"),
        "{}",
        report.result.reason
    );
    let (id, image) = host.one_running();
    assert_eq!(id, host.original_id, "the same container runs again");
    assert_eq!(image, host.original_image);
}

#[tokio::test]
async fn a_new_container_that_runs_but_fails_its_health_probe_is_reverted_to_the_same_container() {
    let host = DockerHost::new();
    let engine = host.engine().await.unwrap();
    let (digest, image) = host.package("v2-unhealthy");
    host.unhealthy_images.lock().unwrap().insert(image);
    engine.stage("oms", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Reverted,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("503 Service Unavailable"),
        "the reason names the failed probe: {}",
        report.result.reason
    );
    let (id, image) = host.one_running();
    assert_eq!(id, host.original_id, "the same container runs again");
    assert_eq!(image, host.original_image);
}

#[tokio::test]
async fn a_package_without_an_image_or_a_missing_container_is_refused_before_anything_changes() {
    let host = DockerHost::new();
    let engine = host.engine().await.unwrap();
    let (digest, _) = host.package("v2");
    engine.stage("oms", &digest).await.unwrap();
    host.docker().containers[0].name = "someone-else".into();
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    host.docker().containers[0].name = NAME.into();

    let plain = host.dir.path().join("plain/oms");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("oms"), "a binary, not an image").unwrap();
    let out = host.dir.path().join("plain.tar.gz");
    let info = patchd_package::pack_dir(&plain, "v3", &out).unwrap();
    std::fs::copy(&out, host.state.join("blobs").join(&info.tree_digest)).unwrap();
    engine.stage("oms", &info.tree_digest).await.unwrap();
    let err = engine
        .apply(apply_cmd(&info.tree_digest, "p2"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not an image package"), "{err}");
    let (id, _) = host.one_running();
    assert_eq!(id, host.original_id);
}

#[tokio::test]
async fn a_crash_at_every_step_recovers_to_the_old_container_under_its_name() {
    let points = [
        (FaultPoint::AfterPrepare, 1),
        (FaultPoint::AfterStop, 1),
        (FaultPoint::AfterSwap, 1),
        (FaultPoint::AfterSwap, 2),
        (FaultPoint::AfterStart, 1),
        (FaultPoint::DuringProbation, 1),
        (FaultPoint::BeforeCommit, 1),
    ];
    for (point, n) in points {
        let host = DockerHost::new();
        let engine = host.engine().await.unwrap();
        let (digest, _) = host.package("v2");
        engine.stage("oms", &digest).await.unwrap();
        *host.faults.armed.lock().unwrap() = Some((point, n));
        let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
        assert!(matches!(err, ApplyError::Crash(_)), "{point:?}: {err}");
        drop(engine);
        // The agent starts again: recovery.
        host.engine().await.unwrap();
        let (id, image) = host.one_running();
        assert_eq!(id, host.original_id, "{point:?}:{n}");
        assert_eq!(image, host.original_image, "{point:?}:{n}");
        assert!(host.journal().current.unwrap().phase.is_final());
    }
}

#[tokio::test]
async fn an_engine_that_does_not_answer_refuses_the_apply_naming_its_socket() {
    let host = DockerHost::new();
    let (digest, _) = host.package("v2");
    let socket = host.dir.path().join("no-docker.sock");
    let effects = Effects {
        clock: Arc::new(FakeClock {
            base: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }),
        probe: Arc::new(ContainerProbe {
            engine: host.engine.clone(),
            unhealthy_images: host.unhealthy_images.clone(),
        }),
        faults: host.faults.clone(),
    };
    let absent = socket.clone();
    let factory: BackendFactory = Box::new(move |spec: &ServiceSpec, _state: &Path| {
        let engine = crate::container::bollard_engine::BollardEngine::new(&absent);
        Ok(Arc::new(DockerBackend::new(spec, Arc::new(engine))?) as Arc<dyn ServiceBackend>)
    });
    let config = EngineConfig {
        state_dir: host.state.clone(),
        deploy_roots: vec![],
        services: vec![host.spec()],
        keep_backups: 3,
        package_limits: patchd_package::Limits::default(),
        cache_min_age: crate::prune::DEFAULT_CACHE_MIN_AGE,
    };
    let engine = Engine::start_with(config, effects, factory).await.unwrap();
    engine.stage("oms", &digest).await.unwrap();
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.to_string().contains(&socket.display().to_string()),
        "{err}"
    );
    assert!(host.journal().current.is_none(), "nothing was journaled");
}

#[tokio::test]
async fn an_archive_that_is_not_the_manifests_image_is_refused_before_loading() {
    let host = DockerHost::new();
    let engine = host.engine().await.unwrap();
    let (digest, image) = host.package("v2");
    engine.stage("oms", &digest).await.unwrap();
    // The staged manifest now names another image than the archive holds.
    let manifest_path = crate::stage::StagedPaths::new(&host.state, &digest).manifest();
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let other = format!("sha256:{}", "e".repeat(64));
    std::fs::write(&manifest_path, text.replace(&image, &other)).unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Failed,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("refused before loading"),
        "{}",
        report.result.reason
    );
    assert_eq!(host.docker().loads, 0, "nothing was loaded");
    let (id, _) = host.one_running();
    assert_eq!(id, host.original_id);
}

/// An upgrade runbook stops the container, then swaps it with `env_add` in the request: the new container is
/// created with the old environment plus the spec's and the request's variables (the request's win), started and
/// probed; a patch id `<upgrade>:<step>` is accepted. A revert of such a swap puts the old container back under its
/// name, stopped as it was.
#[tokio::test]
async fn a_stopped_container_is_swapped_with_the_requests_env_add_and_a_revert_leaves_it_stopped() {
    let host = DockerHost::new();
    let engine = host.engine().await.unwrap();
    let (digest, image) = host.package("v4.3.1");
    engine.stage("oms", &digest).await.unwrap();
    host.docker().containers[0].running = false;
    let mut command = apply_cmd(&digest, "upg-1:swap@oms-1");
    command.env_add = vec!["EXTRA=1".into(), "IS_UPGRADE=yes".into()];
    let report = engine.apply(command).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    let (_, running_image) = host.one_running();
    assert_eq!(running_image, image);
    assert_eq!(
        host.docker().containers[0].body.env.clone().unwrap(),
        vec![
            "OMS_HOST_IP=10.0.0.1".to_string(),
            "EXTRA=1".to_string(),
            "IS_UPGRADE=yes".to_string()
        ]
    );

    let (bad, bad_image) = host.package("v4.3.2");
    engine.stage("oms", &bad).await.unwrap();
    host.unhealthy_images.lock().unwrap().insert(bad_image);
    let before_id = host.docker().containers[0].id.clone();
    host.docker().containers[0].running = false;
    let mut command = apply_cmd(&bad, "upg-2:swap@oms-1");
    command.env_add = vec!["IS_UPGRADE=true".into()];
    let report = engine.apply(command).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Reverted,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("left stopped"),
        "{}",
        report.result.reason
    );
    let docker = host.docker();
    let names: Vec<&str> = docker.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        vec![NAME],
        "the old container is back under its name"
    );
    assert_eq!(docker.containers[0].id, before_id);
    assert!(
        !docker.containers[0].running,
        "left stopped, as before the apply"
    );
}

#[tokio::test]
async fn env_add_is_refused_for_a_bad_key() {
    let host = DockerHost::new();
    let engine = host.engine().await.unwrap();
    let (digest, _) = host.package("v2");
    engine.stage("oms", &digest).await.unwrap();
    let mut command = apply_cmd(&digest, "p1");
    command.env_add = vec!["BAD KEY=1".into()];
    let refused = engine.apply(command).await.unwrap_err().to_string();
    assert!(refused.contains("env_add entry"), "{refused}");
}
