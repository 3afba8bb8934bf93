//! `patchctl rollback <cluster>`: a rollout like `patch` (same planner, hooks, failure budget, journal and resume)
//! whose apply step is the agent's Rollback call, bringing nodes back to the version before a patch.

use super::Ctx;
use super::display::{load_tls, load_topology};
use super::patch::{
    Execution, PolicyArgs, confirm, execute, observe, plan_input, print_dry_run, report_takeover,
    resume, warn_parallelism,
};
use anyhow::{Context, bail};
use patchctl::executor::live::RolloutOptions;
use patchctl::exit;
use patchctl::hooks::{ClusterHooks, HookClient};
use patchctl::store::{NewRollout, RolloutKind, Store, new_rollout_id};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name.
    pub cluster: String,
    /// Only these nodes (IDs or names, comma-separated). Default: the nodes marked `(patched)` (by `--to`'s
    /// rollout, when given).
    #[arg(short = 'N', long = "node", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Only these roles (comma-separated). With -N: the intersection.
    #[arg(short = 'R', long = "role", value_delimiter = ',')]
    pub roles: Vec<String>,
    /// Return to the version before this patch (a rollout id, see `patchctl audit`). Default: undo the last
    /// committed patch of each node.
    #[arg(long = "to", value_name = "PATCH_ID")]
    pub to: Option<String>,
    /// Print the plan and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(short = 'y', long = "yes")]
    pub yes: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Continue the cluster's unfinished rollout.
    #[arg(long)]
    pub resume: bool,
    /// Longest wait for one node's status probes before planning.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub probe_timeout: Duration,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    let store = Arc::new(Store::open_home(&ctx.home)?);
    if let Some(unfinished) = store.unfinished_rollout(&args.cluster)? {
        if args.resume {
            return resume(ctx, store, unfinished).await;
        }
        bail!(
            "rollout {} ({}, {}) on cluster `{}` is unfinished: finish it first with `patchctl patch --resume {}`",
            unfinished.id,
            unfinished.kind,
            unfinished.state,
            args.cluster,
            args.cluster
        );
    }
    if args.resume {
        bail!(
            "cluster `{}` has no unfinished rollout to resume",
            args.cluster
        );
    }
    let topology = Arc::new(load_topology(&store, &args.cluster)?);
    let mut nodes = args.nodes.clone();
    if nodes.is_empty() && args.roles.is_empty() {
        let marks = store.node_marks(&args.cluster)?;
        nodes = marks
            .into_iter()
            .filter(|mark| args.to.as_ref().is_none_or(|to| &mark.rollout_id == to))
            .map(|mark| mark.node_id)
            .collect();
        if nodes.is_empty() {
            bail!(
                "no node of cluster `{}` is marked (patched){}: name the nodes to roll back with -N or roles with -R",
                args.cluster,
                args.to
                    .as_ref()
                    .map(|to| format!(" by {to}"))
                    .unwrap_or_default()
            );
        }
    }
    let tls = load_tls(ctx, &topology)?;
    let hooks = ClusterHooks::new(Arc::clone(&topology), HookClient::new()?);
    let observed = observe(&hooks, &topology, &tls, args.probe_timeout).await;
    let input = plan_input(
        &topology,
        &observed,
        &nodes,
        &args.roles,
        topology.role_order(),
        &args.policy,
    );
    let plan = patchd_planner::plan(&input)?;
    let target = args.to.as_deref().map_or_else(
        || "the previous version".to_string(),
        |to| format!("the version before {to}"),
    );
    let header = format!("Roll back cluster `{}` to {target}", args.cluster);
    if args.dry_run {
        return print_dry_run(ctx, &header, &plan);
    }
    eprintln!("{header}\n\n{plan}");
    warn_parallelism(&plan);
    if args.policy.canary.is_some()
        && args.policy.canary_wait.is_none()
        && !std::io::IsTerminal::is_terminal(&std::io::stdin())
    {
        bail!(
            "--canary needs a confirmation after the canary batch, and stdin is not a terminal: add --canary-wait DURATION"
        );
    }
    if !confirm("Do you want to continue?", args.yes).await? {
        return Ok(exit::DECLINED);
    }
    let lock = store.acquire_rollout_lock(&args.cluster)?;
    report_takeover(&lock);
    let rollout_id = new_rollout_id();
    let options = RolloutOptions {
        patch_id: rollout_id.clone(),
        offline: false,
        overwrite: false,
        concurrency: 1,
        canary_wait_ms: args.policy.canary_wait.map(|wait| wait.as_millis() as u64),
        to_patch_id: args.to.clone(),
        component: String::new(),
    };
    store.create_rollout(&NewRollout {
        id: rollout_id.clone(),
        cluster: args.cluster.clone(),
        kind: RolloutKind::Rollback,
        package_digest: String::new(),
        package_path: String::new(),
        version: args.to.clone().unwrap_or_default(),
        plan_json: serde_json::to_string(&plan)?,
        options_json: serde_json::to_string(&options)?,
    })?;
    let rollout = store
        .rollout(&rollout_id)?
        .context("the rollout just journaled is missing from the store")?;
    let code = execute(
        ctx,
        Execution {
            store,
            rollout,
            options,
            plan,
            topology,
            tls,
            blob: None,
            prior: HashMap::new(),
        },
    )
    .await;
    drop(lock);
    code
}
