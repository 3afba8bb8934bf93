//! `patchctl upgrade <cluster> <runbook.yaml> --dry-run`: check a runbook against the cluster, lay it over the
//! planner's node order and print every step in order per scope and node (`--format json` for tools). Running a
//! runbook is not wired yet: without `--dry-run` the command checks the runbook, says so and exits 1.

use super::Ctx;
use super::args::{PolicyArgs, Selection};
use anyhow::Context;
use patchctl::output::Format;
use patchctl::registered::load_topology;
use patchctl::rollout::plan_input;
use patchctl::store::Store;
use patchd_runbook::schedule::{NodeRef, dry_run, render_dry_run, schedule};
use patchd_runbook::{ClusterFacts, parse_for_cluster};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name (see `patchctl cluster list`).
    pub cluster: String,
    /// The upgrade runbook (YAML; format in the `patchd-runbook` crate doc, example `examples/oms/runbook.yaml`).
    pub runbook: PathBuf,
    #[command(flatten)]
    pub selection: Selection,
    /// Print every step in order per scope and node, and exit.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(&args.runbook).with_context(|| {
        format!(
            "cannot read runbook {}: check the path",
            args.runbook.display()
        )
    })?;
    let store = Store::open_home(&ctx.home)?;
    let topology = load_topology(&store, &args.cluster)?;
    let facts = ClusterFacts {
        roles: topology.role_order(),
        databases: topology
            .databases
            .iter()
            .map(|db| db.name.clone())
            .collect(),
    };
    let runbook = parse_for_cluster(&text, &facts)
        .with_context(|| format!("runbook {} refused", args.runbook.display()))?;
    if !args.dry_run {
        errln!(
            "The runbook `{}` is valid for cluster `{}`, but running an upgrade is not implemented yet: nothing \
             was changed. `patchctl upgrade {} {} --dry-run` prints its steps.",
            runbook.name,
            args.cluster,
            args.cluster,
            args.runbook.display()
        );
        return Ok(patchctl::exit::ERROR);
    }
    // A dry run observes nothing: leaders and down nodes are not known, so the order is the topology's.
    let input = plan_input(
        &topology,
        &HashMap::new(),
        &args.selection.nodes,
        &args.selection.roles,
        runbook.roles.clone(),
        args.policy.policy(),
    );
    let plan = patchd_planner::plan(&input)?;
    let nodes: Vec<NodeRef> = plan
        .batches()
        .iter()
        .flat_map(|batch| {
            batch.nodes.iter().map(|node| {
                let declared = topology
                    .roles
                    .iter()
                    .flat_map(|role| role.nodes.iter())
                    .find(|declared| declared.id == node.id);
                NodeRef {
                    id: node.id.clone(),
                    name: node.name.clone(),
                    host: node.host.clone(),
                    role: batch.role.clone(),
                    deploy_dir: declared.map(|n| n.deploy_dir.clone()).unwrap_or_default(),
                    service: declared.map(|n| n.service.clone()).unwrap_or_default(),
                    batch: batch.index,
                }
            })
        })
        .collect();
    let schedule = schedule(&runbook, &nodes)?;
    let steps = dry_run(&runbook, &schedule);
    match ctx.format {
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "cluster": args.cluster,
                "runbook": runbook.name,
                "plan": plan,
                "steps": steps,
            }))?
        ),
        Format::Text => outln!(
            "Upgrade of cluster `{}` (leaders and down nodes are not observed in a dry run)\n{}\n(dry run: nothing \
             was changed)",
            args.cluster,
            render_dry_run(&runbook, &steps)
        ),
    }
    Ok(patchctl::exit::OK)
}
