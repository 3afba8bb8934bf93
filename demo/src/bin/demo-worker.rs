//! DEMO ONLY: `demo-worker`, a stand-in service for the quickstart and the tests (`serve`, `stamp`, `version`).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use patchd_demo::cli::{CommonCommand, Serving};
use patchd_demo::worker::{WorkerConfig, serve};
use patchd_demo::{shutdown_signal, unix_now};

/// DEMO ONLY: a worker of the demo cluster. Its version and behaviour are stamped into its own binary.
#[derive(Debug, Parser)]
#[command(name = "demo-worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve `/health` and `/version`, registering with the masters every 500 ms.
    Serve {
        /// Address to listen on (port 0 picks one; the bound address is printed).
        #[arg(long)]
        listen: String,
        /// Base URL of a master to register with (repeatable; none is fine).
        #[arg(long = "master", value_name = "URL")]
        masters: Vec<String>,
        /// Member name reported to the masters (default: the bound address).
        #[arg(long)]
        name: Option<String>,
    },
    #[command(flatten)]
    Common(CommonCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            masters,
            name,
        } => {
            let serving = Serving::start("demo-worker", &listen).await?;
            let name = name.unwrap_or_else(|| serving.addr.to_string());
            serving.announce("demo-worker", &name);
            let config = WorkerConfig {
                name,
                stamp: serving.stamp,
                binary_sha256: serving.binary_sha256,
                masters,
                started_unix: unix_now(),
            };
            serve(serving.listener, config, shutdown_signal()).await?;
        }
        Command::Common(common) => common.run()?,
    }
    Ok(())
}
