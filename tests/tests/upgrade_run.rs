//! End-to-end: `patchctl upgrade` runs a runbook of controller-side steps (an SQL check, `http` with `save`/
//! `restore`, `sql` with a resolve check and an undo, marks, an assertion) for real: against an HTTP server this
//! test starts on port 0 and the private MariaDB of `scripts/mariadb.sh` (a password read from the environment,
//! never stored). Success with `audit`; a failing check before any change (exit 1, nothing changed); a failing
//! step after changes (undos run, the saved HA value restored, exit 3); `patchctl` aborted right after each
//! journal write in turn, then `--resume`: every step's effect happened exactly once; `rollback --upgrade`.
//!
//! Needs the binaries: `cargo build --workspace --bins --features patchd-agent/fault-injection,patchctl/fault-injection`
//! (the crash case uses `PATCHCTL_FAULT_UPGRADE_EXIT_AFTER`). Fails (never skips) without MariaDB.

use patchd_e2e::cluster_fixture::free_port;
use patchd_e2e::mariadb::MariaDb;
use patchd_e2e::{Pki, bin};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

const PASSWORD: &str = "upg-pw-7d1e5";
const PASSWORD_ENV: &str = "UPGRADE_RUN_TEST_DB_PASSWORD";

/// The HA parameter service: GET answers `{"value": V}`, PUT sets V to the request body; every call counted by
/// method and body.
#[derive(Clone, Default)]
struct ParamServer {
    state: Arc<Mutex<(String, HashMap<String, usize>)>>,
}

impl ParamServer {
    fn start() -> (Self, u16) {
        let server = ParamServer::default();
        server.reset();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = server.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = state.clone();
                std::thread::spawn(move || state.serve(stream));
            }
        });
        (server, port)
    }

    fn reset(&self) {
        let mut state = self.state.lock().expect("lock");
        *state = ("on".to_string(), HashMap::new());
    }

    fn value(&self) -> String {
        self.state.lock().expect("lock").0.clone()
    }

    fn count(&self, call: &str) -> usize {
        self.state
            .lock()
            .expect("lock")
            .1
            .get(call)
            .copied()
            .unwrap_or(0)
    }

    fn serve(&self, stream: std::net::TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let method = request_line.split(' ').next().unwrap_or("").to_string();
        let answer = {
            let mut state = self.state.lock().expect("lock");
            let call = if method == "PUT" {
                format!("PUT {body}")
            } else {
                method.clone()
            };
            *state.1.entry(call).or_insert(0) += 1;
            if method == "PUT" {
                state.0 = body;
            }
            serde_json::json!({ "value": state.0 }).to_string()
        };
        let mut stream = stream;
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            answer.len(),
            answer
        );
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    db: MariaDb,
    home: PathBuf,
    server: ParamServer,
    runbook: PathBuf,
    failing_runbook: PathBuf,
    unresolvable_runbook: PathBuf,
}

const RUNBOOK: &str = r#"
runbook: upgrade-run-test
roles: [app]
params:
  api: http://127.0.0.1:API_PORT
  refetch_min: 30
steps:
  - id: no-open-tasks
    scope: cluster
    check:
      sql: { database: upg, query: "SELECT id FROM task WHERE status <> 'FINISHED'" }
      expect: { no_rows: true }
  - id: ha-read
    scope: cluster
    http: { url: "{api}/ha", save: "ha_config = value" }
  - id: ha-off
    scope: cluster
    http: { method: PUT, url: "{api}/ha", body: "off" }
    undo: { http: { method: PUT, url: "{api}/ha", restore: ha_config } }
  - id: bump
    scope: cluster
    sql:
      database: upg
      statements:
        - INSERT INTO effects (step) VALUES ('bump')
    resolve:
      sql: { database: upg, query: "SELECT 1 FROM effects WHERE step = 'bump' HAVING COUNT(*) = 0" }
      expect: { no_rows: true }
    undo: { sql: { database: upg, statements: ["DELETE FROM effects WHERE step = 'bump'"] } }
  - id: t1
    scope: node
    mark: T1
