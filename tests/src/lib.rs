//! patchd-e2e: the shared harness of the end-to-end tests. Everything runs as real processes (`patchd`,
//! `patchctl`, demo binaries from `target/debug/`) over real mutual TLS on loopback.
//!
//! Build the binaries first (always with exactly this feature set, so nobody triggers rebuilds for the others):
//! `cargo build -p patchd-agent -p patchctl -p patchd-demo --bins --features patchd-agent/fault-injection`
//!
//! ```no_run
//! use patchd_e2e::{AgentConfig, AgentProcess, Pki, patchctl_ok};
//! let dir = tempfile::tempdir().unwrap();
//! let pki = Pki::new(dir.path());                       // `patchctl ca init` + controller certificate
//! let tls = pki.issue_agent("agent-1", &["127.0.0.1"]); // agent certificate naming the host we dial
//! let config = AgentConfig::new(&dir.path().join("agent-1"), &tls)
//!     .extra("[[service]]\nname = \"w\"\n...")           // optional raw TOML (services)
//!     .write();                                          // <dir>/agent-1/patchd.toml
//! let agent = AgentProcess::start(&config);             // waits for `patchd listening on ADDR`
//! let out = patchctl_ok(pki.home(), &["agent", "info", &agent.addr.to_string()]);
//! assert!(out.contains("agent-1") || !out.is_empty());
//! // `agent` is SIGKILLed on drop; `agent.stop()` sends SIGTERM, `agent.kill()` SIGKILL; stderr is kept in
//! // `agent.stderr_path()` (printed when a start fails).
//! ```
//!
//! Every helper panics with a message saying what failed (these are tests), and every process it starts is
//! killed when its handle is dropped.

pub mod apply_support;

pub mod cluster_fixture;

/// One agent managing one container service.
pub mod container_rig;

pub mod demo_fleet;

/// The real Docker Engine for the container tests.
pub mod docker;
pub mod mariadb;

pub mod nspawn;
/// The OMS upgrade rig: MariaDB, the demo-oms console, three agents over three demo-oms containers.
pub mod oms_rig;
/// A tmpfs for one test.
pub mod tmpfs;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The command that builds every binary the e2e tests run.
pub const BUILD_COMMAND: &str = "cargo build -p patchd-agent -p patchctl -p patchd-demo --bins --features patchd-agent/fault-injection,patchctl/fault-injection";

/// How long an agent may take to print its ready line (the machine is shared and busy).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// Environment variable naming the directory of the binaries instead of `target/debug` (the benchmarks set it
/// to `target/release`).
pub const BIN_DIR_ENV: &str = "PATCHD_BIN_DIR";

/// `target/debug/<name>` (or under `$CARGO_TARGET_DIR`, or `$PATCHD_BIN_DIR/<name>`); panics with the build
/// command when missing.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os(BIN_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"))
                .join("debug")
        });
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with:\n  {BUILD_COMMAND}",
        path.display()
    );
    path
}

/// Runs `patchctl` with `PATCHCTL_HOME=home` and returns its output (whatever the exit code).
pub fn patchctl(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("patchctl"))
        .args(args)
        .env("PATCHCTL_HOME", home)
        .env_remove("PATCHCTL_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run patchctl {args:?}: {e}"))
}

