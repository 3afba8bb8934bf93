//! `patchctl demo down`: stop every recorded agent and service, then anything still running from the demo
//! directory, and remove the demo's containers (`--containers`).

use super::{Ctx, DownArgs, Format, demo_dir, progress};
use anyhow::{Context, bail};
use patchctl::demo::containers::DEMO_LABEL;
use patchctl::demo::layout;
use patchctl::demo::procs::{self, DemoRecord, ProcessIdentity, StopOutcome};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

// ----- down -----

pub(super) async fn down(ctx: &Ctx, args: DownArgs) -> anyhow::Result<u8> {
    let dir = demo_dir(ctx, &args.dir);
    if !dir.exists() {
        outln!("no demo in {}: nothing to stop", dir.display());
        return Ok(patchctl::exit::OK);
    }
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let record = DemoRecord::load(&layout::record_path(&dir))?;
    if record.is_none() && !dir.join("hosts").is_dir() {
        bail!(
            "{} does not look like a demo directory (no demo.json, no hosts/); pass the --dir given to `demo up`",
            dir.display()
        );
    }
    let stopped = stop_all(ctx, &dir, record.as_ref()).await;
    if args.purge {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    match ctx.format {
        Format::Json => outln!(
            "{}",
            json!({"dir": dir, "stopped": stopped, "purged": args.purge})
        ),
        Format::Text => {
            if stopped.is_empty() {
                outln!("nothing was running in {}", dir.display());
            } else {
                outln!(
                    "stopped {} process(es): {}",
                    stopped.len(),
                    stopped.join(", ")
                );
            }
            if args.purge {
                outln!("removed {}", dir.display());
            } else {
                outln!(
                    "kept {} (logs, packages, agent state); `patchctl demo down --purge` removes it",
                    dir.display()
                );
            }
        }
    }
    Ok(patchctl::exit::OK)
}

/// Stops the recorded agents, then every service they started (pid files), then any stray process running a
/// binary deployed under the demo directory. Returns a description of each process stopped.
pub(super) async fn stop_all(ctx: &Ctx, dir: &Path, record: Option<&DemoRecord>) -> Vec<String> {
    let mut stopped = Vec::new();
    if let Some(record) = record {
        // Agents first: a live agent would restart a service stopped under it.
        let stops = record.agents.iter().map(|agent| async move {
            (
                agent,
                agent.process.stop(false, Duration::from_secs(15)).await,
            )
        });
        for (agent, outcome) in futures::future::join_all(stops).await {
            describe_stop(
                ctx,
                &format!("agent {} (pid {})", agent.addr, agent.process.pid),
                outcome,
                &mut stopped,
            );
        }
    }
    stopped.extend(stop_services(ctx, dir).await);
    if record.is_none_or(|record| record.containers) {
        stopped.extend(remove_containers(ctx, dir, record.is_some()).await);
    }
    stopped
}

/// Removes every container labelled with this demo directory (`demo up --containers`), also one the agent left
/// renamed aside. `required`: the record says there are containers, so an unreachable Docker Engine is reported.
pub(super) async fn remove_containers(ctx: &Ctx, dir: &Path, required: bool) -> Vec<String> {
    let engine = match patchd_docker::Engine::connect_default().await {
        Ok(engine) => engine,
        Err(error) => {
            if required {
                errln!("warning: the demo's containers were not removed: {error}");
            }
            return Vec::new();
        }
    };
    let label = format!("{DEMO_LABEL}={}", dir.to_string_lossy());
    let filters = std::collections::HashMap::from([("label", vec![label.as_str()])]);
    let names = match engine.container_names(&filters).await {
        Ok(names) => names,
        Err(error) => {
            errln!("warning: the demo's containers were not removed: {error}");
            return Vec::new();
        }
    };
    let mut removed = Vec::new();
    for name in names {
        match engine.remove_container(&name).await {
            Ok(()) => {
                progress(ctx, &format!("removed container {name}"));
                removed.push(format!("container {name}"));
            }
            Err(error) => errln!("warning: {error}"),
        }
    }
    removed
}

/// Stops the services named by the agents' pid files and any process still running a binary deployed under `dir`.
pub(super) async fn stop_services(ctx: &Ctx, dir: &Path) -> Vec<String> {
    let mut stopped = Vec::new();
    let hosts_dir = dir.join("hosts");
    let host_dirs: Vec<PathBuf> = std::fs::read_dir(&hosts_dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    let mut services = Vec::new();
    for host_dir in host_dirs {
        services.extend(procs::service_processes(&host_dir.join("state")));
    }
    let stops = services.iter().map(|service| async move {
        (
            service,
            service.process.stop(true, Duration::from_secs(10)).await,
        )
    });
    for (service, outcome) in futures::future::join_all(stops).await {
        describe_stop(
            ctx,
            &format!("{} (pid {})", service.service, service.process.pid),
            outcome,
            &mut stopped,
        );
    }
    // Belt and braces: a service whose pid file is gone (e.g. an agent killed mid-restart) still runs a binary
    // from the demo's deploy directories.
    for stray in processes_running_under(&hosts_dir) {
        let outcome = stray.stop(true, Duration::from_secs(10)).await;
        describe_stop(
            ctx,
            &format!("stray process {}", stray.pid),
            outcome,
            &mut stopped,
        );
    }
    stopped
}

pub(super) fn describe_stop(
    ctx: &Ctx,
    what: &str,
    outcome: StopOutcome,
    stopped: &mut Vec<String>,
) {
    match outcome {
        StopOutcome::NotRunning => {}
        StopOutcome::Terminated => stopped.push(what.to_string()),
        StopOutcome::Killed => {
            progress(ctx, &format!("{what} ignored SIGTERM: killed"));
            stopped.push(what.to_string());
        }
        StopOutcome::StillRunning => errln!("warning: {what} is still running after SIGKILL"),
    }
}

/// Live processes whose executable lies under `dir`.
pub(super) fn processes_running_under(dir: &Path) -> Vec<ProcessIdentity> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
        })
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(dir))
        })
        .filter_map(ProcessIdentity::of)
        .collect()
}
