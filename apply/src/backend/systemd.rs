//! The `systemd` backend: a unit driven with `systemctl start|stop|show` and read with `journalctl`.
//! systemd owns supervision (`Restart=`), the stop timeout and the logs; the backend only observes.

use super::{BackendError, RunState, ServiceBackend, ServiceRuntime};
use crate::spec::ServiceSpec;
use async_trait::async_trait;
use std::collections::HashMap;
use std::time::Duration;

/// Limit for `systemctl start|stop` (systemd's own TimeoutStopSec applies inside it).
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for read-only commands.
const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// The `systemd` backend of one service.
#[derive(Debug, Clone)]
pub struct SystemdBackend {
    unit: String,
    service: String,
}

impl SystemdBackend {
    pub fn new(spec: &ServiceSpec) -> Result<Self, BackendError> {
        let unit = spec.unit.clone().filter(|u| !u.is_empty()).ok_or_else(|| {
            BackendError::Misconfigured {
                service: spec.name.clone(),
                what: "unit",
            }
        })?;
        Ok(SystemdBackend {
            unit,
            service: spec.name.clone(),
        })
    }

    /// The unit's properties relevant to status and probation.
    pub async fn show(&self) -> Result<HashMap<String, String>, BackendError> {
        let out = run(
            "systemctl",
            &[
                "show",
                &self.unit,
                "--property=MainPID,ActiveState,SubState,ExecMainStartTimestampMonotonic,ExecMainCode,ExecMainStatus,NRestarts,Result",
            ],
            QUERY_TIMEOUT,
        )
        .await?;
        Ok(parse_properties(&out))
    }
}

/// `KEY=value` lines into a map.
fn parse_properties(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Runs a command, returns stdout; a non-zero exit is an error with stderr.
async fn run(program: &str, args: &[&str], limit: Duration) -> Result<String, BackendError> {
    let shown = format!("{program} {}", args.join(" "));
    let output = tokio::time::timeout(
        limit,
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| BackendError::CommandTimeout {
        command: shown.clone(),
        seconds: limit.as_secs(),
    })?
    .map_err(|source| BackendError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(BackendError::Command {
            command: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Seconds since boot on the monotonic clock systemd's `*Monotonic` timestamps use.
fn monotonic_micros() -> Option<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let secs = u64::try_from(now.tv_sec()).ok()?;
    let nanos = u64::try_from(now.tv_nsec()).ok()?;
    Some(secs * 1_000_000 + nanos / 1_000)
}

/// The runtime view of `systemctl show` properties.
fn runtime_from(props: &HashMap<String, String>) -> ServiceRuntime {
    let active = props.get("ActiveState").map(String::as_str).unwrap_or("");
    let pid = props
        .get("MainPID")
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|p| *p != 0);
    let start_us = props
        .get("ExecMainStartTimestampMonotonic")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v != 0);
    let sub = props.get("SubState").map(String::as_str).unwrap_or("");
    let state = match active {
        // the main process died and systemd waits to restart it: a crash, whatever Restart= does next
        "activating" if sub == "auto-restart" => RunState::Failed,
        "active" | "reloading" => RunState::Running,
        "activating" => RunState::Starting,
        "inactive" | "deactivating" => RunState::Stopped,
        "failed" => RunState::Failed,
        _ => RunState::Unknown,
    };
    let uptime_seconds = match (state, start_us, monotonic_micros()) {
        (RunState::Running, Some(start), Some(now)) => Some(now.saturating_sub(start) / 1_000_000),
        _ => None,
    };
    let last_exit = match (
        props.get("ExecMainCode").map(String::as_str),
        props.get("ExecMainStatus"),
    ) {
        // CLD_EXITED = 1, CLD_KILLED = 2, CLD_DUMPED = 3
        (Some("1"), Some(status)) => Some(format!("exited with status {status}")),
        (Some("2"), Some(signal)) => Some(format!("killed by signal {}", signal_name(signal))),
        (Some("3"), Some(signal)) => Some(format!("dumped core on signal {}", signal_name(signal))),
        _ => None,
    };
    let instance = match (pid, start_us) {
        (Some(pid), Some(start)) => Some(format!(
            "{pid}@{start}#{}",
            props.get("NRestarts").map(String::as_str).unwrap_or("0")
        )),
        _ => None,
    };
    ServiceRuntime {
        state,
        pid,
        uptime_seconds,
        instance,
        last_exit,
    }
}

fn signal_name(number: &str) -> String {
    number
        .parse::<i32>()
        .ok()
        .and_then(|n| nix::sys::signal::Signal::try_from(n).ok())
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|| number.to_string())
}

#[async_trait]
impl ServiceBackend for SystemdBackend {
    async fn start(&self) -> Result<(), BackendError> {
        // A unit that crash-looped may have hit its start limit; an explicit start clears that first.
        if let Err(e) = run("systemctl", &["reset-failed", &self.unit], QUERY_TIMEOUT).await {
            tracing::debug!(service = %self.service, "systemctl reset-failed: {e}");
        }
        run("systemctl", &["start", &self.unit], SYSTEMCTL_TIMEOUT)
            .await
            .map(drop)
    }

    async fn stop(&self) -> Result<(), BackendError> {
        run("systemctl", &["stop", &self.unit], SYSTEMCTL_TIMEOUT)
            .await
            .map(drop)
    }

    async fn status(&self) -> Result<ServiceRuntime, BackendError> {
        Ok(runtime_from(&self.show().await?))
    }

    async fn log_tail(&self, lines: usize) -> Vec<String> {
        let count = lines.to_string();
        match run(
            "journalctl",
            &["-u", &self.unit, "-n", &count, "--no-pager", "-o", "cat"],
            QUERY_TIMEOUT,
        )
        .await
        {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(e) => {
                tracing::debug!(service = %self.service, "journalctl: {e}");
                Vec::new()
            }
        }
    }

    fn set_auto_restart(&self, _enabled: bool) {
        // systemd's Restart= stays in charge; probation notices a restart by the changed MainPID/NRestarts.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_output_maps_to_runtime() {
        let props = parse_properties(
            "MainPID=0\nActiveState=failed\nSubState=failed\nExecMainStartTimestampMonotonic=123\nExecMainCode=1\nExecMainStatus=3\nNRestarts=2\nResult=exit-code\n",
        );
        let rt = runtime_from(&props);
        assert_eq!(rt.state, RunState::Failed);
        assert_eq!(rt.pid, None);
        assert_eq!(rt.last_exit.as_deref(), Some("exited with status 3"));

        let props = parse_properties(
            "MainPID=42\nActiveState=active\nExecMainStartTimestampMonotonic=1\nExecMainCode=0\nNRestarts=0\n",
        );
        let rt = runtime_from(&props);
        assert_eq!(rt.state, RunState::Running);
        assert_eq!(rt.pid, Some(42));
        assert_eq!(rt.instance.as_deref(), Some("42@1#0"));
        assert!(rt.uptime_seconds.is_some());

        let rt = runtime_from(&parse_properties(
            "MainPID=0\nActiveState=activating\nSubState=auto-restart\nExecMainCode=1\nExecMainStatus=3\n",
        ));
        assert_eq!(rt.state, RunState::Failed);

        let rt = runtime_from(&parse_properties(
            "MainPID=0\nActiveState=inactive\nExecMainCode=2\nExecMainStatus=9\n",
        ));
        assert_eq!(rt.last_exit.as_deref(), Some("killed by signal SIGKILL"));
    }
}