FAILING
  - id: ha-on
    scope: cluster
    http: { method: PUT, url: "{api}/ha", restore: ha_config }
    undo: { http: { method: PUT, url: "{api}/ha", body: "off" } }
  - id: t2
    scope: cluster
    mark: T2
  - id: window
    scope: cluster
    assert: "T2 - T1 < {refetch_min}m"
"#;

const FAILING_STEP: &str = r#"  - id: doomed
    scope: cluster
    check:
      http: { url: "{api}/ha" }
      expect: { field: value, equals: "never" }
"#;

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = MariaDb::start(&dir.path().join("mariadb"));
        db.sql(
            None,
            &format!(
                "CREATE DATABASE upg; \
                 CREATE TABLE upg.task (id INT PRIMARY KEY, status VARCHAR(32)); \
                 INSERT INTO upg.task VALUES (1, 'FINISHED'); \
                 CREATE TABLE upg.effects (n INT AUTO_INCREMENT PRIMARY KEY, step VARCHAR(32)); \
                 CREATE USER 'upg'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'; \
                 GRANT ALL ON upg.* TO 'upg'@'127.0.0.1';"
            ),
        );
        let pki = Pki::new(dir.path());
        let home = pki.home().to_path_buf();
        let (server, api_port) = ParamServer::start();
        // No agent listens on the node: the runbook's steps all run on the controller; its lease call goes
        // unanswered, which (as for a patch rollout) is a warning, not a refusal.
        let topology = format!(
            "name: upg\nagent:\n  port: {}\nroles:\n  app:\n    nodes:\n      - {{ host: 127.0.0.1, port: 9, name: app-1, \
             deploy_dir: /srv/app }}\ndatabases:\n  upg: {{ host: 127.0.0.1, port: {}, user: upg, password_env: {PASSWORD_ENV} }}\n",
            free_port("127.0.0.1"),
            db.port
        );
        let topology_path = dir.path().join("topology.yaml");
        std::fs::write(&topology_path, topology).expect("write topology");
        let imported = run(
            &home,
            &[
                "cluster",
                "import",
                "upg",
                topology_path.to_str().expect("utf-8"),
            ],
            None,
        );
        assert!(imported.status.success(), "{}", text(&imported));
        let body = RUNBOOK.replace("API_PORT", &api_port.to_string());
        let runbook = dir.path().join("runbook.yaml");
        std::fs::write(&runbook, body.replace("FAILING\n", "")).expect("write runbook");
        let failing_runbook = dir.path().join("failing.yaml");
        std::fs::write(&failing_runbook, body.replace("FAILING\n", FAILING_STEP))
            .expect("write runbook");
        // `bump` without its resolve check: after a crash mid-step only the operator can tell.
        let unresolvable_runbook = dir.path().join("unresolvable.yaml");
        let without_resolve = body.replace("FAILING\n", "").replace(
            "    resolve:\n      sql: { database: upg, query: \"SELECT 1 FROM effects WHERE step = 'bump' HAVING COUNT(*) = 0\" }\n      expect: { no_rows: true }\n",
            "",
        );
        assert!(!without_resolve.contains("resolve:"));
        std::fs::write(&unresolvable_runbook, without_resolve).expect("write runbook");
        Rig {
            _dir: dir,
            db,
            home,
            server,
            runbook,
            failing_runbook,
            unresolvable_runbook,
        }
    }

    fn effects(&self) -> usize {
        self.db
            .sql(
                Some("upg"),
                "SELECT COUNT(*) FROM effects WHERE step = 'bump'",
            )
            .trim()
            .parse()
            .expect("count")
    }

    fn reset(&self) {
        self.db.sql(Some("upg"), "DELETE FROM effects");
        self.server.reset();
    }

    fn upgrade(&self, runbook: &Path, fault_after: Option<usize>) -> Output {
        run(
            &self.home,
            &["upgrade", "upg", runbook.to_str().expect("utf-8"), "-y"],
            fault_after,
        )
    }

    fn audit(&self, id: &str) -> serde_json::Value {
        let out = run(
            &self.home,
            &["--format", "json", "audit", "--rollout", id],
            None,
        );
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).expect("audit JSON")
    }
}

