//! Fleet benchmark, side by side with the peer: patch N demo workers, each managed by its own `patchd` agent on
//! `127.0.1.k` (process backend, instant-restart service), in batches of S, through the real cluster-API hooks of a
//! demo master; and, right before each patchd rollout, the same rolling hotfix done with Ansible over SSH by the
//! peer harness (`run.sh rollout N S MIB`, same N, S and package size). Prints both wall times and their ratio for
//! every package size (a table and one JSON line each), plus where patchd's time went (package read, staging
//! transfer, the agents' apply, the controller's own share), the controller's CPU per node, the agents' CPU and
//! the peak RSS of the controller and of the largest agent. No figure of either side is ever taken from anywhere but this run.
//!
//! Use the release binaries, from the project root (the peer harness is `../shared/peers/run.sh` from there):
//! `cargo build --release -p patchd-agent -p patchctl -p patchd-demo --bins && \
//!  PATCHD_BIN_DIR=target/release cargo run --release -p patchd-bench --bin bench_fleet -- --workers 50 \
//!  --batch-size 10 --package-mib 64,8`

use anyhow::{Context, bail};
use clap::Parser;
use nix::sys::resource::{UsageWho, getrusage};
use patchd_e2e::cluster_fixture::{ClusterFixture, FixtureOptions};
use patchd_e2e::write_random_file;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the idle agents' CPU is sampled before the first rollout.
const IDLE_SAMPLE: Duration = Duration::from_secs(3);

/// Rolls a hotfix out to a fleet with patchd and with the peer harness (Ansible over SSH), one after the other.
#[derive(Parser)]
struct Args {
    /// Worker nodes (each with its own agent); the peer gets as many hosts.
    #[arg(long, env = "BENCH_WORKERS", default_value_t = 50)]
    workers: usize,
    /// Nodes per batch, on both sides (patchctl: `--batch-size S --max-unavailable S --failure-budget S-1`;
    /// Ansible: `serial: S`, `forks = S`).
    #[arg(long, env = "BENCH_BATCH", default_value_t = 10)]
    batch_size: usize,
    /// Package sizes in MiB, one rollout of each on both sides. patchd's package is the demo worker padded with
    /// random bytes up to this size (the worker alone when it is already larger); the peer's is its service
    /// script padded to it.
    #[arg(long, env = "BENCH_PACKAGE_MIB", value_delimiter = ',', default_values_t = [64, 8])]
    package_mib: Vec<u64>,
    /// The peer harness script (Ansible over SSH); relative paths are taken from the current directory.
    #[arg(long, default_value = "../shared/peers/run.sh")]
    peer: PathBuf,
    /// Skip the peer: patchd's figures only, no ratio.
    #[arg(long)]
    no_peer: bool,
    /// Where the cluster's files go.
    #[arg(long, env = "BENCH_DIR", default_value = "/var/tmp")]
    dir: PathBuf,
    /// `patchctl --concurrency` (parallel uploads); patchctl's default when absent.
    #[arg(long, env = "BENCH_CONCURRENCY")]
    concurrency: Option<usize>,
    /// The agents' health probation (`min_healthy`, ms): how long a restarted service must stay healthy before
    /// the agent commits the patch. 0 commits at the first passing health check, which is what the peer waits
    /// for (it polls `GET /version` until the new version answers, then puts the node back online).
    #[arg(long, env = "BENCH_MIN_HEALTHY_MS", default_value_t = 500)]
    min_healthy_ms: u64,
    /// `patchctl patch --stage-all-first`: stage every node before the first batch (default: each batch once its
    /// own nodes are staged, the later ones staging meanwhile).
    #[arg(long)]
    stage_all_first: bool,
    /// Keep each rollout's `patchctl` progress output (`patchctl-<MIB>MiB.log`) in this directory.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
}

/// One timestamped progress line of `patchctl` (plain mode): seconds since the rollout began, and the text.
struct Line {
    at: f64,
    text: String,
}

/// Figures of one patch run.
struct Run {
    package_mib: u64,
    package_bytes: u64,
    nodes: usize,
    total: Duration,
    before_rollout: Duration,
    staging: Duration,
    apply_wall: Duration,
    cpu: Duration,
    agents_cpu: Duration,
    peak_rss: u64,
    /// The largest agent's peak RSS since it started (agents live through every package size of the run).
    agent_peak_rss: u64,
    failures: u64,
    peer: Option<PeerRun>,
}

