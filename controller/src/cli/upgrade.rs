//! `patchctl upgrade <cluster> <runbook.yaml>`: check a runbook against the cluster, lay it over the planner's
//! node order, print every step (`--dry-run` stops there), ask, then run it as one journaled upgrade
//! (`patchctl::upgrade`) with a progress line per step instance; `--resume ID` continues one. Also the
//! `rollback --upgrade ID` entry (`undo`). Exit codes: 0 done, 1 refused or failed with nothing changed, 3 failed
//! and rolled back (or halted after the point of no return / a failed undo), 4 declined, 130 halted on a step
//! whose outcome only the operator can tell.

use super::Ctx;
use super::args::{PolicyArgs, Selection, confirm};
use anyhow::{Context, bail};
use patchctl::agent::client::PreparedBlob;
use patchctl::exit;
use patchctl::output::Format;
use patchctl::registered::{load_tls, load_topology};
use patchctl::store::{NewUpgrade, Store, UpgradeOutcome, UpgradeRecord};
use patchctl::topology::Topology;
use patchctl::upgrade::layout::{lay_out, parse};
use patchctl::upgrade::{Ending, Execution, Mode, execute, new_upgrade_id};
use patchd_runbook::machine::{Decision, Halt, Outcome};
use patchd_runbook::schedule::{NodeRef, Schedule, dry_run, render_dry_run, schedule};
use patchd_runbook::{Action, ContainerOp, Runbook};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name (see `patchctl cluster list`).
    pub cluster: String,
    /// The upgrade runbook (YAML; format in the `patchd-runbook` crate doc, example `examples/oms/runbook.yaml`).
    /// Not needed with `--resume` (the stored text runs).
    #[arg(required_unless_present = "resume")]
    pub runbook: Option<PathBuf>,
    /// The image package of the runbook's `container: swap` steps (`patchctl package build --image`).
    #[arg(long, value_name = "PKG")]
    pub package: Option<PathBuf>,
    #[command(flatten)]
    pub selection: Selection,
    /// Print every step in order per scope and node, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue the upgrade with this id (see `patchctl audit`).
    #[arg(long, value_name = "ID")]
    pub resume: Option<String>,
    /// With --resume: the halted step (`STEP@NODE`, as printed) took effect before the crash.
    #[arg(long, value_name = "STEP", requires = "resume")]
    pub took_effect: Vec<String>,
    /// With --resume: the halted step did not take effect; it runs again.
    #[arg(long, value_name = "STEP", requires = "resume")]
    pub not_taken: Vec<String>,
    /// Do not ask for confirmation.
    #[arg(short = 'y', long = "yes")]
    pub yes: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    let store = Arc::new(Store::open_home(&ctx.home)?);
    if let Some(id) = &args.resume {
        return resume(ctx, store, &args, id).await;
    }
    let Some(runbook_path) = &args.runbook else {
        bail!("give the runbook file (or `--resume ID`)");
    };
    let text = std::fs::read_to_string(runbook_path).with_context(|| {
        format!(
            "cannot read runbook {}: check the path",
            runbook_path.display()
        )
    })?;
    let topology = load_topology(&store, &args.cluster)?;
    let layout = lay_out(
        &text,
        &topology,
        &args.selection.nodes,
        &args.selection.roles,
        args.policy.policy(),
    )
    .with_context(|| format!("runbook {} refused", runbook_path.display()))?;
    let steps = dry_run(&layout.runbook, &layout.schedule);
    if args.dry_run {
        match ctx.format {
            Format::Json => outln!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "cluster": args.cluster,
                    "runbook": layout.runbook.name,
                    "plan": layout.plan,
                    "steps": steps,
                }))?
            ),
            Format::Text => outln!(
                "Upgrade of cluster `{}` (leaders and down nodes are not observed in a dry run)\n{}\n(dry run: \
                 nothing was changed)",
                args.cluster,
                render_dry_run(&layout.runbook, &steps)
            ),
        }
        return Ok(exit::OK);
    }
    let package = prepare_package(&layout.runbook, args.package.as_deref()).await?;
    errln!(
        "Upgrade of cluster `{}`\n{}",
        args.cluster,
        render_dry_run(&layout.runbook, &steps)
    );
    if !confirm("Run this upgrade?", args.yes).await? {
        return Ok(exit::DECLINED);
    }
    // One rollout or upgrade of a cluster at a time from this store (leases guard the agents across stores).
    let _lock = store.acquire_rollout_lock(&args.cluster)?;
    let upgrade_id = new_upgrade_id();
    store.create_upgrade(&NewUpgrade {
        id: upgrade_id.clone(),
        cluster: args.cluster.clone(),
        runbook_name: layout.runbook.name.clone(),
        runbook_sha256: sha256_hex(text.as_bytes()),
        runbook_text: text,
        package_digest: package
            .as_ref()
            .map(|blob| blob.digest.to_string())
            .unwrap_or_default(),
        package_path: args
            .package
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_default(),
        schedule_json: serde_json::to_string(&layout.nodes)?,
    })?;
    errln!(
        "Upgrade {upgrade_id} started (resume with `patchctl upgrade {} --resume {upgrade_id}`)",
        args.cluster
    );
    let ending = run_execution(
        ctx,
        store,
        topology,
        &upgrade_id,
        layout.runbook,
        layout.schedule,
        package,
        Mode::Run(Vec::new()),
    )
    .await?;
    Ok(report(ctx, &args.cluster, &upgrade_id, &ending))
}

