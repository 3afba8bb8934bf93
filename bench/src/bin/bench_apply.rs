//! Apply benchmark: one agent, one `process` service whose restart is instant (`exec sleep`), a package with a
//! 100 MiB payload already uploaded and staged; repeated online applies alternate between two such packages
//! (re-deployments of packages deployed before), then a few applies each deploy a staged package never deployed
//! before (the case of a rollout).
//! Reports, per apply, the unavailability (stop → healthy, as the agent measures it) and the agent's own overhead
//! around the service: the apply's wall time at the client minus the service's stop, start and start→healthy
//! steps. Two layouts: deploy dir on the state dir's file system (placement by hard link) and on another one
//! (`/dev/shm`: placement by copy + fsync, done before the stop).
//!
//! Run (release binaries recommended; without `PATCHD_BIN_DIR` the debug ones in target/debug are used):
//! `cargo build --release -p patchd-agent -p patchctl && PATCHD_BIN_DIR=target/release cargo run --release -p patchd-bench --bin bench_apply`
//! Options by environment: `BENCH_SIZE_MIB` (payload, default 100), `BENCH_RUNS` (applies per layout, default 20),
//! `BENCH_FRESH` (applies of never-deployed packages per layout, default 5), `BENCH_DIR` (state dir parent,
//! default /var/tmp).

use anyhow::{Context, bail};
use patchd_e2e::apply_support::{AgentRpc, ServiceReaper, outcome, push, v1};
use patchd_e2e::{AgentConfig, AgentProcess, Pki, toml_string, write_random_file};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SERVICE: &str = "bench-svc";
const TARGET_OVERHEAD_MS: f64 = 50.0;

/// The instant-restart service: a shell script that becomes `sleep` (the label makes each version distinct).
fn service_script(label: &str) -> String {
    format!("#!/bin/sh\n# version {label}\nexec sleep 100000\n")
}

/// A package `svc/svc` (the script) + `svc/payload.bin` (`size` random bytes from `seed`).
fn build_package(dir: &Path, label: &str, size: u64, seed: u64) -> anyhow::Result<PathBuf> {
    let root = dir.join(label).join("svc");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("svc"), service_script(label))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("svc"), std::fs::Permissions::from_mode(0o755))?;
    write_random_file(&root.join("payload.bin"), size, seed);
    let out = dir.join(format!("svc-{label}.tar.gz"));
    patchd_package::pack_dir(&root, label, &out).with_context(|| format!("packing {label}"))?;
    Ok(out)
}

#[derive(Debug, Default, Clone)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    stop_ms: f64,
    start_ms: f64,
    healthy_ms: f64,
    prepare_ms: f64,
    swap_ms: f64,
    journal_ms: f64,
}

impl Sample {
    /// The agent's own time: everything but the service's stop, start and start→healthy.
    fn overhead_ms(&self) -> f64 {
        self.total_ms - self.stop_ms - self.start_ms - self.healthy_ms
    }
}

fn step(response: &v1::ApplyResponse, name: &str) -> f64 {
    response
        .steps
        .iter()
        .filter(|s| s.step == name)
        .map(|s| s.millis as f64)
        .sum()
}

/// Median (the mean of the two middle values for an even count), p90 and max of `values`.
fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = patchd_bench::median_of_sorted(&sorted).unwrap_or(0.0);
    let p90 = sorted
        .get((sorted.len() * 9 / 10).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    let max = sorted.last().copied().unwrap_or(0.0);
    (median, p90, max)
}

/// The columns both tables show, over one set of applies.
struct Summary {
    down: (f64, f64, f64),
    overhead: (f64, f64, f64),
    total_median: f64,
    prepare_median: f64,
    swap_median: f64,
    journal_median: f64,
}

impl Summary {
    fn of(samples: &[Sample]) -> Self {
        let column = |f: fn(&Sample) -> f64| -> Vec<f64> { samples.iter().map(f).collect() };
        Summary {
            down: stats(&column(|s| s.downtime_ms)),
            overhead: stats(&column(Sample::overhead_ms)),
            total_median: stats(&column(|s| s.total_ms)).0,
            prepare_median: stats(&column(|s| s.prepare_ms)).0,
            swap_median: stats(&column(|s| s.swap_ms)).0,
            journal_median: stats(&column(|s| s.journal_ms)).0,
        }
    }

    /// "`layout`, `kind`: median … ms → met / NOT met" against [`TARGET_OVERHEAD_MS`].
    fn verdict(&self, layout: &str, kind: &str) -> String {
        let median = self.overhead.0;
        let met = if median < TARGET_OVERHEAD_MS {
            "met"
        } else {
            "NOT met"
        };
        format!("{layout}, {kind}: median {median:.1} ms → {met}")
    }
}

struct LayoutResult {
    name: String,
    first: Sample,
    /// Re-deployments: the two packages in turn.
    warm: Vec<Sample>,
    /// Each the first deployment of a package staged beforehand.
    fresh: Vec<Sample>,
    stage_ms: f64,
    /// The agent's CPU for both packages' upload and stage, and the bytes it received.
    transfer_stage_cpu: Duration,
    received_bytes: u64,
    durable_write_ms: f64,
}

