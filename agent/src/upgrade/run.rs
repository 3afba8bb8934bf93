//! Running a declared action on the host: `execve` of the rendered argv (no shell), an environment of `PATH`
//! and the action's declared `env` only, its own process group so a timeout kills the action and everything it
//! started. Standard output is captured up to [`STDOUT_CAP`] or streamed into a file (a dump); standard error's
//! tail is kept for the answer.

use super::error::UpgradeError;
use std::collections::BTreeMap;
use std::fs::File;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Standard output returned in the answer, at most.
pub const STDOUT_CAP: usize = 64 * 1024;
/// Standard error kept (its last bytes), at most.
pub const STDERR_TAIL_BYTES: usize = 4 * 1024;
/// `PATH` when the agent itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A finished action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    /// The exit code, or 128 + the signal that ended it.
    pub exit_code: i32,
    /// Captured standard output (empty when it went to a file).
    pub stdout: Vec<u8>,
    /// The last lines of standard error.
    pub stderr_tail: String,
}

/// Where an action's standard streams go.
#[derive(Debug, Default)]
pub struct Streams {
    /// Fed to standard input (else `/dev/null`).
    pub stdin: Option<File>,
    /// Standard output written here (else captured up to [`STDOUT_CAP`]).
    pub stdout: Option<File>,
}

/// Runs `argv` (already rendered) as action `name`, killed with its process group after `timeout`.
pub async fn run_host(
    name: &str,
    argv: &[String],
    env: &BTreeMap<String, String>,
    streams: Streams,
    timeout: Duration,
) -> Result<Finished, UpgradeError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(UpgradeError::Internal(format!(
            "action `{name}` has an empty argv"
        )));
    };
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    let capture = streams.stdout.is_none();
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", path)
        .envs(env)
        .stdin(streams.stdin.map_or_else(Stdio::null, Stdio::from))
        .stdout(streams.stdout.map_or_else(Stdio::piped, Stdio::from))
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| {
        UpgradeError::Precondition(format!(
            "action `{name}`: cannot start `{program}`: {e}; fix its argv in patchd.toml [[upgrade.action]] or \
             install the program"
        ))
    })?;
    let pid = child.id();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let work = async {
        let (out, err, status) = tokio::join!(
            read_capped(stdout, STDOUT_CAP),
            read_tail(stderr, STDERR_TAIL_BYTES),
            child.wait()
        );
        (out, err, status)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok((out, err, status)) => {
            let status = status.map_err(|e| {
                UpgradeError::Internal(format!("waiting for action `{name}` failed: {e}"))
            })?;
            Ok(Finished {
                exit_code: exit_code(status),
                stdout: if capture { out } else { Vec::new() },
                stderr_tail: tail_lines(&err),
            })
        }
        Err(_) => {
            if let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()) {
                // The whole group: a shell script's children must not outlive the step.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            Err(UpgradeError::Timeout(format!(
                "action `{name}` did not finish within {} and was killed; raise its `timeout` in patchd.toml if \
                 it needs longer",
                humantime::format_duration(timeout)
            )))
        }
    }
}

/// The code a shell would report: the exit status, or 128 + the signal.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Reads everything, keeping the first `cap` bytes (the rest is drained so the writer never blocks).
async fn read_capped(stream: Option<impl AsyncRead + Unpin>, cap: usize) -> Vec<u8> {
    read_keeping(stream, |kept, chunk| {
        let room = cap.saturating_sub(kept.len()).min(chunk.len());
        kept.extend_from_slice(&chunk[..room]);
    })
    .await
}

/// Reads everything, keeping the last `cap` bytes.
async fn read_tail(stream: Option<impl AsyncRead + Unpin>, cap: usize) -> Vec<u8> {
    read_keeping(stream, |kept, chunk| {
        kept.extend_from_slice(chunk);
        let excess = kept.len().saturating_sub(cap);
        kept.drain(..excess);
    })
    .await
}

/// Reads `stream` to its end, `keep` choosing what of each chunk stays.
async fn read_keeping(
    stream: Option<impl AsyncRead + Unpin>,
    mut keep: impl FnMut(&mut Vec<u8>, &[u8]),
) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut stream) = stream else {
        return kept;
    };
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        keep(&mut kept, &buf[..n]);
    }
    kept
}

/// The last 20 lines of `bytes` as text (invalid UTF-8 replaced; the controller escapes it).
pub fn tail_lines(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
