//! Confinement to the deploy roots, symlinks swapped in mid-apply, tampered backups, ownership of new files, and
//! the spec's validation.
use super::*;
use patchd_package::ContentAlgorithm;

#[tokio::test]
async fn confinement_is_enforced_at_start_and_at_apply() {
    let host = Host::new();
    let mut config = host.config();
    config.services[0].deploy_dir = host.state.join("elsewhere");
    let world = host.world.clone();
    let factory: BackendFactory = Box::new(move |spec: &ServiceSpec, _state: &Path| {
        Ok(Arc::new(FakeBackend {
            binary: spec.binary_path(),
            world: world.clone(),
        }) as Arc<dyn ServiceBackend>)
    });
    let effects = Effects {
        clock: Arc::new(crate::effects::SystemClock),
        probe: Arc::new(FakeProbe {
            world: host.world.clone(),
        }),
        faults: Arc::new(crate::effects::NoFaults),
    };
    let err = Engine::start_with(config, effects, factory)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not under any deploy root"), "{err}");

    // A directory of the deploy dir replaced by a symlink to outside the roots: apply is refused, nothing written.
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let outside = host.state.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::remove_dir_all(host.deploy.join("bin/svc/conf")).unwrap();
    std::os::unix::fs::symlink(&outside, host.deploy.join("bin/svc/conf")).unwrap();
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    assert_eq!(host.binary(), "binary v1");
}

#[test]
fn spec_defaults_and_validation() {
    let host = Host::new();
    let spec = host.spec();
    assert_eq!(spec.binary_path(), host.deploy.join("bin/svc/svc"));
    assert_eq!(
        spec.resolved_command(),
        vec![format!("{}/bin/svc/svc", host.deploy.display())]
    );
    assert!(spec.validate(std::slice::from_ref(&host.root)).is_ok());
    let mut bad = spec.clone();
    bad.command.clear();
    assert!(
        bad.validate(std::slice::from_ref(&host.root))
            .unwrap_err()
            .to_string()
            .contains("needs `command`")
    );
    let mut bad = spec.clone();
    bad.name = "../x".into();
    assert!(bad.validate(std::slice::from_ref(&host.root)).is_err());
    let mut bad = spec;
    bad.health.tcp = Some("nowhere".into());
    assert!(
        bad.validate(std::slice::from_ref(&host.root))
            .unwrap_err()
            .to_string()
            .contains("ip:port")
    );
}

#[tokio::test]
async fn a_created_directory_swapped_for_a_symlink_is_not_written_through() {
    let host = Host::new();
    let outside = host.outside();
    let before = snapshot(&outside);
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2_ADDING);
    engine.stage("svc", &digest).await.unwrap();
    host.race(FaultPoint::AfterCreateDir, 1, &outside);
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Failed,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("symlink"),
        "{}",
        report.result.reason
    );
    assert_eq!(
        snapshot(&outside),
        before,
        "nothing outside the deploy root changes"
    );
    assert_eq!(
        (host.binary().as_str(), host.conf().as_str()),
        ("binary v1", "conf v1")
    );
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    // The symlink the attacker left is neither followed nor removed by the clean-up.
    assert!(
        std::fs::symlink_metadata(host.deploy.join("bin/svc/plugins"))
            .unwrap()
            .is_symlink()
    );
    host.assert_no_temps();
}

#[tokio::test]
async fn a_backup_swapped_for_a_symlink_is_refused_before_anything_live_changes() {
    let host = Host::new();
    let outside = host.outside();
    let before = snapshot(&outside);
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    host.race(FaultPoint::AfterBackup, 1, &outside.join("extra.conf"));
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Failed,
        "{:?}",
        report.result
    );
    assert!(
        report.result.reason.contains("backed up"),
        "{}",
        report.result.reason
    );
    assert_eq!(snapshot(&outside), before);
    assert_eq!(
        (host.binary().as_str(), host.conf().as_str()),
        ("binary v1", "conf v1")
    );
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    host.assert_no_temps();
}

#[tokio::test]
async fn a_directory_swapped_for_a_symlink_during_a_revert_is_not_followed() {
    let host = Host::new();
    let outside = host.outside();
    let before = snapshot(&outside);
    let engine = host.engine().await.unwrap();
    let digest = host.package(
        "v2",
        &[
            ("svc", "binary v2 crash"),
            ("conf/a.toml", "conf v2"),
            ("plugins/extra.conf", "added in v2"),
        ],
    );
    engine.stage("svc", &digest).await.unwrap();
    // Files are restored in plan order (conf/a.toml, plugins/extra.conf, svc): the second one's directory is
    // swapped just before its new file is removed, which a path-based removal would do in `outside`.
    host.race(FaultPoint::BeforeRestore, 2, &outside);
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    let result = report.result;
    assert_eq!(result.outcome, Outcome::Reverted, "{result:?}");
    assert!(
        result
            .reason
            .contains("restoring bin/svc/plugins/extra.conf failed"),
        "{}",
        result.reason
    );
    assert_eq!(
        snapshot(&outside),
        before,
        "nothing outside the deploy root changes"
    );
    assert_eq!(
        (host.binary().as_str(), host.conf().as_str()),
        ("binary v1", "conf v1")
    );
    assert_eq!(
        host.running().as_deref(),
        Some("binary v1"),
        "the old version runs again"
    );
}

