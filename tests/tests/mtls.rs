//! Mutual TLS end to end: the agent serves the cluster's controller and refuses every other client (no
//! certificate, another CA, an agent certificate, an expired one); the controller refuses an agent whose
//! certificate does not name the host it dialed, or that comes from another CA.

use patchd_e2e::{AgentConfig, AgentProcess, Pki, TlsPaths, patchctl, patchctl_ok};
use patchd_tls::{CertSpec, CertificateAuthority, Role};
use std::path::{Path, PathBuf};

/// A TLS directory for `patchctl --tls-dir`: ca.crt plus a "controller" identity copied from `cert`/`key`.
fn tls_dir(dir: &Path, ca: &Path, cert: &Path, key: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(ca, dir.join("ca.crt")).unwrap();
    std::fs::copy(cert, dir.join("controller.crt")).unwrap();
    std::fs::copy(key, dir.join("controller.key")).unwrap();
    dir.to_path_buf()
}

fn info_with(pki: &Pki, agent: &AgentProcess, tls_dir: &Path) -> std::process::Output {
    patchctl(
        pki.home(),
        &[
            "agent",
            "info",
            &agent.addr_string(),
            "--tls-dir",
            &tls_dir.to_string_lossy(),
        ],
    )
}

fn assert_refused(out: &std::process::Output, case: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{case}: expected a refusal (exit 1), got {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn agent_serves_the_controller_and_refuses_every_other_client() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let agent_tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    let config = AgentConfig::new(&dir.path().join("agent-1"), &agent_tls).write();
    let agent = AgentProcess::start(&config);

    // The controller of this cluster is served.
    let out = patchctl_ok(
        pki.home(),
        &["--format", "json", "agent", "info", &agent.addr_string()],
    );
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["protocol_version"], 3);
    assert!(info["cpu_count"].as_u64().unwrap() >= 1);
    assert!(info["state_dir_free_bytes"].as_u64().unwrap() > 0);

    // A client certificate from another CA (the client still trusts the right CA, so only the agent can refuse).
    let other_home = dir.path().join("other-home");
    patchctl_ok(&other_home, &["ca", "init"]);
    patchctl_ok(
        &other_home,
        &["cert", "issue", "controller", "--role", "controller"],
    );
    let other = tls_dir(
        &dir.path().join("tls-other-ca"),
        &pki.ca_cert(),
        &other_home.join("tls/controller.crt"),
        &other_home.join("tls/controller.key"),
    );
    assert_refused(
        &info_with(&pki, &agent, &other),
        "client certificate from another CA",
    );

    // An agent certificate (EKU serverAuth only) presented as a client.
    let as_client = tls_dir(
        &dir.path().join("tls-agent-as-client"),
        &pki.ca_cert(),
        &agent_tls.cert,
        &agent_tls.key,
    );
    assert_refused(
        &info_with(&pki, &agent, &as_client),
        "agent certificate used as a client",
    );

    // An expired controller certificate from the right CA.
    let ca = CertificateAuthority::load(&pki.tls_dir()).unwrap();
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    let expired = ca
        .issue(
            &CertSpec::new("controller", Role::Controller, vec![], 1)
                .with_validity(past, past + time::Duration::days(1)),
        )
        .unwrap()
        .write(&dir.path().join("expired"), "controller")
        .unwrap();
    let expired_dir = tls_dir(
        &dir.path().join("tls-expired"),
        &pki.ca_cert(),
        &expired.cert,
        &expired.key,
    );
    assert_refused(
        &info_with(&pki, &agent, &expired_dir),
        "expired controller certificate",
    );

    // No client certificate at all (patchctl cannot do this: a test-only client).
    let no_cert = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(info_without_client_cert(&pki.ca_cert(), &agent));
    assert!(
        no_cert.is_err(),
        "a client without a certificate was served: {no_cert:?}"
    );

    // The agent survived all of that and still serves its controller.
    patchctl_ok(pki.home(), &["agent", "info", &agent.addr_string()]);
}

async fn info_without_client_cert(ca: &Path, agent: &AgentProcess) -> Result<(), String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("127.0.0.1");
    let channel = Endpoint::from_shared(format!("https://{}", agent.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = patchd_proto::v1::agent_client::AgentClient::new(channel);
    client
        .info(patchd_proto::v1::InfoRequest {})
        .await
        .map_err(|e| format!("info: {e:?}"))?;
    Ok(())
}

#[test]
fn controller_refuses_an_agent_that_does_not_name_the_dialed_host_or_comes_from_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());

    // The agent listens on 127.0.0.1 but its certificate names only 127.0.0.2.
    let wrong_host = pki.issue_agent("agent-wrong-host", &["127.0.0.2"]);
    let config = AgentConfig::new(&dir.path().join("wrong-host"), &wrong_host).write();
    let agent = AgentProcess::start(&config);
    let out = patchctl(pki.home(), &["agent", "info", &agent.addr_string()]);
    assert_refused(&out, "agent certificate not naming the dialed host");
    drop(agent);

    // The agent's certificate (and the CA it trusts) come from another cluster.
    let other_home = dir.path().join("other-home");
    patchctl_ok(&other_home, &["ca", "init"]);
    let foreign_out = dir.path().join("foreign");
    patchctl_ok(
        &other_home,
        &[
            "cert",
            "issue",
            "agent-foreign",
            "--role",
            "agent",
            "--san",
            "127.0.0.1",
            "--out",
            &foreign_out.to_string_lossy(),
        ],
    );
    let foreign = TlsPaths {
        ca: other_home.join("tls/ca.crt"),
        cert: foreign_out.join("agent-foreign.crt"),
        key: foreign_out.join("agent-foreign.key"),
    };
    let config = AgentConfig::new(&dir.path().join("foreign-agent"), &foreign).write();
    let agent = AgentProcess::start(&config);
    let out = patchctl(pki.home(), &["agent", "info", &agent.addr_string()]);
    assert_refused(&out, "agent certificate from another CA");
}

#[test]
fn ca_init_refuses_to_overwrite_and_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let before = std::fs::read(pki.ca_cert()).unwrap();
    let out = patchctl(pki.home(), &["ca", "init"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "the refusal says how to override"
    );
    assert_eq!(
        before,
        std::fs::read(pki.ca_cert()).unwrap(),
        "the CA was not replaced"
    );
    let agent = pki.issue_agent("a", &["127.0.0.1"]);
    for key in [
        pki.tls_dir().join("ca.key"),
        pki.controller().key,
        agent.key,
    ] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", key.display());
    }
    patchctl_ok(pki.home(), &["ca", "init", "--force"]);
    assert_ne!(
        before,
        std::fs::read(pki.ca_cert()).unwrap(),
        "--force replaced the CA"
    );
}
