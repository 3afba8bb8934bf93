//! End to end, real agents over real mTLS: agents that trust key A refuse packages signed by B, unsigned ones and
//! ones whose bytes changed after signing (with the key ids and what to do, nothing staged, the fleet untouched),
//! and install a package signed by A; `minisign` itself verifies what `patchctl package sign` writes. And text a
//! service or agent supplies (an OSC sequence) reaches the operator escaped in `patch` and `display` output.

use patchd_e2e::cluster_fixture::{
    ClusterFixture, FixtureOptions, ORIGINAL_VERSION, ServiceVersion, output_text,
};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `patchctl key generate --out DIR --name NAME`; returns (public key line, secret key path).
fn generate_key(home: &Path, dir: &Path, name: &str) -> (String, PathBuf) {
    let dir_text = dir.to_string_lossy().into_owned();
    let out = patchd_e2e::patchctl(
        home,
        &[
            "--format", "json", "key", "generate", "--out", &dir_text, "--name", name,
        ],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let secret = dir.join(format!("{name}.key"));
    let mode = std::fs::metadata(&secret).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "the secret key is private"
    );
    (report["public_key"].as_str().unwrap().to_string(), secret)
}

fn key_id(public_key: &str) -> String {
    patchd_package::signing::TrustedKey::parse(public_key)
        .unwrap()
        .id()
        .to_string()
}

fn sign(cluster: &ClusterFixture, package: &Path, secret: &Path) {
    cluster.patchctl_ok(&[
        "package",
        "sign",
        package.to_str().unwrap(),
        "--key",
        secret.to_str().unwrap(),
    ]);
}

fn signature_of(package: &Path) -> PathBuf {
    PathBuf::from(format!("{}.minisig", package.display()))
}

