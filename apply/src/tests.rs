//! Engine tests with in-memory fakes for the service, clock, probe and faults, and real files in temporary
//! directories. The fake service "runs" whatever bytes its main binary holds when it is started: a binary whose
//! content mentions `crash` dies at once, `fail-health` fails its probe.

use crate::backend::{BackendError, RunState, ServiceBackend, ServiceRuntime};
use crate::effects::{Clock, FaultHook, FaultPoint, HealthProbe, SimulatedCrash};
use crate::journal::{ApplyPhase, ServiceJournal};
use crate::spec::{HealthSpec, ServiceSpec};
use crate::*;
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct FakeWorld {
    running: Option<String>,
    instance: u64,
    last_exit: Option<String>,
    starts: u32,
    stops: u32,
}

/// A service whose behaviour is its binary's content at start.
#[derive(Debug, Clone)]
struct FakeBackend {
    binary: PathBuf,
    world: Arc<Mutex<FakeWorld>>,
}

#[async_trait]
impl ServiceBackend for FakeBackend {
    async fn start(&self) -> Result<(), BackendError> {
        let content = std::fs::read_to_string(&self.binary).unwrap_or_default();
        let mut world = self.world.lock().unwrap();
        world.starts += 1;
        if world.running.is_some() {
            return Ok(());
        }
        world.instance += 1;
        if content.contains("crash") {
            world.running = None;
            world.last_exit = Some("exited with status 3".into());
        } else {
            world.running = Some(content);
        }
        Ok(())
    }

    async fn stop(&self) -> Result<(), BackendError> {
        let mut world = self.world.lock().unwrap();
        world.stops += 1;
        world.running = None;
        Ok(())
    }

    async fn status(&self) -> Result<ServiceRuntime, BackendError> {
        let world = self.world.lock().unwrap();
        Ok(ServiceRuntime {
            state: if world.running.is_some() {
                RunState::Running
            } else if world.last_exit.is_some() {
                RunState::Failed
            } else {
                RunState::Stopped
            },
            pid: world.running.as_ref().map(|_| 1000 + world.instance as u32),
            uptime_seconds: None,
            instance: world.running.as_ref().map(|_| world.instance.to_string()),
            last_exit: world.last_exit.clone(),
        })
    }

    async fn log_tail(&self, _lines: usize) -> Vec<String> {
        vec!["fake log line".into()]
    }

    fn set_auto_restart(&self, _enabled: bool) {}
}

#[derive(Debug)]
struct FakeProbe {
    world: Arc<Mutex<FakeWorld>>,
}

#[async_trait]
impl HealthProbe for FakeProbe {
    async fn check(&self, _health: &HealthSpec) -> Result<(), String> {
        match &self.world.lock().unwrap().running {
            Some(content) if content.contains("fail-health") => {
                Err("http probe: status 500".into())
            }
            Some(_) => Ok(()),
            None => Err("connection refused".into()),
        }
    }
}

/// Time passes only when the engine sleeps.
#[derive(Debug)]
struct FakeClock {
    base: Instant,
    offset: Mutex<Duration>,
}

#[async_trait]
impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap()
    }
    fn unix_now(&self) -> i64 {
        1_800_000_000 + self.offset.lock().unwrap().as_secs() as i64
    }
    async fn sleep(&self, duration: Duration) {
        *self.offset.lock().unwrap() += duration;
        tokio::task::yield_now().await;
    }
}

/// Simulates a crash at the n-th hit of one point; with `symlink_to` set, a point about a path plays a local
/// attacker there instead: the file or directory is moved aside and a symlink to `symlink_to` put in its place.
#[derive(Debug, Default)]
struct TestFaults {
    armed: Mutex<Option<(FaultPoint, u32)>>,
    symlink_to: Mutex<Option<PathBuf>>,
}

impl TestFaults {
    fn fires(&self, point: FaultPoint) -> bool {
        let mut armed = self.armed.lock().unwrap();
        if let Some((p, n)) = armed.as_mut()
            && *p == point
        {
            *n -= 1;
            if *n == 0 {
                *armed = None;
                return true;
            }
        }
        false
    }
}

impl FaultHook for TestFaults {
    fn hit(&self, point: FaultPoint) -> Result<(), SimulatedCrash> {
        if self.fires(point) {
            return Err(SimulatedCrash(point));
        }
        Ok(())
    }

    fn hit_at(&self, point: FaultPoint, path: &Path) -> Result<(), SimulatedCrash> {
        let Some(to) = self.symlink_to.lock().unwrap().clone() else {
            return self.hit(point);
        };
        if self.fires(point) {
            let mut aside = path.as_os_str().to_owned();
            aside.push(".displaced");
            std::fs::rename(path, &aside).unwrap();
            std::os::unix::fs::symlink(&to, path).unwrap();
        }
        Ok(())
    }
}

struct Host {
    _dir: tempfile::TempDir,
    state: PathBuf,
    root: PathBuf,
    deploy: PathBuf,
    packages: PathBuf,
    world: Arc<Mutex<FakeWorld>>,
    faults: Arc<TestFaults>,
    keep_backups: usize,
    cache_min_age: Duration,
}

const COMPONENT: &str = "svc";

