//! SIGBUS from a package mapping: patchctl sends package chunks from read-only mappings of the file
//! (`agent_client::map_chunk`), and reading a mapped page that is gone (the file was truncated by another process)
//! or unreadable (an I/O error) raises SIGBUS. Report that as an error and exit 1 instead of dying with "Bus error".

/// What the handler prints (async-signal-safe: a static byte string).
pub const UNREADABLE_PACKAGE_MESSAGE: &str = "error: a package file became unreadable while patchctl was sending it \
(truncated by another process, or a read error): keep package files unchanged during a push and check the disk; \
a rollout stopped this way continues with `patchctl patch --resume <cluster>`\n";

/// Installs the SIGBUS handler (Linux; elsewhere the default action stays). Call it first thing in `main`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn report_unreadable_package_mappings() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::SigAction(on_sigbus),
        // On the alternate stack where std set one up, like std's own handlers for guard-page faults.
        SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
        SigSet::empty(),
    );
    // SAFETY: the handler only calls async-signal-safe functions (write, signal, raise, _exit). Failing to install
    // it leaves the default action.
    let _ = unsafe { sigaction(Signal::SIGBUS, &action) };
}

/// No mappings are made off Linux' populate path that this handler was written for: keep the default action.
#[cfg(not(target_os = "linux"))]
pub fn report_unreadable_package_mappings() {}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
extern "C" fn on_sigbus(
    signal: nix::libc::c_int,
    info: *mut nix::libc::siginfo_t,
    _context: *mut nix::libc::c_void,
) {
    use nix::libc;
    // SAFETY: with SA_SIGINFO the kernel passes a valid `siginfo_t` (checked for null anyway); write, signal, raise
    // and _exit are async-signal-safe.
    unsafe {
        // BUS_ADRERR: a mapped page that does not exist or cannot be read. Anything else (e.g. `kill -BUS`) keeps
        // the default action: reset it and raise the signal again, delivered when this handler returns.
        if !info.is_null() && (*info).si_code == libc::BUS_ADRERR {
            let message = UNREADABLE_PACKAGE_MESSAGE.as_bytes();
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::_exit(i32::from(crate::exit::ERROR));
        }
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    /// Set in the child copy of this test binary: the path of the file to map and truncate.
    const CHILD_FILE: &str = "PATCHCTL_TEST_SIGBUS_FILE";
    /// Set in the child: `map` (truncate a mapped chunk and read it) or `kill` (send itself SIGBUS).
    const CHILD_MODE: &str = "PATCHCTL_TEST_SIGBUS_MODE";

    /// In the child: install the handler, then cause a SIGBUS. Returns only in the parent.
    fn act_as_child() {
        let Some(path) = std::env::var_os(CHILD_FILE) else {
            return;
        };
        report_unreadable_package_mappings();
        if std::env::var(CHILD_MODE).as_deref() == Ok("kill") {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGBUS).unwrap();
        } else {
            let file = std::fs::File::open(&path).unwrap();
            let chunk = crate::agent::client::map_chunk(&file, 0, 64 * 1024).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(0)
                .unwrap();
            let sum: u64 = chunk.iter().map(|&b| u64::from(b)).sum();
            println!("read {sum} after the truncation");
        }
        std::process::exit(0);
    }

    fn run_child(test: &str, mode: &str) -> std::process::Output {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("package");
        std::fs::write(&path, vec![7u8; 64 * 1024]).unwrap();
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_FILE, &path)
            .env(CHILD_MODE, mode)
            .output()
            .unwrap()
    }

    #[test]
    fn a_package_truncated_under_its_mapping_ends_patchctl_with_the_error_code_and_a_message() {
        act_as_child();
        let out = run_child(
            "signals::tests::a_package_truncated_under_its_mapping_ends_patchctl_with_the_error_code_and_a_message",
            "map",
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "exit code 1, not a crash: {stderr}"
        );
        assert!(stderr.contains(UNREADABLE_PACKAGE_MESSAGE), "{stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("after the truncation"),
            "the truncated mapping was not readable"
        );
    }

    #[test]
    fn other_sigbus_keeps_the_default_action() {
        act_as_child();
        let out = run_child(
            "signals::tests::other_sigbus_keeps_the_default_action",
            "kill",
        );
        assert_eq!(out.status.signal(), Some(nix::libc::SIGBUS), "{out:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("became unreadable"));
    }
}
