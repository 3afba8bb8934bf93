//! Cheap checks of `packaging/`: the unit passes `systemd-analyze verify` (and stays hardened), `install.sh` is
//! valid bash and installs/uninstalls a file tree idempotently, and the default `patchd.toml` (with its commented
//! service examples switched on) passes the real `patchd validate`.

use patchd_e2e::{Pki, bin, patchd, workspace_root};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn packaging() -> PathBuf {
    workspace_root().join("packaging")
}

fn text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A deploy root, a state dir path and an agent identity issued by the real `patchctl`.
struct Host {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: Pki,
    agent_cert: PathBuf,
    agent_key: PathBuf,
}

fn host() -> Host {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let pki = Pki::new(&root);
    let tls = pki.issue_agent("host-1", &["127.0.0.1"]);
    fs::create_dir_all(root.join("deploy")).unwrap();
    Host {
        agent_cert: tls.cert,
        agent_key: tls.key,
        _dir: dir,
        root,
        pki,
    }
}

#[test]
fn unit_passes_systemd_analyze_verify_and_stays_hardened() {
    let unit = fs::read_to_string(packaging().join("patchd.service")).unwrap();
    for needle in [
        "ExecStartPre=/usr/bin/patchd validate --config /etc/patchd/patchd.toml",
        "ExecStart=/usr/bin/patchd run --config /etc/patchd/patchd.toml",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/patchd",
        "ProtectHome=",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(needle)),
            "the unit lacks `{needle}`"
        );
    }
    // systemctl reaches systemd over a unix socket: no private network, AF_UNIX allowed.
    assert!(!unit.lines().any(|l| l.starts_with("PrivateNetwork=")));
    let families = unit
        .lines()
        .find(|l| l.starts_with("RestrictAddressFamilies="))
        .unwrap();
    assert!(families.contains("AF_UNIX"), "{families}");

    assert!(
        have("systemd-analyze"),
        "systemd-analyze is not installed, so the unit cannot be verified: install `systemd` (apt-get install \
         systemd), or run scripts/test.sh, which installs systemd-container (it pulls systemd)"
    );
    // verify checks that ExecStart binaries exist: point them at the freshly built agent. The drop-in is the
    // one install.sh writes, so its syntax is verified as well.
    let dir = tempfile::tempdir().unwrap();
    let patchd_bin = bin("patchd");
    fs::write(
        dir.path().join("patchd.service"),
        unit.replace("/usr/bin/patchd", patchd_bin.to_str().unwrap()),
    )
    .unwrap();
    fs::create_dir_all(dir.path().join("patchd.service.d")).unwrap();
    fs::write(
        dir.path().join("patchd.service.d/deploy-roots.conf"),
        format!("[Service]\nReadWritePaths={}\n", dir.path().display()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("patchd.service"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify failed\n{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("patchd.service"),
        "systemd-analyze warns about the unit:\n{stderr}"
    );

    // A bad unit must fail the same check (so the check above means something).
    let broken = dir.path().join("broken.service");
    fs::write(&broken, "[Service]\nExecStart=/nonexistent/patchd run\n").unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "verify accepted a unit whose binary does not exist\n{}",
        text(&out)
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(dir.path().join("patchd.service"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    match report
        .lines()
        .find_map(|l| l.split("Overall exposure level for patchd.service:").nth(1))
    {
        Some(level) => {
            let score: f64 = level.split_whitespace().next().unwrap().parse().unwrap();
            assert!(
                score <= 4.0,
                "the sandbox got weaker: exposure {score}\n{report}"
            );
            println!("systemd-analyze security: exposure {score}");
        }
        None => println!(
            "SKIPPED exposure score: `systemd-analyze security --offline` unsupported\n{}",
            text(&out)
        ),
    }
}

#[test]
fn install_script_is_valid_bash() {
    let script = packaging().join("install.sh");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(out.status.success(), "bash -n install.sh\n{}", text(&out));
    assert!(
        fs::read_to_string(&script)
            .unwrap()
            .contains("set -euo pipefail")
    );
    assert_ne!(
        fs::metadata(&script).unwrap().permissions().mode() & 0o111,
        0,
        "install.sh must be executable"
    );
    if have("shellcheck") {
        let out = Command::new("shellcheck")
            .arg(&script)
            .arg(packaging().join("debian/postinst"))
            .arg(packaging().join("debian/postrm"))
            .output()
            .unwrap();
        assert!(out.status.success(), "shellcheck\n{}", text(&out));
    } else {
        println!("SKIPPED shellcheck: not installed");
    }
}

/// The default config with this host's paths and identity, as an operator would edit it.
fn localised_default_config(host: &Host, with_examples: bool) -> String {
    let mut config = fs::read_to_string(packaging().join("patchd.toml")).unwrap();
    if with_examples {
        // Switch on the commented [[service]] examples: table headers, `key = value` lines, and the `# #`
        // comments that explain them (which become plain comments). Prose lines stay comments.
        config = config
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.starts_with("# ")
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        }) =>
                {
                    rest.to_owned()
                }
                _ => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
    }
    let deploy = host.root.join("deploy");
    config
        .replace("listen = \"127.0.0.1:7480\"", "listen = \"127.0.0.1:0\"")
        .replace("/var/lib/patchd", host.root.join("state").to_str().unwrap())
        .replace(
            "deploy_roots = []",
            &format!("deploy_roots = [\"{}\"]", deploy.display()),
        )
        .replace(
            "/etc/patchd/tls/ca.crt",
            host.pki.ca_cert().to_str().unwrap(),
        )
        .replace(
            "/etc/patchd/tls/agent.crt",
            host.agent_cert.to_str().unwrap(),
        )
        .replace(
            "/etc/patchd/tls/agent.key",
            host.agent_key.to_str().unwrap(),
        )
        .replace("/home/tidb/dm/deploy", deploy.to_str().unwrap())
        .replace("/opt/demo", deploy.to_str().unwrap())
}

#[test]
fn default_config_passes_patchd_validate_and_documents_every_key() {
    let host = host();
    let config = packaging().join("patchd.toml");
    let raw = fs::read_to_string(&config).unwrap();

    // Every active key has a comment right above it (or above its group of lines).
    let lines: Vec<&str> = raw.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        assert!(
            i > 0 && lines[i - 1].starts_with('#'),
            "key without a comment above it: `{line}`"
        );
    }

    // Every key a [[service]] table takes is shown in an example (with the comment the loop above requires).
    for key in [
        "name",
        "component",
        "deploy_dir",
        "install_dir",
        "binary",
        "backend",
        "command",
        "env",
        "restart_on_crash",
        "stop_timeout",
        "user",
        "group",
        "log_max_bytes",
        "log_keep",
        "unit",
        "container",
        "env_add",
        "use_image_defaults",
        "docker_socket",
        "min_healthy",
        "http",
        "tcp",
        "timeout",
    ] {
        assert!(
            raw.lines()
                .any(|line| line.starts_with(&format!("# {key} = "))),
            "the service key `{key}` is not documented in packaging/patchd.toml"
        );
    }

    for with_examples in [false, true] {
        let localised = localised_default_config(&host, with_examples);
        let parsed: toml::Table = toml::from_str(&localised).unwrap();
        let services = parsed
            .get("service")
            .and_then(|s| s.as_array())
            .map_or(0, Vec::len);
        assert_eq!(services, if with_examples { 3 } else { 0 });
        if with_examples {
            assert_eq!(
                localised.lines().filter(|l| *l == "[[service]]").count(),
                3,
                "both examples switched on:\n{localised}"
            );
        }
        let path = host.root.join(format!("patchd-{with_examples}.toml"));
        fs::write(&path, &localised).unwrap();
        let out = patchd(&["validate", "--config", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "patchd validate (examples: {with_examples})\n{}\n{localised}",
            text(&out)
        );
    }
}

#[test]
fn default_config_listens_on_a_named_address_and_the_agent_refuses_a_wildcard() {
    let host = host();
    let raw = fs::read_to_string(packaging().join("patchd.toml")).unwrap();
    let listen: toml::Table = toml::from_str(&raw).unwrap();
    let address = listen["listen"].as_str().unwrap();
    assert!(
        !address.starts_with("0.0.0.0") && !address.starts_with("[::]"),
        "the packaged config listens on a named address: {address}"
    );
    assert_eq!(listen["allow_wildcard_listen"].as_bool(), Some(false));

    let localised = localised_default_config(&host, false);
    let wildcard = localised.replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"");
    assert_ne!(wildcard, localised);
    let path = host.root.join("wildcard.toml");
    fs::write(&path, &wildcard).unwrap();
    let out = patchd(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("listen")
            && said.contains("every interface")
            && said.contains("allow_wildcard_listen"),
        "{said}"
    );
    let allowed = wildcard.replace(
        "allow_wildcard_listen = false",
        "allow_wildcard_listen = true",
    );
    fs::write(&path, &allowed).unwrap();
    let out = patchd(&["validate", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

fn install(args: &[&str]) -> Output {
    Command::new(packaging().join("install.sh"))
        .args(args)
        .output()
        .unwrap()
}

fn tree(root: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            let rel = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .display()
                .to_string();
            let content = if meta.is_file() {
                fs::read(entry.path()).unwrap()
            } else {
                Vec::new()
            };
            out.push((rel, meta.permissions().mode() & 0o7777, content));
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_script_installs_idempotently_keeps_configs_and_uninstalls() {
    let host = host();
    let image = host.root.join("image");
    fs::create_dir_all(&image).unwrap();
    let patchd_bin = bin("patchd");
    let ca = host.pki.ca_cert();
    let base_args = vec![
        "--binary".to_owned(),
        patchd_bin.display().to_string(),
        "--ca".to_owned(),
        ca.display().to_string(),
        "--cert".to_owned(),
        host.agent_cert.display().to_string(),
        "--key".to_owned(),
        host.agent_key.display().to_string(),
        "--deploy-root".to_owned(),
        "/opt/demo".to_owned(),
        "--deploy-root".to_owned(),
        "/home/tidb/deploy".to_owned(),
        "--listen-interface".to_owned(),
        "lo".to_owned(),
        "--root".to_owned(),
        image.display().to_string(),
    ];
    let args: Vec<&str> = base_args.iter().map(String::as_str).collect();

    // An interface that does not exist, or one without an IPv4 address, is refused before anything changes.
    let mut no_such = args.clone();
    let at = no_such.iter().position(|a| *a == "lo").unwrap();
    no_such[at] = "nosuch0";
    let out = install(&no_such);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--listen-interface nosuch0: no such interface"),
        "{}",
        text(&out)
    );
    assert!(tree(&image).is_empty(), "nothing installed");

    let out = install(&args);
    assert!(out.status.success(), "{}", text(&out));
    let mode = |rel: &str| fs::metadata(image.join(rel)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("usr/bin/patchd"), 0o755);
    assert_eq!(mode("etc/patchd/tls"), 0o700);
    assert_eq!(mode("etc/patchd/tls/agent.key"), 0o600);
    assert_eq!(
        fs::read(image.join("etc/patchd/tls/agent.crt")).unwrap(),
        fs::read(&host.agent_cert).unwrap()
    );
    assert_eq!(
        fs::read(image.join("usr/bin/patchd")).unwrap(),
        fs::read(&patchd_bin).unwrap()
    );
    assert_eq!(
        fs::read(image.join("etc/systemd/system/patchd.service")).unwrap(),
        fs::read(packaging().join("patchd.service")).unwrap()
    );
    let dropin =
        fs::read_to_string(image.join("etc/systemd/system/patchd.service.d/deploy-roots.conf"))
            .unwrap();
    assert!(
        dropin.contains("[Service]\nReadWritePaths=/opt/demo /home/tidb/deploy\n"),
        "{dropin}"
    );
    let config = fs::read_to_string(image.join("etc/patchd/patchd.toml")).unwrap();
    assert!(
        config.contains("deploy_roots = [\"/opt/demo\", \"/home/tidb/deploy\"]"),
        "{config}"
    );
    assert!(
        config.contains("\nlisten = \"127.0.0.1:7480\"\n"),
        "listen filled in from --listen-interface lo: {config}"
    );
    assert!(
        image.join("opt/demo").is_dir() && image.join("home/tidb/deploy").is_dir(),
        "deploy roots created"
    );

    // Twice is the same as once.
    let first = tree(&image);
    let out = install(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        tree(&image),
        first,
        "a second run changed the installed tree"
    );

    // The documented upgrade (no --deploy-root) keeps the sandbox's deploy roots: the existing drop-in stays,
    // and without one it is rebuilt from deploy_roots of the installed config.
    let dropin_path = image.join("etc/systemd/system/patchd.service.d/deploy-roots.conf");
    let upgrade_args: Vec<&str> = {
        let mut upgrade = Vec::new();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            if *arg == "--deploy-root" {
                rest.next();
            } else {
                upgrade.push(*arg);
            }
        }
        upgrade
    };
    let out = install(&upgrade_args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        tree(&image),
        first,
        "a run without --deploy-root changed the installed tree"
    );
    fs::remove_file(&dropin_path).unwrap();
    let out = install(&upgrade_args);
    assert!(out.status.success(), "{}", text(&out));
    let rebuilt = fs::read_to_string(&dropin_path).unwrap();
    assert!(
        rebuilt.contains("[Service]\nReadWritePaths=/opt/demo /home/tidb/deploy\n"),
        "{rebuilt}"
    );
    assert_eq!(tree(&image), first, "the rebuilt drop-in differs");

    // An operator's edits survive a re-install; --force-config replaces them and keeps a backup.
    let edited = format!("{config}\n# edited by the operator\n");
    fs::write(image.join("etc/patchd/patchd.toml"), &edited).unwrap();
    let out = install(&args);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("kept the existing"),
        "{}",
        text(&out)
    );
    assert_eq!(
        fs::read_to_string(image.join("etc/patchd/patchd.toml")).unwrap(),
        edited
    );
    let mut forced = args.clone();
    forced.push("--force-config");
    let out = install(&forced);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fs::read_to_string(image.join("etc/patchd/patchd.toml")).unwrap(),
        config
    );
    assert_eq!(
        fs::read_to_string(image.join("etc/patchd/patchd.toml.bak")).unwrap(),
        edited
    );

    // Bad input is refused before anything changes.
    let mut missing_key = args.clone();
    let key_at = missing_key.iter().position(|a| *a == "--key").unwrap();
    missing_key[key_at + 1] = "/nonexistent/agent.key";
    let out = install(&missing_key);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--key /nonexistent/agent.key"),
        "{}",
        text(&out)
    );
    let out = install(&["--binary", patchd_bin.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // Uninstall keeps the state directory (and the config, saved there); --purge removes it.
    fs::create_dir_all(image.join("var/lib/patchd/blobs")).unwrap();
    let root_arg = image.to_str().unwrap();
    let out = install(&["--uninstall", "--root", root_arg]);
    assert!(out.status.success(), "{}", text(&out));
    for gone in [
        "usr/bin/patchd",
        "etc/patchd",
        "etc/systemd/system/patchd.service",
        "etc/systemd/system/patchd.service.d",
    ] {
        assert!(!image.join(gone).exists(), "{gone} left after --uninstall");
    }
    assert!(image.join("var/lib/patchd/blobs").is_dir());
    assert_eq!(
        fs::read_to_string(image.join("var/lib/patchd/patchd.toml.uninstalled")).unwrap(),
        config
    );
    assert!(
        image.join("opt/demo").is_dir(),
        "deploy roots are the services', never removed"
    );
    let out = install(&["--uninstall", "--root", root_arg]);
    assert!(
        out.status.success(),
        "uninstalling twice is fine\n{}",
        text(&out)
    );
    let out = install(&["--uninstall", "--purge", "--root", root_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!image.join("var/lib/patchd").exists());
}
