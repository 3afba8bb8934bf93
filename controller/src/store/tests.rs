//! Store tests: migrations, every query, and the rollout lock across real processes.

use super::lock::ProcessIdentity;
use super::*;
use patchd_package::digest::TreeDigest;
use rusqlite::params;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open_home(&Home::at(dir.path().join("home"))).expect("open store");
    (dir, store)
}

/// A valid tree digest made of `tag` repeated (tags are two hex characters: "d1", "d2").
fn digest(tag: &str) -> TreeDigest {
    tag.repeat(32).parse().expect("test digest")
}

fn new_rollout(id: &str, cluster: &str) -> NewRollout {
    NewRollout {
        id: id.into(),
        cluster: cluster.into(),
        kind: RolloutKind::Patch,
        package_digest: Some(digest("ab")),
        package_path: "/tmp/p.tar.gz".into(),
        version: "v1.0.1".into(),
        plan_json: "{}".into(),
        options_json: "{}".into(),
    }
}

#[test]
fn schema_is_created_once_and_newer_files_are_refused() {
    let (dir, store) = temp_store();
    let path = store.path().to_path_buf();
    let id = store.store_id().expect("store id");
    assert!(id.starts_with("store-") && id.len() == 22, "{id}");
    let (_other_dir, other) = temp_store();
    assert_ne!(
        other.store_id().expect("other id"),
        id,
        "each store has its own id"
    );
    drop(store);
    let reopened = Store::open(&path).expect("reopen");
    assert_eq!(reopened.store_id().expect("id kept"), id);
    let version: i64 = reopened
        .conn()
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .expect("user_version");
    assert_eq!(version, MIGRATIONS.len() as i64);
    let mode: String = reopened
        .conn()
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .expect("mode");
    assert_eq!(mode, "wal");
    reopened
        .conn()
        .pragma_update(None, "user_version", 99)
        .expect("bump");
    drop(reopened);
    let error = Store::open(&path).expect_err("newer schema refused");
    assert!(
        matches!(error, StoreError::NewerSchema { found: 99, .. }),
        "{error}"
    );
    drop(dir);
}

#[test]
fn clusters_are_saved_updated_and_listed() {
    let (_dir, store) = temp_store();
    assert!(store.load_cluster("demo").expect("load").is_none());
    assert!(
        store
            .save_cluster("demo", "roles: {}\n", "/a.yaml")
            .expect("save")
    );
    assert!(store.save_cluster("alpha", "x", "/b.yaml").expect("save"));
    let first = store.load_cluster("demo").expect("load").expect("exists");
    assert!(
        !store
            .save_cluster("demo", "version: v2\n", "/c.yaml")
            .expect("re-import")
    );
    let updated = store.load_cluster("demo").expect("load").expect("exists");
    assert_eq!(updated.yaml, "version: v2\n");
    assert_eq!(updated.source_path, "/c.yaml");
    assert_eq!(updated.created_at, first.created_at);
    assert!(updated.imported_at >= first.imported_at);
    let names: Vec<String> = store
        .list_clusters()
        .expect("list")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["alpha", "demo"]);
}

#[test]
fn marks_and_role_packages_upsert() {
    let (_dir, store) = temp_store();
    store
        .mark_patched("demo", "n1", "r1", &digest("d1"), "v1")
        .expect("mark");
    store
        .mark_patched("demo", "n1", "r2", &digest("d2"), "v2")
        .expect("mark again");
    store
        .mark_patched("demo", "n2", "r2", &digest("d2"), "v2")
        .expect("mark");
    store
        .mark_patched("other", "n1", "r9", &digest("d9"), "v9")
        .expect("mark");
    let marks = store.node_marks("demo").expect("marks");
    assert_eq!(marks.len(), 2);
    assert_eq!(
        (marks[0].node_id.as_str(), marks[0].rollout_id.as_str()),
        ("n1", "r2")
    );
    store.unmark_patched("demo", "n1").expect("unmark");
    assert_eq!(store.node_marks("demo").expect("marks").len(), 1);

    store
        .set_role_package("demo", "worker", &digest("d1"), "/p1", "v1")
        .expect("set");
    store
        .set_role_package("demo", "worker", &digest("d2"), "/p2", "v2")
        .expect("overwrite");
    let packages = store.role_packages("demo").expect("packages");
    assert_eq!(packages.len(), 1);
    assert_eq!(
        (packages[0].digest.as_str(), packages[0].path.as_str()),
        (digest("d2").as_str(), "/p2")
    );
    assert!(store.role_packages("other").expect("packages").is_empty());

    store.forget_deployment("demo").expect("forget");
    assert!(store.node_marks("demo").expect("marks").is_empty());
    assert!(store.role_packages("demo").expect("packages").is_empty());
    assert_eq!(
        store.node_marks("other").expect("marks").len(),
        1,
        "another cluster keeps its marks"
    );
}

