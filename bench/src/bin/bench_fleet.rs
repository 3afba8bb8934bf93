//! Fleet benchmark: patch 50 demo workers, each managed by its own `patchd` agent on `127.0.1.k` (process backend,
//! instant-restart service), with `--batch-size 10`, through the real cluster-API hooks of a demo master. Reports the
//! total time, where it went (package read, staging transfer, the agents' apply, the controller's own share), the
//! controller's CPU time per node and its peak RSS. Runs twice: a 64 MiB package and a small one.
//!
//! Use the release binaries:
//! `cargo build --release -p patchd-agent -p patchctl -p patchd-demo --bins && \
//!  PATCHD_BIN_DIR=target/release cargo run --release -p patchd-bench --bin bench_fleet`
//! Environment: `BENCH_WORKERS` (default 50), `BENCH_PAD_MIB` (default 64), `BENCH_DIR` (default /var/tmp),
//! `BENCH_CONCURRENCY` (parallel uploads, default: patchctl's).

use anyhow::{Context, bail};
use nix::sys::resource::{UsageWho, getrusage};
use patchd_e2e::cluster_fixture::{ClusterFixture, FixtureOptions};
use patchd_e2e::write_random_file;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One timestamped progress line of `patchctl` (plain mode): seconds since the rollout began, and the text.
struct Line {
    at: f64,
    text: String,
}

/// Figures of one patch run.
struct Run {
    label: String,
    package_bytes: u64,
    nodes: usize,
    total: Duration,
    before_rollout: Duration,
    staging: Duration,
    apply_wall: Duration,
    cpu: Duration,
    agents_cpu: Duration,
    peak_rss: u64,
    failures: u64,
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os(patchd_e2e::BIN_DIR_ENV).is_none() {
        bail!(
            "{} is not set: build the release binaries (`cargo build --release -p patchd-agent -p patchctl -p \
             patchd-demo --bins`) and set {}=target/release",
            patchd_e2e::BIN_DIR_ENV,
            patchd_e2e::BIN_DIR_ENV
        );
    }
    let workers: usize = env_or("BENCH_WORKERS", 50)?;
    let pad_mib: u64 = env_or("BENCH_PAD_MIB", 64)?;
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("patchd-fleet-")
        .tempdir_in(&base)?;

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
        ..Default::default()
    };
    let mut cluster = ClusterFixture::start(work.path(), options);
    eprintln!("cluster up in {:.1}s", started.elapsed().as_secs_f64());

    let pad = work.path().join("pad.bin");
    write_random_file(&pad, pad_mib * 1024 * 1024, 7);
    let big = cluster.worker_package_with(
        "v1.0.1-hotfix",
        "ok",
        &[("demo-worker/pad.bin".to_string(), pad)],
    );
    let small = cluster.worker_package("v1.0.2-hotfix", "ok");

    let mut runs = Vec::new();
    for (label, package) in [
        (format!("{pad_mib} MiB package"), &big),
        ("small package".to_string(), &small),
    ] {
        eprintln!("patching {workers} workers with the {label}");
        let agents_before = agents_cpu(&mut cluster);
        let mut run = patch(&cluster, &label, package, workers)?;
        run.agents_cpu = agents_cpu(&mut cluster).saturating_sub(agents_before);
        runs.push(run);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    print_report(
        &runs,
        workers,
        load.split_whitespace().next().unwrap_or("?"),
    );
    Ok(())
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(key) {
        Ok(value) => value
            .parse()
            .map_err(|_| anyhow::anyhow!("{key}={value} is not a number")),
        Err(_) => Ok(default),
    }
}

/// `--concurrency N` from `BENCH_CONCURRENCY`, else patchctl's default.
fn concurrency_args() -> Vec<String> {
    std::env::var("BENCH_CONCURRENCY")
        .map(|n| vec!["--concurrency".to_string(), n])
        .unwrap_or_default()
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

/// CPU time (user + system) of a live process, from `/proc/<pid>/stat` (USER_HZ = 100).
fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let Some(close) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Total CPU time of every agent of the cluster.
fn agents_cpu(cluster: &mut ClusterFixture) -> Duration {
    let names: Vec<String> = cluster.nodes.iter().map(|node| node.name.clone()).collect();
    names
        .iter()
        .filter_map(|name| cluster.agent(name).and_then(|agent| agent.pid()))
        .map(process_cpu)
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
    label: &str,
    package: &Path,
    nodes: usize,
) -> anyhow::Result<Run> {
    let package_bytes = std::fs::metadata(package)?.len();
    let cpu_before = cpu_of_children()?;
    let started = Instant::now();
    let mut child = Command::new(patchd_e2e::bin("patchctl"))
        .args(["--format", "json", "patch", &cluster.name])
        .arg(package)
        .args([
            "-y",
            "--batch-size",
            "10",
            "--max-unavailable",
            "10",
            "--failure-budget",
            "9",
        ])
        .args(concurrency_args())
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
        label: label.to_string(),
        package_bytes,
        nodes,
        total,
        before_rollout,
        staging: Duration::from_secs_f64((first_batch - stage_start).max(0.0)),
        apply_wall: apply_wall(&lines),
        cpu,
        agents_cpu: Duration::ZERO,
        peak_rss: peak.load(Ordering::Relaxed),
        failures: summary["failures"].as_u64().unwrap_or_default(),
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

fn print_report(runs: &[Run], workers: usize, load: &str) {
    println!("## Fleet\n");
    println!(
        "{workers} demo workers, one `patchd` agent each on 127.0.1.2–127.0.1.{} (process backend), plus the demo \
         master on 127.0.1.1; `patchctl patch --batch-size 10 --max-unavailable 10 --failure-budget 9` with the \
         demo's offline/wait_offline/health/online/wait_online hooks; agent probation 500 ms. Every agent, service \
         and the controller share the machine's 2 cores (1-minute load average at the end: {load}).\n",
        workers + 1
    );
    println!(
        "| package | total | before rollout¹ | staging (transfer) | agents applying² | controller share³ | per node³ | \
         controller CPU | CPU per node | agents' CPU⁴ | peak RSS | failures |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for run in runs {
        let share = run
            .total
            .saturating_sub(run.before_rollout + run.staging + run.apply_wall);
        println!(
            "| {} ({:.1} MiB) | {:.1} s | {:.2} s | {:.1} s | {:.1} s | {:.2} s | {:.1} ms | {:.2} s | {:.1} ms | {:.1} s | {:.1} MiB | {} |",
            run.label,
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
            run.peak_rss as f64 / 1048576.0,
            run.failures
        );
    }
    println!(
        "\n¹ package read and hashed (inspection and chunk hashes, in parallel), status probes of every node, planning.\n\
         ² wall time during which at least one agent was inside Apply (stop, swap, start, probation).\n\
         ³ total minus the three columns before: hooks (cluster-API calls and their polls), journal writes, \
         scheduling; divided by the node count for the per-node figure.\n\
         ⁴ CPU time of all the agents together during the run (receiving, hashing, unpacking and verifying the \
         package, applying): on a real fleet this is spread over one machine per agent."
    );
    if let Some(run) = runs.first() {
        let reference = 4.0 * 60.0;
        println!(
            "\nReference: the common way (Ansible over SSH: copy, checksum, drain, stop, swap, start, wait, online) \
             takes about 5 s per host, about {reference:.0} s for 50 hosts with a 64 MiB package: this run is {:.1}× \
             faster.",
            reference / run.total.as_secs_f64()
        );
    }
}
