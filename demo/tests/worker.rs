//! demo-worker as a process: stamping changes what it reports and how it behaves; it shuts down on SIGTERM.
// Test code: a failing setup step may panic (clippy only treats `#[test]` functions as tests).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn stamp(dir: &std::path::Path, file: &str, args: &[&str]) -> String {
    let out = dir.join(file);
    let status = Command::new(worker_bin())
        .arg("stamp")
        .args(args)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "stamp {args:?} failed");
    out.to_string_lossy().into_owned()
}

#[tokio::test]
async fn stamped_binary_reports_its_label_and_own_hash() {
    let dir = tempfile::tempdir().unwrap();
    let hotfix = stamp(dir.path(), "demo-worker", &["--version", "v1.0.1-hotfix"]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&hotfix).unwrap().permissions().mode() & 0o777,
        0o755
    );

    let printed = Command::new(&hotfix).arg("version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&printed.stdout).trim(),
        "v1.0.1-hotfix"
    );

    let original = spawn(
        worker_bin(),
        &["serve", "--listen", "127.0.0.1:0", "--name", "orig"],
    );
    let patched = spawn(
        &hotfix,
        &["serve", "--listen", "127.0.0.1:0", "--name", "w-1"],
    );

    let (status, before) = get_json(&format!("{}/version", original.url())).await;
    assert_eq!(status, 200);
    assert_eq!(
        before["version"], "v0.1.0",
        "an unstamped binary reports the crate version"
    );
    assert_eq!(before["mode"], "ok");

    let (status, after) = get_json(&format!("{}/version", patched.url())).await;
    assert_eq!(status, 200);
    assert_eq!(after["name"], "w-1");
    assert_eq!(after["version"], "v1.0.1-hotfix");
    assert_eq!(after["pid"], patched.child.id());
    assert!(after["started_unix"].as_u64().unwrap() > 1_600_000_000);
    let sha = after["binary_sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    assert_ne!(
        sha,
        before["binary_sha256"].as_str().unwrap(),
        "the stamp changes the binary's hash"
    );

    let health = client()
        .get(format!("{}/health", patched.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");

    // Re-stamping a stamped binary replaces the stamp.
    let again = stamp(
        dir.path(),
        "again",
        &["--from", &hotfix, "--version", "v1.0.2"],
    );
    let printed = Command::new(&again).arg("version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&printed.stdout).trim(), "v1.0.2");
    assert_eq!(
        std::fs::metadata(&again).unwrap().len(),
        std::fs::metadata(&hotfix).unwrap().len() - 13 + 6
    );
}

#[test]
fn crash_mode_exits_nonzero_right_away() {
    let dir = tempfile::tempdir().unwrap();
    let crashing = stamp(
        dir.path(),
        "crashing",
        &["--version", "v1.0.1-bad", "--mode", "crash"],
    );
    let mut child = Command::new(&crashing)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30))
        .expect("a crash-mode worker must exit by itself");
    assert_eq!(status.code(), Some(3));
    let output = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("crash"));
}

#[tokio::test]
async fn fail_health_and_slow_start_modes() {
    let dir = tempfile::tempdir().unwrap();
    let sick = stamp(
        dir.path(),
        "sick",
        &["--version", "v1.0.1-sick", "--mode", "fail-health"],
    );
    let sick = spawn(&sick, &["serve", "--listen", "127.0.0.1:0"]);
    let health = client()
        .get(format!("{}/health", sick.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 500);
    let (_, version) = get_json(&format!("{}/version", sick.url())).await;
    assert_eq!(version["mode"], "fail-health");

    let slow = stamp(
        dir.path(),
        "slow",
        &[
            "--version",
            "v1.0.1-slow",
            "--mode",
            "slow-start",
            "--delay-ms",
            "700",
        ],
    );
    let started = std::time::Instant::now();
    let slow = spawn(&slow, &["serve", "--listen", "127.0.0.1:0"]);
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "slow-start must delay listening"
    );
    let (_, version) = get_json(&format!("{}/version", slow.url())).await;
    assert_eq!(version["mode"], "slow-start");
}

#[tokio::test]
async fn env_override_and_graceful_sigterm() {
    let mut child = std::process::Command::new(worker_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DEMO_WORKER_MODE", "crash")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(30))
            .unwrap()
            .code(),
        Some(3)
    );

    // No master at all is fine: the worker serves on its own and stops cleanly on SIGTERM.
    let mut worker = spawn(
        worker_bin(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--master",
            "http://127.0.0.1:1",
        ],
    );
    let (status, _) = get_json(&format!("{}/version", worker.url())).await;
    assert_eq!(status, 200);
    assert!(
        worker.terminate().success(),
        "SIGTERM is a graceful shutdown (exit 0)"
    );
}
