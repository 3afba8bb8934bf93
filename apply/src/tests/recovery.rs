//! Crashes at every fault point and restarts, quarantine of a service whose journal cannot be read or written,
//! backup sets no journal knows.
use super::*;

/// Crash at every fault point (each file swap and revert step too), restart the engine, and check the
/// recovery rule: all-old unless committed, service running, journal final, replay reports the same result.
#[tokio::test]
async fn crash_at_every_fault_point_recovers_consistently() {
    let cases: Vec<(FaultPoint, u32, bool)> = vec![
        (FaultPoint::AfterPrepare, 1, false),
        (FaultPoint::AfterStop, 1, false),
        (FaultPoint::AfterSwap, 1, false),
        (FaultPoint::AfterSwap, 2, false),
        (FaultPoint::AfterStart, 1, false),
        (FaultPoint::DuringProbation, 1, false),
        (FaultPoint::DuringProbation, 3, false),
        (FaultPoint::BeforeCommit, 1, false),
        (FaultPoint::DuringRevert, 1, true),
        (FaultPoint::DuringRevert, 2, true),
        (FaultPoint::AfterBackup, 2, false),
        (FaultPoint::BeforeRestore, 1, true),
        (FaultPoint::BeforeRestore, 2, true),
    ];
    for (point, n, crashing) in cases {
        let host = Host::new();
        let engine = host.engine().await.unwrap();
        let binary = if crashing {
            "binary v2 crash"
        } else {
            "binary v2"
        };
        let digest = host.package("v2", &[("svc", binary), ("conf/a.toml", "conf v2")]);
        engine.stage("svc", &digest).await.unwrap();
        *host.faults.armed.lock().unwrap() = Some((point, n));
        let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
        assert!(matches!(err, ApplyError::Crash(_)), "{point:?}:{n}: {err}");
        drop(engine);
        let mixed = (host.binary().contains("v2"), host.conf().contains("v2"));
        let before_recovery = host.journal().current.unwrap().phase;
        assert!(
            !before_recovery.is_final(),
            "{point:?}:{n}: journal says {before_recovery:?}"
        );

        let engine = host.engine().await.unwrap();
        let journal = host.journal();
        let phase = journal.current.as_ref().unwrap().phase.clone();
        let expect_failed = matches!(point, FaultPoint::AfterPrepare | FaultPoint::AfterBackup);
        assert_eq!(
            phase,
            if expect_failed {
                ApplyPhase::Failed
            } else {
                ApplyPhase::Reverted
            },
            "{point:?}:{n} (files before recovery: {mixed:?})"
        );
        assert_eq!(
            (host.binary().as_str(), host.conf().as_str()),
            ("binary v1", "conf v1"),
            "{point:?}:{n}"
        );
        assert_eq!(
            host.running().as_deref(),
            Some("binary v1"),
            "{point:?}:{n}"
        );
        host.assert_no_temps();
        let recorded = journal.result_of("p1").unwrap().clone();
        let replay = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
        assert!(replay.replayed, "{point:?}:{n}");
        assert_eq!(replay.result, recorded);
        assert!(
            replay.result.reason.contains("agent restarted") || crashing,
            "{}",
            replay.result.reason
        );
        assert_eq!(
            host.binary(),
            "binary v1",
            "{point:?}:{n}: a replay changes nothing"
        );
        // A new patch id applies normally afterwards.
        if !crashing {
            let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
            assert_eq!(report.result.outcome, Outcome::Committed, "{point:?}:{n}");
            assert_eq!(host.binary(), "binary v2");
        }
        let leftovers: Vec<_> = std::fs::read_dir(host.state.join("backups/svc"))
            .unwrap()
            .collect();
        assert!(leftovers.len() <= 1, "{point:?}:{n}: {leftovers:?}");
    }
}

