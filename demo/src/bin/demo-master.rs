//! DEMO ONLY: `demo-master`, the demo cluster's API server: members, leader, offline/online, test controls.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use patchd_demo::cli::{StampArgs, run_stamp, start};
use patchd_demo::master::{MasterConfig, Peer, serve};
use patchd_demo::{shutdown_signal, stamp, unix_now};

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
            name,
            peers,
            tasks,
        } => {
            let (own, binary_sha256) = start("demo-master").await?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}; pick a free address"))?;
            let addr = listener.local_addr()?;
            println!(
                "demo-master listening on {addr} (name {name}, version {}, mode {})",
                own.version,
                own.mode.as_str()
            );
            let config = MasterConfig {
                name,
                peers,
                tasks,
                stamp: own,
                binary_sha256,
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
