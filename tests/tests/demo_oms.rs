//! End-to-end: the OMS demo the upgrade tests run on (`demo-oms`, `patchd_e2e::oms_rig`), with no patchd involved.
//! Images v4.3.0 and v4.3.1 built locally: v4.3.0 serves on the guide's V4.3.0 config.yaml, v4.3.1 exits 1 on it
//! and serves on the V4.3.1 one; `sh /root/docker_upgrade.sh` in a container appends one line to the mounted logs;
//! the rig's dump and load actions, run as the agents would with the `oms` user's defaults file, round-trip a
//! database; the console serves `ha.config` and counts its PUTs. Fails (never skips) without Docker or MariaDB.

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures::StreamExt;
use patchd_e2e::docker::DockerTest;
use patchd_e2e::mariadb::MariaDb;
use patchd_e2e::oms_rig::{
    CONFIG_430, CONFIG_431, NEW_VERSION, OLD_VERSION, OmsMaster, UPGRADE_LOG, container_body,
    dump_argv, empty_dump_argv, free_port_on, load_argv, oms_image, seed_databases,
    write_db_defaults,
};
use patchd_e2e::wait_for;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn served_version(addr: &str) -> Option<String> {
    let (status, body) = patchd_e2e::apply_support::http_get(addr, "/version")?;
    let info: serde_json::Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| info["version"].as_str().map(str::to_string))?
}

fn deploy_dir(root: &Path, config: &str) -> std::path::PathBuf {
    for sub in ["logs", "store", "run"] {
        std::fs::create_dir_all(root.join(sub)).expect("mount dirs");
    }
    std::fs::write(root.join("config.yaml"), config).expect("config.yaml");
    root.to_path_buf()
}

/// `argv` with `{db}` replaced, as the agent renders a declared action.
fn render(argv: &[String], db: &str) -> Command {
    let argv: Vec<String> = argv.iter().map(|arg| arg.replace("{db}", db)).collect();
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]).env_clear();
    command
}

#[test]
fn demo_oms_images_check_their_config_and_run_docker_upgrade_sh() {
    let dir = tempfile::tempdir().expect("temp dir");
    let docker = DockerTest::connect("upg-oms-demo");
    let old = oms_image(&docker, dir.path(), OLD_VERSION, None);
    let new = oms_image(&docker, dir.path(), NEW_VERSION, None);
    let host = "127.0.93.9";

    // v4.3.1 on the old keys: exits 1.
    let old_config = deploy_dir(&dir.path().join("old"), CONFIG_430);
    let port = free_port_on(host);
    let refused = docker.name("new-on-old");
    docker.create_container(
        &refused,
        container_body(&new, host, port, &old_config, "demo_oms"),
        true,
    );
    wait_for(Duration::from_secs(60), "v4.3.1 to exit", || {
        docker
            .inspect_container(&refused)
            .and_then(|c| c.state)
            .is_some_and(|state| state.running == Some(false) && state.exit_code.is_some())
    });
    let state = docker
        .inspect_container(&refused)
        .and_then(|c| c.state)
        .expect("state");
    assert_eq!(state.exit_code, Some(1), "{state:?}");
    docker.remove_container(&refused);

    // v4.3.0 on the old keys serves; docker_upgrade.sh appends one line per run.
    let running = docker.name("old-on-old");
    docker.create_container(
        &running,
        container_body(&old, host, port, &old_config, "demo_oms"),
        true,
    );
    let addr = format!("{host}:{port}");
    wait_for(Duration::from_secs(60), "v4.3.0 serving", || {
        served_version(&addr).as_deref() == Some(OLD_VERSION)
    });
    for run in 1..=2 {
        let exit = docker.block_on(async {
            let client = docker.client();
            let exec = client
                .create_exec(
                    &running,
                    CreateExecOptions {
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        cmd: Some(vec![
                            "sh".to_string(),
                            "/root/docker_upgrade.sh".to_string(),
                        ]),
                        ..Default::default()
                    },
                )
                .await
                .expect("create exec");
            if let StartExecResults::Attached { mut output, .. } = client
                .start_exec(&exec.id, None::<StartExecOptions>)
                .await
                .expect("start exec")
            {
                while let Some(chunk) = output.next().await {
                    eprintln!("docker_upgrade.sh: {:?}", chunk.expect("exec output"));
                }
            }
            client
                .inspect_exec(&exec.id)
                .await
                .expect("inspect exec")
                .exit_code
        });
        assert_eq!(exit, Some(0));
        let log = std::fs::read_to_string(old_config.join(UPGRADE_LOG)).expect("upgrade log");
        assert_eq!(log.lines().count(), run, "{log}");
        assert!(log.contains(host), "{log}");
    }
    docker.remove_container(&running);

    // v4.3.1 on the migrated keys serves.
    let new_config = deploy_dir(&dir.path().join("new"), CONFIG_431);
    let upgraded = docker.name("new-on-new");
    docker.create_container(
        &upgraded,
        container_body(&new, host, port, &new_config, "demo_oms"),
        true,
    );
    wait_for(Duration::from_secs(60), "v4.3.1 serving", || {
        served_version(&addr).as_deref() == Some(NEW_VERSION)
    });
}