/// (result, reason) of every worker in the JSON summary of a patch.
fn worker_results(cluster: &ClusterFixture, stdout: &[u8]) -> Vec<(String, String)> {
    let summary: serde_json::Value = serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON summary ({e}): {}",
            String::from_utf8_lossy(stdout)
        )
    });
    cluster
        .workers()
        .map(|worker| {
            let node = summary["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node"] == worker.id())
                .unwrap_or_else(|| panic!("no {} in {summary}", worker.id()));
            (
                node["result"].as_str().unwrap_or_default().to_string(),
                node["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Patches the cluster with `package`, expects every worker refused with a reason holding each of `mentions`,
/// and the fleet exactly as `before` (same version, same process) with nothing staged.
fn assert_refused(
    cluster: &ClusterFixture,
    package: &Path,
    before: &[ServiceVersion],
    mentions: &[&str],
) {
    let out = cluster.patchctl(&[
        "--format",
        "json",
        "patch",
        &cluster.name,
        package.to_str().unwrap(),
        "-y",
    ]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let mut refused = 0;
    for (result, reason) in worker_results(cluster, &out.stdout) {
        assert_ne!(result, "patched", "{}", output_text(&out));
        // Staging ahead of the batches: once the first refusal halts the rollout (budget 0), a node of a later
        // batch may not have been staged at all.
        if result == "not started" {
            continue;
        }
        refused += 1;
        for mention in mentions {
            assert!(
                reason.contains(mention),
                "reason lacks `{mention}`: {reason}\n{}",
                output_text(&out)
            );
        }
    }
    assert!(
        refused > 0,
        "no node reports the refusal: {}",
        output_text(&out)
    );
    assert_eq!(&cluster.worker_versions(), before, "the fleet is untouched");
    for worker in cluster.workers() {
        let staging = worker.state_dir().join("staging");
        let staged: Vec<_> = std::fs::read_dir(&staging)
            .map(|listing| listing.flatten().map(|entry| entry.file_name()).collect())
            .unwrap_or_default();
        assert!(staged.is_empty(), "{}: staged {staged:?}", worker.name);
    }
}

#[test]
fn agents_trusting_key_a_refuse_other_unsigned_and_altered_packages_and_install_one_signed_by_a() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (key_a, secret_a) = generate_key(dir.path(), &keys, "a");
    let (key_b, secret_b) = generate_key(dir.path(), &keys, "b");
    let (id_a, id_b) = (key_id(&key_a), key_id(&key_b));
    let cluster = ClusterFixture::start(
        dir.path(),
        FixtureOptions {
            workers: 2,
            first_host: 61,
            agent_extra: format!("[trust]\nkeys = [\"{key_a}\"]\nthreshold = 1\n"),
            ..Default::default()
        },
    );
    let before = cluster.worker_versions();
    assert!(before.iter().all(|v| v.version == ORIGINAL_VERSION));

    // Unsigned.
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");
    assert_refused(
        &cluster,
        &package,
        &before,
        &["FailedPrecondition", "not signed", &id_a],
    );

    // Signed by B only.
    sign(&cluster, &package, &secret_b);
    assert_refused(
        &cluster,
        &package,
        &before,
        &["PermissionDenied", &format!("signed by key {id_b}"), &id_a],
    );

    // Signed by A, then the bytes changed: another valid package put in its place, A's signature kept.
    sign(&cluster, &package, &secret_a);
    let other = cluster.worker_package("v1.0.2-hotfix", "ok");
    let altered = dir.path().join("altered").join("demo-worker-v1.0.1.tar.gz");
    std::fs::create_dir_all(altered.parent().unwrap()).unwrap();
    std::fs::copy(&other, &altered).unwrap();
    std::fs::copy(signature_of(&package), signature_of(&altered)).unwrap();
    assert_refused(
        &cluster,
        &altered,
        &before,
        &[
            "PermissionDenied",
            &id_a,
            "bytes changed after it was signed",
        ],
    );

    // What patchctl wrote is a minisign signature: the minisign tool verifies it (and notices the change).
    let public_a = keys.join("a.pub");
    let minisign = |file: &Path| {
        Command::new("minisign")
            .arg("-Vm")
            .arg(file)
            .arg("-p")
            .arg(&public_a)
            .arg("-x")
            .arg(signature_of(&package))
            .output()
            .expect("the minisign tool (apt-get install minisign) verifies patchctl's signatures")
    };
    let verified = minisign(&package);
    assert!(verified.status.success(), "{}", output_text(&verified));
    assert!(!minisign(&altered).status.success());

    // Signed by A: installs on every worker.
    let out = cluster.patchctl(&[
        "--format",
        "json",
        "patch",
        &cluster.name,
        package.to_str().unwrap(),
        "-y",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("Signed by key {id_a}")),
        "the plan header names the signer: {}",
        output_text(&out)
    );
    for (result, _) in worker_results(&cluster, &out.stdout) {
        assert_eq!(result, "patched", "{}", output_text(&out));
    }
    for worker in cluster.workers() {
        let now = cluster.version_of(&worker.name).unwrap();
        assert_eq!(now.version, "v1.0.1-hotfix", "{}", worker.name);
    }
}

#[test]
fn a_service_printing_an_osc_sequence_shows_escaped_in_patch_and_display_output() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterFixture::start(
        dir.path(),
        FixtureOptions {
            workers: 2,
            first_host: 71,
            ..Default::default()
        },
    );
    // A "new version" that prints a window-title OSC, a hyperlink OSC and a colour, then exits.
    let script = dir.path().join("hostile-worker");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf 'boom \\033]0;pwned\\007 \\033]8;;https://evil.example/\\007click\\033]8;;\\007 \\033[31mred\\n'\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let base = dir.path().join("originals").join(format!(
        "demo-worker-{ORIGINAL_VERSION}-linux-x86_64.tar.gz"
    ));
    let package = dir.path().join("demo-worker-v1.0.1-osc.tar.gz");
    cluster.patchctl_ok(&[
        "package",
        "build",
        "--base",
        base.to_str().unwrap(),
        "--replace",
        &format!("demo-worker/demo-worker={}", script.display()),
        "--version",
        "v1.0.1-osc",
        "-o",
        package.to_str().unwrap(),
    ]);
    let worker = cluster.node("worker-1").clone();
    let out = cluster.patchctl(&[
        "patch",
        &cluster.name,
        package.to_str().unwrap(),
        "-y",
        "-N",
        &worker.id(),
    ]);
    let shown = output_text(&out);
    assert_eq!(out.status.code(), Some(3), "reverted: {shown}");
    assert!(
        !out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b),
        "a raw escape reached the terminal: {shown:?}"
    );
    assert!(
        shown.contains("\\x1b]0;pwned\\x07") && shown.contains("\\x1b]8;;https://evil.example/"),
        "{shown}"
    );
    // The store keeps the escaped text: the rollout's audit report shows it the same way.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rollout = stdout
        .lines()
        .find_map(|line| line.strip_prefix("Patch "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no rollout id in {shown}"));
    let audit = cluster.patchctl(&["audit", &cluster.name, "--rollout", rollout]);
    let report = output_text(&audit);
    assert!(audit.status.success(), "{report}");
    assert!(!audit.stdout.contains(&0x1b), "{report:?}");
    assert!(report.contains("\\x1b]0;pwned\\x07"), "{report}");

    // A backup set name on the agent's disk (agent-supplied text in `display`) with an OSC in it.
    let planted = worker
        .state_dir()
        .join("quarantine")
        .join("demo-worker")
        .join("set-\x1b]0;pwned\x07");
    std::fs::create_dir_all(&planted).unwrap();
    let out = cluster.patchctl(&["display", &cluster.name]);
    let shown = output_text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        !out.stdout.contains(&0x1b),
        "raw escape in display: {shown:?}"
    );
    assert!(shown.contains("set-\\x1b]0;pwned\\x07"), "{shown}");
}

#[test]
fn apply_of_a_package_staged_before_keys_were_trusted_needs_a_trusted_signature_whatever_the_controller_says()
 {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (key_a, secret_a) = generate_key(dir.path(), &keys, "a");
    let (_, secret_b) = generate_key(dir.path(), &keys, "b");
    let mut cluster = ClusterFixture::start(
        dir.path(),
        FixtureOptions {
            workers: 2,
            first_host: 81,
            ..Default::default()
        },
    );
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");
    let digest = patchd_package::digest::tree_digest_file(
        &package,
        patchd_package::digest::DEFAULT_CHUNK_SIZE,
    )
    .unwrap();
    let worker = cluster.node("worker-1").clone();
    let before = cluster.version_of("worker-1").unwrap();

    // Staged while the agent trusted no key.
    let addr = cluster.agent("worker-1").unwrap().addr;
    cluster.patchctl_ok(&[
        "agent",
        "push",
        &addr.to_string(),
        package.to_str().unwrap(),
    ]);
    let mut rpc = patchd_e2e::apply_support::AgentRpc::connect(&cluster.pki, addr);
    rpc.stage("demo-worker", &digest).unwrap();
    drop(rpc);

    // Now it trusts key A: a controller calling Apply straight away, unsigned or signed by B, is refused.
    let agent = cluster.agent("worker-1").unwrap();
    let config = agent.config_path().to_path_buf();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[trust]\nkeys = [\"{key_a}\"]\n"));
    std::fs::write(&config, text).unwrap();
    agent.restart();
    let addr = agent.addr;
    let mut rpc = patchd_e2e::apply_support::AgentRpc::connect(&cluster.pki, addr);
    let refused = rpc
        .apply("demo-worker", &digest, "p-unsigned", false)
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("not signed"), "{refused:?}");

    sign(&cluster, &package, &secret_b);
    let by_b = std::fs::read_to_string(signature_of(&package)).unwrap();
    let refused = rpc
        .apply_signed("demo-worker", &digest, "p-by-b", false, vec![by_b])
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let now = cluster.version_of("worker-1").unwrap();
    assert_eq!(
        (now.version.as_str(), now.pid),
        (ORIGINAL_VERSION, before.pid)
    );

    // With A's signature it applies.
    sign(&cluster, &package, &secret_a);
    let by_a = std::fs::read_to_string(signature_of(&package)).unwrap();
    let applied = rpc
        .apply_signed("demo-worker", &digest, "p-by-a", false, vec![by_a])
        .unwrap();
    assert_eq!(
        applied.outcome,
        patchd_e2e::apply_support::v1::ApplyOutcome::Committed as i32,
        "{applied:?}"
    );
    assert_eq!(
        cluster.version_of(&worker.name).unwrap().version,
        "v1.0.1-hotfix"
    );
}
