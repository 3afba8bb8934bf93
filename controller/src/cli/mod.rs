//! Command-line surface of patchctl: one module per command (plus `args`, the arguments several share); `anyhow`
//! is allowed here and in main only. What the commands share beyond arguments lives in the library.

use clap::{Parser, Subcommand};
use patchctl::home::Home;
use std::path::PathBuf;

mod agent;
mod args;
mod audit;
mod ca;
mod cert;
mod cluster;
mod demo;
mod display;
mod key;
mod package;
mod patch;
mod rollback;
mod upgrade;

/// patchctl: plan and run live hotfixes and upgrades on a fleet of patchd agents.
#[derive(Debug, Parser)]
#[command(name = "patchctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Controller home (CA, certificates, store). Default: ~/.patchctl
    #[arg(long, global = true, env = "PATCHCTL_HOME")]
    pub home: Option<PathBuf>,

    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

pub use patchctl::output::Format;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the cluster certificate authority.
    Ca(ca::Args),
    /// Issue agent and controller certificates signed by the cluster CA.
    Cert(cert::Args),
    /// Talk to one agent directly (info, push): building blocks and debugging.
    Agent(agent::Args),
    /// Build, inspect and sign hotfix packages.
    Package(package::Args),
    /// Register and list clusters (topology files).
    Cluster(cluster::Args),
    /// Show a cluster's nodes, their status and deployed versions.
    Display(display::Args),
    /// Patch a live cluster with a package, rolling through the nodes.
    Patch(patch::Args),
    /// Bring nodes back to their previous version, as a rollout.
    ///
    /// Without -N/-R: the nodes marked `(patched)` (by `--to`'s rollout, when given).
    Rollback(rollback::Args),
    /// Run an upgrade runbook on a cluster: checks, backups, edits, SQL, container swaps; journaled, resumable,
    /// rolled back on failure (--dry-run prints its steps).
    Upgrade(upgrade::Args),
    /// Show rollout reports.
    Audit(audit::Args),
    /// Run a local demo cluster on loopback (DEMO ONLY).
    Demo(demo::Args),
    /// Package-signing keys (ed25519, minisign's format), meant to live off the controller host.
    Key(key::Args),
}

/// What every command gets besides its own arguments.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub home: Home,
    pub format: Format,
}

/// Runs the chosen command; returns the process exit code (see `patchctl::exit`).
pub async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let ctx = Ctx {
        home: cli.home.map(Home::at).unwrap_or_else(Home::from_env),
        format: cli.format,
    };
    match cli.command {
        Command::Ca(a) => ca::run(&ctx, a).await,
        Command::Cert(a) => cert::run(&ctx, a).await,
        Command::Agent(a) => agent::run(&ctx, a).await,
        Command::Package(a) => package::run(&ctx, a).await,
        Command::Cluster(a) => cluster::run(&ctx, a).await,
        Command::Display(a) => display::run(&ctx, a).await,
        Command::Patch(a) => patch::run(&ctx, a).await,
        Command::Rollback(a) => rollback::run(&ctx, a).await,
        Command::Upgrade(a) => upgrade::run(&ctx, a).await,
        Command::Audit(a) => audit::run(&ctx, a).await,
        Command::Demo(a) => demo::run(&ctx, a).await,
        Command::Key(a) => key::run(&ctx, a).await,
    }
}

/// Logs go to stderr; stdout is for results.
pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PATCHCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| patchctl::output::StderrLog)
        .try_init();
}
