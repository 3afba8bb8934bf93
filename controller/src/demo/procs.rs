//! DEMO ONLY: the processes of the demo: the record of the agents `demo up` started (`demo.json`), the service pid
//! files the agents write (`<state_dir>/run/<service>.pid`), and stopping exactly those processes by pid.
//!
//! A pid alone may have been reused by an unrelated process since it was recorded, so every process is identified
//! by its pid plus its start time since boot (field 22 of `/proc/<pid>/stat`); a process whose start time differs
//! is left alone.

use super::DemoError;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Format of `demo.json`.
pub const RECORD_FORMAT: u32 = 1;

/// A process as recorded: pid and start time since boot (guards against pid reuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks after boot).
    pub start_ticks: u64,
}

impl ProcessIdentity {
    /// The identity of a live process, if it exists.
    pub fn of(pid: u32) -> Option<ProcessIdentity> {
        proc_start_ticks(pid).map(|start_ticks| ProcessIdentity { pid, start_ticks })
    }

    /// True while the recorded process runs (same pid, same start time, not a zombie).
    pub fn is_alive(&self) -> bool {
        proc_start_ticks(self.pid) == Some(self.start_ticks)
    }

    /// Stops the process: SIGTERM (to its process group when `group`), then SIGKILL after `grace`.
    /// Returns how it ended; a process that is not (or no longer) the recorded one is never signalled.
    pub async fn stop(&self, group: bool, grace: Duration) -> StopOutcome {
        if !self.is_alive() {
            return StopOutcome::NotRunning;
        }
        self.signal(group, Signal::SIGTERM);
        if self.wait_gone(grace).await {
            return StopOutcome::Terminated;
        }
        if self.is_alive() {
            self.signal(group, Signal::SIGKILL);
        }
        if self.wait_gone(Duration::from_secs(5)).await {
            StopOutcome::Killed
        } else {
            StopOutcome::StillRunning
        }
    }

    fn signal(&self, group: bool, signal: Signal) {
        let Ok(raw) = i32::try_from(self.pid) else {
            return;
        };
        let pid = Pid::from_raw(raw);
        // The process backend starts each service as the leader of its own process group: signalling the group
        // also reaches anything the service started. Fall back to the process when it leads no group.
        if group && killpg(pid, signal).is_ok() {
            return;
        }
        let _ = kill(pid, signal);
    }

