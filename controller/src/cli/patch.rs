//! `patchctl patch <cluster> <package>`: inspect the package, observe the cluster, plan, confirm, then run the
//! rollout engine (stage everywhere, then batch by batch with the cluster's hooks) with progress, Ctrl-C handling,
//! a final summary, and `--resume` after a crash.

use super::display::{load_tls, load_topology};
use super::rollout_flags::{NewRun, PolicyArgs, RolloutFlags, ask, journal_and_execute};
use super::{Ctx, Format};
use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use patchctl::agent_client::{PreparedBlob, PushProgress};
use patchctl::executor::live::{
    LiveEffects, PushProgressFn, RolloutOptions, StoreJournal, batches_from_plan, prior_records,
    rollout_state,
};
use patchctl::executor::{
    Action, BatchSpec, Cancel, Engine, Event, NodePhase, NodeRef, Observer, PauseDecision,
    RolloutEnd, RolloutReport, RolloutSpec, Step, StepStatus,
};
use patchctl::exit;
use patchctl::hooks::{ClusterHooks, HookClient};
use patchctl::status::{self, LiveAgentProbe, NodeStatus};
use patchctl::store::{
    NodeRolloutState, Rollout, RolloutKind, RolloutState, Store, new_rollout_id,
};
use patchctl::tls_files::ControllerTls;
use patchctl::topology::{Node, Topology};
use patchd_planner::{Plan, PlanInput, Selection};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name (see `patchctl cluster list`).
    pub cluster: String,
    /// The hotfix package (`.tar.gz`, see `patchctl package build`). Not needed with --resume.
    pub package: Option<PathBuf>,
    /// Only these nodes (IDs or names, comma-separated).
    #[arg(short = 'N', long = "node", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Only these roles (comma-separated). With -N: the intersection.
    #[arg(short = 'R', long = "role", value_delimiter = ',')]
    pub roles: Vec<String>,
    /// Record the package as the role's package for future scale-out.
    #[arg(long)]
    pub overwrite: bool,
    /// The cluster is offline: swap files only, no hooks, no restarts.
    #[arg(long)]
    pub offline: bool,
    #[command(flatten)]
    pub rollout: RolloutFlags,
    /// Continue the cluster's unfinished rollout (after a crash or Ctrl-C).
    #[arg(long)]
    pub resume: bool,
    /// Parallel uploads while staging (each holds a few MiB of buffers in flight).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Longest wait for one node's status probes before planning.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub probe_timeout: Duration,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    let store = Arc::new(Store::open_home(&ctx.home)?);
    if args.resume {
        let Some(rollout) = store.unfinished_rollout(&args.cluster)? else {
            errln!(
                "Nothing to resume: cluster `{}` has no unfinished rollout (`patchctl audit {}` lists its rollouts)",
                args.cluster,
                args.cluster
            );
            return Ok(patchctl::exit::DECLINED);
        };
        return resume(ctx, store, rollout).await;
    }
    let Some(package) = &args.package else {
        bail!(
            "give the package file: `patchctl patch {} <package.tar.gz>` (or --resume)",
            args.cluster
        );
    };
    let package = std::fs::canonicalize(package)
        .with_context(|| format!("cannot open package {}: check the path", package.display()))?;
    let topology = Arc::new(load_topology(&store, &args.cluster)?);
    let (info, blob) = inspect_and_prepare(&package).await?;
    let component = info.manifest.component.clone();
    check_component(&topology, &component, &args.roles)?;

    if let Some(unfinished) = store.unfinished_rollout(&args.cluster)? {
        if unfinished.kind == RolloutKind::Patch && unfinished.package_digest == blob.digest {
            errln!(
                "Rollout {} of this package is unfinished: resuming it.",
                unfinished.id
            );
            return resume(ctx, store, unfinished).await;
        }
        bail!(
            "rollout {} ({} of {}, {}) on cluster `{}` is unfinished: finish it first with `patchctl patch --resume {}`",
            unfinished.id,
            unfinished.kind,
            if unfinished.version.is_empty() {
                "-"
            } else {
                &unfinished.version
            },
            unfinished.state,
            args.cluster,
            args.cluster
        );
    }

    let tls = load_tls(ctx, &topology)?;
    let hooks = ClusterHooks::new(Arc::clone(&topology), HookClient::new()?);
    let observed = observe(&hooks, &topology, &tls, args.probe_timeout).await;
    let input = plan_input(
        &topology,
        &observed,
        &args.nodes,
        &args.roles,
        topology.component_roles(&component),
        &args.rollout.policy,
    );
    let plan = patchd_planner::plan(&input)?;
    check_platform(&plan, &observed, &info.manifest)?;

    let header = format!(
        "Patch cluster `{}` with {} {} ({}, {} bytes, digest {}){}",
        args.cluster,
        component,
        info.manifest.version,
        package.display(),
        info.size,
        short(&blob.digest),
        if args.offline {
            " --offline: files only, no hooks, no restarts"
        } else {
            ""
        }
    );
    if let Some(code) = args.rollout.review(ctx, &header, &plan).await? {
        return Ok(code);
    }

    let lock = store.acquire_rollout_lock(&args.cluster)?;
    report_takeover(&lock);
    if let Some(unfinished) = store.unfinished_rollout(&args.cluster)? {
        bail!(
            "rollout {} on cluster `{}` started meanwhile and is unfinished: finish it first with \
             `patchctl patch --resume {}`",
            unfinished.id,
            args.cluster,
            args.cluster
        );
    }
    let options = RolloutOptions {
        patch_id: new_rollout_id(),
        offline: args.offline,
        overwrite: args.overwrite,
        concurrency: args.concurrency,
        canary_wait_ms: args.rollout.policy.canary_wait_ms(),
        to_patch_id: None,
        component,
    };
    let code = journal_and_execute(
        ctx,
        store,
        &args.cluster,
        NewRun {
            kind: RolloutKind::Patch,
            package_digest: blob.digest.clone(),
            package_path: package.display().to_string(),
            version: info.manifest.version.clone(),
            options,
            plan,
            topology,
            tls,
            blob: Some(Arc::new(blob)),
        },
    )
    .await;
    drop(lock);
    code
}

