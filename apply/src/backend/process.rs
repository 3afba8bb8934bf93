//! The `process` backend: the agent spawns the service's command itself, in its own process group (so it
//! survives an agent restart and signals to the agent's group), as the service's `user`/`group` with no
//! supplementary groups, appends its stdout and stderr to `<state>/logs/<service>.log` (rotated by size),
//! records it in `<state>/run/<service>.pid`, restarts it on crash with backoff, and stops it with SIGTERM, then
//! SIGKILL after `stop_timeout`. When the agent starts and the pid file names a live process whose start time and
//! command line match, that process is adopted instead of starting a second copy.

use super::{BackendError, RunState, ServiceBackend, ServiceRuntime, tail_file};
use crate::fsutil::{self, IoContext};
use crate::spec::{RunAs, ServiceSpec};
use async_trait::async_trait;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use patchd_procstat::ProcStat;
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// First restart delay after a crash; doubles per crash in a row.
const RESTART_BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest restart delay.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A run at least this long resets the backoff.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// How often an adopted process (not our child, so no exit notification) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(100);
/// After SIGKILL, how long to wait for the process to disappear.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How often the log file's size is checked against `log_max_bytes`.
const LOG_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// What `<state>/run/<service>.pid` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PidRecord {
    pid: u32,
    /// Field 22 of /proc/<pid>/stat: guards against pid reuse.
    proc_start_ticks: u64,
    argv: Vec<String>,
    started_unix_ms: u64,
}

#[derive(Debug, Clone)]
struct Running {
    pid: u32,
    generation: u64,
    started: SystemTime,
    /// Not our child (adopted after an agent restart): its exit is seen by polling /proc, not by `wait`.
    adopted: bool,
}

#[derive(Debug, Default)]
struct State {
    running: Option<Running>,
    generation: u64,
    last_exit: Option<String>,
    auto_restart: bool,
    stopping: bool,
    crashes_in_a_row: u32,
}

/// The `process` backend of one service.
#[derive(Debug, Clone)]
pub struct ProcessBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    spec: ServiceSpec,
    /// Resolved once at open: a user deleted later fails loudly at the next agent start, not at a restart.
    run_as: Option<RunAs>,
    log_path: PathBuf,
    /// The log rotation task runs (started with the first run or adoption, which happen inside the runtime).
    rotating: AtomicBool,
    pid_path: PathBuf,
    state: Mutex<State>,
    exited: Notify,
}

impl ProcessBackend {
    /// Sets the backend up and adopts the process named by the pid file when it is still ours and alive.
    /// Does not start anything.
    pub fn open(spec: ServiceSpec, state_dir: &Path) -> Result<Self, BackendError> {
        if spec.command.is_empty() {
            return Err(BackendError::Misconfigured {
                service: spec.name.clone(),
                what: "command",
            });
        }
        let run_as = spec.check_run_settings()?;
        let log_path = state_dir.join("logs").join(format!("{}.log", spec.name));
        let pid_path = state_dir.join("run").join(format!("{}.pid", spec.name));
        let auto_restart = spec.restart_on_crash;
        let backend = ProcessBackend {
            inner: Arc::new(Inner {
                spec,
                run_as,
                rotating: AtomicBool::new(false),
                log_path,
                pid_path,
                state: Mutex::new(State {
                    auto_restart,
                    ..State::default()
                }),
                exited: Notify::new(),
            }),
        };
        backend.adopt_from_pid_file();
        Ok(backend)
    }

    /// The log file of the service.
    pub fn log_path(&self) -> &Path {
        &self.inner.log_path
    }

    /// The pid file of the service.
    pub fn pid_path(&self) -> &Path {
        &self.inner.pid_path
    }

