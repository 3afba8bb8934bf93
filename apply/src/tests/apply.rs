//! Stage, apply, revert, rollback and cache pruning through the engine's API.
use super::*;
use patchd_package::ContentAlgorithm;

#[tokio::test]
async fn stage_is_idempotent_and_checks_the_component() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    let first = engine.stage("svc", &digest).await.unwrap();
    assert!(!first.already_staged);
    assert_eq!(first.manifest.version, "v2");
    assert!(
        host.state
            .join("staging")
            .join(&digest)
            .join("files/svc/svc")
            .is_file()
    );
    let again = engine.stage("svc", &digest).await.unwrap();
    assert!(again.already_staged);

    let missing = "0".repeat(64);
    let err = engine.stage("svc", &missing).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(
        engine
            .stage("svc", "nothex")
            .await
            .unwrap_err()
            .to_string()
            .contains("hex")
    );
    assert!(
        engine
            .stage("nope", &digest)
            .await
            .unwrap_err()
            .to_string()
            .contains("this agent manages: svc")
    );

    // A corrupted cached blob is refused.
    let other = host.package("v3", &[("svc", "binary v3")]);
    std::fs::write(host.state.join("blobs").join(&other), b"garbage").unwrap();
    let err = engine.stage("svc", &other).await.unwrap_err().to_string();
    assert!(err.contains("does not match its digest"), "{err}");

    // A package of another component is refused.
    let src = host.packages.join("foreign/other");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("other"), "x").unwrap();
    let out = host.packages.join("other.tar.gz");
    let info = patchd_package::pack_dir(&src, "v1", &out).unwrap();
    std::fs::copy(&out, host.state.join("blobs").join(&info.tree_digest)).unwrap();
    let err = engine
        .stage("svc", &info.tree_digest)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("component"), "{err}");
}

#[tokio::test]
async fn apply_swaps_restarts_commits_and_replays() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "apply before stage: {err}");
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert!(!report.replayed);
    assert_eq!(host.binary(), "binary v2");
    assert_eq!(host.conf(), "conf v2");
    assert_eq!(host.running().as_deref(), Some("binary v2"));
    assert_eq!(
        report.result.binary_sha256,
        crate::fsutil::digest_file(&host.deploy.join("bin/svc/svc"), ContentAlgorithm::Sha256)
            .unwrap()
    );
    // downtime ends when the service first answers, not when the 1 s min_healthy window ends
    assert!(
        report.result.downtime_ms < 1000,
        "{}",
        report.result.downtime_ms
    );
    let probation = report
        .result
        .steps
        .iter()
        .find(|(s, _)| s == "probation")
        .unwrap()
        .1;
    assert!(
        probation >= 1000,
        "probation lasts min_healthy: {probation}"
    );
    let steps: Vec<&str> = report
        .result
        .steps
        .iter()
        .map(|(s, _)| s.as_str())
        .collect();
    for step in ["prepare", "stop", "swap", "start", "probation"] {
        assert!(steps.contains(&step), "{steps:?}");
    }
    // old files are kept as the backup set
    let history = host.journal().history;
    let kept = history[0]
        .files
        .iter()
        .find(|f| f.rel == Path::new("bin/svc/svc"))
        .unwrap();
    let backup = kept.backup.as_ref().unwrap();
    assert!(
        backup.starts_with(host.state.join("backups/svc/p1")),
        "{}",
        backup.display()
    );
    assert_eq!(std::fs::read_to_string(backup).unwrap(), "binary v1");
    host.assert_no_temps();

    let again = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.result, report.result);
    assert_eq!(
        host.world.lock().unwrap().starts,
        1,
        "a replay must not restart"
    );

    let status = &engine.status(Some("svc")).await.unwrap()[0];
    assert_eq!(status.version, "v2");
    assert_eq!(status.runtime.state, RunState::Running);
    assert_eq!(
        status.binary_sha256.as_deref(),
        Some(report.result.binary_sha256.as_str())
    );
    assert_eq!(status.history.len(), 1);
    assert_eq!(status.last.as_ref().unwrap().patch_id, "p1");

    let other = host.package("v3", &[("svc", "binary v3")]);
    let err = engine
        .apply(apply_cmd(&other, "p1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already used"), "{err}");
}