/// Reads the package twice in parallel: the full inspection (manifest, hostile-content checks) and the chunk
/// hashes for the transfer.
async fn inspect_and_prepare(
    package: &Path,
) -> anyhow::Result<(patchd_package::PackageInfo, PreparedBlob)> {
    let path = package.to_path_buf();
    let inspection = tokio::task::spawn_blocking(move || {
        patchd_package::inspect(&path, &patchd_package::Limits::default())
    });
    let prepared = PreparedBlob::prepare(package, patchd_package::digest::DEFAULT_CHUNK_SIZE);
    let (inspection, prepared) = tokio::join!(inspection, prepared);
    let info = inspection
        .context("package inspection stopped unexpectedly")?
        .with_context(|| format!("package {} is not usable", package.display()))?;
    let blob = prepared?;
    if info.tree_digest != blob.digest {
        bail!(
            "package {} changed while it was being read: try again",
            package.display()
        );
    }
    Ok((info, blob))
}

/// The package's component must be run by the selected roles; otherwise list roles with their components.
fn check_component(topology: &Topology, component: &str, roles: &[String]) -> anyhow::Result<()> {
    let listing = || {
        topology
            .roles
            .iter()
            .map(|role| format!("{} ({})", role.name, role.component))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if topology.component_roles(component).is_empty() {
        bail!(
            "the package is for component `{component}`, which no role of this cluster runs; roles (component): {}",
            listing()
        );
    }
    // `-R "a, b"` splits into `a` and ` b`: compare trimmed names, as the planner does.
    let wrong: Vec<&str> = roles
        .iter()
        .map(|name| name.trim())
        .filter(|name| {
            topology
                .role(name)
                .is_some_and(|role| role.component != component)
        })
        .collect();
    if !wrong.is_empty() {
        bail!(
            "the package is for component `{component}`, but -R names role(s) {} that run another component; roles \
             (component): {}",
            wrong.join(", "),
            listing()
        );
    }
    Ok(())
}

/// Every node's status (leaders, down nodes) for the planner, probed in parallel.
pub(super) async fn observe(
    hooks: &ClusterHooks,
    topology: &Topology,
    tls: &ControllerTls,
    timeout: Duration,
) -> HashMap<String, NodeStatus> {
    let nodes: Vec<&Node> = topology.nodes().collect();
    let probe = LiveAgentProbe::new(tls.clone());
    status::collect(hooks, &nodes, &probe, &|_| false, timeout)
        .await
        .into_iter()
        .map(|row| (row.id.clone(), row))
        .collect()
}

pub(super) fn plan_input(
    topology: &Topology,
    observed: &HashMap<String, NodeStatus>,
    nodes: &[String],
    roles: &[String],
    component_roles: Vec<String>,
    policy: &PolicyArgs,
) -> PlanInput {
    PlanInput {
        nodes: topology.plan_nodes(
            |node| observed.get(&node.id).is_some_and(|row| row.leader),
            |node| observed.get(&node.id).is_some_and(NodeStatus::is_down),
        ),
        role_order: topology.role_order(),
        selection: Selection {
            nodes: nodes.to_vec(),
            roles: roles.to_vec(),
            component_roles,
        },
        policy: policy.policy(),
    }
}

/// The package's OS/arch (when it names them) must match what each planned node's agent reports.
fn check_platform(
    plan: &Plan,
    observed: &HashMap<String, NodeStatus>,
    manifest: &patchd_package::Manifest,
) -> anyhow::Result<()> {
    let (Some(os), Some(arch)) = (&manifest.os, &manifest.arch) else {
        return Ok(());
    };
    let wanted = format!("{os}/{arch}");
    let mismatched: Vec<String> = plan
        .nodes()
        .filter_map(|(_, node)| observed.get(&node.id))
        .filter(|row| row.os_arch != "-" && row.os_arch != wanted)
        .map(|row| format!("{} ({})", row.id, row.os_arch))
        .collect();
    if !mismatched.is_empty() {
        bail!(
            "the package is built for {wanted}, but these nodes run another platform: {}",
            mismatched.join(", ")
        );
    }
    Ok(())
}

pub(super) fn report_takeover(lock: &patchctl::store::RolloutLock) {
    if let Some(previous) = &lock.taken_over_from {
        errln!(
            "Note: took over the rollout lock left by process {} on {} (started {}), which is gone.",
            previous.pid,
            previous.host,
            previous.started_at
        );
    }
}

fn short(digest: &str) -> &str {
    digest.get(..16).unwrap_or(digest)
}

/// Continues an unfinished rollout from its journal.
pub(super) async fn resume(ctx: &Ctx, store: Arc<Store>, rollout: Rollout) -> anyhow::Result<u8> {
    let lock = store.acquire_rollout_lock(&rollout.cluster)?;
    report_takeover(&lock);
    let topology = Arc::new(load_topology(&store, &rollout.cluster)?);
    let plan: Plan = serde_json::from_str(&rollout.plan_json)
        .with_context(|| format!("rollout {}: its stored plan cannot be read", rollout.id))?;
    let options: RolloutOptions = serde_json::from_str(&rollout.options_json)
        .with_context(|| format!("rollout {}: its stored options cannot be read", rollout.id))?;
    if let Some((_, missing)) = plan
        .nodes()
        .find(|(_, node)| topology.node_by_id(&node.id).is_none())
    {
        bail!(
            "rollout {} planned node {}, which the re-imported topology no longer has: re-import the topology the \
             rollout started with",
            rollout.id,
            missing.id
        );
    }
    let blob = match rollout.kind {
        RolloutKind::Patch => {
            let path = PathBuf::from(&rollout.package_path);
            let blob = PreparedBlob::prepare(&path, patchd_package::digest::DEFAULT_CHUNK_SIZE)
                .await
                .with_context(|| {
                    format!(
                        "rollout {} needs its package {} again",
                        rollout.id,
                        path.display()
                    )
                })?;
            if blob.digest != rollout.package_digest {
                bail!(
                    "package {} changed since rollout {} started (digest {} instead of {}): put the original back",
                    path.display(),
                    rollout.id,
                    short(&blob.digest),
                    short(&rollout.package_digest)
                );
            }
            Some(Arc::new(blob))
        }
        RolloutKind::Rollback => None,
    };
    let prior = prior_records(&store, &rollout.id)?;
    let finished = prior
        .values()
        .filter(|record| record.phase.is_terminal())
        .count();
    errln!(
        "Resuming {} {} on cluster `{}`: {} of {} node(s) finished earlier and will not be touched.",
        rollout.kind,
        rollout.id,
        rollout.cluster,
        finished,
        plan.summary().total_nodes
    );
    let tls = load_tls(ctx, &topology)?;
    let code = execute(
        ctx,
        Execution {
            store,
            rollout,
            options,
            plan,
            topology,
            tls,
            blob,
            prior,
        },
    )
    .await;
    drop(lock);
    code
}

/// Everything a run of the engine needs.
pub(super) struct Execution {
    pub store: Arc<Store>,
    pub rollout: Rollout,
    pub options: RolloutOptions,
    pub plan: Plan,
    pub topology: Arc<Topology>,
    pub tls: ControllerTls,
    pub blob: Option<Arc<PreparedBlob>>,
    pub prior: HashMap<String, patchctl::executor::NodeRecord>,
}

/// Runs the engine with progress and Ctrl-C handling, records the end, prints the summary; returns the exit code.
pub(super) async fn execute(ctx: &Ctx, run: Execution) -> anyhow::Result<u8> {
    let Execution {
        store,
        rollout,
        options,
        plan,
        topology,
        tls,
        blob,
        prior,
    } = run;
    let action = match rollout.kind {
        RolloutKind::Patch => Action::Patch {
            digest: rollout.package_digest.clone(),
            offline: options.offline,
        },
        RolloutKind::Rollback => Action::Rollback {
            to_patch_id: options.to_patch_id.clone(),
        },
    };
    let spec = RolloutSpec {
        patch_id: options.patch_id.clone(),
        action,
        batches: batches_from_plan(&plan, &topology),
        failure_budget: plan.policy().failure_budget,
        stage_concurrency: options.concurrency.max(1),
        apply_retries: 5,
        apply_retry_delay: Duration::from_secs(2),
        prior,
    };
    let observer = Arc::new(CliObserver::new(
        &rollout,
        blob.as_ref().map_or(0, |blob| blob.total_size),
        spec.batches.len(),
        options.canary_wait_ms.map(Duration::from_millis),
    ));
    let push_observer = Arc::clone(&observer);
    let on_push: PushProgressFn = Arc::new(move |node: &NodeRef, progress: PushProgress| {
        push_observer.pushed(node, progress)
    });
    let hooks = ClusterHooks::new(Arc::clone(&topology), HookClient::new()?);
    let effects = LiveEffects::new(Arc::clone(&topology), hooks, tls, blob, on_push);
    let journal = StoreJournal {
        store: Arc::clone(&store),
        cluster: rollout.cluster.clone(),
        rollout_id: rollout.id.clone(),
        kind: rollout.kind,
        digest: rollout.package_digest.clone(),
        version: rollout.version.clone(),
    };
    store.set_rollout_state(&rollout.id, RolloutState::Running)?;

    let (cancel_handle, cancel) = Cancel::new();
    let cluster = rollout.cluster.clone();
    let interrupt_observer = Arc::clone(&observer);
    // Registered before the engine starts, so no SIGINT/SIGTERM falls back to the default (kill) action.
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminates = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signals = tokio::spawn(async move {
        tokio::select! {
            received = interrupts.recv() => if received.is_none() { return },
            received = terminates.recv() => if received.is_none() { return },
        }
        interrupt_observer.line(
            "Interrupted: finishing the steps in flight and putting drained nodes back online (again to quit at once)",
        );
        cancel_handle.cancel();
        tokio::select! {
            _ = interrupts.recv() => {}
            _ = terminates.recv() => {}
        }
        errln!("Quit at once: resume with `patchctl patch --resume {cluster}`.");
        std::process::exit(i32::from(exit::INTERRUPTED));
    });
    let started = Instant::now();
    let outcome = Engine::new(&spec, &effects, &journal, observer.as_ref(), cancel)
        .run()
        .await;
    signals.abort();
    observer.finish();
    let report = match outcome {
        Ok(report) => report,
        Err(error) => {
            errln!(
                "error: {error}\nThe rollout stopped where it was; resume it with `patchctl patch --resume {}`.",
                rollout.cluster
            );
            return Ok(exit::ERROR);
        }
    };
    let state = rollout_state(&report.end);
    if !state.is_unfinished() {
        for node in &report.nodes {
            if matches!(node.phase, NodePhase::Pending | NodePhase::Staged) {
                store.set_node_state(&rollout.id, &node.node.id, NodeRolloutState::Skipped)?;
            }
        }
    }
    store.set_rollout_state(&rollout.id, state)?;
    if options.overwrite
        && report.end == RolloutEnd::Completed
        && rollout.kind == RolloutKind::Patch
    {
        for role in &plan.summary().roles {
            store.set_role_package(
                &rollout.cluster,
                &role.role,
                &rollout.package_digest,
                &rollout.package_path,
                &rollout.version,
            )?;
        }
    }
    print_summary(ctx, &rollout, &report, started.elapsed())?;
    Ok(match report.end {
        RolloutEnd::Completed => exit::OK,
        RolloutEnd::CompletedWithFailures | RolloutEnd::Halted => exit::ROLLOUT_FAILED,
        RolloutEnd::Interrupted => exit::INTERRUPTED,
        RolloutEnd::Stopped => exit::DECLINED,
    })
}

fn result_word(kind: RolloutKind, phase: NodePhase, had_turn: bool) -> &'static str {
    match phase {
        NodePhase::Pending if had_turn => "interrupted, back online",
        NodePhase::Done if kind == RolloutKind::Rollback => "rolled back",
        NodePhase::Done => "patched",
        NodePhase::Skipped => "skipped",
        NodePhase::Reverted => "reverted",
        NodePhase::Failed => "failed",
        NodePhase::LeftOffline => "LEFT OFFLINE",
        NodePhase::Pending | NodePhase::Staged => "not started",
        _ => "in flight",
    }
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()))
}