/// Runs `patchctl`, panics (showing stderr) unless it exits 0, and returns stdout.
pub fn patchctl_ok(home: &Path, args: &[&str]) -> String {
    let out = patchctl(home, args);
    assert!(
        out.status.success(),
        "patchctl {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `patchd` with `args` (e.g. `["validate", "--config", path]`) and returns its output.
pub fn patchd(args: &[&str]) -> Output {
    Command::new(bin("patchd"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run patchd {args:?}: {e}"))
}

/// Polls `check` every 20 ms until it returns true; panics naming `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file's digest as manifest format 2 writes it (`blake3:<hex>`), from the `blake3` crate itself.
pub fn blake3_file(path: &Path) -> String {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    format!("blake3:{}", blake3::hash(&bytes).to_hex())
}

/// Hex sha256 of a file (streamed).
pub fn sha256_file(path: &Path) -> String {
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    hex::encode(ctx.finish().as_ref())
}

/// Writes a file of `len` pseudo-random bytes derived from `seed` (fast, reproducible, incompressible).
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display())),
    );
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = len;
    while left > 0 {
        // xorshift64*: good enough to defeat compression and make chunks distinct.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        let n = left.min(8) as usize;
        file.write_all(&word[..n])
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        left -= n as u64;
    }
    file.flush()
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Paths of one TLS identity: the cluster CA, a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A controller home with a cluster CA and a controller certificate, made by the real `patchctl`.
#[derive(Debug, Clone)]
pub struct Pki {
    home: PathBuf,
}

impl Pki {
    /// Runs `patchctl ca init` and `patchctl cert issue controller --role controller` with
    /// `PATCHCTL_HOME=<dir>/home`. The TLS files land in `<dir>/home/tls`.
    pub fn new(dir: &Path) -> Self {
        let home = dir.join("home");
        patchctl_ok(&home, &["ca", "init"]);
        patchctl_ok(
            &home,
            &["cert", "issue", "controller", "--role", "controller"],
        );
        Self { home }
    }

    /// `PATCHCTL_HOME` of this PKI (pass it to [`patchctl`]).
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `<home>/tls`: ca.crt, ca.key, controller.crt, controller.key, and agent certificates.
    pub fn tls_dir(&self) -> PathBuf {
        self.home.join("tls")
    }

    /// The cluster CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.crt")
    }

    /// The controller identity.
    pub fn controller(&self) -> TlsPaths {
        let dir = self.tls_dir();
        TlsPaths {
            ca: dir.join("ca.crt"),
            cert: dir.join("controller.crt"),
            key: dir.join("controller.key"),
        }
    }

    /// Issues an agent certificate `name` naming `sans` (IPs or DNS names) into `<home>/tls/agents/`.
    pub fn issue_agent(&self, name: &str, sans: &[&str]) -> TlsPaths {
        let out = self.tls_dir().join("agents");
        let out_str = out.to_string_lossy().into_owned();
        let mut args = vec![
            "cert",
            "issue",
            name,
            "--role",
            "agent",
            "--out",
            out_str.as_str(),
        ];
        for san in sans {
            args.push("--san");
            args.push(san);
        }
        patchctl_ok(&self.home, &args);
        TlsPaths {
            ca: self.ca_cert(),
            cert: out.join(format!("{name}.crt")),
            key: out.join(format!("{name}.key")),
        }
    }
}

/// Builder of a `patchd.toml` for one agent living in its own directory.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    dir: PathBuf,
    listen: String,
    state_dir: PathBuf,
    deploy_roots: Vec<PathBuf>,
    tls: TlsPaths,
    crl: Option<PathBuf>,
    limits: Vec<String>,
    extra: String,
}

impl AgentConfig {
    /// An agent in `dir`: listen `127.0.0.1:0`, state in `<dir>/state`, one deploy root `<dir>/deploy`
    /// (created by [`AgentConfig::write`]), identity `tls`.
    pub fn new(dir: &Path, tls: &TlsPaths) -> Self {
        Self {
            dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".to_string(),
            state_dir: dir.join("state"),
            deploy_roots: vec![dir.join("deploy")],
            tls: tls.clone(),
            crl: None,
            limits: Vec::new(),
            extra: String::new(),
        }
    }

