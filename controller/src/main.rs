//! `patchctl`: the patchd controller CLI. Parses arguments, dispatches to `cli::*`, maps errors to exit codes.
#![deny(unsafe_code)]

mod cli;

use clap::Parser;
use std::process::ExitCode;

/// glibc hands freed multi-megabyte blocks (gRPC messages, TLS buffers) back to the kernel and faults fresh,
/// zeroed pages in for the next one; during a package transfer that costs 10-20% of the CPU on each side. Keep
/// them in the heap instead: blocks up to 32 MiB come from the arenas and a heap is trimmed only when 128 MiB
/// at its top are free. Peak memory does not grow (freed blocks are reused); see BENCHMARKS.md, "Transfer".
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    use nix::libc::{M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt};
    // SAFETY: mallopt only sets allocator parameters; it is called first thing in main, before any thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 128 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
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
