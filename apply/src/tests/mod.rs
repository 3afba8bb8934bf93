//! Engine tests with in-memory fakes for the service, clock, probe and faults, and real files in temporary
//! directories. The fake service "runs" whatever bytes its main binary holds when it is started: a binary whose
//! content mentions `crash` dies at once, `fail-health` fails its probe.
//!
//! This file holds the fakes and the `Host` harness; the tests are grouped by what they exercise.

mod apply;
mod confinement;
mod container;
mod prestage;
mod recovery;

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
        caller: String::new(),
        service: "svc".into(),
        digest: digest.into(),
        patch_id: patch_id.into(),
        offline: false,
        env_add: Vec::new(),
    }
}

const V2: &[(&str, &str)] = &[("svc", "binary v2"), ("conf/a.toml", "conf v2")];

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