#[test]
fn journal_report_and_resume_lookup() {
    let (_dir, store) = temp_store();
    store
        .create_rollout(&new_rollout("r1", "demo"))
        .expect("create");
    store
        .create_rollout(&new_rollout("r2", "other"))
        .expect("create");
    assert!(
        store.create_rollout(&new_rollout("r1", "demo")).is_err(),
        "IDs are unique"
    );
    assert_eq!(
        store.rollout("r1").expect("get").expect("exists").state,
        RolloutState::Planned
    );
    assert_eq!(
        store
            .unfinished_rollout("demo")
            .expect("lookup")
            .map(|r| r.id),
        Some("r1".into())
    );

    store
        .set_rollout_state("r1", RolloutState::Running)
        .expect("state");
    store
        .set_node_state("r1", "n2", NodeRolloutState::Pending)
        .expect("node");
    store
        .set_node_state("r1", "n1", NodeRolloutState::Pending)
        .expect("node");
    store
        .record_node_step("r1", "n2", "offline", "started", "")
        .expect("step");
    std::thread::sleep(Duration::from_millis(20));
    store
        .record_node_step("r1", "n2", "offline", "ok", "")
        .expect("step");
    store
        .record_node_step("r1", "n2", "apply", "started", "")
        .expect("step");
    std::thread::sleep(Duration::from_millis(20));
    store
        .record_node_step("r1", "n2", "apply", "reverted", "health check failed: 503")
        .expect("step");
    store
        .set_node_state("r1", "n2", NodeRolloutState::Reverted)
        .expect("node");
    store
        .record_node_step("r1", "n1", "apply", "ok", "")
        .expect("step");
    store
        .set_node_state("r1", "n1", NodeRolloutState::Done)
        .expect("node");

    let states = store.node_states("r1").expect("states");
    let summary: Vec<(&str, NodeRolloutState)> = states
        .iter()
        .map(|state| (state.node_id.as_str(), state.state))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("n2", NodeRolloutState::Reverted),
            ("n1", NodeRolloutState::Done)
        ]
    );

    let report = store.rollout_report("r1").expect("report").expect("exists");
    assert_eq!(report.rollout.state, RolloutState::Running);
    assert_eq!(report.nodes.len(), 2);
    let n2 = &report.nodes[0];
    assert_eq!(n2.node_id, "n2");
    assert_eq!(n2.state, Some(NodeRolloutState::Reverted));
    assert_eq!(n2.steps.len(), 4);
    assert_eq!(n2.steps[0].duration_ms, None);
    assert!(n2.steps[1].duration_ms.expect("offline took time") >= 20);
    assert!(n2.steps[3].duration_ms.expect("apply took time") >= 20);
    assert!(n2.duration_ms >= 40);
    assert_eq!(n2.reason.as_deref(), Some("health check failed: 503"));
    assert_eq!(report.nodes[1].reason, None);
    assert!(store.rollout_report("nope").expect("report").is_none());

    store
        .set_rollout_state("r1", RolloutState::Halted)
        .expect("state");
    assert!(store.unfinished_rollout("demo").expect("lookup").is_none());
    assert!(matches!(
        store.set_rollout_state("nope", RolloutState::Running),
        Err(StoreError::NotFound { .. })
    ));
    let all: Vec<String> = store
        .list_rollouts(None)
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(all, vec!["r1", "r2"]);
    let demo: Vec<String> = store
        .list_rollouts(Some("demo"))
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(demo, vec!["r1"]);
}

#[test]
fn enums_round_trip_through_their_names() {
    for state in NodeRolloutState::ALL {
        assert_eq!(state.as_str().parse::<NodeRolloutState>(), Ok(state));
    }
    for state in RolloutState::ALL {
        assert_eq!(state.as_str().parse::<RolloutState>(), Ok(state));
    }
    assert!("bogus".parse::<NodeRolloutState>().is_err());
    assert!(new_rollout_id().starts_with('r'));
}