    async fn wait_gone(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if !self.is_alive() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How [`ProcessIdentity::stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Not running (already gone, or the pid now belongs to another process).
    NotRunning,
    /// Exited after SIGTERM.
    Terminated,
    /// Needed SIGKILL.
    Killed,
    /// Still there after SIGKILL (should not happen; reported).
    StillRunning,
}

/// Start time of a live, non-zombie process (field 22 of `/proc/<pid>/stat`).
pub fn proc_start_ticks(pid: u32) -> Option<u64> {
    patchd_procstat::ProcStat::read(pid)
        .filter(patchd_procstat::ProcStat::is_running)
        .map(|stat| stat.start_ticks)
}

/// One agent `demo up` started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Host number k (`127.0.1.k`).
    pub index: usize,
    /// `ip:port` the agent listens on.
    pub addr: String,
    #[serde(flatten)]
    pub process: ProcessIdentity,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

/// `demo.json`: the settings of the running demo and the agents it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoRecord {
    pub format: u32,
    pub nodes: usize,
    pub agent_port: u16,
    /// First three octets of the hosts' addresses.
    #[serde(default = "default_hosts_prefix")]
    pub hosts_prefix: String,
    /// Unix time of `demo up`.
    pub started_unix: u64,
    pub agents: Vec<AgentRecord>,
    /// `demo up --containers`: the workers run as containers labelled with the demo directory.
    #[serde(default)]
    pub containers: bool,
}

fn default_hosts_prefix() -> String {
    super::layout::DEFAULT_HOSTS_PREFIX.to_string()
}

impl DemoRecord {
    /// Reads `path`; `Ok(None)` when there is no record.
    pub fn load(path: &Path) -> Result<Option<DemoRecord>, DemoError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DemoError::io("cannot read", path, e)),
        };
        let record: DemoRecord =
            serde_json::from_slice(&bytes).map_err(|e| DemoError::BadRecord {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        if record.format != RECORD_FORMAT {
            return Err(DemoError::BadRecord {
                path: path.to_path_buf(),
                message: format!("format {} is not {RECORD_FORMAT}", record.format),
            });
        }
        Ok(Some(record))
    }

    /// Writes `path` atomically (temporary file, rename).
    pub fn save(&self, path: &Path) -> Result<(), DemoError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| DemoError::Render {
            what: "demo.json",
            message: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).map_err(|e| DemoError::io("cannot write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| DemoError::io("cannot write", path, e))
    }

    /// Agents of the record that still run.
    pub fn live_agents(&self) -> Vec<&AgentRecord> {
        self.agents
            .iter()
            .filter(|agent| agent.process.is_alive())
            .collect()
    }
}

/// A service process found through an agent's pid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceProcess {
    /// The pid file (`<state_dir>/run/<service>.pid`).
    pub pid_file: PathBuf,
    pub service: String,
    pub process: ProcessIdentity,
}

/// What the process backend writes in a pid file (only the fields the demo needs).
#[derive(Debug, Deserialize)]
struct PidFile {
    pid: u32,
    proc_start_ticks: u64,
}

/// Service processes named by the pid files under `<state_dir>/run/` (unreadable or foreign files are skipped).
pub fn service_processes(state_dir: &Path) -> Vec<ServiceProcess> {
    let run_dir = state_dir.join("run");
    let Ok(entries) = std::fs::read_dir(&run_dir) else {
        return Vec::new();
    };
    let mut found: Vec<ServiceProcess> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "pid"))
        .filter_map(|pid_file| {
            let record: PidFile = serde_json::from_slice(&std::fs::read(&pid_file).ok()?).ok()?;
            let service = pid_file.file_stem()?.to_string_lossy().into_owned();
            let process = ProcessIdentity {
                pid: record.pid,
                start_ticks: record.proc_start_ticks,
            };
            Some(ServiceProcess {
                pid_file,
                service,
                process,
            })
        })
        .collect();
    found.sort_by(|a, b| a.pid_file.cmp(&b.pid_file));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn identifies_and_stops_only_the_recorded_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let identity = ProcessIdentity::of(child.id()).unwrap();
        assert!(identity.is_alive());
        let impostor = ProcessIdentity {
            pid: identity.pid,
            start_ticks: identity.start_ticks + 1,
        };
        assert!(!impostor.is_alive());
        assert_eq!(
            impostor.stop(false, Duration::from_secs(1)).await,
            StopOutcome::NotRunning
        );
        assert!(
            identity.is_alive(),
            "a different start time is another process: left alone"
        );

        let reaper = std::thread::spawn(move || child.wait());
        assert_eq!(
            identity.stop(false, Duration::from_secs(10)).await,
            StopOutcome::Terminated
        );
        assert!(!reaper.join().unwrap().unwrap().success());
        assert!(!identity.is_alive());
    }

    #[test]
    fn reads_service_pid_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        let body = serde_json::json!({"pid": me.pid, "proc_start_ticks": me.start_ticks, "argv": ["x"], "started_unix_ms": 1});
        std::fs::write(dir.path().join("run/demo-worker.pid"), body.to_string()).unwrap();
        std::fs::write(dir.path().join("run/garbage.pid"), "not json").unwrap();
        let found = service_processes(dir.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].service, "demo-worker");
        assert_eq!(found[0].process, me);
        assert!(service_processes(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.json");
        assert_eq!(DemoRecord::load(&path).unwrap(), None);
        let record = DemoRecord {
            containers: false,
            format: RECORD_FORMAT,
            nodes: 4,
            agent_port: 7480,
            hosts_prefix: "127.0.1".into(),
            started_unix: 1,
            agents: vec![AgentRecord {
                index: 1,
                addr: "127.0.1.1:7480".into(),
                process: ProcessIdentity {
                    pid: 1,
                    start_ticks: 2,
                },
                config: "/c".into(),
                state_dir: "/s".into(),
                log: "/l".into(),
            }],
        };
        record.save(&path).unwrap();
        assert_eq!(DemoRecord::load(&path).unwrap(), Some(record));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            DemoRecord::load(&path),
            Err(DemoError::BadRecord { .. })
        ));
    }
}
