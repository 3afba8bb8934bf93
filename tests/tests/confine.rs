//! Confinement against a hostile deploy dir, with a real agent (binaries built with
//! `--features patchd-agent/fault-injection`): `PATCHD_FAULT=<point>[:n]` with `PATCHD_FAULT_SYMLINK_TO=<dir>`
//! makes the agent itself play the local attacker at the worst moment (a directory it just created, or the one
//! it restores into, is moved aside and replaced by a symlink to `<dir>`, outside every deploy root). The apply
//! must refuse or revert, the service must end on a working version, and `<dir>` must not change by one byte.
//! Also: a file rewritten in place with its mtime set back is reported with its real sha256 and repaired by the
//! next patch, and a file the apply replaces keeps its owner.

use patchd_e2e::AgentProcess;
use patchd_e2e::apply_support::{
    AgentRpc, WorkerRig, outcome, package_hashes, push, stamp_worker, worker_package,
};
use patchd_proto::v1::ApplyOutcome;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Every entry below `dir` (symlinks not followed) with its bytes, owner and mode.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32, u32, u32)> {
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

/// [`worker_package`] plus `plugins/extra.conf`: a file in a directory the deployed version does not have.
fn worker_package_adding_a_file(dir: &Path, version: &str, mode: &str) -> PathBuf {
    let built = worker_package(dir, version, mode);
    let root = dir.join(version).join("demo-worker");
    std::fs::create_dir_all(root.join("plugins")).unwrap();
    std::fs::write(
        root.join("plugins/extra.conf"),
        format!("added in {version}\n"),
    )
    .unwrap();
    patchd_package::pack_dir(&root, version, &built).unwrap();
    built
}

/// A directory outside every deploy root, holding a file named like the one the package adds.
fn outside_dir(rig: &WorkerRig) -> PathBuf {
    let outside = rig.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("extra.conf"), "outside: must stay as it is\n").unwrap();
    outside
}

/// Restarts the agent armed to swap in a symlink to `outside` at `point`.
fn arm_symlink_race(rig: &mut WorkerRig, point: &str, outside: &Path) {
    rig.agent.kill();
    let outside = outside.to_string_lossy().into_owned();
    rig.agent = AgentProcess::start_with_env(
        &rig.config_path,
        &[
            ("PATCHD_FAULT", point),
            ("PATCHD_FAULT_SYMLINK_TO", outside.as_str()),
        ],
    );
}

fn push_and_stage(rig: &WorkerRig, package: &Path) -> String {
    let digest = push(&rig.pki, &rig.agent.addr_string(), package);
    AgentRpc::connect(&rig.pki, rig.agent.addr)
        .stage("worker-1", &digest)
        .unwrap();
    digest
}

#[test]
fn a_created_directory_swapped_for_a_symlink_is_not_written_through() {
    let mut rig = WorkerRig::start("300ms");
    let outside = outside_dir(&rig);
    let before = snapshot(&outside);
    let v1_binary = rig.worker.file_hashes().0;
    arm_symlink_race(&mut rig, "after-create-dir", &outside);
    let digest = push_and_stage(
        &rig,
        &worker_package_adding_a_file(&rig.packages(), "v2.0.0", "ok"),
    );

    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let answer = rpc.apply("worker-1", &digest, "race-1", false).unwrap();
    assert!(
        rig.agent
            .stderr()
            .contains("injected symlink race at after-create-dir"),
        "{}",
        rig.agent.stderr()
    );
    assert_eq!(outcome(&answer), ApplyOutcome::Failed, "{answer:?}");
    assert!(answer.reason.contains("symlink"), "{}", answer.reason);
    assert_eq!(
        snapshot(&outside),
        before,
        "nothing outside the deploy root changes"
    );
    rig.worker.wait_serving("v1.0.0");
    assert_eq!(rig.worker.file_hashes().0, v1_binary);
    assert_eq!(rpc.status("worker-1").binary_sha256, v1_binary);
    rig.stop();
}

