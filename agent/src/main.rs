//! `patchd`: the per-host agent. `patchd run --config FILE` serves the mutual-TLS gRPC API; `patchd validate
//! --config FILE` checks a config and the files it names without starting anything.
#![deny(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use patchd_agent::Agent;
use patchd_agent::config::Config;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// After SIGTERM, in-flight calls get this long to finish before the agent exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// patchd: the patchd agent (one per host).
#[derive(Debug, Parser)]
#[command(name = "patchd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the agent API (mutual TLS) until SIGTERM/SIGINT.
    Run {
        /// The agent config (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config, its certificates and directories; exit non-zero naming every problem.
    Validate {
        /// The agent config (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// glibc hands freed megabyte blocks (gRPC messages, TLS buffers) back to the kernel and faults fresh, zeroed
/// pages in for the next one; during a package transfer that cost 10-20% of the agent's CPU. Blocks under 2 MiB
/// (everything an upload in the default 1 MiB chunks allocates) now stay in the heap, which is trimmed once 8 MiB
/// at its top are free (above what one upload keeps in flight); larger blocks (chunks of 2-4 MiB) are still
/// mapped and unmapped, so the peak memory stays bounded by what is in flight whatever the chunk size. At most
/// two arenas, so a block freed by one thread (the writer) serves the next allocation of another (the network).
/// See BENCHMARKS.md, "Transfer".
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    use nix::libc::{M_ARENA_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt};
    // SAFETY: mallopt only sets allocator parameters; it is called first thing in main, before any thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 2 << 20);
        mallopt(M_TRIM_THRESHOLD, 8 << 20);
        mallopt(M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    patchd_tls::install_crypto_provider();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("PATCHD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();

    let result = match cli.command {
        Command::Validate { config } => validate(&config),
        Command::Run { config } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(run(config))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn validate(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load_and_validate(path)?;
    println!(
        "{}: OK (listen {}, state_dir {}, {} deploy root(s), {} service(s))",
        path.display(),
        config.listen,
        config.state_dir.display(),
        config.deploy_roots.len(),
        config.services.len()
    );
    Ok(())
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Arc::new(Config::load_and_validate(&path)?);
    let agent = Agent::prepare(Arc::clone(&config)).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (key `listen`)", config.listen))?;
    let addr = listener
        .local_addr()
        .context("listener has no local address")?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    println!("patchd listening on {addr}");
    std::io::stdout()
        .flush()
        .context("cannot write to stdout")?;
    tracing::info!(%addr, state_dir = %config.state_dir.display(), "serving");

    let grace = {
        let rx = stop_rx.clone();
        async move {
            stopped(rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    };
    tokio::select! {
        served = agent.serve(listener, stopped(stop_rx)) => served?,
        () = grace => tracing::warn!("calls still in flight after {}s: exiting anyway", SHUTDOWN_GRACE.as_secs()),
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