impl Host {
    /// A host with the service deployed at version "v1": main binary plus a config file.
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let root = dir.path().join("opt");
        let deploy = root.join("svc-1");
        let packages = dir.path().join("packages");
        std::fs::create_dir_all(deploy.join("bin/svc/conf")).unwrap();
        std::fs::create_dir_all(&packages).unwrap();
        std::fs::write(deploy.join("bin/svc/svc"), "binary v1").unwrap();
        std::fs::write(deploy.join("bin/svc/conf/a.toml"), "conf v1").unwrap();
        let world = Arc::new(Mutex::new(FakeWorld {
            running: Some("binary v1".into()),
            ..FakeWorld::default()
        }));
        Host {
            _dir: dir,
            state,
            root,
            deploy,
            packages,
            world,
            faults: Arc::default(),
            keep_backups: 3,
            cache_min_age: crate::prune::DEFAULT_CACHE_MIN_AGE,
        }
    }

    fn spec(&self) -> ServiceSpec {
        toml::from_str(&format!(
            r#"
name = "svc"
component = "svc"
deploy_dir = "{}"
command = ["{{deploy_dir}}/bin/svc/svc"]
user = "root"
[health]
min_healthy = "1s"
timeout = "5s"
http = "http://127.0.0.1:1/health"
"#,
            self.deploy.display()
        ))
        .unwrap()
    }

    fn config(&self) -> EngineConfig {
        EngineConfig {
            state_dir: self.state.clone(),
            deploy_roots: vec![self.root.clone()],
            services: vec![self.spec()],
            keep_backups: self.keep_backups,
            package_limits: patchd_package::Limits::default(),
            cache_min_age: self.cache_min_age,
        }
    }

    /// A fresh engine over the same disk and the same (still running) fake service: an agent (re)start.
    async fn engine(&self) -> Result<Engine, ApplyError> {
        let world = self.world.clone();
        let effects = Effects {
            clock: Arc::new(FakeClock {
                base: Instant::now(),
                offset: Mutex::new(Duration::ZERO),
            }),
            probe: Arc::new(FakeProbe {
                world: self.world.clone(),
            }),
            faults: self.faults.clone(),
        };
        let factory: BackendFactory = Box::new(move |spec: &ServiceSpec, _state: &Path| {
            Ok(Arc::new(FakeBackend {
                binary: spec.binary_path(),
                world: world.clone(),
            }) as Arc<dyn ServiceBackend>)
        });
        Engine::start_with(self.config(), effects, factory).await
    }

    /// Builds a package with the given files (paths under the component dir) and puts it in the blob cache.
    fn package(&self, version: &str, files: &[(&str, &str)]) -> String {
        let src = self.packages.join(format!("src-{version}")).join(COMPONENT);
        for (path, content) in files {
            let at = src.join(path);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::fs::write(&at, content).unwrap();
        }
        let out = self.packages.join(format!("{version}.tar.gz"));
        let info = patchd_package::pack_dir(&src, version, &out).unwrap();
        let blobs = self.state.join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::copy(&out, blobs.join(&info.tree_digest)).unwrap();
        info.tree_digest
    }

    fn binary(&self) -> String {
        std::fs::read_to_string(self.deploy.join("bin/svc/svc")).unwrap()
    }

    fn conf(&self) -> String {
        std::fs::read_to_string(self.deploy.join("bin/svc/conf/a.toml")).unwrap()
    }

    fn running(&self) -> Option<String> {
        self.world.lock().unwrap().running.clone()
    }

    fn journal(&self) -> ServiceJournal {
        ServiceJournal::load(&ServiceJournal::path(&self.state, "svc")).unwrap()
    }

    /// No temporaries of ours left in the deploy dir.
    fn assert_no_temps(&self) {
        let mut stack = vec![self.deploy.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                assert!(
                    !name.contains(".patchd-"),
                    "leftover temporary {}",
                    entry.path().display()
                );
                if entry.file_type().unwrap().is_dir() {
                    stack.push(entry.path());
                }
            }
        }
    }
}

fn apply_cmd(digest: &str, patch_id: &str) -> ApplyCommand {
    ApplyCommand {
        service: "svc".into(),
        digest: digest.into(),
        patch_id: patch_id.into(),
        offline: false,
    }
}

const V2: &[(&str, &str)] = &[("svc", "binary v2"), ("conf/a.toml", "conf v2")];

#[tokio::test]
async fn stage_is_idempotent_and_checks_the_component() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    let first = engine.stage("svc", &digest).await.unwrap();
    assert!(!first.already_staged);
    assert_eq!(first.manifest.version, "v2");
    assert!(
        host.state
            .join("staging")
            .join(&digest)
            .join("files/svc/svc")
            .is_file()
    );
    let again = engine.stage("svc", &digest).await.unwrap();
    assert!(again.already_staged);

    let missing = "0".repeat(64);
    let err = engine.stage("svc", &missing).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(
        engine
            .stage("svc", "nothex")
            .await
            .unwrap_err()
            .to_string()
            .contains("hex")
    );
    assert!(
        engine
            .stage("nope", &digest)
            .await
            .unwrap_err()
            .to_string()
            .contains("this agent manages: svc")
    );

    // A corrupted cached blob is refused.
    let other = host.package("v3", &[("svc", "binary v3")]);
    std::fs::write(host.state.join("blobs").join(&other), b"garbage").unwrap();
    let err = engine.stage("svc", &other).await.unwrap_err().to_string();
    assert!(err.contains("does not match its digest"), "{err}");

    // A package of another component is refused.
    let src = host.packages.join("foreign/other");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("other"), "x").unwrap();
    let out = host.packages.join("other.tar.gz");
    let info = patchd_package::pack_dir(&src, "v1", &out).unwrap();
    std::fs::copy(&out, host.state.join("blobs").join(&info.tree_digest)).unwrap();
    let err = engine
        .stage("svc", &info.tree_digest)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("component"), "{err}");
}