/// Median latency of one durable small-file replace (write, fsync, rename, directory fsync) in `dir`: what one
/// journal transition costs on this disk right now.
fn durable_write_latency(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let mut samples = Vec::new();
    let target = dir.join("probe.json");
    let temp = dir.join("probe.json.tmp");
    for _ in 0..15 {
        let started = Instant::now();
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&[b'x'; 4096])?;
        file.sync_all()?;
        std::fs::rename(&temp, &target)?;
        std::fs::File::open(dir)?.sync_all()?;
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    std::fs::remove_file(&target)?;
    Ok(stats(&samples).0)
}

fn run_layout(
    name: &str,
    base: &Path,
    deploy_parent: &Path,
    size: u64,
    runs: usize,
    fresh: usize,
) -> anyhow::Result<LayoutResult> {
    let work = tempfile::Builder::new()
        .prefix("patchd-bench-apply-")
        .tempdir_in(base)?;
    let deploy_work = tempfile::Builder::new()
        .prefix("patchd-bench-deploy-")
        .tempdir_in(deploy_parent)?;
    let deploy_root = deploy_work.path().to_path_buf();
    let deploy_dir = deploy_root.join(SERVICE);
    let bin_dir = deploy_dir.join("bin/svc");
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::write(bin_dir.join("svc"), service_script("original"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin_dir.join("svc"), std::fs::Permissions::from_mode(0o755))?;
    write_random_file(&bin_dir.join("payload.bin"), size, 1);

    eprintln!(
        "[{name}] building two packages with a {} MiB payload",
        size >> 20
    );
    let pkgs = work.path().join("packages");
    let packages = [
        build_package(&pkgs, "a", size, 2)?,
        build_package(&pkgs, "b", size, 3)?,
    ];

    let pki = Pki::new(work.path());
    let tls = pki.issue_agent("bench-agent", &["127.0.0.1"]);
    let service = format!(
        "[[service]]\nname = \"{SERVICE}\"\ncomponent = \"svc\"\ndeploy_dir = {dir}\nbackend = \"process\"\n\
         command = [\"{{deploy_dir}}/bin/svc/svc\"]\nuser = \"root\"\nstop_timeout = \"5s\"\n\n[service.health]\nmin_healthy = \"0s\"\ntimeout = \"10s\"\n",
        dir = toml_string(&deploy_dir.to_string_lossy())
    );
    let config = AgentConfig::new(&work.path().join("agent"), &tls)
        .deploy_roots(&[&deploy_root])
        .limit("max_blob_bytes", &(size * 4).to_string())
        .extra(&service);
    let state = config.state_path().to_path_buf();
    let reaper = ServiceReaper::new(&state);
    let mut agent = AgentProcess::start(&config.write());
    let mut rpc = AgentRpc::connect(&pki, agent.addr);

    let mut digests = Vec::new();
    let mut stage_ms = 0.0;
    let agent_pid = agent.pid().context("the agent has no pid")?;
    let cpu_before = patchd_bench::process_cpu(agent_pid);
    let mut received_bytes = 0;
    for package in &packages {
        received_bytes += std::fs::metadata(package)?.len();
        let digest = push(&pki, &agent.addr_string(), package);
        let started = Instant::now();
        rpc.stage(SERVICE, &digest)
            .map_err(|e| anyhow::anyhow!("stage failed: {e}"))?;
        stage_ms = started.elapsed().as_secs_f64() * 1e3;
        digests.push(digest);
    }
    let transfer_stage_cpu = patchd_bench::process_cpu(agent_pid).saturating_sub(cpu_before);

    // The never-deployed packages are uploaded and staged too before anything is timed (not counted in the CPU
    // per GB above, which is the two packages' alone).
    let mut fresh_digests = Vec::new();
    for index in 0..fresh {
        let package = build_package(&pkgs, &format!("fresh-{index}"), size, 10 + index as u64)?;
        let digest = push(&pki, &agent.addr_string(), &package);
        rpc.stage(SERVICE, &digest)
            .map_err(|e| anyhow::anyhow!("stage failed: {e}"))?;
        std::fs::remove_file(&package)?;
        fresh_digests.push(digest);
    }

    let durable_write_ms = durable_write_latency(work.path())?;
    let mut samples = Vec::new();
    for run in 0..=runs {
        samples.push(apply_once(
            &mut rpc,
            &reaper,
            &digests[run % 2],
            &format!("bench-{run}"),
        )?);
    }
    let mut fresh_samples = Vec::new();
    for (index, digest) in fresh_digests.iter().enumerate() {
        fresh_samples.push(apply_once(
            &mut rpc,
            &reaper,
            digest,
            &format!("fresh-{index}"),
        )?);
    }
    agent.stop();
    reaper.reap();
    let first = samples.remove(0);
    Ok(LayoutResult {
        name: name.to_string(),
        first,
        warm: samples,
        fresh: fresh_samples,
        stage_ms,
        transfer_stage_cpu,
        received_bytes,
        durable_write_ms,
    })
}

/// One timed online apply of the staged package `digest`.
fn apply_once(
    rpc: &mut AgentRpc,
    reaper: &ServiceReaper,
    digest: &str,
    label: &str,
) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let response = rpc
        .apply(SERVICE, digest, label, false)
        .map_err(|e| anyhow::anyhow!("apply failed: {e}"))?;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    if outcome(&response) != v1::ApplyOutcome::Committed {
        bail!("apply {label} did not commit: {response:?}");
    }
    reaper.track(SERVICE);
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        let steps: Vec<String> = response
            .steps
            .iter()
            .map(|s| format!("{}={}", s.step, s.millis))
            .collect();
        eprintln!(
            "  apply {label}: total {total_ms:.1} ms, downtime {} ms, steps {}",
            response.downtime_ms,
            steps.join(" ")
        );
    }
    Ok(Sample {
        total_ms,
        downtime_ms: response.downtime_ms as f64,
        stop_ms: step(&response, "stop"),
        start_ms: step(&response, "start"),
        healthy_ms: step(&response, "healthy"),
        prepare_ms: step(&response, "prepare"),
        swap_ms: step(&response, "swap"),
        journal_ms: step(&response, "journal"),
    })
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(key) {
        Ok(text) => text
            .parse()
            .map_err(|_| anyhow::anyhow!("{key}={text} is not a valid number")),
        Err(_) => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let size_mib: u64 = env_or("BENCH_SIZE_MIB", 100)?;
    let runs: usize = env_or("BENCH_RUNS", 20)?;
    let fresh: usize = env_or("BENCH_FRESH", 5)?;
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base)?;
    let binaries = std::env::var(patchd_e2e::BIN_DIR_ENV)
        .unwrap_or_else(|_| "target/debug (debug build)".into());
    eprintln!("agent binaries: {binaries}");
    let size = size_mib << 20;

    let mut layouts = vec![run_layout(
        "same fs (hard link)",
        &base,
        &base,
        size,
        runs,
        fresh,
    )?];
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        layouts.push(run_layout(
            "other fs: deploy on /dev/shm (copy + fsync)",
            &base,
            shm,
            size,
            runs,
            fresh,
        )?);
    } else {
        eprintln!("/dev/shm missing: cross-filesystem layout skipped");
    }

    println!(
        "## bench_apply: {size_mib} MiB payload, {runs} warm applies per layout, agent binaries: {binaries}\n"
    );
    println!(
        "| layout | unavailable (stop→healthy) median / p90 / max ms | agent overhead median / p90 / max ms | of which journal writes (median ms) | apply total median ms | prepare / swap median ms | first apply (deployed payload never hashed): total / overhead ms | stage ms | agent CPU per GB received, upload + stage (both packages) | one durable write (fsync+rename+dir fsync) ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for layout in &layouts {
        let warm = Summary::of(&layout.warm);
        verdicts.push(warm.verdict(&layout.name, "re-deployments"));
        let ((down_med, down_p90, down_max), (over_med, over_p90, over_max)) =
            (warm.down, warm.overhead);
        println!(
            "| {} | {down_med:.0} / {down_p90:.0} / {down_max:.0} | {over_med:.1} / {over_p90:.1} / {over_max:.1} | {:.0} | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} | {:.2} s ({:.2} CPU-s, {:.0} MB) | {:.2} |",
            layout.name,
            warm.journal_median,
            warm.total_median,
            warm.prepare_median,
            warm.swap_median,
            layout.first.total_ms,
            layout.first.overhead_ms(),
            layout.stage_ms,
            layout.transfer_stage_cpu.as_secs_f64() / (layout.received_bytes as f64 / 1e9),
            layout.transfer_stage_cpu.as_secs_f64(),
            layout.received_bytes as f64 / 1e6,
            layout.durable_write_ms,
        );
    }
    println!(
        "\nEach apply the first deployment of a staged package (the rollout case), {fresh} per layout:\n"
    );
    println!(
        "| layout | unavailable (stop→healthy) median / max ms | agent overhead median / p90 / max ms | apply total median ms | prepare / swap median ms |"
    );
    println!("|---|---|---|---|---|");
    for layout in layouts.iter().filter(|layout| !layout.fresh.is_empty()) {
        let fresh = Summary::of(&layout.fresh);
        verdicts.push(fresh.verdict(&layout.name, "first deployments"));
        let ((down_med, _, down_max), (over_med, over_p90, over_max)) =
            (fresh.down, fresh.overhead);
        println!(
            "| {} | {down_med:.0} / {down_max:.0} | {over_med:.1} / {over_p90:.1} / {over_max:.1} | {:.1} | {:.0} / {:.0} |",
            layout.name, fresh.total_median, fresh.prepare_median, fresh.swap_median
        );
    }
    println!("\nTarget: agent overhead < {TARGET_OVERHEAD_MS} ms per apply (warm):");
    for verdict in verdicts {
        println!("* {verdict}");
    }
    Ok(())
}
