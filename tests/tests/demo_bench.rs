//! Benchmark of the demo (ignored by default: it wants release binaries and a quiet machine). Figures for the
//! `## Demo` section of BENCHMARKS.md:
//!
//! ```text
//! cargo build --release --bins
//! cargo test -p patchd-e2e --test demo_bench -- --ignored --nocapture
//! ```
//!
//! Times `patchctl demo up --nodes 10` (3 masters, 7 workers) and a full rollout of a demo-worker hotfix to the 7
//! workers with `--batch-size 1`, then another with `--batch-size 5 --max-unavailable 5 --failure-budget 4` (the
//! budget lets five nodes run at once). During each rollout one thread per worker probes `GET /health` every
//! 10 ms; a worker's unavailability window is the time from its first failed probe to the next successful one.
//! The drained window (offline → online, as the master saw the hook calls) is reported next to it. Binaries come from `$PATCHD_BENCH_BIN_DIR` (default `target/release`).

use patchd_e2e::cluster_fixture::http;
use patchd_e2e::workspace_root;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PREFIX: &str = "127.0.78";
const NODES: usize = 10;
const MASTERS: usize = 3;
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

fn bin_dir() -> PathBuf {
    std::env::var_os("PATCHD_BENCH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release"))
}

fn run(home: &Path, program: &Path, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .env("PATCHCTL_HOME", home)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{}\n{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One `GET /health` over a fresh connection: true on a 2xx answer.
fn probe(addr: SocketAddr) -> bool {
    let timeout = Duration::from_millis(250);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: demo\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && head[9] == b'2'
}

/// Probes every worker until stopped; returns, per worker, its unavailability windows.
struct Probes {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Duration>>>,
}

impl Probes {
    fn start(workers: &[SocketAddr]) -> Probes {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = workers
            .iter()
            .map(|&addr| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut windows = Vec::new();
                    let mut down_since: Option<Instant> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        match (probe(addr), down_since) {
                            (false, None) => down_since = Some(at),
                            (true, Some(since)) => {
                                windows.push(at - since);
                                down_since = None;
                            }
                            _ => {}
                        }
                        std::thread::sleep(PROBE_INTERVAL.saturating_sub(at.elapsed()));
                    }
                    if let Some(since) = down_since {
                        windows.push(since.elapsed());
                    }
                    windows
                })
            })
            .collect();
        Probes { stop, threads }
    }

    fn finish(self) -> Vec<Vec<Duration>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Offline → online time per worker from the leader's call log (ms).
fn drained_windows(leader: &str) -> Vec<f64> {
    let (_, body) = http("GET", &format!("http://{leader}/api/_test/calls"), None).unwrap();
    let calls: Value = serde_json::from_str(&body).unwrap();
    let mut offline_at = std::collections::HashMap::new();
    let mut windows = Vec::new();
    for call in calls.as_array().unwrap() {
        let (Some(path), Some(at)) = (call["path"].as_str(), call["at_ms"].as_u64()) else {
            continue;
        };
        if call["method"] != "POST" {
            continue;
        }
        if path.ends_with("/offline") {
            offline_at.insert(call["member"].as_str().unwrap_or_default().to_string(), at);
        } else if path.ends_with("/online")
            && let Some(start) = offline_at.remove(call["member"].as_str().unwrap_or_default())
        {
            windows.push((at - start) as f64);
        }
    }
    windows
}

