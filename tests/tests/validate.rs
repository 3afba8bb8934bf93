//! `patchd validate` (and `patchd run`) on each kind of bad config: each exits non-zero and names the bad key
//! or path; a good config passes.

use patchd_e2e::{AgentConfig, Pki, TlsPaths, patchd};
use std::path::{Path, PathBuf};

struct Fixture {
    dir: tempfile::TempDir,
    pki: Pki,
    tls: TlsPaths,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    Fixture { dir, pki, tls }
}

impl Fixture {
    fn config(&self, name: &str) -> AgentConfig {
        AgentConfig::new(&self.dir.path().join(name), &self.tls)
    }
}

/// Runs `patchd validate`; returns (success, stdout + stderr).
fn validate(config: &Path) -> (bool, String) {
    let out = patchd(&["validate", "--config", &config.to_string_lossy()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[track_caller]
fn assert_invalid(config: &Path, must_mention: &[&str]) {
    let (ok, text) = validate(config);
    assert!(!ok, "{} was accepted:\n{text}", config.display());
    for needle in must_mention {
        assert!(
            text.contains(needle),
            "the message does not mention `{needle}`:\n{text}"
        );
    }
}

fn rewrite(path: &Path, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "`{from}` not in {text}");
    std::fs::write(path, text.replace(from, to)).unwrap();
    path.to_path_buf()
}

const SERVICE: &str = "[[service]]\nname = \"w\"\ncomponent = \"demo-worker\"\nbackend = \"process\"\nuser = \"nobody\"\n";

#[test]
fn a_good_config_validates() {
    let f = fixture();
    let config = f.config("good");
    let deploy = config.dir().join("deploy");
    let path = config
        .clone()
        .extra(&format!(
            "{SERVICE}deploy_dir = \"{}/w\"\ncommand = [\"/bin/true\"]\n",
            deploy.display()
        ))
        .write();
    let (ok, text) = validate(&path);
    assert!(ok, "{text}");
    assert!(text.contains("OK"), "{text}");
    assert!(!config.state_path().exists(), "validate creates nothing");
}

#[test]
fn unreadable_or_malformed_configs_are_refused() {
    let f = fixture();
    let missing = f.dir.path().join("nowhere/patchd.toml");
    assert_invalid(&missing, &["nowhere/patchd.toml"]);

    let path = f.config("syntax").write();
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nstate_dir = \n").unwrap();
    assert_invalid(&path, &["line 2"]);

    let path = f.config("unknown").extra("bogus_setting = 1\n").write();
    assert_invalid(&path, &["bogus_setting"]);

    let path = f
        .config("unknown-in-service")
        .extra(&format!(
            "{SERVICE}deploy_dir = \"/x\"\ncommand = [\"x\"]\ncolour = \"red\"\n"
        ))
        .write();
    assert_invalid(&path, &["colour"]);

    let path = f.config("bad-listen").write();
    rewrite(&path, "listen = \"127.0.0.1:0\"", "listen = \"localhost\"");
    assert_invalid(&path, &["listen"]);
}

#[test]
fn bad_paths_are_named() {
    let f = fixture();

    let path = f
        .config("relative-state")
        .state_dir(Path::new("state"))
        .write();
    assert_invalid(&path, &["state_dir", "relative"]);

    let file_as_parent = f.dir.path().join("a-file");
    std::fs::write(&file_as_parent, "").unwrap();
    let path = f
        .config("state-under-file")
        .state_dir(&file_as_parent.join("state"))
        .write();
    assert_invalid(&path, &["state_dir", "not a directory"]);

    let config = f.config("missing-root");
    let root = config.dir().join("deploy");
    let path = config.write();
    std::fs::remove_dir(&root).unwrap();
    assert_invalid(&path, &["deploy_roots[0]", &root.to_string_lossy()]);

    let config = f.config("outside-root");
    let path = config
        .extra(&format!(
            "{SERVICE}deploy_dir = \"/etc/w\"\ncommand = [\"x\"]\n"
        ))
        .write();
    assert_invalid(
        &path,
        &["deploy_dir", "/etc/w", "not under any deploy root"],
    );

    let config = f.config("escaping-root");
    let deploy = config.dir().join("deploy");
    let path = config
        .extra(&format!(
            "{SERVICE}deploy_dir = \"{}/../../etc\"\ncommand = [\"x\"]\n",
            deploy.display()
        ))
        .write();
    assert_invalid(&path, &["deploy_dir", ".."]);
}

#[test]
fn bad_tls_files_are_named() {
    let f = fixture();

    let path = f.config("missing-cert").write();
    rewrite(
        &path,
        &f.tls.cert.to_string_lossy(),
        "/nonexistent/agent.crt",
    );
    assert_invalid(&path, &["tls.cert", "/nonexistent/agent.crt"]);

    // A directory where the key should be: exists, but cannot be read as a file.
    let path = f.config("key-is-dir").write();
    let key_dir = f.dir.path().join("key-dir");
    std::fs::create_dir(&key_dir).unwrap();
    rewrite(
        &path,
        &f.tls.key.to_string_lossy(),
        &key_dir.to_string_lossy(),
    );
    assert_invalid(&path, &["tls.key", &key_dir.to_string_lossy()]);

    let garbage = f.dir.path().join("garbage.key");
    std::fs::write(&garbage, "not a key\n").unwrap();
    let path = f.config("garbage-key").write();
    rewrite(
        &path,
        &f.tls.key.to_string_lossy(),
        &garbage.to_string_lossy(),
    );
    assert_invalid(&path, &["tls.key", "garbage.key"]);

    // The key of another certificate.
    let other = f.pki.issue_agent("agent-2", &["127.0.0.1"]);
    let path = f.config("mismatched-key").write();
    rewrite(
        &path,
        &f.tls.key.to_string_lossy(),
        &other.key.to_string_lossy(),
    );
    assert_invalid(&path, &["tls.key", "does not belong"]);

    // A controller certificate cannot serve as an agent certificate.
    let controller = f.pki.controller();
    let path = f.config("controller-cert").write();
    rewrite(
        &path,
        &f.tls.cert.to_string_lossy(),
        &controller.cert.to_string_lossy(),
    );
    rewrite(
        &path,
        &f.tls.key.to_string_lossy(),
        &controller.key.to_string_lossy(),
    );
    assert_invalid(&path, &["tls.cert", "not an agent certificate"]);

    // A certificate the configured CA did not issue.
    let other_home = f.dir.path().join("other-home");
    patchd_e2e::patchctl_ok(&other_home, &["ca", "init"]);
    let path = f.config("other-ca").write();
    rewrite(
        &path,
        &f.tls.ca.to_string_lossy(),
        &other_home.join("tls/ca.crt").to_string_lossy(),
    );
    assert_invalid(&path, &["tls.cert", "not issued by the CA"]);
}

#[test]
fn bad_services_are_named() {
    let f = fixture();
    let config = f.config("services");
    let deploy = config.dir().join("deploy");
    let path = config
        .extra(&format!(
            "{SERVICE}deploy_dir = \"{0}/w\"\n\n[[service]]\nname = \"w\"\ncomponent = \"demo-worker\"\nbackend = \"systemd\"\ndeploy_dir = \"{0}/w2\"\n",
            deploy.display()
        ))
        .write();
    assert_invalid(
        &path,
        &[
            "needs `command`",
            "needs `unit`",
            "service[1].name",
            "declared twice",
        ],
    );
}

#[test]
fn run_refuses_a_bad_config_without_serving() {
    let f = fixture();
    let path = f
        .config("run-bad")
        .extra(&format!(
            "{SERVICE}deploy_dir = \"/etc/w\"\ncommand = [\"x\"]\n"
        ))
        .write();
    let out = patchd(&["run", "--config", &path.to_string_lossy()]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("patchd listening"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not under any deploy root"));
}

#[test]
fn trust_keys_that_do_not_parse_and_an_unreachable_threshold_are_named() {
    let f = fixture();
    let missing = f.dir.path().join("missing.pub");
    let config = f
        .config("trust")
        .extra(&format!(
            "[trust]\nkeys = [\"RWnot-a-minisign-key\", \"{}\"]\nthreshold = 3\n",
            missing.display()
        ))
        .write();
    assert_invalid(
        &config,
        &[
            "trust.keys[0]",
            "not a minisign public key",
            "trust.keys[1]",
            "missing.pub",
            "trust.threshold",
        ],
    );
}