async fn resume(ctx: &Ctx, store: Arc<Store>, args: &Args, id: &str) -> anyhow::Result<u8> {
    let record = stored_upgrade(&store, &args.cluster, id)?;
    if matches!(
        record.outcome,
        UpgradeOutcome::Completed | UpgradeOutcome::Undone | UpgradeOutcome::RolledBack
    ) {
        errln!(
            "Nothing to resume: upgrade {id} is {} (`patchctl audit --rollout {id}` shows it)",
            record.outcome
        );
        return Ok(exit::DECLINED);
    }
    if let Some(path) = &args.runbook {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read runbook {}", path.display()))?;
        if sha256_hex(text.as_bytes()) != record.runbook_sha256 {
            bail!(
                "{} is not the runbook upgrade {id} ran (its sha256 differs); a resume runs the stored text: leave \
                 the file out",
                path.display()
            );
        }
    }
    let (topology, runbook, schedule) = stored_layout(&store, &record)?;
    let decisions = decisions(&schedule, &args.took_effect, &args.not_taken)?;
    let package_path = args
        .package
        .clone()
        .or_else(|| (!record.package_path.is_empty()).then(|| PathBuf::from(&record.package_path)));
    let package = prepare_package(&runbook, package_path.as_deref()).await?;
    if let Some(blob) = &package
        && !record.package_digest.is_empty()
        && blob.digest.as_str() != record.package_digest
    {
        bail!(
            "{} is not the package upgrade {id} started with (digest {}); give that one",
            blob.path.display(),
            record.package_digest
        );
    }
    let _lock = store.acquire_rollout_lock(&record.cluster)?;
    errln!("Resuming upgrade {id} of cluster `{}`", record.cluster);
    let ending = run_execution(
        ctx,
        store,
        topology,
        id,
        runbook,
        schedule,
        package,
        Mode::Run(decisions),
    )
    .await?;
    Ok(report(ctx, &record.cluster, id, &ending))
}

/// `patchctl rollback <cluster> --upgrade ID`: undo every done step of the upgrade, newest first.
pub(super) async fn undo(ctx: &Ctx, cluster: &str, id: &str, yes: bool) -> anyhow::Result<u8> {
    let store = Arc::new(Store::open_home(&ctx.home)?);
    let record = stored_upgrade(&store, cluster, id)?;
    if record.outcome == UpgradeOutcome::Undone {
        errln!("Nothing to undo: upgrade {id} was undone already");
        return Ok(exit::DECLINED);
    }
    let (topology, runbook, schedule) = stored_layout(&store, &record)?;
    let package = if record.package_path.is_empty() {
        None
    } else {
        prepare_package(&runbook, Some(Path::new(&record.package_path))).await?
    };
    errln!(
        "Undo upgrade {id} (`{}`) of cluster `{cluster}`: every done step's undo runs, newest first.",
        record.runbook_name
    );
    if !confirm("Undo this upgrade?", yes).await? {
        return Ok(exit::DECLINED);
    }
    let _lock = store.acquire_rollout_lock(cluster)?;
    let ending = run_execution(
        ctx,
        store,
        topology,
        id,
        runbook,
        schedule,
        package,
        Mode::FullUndo,
    )
    .await?;
    Ok(report(ctx, cluster, id, &ending))
}

fn stored_upgrade(store: &Store, cluster: &str, id: &str) -> anyhow::Result<UpgradeRecord> {
    match store.upgrade(id)? {
        Some(record) if record.cluster == cluster => Ok(record),
        Some(record) => bail!(
            "upgrade {id} is of cluster `{}`, not `{cluster}`",
            record.cluster
        ),
        None => bail!("no upgrade `{id}`; `patchctl audit {cluster}` lists them"),
    }
}

/// The stored runbook over the stored node order, checked against the cluster's topology as it is now.
fn stored_layout(
    store: &Store,
    record: &UpgradeRecord,
) -> anyhow::Result<(Topology, Runbook, Schedule)> {
    let topology = load_topology(store, &record.cluster)?;
    let runbook = parse(&record.runbook_text, &topology).with_context(|| {
        format!(
            "the runbook of upgrade {} no longer fits cluster `{}`",
            record.id, record.cluster
        )
    })?;
    let nodes: Vec<NodeRef> = serde_json::from_str(&record.schedule_json).with_context(|| {
        format!(
            "upgrade {}: its stored node order cannot be read",
            record.id
        )
    })?;
    let schedule = schedule(&runbook, &nodes)?;
    Ok((topology, runbook, schedule))
}

