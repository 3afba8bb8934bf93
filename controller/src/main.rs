//! `patchctl`: the patchd controller CLI. Parses arguments, dispatches to `cli::*`, maps errors to exit codes.
#![deny(unsafe_code)]

mod cli;

use clap::Parser;
use std::process::ExitCode;

/// glibc hands freed megabyte blocks (file chunks, gRPC messages, TLS buffers) back to the kernel and faults
/// fresh, zeroed pages in for the next one; during a push that cost 10-20% of the sender's CPU. Keep blocks up to
/// 32 MiB in the heap (trimmed only when 128 MiB at its top are free), in at most two arenas so a block freed by
/// one thread serves the next allocation of another. The controller's memory stays bounded by the chunks in
/// flight (tens of MiB). See BENCHMARKS.md, "Transfer".
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    use nix::libc::{M_ARENA_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt};
    // SAFETY: mallopt only sets allocator parameters; it is called first thing in main, before any thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 128 << 20);
        mallopt(M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// A push sends each chunk straight from a memory mapping of the package file. If another process truncates the
/// file meanwhile, reading the mapping raises SIGBUS: say what happened and exit with the error code, instead of
/// dying with "Bus error". The agent keeps the chunks it verified, so the next push resumes.
#[cfg(unix)]
#[allow(unsafe_code)]
fn report_truncated_package() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    extern "C" fn on_sigbus(_: nix::libc::c_int) {
        const MESSAGE: &[u8] =
            b"error: a package file was truncated while patchctl was reading it: \
            keep the file unchanged during a push, then run the command again\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; nothing else runs in the handler.
        unsafe {
            nix::libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
            nix::libc::_exit(i32::from(patchctl::exit::ERROR));
        }
    }
    let action = SigAction::new(
        SigHandler::Handler(on_sigbus),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only calls async-signal-safe functions. Failing to install it leaves the default action.
    let _ = unsafe { sigaction(Signal::SIGBUS, &action) };
}

#[cfg(not(unix))]
fn report_truncated_package() {}

fn main() -> ExitCode {
    tune_malloc();
    report_truncated_package();
    // Both ring and (transitively) other providers may be compiled in: pick ring (tuned) explicitly.
    patchd_tls::install_crypto_provider();
    let parsed = cli::Cli::parse();
    cli::init_logging(parsed.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(cli::dispatch(parsed));
    // A prompt abandoned by Ctrl-C still blocks on stdin in a blocking thread: exit without waiting for it.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(patchctl::exit::ERROR)
        }
    }
}
