//! The `process` backend's hardening, end to end with a real `patchd`: a service configured with `user = "nobody"`
//! runs as nobody with no supplementary groups (also after an apply restarted it), `patchd validate` refuses a
//! process service without `user` (and unknown users, groups, and too small log bounds), and a service that
//! writes more than `log_max_bytes` ends with bounded, rotated log files.

use patchd_e2e::apply_support::{
    AgentRpc, ServiceReaper, WorkerService, outcome, push, service_pid, worker_package,
};
use patchd_e2e::{AgentConfig, AgentProcess, Pki, patchd, toml_string, wait_for};
use patchd_proto::v1::ApplyOutcome;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const NOBODY: u32 = 65534;

/// A temp dir nobody can traverse (tempdir makes it 0700), so a service running as nobody reaches its deploy dir.
fn traversable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The `Uid:`, `Gid:` and `Groups:` lines of /proc/<pid>/status, values only.
fn proc_identity(pid: i32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

#[track_caller]
fn assert_runs_as_nobody(pid: i32) {
    let (uid, gid, groups) = proc_identity(pid);
    let all = |id: u32| format!("{id} {id} {id} {id}");
    assert_eq!(
        uid,
        all(NOBODY),
        "real, effective, saved and fs uid of {pid}"
    );
    assert_eq!(
        gid,
        all(NOBODY),
        "gids of {pid} (nobody's primary group, nogroup)"
    );
    assert_eq!(groups, "", "no supplementary groups are left to {pid}");
}

#[test]
fn a_process_service_runs_as_its_user_without_supplementary_groups_also_after_an_apply() {
    let dir = traversable_tempdir();
    let pki = Pki::new(dir.path());
    let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    let agent_dir = dir.path().join("agent-1");
    let worker = WorkerService::new(&agent_dir.join("deploy"), "worker-nobody");
    worker.install("v1.0.0");
    std::fs::set_permissions(&agent_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config =
        AgentConfig::new(&agent_dir, &tls).extra(&worker.toml_as("nobody", "300ms", "10s"));
    let config_path = config.write();
    let state = config.state_path().to_path_buf();
    let reaper = ServiceReaper::new(&state);
    let mut agent = AgentProcess::start(&config_path);
    worker.wait_serving("v1.0.0");
    reaper.track("worker-nobody");

    let pid = service_pid(&state, "worker-nobody").expect("the agent records the service's pid");
    assert_runs_as_nobody(pid);
    let (agent_uid, _, _) = proc_identity(agent.pid().expect("agent pid") as i32);
    assert!(
        agent_uid.starts_with("0 "),
        "the agent itself runs as root: {agent_uid}"
    );

    // An apply restarts the service: the new process runs as nobody too.
    let packages = dir.path().join("packages");
    let good = worker_package(&packages, "v1.1.0", "ok");
    let digest = push(&pki, &agent.addr_string(), &good);
    let mut rpc = AgentRpc::connect(&pki, agent.addr);
    rpc.stage("worker-nobody", &digest).unwrap();
    let applied = rpc.apply("worker-nobody", &digest, "p1", false).unwrap();
    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
    reaper.track("worker-nobody");
    let restarted = service_pid(&state, "worker-nobody").expect("pid after the apply");
    assert_ne!(restarted, pid, "the apply restarted the service");
    assert_eq!(worker.served_version().as_deref(), Some("v1.1.0"));
    assert_runs_as_nobody(restarted);

    agent.stop();
    reaper.reap();
}

#[test]
fn validate_refuses_a_process_service_without_user_or_with_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    let check = |name: &str, service_lines: &str| {
        let config = AgentConfig::new(&dir.path().join(name), &tls);
        let deploy = config.dir().join("deploy/w");
        let path = config
            .extra(&format!(
                "[[service]]\nname = \"w\"\ncomponent = \"w\"\ndeploy_dir = {}\nbackend = \"process\"\n\
                 command = [\"/bin/true\"]\n{service_lines}",
                toml_string(&deploy.to_string_lossy())
            ))
            .write();
        let out = patchd(&["validate", "--config", &path.to_string_lossy()]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    let (ok, text) = check("no-user", "");
    assert!(!ok, "a process service without user was accepted:\n{text}");
    assert!(
        text.contains("service[0] (w)")
            && text.contains("needs `user`")
            && text.contains("user = \"root\""),
        "the message names the service, the key and how to run as root on purpose:\n{text}"
    );

    let (ok, text) = check("unknown-user", "user = \"patchd-no-such-user\"\n");
    assert!(!ok, "{text}");
    assert!(
        text.contains("user \"patchd-no-such-user\" does not exist"),
        "{text}"
    );

    let (ok, text) = check(
        "unknown-group",
        "user = \"nobody\"\ngroup = \"patchd-no-such-group\"\n",
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("group \"patchd-no-such-group\" does not exist"),
        "{text}"
    );

    let (ok, text) = check("tiny-log", "user = \"nobody\"\nlog_max_bytes = 10\n");
    assert!(!ok, "{text}");
    assert!(text.contains("log_max_bytes 10 is too small"), "{text}");

    let (ok, text) = check("root-on-purpose", "user = \"root\"\n");
    assert!(ok, "an explicit root is accepted:\n{text}");
    let (ok, text) = check("nobody", "user = \"nobody\"\ngroup = \"nogroup\"\n");
    assert!(ok, "{text}");
}

/// Names and sizes of the service's log files in `<state>/logs`.
fn log_files(logs: &Path, service: &str) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(logs)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{service}.log"))
        })
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                entry.metadata().unwrap().len(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_service_writing_past_log_max_bytes_ends_with_bounded_rotated_logs() {
    const MAX: u64 = 64 * 1024;
    const LINE: usize = 4096;
    const LINES: usize = 256; // 1 MiB in all, sixteen times the bound
    let dir = traversable_tempdir();
    let pki = Pki::new(dir.path());
    let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    let agent_dir = dir.path().join("agent-1");
    let deploy = agent_dir.join("deploy/chatty");
    std::fs::create_dir_all(&deploy).unwrap();
    std::fs::set_permissions(&agent_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Lines of 4 KiB at a steady pace (so several rotations happen while it writes), then a last line (spelt so
    // that the command line the agent logs at start does not contain it), then idle.
    let script = format!(
        "i=0; while [ $i -lt {LINES} ]; do head -c {} /dev/zero | tr '\\0' x; echo; i=$((i+1)); sleep 0.01; done; \
         printf 'finished-%s\\n' writing; exec sleep 600",
        LINE - 1
    );
    let config = AgentConfig::new(&agent_dir, &tls).extra(&format!(
        "[[service]]\nname = \"chatty\"\ncomponent = \"chatty\"\ndeploy_dir = {}\nbackend = \"process\"\n\
         command = [\"/bin/sh\", \"-c\", {}]\nuser = \"nobody\"\nlog_max_bytes = {MAX}\nlog_keep = 2\n",
        toml_string(&deploy.to_string_lossy()),
        toml_string(&script)
    ));
    let config_path = config.write();
    let state = config.state_path().to_path_buf();
    let reaper = ServiceReaper::new(&state);
    let mut agent = AgentProcess::start(&config_path);
    wait_for(
        Duration::from_secs(10),
        "the agent to record the service",
        || service_pid(&state, "chatty").is_some(),
    );
    reaper.track("chatty");

    let logs = state.join("logs");
    let finished_in = |name: &str| {
        std::fs::read_to_string(logs.join(name)).is_ok_and(|t| t.contains("finished-writing"))
    };
    // Done when the service has written everything and the agent has brought the live file back under the bound.
    wait_for(
        Duration::from_secs(60),
        "the service to finish writing and its log to be rotated under the bound",
        || {
            (finished_in("chatty.log") || finished_in("chatty.log.1"))
                && std::fs::metadata(logs.join("chatty.log")).is_ok_and(|m| m.len() <= MAX)
        },
    );
    let files = log_files(&logs, "chatty");
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["chatty.log", "chatty.log.1", "chatty.log.2"],
        "the live file and log_keep = 2 rotated ones, nothing else: {files:?}"
    );
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    let written = (LINE * LINES) as u64;
    assert!(
        total < written / 2,
        "{total} bytes kept of {written} written: the logs are bounded ({files:?})"
    );
    // A rotated file holds at most the bound plus what the service wrote between two checks.
    for (name, len) in &files {
        assert!(*len <= 4 * MAX, "{name} has {len} bytes: {files:?}");
    }
    let newest = std::fs::read_to_string(logs.join("chatty.log.1")).unwrap();
    assert!(
        newest
            .lines()
            .any(|l| l.len() == LINE - 1 && l.bytes().all(|b| b == b'x')),
        "chatty.log.1 holds the service's output"
    );
    assert_eq!(
        proc_identity(service_pid(&state, "chatty").unwrap()).0,
        format!("{NOBODY} {NOBODY} {NOBODY} {NOBODY}"),
        "the shell runs as nobody"
    );

    agent.stop();
    reaper.reap();
}