/// `--took-effect` / `--not-taken` names (`STEP@NODE` with the node's name or id, or `STEP` for a controller
/// step) as decisions.
fn decisions(
    schedule: &Schedule,
    took_effect: &[String],
    not_taken: &[String],
) -> anyhow::Result<Vec<Decision>> {
    let mut decisions = Vec::new();
    for (names, took) in [(took_effect, true), (not_taken, false)] {
        for name in names {
            let (step, node) = match name.split_once('@') {
                Some((step, node)) => (step, Some(node)),
                None => (name.as_str(), None),
            };
            let instance = schedule.steps.iter().find(|instance| {
                instance.key.step == step
                    && match (&instance.node, node) {
                        (None, None) => true,
                        (Some(n), Some(wanted)) => n.id == wanted || n.name == wanted,
                        (Some(_), None) | (None, Some(_)) => false,
                    }
            });
            let Some(instance) = instance else {
                bail!(
                    "`{name}` names no step instance of this upgrade (write it as printed: STEP@NODE)"
                );
            };
            decisions.push(Decision {
                key: instance.key.clone(),
                took_effect: took,
            });
        }
    }
    Ok(decisions)
}

async fn prepare_package(
    runbook: &Runbook,
    package: Option<&Path>,
) -> anyhow::Result<Option<Arc<PreparedBlob>>> {
    let swaps = runbook.steps.iter().find(|step| {
        matches!(&step.action, Action::Container(container) if matches!(container.op, ContainerOp::Swap { .. }))
    });
    match (package, swaps) {
        (None, Some(step)) => bail!(
            "step `{}` swaps a container to the package's image: give the image package with `--package PKG`; \
             nothing was changed",
            step.id
        ),
        (None, None) => Ok(None),
        (Some(path), _) => {
            let blob = PreparedBlob::prepare(path, patchd_package::digest::DEFAULT_CHUNK_SIZE)
                .await
                .with_context(|| format!("cannot read package {}", path.display()))?;
            Ok(Some(Arc::new(blob)))
        }
    }
}

#[allow(clippy::too_many_arguments)] // the parts of one Execution, gathered here
async fn run_execution(
    ctx: &Ctx,
    store: Arc<Store>,
    topology: Topology,
    upgrade_id: &str,
    runbook: Runbook,
    schedule: Schedule,
    package: Option<Arc<PreparedBlob>>,
    mode: Mode,
) -> anyhow::Result<Ending> {
    let tls = load_tls(&ctx.home, &topology)?;
    let format = ctx.format;
    let progress = Box::new(move |line: &str| match format {
        Format::Text => outln!("{line}"),
        Format::Json => errln!("{line}"),
    });
    Ok(execute(
        Execution {
            store,
            topology: Arc::new(topology),
            tls,
            upgrade_id: upgrade_id.to_string(),
            runbook,
            schedule,
            package,
            progress,
        },
        mode,
    )
    .await?)
}

/// Says how the run ended and returns the exit code.
fn report(ctx: &Ctx, cluster: &str, id: &str, ending: &Ending) -> u8 {
    let resume = format!("patchctl upgrade {cluster} --resume {id}");
    let (code, outcome, text) = match &ending.outcome {
        Outcome::Completed => (exit::OK, "completed", format!("Upgrade {id} completed")),
        Outcome::Undone => (exit::OK, "undone", format!("Upgrade {id} undone")),
        Outcome::RolledBack { failed, message } if !ending.changed_something => (
            exit::ERROR,
            "rolled_back",
            format!("Upgrade {id} stopped at {failed}: {message}; nothing was changed"),
        ),
        Outcome::RolledBack { failed, message } => (
            exit::ROLLOUT_FAILED,
            "rolled_back",
            format!(
                "Upgrade {id} failed at {failed}: {message}; the steps done were undone (`patchctl audit --rollout \
                 {id}` shows them)"
            ),
        ),
        Outcome::Halted(Halt::NeedsOperator(key)) => (
            exit::INTERRUPTED,
            "halted",
            format!(
                "Upgrade {id} halted: step {key} was started before patchctl stopped and has no result, and it is \
                 not safe to run twice. Check whether it took effect, then resume with `{resume} --took-effect \
                 {key}` or `{resume} --not-taken {key}`"
            ),
        ),
        Outcome::Halted(Halt::FailedPastPointOfNoReturn { key, message }) => (
            exit::ROLLOUT_FAILED,
            "halted",
            format!(
                "Upgrade {id} failed at {key} after the point of no return: {message}; nothing was undone. Fix it and \
                 resume with `{resume}`, or undo what can be with `patchctl rollback {cluster} --upgrade {id}`"
            ),
        ),
        Outcome::Halted(Halt::UndoFailed { key, message }) => (
            exit::ROLLOUT_FAILED,
            "halted",
            format!(
                "Upgrade {id}: the undo of {key} failed: {message}. Fix the cause and resume with `{resume}` (the \
                 undo is tried again)"
            ),
        ),
    };
    match ctx.format {
        Format::Json => outln!(
            "{}",
            serde_json::json!({
                "upgrade": id,
                "cluster": cluster,
                "outcome": outcome,
                "changed_something": ending.changed_something,
                "message": text,
                "exit_code": code,
            })
        ),
        Format::Text if code == exit::OK => outln!("{text}"),
        Format::Text => errln!("{text}"),
    }
    code
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}
