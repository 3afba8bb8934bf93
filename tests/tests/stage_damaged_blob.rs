//! A package whose cached blob is damaged on the agent's disk after its upload (stage no longer re-hashes a blob
//! it verified on arrival) is refused when it is staged later, never installed, and removed from the cache, so
//! the next push uploads it again and that one stages and applies.

use patchd_e2e::apply_support::{
    AgentRpc, WorkerRig, digest_of, outcome, package_hashes, worker_package,
};
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
    flip_middle_byte(&blob);

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