    fn adopt_from_pid_file(&self) {
        let Ok(bytes) = std::fs::read(&self.inner.pid_path) else {
            return;
        };
        let Ok(record) = serde_json::from_slice::<PidRecord>(&bytes) else {
            return;
        };
        // pid + start time identify a process since boot (and survive an exec by a wrapper script); the
        // command line is the fallback when the start time could not be recorded.
        let alive_and_ours = ProcStat::read(record.pid).is_some_and(|stat| {
            stat.state != 'Z'
                && if record.proc_start_ticks != 0 {
                    stat.start_ticks == record.proc_start_ticks
                } else {
                    proc_cmdline(record.pid).is_some_and(|argv| argv == record.argv)
                }
        });
        if !alive_and_ours {
            tracing::info!(service = %self.inner.spec.name, pid = record.pid, "pid file names no live process of ours; not adopting");
            let _ = fsutil::remove_if_exists(&self.inner.pid_path);
            return;
        }
        let generation = {
            let mut state = lock(&self.inner.state);
            state.generation += 1;
            state.running = Some(Running {
                pid: record.pid,
                generation: state.generation,
                started: UNIX_EPOCH + Duration::from_millis(record.started_unix_ms),
                adopted: true,
            });
            state.generation
        };
        tracing::info!(service = %self.inner.spec.name, pid = record.pid, "adopted the running service process");
        self.inner.start_log_rotation();
        let inner = self.inner.clone();
        tokio::spawn(watch_adopted(inner, record.pid, generation));
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A poisoned lock only means another task panicked mid-update; the state is still the best we have.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    /// Starts the task that keeps the log file under `log_max_bytes`, once. It holds only a weak reference, so it
    /// ends with the backend; the service itself keeps writing to its inherited descriptor meanwhile.
    fn start_log_rotation(self: &Arc<Self>) {
        if self.rotating.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(rotate_logs_periodically(weak));
    }

    /// Launches the command. Caller checked that nothing runs.
    fn spawn(self: &Arc<Self>) -> Result<(), BackendError> {
        let argv = self.spec.resolved_command();
        let Some((program, args)) = argv.split_first() else {
            return Err(BackendError::Misconfigured {
                service: self.spec.name.clone(),
                what: "command",
            });
        };
        let log_dir = fsutil::parent_of(&self.log_path)?;
        std::fs::create_dir_all(log_dir).ctx("create directory", log_dir)?;
        if let Err(e) = rotate_log_if_needed(
            &self.log_path,
            self.spec.log_max_bytes(),
            self.spec.log_keep(),
        ) {
            tracing::warn!(service = %self.spec.name, "cannot rotate the log: {e}");
        }
        self.start_log_rotation();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .ctx("open log", &self.log_path)?;
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now());
        let identity = self
            .run_as
            .map(|id| format!(" as uid {} gid {}", id.uid, id.gid))
            .unwrap_or_default();
        let _ = writeln!(
            log,
            "--- patchd {stamp}: starting{identity} {}",
            argv.join(" ")
        );
        let stderr = log.try_clone().ctx("open log", &self.log_path)?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .envs(&self.spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            // Own process group: the service outlives the agent and is not hit by signals sent to the agent's group.
            .process_group(0)
            .kill_on_drop(false);
        if let Some(run_as) = self.run_as {
            // std does setgid, then setgroups([]) (clears the agent's supplementary groups: a uid change alone would
            // keep root's groups), then setuid, in the child before exec; a failure fails the spawn.
            command.uid(run_as.uid).gid(run_as.gid);
        }
        if self.spec.deploy_dir.is_dir() {
            command.current_dir(&self.spec.deploy_dir);
        }
        let mut child = command.spawn().map_err(|source| BackendError::Spawn {
            command: argv.join(" "),
            source,
        })?;
        let Some(pid) = child.id() else {
            return Err(BackendError::Spawn {
                command: argv.join(" "),
                source: std::io::Error::other("the process exited before its pid could be read"),
            });
        };
        let started = SystemTime::now();
        let record = PidRecord {
            pid,
            proc_start_ticks: patchd_procstat::start_ticks(pid).unwrap_or(0),
            argv,
            started_unix_ms: started
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let generation = {
            let mut state = lock(&self.state);
            state.generation += 1;
            state.running = Some(Running {
                pid,
                generation: state.generation,
                started,
                adopted: false,
            });
            state.generation
        };
        if let Ok(bytes) = serde_json::to_vec(&record)
            && let Err(e) = fsutil::write_atomic(&self.pid_path, &bytes)
        {
            tracing::warn!(service = %self.spec.name, "cannot write the pid file: {e}");
        }
        let inner = self.clone();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => format!("exit status unknown: {e}"),
            };
            inner.on_exit(generation, exit);
        });
        Ok(())
    }

    /// Records the end of run `generation` and schedules a restart when that is the policy.
    fn on_exit(self: &Arc<Self>, generation: u64, exit: String) {
        let restart_delay = {
            let mut state = lock(&self.state);
            let Some(running) = state.running.clone().filter(|r| r.generation == generation) else {
                return;
            };
            state.running = None;
            state.last_exit = Some(exit.clone());
            let ran_for = SystemTime::now()
                .duration_since(running.started)
                .unwrap_or_default();
            if ran_for >= STABLE_RUN {
                state.crashes_in_a_row = 0;
            }
            let restart = !state.stopping && state.auto_restart && self.spec.restart_on_crash;
            if restart {
                state.crashes_in_a_row = state.crashes_in_a_row.saturating_add(1);
            }
            restart.then(|| backoff(state.crashes_in_a_row))
        };
        let _ = fsutil::remove_if_exists(&self.pid_path);
        self.exited.notify_waiters();
        if let Some(delay) = restart_delay {
            tracing::warn!(service = %self.spec.name, "service {exit}; restarting in {delay:?}");
            let inner = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let still_wanted = {
                    let state = lock(&inner.state);
                    state.running.is_none() && !state.stopping && state.auto_restart
                };
                if still_wanted && let Err(e) = inner.spawn() {
                    tracing::error!(service = %inner.spec.name, "restart failed: {e}");
                }
            });
        } else {
            tracing::info!(service = %self.spec.name, "service {exit}");
        }
    }

    fn current(&self) -> Option<Running> {
        lock(&self.state).running.clone()
    }

    /// Waits until run `generation` is over or `limit` passes; true when it is over.
    async fn wait_gone(self: &Arc<Self>, pid: u32, generation: u64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.exited.notified();
            let Some(adopted) = lock(&self.state)
                .running
                .as_ref()
                .filter(|r| r.generation == generation)
                .map(|r| r.adopted)
            else {
                return true;
            };
            // An adopted process is not our child: look at /proc directly rather than wait for the poller.
            // (A child of ours is reaped by its waiter, which reports the real exit status.)
            if adopted && !pid_alive(pid) {
                self.on_exit(
                    generation,
                    "exited (status unknown: not a child of this agent)".into(),
                );
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), notified).await;
        }
    }
}

