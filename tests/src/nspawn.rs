//! A real systemd for end-to-end tests: `systemd-nspawn` boots the host's own /usr as a container (systemd as
//! PID 1, journald, dbus), and the test controls it with `nsenter -t <container systemd> -a …` (there is no host
//! systemd or D-Bus here, so `machinectl` is not an option). Powered off, then killed, on drop.
//!
//! Needs root and `systemd-nspawn` (Debian `systemd-container`, installed by [`ensure_nspawn`] when missing).
//! Every helper panics with what failed, so a container that cannot run FAILS the test, never skips it.
//!
//! ```no_run
//! use patchd_e2e::nspawn::{Boot, Container, ensure_nspawn};
//! use std::path::Path;
//! ensure_nspawn();
//! let container = Container::boot(
//!     Boot::new("patchd-doc", Path::new("/tmp/console.log"))
//!         .host_network()          // share the host's network: loopback addresses reach the container
//!         .writable_usr()          // tmpfs overlay on /usr (install into /usr/bin like an operator)
//!         .bind_ro(Path::new("/work/main"), Path::new("/mnt/src")),
//! );
//! container.systemctl_ok(&["daemon-reload"]);
//! ```
//!
//! Used by `tests/tests/systemd_install.rs` (host network, writable /usr) and `tests/tests/apply_systemd.rs`
//! (the default private network).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a boot may take on a loaded machine (about 15 s when idle).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Host units that must not start in a test container (see [`Container::boot`]).
const UNITS_MASKED_INSIDE: [&str; 4] = [
    "systemd-networkd-wait-online.service",
    "docker.socket",
    "docker.service",
    "containerd.service",
];

/// Makes sure `systemd-nspawn` exists, installing `systemd-container` with apt-get when it does not; panics
/// (the test fails) when that is impossible.
pub fn ensure_nspawn() {
    let present = || {
        Command::new("systemd-nspawn")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if present() {
        return;
    }
    eprintln!("systemd-nspawn missing: installing systemd-container with apt-get");
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "systemd-container",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").arg("update").status();
        install();
    }
    assert!(
        present(),
        "systemd-nspawn is not available and `apt-get install systemd-container` failed: this test needs a real \
         systemd (run it as root on a host where systemd-nspawn works)"
    );
}

/// How to boot a container.
#[derive(Debug, Clone)]
pub struct Boot {
    machine: String,
    console: PathBuf,
    host_network: bool,
    writable_usr: bool,
    binds: Vec<(PathBuf, PathBuf, bool)>,
}

impl Boot {
    /// A container named `machine` (unique per test run), its console written to `console`. By default it has a
    /// private network (only its own loopback) and a read-only /usr.
    pub fn new(machine: &str, console: &Path) -> Self {
        Self {
            machine: machine.to_string(),
            console: console.to_path_buf(),
            host_network: false,
            writable_usr: false,
            binds: Vec::new(),
        }
    }

    /// Shares the host's network namespace: what listens inside on a loopback address is reachable from the host.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    /// A tmpfs overlay over /usr (`--overlay=/usr::/usr`), so installing into /usr/bin works inside while the
    /// host's /usr stays untouched.
    pub fn writable_usr(mut self) -> Self {
        self.writable_usr = true;
        self
    }

    /// Bind-mounts `host` at `inside`, writable.
    pub fn bind(mut self, host: &Path, inside: &Path) -> Self {
        self.binds
            .push((host.to_path_buf(), inside.to_path_buf(), false));
        self
    }

    /// Bind-mounts `host` at `inside`, read-only.
    pub fn bind_ro(mut self, host: &Path, inside: &Path) -> Self {
        self.binds
            .push((host.to_path_buf(), inside.to_path_buf(), true));
        self
    }
}

/// The child of `parent` whose command is `systemd` (the container's PID 1, seen from the host).
fn container_init(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .find(|pid| {
            patchd_procstat::ProcStat::read(*pid).is_some_and(|stat| stat.ppid == parent)
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
        })
}

/// A booted container. `systemctl poweroff` on drop, then SIGTERM to nspawn, then SIGKILL of its init.
#[derive(Debug)]
pub struct Container {
    nspawn: Option<Child>,
    /// Host pid of the container's systemd (PID 1 inside).
    init: u32,
    console: PathBuf,
    machine: String,
}