#[tokio::test]
async fn a_committed_journal_survives_restart_as_new() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    drop(engine);
    host.world.lock().unwrap().running = None; // the service died while the agent was down
    let engine = host.engine().await.unwrap();
    assert_eq!(host.binary(), "binary v2");
    assert_eq!(
        host.running().as_deref(),
        Some("binary v2"),
        "an agent-supervised service is started at agent start"
    );
    assert_eq!(engine.status(Some("svc")).await.unwrap()[0].version, "v2");
}

/// Fault isolation: a journal that cannot be read quarantines its service instead of stopping the engine; the
/// service is left as it is, reported, and Apply and Rollback are refused with what to do.
#[tokio::test]
async fn an_unreadable_journal_quarantines_its_service_instead_of_failing_the_start() {
    for garbage in ["bytes", "directory"] {
        let host = Host::new();
        let engine = host.engine().await.unwrap();
        let digest = host.package("v2", V2);
        engine.stage("svc", &digest).await.unwrap();
        engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
        drop(engine);
        let journal = ServiceJournal::path(&host.state, "svc");
        std::fs::remove_file(&journal).unwrap();
        if garbage == "bytes" {
            std::fs::write(&journal, b"{\"current\": garbage").unwrap();
        } else {
            std::fs::create_dir(&journal).unwrap();
        }
        host.world.lock().unwrap().running = None;

        let engine = host.engine().await.unwrap();
        let status = &engine.status(Some("svc")).await.unwrap()[0];
        let reason = status.quarantine.clone().expect("quarantined");
        assert!(
            reason.contains(&journal.display().to_string()) && reason.contains("refuses Apply"),
            "{garbage}: {reason}"
        );
        assert!(reason.contains("move it aside"), "{garbage}: {reason}");
        assert_eq!(
            host.running(),
            None,
            "{garbage}: a quarantined service is not started"
        );
        assert!(
            host.state.join("backups/svc/p1").is_dir(),
            "{garbage}: backups of a quarantined service are untouched"
        );
        let err = engine.apply(apply_cmd(&digest, "p2")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert!(err.to_string().contains("quarantined"), "{err}");
        let err = engine
            .rollback(RollbackCommand {
                caller: String::new(),
                service: "svc".into(),
                to_patch_id: None,
                patch_id: "r1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert_eq!(host.binary(), "binary v2", "{garbage}: nothing changed");
    }
}

/// Following the corrupt-journal advice (move it aside) keeps every backup set: sets the journal does not know
/// are moved to `<state>/quarantine/<service>/` and listed, never deleted; sets the journal knows as finished
/// with are still deleted.
#[tokio::test]
async fn backup_sets_unknown_to_the_journal_are_moved_aside_and_listed() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let crashing = host.package("v2c", &[("svc", "binary v2 crash")]);
    engine.stage("svc", &crashing).await.unwrap();
    let report = engine.apply(apply_cmd(&crashing, "p0")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Reverted);
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    let backup = host.state.join("backups/svc/p1");
    let before: Vec<String> = std::fs::read_dir(&backup)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!before.is_empty());
    // A leftover of a crash between the final journal write and the delete, for a patch id the journal knows.
    let reverted = host.state.join("backups/svc/p0");
    std::fs::create_dir_all(&reverted).unwrap();
    drop(engine);
    let engine = host.engine().await.unwrap();
    assert!(
        !reverted.exists(),
        "a set the journal knows as finished with is deleted"
    );
    assert!(backup.is_dir());
    drop(engine);
    let journal = ServiceJournal::path(&host.state, "svc");
    std::fs::rename(&journal, journal.with_extension("json.bad")).unwrap();

    let engine = host.engine().await.unwrap();
    let kept = host.state.join("quarantine/svc/p1");
    let after: Vec<String> = std::fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(before.len(), after.len());
    assert!(!backup.exists());
    let status = &engine.status(Some("svc")).await.unwrap()[0];
    assert_eq!(status.quarantined_backups, vec![kept.clone()]);
    assert!(status.quarantine.is_none(), "a new journal is not a fault");
    // The service takes patches again, even under the same patch id (its old set is kept aside).
    let v3 = host.package("v3", &[("svc", "binary v3")]);
    engine.stage("svc", &v3).await.unwrap();
    let report = engine.apply(apply_cmd(&v3, "p1")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
    drop(engine);
    let engine = host.engine().await.unwrap();
    assert!(
        host.state.join("backups/svc/p1").is_dir(),
        "referenced: kept in place"
    );
    assert_eq!(
        engine.status(Some("svc")).await.unwrap()[0].quarantined_backups,
        vec![kept]
    );
}

/// Recovery restores and starts the service even when no journal write succeeds; the journal on disk still shows
/// the apply unfinished, so the next start (with a writable journal) restores the same backups again and
/// finishes it.
#[tokio::test]
async fn recovery_restores_and_starts_even_when_the_journal_cannot_be_written() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    *host.faults.armed.lock().unwrap() = Some((FaultPoint::AfterSwap, 1));
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert!(matches!(err, ApplyError::Crash(_)), "{err}");
    drop(engine);
    // Every journal write of this service now fails: its temporary name is taken by a directory.
    let journal = ServiceJournal::path(&host.state, "svc");
    let blocker = crate::fsutil::sibling_temp(&journal, "tmp");
    std::fs::create_dir(&blocker).unwrap();

    let engine = host.engine().await.unwrap();
    assert_eq!(
        (host.binary().as_str(), host.conf().as_str()),
        ("binary v1", "conf v1")
    );
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    let status = &engine.status(Some("svc")).await.unwrap()[0];
    let reason = status.quarantine.clone().expect("quarantined");
    assert!(reason.contains("next start"), "{reason}");
    let on_disk = host.journal().current.unwrap().phase;
    assert!(!on_disk.is_final(), "{on_disk:?}");
    assert!(
        host.state.join("backups/svc/p1").is_dir(),
        "the backups the next start needs are kept"
    );
    let err = engine.apply(apply_cmd(&digest, "p2")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    drop(engine);

    std::fs::remove_dir(&blocker).unwrap();
    let engine = host.engine().await.unwrap();
    assert_eq!(host.journal().current.unwrap().phase, ApplyPhase::Reverted);
    assert_eq!(host.binary(), "binary v1");
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    assert!(
        engine.status(Some("svc")).await.unwrap()[0]
            .quarantine
            .is_none()
    );
    assert!(!host.state.join("backups/svc/p1").exists());
    let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
}

/// A journal write that fails during an apply quarantines the service: nothing live changed, the failure is
/// reported, and later Applies are refused until the agent restarts and reads the journal on disk again.
#[tokio::test]
async fn a_failed_journal_write_during_an_apply_quarantines_the_service_until_restart() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let journal = ServiceJournal::path(&host.state, "svc");
    let blocker = crate::fsutil::sibling_temp(&journal, "tmp");
    std::fs::create_dir(&blocker).unwrap();
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert!(matches!(err, ApplyError::Journal(_)), "{err}");
    assert_eq!(host.binary(), "binary v1", "nothing live changed");
    assert_eq!(host.running().as_deref(), Some("binary v1"));
    let reason = engine.status(Some("svc")).await.unwrap()[0]
        .quarantine
        .clone()
        .expect("quarantined");
    assert!(
        reason.contains("cannot be written") && reason.contains("restart patchd"),
        "{reason}"
    );
    std::fs::remove_dir(&blocker).unwrap();
    let err = engine.apply(apply_cmd(&digest, "p2")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    drop(engine);

    let engine = host.engine().await.unwrap();
    assert!(
        engine.status(Some("svc")).await.unwrap()[0]
            .quarantine
            .is_none()
    );
    let report = engine.apply(apply_cmd(&digest, "p2")).await.unwrap();
    assert_eq!(report.result.outcome, Outcome::Committed);
}
