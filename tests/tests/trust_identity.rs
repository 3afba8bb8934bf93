//! Trust, end to end (issue 15, identities): TLS 1.3 only; a revoked controller certificate is refused at the next
//! connection without restarting the agent; an `observer` certificate can `display` but not patch, and the agent
//! records which operator applied what; `cert issue` refuses the CA's names, existing names and wildcards, and
//! works with the CA key kept in another directory.

use patchd_e2e::apply_support::AgentRpc;
use patchd_e2e::cluster_fixture::{ClusterFixture, ORIGINAL_VERSION, output_text};
use patchd_e2e::{AgentConfig, AgentProcess, Pki, bin, patchctl, patchctl_ok};
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

fn assert_refused(out: &Output, case: &str) {
    assert_eq!(out.status.code(), Some(1), "{case}:\n{}", output_text(out));
}

/// Copies `from` over `to` the way an operator's deploy tool would: a temporary, then a rename.
fn install_file(from: &Path, to: &Path) {
    let temporary = to.with_extension("tmp");
    std::fs::copy(from, &temporary).unwrap();
    std::fs::rename(&temporary, to).unwrap();
}

#[test]
fn a_revoked_controller_certificate_is_refused_at_the_next_connection_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let agent_tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    // The agent starts with the CA's (empty) CRL, installed where its config names it.
    patchctl_ok(pki.home(), &["ca", "crl"]);
    let crl = dir.path().join("agent-1-ca.crl");
    install_file(&pki.tls_dir().join("ca.crl"), &crl);
    let config = AgentConfig::new(&dir.path().join("agent-1"), &agent_tls)
        .crl(&crl)
        .write();
    let mut agent = AgentProcess::start(&config);
    let pid = agent.pid();
    let info = ["agent", "info", &agent.addr_string()];
    patchctl_ok(pki.home(), &info);

    // Revoked by its file: refused at the next connection.
    let revoked = patchctl_ok(
        pki.home(),
        &["ca", "revoke", &pki.controller().cert.to_string_lossy()],
    );
    assert!(revoked.contains("revoked serial"), "{revoked}");
    install_file(&pki.tls_dir().join("ca.crl"), &crl);
    assert_refused(
        &patchctl(pki.home(), &info),
        "revoked controller certificate",
    );
    assert!(agent.is_running(), "the agent was not restarted");
    assert_eq!(agent.pid(), pid);

    // A new certificate for the same controller works at once; revoked by its serial, it is refused too.
    let issued = patchctl_ok(
        pki.home(),
        &[
            "--format",
            "json",
            "cert",
            "issue",
            "controller",
            "--role",
            "operator",
            "--operator",
            "alice",
            "--force",
        ],
    );
    patchctl_ok(pki.home(), &info);
    let serial = serde_json::from_str::<serde_json::Value>(&issued).unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    patchctl_ok(pki.home(), &["ca", "revoke", &serial]);
    install_file(&pki.tls_dir().join("ca.crl"), &crl);
    assert_refused(
        &patchctl(pki.home(), &info),
        "certificate revoked by serial",
    );

    // A CRL this CA did not sign would lock every controller out: `patchd validate` names it, and the running
    // agent refuses connections (fail closed) until a good one is back.
    let other_home = dir.path().join("other-home");
    patchctl_ok(&other_home, &["ca", "init"]);
    patchctl_ok(&other_home, &["ca", "crl"]);
    install_file(&other_home.join("tls/ca.crl"), &crl);
    let validate = std::process::Command::new(bin("patchd"))
        .args(["validate", "--config", &config.to_string_lossy()])
        .output()
        .unwrap();
    assert!(!validate.status.success());
    let text = output_text(&validate);
    assert!(
        text.contains("tls.crl") && text.contains("not signed by the CA"),
        "{text}"
    );
    patchctl_ok(
        pki.home(),
        &[
            "cert",
            "issue",
            "controller",
            "--role",
            "operator",
            "--force",
        ],
    );
    assert_refused(&patchctl(pki.home(), &info), "CRL of another CA");
    install_file(&pki.tls_dir().join("ca.crl"), &crl);
    patchctl_ok(pki.home(), &info);
    assert_eq!(
        agent.pid(),
        pid,
        "served by the same agent process throughout"
    );
    assert!(
        agent.stderr().contains("Revoked"),
        "the agent logs why it refused:\n{}",
        agent.stderr()
    );
}