fn summary(values: &[f64]) -> String {
    if values.is_empty() {
        return "-".to_string();
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    format!(
        "median {median:.0} ms, max {:.0} ms",
        sorted[sorted.len() - 1]
    )
}

/// Rolls a new worker version out with `--batch-size batch`; up to `batch` nodes at once (the failure budget
/// must allow it: with budget b at most b + 1 nodes are patched at the same time).
fn rollout(
    home: &Path,
    bins: &Path,
    dir: &Path,
    version: &str,
    batch: usize,
    workers: &[SocketAddr],
) -> String {
    let batch_arg = batch.to_string();
    let budget_arg = batch.saturating_sub(1).to_string();
    let base = std::fs::read_dir(dir.join("packages"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("demo-worker-v1.0.0-")
        })
        .expect("original worker package");
    let binary = dir.join("bench").join(version).join("demo-worker");
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    run(
        home,
        &bins.join("demo-worker"),
        &[
            "stamp",
            "--version",
            version,
            "-o",
            binary.to_str().unwrap(),
        ],
    );
    let package = dir
        .join("bench")
        .join(format!("demo-worker-{version}.tar.gz"));
    let replace = format!("demo-worker/demo-worker={}", binary.display());
    let args = [
        "package",
        "build",
        "--base",
        base.to_str().unwrap(),
        "--replace",
        &replace,
        "--version",
        version,
    ];
    let mut build = args.to_vec();
    build.extend(["-o", package.to_str().unwrap()]);
    run(home, &bins.join("patchctl"), &build);

    let leader = format!("{PREFIX}.1:8261");
    http("DELETE", &format!("http://{leader}/api/_test/calls"), None).unwrap();
    let probes = Probes::start(workers);
    let started = Instant::now();
    let patch = [
        "patch",
        "demo",
        package.to_str().unwrap(),
        "-R",
        "demo-worker",
        "-y",
        "--batch-size",
        &batch_arg,
        "--max-unavailable",
        &batch_arg,
        "--failure-budget",
        &budget_arg,
    ];
    run(home, &bins.join("patchctl"), &patch);
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let windows = probes.finish();
    for (i, addr) in workers.iter().enumerate() {
        let version_now = http("GET", &format!("http://{addr}/version"), None)
            .unwrap()
            .1;
        assert!(
            version_now.contains(version),
            "worker {i} runs {version}: {version_now}"
        );
    }
    let longest: Vec<f64> = windows
        .iter()
        .map(|w| w.iter().copied().max().map(ms).unwrap_or(0.0))
        .collect();
    let outages: usize = windows.iter().map(Vec::len).sum();
    format!(
        "| `--batch-size {batch} --max-unavailable {batch} --failure-budget {budget_arg}` | {} workers | {:.2} s | {} ({outages} outage(s)) | {} |",
        workers.len(),
        took.as_secs_f64(),
        summary(&longest),
        summary(&drained_windows(&leader))
    )
}

#[test]
#[ignore = "benchmark: needs release binaries (cargo build --release --bins); run with --ignored --nocapture"]
fn demo_bench() {
    let bins = bin_dir();
    for name in ["patchd", "patchctl", "demo-master", "demo-worker"] {
        assert!(
            bins.join(name).is_file(),
            "{} missing: run `cargo build --release --bins`",
            bins.join(name).display()
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let dir = tmp.path().join("demo");
    let dir_arg = dir.to_str().unwrap();
    let patchctl = bins.join("patchctl");
    let nodes = NODES.to_string();
    let up_args = [
        "demo",
        "up",
        "--nodes",
        &nodes,
        "--hosts-prefix",
        PREFIX,
        "--dir",
        dir_arg,
    ];

    let started = Instant::now();
    run(&home, &patchctl, &up_args);
    let up_first = started.elapsed();
    // A second `up` from a stopped demo reuses the CA and the controller certificate.
    run(&home, &patchctl, &["demo", "down", "--dir", dir_arg]);
    let started = Instant::now();
    run(&home, &patchctl, &up_args);
    let up_again = started.elapsed();

    let workers: Vec<SocketAddr> = (MASTERS + 1..=NODES)
        .map(|k| format!("{PREFIX}.{k}:8262").parse().unwrap())
        .collect();
    let result = std::panic::catch_unwind(|| {
        let single = rollout(&home, &bins, &dir, "v1.0.1-hotfix", 1, &workers);
        let five = rollout(&home, &bins, &dir, "v1.0.2-hotfix", 5, &workers);
        (single, five)
    });
    run(&home, &patchctl, &["demo", "down", "--dir", dir_arg]);
    let (single, five) = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));

    println!();
    println!(
        "`patchctl demo up --nodes {NODES}` ({MASTERS} masters, {} workers): {:.2} s with a new CA, {:.2} s again",
        workers.len(),
        up_first.as_secs_f64(),
        up_again.as_secs_f64()
    );
    println!();
    println!(
        "| rollout | nodes | wall time | unavailable per worker (health probes) | drained per worker (offline→online) |"
    );
    println!("|---|---|---|---|---|");
    println!("{single}");
    println!("{five}");
}
