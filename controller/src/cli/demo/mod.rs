//! `patchctl demo up|down|status` (DEMO ONLY): run a demo cluster of patchd agents on loopback (`127.0.1.1` …
//! `127.0.1.N`) with demo-master/demo-worker services, imported as cluster `demo`, so patchd can be tried in one go.

use super::{Ctx, Format};
use anyhow::bail;
use down::down;
use patchctl::demo::DemoLayout;
use patchctl::demo::layout::{self, DEFAULT_AGENT_PORT, ServiceRole};
use patchctl::demo::procs::DemoRecord;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;
use up::up;

mod down;
mod up;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Start N agents on 127.0.1.1..127.0.1.N running the demo cluster (v1.0.0) and import it as cluster `demo`.
    Up(UpArgs),
    /// Stop every process `demo up` started (agents and their services); keeps the files for inspection.
    Down(DownArgs),
    /// Show the demo's agents, services, leader and members.
    Status(DirArg),
}

#[derive(Debug, clap::Args)]
struct DirArg {
    /// Demo directory. Default: $PATCHCTL_HOME/demo
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Number of hosts (agents): 1 master below 6 hosts, 3 masters from 6 on; the rest are workers.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    #[command(flatten)]
    dir: DirArg,
    /// Port every demo agent listens on (at 127.0.1.k).
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    agent_port: u16,
    /// First three octets of the hosts' addresses (host k is <prefix>.k); loopback only.
    #[arg(long, default_value = layout::DEFAULT_HOSTS_PREFIX)]
    hosts_prefix: String,
    /// Directory holding the `patchd`, `demo-master` and `demo-worker` binaries. Default: patchctl's own directory.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Run the workers as Docker containers (backend `docker`) from an image built locally from demo-worker;
    /// needs the Docker Engine on its Unix socket (`DOCKER_HOST=unix://…` names another).
    #[arg(long)]
    containers: bool,
    /// How long to wait for the agents to answer and the services to become healthy.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct DownArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Also delete the demo directory (packages, logs, agent state).
    #[arg(long)]
    purge: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    match args.command {
        Command::Up(up_args) => up(ctx, up_args).await,
        Command::Down(down_args) => down(ctx, down_args).await,
        Command::Status(dir) => status(ctx, dir).await,
    }
}

fn demo_dir(ctx: &Ctx, arg: &DirArg) -> PathBuf {
    arg.dir.clone().unwrap_or_else(|| ctx.home.demo_dir())
}

/// Prints progress on stderr in text mode (stdout carries the result).
fn progress(ctx: &Ctx, message: &str) {
    if ctx.format == Format::Text {
        errln!("==> {message}");
    }
}

// ----- status -----

async fn status(ctx: &Ctx, args: DirArg) -> anyhow::Result<u8> {
    let dir = demo_dir(ctx, &args);
    let dir = dir.canonicalize().unwrap_or(dir);
    let Some(record) = DemoRecord::load(&layout::record_path(&dir))? else {
        bail!(
            "no demo in {}: start one with `patchctl demo up`",
            dir.display()
        );
    };
    let layout = DemoLayout::new(&dir, record.nodes, record.agent_port, &record.hosts_prefix)?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut agents = Vec::new();
    for agent in &record.agents {
        agents.push(json!({"addr": agent.addr, "pid": agent.process.pid, "running": agent.process.is_alive(), "log": agent.log}));
    }
    let mut services = Vec::new();
    for service in layout.services() {
        let healthy = http
            .get(format!("{}/health", service.url()))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        let version: Option<serde_json::Value> =
            match http.get(format!("{}/version", service.url())).send().await {
                Ok(response) => response.json().await.ok(),
                Err(_) => None,
            };
        services.push(json!({
            "name": service.name, "role": service.role.component(), "addr": service.addr(), "healthy": healthy,
            "version": version.as_ref().and_then(|v| v.get("version")).cloned(),
            "pid": version.as_ref().and_then(|v| v.get("pid")).cloned(),
        }));
    }
    let mut leader = None;
    let mut members = None;
    for master in layout.services_of(ServiceRole::Master) {
        if let Ok(response) = http
            .get(format!("{}/api/leader", master.url()))
            .send()
            .await
            && let Ok(body) = response.json::<serde_json::Value>().await
        {
            leader = Some(body);
            if let Ok(response) = http
                .get(format!("{}/api/members", master.url()))
                .send()
                .await
            {
                members = response.json::<serde_json::Value>().await.ok();
            }
            break;
        }
    }
    let all_up = agents.iter().all(|a| a["running"] == true)
        && services.iter().all(|s| s["healthy"] == true);
    match ctx.format {
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "dir": dir, "up": all_up, "agents": agents, "services": services, "leader": leader, "members": members,
            }))?
        ),
        Format::Text => {
            outln!(
                "demo in {} ({})",
                dir.display(),
                if all_up { "up" } else { "NOT fully up" }
            );
            outln!("agents:");
            for agent in &agents {
                outln!(
                    "  {:<16} pid {:<8} {}",
                    agent["addr"].as_str().unwrap_or_default(),
                    agent["pid"],
                    if agent["running"] == true {
                        "running"
                    } else {
                        "stopped"
                    }
                );
            }
            outln!("services:");
            for service in &services {
                outln!(
                    "  {:<10} {:<16} {:<8} {}",
                    service["name"].as_str().unwrap_or_default(),
                    service["addr"].as_str().unwrap_or_default(),
                    if service["healthy"] == true {
                        "healthy"
                    } else {
                        "DOWN"
                    },
                    service["version"].as_str().unwrap_or("-")
                );
            }
            if let Some(leader) = &leader {
                outln!("leader: {}", leader["leader"].as_str().unwrap_or("?"));
            }
            if let Some(serde_json::Value::Array(members)) = &members {
                outln!("members (as the leader sees them):");
                for member in members {
                    outln!(
                        "  {:<10} {:<7} {:<8} {}",
                        member["name"].as_str().unwrap_or_default(),
                        member["role"].as_str().unwrap_or_default(),
                        member["state"].as_str().unwrap_or_default(),
                        member["version"].as_str().unwrap_or("-")
                    );
                }
            }
        }
    }
    Ok(if all_up {
        patchctl::exit::OK
    } else {
        patchctl::exit::ERROR
    })
}