fn run(home: &Path, args: &[&str], fault_after: Option<usize>) -> Output {
    let mut command = Command::new(bin("patchctl"));
    command
        .args(args)
        .env("PATCHCTL_HOME", home)
        .env(PASSWORD_ENV, PASSWORD)
        // Every log line on: the password must be in none of them either.
        .env("PATCHCTL_LOG", "debug")
        .env_remove("PATCHCTL_FAULT_UPGRADE_EXIT_AFTER")
        .stdin(Stdio::null());
    if let Some(n) = fault_after {
        command.env("PATCHCTL_FAULT_UPGRADE_EXIT_AFTER", n.to_string());
    }
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run patchctl {args:?}: {e}"));
    assert!(
        !text(&out).contains(PASSWORD),
        "patchctl {args:?} showed the database password:\n{}",
        text(&out)
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The upgrade id `patchctl upgrade` announced (`Upgrade <ID> started ...`).
fn upgrade_id(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .find_map(|line| {
            let (id, rest) = line.strip_prefix("Upgrade ")?.split_once(' ')?;
            rest.starts_with("started").then(|| id.to_string())
        })
        .unwrap_or_else(|| panic!("no upgrade id announced:\n{}", text(out)))
}

fn steps_by_outcome(audit: &serde_json::Value) -> HashMap<String, String> {
    audit["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|row| {
            (
                row["step"].as_str().expect("step").to_string(),
                row["outcome"].as_str().expect("outcome").to_string(),
            )
        })
        .collect()
}

#[test]
fn controller_side_upgrades_run_fail_roll_back_resume_after_crashes_and_undo() {
    let rig = Rig::new();

    // 1. Success, with progress lines and an audit showing outcomes, saved values, marks and the window.
    let out = rig.upgrade(&rig.runbook, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[4/8] bump ... done (1 statement(s) on upg)"),
        "{stdout}"
    );
    assert!(stdout.contains("[5/8] t1@app-1 ... done"), "{stdout}");
    let id = upgrade_id(&out);
    assert_eq!(rig.effects(), 1);
    assert_eq!(rig.server.value(), "on");
    assert_eq!(rig.server.count("PUT off"), 1);
    assert_eq!(rig.server.count("PUT on"), 1);
    let audit = rig.audit(&id);
    assert_eq!(audit["upgrade"]["outcome"], "completed");
    let outcomes = steps_by_outcome(&audit);
    assert_eq!(outcomes.len(), 8, "{audit}");
    assert!(
        outcomes.values().all(|outcome| outcome == "done"),
        "{audit}"
    );
    assert_eq!(audit["saved"][0], serde_json::json!(["ha_config", "on"]));
    assert_eq!(audit["windows"][0][0], "T2 - T1");
    assert!(audit["windows"][0][1].as_i64().expect("seconds") >= 0);
    let store = std::fs::read(rig.home.join("patchctl.db")).expect("store");
    assert!(
        !String::from_utf8_lossy(&store).contains(PASSWORD),
        "the database password is in the store"
    );

    let list = run(&rig.home, &["--format", "json", "audit", "upg"], None);
    assert!(list.status.success(), "{}", text(&list));
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("audit list JSON");
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .any(|entry| entry["id"] == id.as_str()
                && entry["kind"] == "upgrade"
                && entry["state"] == "completed"),
        "{list}"
    );

    // 2. `rollback --upgrade`: every done step undone, newest first; the HA value is the one saved.
    let out = run(
        &rig.home,
        &["rollback", "upg", "--upgrade", &id, "-y"],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(rig.effects(), 0);
    assert_eq!(rig.server.value(), "on");
    let audit = rig.audit(&id);
    assert_eq!(audit["upgrade"]["outcome"], "undone");
    let outcomes = steps_by_outcome(&audit);
    for undone in ["ha-off", "bump", "ha-on"] {
        assert_eq!(outcomes[undone], "undone", "{audit}");
    }

    // 3. A failing check before any change: exit 1, nothing changed.
    rig.reset();
    rig.db
        .sql(Some("upg"), "INSERT INTO task VALUES (2, 'RUNNING')");
    let out = rig.upgrade(&rig.runbook, None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was changed"),
        "{}",
        text(&out)
    );
    assert_eq!(rig.server.count("PUT off"), 0);
    assert_eq!(rig.server.count("GET"), 0);
    assert_eq!(rig.effects(), 0);
    rig.db.sql(Some("upg"), "DELETE FROM task WHERE id = 2");

    // 4. A failing step after changes: the undos run newest first (HA back to its saved value), exit 3.
    rig.reset();
    let out = rig.upgrade(&rig.failing_runbook, None);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(rig.effects(), 0);
    assert_eq!(rig.server.value(), "on");
    assert_eq!(rig.server.count("PUT on"), 1, "the restore of ha_config");
    let audit = rig.audit(&upgrade_id(&out));
    assert_eq!(audit["upgrade"]["outcome"], "rolled_back");
    let outcomes = steps_by_outcome(&audit);
    assert_eq!(outcomes["doomed"], "failed");
    assert_eq!(outcomes["ha-off"], "undone");
    assert_eq!(outcomes["bump"], "undone");
    assert!(!outcomes.contains_key("ha-on"), "{audit}");

    // 5. patchctl aborted right after its k-th journal write, for every k, then resumed: each effect once.
    let mut k = 1;
    loop {
        rig.reset();
        let out = rig.upgrade(&rig.runbook, Some(k));
        if out.status.code() == Some(0) {
            break; // the run has fewer journal writes than k
        }
        assert!(
            out.status.code().is_none_or(|code| code != 1 && code != 3),
            "k={k}: {}",
            text(&out)
        );
        let id = upgrade_id(&out);
        let resumed = run(&rig.home, &["upgrade", "upg", "--resume", &id, "-y"], None);
        assert_eq!(resumed.status.code(), Some(0), "k={k}: {}", text(&resumed));
        assert_eq!(rig.effects(), 1, "k={k}: the SQL step ran other than once");
        assert_eq!(rig.server.count("PUT off"), 1, "k={k}: ha-off");
        assert_eq!(rig.server.count("PUT on"), 1, "k={k}: ha-on");
        assert_eq!(rig.server.count("GET"), 1, "k={k}: ha-read");
        assert_eq!(rig.server.value(), "on", "k={k}");
        assert_eq!(rig.audit(&id)["upgrade"]["outcome"], "completed", "k={k}");
        k += 1;
        assert!(k < 60, "the run never finished without a fault");
    }
    assert!(
        k > 10,
        "only {k} journal writes: the crash loop did not cover the run"
    );

    // 6. A crash right after `bump` started, and no resolve check: the resume halts naming the step and how to go
    // on (exit 130); the operator's answer is journaled and the upgrade completes with the effect once.
    rig.reset();
    let started_bump = 7; // check, ha-read and ha-off started and finished, then `bump` started
    let out = rig.upgrade(&rig.unresolvable_runbook, Some(started_bump));
    assert_eq!(out.status.code(), None, "aborted: {}", text(&out));
    let id = upgrade_id(&out);
    assert_eq!(rig.effects(), 0);
    let halted = run(&rig.home, &["upgrade", "upg", "--resume", &id, "-y"], None);
    assert_eq!(halted.status.code(), Some(130), "{}", text(&halted));
    let stderr = String::from_utf8_lossy(&halted.stderr);
    assert!(
        stderr.contains(&format!("--resume {id} --took-effect bump")),
        "{stderr}"
    );
    assert!(stderr.contains("--not-taken bump"), "{stderr}");
    assert_eq!(rig.effects(), 0, "a halt runs nothing");
    let out = run(
        &rig.home,
        &[
            "upgrade",
            "upg",
            "--resume",
            &id,
            "--not-taken",
            "bump",
            "-y",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(rig.effects(), 1);
    assert_eq!(rig.server.value(), "on");
}