#[test]
fn a_tls12_only_client_is_refused_and_a_tls13_client_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let agent_tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    let config = AgentConfig::new(&dir.path().join("agent-1"), &agent_tls).write();
    let agent = AgentProcess::start(&config);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tls12 = runtime.block_on(handshake(&pki, &agent, &rustls::version::TLS12));
    assert!(tls12.is_err(), "a TLS 1.2 handshake succeeded");
    let tls13 = runtime.block_on(handshake(&pki, &agent, &rustls::version::TLS13));
    assert_eq!(tls13, Ok(rustls::ProtocolVersion::TLSv1_3));
}

/// A handshake with the controller's identity, offering only `version`; the negotiated version.
async fn handshake(
    pki: &Pki,
    agent: &AgentProcess,
    version: &'static rustls::SupportedProtocolVersion,
) -> Result<rustls::ProtocolVersion, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;
    let files = pki.controller();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.ca).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let negotiated = stream.get_ref().1.protocol_version();
    // In TLS 1.3 the server judges the client certificate after the client's handshake ends: a refusal would
    // arrive as an alert on the first read. A served client gets the HTTP/2 server preface instead.
    let mut first = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut first))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    if read == 0 {
        return Err("the agent closed the connection".to_string());
    }
    negotiated.ok_or_else(|| "no version".to_string())
}

#[test]
fn an_observer_can_display_but_not_patch_and_the_agent_records_who_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterFixture::with_workers(dir.path(), 2);
    let worker = cluster.workers().next().unwrap().name.clone();
    let agent_addr = cluster.agent(&worker).unwrap().addr;
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");
    let issue = |role: &str, operator: &str| {
        cluster.patchctl_ok(&[
            "cert",
            "issue",
            "controller",
            "--role",
            role,
            "--operator",
            operator,
            "--force",
        ])
    };

    issue("observer", "olga");
    let shown = cluster.patchctl_ok(&["display", &cluster.name]);
    assert!(shown.contains("Total nodes: 3"), "{shown}");
    assert!(
        !shown.contains("Problems:"),
        "every agent answered:\n{shown}"
    );
    let out = cluster.patchctl(&["patch", &cluster.name, package.to_str().unwrap(), "-y"]);
    let text = output_text(&out);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("role `observer`") && text.contains("may not call"),
        "the refusal names the role and the call:\n{text}"
    );
    assert_eq!(
        cluster.version_of(&worker).unwrap().version,
        ORIGINAL_VERSION
    );
    // The same certificate straight at the agent: Status is served, Apply is PERMISSION_DENIED.
    let mut rpc = AgentRpc::connect(&cluster.pki, agent_addr);
    rpc.status("demo-worker");
    let refused = rpc
        .apply("demo-worker", &"0".repeat(64), "p-observer", false)
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("observer") && refused.message().contains("Apply"),
        "{refused:?}"
    );

    issue("operator", "alice");
    let out = cluster.patchctl(&["patch", &cluster.name, package.to_str().unwrap(), "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert_eq!(
        cluster.version_of(&worker).unwrap().version,
        "v1.0.1-hotfix"
    );
    let shown = cluster.patchctl_ok(&["display", &cluster.name]);
    assert!(
        shown.contains("Last changes:") && shown.contains("by controller (operator alice, serial "),
        "{shown}"
    );
    let json: serde_json::Value = serde_json::from_str(&cluster.patchctl_ok(&[
        "--format",
        "json",
        "display",
        &cluster.name,
        "-N",
        &cluster.node(&worker).id(),
    ]))
    .unwrap();
    let caller = json["nodes"][0]["service"]["last"]["caller"]
        .as_str()
        .unwrap_or_default();
    assert!(caller.contains("operator alice"), "{json}");
    // The agent logged the mutating calls with the caller; the refused ones too.
    let log = cluster.agent(&worker).unwrap().stderr();
    let logged = |needle: &str| {
        log.lines()
            .any(|line| line.contains(needle) && line.contains("alice"))
    };
    assert!(logged("mutating call") && log.contains("Apply"), "{log}");
    assert!(
        log.contains("refused a call the caller's role does not allow"),
        "{log}"
    );
}