/// What the peer harness printed for the same rollout (its JSON line).
struct PeerRun {
    wall_s: f64,
    /// The whole JSON line, kept as it came.
    raw: serde_json::Value,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os(patchd_e2e::BIN_DIR_ENV).is_none() {
        bail!(
            "{} is not set: build the release binaries (`cargo build --release -p patchd-agent -p patchctl -p \
             patchd-demo --bins`) and set {}=target/release",
            patchd_e2e::BIN_DIR_ENV,
            patchd_e2e::BIN_DIR_ENV
        );
    }
    if args.workers == 0 || args.batch_size == 0 || args.package_mib.is_empty() {
        bail!("--workers, --batch-size and --package-mib must be at least 1");
    }
    let peer = if args.no_peer {
        None
    } else {
        let script = std::fs::canonicalize(&args.peer).with_context(|| {
            format!(
                "the peer harness {} is not there: run from the project root, pass --peer PATH, or --no-peer for \
                 patchd's figures alone",
                args.peer.display()
            )
        })?;
        Some(script)
    };
    std::fs::create_dir_all(&args.dir)?;
    let work = tempfile::Builder::new()
        .prefix("patchd-fleet-")
        .tempdir_in(&args.dir)?;
    let workers = args.workers;

    eprintln!(
        "starting {} agents (1 master, {workers} workers) on 127.0.1.1-{}",
        workers + 1,
        workers + 1
    );
    let started = Instant::now();
    let options = FixtureOptions {
        masters: 1,
        workers,
        tasks: 10,
        min_healthy: Duration::from_millis(args.min_healthy_ms),
        ..Default::default()
    };
    let mut cluster = ClusterFixture::start(work.path(), options);
    eprintln!("cluster up in {:.1}s", started.elapsed().as_secs_f64());
    // What the agents burn with nothing to do (timers, keepalives), so that a difference of two rollouts' CPU
    // can be read as the work that differs.
    let idle_before = agents_cpu(&mut cluster);
    let idle_started = Instant::now();
    std::thread::sleep(IDLE_SAMPLE);
    let agents_idle_per_s = agents_cpu(&mut cluster)
        .saturating_sub(idle_before)
        .as_secs_f64()
        / idle_started.elapsed().as_secs_f64();

