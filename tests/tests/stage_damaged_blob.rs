//! A package corrupted on the agent's disk after its upload is refused when it is staged later, never installed,
//! and removed from the cache, so the next push uploads it again and that one stages and applies (issue 12).
//!
//! Stage no longer re-hashes a blob it verified on arrival, and the upload staged the package as it arrived, so
//! the damage here hits both copies: the cached blob and the staged file. Stage hashes the staged file (its
//! identity no longer matches stage's record), finds it changed, unpacks the blob again, and that fails.

use patchd_e2e::apply_support::{
    AgentRpc, WorkerRig, digest_of, outcome, package_hashes, worker_package,
};
use patchd_e2e::cluster_fixture::{ClusterFixture, FixtureOptions, ORIGINAL_VERSION, output_text};
use patchd_e2e::patchctl_ok;
use patchd_proto::v1::ApplyOutcome;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use tonic::Code;

/// Bytes `patchctl agent push` sent, from its JSON report.
fn push_bytes_sent(rig: &WorkerRig, package: &Path) -> u64 {
    let out = patchctl_ok(
        rig.pki.home(),
        &[
            "--format",
            "json",
            "agent",
            "push",
            &rig.agent.addr_string(),
            &package.to_string_lossy(),
        ],
    );
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {out}: {e}"));
    report["bytes_sent"].as_u64().unwrap()
}

/// The staged copy of the worker binary in the package `digest` (staged by its upload).
fn staged_binary(state: &Path, digest: &str) -> std::path::PathBuf {
    state
        .join("staging")
        .join(digest)
        .join("files/demo-worker/demo-worker")
}

/// Flips one byte in the middle of `path`, in place (what a bad disk sector or a stray write does).
fn flip_middle_byte(path: &Path) {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let middle = file.metadata().unwrap().len() / 2;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(middle)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(middle)).unwrap();
    file.write_all(&[byte[0] ^ 0x5a]).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn a_blob_damaged_on_disk_after_its_upload_is_refused_at_stage_and_never_installed() {
    let rig = WorkerRig::start("200ms");
    let pkgs = rig.packages();
    let original = rig.worker.file_hashes();
    let package = worker_package(&pkgs, "v1.1.0", "ok");
    let digest = digest_of(&package);
    let size = std::fs::metadata(&package).unwrap().len();

    assert_eq!(push_bytes_sent(&rig, &package), size, "first push");
    let blob = rig.state.join("blobs").join(&digest);
    assert!(blob.is_file(), "the upload left a complete blob");
    let staged_binary = staged_binary(&rig.state, &digest);
    assert!(
        staged_binary.is_file(),
        "the push staged the package as it arrived"
    );
    flip_middle_byte(&blob);
    flip_middle_byte(&staged_binary);

    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let err = rpc.stage("worker-1", &digest).unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("does not match its digest")
            && err.message().contains("upload it again"),
        "the refusal names the damage and what to do: {}",
        err.message()
    );
    assert!(
        !rig.state.join("staging").join(&digest).exists(),
        "nothing was staged"
    );
    let staging_leftovers: Vec<_> = std::fs::read_dir(rig.state.join("staging"))
        .map(|listing| listing.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        staging_leftovers.is_empty(),
        "no half-unpacked temporary is left: {staging_leftovers:?}"
    );
    assert!(!blob.exists(), "the damaged blob left the cache");

    // Never installed: an apply finds nothing staged, and the service still runs the old files.
    let err = rpc.apply("worker-1", &digest, "p1", false).unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(rig.worker.served_version().as_deref(), Some("v1.0.0"));
    assert_eq!(rig.worker.file_hashes(), original);

    // The next push uploads the whole package again; that copy stages and applies.
    assert_eq!(
        push_bytes_sent(&rig, &package),
        size,
        "push after the damage"
    );
    let staged = rpc.stage("worker-1", &digest).unwrap();
    assert!(!staged.already_staged);
    let applied = rpc.apply("worker-1", &digest, "p1", false).unwrap();
    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
    assert_eq!(rig.worker.served_version().as_deref(), Some("v1.1.0"));
    assert_eq!(rig.worker.file_hashes(), package_hashes(&pkgs, "v1.1.0"));

    rig.reaper.track("worker-1");
    rig.stop();
}

/// The acceptance test of issue 12, through `patchctl patch`: a cached package corrupted on the agent's disk after
/// its upload is refused when it is staged later, and never installed.
#[test]
fn a_package_corrupted_on_disk_after_its_push_is_refused_by_patch_and_never_installed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterFixture::start(
        dir.path(),
        FixtureOptions {
            masters: 1,
            workers: 1,
            first_host: 111,
            ..Default::default()
        },
    );
    let worker = cluster.workers().next().unwrap().name.clone();
    let state = cluster.node(&worker).state_dir();
    let addr = cluster.agent(&worker).unwrap().addr_string();
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");
    let digest = digest_of(&package);
    cluster.patchctl_ok(&["agent", "push", &addr, &package.to_string_lossy()]);
    let blob = state.join("blobs").join(&digest);
    let staged_binary = staged_binary(&state, &digest);
    assert!(
        blob.is_file() && staged_binary.is_file(),
        "pushed and staged"
    );
    let before = cluster.version_of(&worker).unwrap();
    assert_eq!(before.version, ORIGINAL_VERSION);

    flip_middle_byte(&blob);
    flip_middle_byte(&staged_binary);
    let out = cluster.patchctl(&["patch", &cluster.name, &package.to_string_lossy(), "-y"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("does not match its digest") && text.contains("upload it again"),
        "the refusal names the damage and what to do:\n{text}"
    );
    assert_eq!(
        cluster.version_of(&worker).unwrap(),
        before,
        "the old version still serves, in the same process"
    );
    assert!(!blob.exists(), "the damaged blob left the cache");
    assert!(
        !state.join("staging").join(&digest).exists(),
        "nothing is staged"
    );
}
