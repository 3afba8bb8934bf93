//! End to end: a reader that goes away (stdout or stderr a pipe closed early, as `| head -1` does) ends
//! `patchctl`'s output quietly: no panic, the command's own exit code, and a rollout still runs to its end and
//! records its result.

use patchd_e2e::bin;
use patchd_e2e::cluster_fixture::{ClusterFixture, ORIGINAL_VERSION};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Which of the two output streams is closed.
#[derive(Debug, Clone, Copy)]
enum Closed {
    /// stdout is a pipe whose reader is gone before patchctl writes anything.
    Stdout,
    /// stdout is a pipe whose reader reads one line, then goes away.
    StdoutAfterFirstLine,
    /// stderr is a pipe whose reader is gone before patchctl writes anything.
    Stderr,
}

/// What a run printed on the stream that stayed open, and how it ended.
struct Run {
    code: Option<i32>,
    first_line: String,
    other_stream: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit {:?}\nfirst line read: {}\nother stream:\n{}",
            self.code, self.first_line, self.other_stream
        )
    }

    /// The run did not panic and exited with `code`.
    fn assert_quiet_exit(&self, code: i32, what: &str) {
        assert!(
            !self.other_stream.contains("panicked"),
            "{what} panicked:\n{}",
            self.describe()
        );
        assert_eq!(self.code, Some(code), "{what}:\n{}", self.describe());
    }
}

/// Runs `patchctl args` with one stream closed as `closed` says, the other captured.
fn run_with_closed(home: &Path, closed: Closed, args: &[&str]) -> Run {
    let mut command = Command::new(bin("patchctl"));
    command
        .args(args)
        .env("PATCHCTL_HOME", home)
        .env("RUST_BACKTRACE", "1")
        .env_remove("PATCHCTL_LOG")
        .stdin(Stdio::null());
    match closed {
        Closed::Stdout => {
            let (reader, writer) = std::io::pipe().expect("pipe");
            drop(reader);
            command.stdout(writer).stderr(Stdio::piped());
        }
        Closed::StdoutAfterFirstLine => {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        Closed::Stderr => {
            let (reader, writer) = std::io::pipe().expect("pipe");
            drop(reader);
            command.stderr(writer).stdout(Stdio::piped());
        }
    }
    let mut child = command.spawn().expect("start patchctl");
    // The child's own copy of the write end is its only one once the Command is gone.
    drop(command);
    let mut first_line = String::new();
    if let Closed::StdoutAfterFirstLine = closed {
        let stdout = child.stdout.take().expect("stdout piped");
        BufReader::new(stdout)
            .read_line(&mut first_line)
            .expect("read the first line");
        // Dropping the reader closes the pipe: every later write of the child fails with EPIPE.
    }
    let mut other_stream = String::new();
    let kept = match closed {
        Closed::Stderr => child.stdout.take().map(|s| Box::new(s) as Box<dyn Read>),
        _ => child.stderr.take().map(|s| Box::new(s) as Box<dyn Read>),
    };
    if let Some(mut stream) = kept {
        stream
            .read_to_string(&mut other_stream)
            .expect("read the open stream");
    }
    let status = child.wait().expect("wait for patchctl");
    Run {
        code: status.code(),
        first_line,
        other_stream,
    }
}

fn output_text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The newest rollout's kind and state from `audit --format json`.
fn newest_rollout(cluster: &ClusterFixture) -> (String, String) {
    let text = cluster.patchctl_ok(&["--format", "json", "audit", &cluster.name]);
    let entries: serde_json::Value = serde_json::from_str(&text).expect("audit JSON");
    let newest = entries
        .as_array()
        .and_then(|list| {
            list.iter()
                .max_by_key(|entry| entry["created_at"].as_str().map(str::to_string))
        })
        .unwrap_or_else(|| panic!("no rollout in the audit: {text}"));
    (
        newest["kind"].as_str().unwrap_or_default().to_string(),
        newest["state"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn a_closed_output_pipe_never_panics_and_never_stops_a_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterFixture::with_workers(dir.path(), 2);
    let home = cluster.pki.home().to_path_buf();
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");
    let package = package.to_str().unwrap();

    // Commands that print at once: every write to the closed stream fails.
    for args in [
        vec!["package", "inspect", package],
        vec!["cluster", "list"],
        vec!["display", &cluster.name],
        vec!["--format", "json", "display", &cluster.name],
    ] {
        for closed in [Closed::Stdout, Closed::Stderr] {
            let run = run_with_closed(&home, closed, &args);
            run.assert_quiet_exit(0, &format!("{args:?} with {closed:?} closed"));
        }
    }

    // A patch whose stdout reader is gone: the rollout goes on to the end (its plan and progress are on
    // stderr), its summary is dropped quietly, and the exit code is the rollout's.
    let run = run_with_closed(
        &home,
        Closed::Stdout,
        &["patch", &cluster.name, package, "-y"],
    );
    run.assert_quiet_exit(0, "patch with stdout closed");
    assert!(run.other_stream.contains("=> done"), "{}", run.describe());
    for worker in cluster.workers() {
        assert_eq!(
            cluster.version_of(&worker.name).unwrap().version,
            "v1.0.1-hotfix",
            "{}",
            worker.name
        );
    }
    assert_eq!(
        newest_rollout(&cluster),
        ("patch".to_string(), "succeeded".to_string())
    );

    for closed in [Closed::Stdout, Closed::Stderr] {
        let run = run_with_closed(&home, closed, &["audit", &cluster.name]);
        run.assert_quiet_exit(0, &format!("audit with {closed:?} closed"));
    }

    // A rollback with stderr (the progress lines) gone from the start: it completes and records its result.
    let run = run_with_closed(&home, Closed::Stderr, &["rollback", &cluster.name, "-y"]);
    run.assert_quiet_exit(0, "rollback with stderr closed");
    for worker in cluster.workers() {
        assert_eq!(
            cluster.version_of(&worker.name).unwrap().version,
            ORIGINAL_VERSION,
            "{}",
            worker.name
        );
    }
    assert_eq!(
        newest_rollout(&cluster),
        ("rollback".to_string(), "succeeded".to_string())
    );

    // The same patch again with stderr gone, then a rollback whose stdout reader leaves after one line.
    let run = run_with_closed(
        &home,
        Closed::Stderr,
        &["patch", &cluster.name, package, "-y"],
    );
    run.assert_quiet_exit(0, "patch with stderr closed");
    assert_eq!(
        newest_rollout(&cluster),
        ("patch".to_string(), "succeeded".to_string())
    );
    let run = run_with_closed(
        &home,
        Closed::StdoutAfterFirstLine,
        &["rollback", &cluster.name, "-y"],
    );
    run.assert_quiet_exit(0, "rollback with stdout closed after the first line");
    assert_eq!(
        newest_rollout(&cluster),
        ("rollback".to_string(), "succeeded".to_string())
    );
    let shown = cluster.patchctl(&["display", &cluster.name]);
    assert!(
        !String::from_utf8_lossy(&shown.stdout).contains("(patched)"),
        "{}",
        output_text(&shown)
    );
}
