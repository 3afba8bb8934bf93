//! SQL steps and checks, sent by `patchctl` itself to a database of the topology's `databases:` (MySQL or
//! MariaDB). The password is read from its file or environment variable at the moment of connecting and goes
//! nowhere else: not in errors, logs, the journal or the store.

use crate::topology::{Database, PasswordSource, Topology};
use mysql_async::prelude::Queryable;
use std::time::Duration;

/// How long connecting plus one step's statements may take.
const SQL_TIMEOUT: Duration = Duration::from_secs(600);

/// The topology's databases.
#[derive(Debug, Clone)]
pub struct SqlSteps {
    databases: Vec<Database>,
}

impl SqlSteps {
    /// The databases of `topology`.
    pub fn new(topology: &Topology) -> Self {
        Self {
            databases: topology.databases.clone(),
        }
    }

    /// Runs `statements` in order in one session of `database`; the first error stops them.
    pub async fn execute(&self, database: &str, statements: &[String]) -> Result<(), String> {
        let (db, mut conn) = self.connect(database).await?;
        let run = async {
            for (index, statement) in statements.iter().enumerate() {
                conn.query_drop(statement.as_str()).await.map_err(|error| {
                    format!(
                        "SQL on `{}` ({}:{}), statement {} of {}: {error}",
                        db.name,
                        db.host,
                        db.port,
                        index + 1,
                        statements.len()
                    )
                })?;
            }
            Ok(())
        };
        let result = bounded(run).await;
        let _ = conn.disconnect().await;
        result
    }

    /// Runs `query` on `database` and returns how many rows it answered.
    pub async fn count_rows(&self, database: &str, query: &str) -> Result<usize, String> {
        let (db, mut conn) = self.connect(database).await?;
        let run = async {
            conn.query::<mysql_async::Row, _>(query)
                .await
                .map(|rows| rows.len())
                .map_err(|error| {
                    format!(
                        "SQL query on `{}` ({}:{}): {error}",
                        db.name, db.host, db.port
                    )
                })
        };
        let result = bounded(run).await;
        let _ = conn.disconnect().await;
        result
    }

    async fn connect(&self, database: &str) -> Result<(&Database, mysql_async::Conn), String> {
        let db = self
            .databases
            .iter()
            .find(|db| db.name == database)
            .ok_or_else(|| {
                format!("database `{database}` is not in the topology's `databases:`; add it there")
            })?;
        let password = read_password(db)?;
        let options = mysql_async::OptsBuilder::default()
            .ip_or_hostname(db.host.clone())
            .tcp_port(db.port)
            .user(Some(db.user.clone()))
            .pass(password)
            .db_name(Some(db.name.clone()));
        let conn = bounded(async {
            mysql_async::Conn::new(options).await.map_err(|error| {
                format!(
                    "cannot connect to database `{}` at {}:{} as `{}`: {error}",
                    db.name, db.host, db.port, db.user
                )
            })
        })
        .await?;
        Ok((db, conn))
    }
}

async fn bounded<T>(work: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(SQL_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", SQL_TIMEOUT.as_secs())))
}

/// The password of `db`, read now; the error names where it was looked for, never what was found.
fn read_password(db: &Database) -> Result<Option<String>, String> {
    match &db.password {
        PasswordSource::None => Ok(None),
        PasswordSource::Env(name) => std::env::var(name).map(Some).map_err(|_| {
            format!(
                "database `{}`: the environment variable `{name}` (its `password_env:`) is not set for patchctl; \
                 export it",
                db.name
            )
        }),
        PasswordSource::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| {
                format!(
                    "database `{}`: cannot read its `password_file:` {}: {error}",
                    db.name,
                    path.display()
                )
            })?;
            Ok(Some(text.lines().next().unwrap_or_default().to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn database(password: PasswordSource) -> Database {
        Database {
            name: "cm".into(),
            host: "127.0.0.1".into(),
            port: 1,
            user: "oms".into(),
            password,
        }
    }

    #[test]
    fn a_password_is_read_from_the_first_line_of_its_file_and_errors_never_show_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\nignored\n").expect("write");
        assert_eq!(
            read_password(&database(PasswordSource::File(path))).expect("read"),
            Some("s3cret".to_string())
        );
        let missing = read_password(&database(PasswordSource::File(PathBuf::from(
            "/nonexistent/pw",
        ))))
        .expect_err("missing");
        assert!(missing.contains("password_file"), "{missing}");
        let unset = read_password(&database(PasswordSource::Env(
            "PATCHCTL_TEST_UNSET_PASSWORD_VARIABLE".into(),
        )))
        .expect_err("unset");
        assert!(
            unset.contains("PATCHCTL_TEST_UNSET_PASSWORD_VARIABLE"),
            "{unset}"
        );
    }

    #[tokio::test]
    async fn a_failed_connection_names_the_database_but_not_the_password() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "pw-9f3a61c\n").expect("write");
        // A port nothing listens on any more: the connection is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let steps = SqlSteps {
            databases: vec![Database {
                port,
                ..database(PasswordSource::File(path))
            }],
        };
        let error = steps
            .execute("cm", &["SELECT 1".to_string()])
            .await
            .expect_err("nothing listens");
        assert!(
            error.contains("cannot connect to database `cm`") && error.contains(&port.to_string()),
            "{error}"
        );
        assert!(!error.contains("pw-9f3a61c"), "{error}");
        let error = steps
            .count_rows("cm", "SELECT 1")
            .await
            .expect_err("nothing listens");
        assert!(!error.contains("pw-9f3a61c"), "{error}");
    }
}
