//! Host effects the engine uses besides files and service control, each behind a small trait so the engine is
//! unit-tested with fakes: the clock, the health probe, and the fault-injection hook.

use crate::spec::HealthSpec;
use async_trait::async_trait;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Time: monotonic instants for durations, wall clock for records, and sleeping.
#[async_trait]
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Instant;
    fn unix_now(&self) -> i64;
    async fn sleep(&self, duration: Duration);
}

/// The real clock (tokio timers).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_now(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

/// Checks whether a started service answers its configured probes.
#[async_trait]
pub trait HealthProbe: Send + Sync + std::fmt::Debug {
    /// `Ok` when every configured probe (HTTP 2xx, TCP accept) passes; a service with no probe passes.
    /// `Err` carries a human-readable reason.
    async fn check(&self, health: &HealthSpec) -> Result<(), String>;
}

/// Probes over the loopback/host network: HTTP GET with reqwest, TCP connect with tokio.
#[derive(Debug, Clone)]
pub struct NetProbe {
    client: reqwest::Client,
}

/// Per-attempt limit of one probe.
const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

impl NetProbe {
    pub fn new() -> Result<Self, String> {
        // reqwest's rustls backend (on in the workspace for the controller's https hooks) uses the process's crypto
        // provider: ring, as everywhere in patchd (a no-op when one is installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Probes speak plain http to the host's own service: no root store, so building the client does not depend on
        // the platform's CA bundle (absent in a minimal root such as an nspawn machine or a scratch container).
        let client = reqwest::Client::builder()
            .tls_certs_only(std::iter::empty())
            .timeout(PROBE_ATTEMPT_TIMEOUT)
            .connect_timeout(PROBE_ATTEMPT_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the HTTP health client: {e}"))?;
        Ok(NetProbe { client })
    }
}

#[async_trait]
impl HealthProbe for NetProbe {
    async fn check(&self, health: &HealthSpec) -> Result<(), String> {
        if let Some(addr) = &health.tcp {
            match tokio::time::timeout(
                PROBE_ATTEMPT_TIMEOUT,
                tokio::net::TcpStream::connect(addr.as_str()),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("tcp probe {addr}: {e}")),
                Err(_) => {
                    return Err(format!(
                        "tcp probe {addr}: no answer within {PROBE_ATTEMPT_TIMEOUT:?}"
                    ));
                }
            }
        }
        if let Some(url) = &health.http {
            let response = self
                .client
                .get(url)
                .send()
                .await
                .map_err(|e| format!("http probe {url}: {e}"))?;
            let status = response.status();
            if !status.is_success() {
                let body = probe_body_start(response).await;
                let body: String = body.chars().take(200).collect();
                return Err(format!(
                    "http probe {url}: status {status}: {}",
                    body.trim()
                ));
            }
        }
        Ok(())
    }
}

