//! Container benchmark on the real Docker Engine: (1) the unavailability of one container swap by the agent (old
//! container's stop → new container healthy) against `docker stop && docker run` of the same images by hand, in
//! one run; (2) loading a ~200 MiB image from a staged image package (the apply's `prepare` step: verify the
//! archive against the manifest, load, check the ID, create the container) against `docker load -i` of the same
//! archive.
//!
//! Run (release binaries recommended; without `PATCHD_BIN_DIR` the debug ones in target/debug are used):
//! `cargo build --release -p patchd-agent -p patchctl -p patchd-demo && PATCHD_BIN_DIR=target/release cargo run --release -p patchd-bench --bin bench_container`
//! Options by environment: `BENCH_RUNS` (swaps per side, default 10), `BENCH_LOAD_MIB` (payload of the load
//! image, default 200), `BENCH_LOAD_RUNS` (loads per side, default 3).

use anyhow::{Context, bail};
use patchd_e2e::apply_support::{http_get, outcome, push, v1};
use patchd_e2e::container_rig::{ContainerRig, RigOptions, SERVICE};
use patchd_e2e::write_random_file;
use std::process::Command;
use std::time::{Duration, Instant};

fn step(response: &v1::ApplyResponse, name: &str) -> f64 {
    response
        .steps
        .iter()
        .filter(|s| s.step == name)
        .map(|s| s.millis as f64)
        .sum()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .with_context(|| format!("docker {args:?}"))?;
    if !out.status.success() {
        bail!(
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Polls `/health` every 2 ms until it answers 200; when it did.
fn wait_healthy(port: u16, limit: Duration) -> anyhow::Result<Instant> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some((200, _)) = http_get(&format!("127.0.0.1:{port}"), "/health") {
            return Ok(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("the worker on port {port} was not healthy within {limit:?}")
}

fn main() -> anyhow::Result<()> {
    let runs = env_number("BENCH_RUNS", 10);
    let load_mib = env_number("BENCH_LOAD_MIB", 200);
    let load_runs = env_number("BENCH_LOAD_RUNS", 3);
    let rig = ContainerRig::start("bench-ct", RigOptions::default());
    let (package_a, image_a) = rig.image_package("v2", "ok");
    let (package_b, image_b) = rig.image_package("v3", "ok");
    let mut rpc = rig.rpc();
    let digest_a = push(&rig.pki, &rig.agent.addr_string(), &package_a);
    let digest_b = push(&rig.pki, &rig.agent.addr_string(), &package_b);
    rpc.stage(SERVICE, &digest_a)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    rpc.stage(SERVICE, &digest_b)
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    // (1) patchd: alternate between the two staged images (both already loaded after the first two applies).
    let mut patchd = Vec::new();
    let mut engine_steps = Vec::new();
    for run in 0..runs + 2 {
        let digest = if run % 2 == 0 { &digest_a } else { &digest_b };
        let response = rpc
            .apply(SERVICE, digest, &format!("bench-{run}"), false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if outcome(&response) != v1::ApplyOutcome::Committed {
            bail!("apply {run} did not commit: {response:?}");
        }
        if run >= 2 {
            patchd.push(response.downtime_ms as f64);
            engine_steps.push(step(&response, "stop") + step(&response, "start"));
        }
    }

    // By hand: stop the running container, `docker run` one of the same images with the same options.
    let current = rig.container.clone();
    docker(&["stop", &current])?;
    let mounts = rig.path().join("oms");
    let port = rig.port;
    let mut by_hand = Vec::new();
    let mut running = None::<String>;
    for run in 0..runs + 1 {
        let image = if run % 2 == 0 { &image_a } else { &image_b };
        let name = rig.docker.name(&format!("hand-{run}"));
        let start = Instant::now();
        if let Some(old) = &running {
            docker(&["stop", "-t", "2", old])?;
        }
        docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--pids-limit",
            "4096",
            "--ulimit",
            "nproc=65535:65535",
            "--restart",
            "unless-stopped",
            "-v",
            &format!(
                "{}:/home/admin/conf/config.yaml",
                mounts.join("config.yaml").display()
            ),
            "-v",
            &format!("{}:/home/admin/logs", mounts.join("logs").display()),
            "-v",
            &format!("{}:/home/ds/store", mounts.join("store").display()),
            "-e",
            "OMS_HOST_IP=127.0.0.1",
            "-e",
            "IS_UPGRADE=true",
            image,
        ])?;
        let healthy = wait_healthy(port, Duration::from_secs(30))?;
        if running.is_some() {
            by_hand.push(healthy.duration_since(start).as_secs_f64() * 1000.0);
        }
        if let Some(old) = running.replace(name) {
            docker(&["rm", "-f", &old])?;
        }
    }
    if let Some(last) = running {
        docker(&["rm", "-f", &last])?;
    }
    docker(&["start", &current])?;

    println!(
        "## Container swap: unavailability (stop → healthy), {runs} swaps each, same images and options\n"
    );
    println!("| | median ms | min ms | max ms |");
    println!("|---|---|---|---|");
    let row = |label: &str, values: &[f64]| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        println!("| {label} | {:.0} | {min:.0} | {max:.0} |", median(values));
    };
    row("patchd (agent: stop, rename ×2, start, probe)", &patchd);
    row("by hand: docker stop && docker run, polled", &by_hand);
    println!(
        "\npatchd − by hand (median): {:.0} ms; engine's own stop + start inside patchd's swaps (median): {:.0} ms",
        median(&patchd) - median(&by_hand),
        median(&engine_steps)
    );

    // (2) A large image: load from the staged package (apply's prepare) vs `docker load -i`.
    let payload = rig.path().join("payload.bin");
    write_random_file(&payload, load_mib << 20, 7);
    let binary = rig.path().join("binaries/v1.0.0/demo-worker");
    let listen = format!("127.0.0.1:{port}");
    let big = rig.docker.build_image_with(
        &format!("{}:big", rig.docker.name("worker")),
        &[(&binary, None), (&payload, Some("/payload.bin"))],
        &["/demo-worker", "serve", "--listen", &listen],
    );
    let (big_package, _) = rig.package_of(&big, "v-big");
    let archive = rig.path().join("packages/v-big.tar");
    let archive_mib = std::fs::metadata(&archive)?.len() as f64 / f64::from(1 << 20);
    let big_digest = push(&rig.pki, &rig.agent.addr_string(), &big_package);
    rpc.stage(SERVICE, &big_digest)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut hand_loads = Vec::new();
    let mut patchd_loads = Vec::new();
    for run in 0..load_runs {
        // Back to a small image, so the big one is used by no container and can be removed before each load.
        let back_digest = if run % 2 == 0 { &digest_a } else { &digest_b };
        rpc.apply(SERVICE, back_digest, &format!("back-{run}"), false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        rig.docker.remove_image(&big);
        let start = Instant::now();
        docker(&["load", "-q", "-i", &archive.to_string_lossy()])?;
        hand_loads.push(start.elapsed().as_secs_f64() * 1000.0);
        rig.docker.remove_image(&big);
        let response = rpc
            .apply(SERVICE, &big_digest, &format!("big-{run}"), false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if outcome(&response) != v1::ApplyOutcome::Committed {
            bail!("big apply {run} did not commit: {response:?}");
        }
        patchd_loads.push(step(&response, "prepare"));
    }
    rig.docker.track_image(&big);
    println!(
        "\n## Loading a {archive_mib:.0} MiB image archive, {load_runs} loads each, image absent before each\n"
    );
    println!("| | median ms | min ms | max ms |");
    println!("|---|---|---|---|");
    row("`docker load -i` of the archive", &hand_loads);
    row(
        "patchd apply's prepare (verify + load + check ID + create) from the staged package",
        &patchd_loads,
    );
    println!(
        "\nratio patchd / docker load (median): {:.2}",
        median(&patchd_loads) / median(&hand_loads).max(1.0)
    );
    Ok(())
}