#[tokio::test]
async fn a_staged_copy_edited_through_its_deployed_link_is_never_deployed() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    // An operator edits the deployed binary in place: it shares its inode with the staged copy.
    std::fs::write(host.deploy.join("bin/svc/svc"), "binary hacked").unwrap();
    let staged = host
        .state
        .join("staging")
        .join(&digest)
        .join("files/svc/svc");
    assert_eq!(std::fs::read_to_string(&staged).unwrap(), "binary hacked");
    let report = engine
        .rollback(RollbackCommand {
            caller: String::new(),
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
        })
        .await
        .unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    assert_eq!(host.binary(), "binary v1");

    // Applied without staging again: prepare sees the changed bytes and nothing live changes.
    let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Failed,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("stage the package again"),
        "{}",
        report.result.reason
    );
    assert_eq!(host.binary(), "binary v1");
    host.assert_no_temps();

    // Staging again notices the change and unpacks the blob anew.
    let again = engine.stage("svc", &digest).await.unwrap();
    assert!(!again.already_staged);
    assert_eq!(std::fs::read_to_string(&staged).unwrap(), "binary v2");
    let report = engine.apply(apply_cmd(&digest, "p3")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    assert_eq!(host.binary(), "binary v2");
    assert_eq!(
        report.result.binary_sha256,
        crate::fsutil::digest_file(&host.deploy.join("bin/svc/svc"), ContentAlgorithm::Sha256)
            .unwrap()
    );
}

#[tokio::test]
async fn a_staged_file_edited_in_place_after_stage_is_refused_at_apply() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let staged_dir = host.state.join("staging").join(&digest);
    // Stage recorded what it verified, so an unchanged file is not hashed again at apply.
    let record: crate::staged_identity::Identities = serde_json::from_slice(
        &std::fs::read(staged_dir.join(crate::staged_identity::RECORD_FILE)).unwrap(),
    )
    .unwrap();
    assert!(record.contains_key("svc/svc"), "{record:?}");

    // Same size, other bytes, written into the staged inode itself.
    let staged = staged_dir.join("files/svc/svc");
    let before = std::fs::metadata(&staged).unwrap().len();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&staged)
            .unwrap();
        file.write_all(b"binary X2").unwrap();
    }
    assert_eq!(std::fs::metadata(&staged).unwrap().len(), before);

    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Failed,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("stage the package again"),
        "{}",
        report.result.reason
    );
    assert_eq!(host.binary(), "binary v1");
    host.assert_no_temps();
}

#[test]
fn only_files_below_a_staged_tree_have_a_record() {
    use crate::staged_identity::staged_source;
    assert_eq!(
        staged_source(Path::new("staging/abc/files/svc/bin")),
        Some((PathBuf::from("staging/abc"), "svc/bin".to_string()))
    );
    assert_eq!(staged_source(Path::new("staging/abc/files")), None);
    assert_eq!(staged_source(Path::new("backups/abc/files/svc/bin")), None);
    assert_eq!(staged_source(Path::new("staging/abc/other/svc/bin")), None);
}

#[tokio::test]
async fn a_patch_id_still_in_the_history_or_the_backups_is_refused() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    drop(engine);
    // Many later applies pushed p1 out of the recent results; its history entry and backup are still kept.
    let path = ServiceJournal::path(&host.state, "svc");
    let mut journal = host.journal();
    journal.results.clear();
    journal.store(&path).unwrap();
    let backup = host.state.join("backups/svc/p1");
    assert!(backup.is_dir());

    let engine = host.engine().await.unwrap();
    let other = host.package("v3", &[("svc", "binary v3")]);
    engine.stage("svc", &other).await.unwrap();
    let err = engine.apply(apply_cmd(&other, "p1")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("\"p1\"") && message.contains("use a new patch id"),
        "{message}"
    );
    let err = engine
        .rollback(RollbackCommand {
            caller: String::new(),
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "p1".into(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("use a new patch id"), "{err}");
    assert_eq!(host.binary(), "binary v2");
    assert!(backup.is_dir());
    assert_eq!(host.journal().history.len(), 1);

    // A backup set without a history entry (e.g. one being deleted) still blocks its id.
    std::fs::create_dir_all(host.state.join("backups/svc/p9")).unwrap();
    let err = engine.apply(apply_cmd(&other, "p9")).await.unwrap_err();
    assert!(err.to_string().contains("backup set"), "{err}");
}

#[tokio::test]
async fn a_revert_leaves_a_service_that_was_stopped_stopped() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    // Stopped by its operator after the agent started.
    host.world.lock().unwrap().running = None;
    let digest = host.package("bad", &[("svc", "binary v2 crash")]);
    engine.stage("svc", &digest).await.unwrap();
    let starts_before = host.world.lock().unwrap().starts;
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    assert!(
        report.result.reason.contains("left stopped"),
        "{}",
        report.result.reason
    );
    assert_eq!(host.binary(), "binary v1");
    assert_eq!(host.running(), None);
    assert_eq!(
        host.world.lock().unwrap().starts - starts_before,
        1,
        "only the new version was started"
    );
    assert!(!host.journal().current.unwrap().was_running);
}