/// Checks the log file's size every [`LOG_CHECK_INTERVAL`] until the backend is dropped.
async fn rotate_logs_periodically(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(LOG_CHECK_INTERVAL).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let (path, max, keep, name) = (
            strong.log_path.clone(),
            strong.spec.log_max_bytes(),
            strong.spec.log_keep(),
            strong.spec.name.clone(),
        );
        drop(strong);
        let rotated =
            tokio::task::spawn_blocking(move || rotate_log_if_needed(&path, max, keep)).await;
        match rotated {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(service = %name, "cannot rotate the log: {e}"),
            Err(e) => tracing::warn!(service = %name, "log rotation task failed: {e}"),
        }
    }
}

/// When the log file is larger than `max_bytes`: shifts `<log>.1`… up by one (dropping the oldest past `keep`),
/// copies the log to `<log>.1` and truncates it in place. Copy-and-truncate rather than rename: the service
/// holds the file open (append mode, so its next write lands at the new end) and may have been started by an
/// earlier agent, so it cannot be told to reopen. Lines written between the copy and the truncation are lost.
fn rotate_log_if_needed(
    log_path: &Path,
    max_bytes: u64,
    keep: u32,
) -> Result<(), crate::fsutil::FsError> {
    let len = match std::fs::metadata(log_path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("stat log", log_path),
    };
    if len <= max_bytes {
        return Ok(());
    }
    let rotated = |n: u32| {
        let mut name = log_path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if keep > 0 {
        fsutil::remove_if_exists(&rotated(keep))?;
        for n in (1..keep).rev() {
            let from = rotated(n);
            match std::fs::rename(&from, rotated(n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx("rename log", &from),
            }
        }
        let newest = rotated(1);
        let mut partial = newest.as_os_str().to_owned();
        partial.push(".tmp");
        let partial = PathBuf::from(partial);
        std::fs::copy(log_path, &partial).ctx("copy log", &partial)?;
        std::fs::rename(&partial, &newest).ctx("rename log", &partial)?;
    }
    OpenOptions::new()
        .write(true)
        .open(log_path)
        .and_then(|file| file.set_len(0))
        .ctx("truncate log", log_path)?;
    Ok(())
}

/// Polls an adopted process until it is gone, then reports its exit.
async fn watch_adopted(inner: Arc<Inner>, pid: u32, generation: u64) {
    loop {
        tokio::time::sleep(ADOPTED_POLL).await;
        let ours = inner.current().is_some_and(|r| r.generation == generation);
        if !ours {
            return;
        }
        if !pid_alive(pid) {
            inner.on_exit(
                generation,
                "exited (status unknown: not a child of this agent)".into(),
            );
            return;
        }
    }
}

fn backoff(crashes_in_a_row: u32) -> Duration {
    let factor = 1u32 << crashes_in_a_row.saturating_sub(1).min(8);
    (RESTART_BACKOFF_START * factor).min(RESTART_BACKOFF_MAX)
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(signal) = status.signal() {
        let name = Signal::try_from(signal)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| signal.to_string());
        format!("killed by signal {name}")
    } else {
        format!("ended: {status}")
    }
}

fn proc_cmdline(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect(),
    )
}

