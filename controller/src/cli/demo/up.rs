//! `patchctl demo up`: check the addresses, create the TLS identities, build the original packages, deploy each
//! host (with `--containers`: build the worker image and start the worker containers), start the agents, wait
//! until the cluster is ready, import it as cluster `demo`.

use super::down::{remove_containers, stop_all, stop_services};
use super::{Ctx, Format, UpArgs, demo_dir, progress};
use anyhow::{Context, bail};
use patchctl::agent::client::AgentClient;
use patchctl::demo::layout::{self, CLUSTER_NAME, ORIGINAL_VERSION, ServiceRole, master_count};
use patchctl::demo::procs::{AgentRecord, DemoRecord, ProcessIdentity, RECORD_FORMAT};
use patchctl::demo::{DemoHost, DemoLayout, DemoService, containers, render};
use patchctl::store::Store;
use patchctl::tls_files::ControllerTls;
use patchctl::topology::Topology;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

// ----- up -----

pub(super) async fn up(ctx: &Ctx, args: UpArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    let dir = demo_dir(ctx, &args.dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the demo directory {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    // Hints name the directory when it is not the default one.
    let dir_flag = if args.dir.dir.is_some() {
        format!(" --dir {}", dir.display())
    } else {
        String::new()
    };

    if let Some(record) = DemoRecord::load(&layout::record_path(&dir))? {
        let live = record.live_agents();
        if live.len() == record.agents.len() && !live.is_empty() {
            match ctx.format {
                Format::Json => outln!(
                    "{}",
                    json!({"already_up": true, "dir": dir, "agents": record.agents.len()})
                ),
                Format::Text => {
                    outln!(
                        "the demo is already up in {} ({} agents running)",
                        dir.display(),
                        live.len()
                    );
                    outln!("  patchctl display {CLUSTER_NAME}    # see it");
                    outln!("  patchctl demo down{dir_flag}    # stop it");
                }
            }
            return Ok(patchctl::exit::OK);
        }
        if !live.is_empty() {
            bail!(
                "the demo in {} is partly up ({} of {} agents running); run `patchctl demo down` first",
                dir.display(),
                live.len(),
                record.agents.len()
            );
        }
        // A demo that went down without `demo down` (host reboot, killed agents): stop its leftover services.
        stop_services(ctx, &dir).await;
        if record.containers {
            remove_containers(ctx, &dir, true).await;
        }
    }

    let bins = DemoBinaries::find(args.bin_dir.as_deref())?;
    let layout = DemoLayout::new(&dir, args.nodes, args.agent_port, &args.hosts_prefix)?;
    check_addresses_free(&layout)?;

    progress(
        ctx,
        &format!(
            "preparing {} hosts in {}",
            layout.hosts.len(),
            dir.display()
        ),
    );
    let tls_dir = ctx.home.tls_dir();
    ensure_controller_tls(ctx, &tls_dir)?;
    let originals = build_originals(&layout, &bins).await?;
    for host in &layout.hosts {
        prepare_host(&layout, host, &tls_dir, &originals, args.containers)?;
    }
    if args.containers
        && let Err(error) = start_worker_containers(ctx, &layout, &originals).await
    {
        remove_containers(ctx, &layout.dir, false).await;
        return Err(error);
    }

    progress(
        ctx,
        &format!(
            "starting {} agents (logs in {})",
            layout.hosts.len(),
            layout.logs_dir().display()
        ),
    );
    let mut children = Vec::new();
    let mut record = DemoRecord {
        format: RECORD_FORMAT,
        nodes: args.nodes,
        agent_port: args.agent_port,
        hosts_prefix: args.hosts_prefix.clone(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        agents: Vec::new(),
        containers: args.containers,
    };
    for host in &layout.hosts {
        let (child, agent) = start_agent(&layout, host, &bins.patchd)?;
        children.push(child);
        record.agents.push(agent);
        // Saved after every start, so `demo down` finds every agent even if `up` fails half-way.
        record.save(&layout.record_path())?;
    }

    let ready = wait_until_ready(ctx, &layout, &tls_dir, &mut children, args.timeout).await;
    if let Err(error) = ready {
        errln!(
            "error: the demo did not come up; stopping what was started (logs kept in {})",
            layout.logs_dir().display()
        );
        stop_all(ctx, &dir, Some(&record)).await;
        return Err(error);
    }

    let topology_path = layout.topology_path();
    let topology_text = render::topology(&layout, &tls_dir);
    std::fs::write(&topology_path, &topology_text)
        .with_context(|| format!("cannot write {}", topology_path.display()))?;
    let topology = Topology::parse(&topology_text)
        .context("the generated demo topology does not parse (a bug)")?;
    topology.check_name(CLUSTER_NAME, &topology_text)?;
    let store = Store::open_home(&ctx.home)?;
    store.save_cluster(
        CLUSTER_NAME,
        &topology_text,
        &topology_path.to_string_lossy(),
    )?;
    // The services were just deployed at their original version: `(patched)` marks of an earlier demo are stale.
    store.forget_deployment(CLUSTER_NAME)?;

    print_up_summary(
        ctx,
        &layout,
        &bins,
        &dir_flag,
        args.containers,
        started.elapsed(),
    );
    Ok(patchctl::exit::OK)
}

/// The binaries the demo runs, found next to each other.
pub(super) struct DemoBinaries {
    patchd: PathBuf,
    master: PathBuf,
    worker: PathBuf,
}

impl DemoBinaries {
    fn find(bin_dir: Option<&Path>) -> anyhow::Result<DemoBinaries> {
        let dir = match bin_dir {
            Some(dir) => dir.to_path_buf(),
            None => std::env::current_exe()
                .context("cannot locate the patchctl executable; pass --bin-dir")?
                .parent()
                .map(Path::to_path_buf)
                .context("the patchctl executable has no directory; pass --bin-dir")?,
        };
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                bail!(
                    "{name} not found in {}: build the binaries with `cargo build --release --bins` (or pass --bin-dir \
                     to the directory holding patchd, demo-master and demo-worker)",
                    dir.display()
                )
            }
        };
        Ok(DemoBinaries {
            patchd: find("patchd")?,
            master: find("demo-master")?,
            worker: find("demo-worker")?,
        })
    }

    fn of(&self, role: ServiceRole) -> &Path {
        match role {
            ServiceRole::Master => &self.master,
            ServiceRole::Worker => &self.worker,
        }
    }
}

pub(super) fn check_addresses_free(layout: &DemoLayout) -> anyhow::Result<()> {
    let addresses = layout
        .hosts
        .iter()
        .map(|host| (host.agent_addr(), format!("agent {}", host.index)))
        .chain(
            layout
                .services()
                .map(|service| (service.addr(), service.name.clone())),
        );
    for (addr, what) in addresses {
        if let Err(e) = std::net::TcpListener::bind(&addr) {
            bail!(
                "{addr} (for {what}) is not free: {e}. Something else listens there (another demo with a different \
                 --dir, or leftovers: see `ss -ltnp`); stop it, or pick another --agent-port"
            );
        }
    }
    Ok(())
}

/// Creates the cluster CA and the controller certificate in `tls_dir` when they are missing.
pub(super) fn ensure_controller_tls(ctx: &Ctx, tls_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(tls_dir)
        .with_context(|| format!("cannot create {}", tls_dir.display()))?;
    if !tls_dir.join("ca.crt").exists() {
        progress(
            ctx,
            &format!("creating the cluster CA in {}", tls_dir.display()),
        );
        patchd_tls::init_ca(&patchd_tls::CaPaths::in_dir(tls_dir), false)
            .context("cannot create the cluster CA")?;
    }
    let files = ControllerTls::files_in(tls_dir);
    if !files.cert.exists() || !files.key.exists() {
        progress(ctx, "issuing the controller certificate");
        let ca = patchd_tls::CertificateAuthority::load(tls_dir)
            .with_context(|| format!("cannot load the CA in {}", tls_dir.display()))?;
        let spec =
            patchd_tls::CertSpec::new("controller", patchd_tls::Role::Controller, Vec::new(), 365);
        ca.issue(&spec)?
            .write(tls_dir, patchctl::tls_files::CONTROLLER_STEM)?;
    }
    Ok(())
}

/// Stamped v1.0.0 binaries (in `packages/.src/<component>/<component>`) and their original packages.
pub(super) async fn build_originals(
    layout: &DemoLayout,
    bins: &DemoBinaries,
) -> anyhow::Result<Vec<(ServiceRole, PathBuf)>> {
    let mut originals = Vec::new();
    for role in [ServiceRole::Master, ServiceRole::Worker] {
        let component = role.component();
        let component_dir = layout.packages_dir().join(".src").join(component);
        std::fs::create_dir_all(&component_dir)
            .with_context(|| format!("cannot create {}", component_dir.display()))?;
        let binary = component_dir.join(component);
        let output = tokio::process::Command::new(bins.of(role))
            .args(["stamp", "--version", ORIGINAL_VERSION, "-o"])
            .arg(&binary)
            .output()
            .await
            .with_context(|| format!("cannot run {}", bins.of(role).display()))?;
        if !output.status.success() {
            bail!(
                "`{} stamp` failed: {}",
                bins.of(role).display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let package = layout.original_package(role);
        let dir = component_dir.clone();
        let out = package.clone();
        tokio::task::spawn_blocking(move || patchd_package::pack_dir(&dir, ORIGINAL_VERSION, &out))
            .await
            .context("packing task failed")?
            .with_context(|| format!("cannot build the original package {}", package.display()))?;
        originals.push((role, binary));
    }
    Ok(originals)
}

/// `--containers`: builds the worker image from the stamped original (`demo-worker:v1.0.0`) and starts each
/// worker's container, after removing any container a previous demo in this directory left.
async fn start_worker_containers(
    ctx: &Ctx,
    layout: &DemoLayout,
    originals: &[(ServiceRole, PathBuf)],
) -> anyhow::Result<()> {
    let engine = patchd_docker::Engine::connect_default()
        .await
        .context("--containers runs the workers in the Docker Engine")?;
    remove_containers(ctx, &layout.dir, true).await;
    let original = originals
        .iter()
        .find(|(role, _)| *role == ServiceRole::Worker)
        .map(|(_, path)| path)
        .context("no original worker binary")?;
    let context = containers::context_dir(&layout.dir);
    containers::write_context(&context, original)?;
    let tag = format!("{}:{ORIGINAL_VERSION}", containers::IMAGE_REPOSITORY);
    progress(
        ctx,
        &format!(
            "building image {tag} from {} (Docker Engine on {})",
            context.display(),
            engine.socket().display()
        ),
    );
    let context_tar = patchd_docker::context::directory_context(&context)?;
    engine.build_image(&tag, context_tar).await?;
    for host in &layout.hosts {
        for service in host
            .services
            .iter()
            .filter(|service| service.role == ServiceRole::Worker)
        {
            let name = containers::container_name(&layout.dir, host, service);
            // The worker's arguments as the process backend runs them, without the binary (the entrypoint).
            let args = render::service_command(layout, service)
                .into_iter()
                .skip(1)
                .collect();
            let body = containers::worker_container(&layout.dir, host, &tag, args);
            engine.run_container(&name, body).await?;
            progress(
                ctx,
                &format!("started container {name} ({})", service.addr()),
            );
        }
    }
    Ok(())
}

/// Writes one host's certificates, config and deployed binaries; its old state is removed (a fresh demo).
/// With `containers`, the workers' files are in their image: only their data directory is made.
pub(super) fn prepare_host(
    layout: &DemoLayout,
    host: &DemoHost,
    controller_tls: &Path,
    originals: &[(ServiceRole, PathBuf)],
    containers: bool,
) -> anyhow::Result<()> {
    for stale in [host.state_dir(), host.deploy_root()] {
        if stale.exists() {
            std::fs::remove_dir_all(&stale)
                .with_context(|| format!("cannot clear {}", stale.display()))?;
        }
    }
    let tls_dir = host.tls_dir();
    for dir in [
        &tls_dir,
        &host.state_dir(),
        &host.deploy_root(),
        &layout.logs_dir(),
    ] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let ca = patchd_tls::CertificateAuthority::load(controller_tls)
        .with_context(|| format!("cannot load the CA in {}", controller_tls.display()))?;
    let spec = patchd_tls::CertSpec::new(
        format!("agent-{}", host.index),
        patchd_tls::Role::Agent,
        vec![host.ip.clone()],
        365,
    );
    ca.issue(&spec)?.write(&tls_dir, host.cert_name())?;
    std::fs::copy(controller_tls.join("ca.crt"), tls_dir.join("ca.crt"))
        .with_context(|| format!("cannot copy the CA certificate to {}", tls_dir.display()))?;

    for service in &host.services {
        if containers && service.role == ServiceRole::Worker {
            let data = host.dir.join("container-data");
            std::fs::create_dir_all(&data)
                .with_context(|| format!("cannot create {}", data.display()))?;
            continue;
        }
        let binary = service.binary();
        let bin_dir = binary
            .parent()
            .context("deployed binary has no directory")?;
        std::fs::create_dir_all(bin_dir)
            .with_context(|| format!("cannot create {}", bin_dir.display()))?;
        let original = originals
            .iter()
            .find(|(role, _)| *role == service.role)
            .map(|(_, path)| path)
            .context("no original binary for the role")?;
        std::fs::copy(original, &binary).with_context(|| {
            format!(
                "cannot deploy {} to {}",
                original.display(),
                binary.display()
            )
        })?;
    }
    let config = render::agent_config(layout, host, containers)?;
    std::fs::write(host.config_path(), config)
        .with_context(|| format!("cannot write {}", host.config_path().display()))?;
    Ok(())
}

/// Starts `patchd run` for one host, detached from this process (own process group, output to its log).
pub(super) fn start_agent(
    layout: &DemoLayout,
    host: &DemoHost,
    patchd: &Path,
) -> anyhow::Result<(Child, AgentRecord)> {
    let log_path = layout.agent_log(host);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut command = std::process::Command::new(patchd);
    command
        .arg("run")
        .arg("--config")
        .arg(host.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    if std::env::var_os("PATCHD_LOG").is_none() {
        command.env("PATCHD_LOG", "info");
    }
    // Own process group: Ctrl-C in this terminal does not reach the agents; `demo down` stops them by pid.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", patchd.display()))?;
    let process = ProcessIdentity::of(child.id()).with_context(|| {
        format!(
            "agent {} exited at once; see {}",
            host.index,
            log_path.display()
        )
    })?;
    let record = AgentRecord {
        index: host.index,
        addr: host.agent_addr(),
        process,
        config: host.config_path(),
        state_dir: host.state_dir(),
        log: log_path,
    };
    Ok((child, record))
}

/// Last lines of a log file, for error messages.
pub(super) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n    ")
}

pub(super) async fn wait_until_ready(
    ctx: &Ctx,
    layout: &DemoLayout,
    tls_dir: &Path,
    children: &mut [Child],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let tls = ControllerTls::load_dir(tls_dir)?;
    progress(ctx, "waiting for the agents to answer (mutual TLS)");
    let mut pending: Vec<usize> = (0..layout.hosts.len()).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for &i in &pending {
            let host = &layout.hosts[i];
            if let Ok(Some(status)) = children[i].try_wait() {
                bail!(
                    "agent {} ({}) exited ({status}) while starting; its log {}:\n    {}",
                    host.index,
                    host.agent_addr(),
                    layout.agent_log(host).display(),
                    log_tail(&layout.agent_log(host), 15)
                );
            }
            let answered = match AgentClient::connect(&host.agent_addr(), &tls).await {
                Ok(mut client) => client.info().await.is_ok(),
                Err(_) => false,
            };
            if !answered {
                still.push(i);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let which: Vec<String> = pending
                .iter()
                .map(|&i| layout.hosts[i].agent_addr())
                .collect();
            bail!(
                "agents {} did not answer within {}; see their logs in {}",
                which.join(", "),
                humantime::format_duration(timeout),
                layout.logs_dir().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    progress(ctx, "waiting for the services to be healthy");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let services: Vec<&DemoService> = layout.services().collect();
    let mut pending: Vec<&DemoService> = services.clone();
    while !pending.is_empty() {
        let checks = pending.iter().map(|service| {
            let http = http.clone();
            async move {
                let healthy = http
                    .get(format!("{}/health", service.url()))
                    .send()
                    .await
                    .is_ok_and(|response| response.status().is_success());
                (*service, healthy)
            }
        });
        pending = futures::future::join_all(checks)
            .await
            .into_iter()
            .filter_map(|(service, healthy)| (!healthy).then_some(service))
            .collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let which: Vec<String> = pending
                .iter()
                .map(|s| {
                    let host = layout.hosts.iter().find(|h| h.ip == s.host);
                    let log = host.map(|h| {
                        h.state_dir()
                            .join("logs")
                            .join(format!("{}.log", s.role.component()))
                    });
                    format!(
                        "{} at {} (log {})",
                        s.name,
                        s.addr(),
                        log.map(|l| l.display().to_string()).unwrap_or_default()
                    )
                })
                .collect();
            bail!(
                "services not healthy within {}:\n  {}",
                humantime::format_duration(timeout),
                which.join("\n  ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    progress(ctx, "waiting for the workers to register with the masters");
    let workers: Vec<&str> = layout
        .services_of(ServiceRole::Worker)
        .map(|s| s.name.as_str())
        .collect();
    let Some(master) = layout.services_of(ServiceRole::Master).next() else {
        return Ok(());
    };
    loop {
        let members: Option<Vec<serde_json::Value>> = match http
            .get(format!("{}/api/members", master.url()))
            .send()
            .await
        {
            Ok(response) => response.json().await.ok(),
            Err(_) => None,
        };
        let registered = members.is_some_and(|members| {
            workers.iter().all(|name| {
                members
                    .iter()
                    .any(|m| m["name"] == *name && m["state"] != "Down" && m["state"] != "Offline")
            })
        });
        if registered {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the workers did not all register with the masters within {}",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(super) fn print_up_summary(
    ctx: &Ctx,
    layout: &DemoLayout,
    bins: &DemoBinaries,
    dir_flag: &str,
    containers: bool,
    took: Duration,
) {
    let worker_package = layout.original_package(ServiceRole::Worker);
    let container_names: Vec<String> = if containers {
        layout
            .hosts
            .iter()
            .flat_map(|host| {
                host.services
                    .iter()
                    .filter(|service| service.role == ServiceRole::Worker)
                    .map(|service| containers::container_name(&layout.dir, host, service))
            })
            .collect()
    } else {
        Vec::new()
    };
    let hotfix_binary = layout.dir.join("hotfix").join("demo-worker");
    let hotfix_package = layout
        .packages_dir()
        .join("demo-worker-v1.0.1-hotfix.tar.gz");
    let masters = master_count(layout.hosts.len());
    match ctx.format {
        Format::Json => {
            let services: Vec<_> = layout
                .services()
                .map(|s| json!({"name": s.name, "role": s.role.component(), "addr": s.addr(), "deploy_dir": s.deploy_dir}))
                .collect();
            let agents: Vec<_> = layout.hosts.iter().map(|h| h.agent_addr()).collect();
            outln!(
                "{}",
                json!({
                    "cluster": CLUSTER_NAME, "dir": layout.dir, "agents": agents, "services": services,
                    "topology": layout.topology_path(), "packages": {
                        "demo-master": layout.original_package(ServiceRole::Master),
                        "demo-worker": worker_package,
                    },
                    "seconds": took.as_secs_f64(),
                    "containers": container_names,
                })
            );
        }
        Format::Text => {
            let count = layout.hosts.len();
            let first_ip = layout
                .hosts
                .first()
                .map(|h| h.ip.as_str())
                .unwrap_or_default();
            let last_ip = layout
                .hosts
                .last()
                .map(|h| h.ip.as_str())
                .unwrap_or_default();
            outln!(
                "demo cluster `{CLUSTER_NAME}` is up in {:.1}s: {count} agents on {first_ip}..{last_ip}, {masters} \
                 master(s) and {} workers running {ORIGINAL_VERSION}",
                took.as_secs_f64(),
                count - masters
            );
            for host in &layout.hosts {
                for service in &host.services {
                    let place = if containers && service.role == ServiceRole::Worker {
                        format!(
                            "container {}",
                            containers::container_name(&layout.dir, host, service)
                        )
                    } else {
                        service.deploy_dir.display().to_string()
                    };
                    outln!("  {:<10} {:<16} {place}", service.name, service.addr());
                }
            }
            outln!(
                "files: {} (topology.yaml, packages/, logs/)",
                layout.dir.display()
            );
            outln!();
            outln!("next:");
            outln!("  patchctl display {CLUSTER_NAME}");
            if containers {
                let context = containers::context_dir(&layout.dir);
                let image_package = layout
                    .packages_dir()
                    .join("demo-worker-v1.0.1-hotfix-image.tar.gz");
                outln!(
                    "  docker ps --filter label={}={}",
                    containers::DEMO_LABEL,
                    layout.dir.display()
                );
                outln!(
                    "  # build a hotfix image of the worker and roll it out, container by container, through the master's API:"
                );
                outln!(
                    "  {} stamp --version v1.0.1-hotfix -o {}",
                    bins.worker.display(),
                    context.join("rootfs").join("demo-worker").display()
                );
                outln!(
                    "  docker build -t {}:v1.0.1-hotfix {}",
                    containers::IMAGE_REPOSITORY,
                    context.display()
                );
                outln!(
                    "  patchctl package build --image {}:v1.0.1-hotfix -o {}",
                    containers::IMAGE_REPOSITORY,
                    image_package.display()
                );
                outln!(
                    "  patchctl patch {CLUSTER_NAME} {} -R demo-worker",
                    image_package.display()
                );
                outln!("  patchctl display {CLUSTER_NAME}");
                outln!("  patchctl demo down{dir_flag}");
                return;
            }
            outln!(
                "  # build a hotfix of the worker and roll it out, worker by worker, through the master's API:"
            );
            outln!(
                "  {} stamp --version v1.0.1-hotfix -o {}",
                bins.worker.display(),
                hotfix_binary.display()
            );
            outln!(
                "  patchctl package build --base {} --replace demo-worker/demo-worker={} --version v1.0.1-hotfix -o {}",
                worker_package.display(),
                hotfix_binary.display(),
                hotfix_package.display()
            );
            outln!(
                "  patchctl patch {CLUSTER_NAME} {} -R demo-worker",
                hotfix_package.display()
            );
            outln!("  patchctl display {CLUSTER_NAME}");
            outln!("  patchctl demo down{dir_flag}");
        }
    }
}