impl Container {
    /// Boots the container and waits until its systemd reports `running` or `degraded`; panics with the console
    /// output when it does not.
    pub fn boot(spec: Boot) -> Container {
        let log = std::fs::File::create(&spec.console)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", spec.console.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone the console log handle: {e}"));
        let mut command = Command::new("systemd-nspawn");
        command.args([
            "-D",
            "/",
            "--volatile=yes",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
        ]);
        command.arg(format!("--machine={}", spec.machine));
        if !spec.host_network {
            command.arg("--private-network");
        }
        if spec.writable_usr {
            command.arg("--overlay=/usr::/usr");
        }
        for (host, inside, read_only) in &spec.binds {
            let flag = if *read_only { "--bind-ro" } else { "--bind" };
            command.arg(format!("{flag}={}:{}", host.display(), inside.display()));
        }
        // Arguments after the options go to the container's systemd, which reads them as its kernel command line.
        // The empty /etc of a volatile boot gets every unit of the host's presets enabled: a host that has Docker
        // then pulls in network-online.target, whose wait-online job hangs for 2 minutes in a private network
        // (boot never finishes), and starts container runtimes nothing here needs.
        for unit in UNITS_MASKED_INSIDE {
            command.arg(format!("systemd.mask={unit}"));
        }
        let nspawn = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run systemd-nspawn: {e}"));
        let nspawn_pid = nspawn.id();
        let mut container = Container {
            nspawn: Some(nspawn),
            init: 0,
            console: spec.console.clone(),
            machine: spec.machine.clone(),
        };
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while container.init == 0 {
            if let Some(status) = container
                .nspawn
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                panic!(
                    "systemd-nspawn exited ({status}) before booting:\n{}",
                    container.console_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no systemd inside the container after {BOOT_TIMEOUT:?}:\n{}",
                container.console_text()
            );
            container.init = container_init(nspawn_pid).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut state = String::new();
        while !matches!(state.as_str(), "running" | "degraded") {
            assert!(
                Instant::now() < deadline,
                "the container's systemd did not finish booting within {BOOT_TIMEOUT:?} (state `{state}`):\n{}",
                container.console_text()
            );
            std::thread::sleep(Duration::from_millis(200));
            let out = container.exec(&["systemctl", "is-system-running"]);
            state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        container
    }

    /// The machine name.
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// Host pid of the container's systemd.
    pub fn init_pid(&self) -> u32 {
        self.init
    }

    /// What nspawn and the container printed on the console.
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// A command run by `nsenter` in every namespace of the container.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.init.to_string(), "-a"])
            .args(args);
        command
    }

    /// Runs a command inside and returns its output (whatever the exit code).
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("nsenter {args:?}: {e}"))
    }

    /// Runs a command inside, panics (with its output) unless it exits 0, returns its stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in the container failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl ARGS` inside; panics unless it exits 0.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let mut full = vec!["systemctl"];
        full.extend_from_slice(args);
        self.exec_ok(&full)
    }

    /// `systemctl show UNIT -p <properties>` as a map.
    pub fn show(&self, unit: &str, properties: &[&str]) -> HashMap<String, String> {
        let property = format!("--property={}", properties.join(","));
        let out = self.exec(&["systemctl", "show", unit, &property]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The last `lines` journal lines of a unit (for failure messages).
    pub fn journal(&self, unit: &str, lines: usize) -> String {
        let out = self.exec(&[
            "journalctl",
            "-u",
            unit,
            "--no-pager",
            "-n",
            &lines.to_string(),
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The container's network namespace.
    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.init))
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.nspawn.as_mut().map(|child| child.try_wait()) {
                None | Some(Ok(Some(_))) | Some(Err(_)) => return true,
                Some(Ok(None)) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        false
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.init != 0 {
            let _ = self
                .command(&["systemctl", "poweroff"])
                .stdin(Stdio::null())
                .output();
            if self.wait_exit(Duration::from_secs(20)) {
                return;
            }
        }
        if let Some(child) = &self.nspawn
            && let Ok(pid) = i32::try_from(child.id())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if self.wait_exit(Duration::from_secs(10)) {
            return;
        }
        // Killing the container's init ends every process of its pid namespace.
        if let Ok(init) = i32::try_from(self.init)
            && init != 0
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(init),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut child) = self.nspawn.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