/// Alive and not a zombie.
fn pid_alive(pid: u32) -> bool {
    patchd_procstat::is_running(pid)
}

/// Sends `signal` to the service's process group when it leads one (it does when we started it), else to the pid.
fn signal_service(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let leads_group = ProcStat::read(pid).is_some_and(|s| s.pgrp == pid);
    let result = if leads_group {
        killpg(Pid::from_raw(raw), signal)
    } else {
        kill(Pid::from_raw(raw), signal)
    };
    if let Err(e) = result {
        tracing::debug!(pid, "signal {signal}: {e}");
    }
}

#[async_trait]
impl ServiceBackend for ProcessBackend {
    async fn start(&self) -> Result<(), BackendError> {
        {
            let mut state = lock(&self.inner.state);
            state.stopping = false;
            if state.running.as_ref().is_some_and(|r| pid_alive(r.pid)) {
                return Ok(());
            }
        }
        self.inner.spawn()
    }

    async fn stop(&self) -> Result<(), BackendError> {
        lock(&self.inner.state).stopping = true;
        let Some(running) = self.inner.current() else {
            return Ok(());
        };
        signal_service(running.pid, Signal::SIGTERM);
        if self
            .inner
            .wait_gone(
                running.pid,
                running.generation,
                self.inner.spec.stop_timeout(),
            )
            .await
        {
            return Ok(());
        }
        tracing::warn!(service = %self.inner.spec.name, pid = running.pid, "still running after stop_timeout; sending SIGKILL");
        signal_service(running.pid, Signal::SIGKILL);
        if self
            .inner
            .wait_gone(running.pid, running.generation, KILL_GRACE)
            .await
        {
            Ok(())
        } else {
            Err(BackendError::Unkillable { pid: running.pid })
        }
    }

    async fn status(&self) -> Result<ServiceRuntime, BackendError> {
        let state = lock(&self.inner.state);
        Ok(match &state.running {
            Some(running) => ServiceRuntime {
                state: RunState::Running,
                pid: Some(running.pid),
                uptime_seconds: Some(
                    SystemTime::now()
                        .duration_since(running.started)
                        .unwrap_or_default()
                        .as_secs(),
                ),
                instance: Some(format!("{}#{}", running.pid, running.generation)),
                last_exit: state.last_exit.clone(),
            },
            None => ServiceRuntime {
                state: if state.last_exit.is_some() && !state.stopping {
                    RunState::Failed
                } else {
                    RunState::Stopped
                },
                pid: None,
                uptime_seconds: None,
                instance: None,
                last_exit: state.last_exit.clone(),
            },
        })
    }

    async fn log_tail(&self, lines: usize) -> Vec<String> {
        let path = self.inner.log_path.clone();
        tokio::task::spawn_blocking(move || tail_file(&path, lines))
            .await
            .unwrap_or_default()
    }

