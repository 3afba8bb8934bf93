//! DEMO ONLY: `demo-oms`, an OMS node (`serve`, run in a container) and its console (`master`) for the upgrade example.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use patchd_demo::oms::{
    DEFAULT_CONFIG, DEFAULT_HA_CONFIG, NodeConfig, load_node, serve_master, serve_node,
};
use patchd_demo::shutdown_signal;
use std::path::PathBuf;
use tokio::net::TcpListener;

/// DEMO ONLY: a stand-in OMS node that checks its config.yaml key layout, and the console serving `ha.config`.
#[derive(Debug, Parser)]
#[command(name = "demo-oms")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check config.yaml for this version (exit 1 naming the keys when it does not fit), then serve `/health`
    /// and `/version`.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "DEMO_OMS_LISTEN")]
        listen: String,
        /// The configuration file.
        #[arg(long, env = "DEMO_OMS_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// This node's OMS version (v4.3.1 reads the split oms_cm_meta_*/oms_rm_meta_* keys).
        #[arg(long = "oms-version", env = "DEMO_OMS_VERSION", value_name = "LABEL")]
        version: String,
        /// Answer `/health` with 503 when `OMS_HOST_IP` is this address (a release broken on one node).
        #[arg(long, value_name = "IP")]
        unhealthy_on: Option<String>,
    },
    /// Serve the console's `ha.config` system parameter (GET, PUT) and `/api/stats`.
    Master {
        /// Address to listen on (port 0 picks one; the bound address is printed).
        #[arg(long)]
        listen: String,
        /// The parameter's value at start.
        #[arg(long, default_value = DEFAULT_HA_CONFIG)]
        ha_config: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            config,
            version,
            unhealthy_on,
        } => {
            let info = match load_node(&version, &config) {
                Ok(info) => info,
                Err(e) => {
                    eprintln!("demo-oms: {e}");
                    std::process::exit(1);
                }
            };
            let unhealthy = unhealthy_on.is_some() && unhealthy_on == info.host_ip;
            let listener = bind(&listen).await?;
            println!(
                "demo-oms listening on {} (version {version}, config {})",
                listener.local_addr()?,
                config.display()
            );
            serve_node(listener, NodeConfig { info, unhealthy }, shutdown_signal()).await?;
        }
        Command::Master { listen, ha_config } => {
            let listener = bind(&listen).await?;
            println!("demo-oms master listening on {}", listener.local_addr()?);
            serve_master(listener, ha_config, shutdown_signal()).await?;
        }
    }
    Ok(())
}

async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}; pick a free address"))
}