#[tokio::test]
async fn apply_swaps_restarts_commits_and_replays() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "apply before stage: {err}");
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert!(!report.replayed);
    assert_eq!(host.binary(), "binary v2");
    assert_eq!(host.conf(), "conf v2");
    assert_eq!(host.running().as_deref(), Some("binary v2"));
    assert_eq!(
        report.result.binary_sha256,
        crate::fsutil::sha256_file(&host.deploy.join("bin/svc/svc")).unwrap()
    );
    // downtime ends when the service first answers, not when the 1 s min_healthy window ends
    assert!(
        report.result.downtime_ms < 1000,
        "{}",
        report.result.downtime_ms
    );
    let probation = report
        .result
        .steps
        .iter()
        .find(|(s, _)| s == "probation")
        .unwrap()
        .1;
    assert!(
        probation >= 1000,
        "probation lasts min_healthy: {probation}"
    );
    let steps: Vec<&str> = report
        .result
        .steps
        .iter()
        .map(|(s, _)| s.as_str())
        .collect();
    for step in ["prepare", "stop", "swap", "start", "probation"] {
        assert!(steps.contains(&step), "{steps:?}");
    }
    // old files are kept as the backup set
    let history = host.journal().history;
    let kept = history[0]
        .files
        .iter()
        .find(|f| f.rel == Path::new("bin/svc/svc"))
        .unwrap();
    let backup = kept.backup.as_ref().unwrap();
    assert!(
        backup.starts_with(host.state.join("backups/svc/p1")),
        "{}",
        backup.display()
    );
    assert_eq!(std::fs::read_to_string(backup).unwrap(), "binary v1");
    host.assert_no_temps();

    let again = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.result, report.result);
    assert_eq!(
        host.world.lock().unwrap().starts,
        1,
        "a replay must not restart"
    );

    let status = &engine.status(Some("svc")).await.unwrap()[0];
    assert_eq!(status.version, "v2");
    assert_eq!(status.runtime.state, RunState::Running);
    assert_eq!(
        status.binary_sha256.as_deref(),
        Some(report.result.binary_sha256.as_str())
    );
    assert_eq!(status.history.len(), 1);
    assert_eq!(status.last.as_ref().unwrap().patch_id, "p1");

    let other = host.package("v3", &[("svc", "binary v3")]);
    let err = engine
        .apply(apply_cmd(&other, "p1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already used"), "{err}");
}

#[tokio::test]
async fn a_staged_copy_edited_through_its_deployed_link_is_never_deployed() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    // An operator edits the deployed binary in place: it shares its inode with the staged copy.
    std::fs::write(host.deploy.join("bin/svc/svc"), "binary hacked").unwrap();
    let staged = host
        .state
        .join("staging")
        .join(&digest)
        .join("files/svc/svc");
    assert_eq!(std::fs::read_to_string(&staged).unwrap(), "binary hacked");
    let report = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
        })
        .await
        .unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    assert_eq!(host.binary(), "binary v1");

    // Applied without staging again: prepare sees the changed bytes and nothing live changes.
    let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Failed,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("stage the package again"),
        "{}",
        report.result.reason
    );
    assert_eq!(host.binary(), "binary v1");
    host.assert_no_temps();

    // Staging again notices the change and unpacks the blob anew.
    let again = engine.stage("svc", &digest).await.unwrap();
    assert!(!again.already_staged);
    assert_eq!(std::fs::read_to_string(&staged).unwrap(), "binary v2");
    let report = engine.apply(apply_cmd(&digest, "p3")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    assert_eq!(host.binary(), "binary v2");
    assert_eq!(
        report.result.binary_sha256,
        crate::fsutil::sha256_file(&host.deploy.join("bin/svc/svc")).unwrap()
    );
}

#[tokio::test]
async fn a_patch_id_still_in_the_history_or_the_backups_is_refused() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    drop(engine);
    // Many later applies pushed p1 out of the recent results; its history entry and backup are still kept.
    let path = ServiceJournal::path(&host.state, "svc");
    let mut journal = host.journal();
    journal.results.clear();
    journal.store(&path).unwrap();
    let backup = host.state.join("backups/svc/p1");
    assert!(backup.is_dir());

    let engine = host.engine().await.unwrap();
    let other = host.package("v3", &[("svc", "binary v3")]);
    engine.stage("svc", &other).await.unwrap();
    let err = engine.apply(apply_cmd(&other, "p1")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("\"p1\"") && message.contains("use a new patch id"),
        "{message}"
    );
    let err = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "p1".into(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("use a new patch id"), "{err}");
    assert_eq!(host.binary(), "binary v2");
    assert!(backup.is_dir());
    assert_eq!(host.journal().history.len(), 1);

    // A backup set without a history entry (e.g. one being deleted) still blocks its id.
    std::fs::create_dir_all(host.state.join("backups/svc/p9")).unwrap();
    let err = engine.apply(apply_cmd(&other, "p9")).await.unwrap_err();
    assert!(err.to_string().contains("backup set"), "{err}");
}

#[tokio::test]
async fn a_revert_leaves_a_service_that_was_stopped_stopped() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    // Stopped by its operator after the agent started.
    host.world.lock().unwrap().running = None;
    let digest = host.package("bad", &[("svc", "binary v2 crash")]);
    engine.stage("svc", &digest).await.unwrap();
    let starts_before = host.world.lock().unwrap().starts;
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    assert!(
        report.result.reason.contains("left stopped"),
        "{}",
        report.result.reason
    );
    assert_eq!(host.binary(), "binary v1");
    assert_eq!(host.running(), None);
    assert_eq!(
        host.world.lock().unwrap().starts - starts_before,
        1,
        "only the new version was started"
    );
    assert!(!host.journal().current.unwrap().was_running);
}

#[tokio::test]
async fn unchanged_files_are_not_touched() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v1b", &[("svc", "binary v1"), ("conf/a.toml", "conf v2")]);
    engine.stage("svc", &digest).await.unwrap();
    let before = std::fs::metadata(host.deploy.join("bin/svc/svc")).unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    let after = std::fs::metadata(host.deploy.join("bin/svc/svc")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        before.ino(),
        after.ino(),
        "an identical binary must not be replaced"
    );
    assert_eq!(host.conf(), "conf v2");
    let record = host.journal().current.unwrap();
    assert_eq!(record.files.len(), 1);
}