fn print_summary(
    ctx: &Ctx,
    rollout: &Rollout,
    report: &RolloutReport,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let end = match report.end {
        RolloutEnd::Completed => "completed",
        RolloutEnd::CompletedWithFailures => "completed with failures",
        RolloutEnd::Halted => "halted: failure budget spent",
        RolloutEnd::Interrupted => "interrupted",
        RolloutEnd::Stopped => "stopped after the canary",
    };
    match ctx.format {
        Format::Json => {
            let nodes: Vec<serde_json::Value> = report
                .nodes
                .iter()
                .map(|node| {
                    serde_json::json!({
                        "node": node.node.id,
                        "role": node.node.role,
                        "result": result_word(rollout.kind, node.phase, node.duration.is_some()),
                        "phase": node.phase.as_str(),
                        "duration_ms": node.duration.map(|d| d.as_millis() as u64),
                        "downtime_ms": node.downtime.map(|d| d.as_millis() as u64),
                        "reason": node.reason,
                    })
                })
                .collect();
            let document = serde_json::json!({
                "rollout": rollout.id,
                "cluster": rollout.cluster,
                "kind": rollout.kind,
                "end": end,
                "failures": report.failures,
                "elapsed_ms": elapsed.as_millis() as u64,
                "nodes": nodes,
            });
            outln!("{}", serde_json::to_string_pretty(&document)?);
        }
        Format::Text => {
            let rows: Vec<Vec<String>> = report
                .nodes
                .iter()
                .map(|node| {
                    vec![
                        node.node.id.clone(),
                        node.node.role.clone(),
                        result_word(rollout.kind, node.phase, node.duration.is_some()).to_string(),
                        seconds(node.duration),
                        seconds(node.downtime),
                        clip(node.reason.as_deref().unwrap_or_default(), 140),
                    ]
                })
                .collect();
            outln!();
            out!(
                "{}",
                super::display::plain_table(
                    &["Node", "Role", "Result", "Duration", "Downtime", "Reason"],
                    &rows
                )
            );
            outln!(
                "{} {} {end} in {:.1}s: {} node(s), {} failure(s).",
                capitalized(rollout.kind.as_str()),
                rollout.id,
                elapsed.as_secs_f64(),
                report.nodes.len(),
                report.failures
            );
            match report.end {
                RolloutEnd::Interrupted => {
                    outln!("Resume with `patchctl patch --resume {}`.", rollout.cluster)
                }
                RolloutEnd::Halted | RolloutEnd::CompletedWithFailures => {
                    outln!("See `patchctl audit {}` for every step.", rollout.cluster)
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// At most `limit` characters, with `…` when cut (the JSON summary and `audit` keep the whole text).
fn clip(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_string();
    }
    let mut clipped: String = text.chars().take(limit.saturating_sub(1)).collect();
    clipped.push('…');
    clipped
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// Progress on stderr: bars per node on a terminal, plain timestamped lines otherwise; canary pauses.
struct CliObserver {
    started: Instant,
    bars: Option<Bars>,
    package_bytes: u64,
    batch_count: usize,
    canary_wait: Option<Duration>,
}

struct Bars {
    multi: MultiProgress,
    nodes: Mutex<HashMap<String, ProgressBar>>,
}

impl CliObserver {
    fn new(
        rollout: &Rollout,
        package_bytes: u64,
        batch_count: usize,
        canary_wait: Option<Duration>,
    ) -> Self {
        let bars = std::io::stderr().is_terminal().then(|| Bars {
            multi: MultiProgress::new(),
            nodes: Mutex::new(HashMap::new()),
        });
        let observer = Self {
            started: Instant::now(),
            bars,
            package_bytes,
            batch_count,
            canary_wait,
        };
        observer.line(&format!(
            "{} {} on cluster `{}`",
            capitalized(rollout.kind.as_str()),
            rollout.id,
            rollout.cluster
        ));
        observer
    }

    fn line(&self, text: &str) {
        let stamped = format!("[{:>7.2}s] {text}", self.started.elapsed().as_secs_f64());
        match &self.bars {
            Some(bars) => {
                let _ = bars.multi.println(stamped);
            }
            None => errln!("{stamped}"),
        }
    }

    fn node_line(&self, node: &NodeRef, text: &str) {
        self.line(&format!("{:<21} {text}", node.id));
    }

    fn bar(&self, node: &NodeRef) -> Option<ProgressBar> {
        let bars = self.bars.as_ref()?;
        let mut nodes = bars
            .nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bar = nodes.entry(node.id.clone()).or_insert_with(|| {
            let bar = bars.multi.add(ProgressBar::new(self.package_bytes.max(1)));
            let style = ProgressStyle::with_template(
                "{prefix:21} [{bar:24}] {bytes:>10}/{total_bytes:10} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(node.id.clone());
            bar
        });
        Some(bar.clone())
    }

    fn pushed(&self, node: &NodeRef, progress: PushProgress) {
        if let Some(bar) = self.bar(node) {
            bar.set_length(progress.total_bytes.max(1));
            bar.set_position(progress.bytes_done);
        }
    }

    fn finish(&self) {
        if let Some(bars) = &self.bars {
            let nodes = bars
                .nodes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for bar in nodes.values() {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
        }
    }
}

impl Observer for CliObserver {
    fn event(&self, event: &Event) {
        match event {
            Event::StageStarted { nodes } => self.line(&format!("Staging the package on {nodes} node(s)")),
            Event::BatchStarted { batch } => {
                let ids: Vec<&str> = batch.nodes.iter().map(|node| node.id.as_str()).collect();
                let canary = if batch.canary { ", canary" } else { "" };
                self.line(&format!(
                    "Batch {}/{} ({}{canary}): {}",
                    batch.index + 1,
                    self.batch_count,
                    batch.role,
                    ids.join(", ")
                ));
            }
            Event::Step { node, step, status, detail } => {
                if let Some(bar) = self.bar(node) {
                    bar.set_message(format!("{step} {status}"));
                }
                let show = match status {
                    StepStatus::Started => matches!(step, Step::Apply | Step::Offline | Step::Undo),
                    StepStatus::Done => !matches!(step, Step::Mark),
                    StepStatus::Failed => true,
                    StepStatus::Skipped => false,
                };
                if show && self.bars.is_none() {
                    let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
                    let status = match status {
                        StepStatus::Done => "ok",
                        other => other.as_str(),
                    };
                    self.node_line(node, &format!("{step} {status}{detail}"));
                } else if *status == StepStatus::Failed {
                    self.node_line(node, &format!("{step} failed: {detail}"));
                }
            }
            Event::NodeFinished { node, phase, reason } => {
                let text = match reason {
                    Some(reason) if phase.is_failure() => format!("=> {phase}: {reason}"),
                    _ => format!("=> {phase}"),
                };
                if let Some(bar) = self.bar(node) {
                    bar.finish_with_message(phase.as_str().to_string());
                }
                self.node_line(node, &text);
            }
            Event::Halting { failures, budget } => self.line(&format!(
                "Failure budget spent ({failures} failure(s), budget {budget}): no new node starts; finishing the nodes \
                 in flight"
            )),
            Event::Interrupting => self.line("Interrupted: no new node starts"),
        }
    }

    async fn pause(&self, batch: &BatchSpec) -> PauseDecision {
        if let Some(wait) = self.canary_wait {
            self.line(&format!(
                "Canary batch {} done; going on in {} (Ctrl-C to stop here)",
                batch.index + 1,
                humantime::format_duration(wait)
            ));
            tokio::time::sleep(wait).await;
            return PauseDecision::Continue;
        }
        if !std::io::stdin().is_terminal() {
            self.line("Canary batch done, and there is no terminal to confirm on: stopping here");
            return PauseDecision::Stop;
        }
        let question = format!(
            "Canary batch {} done. Continue with the remaining batches?",
            batch.index + 1
        );
        // The prompt blocks on stdin: keep it off the runtime's workers so Ctrl-C is still handled meanwhile.
        let multi = self.bars.as_ref().map(|bars| bars.multi.clone());
        let answer = tokio::task::spawn_blocking(move || match multi {
            Some(multi) => multi.suspend(|| ask(&question)),
            None => ask(&question),
        })
        .await;
        match answer {
            Ok(Ok(true)) => PauseDecision::Continue,
            _ => PauseDecision::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology::parse(
            "roles:\n  demo-master:\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n  demo-worker:\n    nodes:\n      - { host: 127.0.1.2, port: 2, deploy_dir: /b }\n",
        )
        .unwrap()
    }

    #[test]
    fn a_package_for_another_component_is_refused_with_the_roles_listed() {
        let topology = topology();
        let unknown = check_component(&topology, "tikv", &[])
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("`tikv`")
                && unknown.contains("demo-master (demo-master), demo-worker (demo-worker)"),
            "{unknown}"
        );
        let wrong_role = check_component(&topology, "demo-worker", &["demo-master".to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            wrong_role.contains("-R names role(s) demo-master"),
            "{wrong_role}"
        );
        assert!(check_component(&topology, "demo-worker", &["demo-worker".to_string()]).is_ok());
        // `-R "demo-worker, demo-master"` splits into ` demo-master`: still checked.
        let spaced = check_component(
            &topology,
            "demo-worker",
            &["demo-worker".to_string(), " demo-master".to_string()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            spaced.contains("-R names role(s) demo-master that"),
            "{spaced}"
        );
    }

    #[test]
    fn long_reasons_are_clipped_in_the_table_only() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("0123456789abc", 10), "012345678…");
        assert_eq!(
            result_word(RolloutKind::Patch, NodePhase::Pending, true),
            "interrupted, back online"
        );
        assert_eq!(
            result_word(RolloutKind::Rollback, NodePhase::Done, true),
            "rolled back"
        );
    }
}