#[test]
fn a_directory_swapped_for_a_symlink_during_a_revert_is_not_followed() {
    let mut rig = WorkerRig::start("300ms");
    let outside = outside_dir(&rig);
    let before = snapshot(&outside);
    let v1_binary = rig.worker.file_hashes().0;
    // Restored in plan order: conf/worker.toml, demo-worker, plugins/extra.conf. The third file's directory is
    // swapped just before the file the package added is removed, which a path-based removal would do outside.
    arm_symlink_race(&mut rig, "before-restore:3", &outside);
    let digest = push_and_stage(
        &rig,
        &worker_package_adding_a_file(&rig.packages(), "v2.0.1-crash", "crash"),
    );

    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let answer = rpc.apply("worker-1", &digest, "race-2", false).unwrap();
    assert!(
        rig.agent
            .stderr()
            .contains("injected symlink race at before-restore"),
        "{}",
        rig.agent.stderr()
    );
    assert_eq!(outcome(&answer), ApplyOutcome::Reverted, "{answer:?}");
    assert!(
        answer.reason.contains("plugins/extra.conf failed"),
        "{}",
        answer.reason
    );
    assert_eq!(
        snapshot(&outside),
        before,
        "nothing outside the deploy root changes"
    );
    rig.worker.wait_serving("v1.0.0");
    assert_eq!(rig.worker.file_hashes().0, v1_binary);
    rig.stop();
}

#[test]
fn a_binary_rewritten_in_place_with_its_mtime_restored_is_shown_and_repaired() {
    let mut rig = WorkerRig::start("300ms");
    // The config file belongs to another user: the new one must too.
    let nobody = (65534, 65534);
    std::os::unix::fs::chown(rig.worker.conf(), Some(nobody.0), Some(nobody.1)).unwrap();
    let pkgs = rig.packages();
    let digest = push_and_stage(&rig, &worker_package(&pkgs, "v2.0.0", "ok"));
    let (good, good_conf) = package_hashes(&pkgs, "v2.0.0");
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let answer = rpc.apply("worker-1", &digest, "p1", false).unwrap();
    assert_eq!(outcome(&answer), ApplyOutcome::Committed, "{answer:?}");
    rig.worker.wait_serving("v2.0.0");
    assert_eq!(rig.worker.file_hashes(), (good.clone(), good_conf));
    let conf = std::fs::metadata(rig.worker.conf()).unwrap();
    assert_eq!(
        (conf.uid(), conf.gid()),
        nobody,
        "owned as the file it replaced"
    );
    assert_eq!(rpc.status("worker-1").binary_sha256, good);
    drop(rpc);

    // With the agent and the service down (a running binary cannot be written), the binary is rewritten in
    // place (same inode, same size) and its mtime set back.
    rig.agent.stop();
    rig.reaper.reap();
    let binary = rig.worker.binary();
    let forged = rig.dir.path().join("forged");
    stamp_worker(&forged, "v2.0.9", "ok", 0);
    let before = std::fs::metadata(&binary).unwrap();
    assert_eq!(std::fs::metadata(&forged).unwrap().len(), before.len());
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&binary)
            .unwrap();
        std::io::copy(&mut std::fs::File::open(&forged).unwrap(), &mut file).unwrap();
        file.set_modified(before.modified().unwrap()).unwrap();
    }
    let after = std::fs::metadata(&binary).unwrap();
    assert_eq!(
        (after.ino(), after.len(), after.modified().unwrap()),
        (before.ino(), before.len(), before.modified().unwrap())
    );
    let forged_sha = rig.worker.file_hashes().0;
    assert_ne!(forged_sha, good);

    rig.agent.restart();
    rig.reaper.track("worker-1");
    rig.worker.wait_serving("v2.0.9");
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    assert_eq!(
        rpc.status("worker-1").binary_sha256,
        forged_sha,
        "status shows the real sha256"
    );
    // Pushing the good version again repairs it.
    let digest = push_and_stage(&rig, &worker_package(&pkgs, "v2.0.0", "ok"));
    let answer = rpc.apply("worker-1", &digest, "p2", false).unwrap();
    assert_eq!(outcome(&answer), ApplyOutcome::Committed, "{answer:?}");
    rig.worker.wait_serving("v2.0.0");
    assert_eq!(rig.worker.file_hashes().0, good);
    assert_eq!(rpc.status("worker-1").binary_sha256, good);
    rig.stop();
}