#[tokio::test]
async fn a_tampered_backup_is_not_restored_and_the_revert_says_so() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    *host.faults.armed.lock().unwrap() = Some((FaultPoint::AfterSwap, 2));
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert!(matches!(err, ApplyError::Crash(_)), "{err}");
    drop(engine);
    // While the agent is down, someone rewrites the backup of the config file.
    let current = host.journal().current.unwrap();
    let conf_change = current
        .files
        .iter()
        .find(|f| f.rel.ends_with("conf/a.toml"))
        .unwrap();
    std::fs::write(conf_change.backup.as_ref().unwrap(), "conf evil").unwrap();

    let _engine = host.engine().await.unwrap();
    let result = host.journal().result_of("p1").unwrap().clone();
    assert_eq!(result.outcome, Outcome::Reverted, "{result:?}");
    assert!(
        result
            .reason
            .contains("restoring bin/svc/conf/a.toml failed")
            && result.reason.contains("tampered"),
        "{}",
        result.reason
    );
    assert_eq!(
        host.conf(),
        "conf v2",
        "a tampered backup is never put in place"
    );
    assert_eq!(host.binary(), "binary v1", "the good backups are restored");
    assert_eq!(host.running().as_deref(), Some("binary v1"));
}

#[tokio::test]
async fn new_files_are_owned_as_the_files_they_replace_or_their_directory() {
    use std::os::unix::fs::MetadataExt;
    let host = Host::new();
    let owner_of = |rel: &str| {
        let meta = std::fs::symlink_metadata(host.deploy.join(rel)).unwrap();
        (meta.uid(), meta.gid())
    };
    let nobody = (65534, 65534);
    std::os::unix::fs::chown(
        host.deploy.join("bin/svc/conf/a.toml"),
        Some(nobody.0),
        Some(nobody.1),
    )
    .unwrap();
    std::os::unix::fs::chown(host.deploy.join("bin/svc"), Some(nobody.0), Some(nobody.1)).unwrap();
    let root_owned = owner_of("bin/svc/svc");
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2_ADDING);
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert_eq!(host.conf(), "conf v2");
    assert_eq!(
        owner_of("bin/svc/conf/a.toml"),
        nobody,
        "owned as the file it replaced"
    );
    assert_eq!(
        owner_of("bin/svc/svc"),
        root_owned,
        "owned as the file it replaced"
    );
    assert_eq!(
        owner_of("bin/svc/plugins"),
        nobody,
        "a new directory is owned as its parent"
    );
    assert_eq!(
        owner_of("bin/svc/plugins/extra.conf"),
        nobody,
        "a new file as its directory"
    );
    // The staged copy keeps its own owner: the deployed file is a copy, not a link to it.
    let staged = crate::stage::StagedPaths::new(&host.state, &digest).files();
    let staged_meta = std::fs::metadata(staged.join("svc/conf/a.toml")).unwrap();
    assert_ne!((staged_meta.uid(), staged_meta.gid()), nobody);

    // A rollback puts the old file back with its old owner.
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
    assert_eq!(host.conf(), "conf v1");
    assert_eq!(owner_of("bin/svc/conf/a.toml"), nobody);
}

#[tokio::test]
async fn a_file_rewritten_in_place_with_its_mtime_restored_is_shown_and_repaired() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    let binary = host.deploy.join("bin/svc/svc");
    let good = crate::fsutil::digest_file(&binary, ContentAlgorithm::Sha256).unwrap();
    // Whatever the status path has cached for the deployed binary now, it is exactly this file.
    engine.inner_hashes_for_tests().remember(&binary, &good);
    assert_eq!(
        engine.status(Some("svc")).await.unwrap()[0]
            .binary_sha256
            .as_deref(),
        Some(good.as_str())
    );

    let mtime = std::fs::metadata(&binary).unwrap().modified().unwrap();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&binary)
            .unwrap();
        file.write_all(b"binary X2").unwrap(); // same size, in place: same inode
        file.set_modified(mtime).unwrap();
    }
    let evil = crate::fsutil::digest_file(&binary, ContentAlgorithm::Sha256).unwrap();
    assert_ne!(evil, good);
    assert_eq!(
        engine.status(Some("svc")).await.unwrap()[0]
            .binary_sha256
            .as_deref(),
        Some(evil.as_str()),
        "status shows the real sha256"
    );
    // The next patch of the same package repairs it.
    engine.stage("svc", &digest).await.unwrap();
    let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert_eq!(host.binary(), "binary v2");
}