#[tokio::test]
async fn crashing_new_version_is_reverted() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package(
        "bad",
        &[
            ("svc", "binary v2 crash"),
            ("conf/a.toml", "conf v2"),
            ("extra", "new file"),
        ],
    );
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    assert!(
        report.result.reason.contains("exited with status 3"),
        "{}",
        report.result.reason
    );
    assert_eq!(report.result.log_tail, vec!["fake log line".to_string()]);
    assert_eq!(host.binary(), "binary v1");
    assert_eq!(host.conf(), "conf v1");
    assert!(
        !host.deploy.join("bin/svc/extra").exists(),
        "a file the patch added is removed on revert"
    );
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    assert!(
        !host.state.join("backups/svc/p1").exists(),
        "a reverted apply keeps no backup"
    );
    host.assert_no_temps();
    let status = &engine.status(None).await.unwrap()[0];
    assert_eq!(status.version, "");
    assert!(status.history.is_empty());
    assert_eq!(host.journal().current.unwrap().phase, ApplyPhase::Reverted);
}

#[tokio::test]
async fn failing_health_probe_is_reverted() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("sick", &[("svc", "binary v2 fail-health")]);
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    assert!(
        report.result.reason.contains("not healthy within 5s"),
        "{}",
        report.result.reason
    );
    assert!(
        report.result.reason.contains("status 500"),
        "{}",
        report.result.reason
    );
    assert_eq!(host.binary(), "binary v1");
    assert_eq!(host.running().as_deref(), Some("binary v1"));
}

#[tokio::test]
async fn offline_apply_swaps_without_restart() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let mut cmd = apply_cmd(&digest, "p1");
    cmd.offline = true;
    let report = engine.apply(cmd).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::OfflineSwapped);
    assert_eq!(host.binary(), "binary v2");
    let world = host.world.lock().unwrap();
    assert_eq!((world.starts, world.stops), (0, 0));
    assert_eq!(
        world.running.as_deref(),
        Some("binary v1"),
        "the running process is untouched"
    );
}

#[tokio::test]
async fn rollback_returns_to_earlier_versions_and_backups_are_pruned() {
    let mut host = Host::new();
    host.keep_backups = 2;
    let engine = host.engine().await.unwrap();
    let err = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r0".into(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing to roll back"), "{err}");
    for (i, version) in ["v2", "v3", "v4"].iter().enumerate() {
        let digest = host.package(
            version,
            &[
                ("svc", &format!("binary {version}")),
                (&format!("added-{version}"), "x"),
            ],
        );
        engine.stage("svc", &digest).await.unwrap();
        let report = engine
            .apply(apply_cmd(&digest, &format!("p{}", i + 2)))
            .await
            .unwrap();
        assert_eq!(report.result.outcome, Outcome::Committed);
    }
    assert_eq!(host.binary(), "binary v4");
    // keep_backups = 2: p2's backup was pruned
    assert!(!host.state.join("backups/svc/p2").exists());
    assert!(
        host.state.join("backups/svc/p3").exists() && host.state.join("backups/svc/p4").exists()
    );
    let err = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: Some("p2".into()),
            patch_id: "r1".into(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pruned"), "{err}");

    // undo the last one
    let report = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert_eq!(report.result.version, "v3");
    assert_eq!(host.binary(), "binary v3");
    assert!(!host.deploy.join("bin/svc/added-v4").exists());
    assert!(host.deploy.join("bin/svc/added-v3").exists());
    assert_eq!(host.running().as_deref(), Some("binary v3"));
    assert_eq!(engine.status(Some("svc")).await.unwrap()[0].version, "v3");
    let replay = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
        })
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(host.binary(), "binary v3");

    // back to before p3: that is p2's content
    let report = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: Some("p3".into()),
            patch_id: "r2".into(),
        })
        .await
        .unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    assert_eq!(host.binary(), "binary v2");
    assert!(!host.deploy.join("bin/svc/added-v3").exists());
    assert!(host.deploy.join("bin/svc/added-v2").exists());
    assert_eq!(engine.status(Some("svc")).await.unwrap()[0].version, "v2");
    assert!(
        !host.state.join("backups/svc/p3").exists() && !host.state.join("backups/svc/r2").exists()
    );
    host.assert_no_temps();
}

#[tokio::test]
async fn finished_applies_and_restarts_prune_what_nothing_needs() {
    let mut host = Host::new();
    host.keep_backups = 1;
    host.cache_min_age = Duration::ZERO;
    let engine = host.engine().await.unwrap();
    let v2 = host.package("v2", V2);
    let v3 = host.package("v3", &[("svc", "binary v3")]);
    let never_staged = host.package("v4", &[("svc", "binary v4")]);
    let blob = |d: &str| host.state.join("blobs").join(d);
    let staged = |d: &str| host.state.join("staging").join(d);

    engine.stage("svc", &v2).await.unwrap();
    let report = engine.apply(apply_cmd(&v2, "p2")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    // p2 is rollback history: its package stays; v3 was uploaded but not staged yet: with no minimum age it goes.
    assert!(blob(&v2).is_file() && staged(&v2).is_dir());
    assert!(!blob(&v3).exists() && !blob(&never_staged).exists());

    let v3 = host.package("v3", &[("svc", "binary v3")]);
    engine.stage("svc", &v3).await.unwrap();
    let report = engine.apply(apply_cmd(&v3, "p3")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    // keep_backups = 1: p2 left the rollback history, so its blob and staging went; p3's stay.
    assert!(!blob(&v2).exists() && !staged(&v2).exists());
    assert!(blob(&v3).is_file() && staged(&v3).is_dir());
    let report = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r3".into(),
        })
        .await
        .unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    assert_eq!(host.binary(), "binary v2");
    // Rolled back: nothing refers to v3 any more.
    assert!(!blob(&v3).exists() && !staged(&v3).exists());

    // At start, interrupted uploads go too.
    let partial = host.state.join("blobs/partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join(format!("{never_staged}.part")), "x").unwrap();
    drop(engine);
    let _engine = host.engine().await.unwrap();
    assert_eq!(std::fs::read_dir(&partial).unwrap().count(), 0);
}

#[tokio::test]
async fn failed_rollback_is_reverted_to_the_current_version() {
    let host = Host::new();
    // v1 on disk "crashes" when started again: make the original binary a crashing one
    std::fs::write(host.deploy.join("bin/svc/svc"), "binary v1 crash").unwrap();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    assert_eq!(
        engine
            .apply(apply_cmd(&digest, "p1"))
            .await
            .unwrap()
            .result
            .outcome,
        Outcome::Committed
    );
    let report = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
        })
        .await
        .unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    assert_eq!(host.binary(), "binary v2");
    assert_eq!(host.running().as_deref(), Some("binary v2"));
    assert_eq!(
        engine.status(Some("svc")).await.unwrap()[0].history.len(),
        1,
        "p1 can still be rolled back"
    );
    assert!(host.state.join("backups/svc/p1").exists());
}

