//! DEMO ONLY: `demo-worker`, a stand-in service for the quickstart and the tests (`serve`, `stamp`, `version`).
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use patchd_demo::cli::{StampArgs, run_stamp, start};
use patchd_demo::worker::{WorkerConfig, serve};
use patchd_demo::{shutdown_signal, stamp, unix_now};

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
    /// Copy this binary with a version label and a behaviour stamped into it.
    Stamp(StampArgs),
    /// Print the version label stamped into this binary.
    Version,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            masters,
            name,
        } => {
            let (own, binary_sha256) = start("demo-worker").await?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}; pick a free address"))?;
            let addr = listener.local_addr()?;
            let name = name.unwrap_or_else(|| addr.to_string());
            println!(
                "demo-worker listening on {addr} (name {name}, version {}, mode {})",
                own.version,
                own.mode.as_str()
            );
            let config = WorkerConfig {
                name,
                stamp: own,
                binary_sha256,
                masters,
                started_unix: unix_now(),
            };
            serve(listener, config, shutdown_signal()).await?;
        }
        Command::Stamp(args) => {
            let stamped = run_stamp(&args)?;
            println!(
                "stamped {} as {} (mode {})",
                args.out.display(),
                stamped.version,
                stamped.mode.as_str()
            );
        }
        Command::Version => println!("{}", stamp::own_stamp()?.version),
    }
    Ok(())
}
