//! `patchctl`: the patchd controller CLI. Parses arguments, dispatches to `cli::*`, maps errors to exit codes.
#![deny(unsafe_code)]

// `outln!`, `errln!` & co.: the CLI's output that ends quietly when its reader is gone (`patchctl::output`).
#[macro_use]
extern crate patchctl;

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

fn main() -> ExitCode {
    tune_malloc();
    patchctl::signals::report_unreadable_package_mappings();
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
            errln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(cli::dispatch(parsed));
    // A prompt abandoned by Ctrl-C still blocks on stdin in a blocking thread: exit without waiting for it.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            errln!("error: {err:#}");
            ExitCode::from(patchctl::exit::ERROR)
        }
    }
}