/// Crash at every fault point (each file swap and revert step too), restart the engine, and check the
/// recovery rule: all-old unless committed, service running, journal final, replay reports the same result.
#[tokio::test]
async fn crash_at_every_fault_point_recovers_consistently() {
    let cases: Vec<(FaultPoint, u32, bool)> = vec![
        (FaultPoint::AfterPrepare, 1, false),
        (FaultPoint::AfterStop, 1, false),
        (FaultPoint::AfterSwap, 1, false),
        (FaultPoint::AfterSwap, 2, false),
        (FaultPoint::AfterStart, 1, false),
        (FaultPoint::DuringProbation, 1, false),
        (FaultPoint::DuringProbation, 3, false),
        (FaultPoint::BeforeCommit, 1, false),
        (FaultPoint::DuringRevert, 1, true),
        (FaultPoint::DuringRevert, 2, true),
        (FaultPoint::AfterBackup, 2, false),
        (FaultPoint::BeforeRestore, 1, true),
        (FaultPoint::BeforeRestore, 2, true),
    ];
    for (point, n, crashing) in cases {
        let host = Host::new();
        let engine = host.engine().await.unwrap();
        let binary = if crashing {
            "binary v2 crash"
        } else {
            "binary v2"
        };
        let digest = host.package("v2", &[("svc", binary), ("conf/a.toml", "conf v2")]);
        engine.stage("svc", &digest).await.unwrap();
        *host.faults.armed.lock().unwrap() = Some((point, n));
        let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
        assert!(matches!(err, ApplyError::Crash(_)), "{point:?}:{n}: {err}");
        drop(engine);
        let mixed = (host.binary().contains("v2"), host.conf().contains("v2"));
        let before_recovery = host.journal().current.unwrap().phase;
        assert!(
            !before_recovery.is_final(),
            "{point:?}:{n}: journal says {before_recovery:?}"
        );

        let engine = host.engine().await.unwrap();
        let journal = host.journal();
        let phase = journal.current.as_ref().unwrap().phase.clone();
        let expect_failed = matches!(point, FaultPoint::AfterPrepare | FaultPoint::AfterBackup);
        assert_eq!(
            phase,
            if expect_failed {
                ApplyPhase::Failed
            } else {
                ApplyPhase::Reverted
            },
            "{point:?}:{n} (files before recovery: {mixed:?})"
        );
        assert_eq!(
            (host.binary().as_str(), host.conf().as_str()),
            ("binary v1", "conf v1"),
            "{point:?}:{n}"
        );
        assert_eq!(
            host.running().as_deref(),
            Some("binary v1"),
            "{point:?}:{n}"
        );
        host.assert_no_temps();
        let recorded = journal.result_of("p1").unwrap().clone();
        let replay = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
        assert!(replay.replayed, "{point:?}:{n}");
        assert_eq!(replay.result, recorded);
        assert!(
            replay.result.reason.contains("agent restarted") || crashing,
            "{}",
            replay.result.reason
        );
        assert_eq!(
            host.binary(),
            "binary v1",
            "{point:?}:{n}: a replay changes nothing"
        );
        // A new patch id applies normally afterwards.
        if !crashing {
            let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
            assert_eq!(report.result.outcome, Outcome::Committed, "{point:?}:{n}");
            assert_eq!(host.binary(), "binary v2");
        }
        let leftovers: Vec<_> = std::fs::read_dir(host.state.join("backups/svc"))
            .unwrap()
            .collect();
        assert!(leftovers.len() <= 1, "{point:?}:{n}: {leftovers:?}");
    }
}

#[tokio::test]
async fn a_committed_journal_survives_restart_as_new() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    drop(engine);
    host.world.lock().unwrap().running = None; // the service died while the agent was down
    let engine = host.engine().await.unwrap();
    assert_eq!(host.binary(), "binary v2");
    assert_eq!(
        host.running().as_deref(),
        Some("binary v2"),
        "an agent-supervised service is started at agent start"
    );
    assert_eq!(engine.status(Some("svc")).await.unwrap()[0].version, "v2");
}