    fn set_auto_restart(&self, enabled: bool) {
        lock(&self.inner.state).auto_restart = enabled;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ServiceSpec;

    fn spec(name: &str, deploy: &Path, command: &[&str]) -> ServiceSpec {
        // The test's own user: running as it needs no privilege.
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap()
            .name;
        let text = format!(
            "name = {name:?}\ncomponent = \"c\"\ndeploy_dir = {:?}\ncommand = {:?}\nstop_timeout = \"500ms\"\nuser = {me:?}\n",
            deploy.display().to_string(),
            command
        );
        toml::from_str(&text).unwrap()
    }

    #[tokio::test]
    async fn start_stop_and_adopt_after_backend_restart() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(
            "sleeper",
            dir.path(),
            &["/bin/sh", "-c", "echo hello; exec sleep 30"],
        );
        let backend = ProcessBackend::open(spec.clone(), dir.path()).unwrap();
        backend.start().await.unwrap();
        let first = backend.status().await.unwrap();
        assert_eq!(first.state, RunState::Running);
        let pid = first.pid.unwrap();

        // A second backend (the agent restarted) adopts the same process instead of starting another.
        let again = ProcessBackend::open(spec, dir.path()).unwrap();
        let adopted = again.status().await.unwrap();
        assert_eq!(adopted.pid, Some(pid));
        again.start().await.unwrap();
        assert_eq!(again.status().await.unwrap().pid, Some(pid));

        // The shell may not have run `echo` yet on a loaded machine: wait for its line before stopping it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !again.log_tail(5).await.iter().any(|l| l == "hello") {
            assert!(
                std::time::Instant::now() < deadline,
                "the service never printed its line"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        again.stop().await.unwrap();
        assert!(!pid_alive(pid));
        assert_eq!(again.status().await.unwrap().state, RunState::Stopped);
        assert!(!again.pid_path().exists());
        let tail = again.log_tail(5).await;
        assert!(tail.iter().any(|l| l == "hello"), "{tail:?}");
    }

    #[tokio::test]
    async fn sigterm_ignored_means_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(
            "stubborn",
            dir.path(),
            &[
                "/bin/sh",
                "-c",
                "trap '' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        );
        let backend = ProcessBackend::open(spec, dir.path()).unwrap();
        backend.start().await.unwrap();
        // let the trap be installed (a loaded machine may take a while to run the shell)
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !backend.log_tail(1).await.iter().any(|l| l == "ready") {
            assert!(
                std::time::Instant::now() < deadline,
                "the service never installed its trap"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = backend.status().await.unwrap().pid.unwrap();
        backend.stop().await.unwrap();
        assert!(!pid_alive(pid));
        assert_eq!(
            backend.status().await.unwrap().last_exit.as_deref(),
            Some("killed by signal SIGKILL")
        );
    }

    #[tokio::test]
    async fn crash_is_restarted_unless_auto_restart_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("runs");
        let script = format!("echo run >> {}; exit 3", marker.display());
        let spec = spec("crasher", dir.path(), &["/bin/sh", "-c", &script]);
        let backend = ProcessBackend::open(spec, dir.path()).unwrap();
        backend.start().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&marker)
            .map(|s| s.lines().count())
            .unwrap_or(0)
            < 2
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no restart after a crash"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        backend.set_auto_restart(false);
        backend.stop().await.unwrap();
        let status = backend.status().await.unwrap();
        assert_ne!(status.state, RunState::Running);
        assert_eq!(status.last_exit.as_deref(), Some("exited with status 3"));
    }

    #[test]
    fn a_log_past_its_bound_is_copied_to_dot_1_truncated_and_old_files_shift() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("svc.log");
        let dot = |n: u32| dir.path().join(format!("svc.log.{n}"));
        std::fs::write(&log, vec![b'a'; 100]).unwrap();
        rotate_log_if_needed(&log, 100, 2).unwrap();
        assert_eq!(
            std::fs::metadata(&log).unwrap().len(),
            100,
            "at the bound: kept"
        );
        assert!(!dot(1).exists());

        for (round, byte) in [b'b', b'c', b'd'].into_iter().enumerate() {
            std::fs::write(&log, vec![byte; 101 + round]).unwrap();
            rotate_log_if_needed(&log, 100, 2).unwrap();
            assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
            assert_eq!(std::fs::read(dot(1)).unwrap(), vec![byte; 101 + round]);
        }
        assert_eq!(std::fs::read(dot(2)).unwrap(), vec![b'c'; 102]);
        assert!(!dot(3).exists(), "only log_keep old files are kept");

        std::fs::write(&log, vec![b'e'; 200]).unwrap();
        rotate_log_if_needed(&log, 100, 0).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(
            std::fs::read(dot(1)).unwrap(),
            vec![b'd'; 103],
            "keep 0 copies nothing"
        );
    }

    #[test]
    fn a_process_service_without_user_or_with_an_unknown_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut no_user = spec("nouser", dir.path(), &["/bin/true"]);
        no_user.user = None;
        let err = ProcessBackend::open(no_user, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs `user`") && err.contains("user = \"root\""),
            "{err}"
        );
        let mut unknown = spec("ghost", dir.path(), &["/bin/true"]);
        unknown.user = Some("patchd-no-such-user".into());
        let err = ProcessBackend::open(unknown, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"patchd-no-such-user\" does not exist"),
            "{err}"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), RESTART_BACKOFF_START);
        assert_eq!(backoff(2), RESTART_BACKOFF_START * 2);
        assert_eq!(backoff(50), RESTART_BACKOFF_MAX);
    }
}
