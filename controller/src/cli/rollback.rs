//! `patchctl rollback <cluster>`: a rollout like `patch` (same planner, hooks, failure budget, journal and resume)
//! whose apply step is the agent's Rollback call, bringing nodes back to the version before a patch. With
//! `--upgrade ID`, the full undo of an upgrade instead (`cli/upgrade.rs`).

use super::Ctx;
use super::args::{RolloutFlags, Selection, lock_for_new_rollout};
use anyhow::bail;
use patchctl::hooks::{ClusterHooks, HookClient};
use patchctl::registered::{load_tls, load_topology};
use patchctl::rollout::{NewRun, journal_and_execute, observe, plan_input, resume};
use patchctl::store::{RolloutKind, RolloutOptions, Store, new_rollout_id};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name.
    pub cluster: String,
    // Without -N/-R: the nodes marked `(patched)` (by `--to`'s rollout, when given); said in the command's help.
    #[command(flatten)]
    pub selection: Selection,
    /// Return to the version before this patch (a rollout id, see `patchctl audit`). Default: undo the last
    /// committed patch of each node.
    #[arg(long = "to", value_name = "PATCH_ID")]
    pub to: Option<String>,
    #[command(flatten)]
    pub rollout: RolloutFlags,
    /// Continue the cluster's unfinished rollout.
    #[arg(long)]
    pub resume: bool,
    /// Undo an upgrade (`patchctl upgrade`): every done step's undo, newest first (databases loaded back from
    /// their dumps, files and containers restored).
    #[arg(long = "upgrade", value_name = "UPGRADE_ID", conflicts_with_all = ["to", "resume"])]
    pub upgrade: Option<String>,
    /// Longest wait for one node's status probes before planning.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub probe_timeout: Duration,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    if let Some(id) = &args.upgrade {
        return super::upgrade::undo(ctx, &args.cluster, id, args.rollout.yes).await;
    }
    let store = Arc::new(Store::open_home(&ctx.home)?);
    if let Some(unfinished) = store.unfinished_rollout(&args.cluster)? {
        if args.resume {
            return Ok(resume(&ctx.home, ctx.format, store, unfinished).await?);
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
        errln!(
            "Nothing to resume: cluster `{}` has no unfinished rollout (`patchctl audit {}` lists its rollouts)",
            args.cluster,
            args.cluster
        );
        return Ok(patchctl::exit::DECLINED);
    }
    let topology = Arc::new(load_topology(&store, &args.cluster)?);
    let mut nodes = args.selection.nodes.clone();
    if nodes.is_empty() && args.selection.roles.is_empty() {
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
    let tls = load_tls(&ctx.home, &topology)?;
    let hooks = ClusterHooks::new(Arc::clone(&topology), HookClient::for_cluster(&tls)?);
    let observed = observe(&hooks, &topology, &tls, args.probe_timeout).await;
    let input = plan_input(
        &topology,
        &observed,
        &nodes,
        &args.selection.roles,
        topology.role_order(),
        args.rollout.policy.policy(),
    );
    let plan = patchd_planner::plan(&input)?;
    let target = args.to.as_deref().map_or_else(
        || "the previous version".to_string(),
        |to| format!("the version before {to}"),
    );
    let header = format!("Roll back cluster `{}` to {target}", args.cluster);
    if let Some(code) = args.rollout.review(ctx, &header, &plan).await? {
        return Ok(code);
    }
    let lock = lock_for_new_rollout(&store, &args.cluster)?;
    let options = RolloutOptions {
        patch_id: new_rollout_id(),
        offline: false,
        overwrite: false,
        concurrency: 1,
        stage_all_first: false,
        canary_wait_ms: args.rollout.policy.canary_wait_ms(),
        to_patch_id: args.to.clone(),
        component: String::new(),
    };
    let code = journal_and_execute(
        ctx.format,
        store,
        &args.cluster,
        NewRun {
            kind: RolloutKind::Rollback,
            package_digest: None,
            package_path: String::new(),
            version: args.to.clone().unwrap_or_default(),
            options,
            plan,
            topology,
            tls,
            blob: None,
        },
    )
    .await;
    drop(lock);
    Ok(code?)
}