#[tokio::test]
async fn confinement_is_enforced_at_start_and_at_apply() {
    let host = Host::new();
    let mut config = host.config();
    config.services[0].deploy_dir = host.state.join("elsewhere");
    let world = host.world.clone();
    let factory: BackendFactory = Box::new(move |spec: &ServiceSpec, _state: &Path| {
        Ok(Arc::new(FakeBackend {
            binary: spec.binary_path(),
            world: world.clone(),
        }) as Arc<dyn ServiceBackend>)
    });
    let effects = Effects {
        clock: Arc::new(crate::effects::SystemClock),
        probe: Arc::new(FakeProbe {
            world: host.world.clone(),
        }),
        faults: Arc::new(crate::effects::NoFaults),
    };
    let err = Engine::start_with(config, effects, factory)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not under any deploy root"), "{err}");

    // A directory of the deploy dir replaced by a symlink to outside the roots: apply is refused, nothing written.
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let outside = host.state.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::remove_dir_all(host.deploy.join("bin/svc/conf")).unwrap();
    std::os::unix::fs::symlink(&outside, host.deploy.join("bin/svc/conf")).unwrap();
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    assert_eq!(host.binary(), "binary v1");
}

#[test]
fn spec_defaults_and_validation() {
    let host = Host::new();
    let spec = host.spec();
    assert_eq!(spec.binary_path(), host.deploy.join("bin/svc/svc"));
    assert_eq!(
        spec.resolved_command(),
        vec![format!("{}/bin/svc/svc", host.deploy.display())]
    );
    assert!(spec.validate(std::slice::from_ref(&host.root)).is_ok());
    let mut bad = spec.clone();
    bad.command.clear();
    assert!(
        bad.validate(std::slice::from_ref(&host.root))
            .unwrap_err()
            .to_string()
            .contains("needs `command`")
    );
    let mut bad = spec.clone();
    bad.name = "../x".into();
    assert!(bad.validate(std::slice::from_ref(&host.root)).is_err());
    let mut bad = spec;
    bad.health.tcp = Some("nowhere".into());
    assert!(
        bad.validate(std::slice::from_ref(&host.root))
            .unwrap_err()
            .to_string()
            .contains("ip:port")
    );
}

/// Every file below `dir` (symlinks not followed) with its bytes, owner and mode: what must not change.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32, u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        let meta = std::fs::symlink_metadata(&at).unwrap();
        let bytes = if meta.is_file() {
            std::fs::read(&at).unwrap()
        } else {
            Vec::new()
        };
        out.push((at.clone(), bytes, meta.uid(), meta.gid(), meta.mode()));
        if meta.is_dir() {
            for entry in std::fs::read_dir(&at).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

impl Host {
    /// A directory outside every deploy root holding one file, as an attacker's symlink target.
    fn outside(&self) -> PathBuf {
        let outside = self._dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("extra.conf"), "outside, must stay\n").unwrap();
        outside
    }

    fn race(&self, point: FaultPoint, n: u32, to: &Path) {
        *self.faults.symlink_to.lock().unwrap() = Some(to.to_path_buf());
        *self.faults.armed.lock().unwrap() = Some((point, n));
    }
}

/// v2 plus `plugins/extra.conf`: a new file in a directory the apply creates.
const V2_ADDING: &[(&str, &str)] = &[
    ("svc", "binary v2"),
    ("conf/a.toml", "conf v2"),
    ("plugins/extra.conf", "added in v2"),
];

#[tokio::test]
async fn a_created_directory_swapped_for_a_symlink_is_not_written_through() {
    let host = Host::new();
    let outside = host.outside();
    let before = snapshot(&outside);
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2_ADDING);
    engine.stage("svc", &digest).await.unwrap();
    host.race(FaultPoint::AfterCreateDir, 1, &outside);
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Failed,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("symlink"),
        "{}",
        report.result.reason
    );
    assert_eq!(
        snapshot(&outside),
        before,
        "nothing outside the deploy root changes"
    );
    assert_eq!(
        (host.binary().as_str(), host.conf().as_str()),
        ("binary v1", "conf v1")
    );
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    // The symlink the attacker left is neither followed nor removed by the clean-up.
    assert!(
        std::fs::symlink_metadata(host.deploy.join("bin/svc/plugins"))
            .unwrap()
            .is_symlink()
    );
    host.assert_no_temps();
}

#[tokio::test]
async fn a_backup_swapped_for_a_symlink_is_refused_before_anything_live_changes() {
    let host = Host::new();
    let outside = host.outside();
    let before = snapshot(&outside);
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    host.race(FaultPoint::AfterBackup, 1, &outside.join("extra.conf"));
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Failed,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("backed up"),
        "{}",
        report.result.reason
    );
    assert_eq!(snapshot(&outside), before);
    assert_eq!(
        (host.binary().as_str(), host.conf().as_str()),
        ("binary v1", "conf v1")
    );
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    host.assert_no_temps();
}

#[tokio::test]
async fn a_directory_swapped_for_a_symlink_during_a_revert_is_not_followed() {
    let host = Host::new();
    let outside = host.outside();
    let before = snapshot(&outside);
    let engine = host.engine().await.unwrap();
    let digest = host.package(
        "v2",
        &[
            ("svc", "binary v2 crash"),
            ("conf/a.toml", "conf v2"),
            ("plugins/extra.conf", "added in v2"),
        ],
    );
    engine.stage("svc", &digest).await.unwrap();
    // Files are restored in plan order (conf/a.toml, plugins/extra.conf, svc): the second one's directory is
    // swapped just before its new file is removed, which a path-based removal would do in `outside`.
    host.race(FaultPoint::BeforeRestore, 2, &outside);
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    let result = report.result;
    assert_eq!(result.outcome, Outcome::Reverted, "{result:?}");
    assert!(
        result
            .reason
            .contains("restoring bin/svc/plugins/extra.conf failed"),
        "{}",
        result.reason
    );
    assert_eq!(
        snapshot(&outside),
        before,
        "nothing outside the deploy root changes"
    );
    assert_eq!(
        (host.binary().as_str(), host.conf().as_str()),
        ("binary v1", "conf v1")
    );
    assert_eq!(
        host.running().as_deref(),
        Some("binary v1"),
        "the old version runs again"
    );
}

