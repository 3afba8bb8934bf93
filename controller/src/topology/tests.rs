//! Topology tests: parsing, defaults, every validation error, templates.

use super::*;
use crate::home::Home;

const EXAMPLE: &str = include_str!("../../examples/topology.yaml");

fn node(id: &str, host: &str, port: u16, name: &str, role: &str) -> Node {
    Node {
        id: id.into(),
        role: role.into(),
        host: host.into(),
        port,
        name: name.into(),
        ports: port.to_string(),
        deploy_dir: "/opt/x".into(),
        data_dir: None,
        service: role.into(),
        agent_port: 7480,
        os_arch: None,
    }
}

#[test]
fn example_parses_with_defaults_and_order() {
    let topology = Topology::parse(EXAMPLE).expect("example topology parses");
    assert_eq!(topology.name.as_deref(), Some("demo"));
    assert_eq!(topology.role_order(), vec!["demo-master", "demo-worker"]);
    assert_eq!(topology.agent.port, 7480);
    let master = topology.role("demo-master").expect("master role");
    assert_eq!(master.component, "demo-master");
    assert_eq!(master.service, "demo-master");
    assert!(master.hooks.leader.is_some());
    let first = &master.nodes[0];
    assert_eq!(first.id, "127.0.1.1:8261");
    assert_eq!(first.name, "master-1");
    assert_eq!(first.ports, "8261/8291");
    assert_eq!(first.agent_port, 7480);
    let worker = topology.role("demo-worker").expect("worker role");
    let wait_offline = worker
        .hooks
        .wait_offline
        .as_ref()
        .expect("wait_offline hook");
    assert_eq!(wait_offline.interval, Duration::from_millis(200));
    assert_eq!(wait_offline.timeout, Duration::from_secs(10));
    assert_eq!(wait_offline.equals.as_deref(), Some("Offline"));
    let offline = worker.hooks.offline.as_ref().expect("offline hook");
    assert_eq!(offline.method, HttpMethod::Post);
    assert_eq!(offline.timeout, DEFAULT_HOOK_TIMEOUT);
    assert_eq!(offline.leader_roles(), vec!["demo-master"]);
    assert_eq!(topology.component_roles("demo-worker"), vec!["demo-worker"]);
    assert_eq!(topology.node_count(), topology.nodes().count());
    assert!(topology.node_by_id(&worker.nodes[0].id).is_some());
}

#[test]
fn role_order_is_file_order_not_alphabetical() {
    let text = "roles:\n  zeta:\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n  alpha:\n    nodes:\n      - { host: 127.0.1.2, port: 1, deploy_dir: /a }\n";
    let topology = Topology::parse(text).expect("parses");
    assert_eq!(topology.role_order(), vec!["zeta", "alpha"]);
}

#[test]
fn unknown_key_names_line_and_key() {
    let text = "roles:\n  w:\n    nodes:\n      - host: 127.0.1.1\n        prot: 8262\n        deploy_dir: /a\n";
    let error = Topology::parse(text).expect_err("typo refused").to_string();
    assert!(error.contains("line 5"), "{error}");
    assert!(error.contains("prot"), "{error}");
    assert!(error.contains("nodes[0]"), "{error}");
}

#[test]
fn bad_duration_names_line() {
    let text = "roles:\n  w:\n    hooks:\n      health: { url: \"http://{host}/h\", timeout: 10 parsecs }\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n";
    let error = Topology::parse(text).expect_err("bad duration").to_string();
    assert!(error.contains("line 4"), "{error}");
    assert!(error.contains("10 parsecs"), "{error}");
    assert!(error.contains("500ms"), "{error}");
}

#[test]
fn duplicate_ids_and_names_are_refused_with_lines() {
    let text = "roles:\n  a:\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a, name: n1 }\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n  b:\n    nodes:\n      - { host: 127.0.1.2, port: 1, deploy_dir: /a, name: n1 }\n";
    let TopologyError::Invalid { problems } = Topology::parse(text).expect_err("duplicates") else {
        panic!("expected a semantic error");
    };
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(problems[0].line, Some(5));
    assert_eq!(problems[0].key, "roles.a.nodes[1].id");
    assert!(problems[0].message.contains("127.0.1.1:1"));
    assert_eq!(problems[1].line, Some(8));
    assert_eq!(problems[1].key, "roles.b.nodes[0].name");
}

#[test]
fn placeholders_are_checked() {
    let text = r#"roles:
  m:
    hooks:
      health: { url: "http://{host}:{port}/h" }
    nodes:
      - { host: 127.0.1.1, port: 1, deploy_dir: /a }
  w:
    hooks:
      offline: { method: POST, url: "http://{m.leader.host}/x/{nmae}" }
      online: { method: POST, url: "http://{nope.leader.host}/x" }
      wait_online: { url: "http://{host}/x", field: state, not_equals: Offline, interval: 20s, timeout: 10s }
    nodes:
      - { host: 127.0.1.2, port: 1, deploy_dir: /a }
"#;
    let TopologyError::Invalid { problems } = Topology::parse(text).expect_err("bad placeholders")
    else {
        panic!("expected a semantic error");
    };
    let rendered: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 4, "{rendered:#?}");
    // m has no leader hook, so {m.leader.host} is refused as well as the typo.
    assert!(
        rendered[0].starts_with("line 9, key `roles.w.hooks.offline.url`"),
        "{rendered:#?}"
    );
    assert!(
        rendered.iter().any(|p| p.contains("{nmae}")),
        "{rendered:#?}"
    );
    assert!(
        rendered.iter().any(|p| p.contains("no `leader` hook")),
        "{rendered:#?}"
    );
    assert!(
        rendered
            .iter()
            .any(|p| p.starts_with("line 10") && p.contains("`nope`")),
        "{rendered:#?}"
    );
    assert!(
        rendered
            .iter()
            .any(|p| p.starts_with("line 11") && p.contains("interval 20s")),
        "{rendered:#?}"
    );
}