    // The worker alone, to know how much padding brings a package to the size asked for.
    let bare_bytes = std::fs::metadata(cluster.worker_package("v1.0.99-probe", "ok"))?.len();
    let mut runs = Vec::new();
    for (index, &mib) in args.package_mib.iter().enumerate() {
        let version = format!("v1.1.{index}-hotfix");
        let pad_bytes = (mib * 1024 * 1024).saturating_sub(bare_bytes);
        let package = if pad_bytes == 0 {
            cluster.worker_package(&version, "ok")
        } else {
            let pad = work.path().join(format!("pad-{index}.bin"));
            write_random_file(&pad, pad_bytes, 7 + index as u64);
            cluster.worker_package_with(&version, "ok", &[("demo-worker/pad.bin".to_string(), pad)])
        };
        let peer_run = match &peer {
            Some(script) => {
                eprintln!(
                    "peer: Ansible over SSH, {workers} hosts, batches of {}, {mib} MiB",
                    args.batch_size
                );
                Some(run_peer(script, workers, args.batch_size, mib)?)
            }
            None => None,
        };
        eprintln!(
            "patchd: patching {workers} workers, batches of {}, {mib} MiB",
            args.batch_size
        );
        let agents_before = agents_cpu(&mut cluster);
        let mut run = patch(&cluster, &args, &package, mib)?;
        run.agents_cpu = agents_cpu(&mut cluster).saturating_sub(agents_before);
        run.agent_peak_rss = agents_peak_rss(&mut cluster);
        run.peer = peer_run;
        print_json(&run, &args);
        runs.push(run);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    print_report(
        &runs,
        &args,
        load.split_whitespace().next().unwrap_or("?"),
        agents_idle_per_s,
    );
    Ok(())
}

/// Runs `script rollout N S MIB` and reads the JSON line it ends with (its progress goes to our stderr).
fn run_peer(script: &Path, hosts: usize, batch: usize, mib: u64) -> anyhow::Result<PeerRun> {
    let output = Command::new("bash")
        .arg(script)
        .args([
            "rollout",
            &hosts.to_string(),
            &batch.to_string(),
            &mib.to_string(),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run the peer harness {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "the peer harness failed ({}); its output:\n{stdout}\nsee /tmp/peerfleet/logs/ and its README",
            output.status
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with('{'))
        .with_context(|| format!("the peer harness printed no JSON line:\n{stdout}"))?;
    let raw: serde_json::Value = serde_json::from_str(line).with_context(|| {
        format!("the peer harness printed a JSON line that does not parse: {line}")
    })?;
    let wall_s = raw["wall_s"]
        .as_f64()
        .with_context(|| format!("the peer harness's JSON line has no wall_s: {line}"))?;
    Ok(PeerRun { wall_s, raw })
}

/// One JSON line per package size: both wall times and their ratio, and patchd's breakdown.
fn print_json(run: &Run, args: &Args) {
    let ratio = run
        .peer
        .as_ref()
        .map(|peer| peer.wall_s / run.total.as_secs_f64());
    let line = serde_json::json!({
        "workers": run.nodes,
        "batch_size": args.batch_size,
        "min_healthy_ms": args.min_healthy_ms,
        "stage_all_first": args.stage_all_first,
        "package_mib": run.package_mib,
        "patchd_package_bytes": run.package_bytes,
        "patchd_wall_s": round3(run.total.as_secs_f64()),
        "peer_wall_s": run.peer.as_ref().map(|peer| peer.wall_s),
        "ratio": ratio.map(round3),
        "patchd_staging_s": round3(run.staging.as_secs_f64()),
        "patchd_apply_wall_s": round3(run.apply_wall.as_secs_f64()),
        "patchd_controller_cpu_s": round3(run.cpu.as_secs_f64()),
        "patchd_agents_cpu_s": round3(run.agents_cpu.as_secs_f64()),
        "patchd_controller_peak_rss_mib": round3(run.peak_rss as f64 / 1048576.0),
        "patchd_agent_peak_rss_mib": round3(run.agent_peak_rss as f64 / 1048576.0),
        "patchd_failures": run.failures,
        "peer": run.peer.as_ref().map(|peer| peer.raw.clone()),
    });
    println!("{line}");
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Reads `VmHWM` (peak resident set) of a process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

/// The largest `VmHWM` among the cluster's agents: each agent's peak since it started.
fn agents_peak_rss(cluster: &mut ClusterFixture) -> u64 {
    let names: Vec<String> = cluster.nodes.iter().map(|node| node.name.clone()).collect();
    names
        .iter()
        .filter_map(|name| cluster.agent(name).and_then(|agent| agent.pid()))
        .filter_map(peak_rss)
        .max()
        .unwrap_or(0)
}

/// Total CPU time of every agent of the cluster.
fn agents_cpu(cluster: &mut ClusterFixture) -> Duration {
    let names: Vec<String> = cluster.nodes.iter().map(|node| node.name.clone()).collect();
    names
        .iter()
        .filter_map(|name| cluster.agent(name).and_then(|agent| agent.pid()))
        .map(patchd_bench::process_cpu)
        .sum()
}

fn cpu_of_children() -> anyhow::Result<Duration> {
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let micros = |tv: nix::sys::time::TimeVal| tv.tv_sec() as u64 * 1_000_000 + tv.tv_usec() as u64;
    Ok(Duration::from_micros(
        micros(usage.user_time()) + micros(usage.system_time()),
    ))
}

fn patch(
    cluster: &ClusterFixture,
    args: &Args,
    package: &Path,
    package_mib: u64,
) -> anyhow::Result<Run> {
    let batch = args.batch_size.to_string();
    let budget = args.batch_size.saturating_sub(1).to_string();
    let concurrency = args
        .concurrency
        .map(|n| vec!["--concurrency".to_string(), n.to_string()])
        .unwrap_or_default();
    let package_bytes = std::fs::metadata(package)?.len();
    let cpu_before = cpu_of_children()?;
    let started = Instant::now();
    let mut child = Command::new(patchd_e2e::bin("patchctl"))
        .args(["--format", "json", "patch", &cluster.name])
        .arg(package)
        .args([
            "-y",
            "--batch-size",
            &batch,
            "--max-unavailable",
            &batch,
            "--failure-budget",
            &budget,
        ])
        .args(concurrency)
        .args(args.stage_all_first.then_some("--stage-all-first"))
        .env("PATCHCTL_HOME", cluster.pki.home())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start patchctl")?;
    let pid = child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let watcher_peak = Arc::clone(&peak);
    let watcher = std::thread::spawn(move || {
        while let Some(rss) = peak_rss(pid) {
            watcher_peak.fetch_max(rss, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let err_reader =
        std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let out = std::io::read_to_string(stdout)?;
    let status = child.wait()?;
    let total = started.elapsed();
    let cpu = cpu_of_children()?.saturating_sub(cpu_before);
    let err = err_reader.join().unwrap_or_default();
    let _ = watcher.join();
    if let Some(dir) = &args.keep_logs {
        let log = dir.join(format!("patchctl-{package_mib}MiB.log"));
        std::fs::write(&log, &err).with_context(|| format!("cannot write {}", log.display()))?;
        let summary = dir.join(format!("patchctl-{package_mib}MiB.json"));
        std::fs::write(&summary, &out)
            .with_context(|| format!("cannot write {}", summary.display()))?;
    }
    if !status.success() {
        bail!("patchctl failed ({status}):\n{err}\n{out}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("bad summary:\n{out}"))?;
    let lines = timeline(&err);
    let find = |prefix: &str| {
        lines
            .iter()
            .find(|line| line.text.starts_with(prefix))
            .map(|line| line.at)
    };
    let stage_start = find("Staging the package").context("no staging line")?;
    let first_batch = find("Batch 1/").context("no batch line")?;
    let elapsed_ms = summary["elapsed_ms"].as_u64().unwrap_or_default();
    // Everything before the engine (package read and hashing, status probes, planning) is total minus the
    // engine's own elapsed time.
    let before_rollout = total.saturating_sub(Duration::from_millis(elapsed_ms));
    Ok(Run {
        package_mib,
        package_bytes,
        nodes: args.workers,
        total,
        before_rollout,
        staging: Duration::from_secs_f64((first_batch - stage_start).max(0.0)),
        apply_wall: apply_wall(&lines),
        cpu,
        agents_cpu: Duration::ZERO,
        peak_rss: peak.load(Ordering::Relaxed),
        agent_peak_rss: 0,
        failures: summary["failures"].as_u64().unwrap_or_default(),
        peer: None,
    })
}

/// `[   1.23s] text` lines.
fn timeline(stderr: &str) -> Vec<Line> {
    stderr
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix('[')?;
            let (seconds, text) = rest.split_once("s] ")?;
            Some(Line {
                at: seconds.trim().parse().ok()?,
                text: text.to_string(),
            })
        })
        .collect()
}

/// Wall time during which at least one agent was applying (stop → swap → start → probation): the union of every
/// node's `apply started` … `apply ok` interval.
fn apply_wall(lines: &[Line]) -> Duration {
    let mut open: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
    let mut intervals = Vec::new();
    for line in lines {
        let mut words = line.text.split_whitespace();
        let (Some(node), Some(step), Some(status)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        if step != "apply" {
            continue;
        }
        match status.trim_end_matches(':') {
            "started" => {
                open.insert(node.to_string(), line.at);
            }
            "ok" | "failed" => {
                if let Some(start) = open.remove(node) {
                    intervals.push((start, line.at));
                }
            }
            _ => {}
        }
    }
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut covered = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for (start, end) in intervals {
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                covered += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    if let Some((s, e)) = current {
        covered += e - s;
    }
    Duration::from_secs_f64(covered.max(0.0))
}

fn print_report(runs: &[Run], args: &Args, load: &str, agents_idle_per_s: f64) {
    let workers = args.workers;
    let batch = args.batch_size;
    println!("\n## Fleet\n");
    println!(
        "{workers} demo workers, one `patchd` agent each on 127.0.1.2–127.0.1.{} (process backend), plus the demo \
         master on 127.0.1.1; `patchctl patch --batch-size {batch} --max-unavailable {batch} --failure-budget {}{}` \
         with the demo's offline/wait_offline/health/online/wait_online hooks; agent probation {} ms. The peer: \
         the same rolling hotfix with Ansible over SSH ({}), run right before each patchd rollout. Everything \
         shares the machine's cores (1-minute load average at the end: {load}).\n",
        workers + 1,
        batch.saturating_sub(1),
        if args.stage_all_first {
            " --stage-all-first"
        } else {
            ""
        },
        args.min_healthy_ms,
        if args.no_peer {
            "skipped: --no-peer"
        } else {
            "`run.sh rollout N S MIB`"
        },
    );
    println!("| package | Ansible over SSH | patchd | ratio |");
    println!("|---|---|---|---|");
    for run in runs {
        let (peer, ratio) = match &run.peer {
            Some(peer) => (
                format!("{:.1} s", peer.wall_s),
                format!("**{:.1}×**", peer.wall_s / run.total.as_secs_f64()),
            ),
            None => ("not run".to_string(), "–".to_string()),
        };
        println!(
            "| {} MiB ({:.1} MiB file) | {peer} | {:.1} s | {ratio} |",
            run.package_mib,
            run.package_bytes as f64 / 1048576.0,
            run.total.as_secs_f64(),
        );
    }
    println!(
        "\n| package | total | before rollout¹ | staging until the first batch⁶ | agents applying² | controller share³ | per node³ | \
         controller CPU | CPU per node | agents' CPU⁴ | agents' CPU per GB received⁴ | controller peak RSS | agent peak RSS⁵ | failures |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for run in runs {
        let share = run
            .total
            .saturating_sub(run.before_rollout + run.staging + run.apply_wall);
        let received_gb = (run.package_bytes * run.nodes as u64) as f64 / 1e9;
        println!(
            "| {} MiB ({:.1} MiB file) | {:.1} s | {:.2} s | {:.1} s | {:.1} s | {:.2} s | {:.1} ms | {:.2} s | {:.1} ms | {:.1} s | {:.2} s | {:.1} MiB | {:.1} MiB | {} |",
            run.package_mib,
            run.package_bytes as f64 / 1048576.0,
            run.total.as_secs_f64(),
            run.before_rollout.as_secs_f64(),
            run.staging.as_secs_f64(),
            run.apply_wall.as_secs_f64(),
            share.as_secs_f64(),
            share.as_secs_f64() * 1000.0 / run.nodes as f64,
            run.cpu.as_secs_f64(),
            run.cpu.as_secs_f64() * 1000.0 / run.nodes as f64,
            run.agents_cpu.as_secs_f64(),
            run.agents_cpu.as_secs_f64() / received_gb,
            run.peak_rss as f64 / 1048576.0,
            run.agent_peak_rss as f64 / 1048576.0,
            run.failures
        );
    }
    println!(
        "\n¹ package read and hashed (inspection and chunk hashes, in parallel), status probes of every node, planning.\n\
         ² wall time during which at least one agent was inside Apply (stop, swap, start, probation).\n\
         ³ total minus the three columns before: hooks (cluster-API calls and their polls), journal writes, \
         scheduling; divided by the node count for the per-node figure.\n\
         ⁴ CPU time of all the agents together during the run (receiving, hashing, unpacking and verifying the \
         package, applying), and the same per GB of package received by all of them: on a real fleet this is \
         spread over one machine per agent.\n\
         ⁵ the largest `VmHWM` of the agents: each one's peak since it started, so a later row includes the \
         earlier packages.\n\
         ⁶ from \"Staging the package\" to the first batch: every node's upload and stage with --stage-all-first; \
         otherwise the first batch's (the later nodes stage while the earlier batches restart, so this column and \
         the next overlap, and the controller share is what is left of the total, 0 when they overlap)."
    );
    println!(
        "\nThe {} agents idle: {:.0} CPU-ms per second together (measured over {} s before the first rollout).",
        runs.first().map_or(0, |run| run.nodes + 1),
        agents_idle_per_s * 1000.0,
        IDLE_SAMPLE.as_secs()
    );
    // Two package sizes differ only by random padding: the difference of their agents' CPU, less what the agents
    // burn idle over the difference of their wall times, is the transfer and stage of that padding alone.
    if let [larger, smaller, ..] = runs
        && larger.package_bytes > smaller.package_bytes
    {
        let extra_gb =
            ((larger.package_bytes - smaller.package_bytes) * larger.nodes as u64) as f64 / 1e9;
        let idle =
            agents_idle_per_s * (larger.total.as_secs_f64() - smaller.total.as_secs_f64()).max(0.0);
        let cpu = larger.agents_cpu.as_secs_f64() - smaller.agents_cpu.as_secs_f64() - idle;
        println!(
            "Agents' CPU for the transfer and stage of the padding alone ({} MiB row minus {} MiB row, less {:.2} s \
             idle over the longer rollout): {:.2} CPU-s for {:.2} GB = **{:.2} CPU-s per GB received**.",
            larger.package_mib,
            smaller.package_mib,
            idle,
            cpu,
            extra_gb,
            cpu / extra_gb
        );
    }
}