#[tokio::test]
async fn a_tampered_backup_is_not_restored_and_the_revert_says_so() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    *host.faults.armed.lock().unwrap() = Some((FaultPoint::AfterSwap, 2));
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert!(matches!(err, ApplyError::Crash(_)), "{err}");
    drop(engine);
    // While the agent is down, someone rewrites the backup of the config file.
    let current = host.journal().current.unwrap();
    let conf_change = current
        .files
        .iter()
        .find(|f| f.rel.ends_with("conf/a.toml"))
        .unwrap();
    std::fs::write(conf_change.backup.as_ref().unwrap(), "conf evil").unwrap();

    let _engine = host.engine().await.unwrap();
    let result = host.journal().result_of("p1").unwrap().clone();
    assert_eq!(result.outcome, Outcome::Reverted, "{result:?}");
    assert!(
        result
            .reason
            .contains("restoring bin/svc/conf/a.toml failed")
            && result.reason.contains("tampered"),
        "{}",
        result.reason
    );
    assert_eq!(
        host.conf(),
        "conf v2",
        "a tampered backup is never put in place"
    );
    assert_eq!(host.binary(), "binary v1", "the good backups are restored");
    assert_eq!(host.running().as_deref(), Some("binary v1"));
}

#[tokio::test]
async fn new_files_are_owned_as_the_files_they_replace_or_their_directory() {
    use std::os::unix::fs::MetadataExt;
    let host = Host::new();
    let owner_of = |rel: &str| {
        let meta = std::fs::symlink_metadata(host.deploy.join(rel)).unwrap();
        (meta.uid(), meta.gid())
    };
    let nobody = (65534, 65534);
    std::os::unix::fs::chown(
        host.deploy.join("bin/svc/conf/a.toml"),
        Some(nobody.0),
        Some(nobody.1),
    )
    .unwrap();
    std::os::unix::fs::chown(host.deploy.join("bin/svc"), Some(nobody.0), Some(nobody.1)).unwrap();
    let root_owned = owner_of("bin/svc/svc");
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2_ADDING);
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert_eq!(host.conf(), "conf v2");
    assert_eq!(
        owner_of("bin/svc/conf/a.toml"),
        nobody,
        "owned as the file it replaced"
    );
    assert_eq!(
        owner_of("bin/svc/svc"),
        root_owned,
        "owned as the file it replaced"
    );
    assert_eq!(
        owner_of("bin/svc/plugins"),
        nobody,
        "a new directory is owned as its parent"
    );
    assert_eq!(
        owner_of("bin/svc/plugins/extra.conf"),
        nobody,
        "a new file as its directory"
    );
    // The staged copy keeps its own owner: the deployed file is a copy, not a link to it.
    let staged = crate::stage::StagedPaths::new(&host.state, &digest).files();
    let staged_meta = std::fs::metadata(staged.join("svc/conf/a.toml")).unwrap();
    assert_ne!((staged_meta.uid(), staged_meta.gid()), nobody);

    // A rollback puts the old file back with its old owner.
    let report = engine
        .rollback(RollbackCommand {
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert_eq!(host.conf(), "conf v1");
    assert_eq!(owner_of("bin/svc/conf/a.toml"), nobody);
}

#[tokio::test]
async fn a_file_rewritten_in_place_with_its_mtime_restored_is_shown_and_repaired() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    let binary = host.deploy.join("bin/svc/svc");
    let good = crate::fsutil::sha256_file(&binary).unwrap();
    // Whatever the status path has cached for the deployed binary now, it is exactly this file.
    engine.inner_hashes_for_tests().remember(&binary, &good);
    assert_eq!(
        engine.status(Some("svc")).await.unwrap()[0]
            .binary_sha256
            .as_deref(),
        Some(good.as_str())
    );

    let mtime = std::fs::metadata(&binary).unwrap().modified().unwrap();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&binary)
            .unwrap();
        file.write_all(b"binary X2").unwrap(); // same size, in place: same inode
        file.set_modified(mtime).unwrap();
    }
    let evil = crate::fsutil::sha256_file(&binary).unwrap();
    assert_ne!(evil, good);
    assert_eq!(
        engine.status(Some("svc")).await.unwrap()[0]
            .binary_sha256
            .as_deref(),
        Some(evil.as_str()),
        "status shows the real sha256"
    );
    // The next patch of the same package repairs it.
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert_eq!(host.binary(), "binary v2");
}