#[test]
fn cert_issue_refuses_the_ca_name_existing_names_and_wildcards_and_the_ca_key_can_live_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let offline_key = dir.path().join("offline/ca.key");
    let key_arg = offline_key.to_string_lossy().into_owned();
    patchctl_ok(&home, &["ca", "init", "--ca-key", &key_arg]);
    let tls = home.join("tls");
    assert!(offline_key.exists() && !tls.join("ca.key").exists());
    let ca_before = std::fs::read(tls.join("ca.crt")).unwrap();

    // Without the key, issuing fails and says how to point at it; with it (flag or environment), it works.
    let out = patchctl(
        &home,
        &["cert", "issue", "controller", "--role", "operator"],
    );
    assert_refused(&out, "issuing without the CA key");
    assert!(
        output_text(&out).contains("--ca-key"),
        "{}",
        output_text(&out)
    );
    let issued = std::process::Command::new(bin("patchctl"))
        .args([
            "--format",
            "json",
            "cert",
            "issue",
            "controller",
            "--role",
            "operator",
        ])
        .args(["--operator", "alice"])
        .env("PATCHCTL_HOME", &home)
        .env("PATCHCTL_CA_KEY", &offline_key)
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", output_text(&issued));
    let issued: serde_json::Value = serde_json::from_slice(&issued.stdout).unwrap();
    let lifetime =
        issued["not_after"].as_i64().unwrap() - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (6 * 86_400..=7 * 86_400 + 60).contains(&lifetime),
        "a controller certificate lives 7 days by default: {lifetime} s"
    );
    assert_eq!(issued["role"], "operator");
    assert_eq!(issued["operator"], "alice");

    let with_key = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--ca-key", key_arg.as_str()]);
        patchctl(&home, &all)
    };
    // The CA's own name, even with --force: the CA stays.
    for force in [false, true] {
        let mut args = vec![
            "cert",
            "issue",
            "ca",
            "--role",
            "agent",
            "--san",
            "127.0.0.1",
        ];
        if force {
            args.push("--force");
        }
        let out = with_key(&args);
        assert_refused(&out, "the name `ca`");
        assert!(
            output_text(&out).contains("reserved"),
            "{}",
            output_text(&out)
        );
    }
    assert_eq!(std::fs::read(tls.join("ca.crt")).unwrap(), ca_before);

    // An existing name only with --force.
    let controller_before = std::fs::read(tls.join("controller.crt")).unwrap();
    let out = with_key(&["cert", "issue", "controller", "--role", "observer"]);
    assert_refused(&out, "an existing name");
    assert!(
        output_text(&out).contains("--force"),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        std::fs::read(tls.join("controller.crt")).unwrap(),
        controller_before
    );

    // Wildcards name no host: refused.
    let out = with_key(&[
        "cert",
        "issue",
        "agent-w",
        "--role",
        "agent",
        "--san",
        "*.example.com",
    ]);
    assert_refused(&out, "a wildcard SAN");
    assert!(
        output_text(&out).contains("wildcard"),
        "{}",
        output_text(&out)
    );
    assert!(!tls.join("agent-w.crt").exists());

    // Everything else works without the CA key: an agent and its controller talk.
    let out = with_key(&[
        "cert",
        "issue",
        "agent-1",
        "--role",
        "agent",
        "--san",
        "127.0.0.1",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let agent_tls = patchd_e2e::TlsPaths {
        ca: tls.join("ca.crt"),
        cert: tls.join("agent-1.crt"),
        key: tls.join("agent-1.key"),
    };
    let config = AgentConfig::new(&dir.path().join("agent-1"), &agent_tls).write();
    let agent = AgentProcess::start(&config);
    patchctl_ok(&home, &["agent", "info", &agent.addr_string()]);
}