/// The first bytes of a failing probe's body, for the error message: a service may answer with an endless or
/// huge body, so at most [`PROBE_BODY_MAX`] bytes are read.
async fn probe_body_start(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < PROBE_BODY_MAX {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(PROBE_BODY_MAX);
    String::from_utf8_lossy(&body).into_owned()
}

/// How much of a failing probe's body is read.
const PROBE_BODY_MAX: usize = 256;

/// The steps of an apply where a crash can be injected (tests only; see `fault-injection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Backups and temporaries written, before anything live changes.
    AfterPrepare,
    /// The service was stopped, no file swapped yet.
    AfterStop,
    /// One more file was renamed into place (the n-th hit is the n-th file).
    AfterSwap,
    /// The new version was started.
    AfterStart,
    /// Inside the probation loop.
    DuringProbation,
    /// Probation passed (or the offline swap finished), not yet committed.
    BeforeCommit,
    /// One more file was restored during a revert.
    DuringRevert,
    /// A directory the apply needs was just created (and checked), before anything is written into it.
    AfterCreateDir,
    /// One more backup was written, before it is checked.
    AfterBackup,
    /// A revert is about to restore one more file (the path is its directory).
    BeforeRestore,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 10] = [
        FaultPoint::AfterPrepare,
        FaultPoint::AfterStop,
        FaultPoint::AfterSwap,
        FaultPoint::AfterStart,
        FaultPoint::DuringProbation,
        FaultPoint::BeforeCommit,
        FaultPoint::DuringRevert,
        FaultPoint::AfterCreateDir,
        FaultPoint::AfterBackup,
        FaultPoint::BeforeRestore,
    ];

    /// The name used in `PATCHD_FAULT=<name>[:n]`.
    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::AfterPrepare => "after-prepare",
            FaultPoint::AfterStop => "after-stop",
            FaultPoint::AfterSwap => "after-swap",
            FaultPoint::AfterStart => "after-start",
            FaultPoint::DuringProbation => "during-probation",
            FaultPoint::BeforeCommit => "before-commit",
            FaultPoint::DuringRevert => "during-revert",
            FaultPoint::AfterCreateDir => "after-create-dir",
            FaultPoint::AfterBackup => "after-backup",
            FaultPoint::BeforeRestore => "before-restore",
        }
    }

    pub fn from_name(name: &str) -> Option<FaultPoint> {
        FaultPoint::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// Called by the engine at every fault point. Production: does nothing. `fault-injection` builds: kills the
/// process when `PATCHD_FAULT` names the point. Unit tests: returns `Err` to simulate a crash right there.
pub trait FaultHook: Send + Sync + std::fmt::Debug {
    fn hit(&self, point: FaultPoint) -> Result<(), SimulatedCrash>;

    /// A point about the file or directory at `path`: a hook may act on it there (the symlink race of
    /// `PATCHD_FAULT_SYMLINK_TO`) instead of crashing.
    fn hit_at(&self, point: FaultPoint, _path: &std::path::Path) -> Result<(), SimulatedCrash> {
        self.hit(point)
    }
}

/// A crash simulated by a test hook: the engine stops right where it is, doing nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("simulated crash at fault point {}", .0.name())]
pub struct SimulatedCrash(pub FaultPoint);

/// The production hook: no faults.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFaults;

impl FaultHook for NoFaults {
    fn hit(&self, _point: FaultPoint) -> Result<(), SimulatedCrash> {
        Ok(())
    }
}

/// The default hook of this build: [`EnvFaults`] with `fault-injection`, [`NoFaults`] without.
pub fn default_fault_hook() -> std::sync::Arc<dyn FaultHook> {
    #[cfg(feature = "fault-injection")]
    {
        std::sync::Arc::new(EnvFaults::from_env())
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        std::sync::Arc::new(NoFaults)
    }
}

#[cfg(feature = "fault-injection")]
pub use env_faults::EnvFaults;

#[cfg(feature = "fault-injection")]
mod env_faults {
    use super::{FaultHook, FaultPoint, SimulatedCrash};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Kills the agent (SIGKILL to itself, as `kill -9` would) at the n-th hit of the point named by
    /// `PATCHD_FAULT=<point>[:n]` (n defaults to 1). With `PATCHD_FAULT_SYMLINK_TO=<dir>` as well, a point about a
    /// path plays a local attacker instead: it moves that file or directory aside and puts a symlink to `<dir>`
    /// in its place, and the agent goes on.
    #[derive(Debug)]
    pub struct EnvFaults {
        armed: Option<(FaultPoint, u64)>,
        symlink_to: Option<PathBuf>,
        hits: AtomicU64,
    }

    impl EnvFaults {
        pub fn from_env() -> Self {
            let armed = std::env::var("PATCHD_FAULT")
                .ok()
                .and_then(|spec| Self::parse(&spec));
            let symlink_to = std::env::var_os("PATCHD_FAULT_SYMLINK_TO").map(PathBuf::from);
            if let Some((point, n)) = armed {
                eprintln!("patchd: fault injection armed: {}:{n}", point.name());
            }
            EnvFaults {
                armed,
                symlink_to,
                hits: AtomicU64::new(0),
            }
        }

        fn parse(spec: &str) -> Option<(FaultPoint, u64)> {
            let (name, count) = match spec.split_once(':') {
                Some((name, n)) => (name, n.trim().parse().ok()?),
                None => (spec, 1),
            };
            Some((FaultPoint::from_name(name.trim())?, count))
        }

        /// True at the armed hit of `point`.
        fn fires(&self, point: FaultPoint) -> bool {
            let Some((armed, n)) = self.armed else {
                return false;
            };
            armed == point && self.hits.fetch_add(1, Ordering::SeqCst) + 1 == n
        }

        fn crash(point: FaultPoint) -> ! {
            eprintln!("patchd: injected crash at {}", point.name());
            let _ =
                nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
            std::process::abort();
        }
    }

    impl FaultHook for EnvFaults {
        fn hit(&self, point: FaultPoint) -> Result<(), SimulatedCrash> {
            if self.fires(point) {
                Self::crash(point);
            }
            Ok(())
        }

        fn hit_at(&self, point: FaultPoint, path: &Path) -> Result<(), SimulatedCrash> {
            if !self.fires(point) {
                return Ok(());
            }
            let Some(to) = &self.symlink_to else {
                Self::crash(point);
            };
            let mut aside = path.as_os_str().to_owned();
            aside.push(".displaced-by-fault");
            let swapped =
                std::fs::rename(path, &aside).and_then(|()| std::os::unix::fs::symlink(to, path));
            eprintln!(
                "patchd: injected symlink race at {}: {} -> {} ({swapped:?})",
                point.name(),
                path.display(),
                to.display()
            );
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_point_and_count() {
            assert_eq!(
                EnvFaults::parse("after-swap:2"),
                Some((FaultPoint::AfterSwap, 2))
            );
            assert_eq!(
                EnvFaults::parse("before-commit"),
                Some((FaultPoint::BeforeCommit, 1))
            );
            assert_eq!(EnvFaults::parse("nope"), None);
        }
    }
}