/// Fault isolation: a journal that cannot be read quarantines its service instead of stopping the engine; the
/// service is left as it is, reported, and Apply and Rollback are refused with what to do.
#[tokio::test]
async fn an_unreadable_journal_quarantines_its_service_instead_of_failing_the_start() {
    for garbage in ["bytes", "directory"] {
        let host = Host::new();
        let engine = host.engine().await.unwrap();
        let digest = host.package("v2", V2);
        engine.stage("svc", &digest).await.unwrap();
        engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
        drop(engine);
        let journal = ServiceJournal::path(&host.state, "svc");
        std::fs::remove_file(&journal).unwrap();
        if garbage == "bytes" {
            std::fs::write(&journal, b"{\"current\": garbage").unwrap();
        } else {
            std::fs::create_dir(&journal).unwrap();
        }
        host.world.lock().unwrap().running = None;

        let engine = host.engine().await.unwrap();
        let status = &engine.status(Some("svc")).await.unwrap()[0];
        let reason = status.quarantine.clone().expect("quarantined");
        assert!(
            reason.contains(&journal.display().to_string()) && reason.contains("refuses Apply"),
            "{garbage}: {reason}"
        );
        assert!(reason.contains("move it aside"), "{garbage}: {reason}");
        assert_eq!(
            host.running(),
            None,
            "{garbage}: a quarantined service is not started"
        );
        assert!(
            host.state.join("backups/svc/p1").is_dir(),
            "{garbage}: backups of a quarantined service are untouched"
        );
        let err = engine.apply(apply_cmd(&digest, "p2")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert!(err.to_string().contains("quarantined"), "{err}");
        let err = engine
            .rollback(RollbackCommand {
                service: "svc".into(),
                to_patch_id: None,
                patch_id: "r1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert_eq!(host.binary(), "binary v2", "{garbage}: nothing changed");
    }
}

/// Following the corrupt-journal advice (move it aside) keeps every backup set: sets the journal does not know
/// are moved to `<state>/quarantine/<service>/` and listed, never deleted; sets the journal knows as finished
/// with are still deleted.
#[tokio::test]
async fn backup_sets_unknown_to_the_journal_are_moved_aside_and_listed() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let crashing = host.package("v2c", &[("svc", "binary v2 crash")]);
    engine.stage("svc", &crashing).await.unwrap();
    let report = engine.apply(apply_cmd(&crashing, "p0")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    let backup = host.state.join("backups/svc/p1");
    let before: Vec<String> = std::fs::read_dir(&backup)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!before.is_empty());
    // A leftover of a crash between the final journal write and the delete, for a patch id the journal knows.
    let reverted = host.state.join("backups/svc/p0");
    std::fs::create_dir_all(&reverted).unwrap();
    drop(engine);
    let engine = host.engine().await.unwrap();
    assert!(
        !reverted.exists(),
        "a set the journal knows as finished with is deleted"
    );
    assert!(backup.is_dir());
    drop(engine);
    let journal = ServiceJournal::path(&host.state, "svc");
    std::fs::rename(&journal, journal.with_extension("json.bad")).unwrap();

    let engine = host.engine().await.unwrap();
    let kept = host.state.join("quarantine/svc/p1");
    let after: Vec<String> = std::fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(before.len(), after.len());
    assert!(!backup.exists());
    let status = &engine.status(Some("svc")).await.unwrap()[0];
    assert_eq!(status.quarantined_backups, vec![kept.clone()]);
    assert!(status.quarantine.is_none(), "a new journal is not a fault");
    // The service takes patches again, even under the same patch id (its old set is kept aside).
    let v3 = host.package("v3", &[("svc", "binary v3")]);
    engine.stage("svc", &v3).await.unwrap();
    let report = engine.apply(apply_cmd(&v3, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    drop(engine);
    let engine = host.engine().await.unwrap();
    assert!(
        host.state.join("backups/svc/p1").is_dir(),
        "referenced: kept in place"
    );
    assert_eq!(
        engine.status(Some("svc")).await.unwrap()[0].quarantined_backups,
        vec![kept]
    );
}

/// Recovery restores and starts the service even when no journal write succeeds; the journal on disk still shows
/// the apply unfinished, so the next start (with a writable journal) restores the same backups again and
/// finishes it.
#[tokio::test]
async fn recovery_restores_and_starts_even_when_the_journal_cannot_be_written() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    *host.faults.armed.lock().unwrap() = Some((FaultPoint::AfterSwap, 1));
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert!(matches!(err, ApplyError::Crash(_)), "{err}");
    drop(engine);
    // Every journal write of this service now fails: its temporary name is taken by a directory.
    let journal = ServiceJournal::path(&host.state, "svc");
    let blocker = crate::fsutil::sibling_temp(&journal, "tmp");
    std::fs::create_dir(&blocker).unwrap();

    let engine = host.engine().await.unwrap();
    assert_eq!(
        (host.binary().as_str(), host.conf().as_str()),
        ("binary v1", "conf v1")
    );
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    let status = &engine.status(Some("svc")).await.unwrap()[0];
    let reason = status.quarantine.clone().expect("quarantined");
    assert!(reason.contains("next start"), "{reason}");
    let on_disk = host.journal().current.unwrap().phase;
    assert!(!on_disk.is_final(), "{on_disk:?}");
    assert!(
        host.state.join("backups/svc/p1").is_dir(),
        "the backups the next start needs are kept"
    );
    let err = engine.apply(apply_cmd(&digest, "p2")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    drop(engine);

    std::fs::remove_dir(&blocker).unwrap();
    let engine = host.engine().await.unwrap();
    assert_eq!(host.journal().current.unwrap().phase, ApplyPhase::Reverted);
    assert_eq!(host.binary(), "binary v1");
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    assert!(
        engine.status(Some("svc")).await.unwrap()[0]
            .quarantine
            .is_none()
    );
    assert!(!host.state.join("backups/svc/p1").exists());
    let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
}

/// A journal write that fails during an apply quarantines the service: nothing live changed, the failure is
/// reported, and later Applies are refused until the agent restarts and reads the journal on disk again.
#[tokio::test]
async fn a_failed_journal_write_during_an_apply_quarantines_the_service_until_restart() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let journal = ServiceJournal::path(&host.state, "svc");
    let blocker = crate::fsutil::sibling_temp(&journal, "tmp");
    std::fs::create_dir(&blocker).unwrap();
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert!(matches!(err, ApplyError::Journal(_)), "{err}");
    assert_eq!(host.binary(), "binary v1", "nothing live changed");
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    let reason = engine.status(Some("svc")).await.unwrap()[0]
        .quarantine
        .clone()
        .expect("quarantined");
    assert!(
        reason.contains("cannot be written") && reason.contains("restart patchd"),
        "{reason}"
    );
    std::fs::remove_dir(&blocker).unwrap();
    let err = engine.apply(apply_cmd(&digest, "p2")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    drop(engine);

    let engine = host.engine().await.unwrap();
    assert!(
        engine.status(Some("svc")).await.unwrap()[0]
            .quarantine
            .is_none()
    );
    let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
}