#[tokio::test]
async fn unchanged_files_are_not_touched() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v1b", &[("svc", "binary v1"), ("conf/a.toml", "conf v2")]);
    engine.stage("svc", &digest).await.unwrap();
    let before = std::fs::metadata(host.deploy.join("bin/svc/svc")).unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    let after = std::fs::metadata(host.deploy.join("bin/svc/svc")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        before.ino(),
        after.ino(),
        "an identical binary must not be replaced"
    );
    assert_eq!(host.conf(), "conf v2");
    let record = host.journal().current.unwrap();
    assert_eq!(record.files.len(), 1);
}

#[tokio::test]
async fn crashing_new_version_is_reverted() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package(
        "bad",
        &[
            ("svc", "binary v2 crash"),
            ("conf/a.toml", "conf v2"),
            ("extra", "new file"),
        ],
    );
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    assert!(
        report.result.reason.contains("exited with status 3"),
        "{}",
        report.result.reason
    );
    assert_eq!(report.result.log_tail, vec!["fake log line".to_string()]);
    assert_eq!(host.binary(), "binary v1");
    assert_eq!(host.conf(), "conf v1");
    assert!(
        !host.deploy.join("bin/svc/extra").exists(),
        "a file the patch added is removed on revert"
    );
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    assert!(
        !host.state.join("backups/svc/p1").exists(),
        "a reverted apply keeps no backup"
    );
    host.assert_no_temps();
    let status = &engine.status(None).await.unwrap()[0];
    assert_eq!(status.version, "");
    assert!(status.history.is_empty());
    assert_eq!(host.journal().current.unwrap().phase, ApplyPhase::Reverted);
}

#[tokio::test]
async fn failing_health_probe_is_reverted() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("sick", &[("svc", "binary v2 fail-health")]);
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    assert!(
        report.result.reason.contains("not healthy within 5s"),
        "{}",
        report.result.reason
    );
    assert!(
        report.result.reason.contains("status 500"),
        "{}",
        report.result.reason
    );
    assert_eq!(host.binary(), "binary v1");
    assert_eq!(host.running().as_deref(), Some("binary v1"));
}

#[tokio::test]
async fn offline_apply_swaps_without_restart() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let mut cmd = apply_cmd(&digest, "p1");
    cmd.offline = true;
    let report = engine.apply(cmd).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::OfflineSwapped);
    assert_eq!(host.binary(), "binary v2");
    let world = host.world.lock().unwrap();
    assert_eq!((world.starts, world.stops), (0, 0));
    assert_eq!(
        world.running.as_deref(),
        Some("binary v1"),
        "the running process is untouched"
    );
}

