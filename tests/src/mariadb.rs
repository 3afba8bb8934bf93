//! A private MariaDB for tests (`scripts/mariadb.sh`): its own data directory and loopback port, stopped by PID
//! when dropped. SQL and dumps go through Debian's `mariadb` and `mariadb-dump` clients as root (no password).

use crate::workspace_root;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A running instance.
pub struct MariaDb {
    dir: PathBuf,
    /// Its loopback port.
    pub port: u16,
}

fn script(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(workspace_root().join("scripts/mariadb.sh"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run scripts/mariadb.sh: {error}"))
}

impl MariaDb {
    /// Starts one under `dir` (installing `mariadb-server` first when missing); panics when it cannot.
    pub fn start(dir: &Path) -> Self {
        let dir_text = dir.to_str().expect("utf-8 dir");
        let out = script(&["start", dir_text]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scripts/mariadb.sh start failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let port = stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("scripts/mariadb.sh printed `{stdout}`, not a port"));
        Self {
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// The PID of the server (from its PID file).
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("mariadb.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn client(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .arg("--no-defaults")
            .arg("--protocol=tcp")
            .arg("-h127.0.0.1")
            .arg(format!("-P{}", self.port))
            .arg("-uroot")
            .stdin(Stdio::null());
        command
    }

    /// Runs `sql` (several statements allowed) in `database` (or none) and returns the rows, tab-separated.
    pub fn sql(&self, database: Option<&str>, sql: &str) -> String {
        let mut command = self.client("mariadb");
        command.arg("--batch").arg("--skip-column-names");
        if let Some(database) = database {
            command.arg(format!("-D{database}"));
        }
        let out = command
            .arg("-e")
            .arg(sql)
            .output()
            .expect("run mariadb client");
        assert!(
            out.status.success(),
            "SQL failed: {sql}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `mariadb-dump --triggers=false <database>` (as the OMS guide does), returned as bytes.
    pub fn dump(&self, database: &str) -> Vec<u8> {
        let out = self
            .client("mariadb-dump")
            .arg("--triggers=false")
            .arg(database)
            .output()
            .expect("run mariadb-dump");
        assert!(
            out.status.success(),
            "mariadb-dump {database} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Stops the server and waits for it.
    pub fn stop(&self) {
        let out = script(&["stop", self.dir.to_str().expect("utf-8 dir")]);
        assert!(
            out.status.success(),
            "scripts/mariadb.sh stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if self.pid().is_some() {
            let _ = script(&["stop", self.dir.to_str().unwrap_or_default()]);
        }
    }
}