    /// Listen address, e.g. `127.0.1.3:0` or `127.0.1.3:7480`.
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.to_string();
        self
    }

    /// State directory (default `<dir>/state`).
    pub fn state_dir(mut self, path: &Path) -> Self {
        self.state_dir = path.to_path_buf();
        self
    }

    /// Replaces the deploy roots (default `[<dir>/deploy]`); they are created by [`AgentConfig::write`].
    pub fn deploy_roots(mut self, roots: &[&Path]) -> Self {
        self.deploy_roots = roots.iter().map(|r| r.to_path_buf()).collect();
        self
    }

    /// `[tls] crl`: the CRL the agent checks client certificates against (re-read when it changes).
    pub fn crl(mut self, path: &Path) -> Self {
        self.crl = Some(path.to_path_buf());
        self
    }

    /// Adds one `key = value` line to `[limits]`, e.g. `limit("max_blob_bytes", "1048576")`.
    pub fn limit(mut self, key: &str, value: &str) -> Self {
        self.limits.push(format!("{key} = {value}"));
        self
    }

    /// Appends raw TOML at the end (e.g. `[[service]]` sections).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push('\n');
        self.extra.push_str(toml);
        self
    }

    /// The agent's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state directory.
    pub fn state_path(&self) -> &Path {
        &self.state_dir
    }

    /// Where [`AgentConfig::write`] writes: `<dir>/patchd.toml`.
    pub fn path(&self) -> PathBuf {
        self.dir.join("patchd.toml")
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let q = |p: &Path| toml_string(&p.to_string_lossy());
        let roots: Vec<String> = self.deploy_roots.iter().map(|r| q(r)).collect();
        let mut text = format!(
            "listen = {}\nstate_dir = {}\ndeploy_roots = [{}]\n\n[tls]\nca = {}\ncert = {}\nkey = {}\n",
            toml_string(&self.listen),
            q(&self.state_dir),
            roots.join(", "),
            q(&self.tls.ca),
            q(&self.tls.cert),
            q(&self.tls.key),
        );
        if let Some(crl) = &self.crl {
            text.push_str(&format!("crl = {}\n", q(crl)));
        }
        if !self.limits.is_empty() {
            text.push_str("\n[limits]\n");
            for line in &self.limits {
                text.push_str(line);
                text.push('\n');
            }
        }
        text.push_str(&self.extra);
        text
    }

    /// Creates the directory and deploy roots, writes `<dir>/patchd.toml` and returns its path.
    pub fn write(&self) -> PathBuf {
        for dir in std::iter::once(&self.dir).chain(&self.deploy_roots) {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        let path = self.path();
        std::fs::write(&path, self.to_toml())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

/// A TOML basic string.
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A running `patchd run --config FILE`. SIGKILLed on drop.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    /// The address the agent printed in its ready line.
    pub addr: SocketAddr,
    config: PathBuf,
    stderr_path: PathBuf,
}

impl AgentProcess {
    /// Starts the agent and waits (up to [`START_TIMEOUT`]) for `patchd listening on ADDR`; panics with the
    /// agent's stderr if it exits or stays silent.
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    /// [`AgentProcess::start`] with extra environment variables (e.g. fault injection).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        Self::try_start(config, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`AgentProcess::start_with_env`] but returns the failure (with the agent's stderr) instead of
    /// panicking, for tests that expect the agent to refuse to start.
    pub fn try_start(config: &Path, env: &[(&str, &str)]) -> Result<Self, String> {
        let dir = config.parent().unwrap_or(Path::new("."));
        let stderr_path = dir.join("patchd-stderr.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .map_err(|e| format!("cannot open {}: {e}", stderr_path.display()))?;
        let mut command = Command::new(bin("patchd"));
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if std::env::var_os("PATCHD_LOG").is_none() {
            command.env("PATCHD_LOG", "info");
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start patchd: {e}"))?;
        let stdout = child.stdout.take().ok_or("patchd has no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Keep draining stdout after the ready line so the agent never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("patchd listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let mut agent = Self {
            child: Some(child),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            config: config.to_path_buf(),
            stderr_path,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(addr) => {
                    agent.addr = addr
                        .parse()
                        .map_err(|e| format!("bad ready line address `{addr}`: {e}"))?;
                    return Ok(agent);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Some(child) = agent.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                agent.child = None;
                return Err(format!(
                    "patchd exited ({status}) before it was ready; stderr:\n{}",
                    agent.stderr()
                ));
            }
            if Instant::now() > deadline {
                agent.kill();
                return Err(format!(
                    "patchd printed no ready line within {START_TIMEOUT:?}; stderr:\n{}",
                    agent.stderr()
                ));
            }
        }
    }

    /// Starts a new agent process with the same config (after [`AgentProcess::kill`] or [`AgentProcess::stop`]).
    /// With port 0 in the config the new address differs: read `addr` again.
    pub fn restart(&mut self) {
        self.kill();
        let fresh = Self::start(&self.config);
        *self = fresh;
    }

    /// The process id, if the agent is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `addr` as a string, for command lines.
    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    /// The config file this agent runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// SIGKILL (a crash), then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to 30 s for a clean exit (SIGKILL after that). Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).ok()?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Where the agent's stderr (its log) is appended, across restarts.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Everything the agent wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The agent's peak resident memory (VmHWM), in bytes, from `/proc/<pid>/status`.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