#[tokio::test]
async fn rollback_returns_to_earlier_versions_and_backups_are_pruned() {
    let mut host = Host::new();
    host.keep_backups = 2;
    let engine = host.engine().await.unwrap();
    let err = engine
        .rollback(RollbackCommand {
            caller: String::new(),
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r0".into(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing to roll back"), "{err}");
    for (i, version) in ["v2", "v3", "v4"].iter().enumerate() {
        let digest = host.package(
            version,
            &[
                ("svc", &format!("binary {version}")),
                (&format!("added-{version}"), "x"),
            ],
        );
        engine.stage("svc", &digest).await.unwrap();
        let report = engine
            .apply(apply_cmd(&digest, &format!("p{}", i + 2)))
            .await
            .unwrap();
        assert_eq!(report.result.outcome, Outcome::Committed);
    }
    assert_eq!(host.binary(), "binary v4");
    // keep_backups = 2: p2's backup was pruned
    assert!(!host.state.join("backups/svc/p2").exists());
    assert!(
        host.state.join("backups/svc/p3").exists() && host.state.join("backups/svc/p4").exists()
    );
    let err = engine
        .rollback(RollbackCommand {
            caller: String::new(),
            service: "svc".into(),
            to_patch_id: Some("p2".into()),
            patch_id: "r1".into(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pruned"), "{err}");

    // undo the last one
    let report = engine
        .rollback(RollbackCommand {
            caller: String::new(),
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert_eq!(report.result.version, "v3");
    assert_eq!(host.binary(), "binary v3");
    assert!(!host.deploy.join("bin/svc/added-v4").exists());
    assert!(host.deploy.join("bin/svc/added-v3").exists());
    assert_eq!(host.running().as_deref(), Some("binary v3"));
    assert_eq!(engine.status(Some("svc")).await.unwrap()[0].version, "v3");
    let replay = engine
        .rollback(RollbackCommand {
            caller: String::new(),
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
        })
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(host.binary(), "binary v3");

    // back to before p3: that is p2's content
    let report = engine
        .rollback(RollbackCommand {
            caller: String::new(),
            service: "svc".into(),
            to_patch_id: Some("p3".into()),
            patch_id: "r2".into(),
        })
        .await
        .unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    assert_eq!(host.binary(), "binary v2");
    assert!(!host.deploy.join("bin/svc/added-v3").exists());
    assert!(host.deploy.join("bin/svc/added-v2").exists());
    assert_eq!(engine.status(Some("svc")).await.unwrap()[0].version, "v2");
    assert!(
        !host.state.join("backups/svc/p3").exists() && !host.state.join("backups/svc/r2").exists()
    );
    host.assert_no_temps();
}

#[tokio::test]
async fn finished_applies_and_restarts_prune_what_nothing_needs() {
    let mut host = Host::new();
    host.keep_backups = 1;
    host.cache_min_age = Duration::ZERO;
    let engine = host.engine().await.unwrap();
    let v2 = host.package("v2", V2);
    let v3 = host.package("v3", &[("svc", "binary v3")]);
    let never_staged = host.package("v4", &[("svc", "binary v4")]);
    let blob = |d: &str| host.state.join("blobs").join(d);
    let staged = |d: &str| host.state.join("staging").join(d);

    engine.stage("svc", &v2).await.unwrap();
    let report = engine.apply(apply_cmd(&v2, "p2")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    // p2 is rollback history: its package stays; v3 was uploaded but not staged yet: with no minimum age it goes.
    assert!(blob(&v2).is_file() && staged(&v2).is_dir());
    assert!(!blob(&v3).exists() && !blob(&never_staged).exists());

    let v3 = host.package("v3", &[("svc", "binary v3")]);
    engine.stage("svc", &v3).await.unwrap();
    let report = engine.apply(apply_cmd(&v3, "p3")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    // keep_backups = 1: p2 left the rollback history, so its blob and staging went; p3's stay.
    assert!(!blob(&v2).exists() && !staged(&v2).exists());
    assert!(blob(&v3).is_file() && staged(&v3).is_dir());
    let report = engine
        .rollback(RollbackCommand {
            caller: String::new(),
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r3".into(),
        })
        .await
        .unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    assert_eq!(host.binary(), "binary v2");
    // Rolled back: nothing refers to v3 any more.
    assert!(!blob(&v3).exists() && !staged(&v3).exists());

    // At start, interrupted uploads go too.
    let partial = host.state.join("blobs/partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join(format!("{never_staged}.part")), "x").unwrap();
    drop(engine);
    let _engine = host.engine().await.unwrap();
    assert_eq!(std::fs::read_dir(&partial).unwrap().count(), 0);
}

#[tokio::test]
async fn failed_rollback_is_reverted_to_the_current_version() {
    let host = Host::new();
    // v1 on disk "crashes" when started again: make the original binary a crashing one
    std::fs::write(host.deploy.join("bin/svc/svc"), "binary v1 crash").unwrap();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    assert_eq!(
        engine
            .apply(apply_cmd(&digest, "p1"))
            .await
            .unwrap()
            .result
            .outcome,
        Outcome::Committed
    );
    let report = engine
        .rollback(RollbackCommand {
            caller: String::new(),
            service: "svc".into(),
            to_patch_id: None,
            patch_id: "r1".into(),
        })
        .await
        .unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    assert_eq!(host.binary(), "binary v2");
    assert_eq!(host.running().as_deref(), Some("binary v2"));
    assert_eq!(
        engine.status(Some("svc")).await.unwrap()[0].history.len(),
        1,
        "p1 can still be rolled back"
    );
    assert!(host.state.join("backups/svc/p1").exists());
}