#[test]
fn second_connection_is_refused_with_the_holder_named() {
    let (_dir, first) = temp_store();
    let second = Store::open(first.path()).expect("second connection");
    let lock = first.acquire_rollout_lock("demo").expect("first lock");
    assert!(lock.taken_over_from.is_none());
    let error = second
        .acquire_rollout_lock("demo")
        .expect_err("second refused");
    let StoreError::Locked { pid, .. } = &error else {
        panic!("expected Locked, got {error}");
    };
    assert_eq!(*pid, std::process::id());
    let message = error.to_string();
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert!(message.contains("started 20"), "{message}");
    assert!(
        message.contains("patchctl cluster unlock demo"),
        "{message}"
    );
    // Another cluster is independent.
    let other = second.acquire_rollout_lock("other").expect("other cluster");
    drop(lock);
    let again = second
        .acquire_rollout_lock("demo")
        .expect("released on drop");
    again.release().expect("explicit release");
    assert!(first.rollout_lock_holder("demo").expect("holder").is_none());
    drop(other);
}

#[test]
fn lock_of_a_dead_process_is_taken_over() {
    let (_dir, store) = temp_store();
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead_pid = child.id();
    child.wait().expect("reap");
    let me = ProcessIdentity::current();
    store
        .conn()
        .execute(
            "INSERT INTO rollout_locks (cluster, token, pid, host, boot_id, proc_start, started_at)
                 VALUES ('demo', 'old', ?1, ?2, ?3, NULL, 1)",
            params![dead_pid, me.host, me.boot_id],
        )
        .expect("plant stale lock");
    let lock = store
        .acquire_rollout_lock("demo")
        .expect("stale lock taken over");
    assert_eq!(
        lock.taken_over_from.as_ref().map(|holder| holder.pid),
        Some(dead_pid)
    );

    // A holder on another host is never presumed dead.
    store
        .conn()
        .execute(
            "INSERT INTO rollout_locks (cluster, token, pid, host, boot_id, proc_start, started_at)
                 VALUES ('remote', 't', ?1, 'some-other-host', NULL, NULL, 1)",
            params![dead_pid],
        )
        .expect("plant remote lock");
    let error = store
        .acquire_rollout_lock("remote")
        .expect_err("remote holder respected");
    assert!(error.to_string().contains("some-other-host"), "{error}");
    assert_eq!(
        store
            .force_unlock("remote", false)
            .expect("unlock")
            .map(|holder| holder.pid),
        Some(dead_pid)
    );
    let remote = store.acquire_rollout_lock("remote").expect("after unlock");

    // A live holder on this host (this very process) is respected unless forced.
    let error = store
        .force_unlock("remote", false)
        .expect_err("live local holder respected");
    assert!(
        matches!(error, StoreError::HolderAlive { pid, .. } if pid == me.pid),
        "{error}"
    );
    assert!(error.to_string().contains("--force"), "{error}");
    assert!(
        store
            .rollout_lock_holder("remote")
            .expect("holder")
            .is_some()
    );
    assert_eq!(
        store
            .force_unlock("remote", true)
            .expect("forced unlock")
            .map(|holder| holder.pid),
        Some(me.pid)
    );
    drop(remote);
}

/// Not a test on its own: the child process of `lock_between_processes` (holds the lock until stdin closes).
#[test]
#[ignore = "helper process for lock_between_processes"]
fn lock_holder_child() {
    let Some(path) = std::env::var_os("PATCHCTL_STORE_LOCK_CHILD") else {
        return;
    };
    let store = Store::open(Path::new(&path)).expect("child opens store");
    let _lock = store.acquire_rollout_lock("demo").expect("child locks");
    println!("\nlocked");
    std::io::stdout().flush().expect("flush");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn lock_between_processes() {
    let (_dir, store) = temp_store();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "store::tests::lock_holder_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PATCHCTL_STORE_LOCK_CHILD", store.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let child_pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let (said_locked, locked) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness may print `test … ... ` on the same line before the child's output.
            if line.trim_end().ends_with("locked") {
                let _ = said_locked.send(());
            }
        }
    });
    if locked.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child process did not take the lock within 120 s");
    }
    let error = store
        .acquire_rollout_lock("demo")
        .expect_err("refused while the child runs");
    assert!(
        matches!(&error, StoreError::Locked { pid, .. } if *pid == child_pid),
        "{error}"
    );
    assert!(
        error.to_string().contains(&format!("pid {child_pid}")),
        "{error}"
    );

    // SIGKILL: the child cannot release; its row stays and must be recognised as stale.
    child.kill().expect("kill child");
    child.wait().expect("reap child");
    assert_eq!(
        store
            .rollout_lock_holder("demo")
            .expect("holder")
            .map(|h| h.pid),
        Some(child_pid)
    );
    let lock = store
        .acquire_rollout_lock("demo")
        .expect("taken over after SIGKILL");
    assert_eq!(
        lock.taken_over_from.as_ref().map(|holder| holder.pid),
        Some(child_pid)
    );
}