#[test]
fn empty_roles_and_nodeless_roles_are_refused() {
    let error = Topology::parse("roles: {}\n")
        .expect_err("no roles")
        .to_string();
    assert!(error.contains("line 1, key `roles`"), "{error}");
    let error = Topology::parse("version: v1\nroles:\n  w:\n    component: x\n")
        .expect_err("no nodes")
        .to_string();
    assert!(error.contains("line 3, key `roles.w.nodes`"), "{error}");
}

#[test]
fn malformed_yaml_has_a_location() {
    let error = Topology::parse("roles:\n  w: [\n").expect_err("not yaml");
    let TopologyError::Syntax { line, .. } = error else {
        panic!("expected a syntax error, got {error}");
    };
    assert!(line.is_some());
}

#[test]
fn name_mismatch_is_refused() {
    let topology = Topology::parse(EXAMPLE).expect("parses");
    assert!(topology.check_name("demo", EXAMPLE).is_ok());
    let error = topology
        .check_name("prod", EXAMPLE)
        .expect_err("mismatch")
        .to_string();
    assert!(
        error.contains("key `name`") && error.contains("prod"),
        "{error}"
    );
}

#[test]
fn render_url_fills_node_and_leader_fields() {
    let worker = node("w1", "127.0.1.2", 8262, "worker-1", "demo-worker");
    let leader = node(
        "127.0.1.1:8261",
        "127.0.1.1",
        8261,
        "master-1",
        "demo-master",
    );
    let leaders = |role: &str| (role == "demo-master").then_some(&leader);
    let url = render_url(
            "http://{demo-master.leader.host}:{demo-master.leader.port}/api/members/{name}/{id}/{role}/{host}:{port}",
            &worker,
            &leaders,
        )
        .expect("renders");
    assert_eq!(
        url,
        "http://127.0.1.1:8261/api/members/worker-1/w1/demo-worker/127.0.1.2:8262"
    );
    let body =
        render_url(r#"{"member": "{name}", "x": {}}"#, &worker, &leaders).expect("json body");
    assert_eq!(body, r#"{"member": "worker-1", "x": {}}"#);
    assert_eq!(
        render_url("http://{other.leader.host}/", &worker, &leaders),
        Err(TemplateError::NoLeader("other".into()))
    );
    assert_eq!(
        render_url("http://{hots}/", &worker, &leaders),
        Err(TemplateError::UnknownPlaceholder("hots".into()))
    );
}

#[test]
fn node_named_matches_id_name_and_host_port() {
    let topology = Topology::parse(EXAMPLE).expect("parses");
    let master = topology.role("demo-master").expect("role");
    let second = &master.nodes[1];
    assert_eq!(
        master.node_named(&second.name).map(|n| &n.id),
        Some(&second.id)
    );
    assert_eq!(
        master.node_named(&second.id).map(|n| &n.id),
        Some(&second.id)
    );
    assert!(master.node_named("nobody").is_none());
}

#[test]
fn tls_dir_resolution() {
    let home = Home::at("/tmp/h");
    let mut agent = AgentSettings {
        port: 1,
        tls_dir: None,
    };
    assert_eq!(agent.tls_dir(&home), PathBuf::from("/tmp/h/tls"));
    agent.tls_dir = Some(PathBuf::from("certs"));
    assert_eq!(agent.tls_dir(&home), PathBuf::from("/tmp/h/certs"));
    agent.tls_dir = Some(PathBuf::from("/etc/x"));
    assert_eq!(agent.tls_dir(&home), PathBuf::from("/etc/x"));
}

#[test]
fn databases_are_parsed_and_checked() {
    let roles = "roles:\n  oms:\n    nodes:\n      - { host: 127.0.2.1, port: 8088, deploy_dir: /data/oms }\n";
    let topology = Topology::parse(&format!(
        "{roles}databases:\n  cm: {{ host: 127.0.0.1, port: 3306, user: oms, password_env: OMS_DB_PASSWORD }}\n  rm: {{ host: db, port: 3306, user: oms, password_file: /etc/oms/pw }}\n"
    ))
    .expect("databases parse");
    assert_eq!(topology.databases.len(), 2);
    assert_eq!(topology.databases[0].name, "cm");
    assert_eq!(
        topology.databases[0].password,
        PasswordSource::Env("OMS_DB_PASSWORD".into())
    );
    assert_eq!(
        topology.databases[1].password,
        PasswordSource::File("/etc/oms/pw".into())
    );
    let error = Topology::parse(&format!(
        "{roles}databases:\n  cm: {{ host: h, port: 0, user: u, password_env: A, password_file: /b }}\n"
    ))
    .expect_err("bad database refused")
    .to_string();
    assert!(
        error.contains("line 6") && error.contains("databases.cm.port"),
        "{error}"
    );
    assert!(error.contains("databases.cm.password_env"), "{error}");
}
