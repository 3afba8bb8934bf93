//! `patchctl`: the patchd controller CLI. Parses arguments, dispatches to `cli::*`, maps errors to exit codes.
#![forbid(unsafe_code)]

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Both ring and (transitively) other providers may be compiled in: pick ring explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
