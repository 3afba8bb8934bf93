//! End-to-end: the private MariaDB of `scripts/mariadb.sh` holds OMS's `rm`, `cm` and `cm_hb` databases and the
//! heartbeat table; the example runbook's heartbeat rotation runs against it for real, its resolve check tells the
//! rotation happened, and a dump is non-empty. Fails (never skips) when MariaDB cannot be installed or started.

use patchd_e2e::mariadb::MariaDb;
use patchd_runbook::{Action, ClusterFacts, Expect, Probe, parse_for_cluster};

#[test]
fn private_mariadb_holds_the_oms_databases_rotates_the_heartbeat_and_dumps() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = MariaDb::start(dir.path());
    let pid = db.pid().expect("PID file");

    db.sql(
        None,
        "CREATE DATABASE rm; CREATE DATABASE cm; CREATE DATABASE cm_hb; \
         CREATE TABLE rm.resource (id INT PRIMARY KEY, name VARCHAR(64)); \
         INSERT INTO rm.resource VALUES (1, 'store-1'), (2, 'store-2'); \
         CREATE TABLE cm.task (name VARCHAR(64) PRIMARY KEY, status VARCHAR(32)); \
         INSERT INTO cm.task VALUES ('t1', 'REVERSE_INCR'); \
         CREATE TABLE cm_hb.heatbeat_sequence (id BIGINT NOT NULL AUTO_INCREMENT, gmt_created DATETIME NOT NULL, \
           gmt_modified DATETIME NOT NULL, PRIMARY KEY (id)); \
         INSERT INTO cm_hb.heatbeat_sequence (gmt_created, gmt_modified) VALUES (NOW(), NOW()), (NOW(), NOW()), \
           (NOW(), NOW());",
    );
    let databases = db.sql(None, "SHOW DATABASES");
    for name in ["rm", "cm", "cm_hb"] {
        assert!(databases.lines().any(|line| line == name), "{databases}");
    }

    // The example runbook's own statements and checks, against the real server.
    let runbook = parse_for_cluster(
        include_str!("../../examples/oms/runbook.yaml"),
        &ClusterFacts {
            roles: vec!["oms".into()],
            databases: vec!["rm".into(), "cm".into(), "cm_hb".into()],
        },
    )
    .expect("example runbook");
    let step = |id: &str| {
        runbook
            .steps
            .iter()
            .find(|step| step.id == id)
            .unwrap_or_else(|| panic!("no step {id}"))
    };
    let Action::Check(tasks) = &step("tasks-ready").action else {
        panic!("tasks-ready is a check");
    };
    let Probe::Sql { database, query } = &tasks.probe else {
        panic!("tasks-ready queries SQL");
    };
    assert_eq!(tasks.expect, Expect::NoRows);
    assert_eq!(db.sql(Some(database), query), "", "every task is ready");

    let rotate = step("heartbeat-rotate");
    let Action::Sql(sql) = &rotate.action else {
        panic!("heartbeat-rotate is sql");
    };
    let resolve = rotate
        .resolve
        .as_ref()
        .expect("heartbeat-rotate has a resolve check");
    let Probe::Sql {
        query: resolve_query,
        ..
    } = &resolve.probe
    else {
        panic!("resolve queries SQL");
    };
    assert_ne!(
        db.sql(Some(&sql.database), resolve_query),
        "",
        "not rotated yet: the check says so"
    );
    let last_id = db.sql(Some("cm_hb"), "SELECT MAX(id) FROM heatbeat_sequence");
    db.sql(Some(&sql.database), &sql.statements.join(";\n"));
    assert_eq!(
        db.sql(Some(&sql.database), resolve_query),
        "",
        "rotated: the check says so"
    );
    assert_eq!(
        db.sql(Some("cm_hb"), "SELECT id FROM heatbeat_sequence"),
        last_id
    );
    assert_eq!(
        db.sql(Some("cm_hb"), "SHOW TABLES"),
        "heatbeat_sequence\n",
        "the intermediate tables are gone"
    );

    for name in ["rm", "cm", "cm_hb"] {
        let dump = db.dump(name);
        let text = String::from_utf8_lossy(&dump);
        assert!(!dump.is_empty(), "dump of {name} is empty");
        assert!(
            text.contains("CREATE TABLE"),
            "dump of {name} has no table:\n{text}"
        );
    }
    assert!(String::from_utf8_lossy(&db.dump("rm")).contains("'store-2'"));

    db.stop();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "mariadbd {pid} still runs after stop"
    );
}
