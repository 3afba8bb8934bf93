//! DEMO ONLY: `demo-master`, the demo cluster's API server: members, leader, offline/online, test controls.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use patchd_demo::cli::{CommonCommand, Serving};
use patchd_demo::master::{MasterConfig, Peer, serve};
use patchd_demo::{shutdown_signal, unix_now};

/// DEMO ONLY: a master of the demo cluster (in-memory member table; the leader is the live master with the smallest name).
#[derive(Debug, Parser)]
#[command(name = "demo-master")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the cluster API.
    Serve {
        /// Address to listen on (port 0 picks one; the bound address is printed).
        #[arg(long)]
        listen: String,
        /// This master's name (the leader is the live master with the smallest name).
        #[arg(long)]
        name: String,
        /// Another master, as NAME=URL (repeatable), e.g. master-2=http://127.0.1.2:8261.
        #[arg(long = "peer", value_name = "NAME=URL", value_parser = Peer::parse)]
        peers: Vec<Peer>,
        /// Number of fake tasks handed to available workers (a worker holding one is `Bound`).
        #[arg(long, default_value_t = 2)]
        tasks: usize,
    },
    #[command(flatten)]
    Common(CommonCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            name,
            peers,
            tasks,
        } => {
            let serving = Serving::start("demo-master", &listen).await?;
            serving.announce("demo-master", &name);
            let config = MasterConfig {
                name,
                peers,
                tasks,
                stamp: serving.stamp,
                binary_sha256: serving.binary_sha256,
                started_unix: unix_now(),
            };
            serve(serving.listener, config, shutdown_signal()).await?;
        }
        Command::Common(common) => common.run()?,
    }
    Ok(())
}