#[test]
fn the_rigs_database_actions_dump_and_load_as_user_oms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = MariaDb::start(&dir.path().join("mariadb"));
    seed_databases(&db, "secret-1");
    let defaults = write_db_defaults(dir.path(), &db, "secret-1");
    let before = db.sql(Some("cm_hb"), "SELECT * FROM heatbeat_sequence ORDER BY id");

    let dump = render(&dump_argv(&defaults), "cm_hb")
        .output()
        .expect("run the dump action");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(String::from_utf8_lossy(&dump.stdout).contains("CREATE TABLE"));
    let empty = render(&empty_dump_argv(&defaults), "cm")
        .output()
        .expect("run the empty dump action");
    assert!(
        empty.status.success(),
        "{}",
        String::from_utf8_lossy(&empty.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&empty.stdout),
        "",
        "dump-nothing dumps nothing"
    );

    db.sql(Some("cm_hb"), "DELETE FROM heatbeat_sequence WHERE id < 4");
    let mut load = render(&load_argv(&defaults), "cm_hb")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the load action");
    load.stdin
        .take()
        .expect("stdin")
        .write_all(&dump.stdout)
        .expect("feed the dump");
    let loaded = load.wait_with_output().expect("load");
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    assert_eq!(
        db.sql(Some("cm_hb"), "SELECT * FROM heatbeat_sequence ORDER BY id"),
        before
    );
}

/// `PUT <path>` with `body` over a plain socket; returns the status line's code and the body.
fn put(addr: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the console");
    write!(
        stream,
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn the_console_serves_ha_config_and_counts_its_puts() {
    let master = OmsMaster::start("127.0.93.253");
    let addr = master.addr.to_string();
    let original = master.ha_config();
    assert!(original.contains("\"enable\":true"), "{original}");
    let (status, body) =
        patchd_e2e::apply_support::http_get(&addr, "/api/system/params/ha.config").expect("GET");
    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["value"], original.as_str());

    assert_eq!(
        put(
            &addr,
            "/api/system/params/ha.config",
            r#"{"enable": false}"#
        )
        .0,
        200
    );
    assert_eq!(master.ha_config(), r#"{"enable": false}"#);
    assert_eq!(put(&addr, "/api/system/params/ha.config", &original).0, 200);
    let stats = master.stats();
    assert_eq!(stats["value"], original.as_str(), "{stats}");
    assert_eq!(stats["puts"], 2, "{stats}");
    assert_eq!(
        stats["put_values"],
        serde_json::json!([r#"{"enable": false}"#, original]),
        "{stats}"
    );
}
