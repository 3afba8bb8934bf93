//! Harness additions for the apply tests and `bench_apply`: a blocking mutual-TLS client for the apply RPCs
//! (Stage, Apply, Rollback, Status), demo-worker variants (stamped binaries) packed as patchd packages, a
//! demo-worker service run by the agent's `process` backend, and cleanup of the service processes the agent
//! started (they outlive the agent by design, so a test must kill them itself).

use crate::{AgentConfig, AgentProcess, Pki, bin, patchctl_ok, sha256_file, toml_string};
/// The wire types, for callers without their own `patchd-proto` dependency (the bench).
pub use patchd_proto::v1;
use patchd_proto::v1::agent_client::AgentClient;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How long one RPC may take (an apply includes probation; the machine is busy).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// A blocking client of one agent's apply RPCs, over mutual TLS with the PKI's controller identity.
///
/// All sockets are created on the calling thread (a current-thread runtime), so a thread that entered another
/// network namespace reaches agents inside it.
pub struct AgentRpc {
    runtime: tokio::runtime::Runtime,
    client: AgentClient<Channel>,
}

impl AgentRpc {
    /// Connects to `addr`, verifying that the agent certificate names `addr`'s IP.
    pub fn connect(pki: &Pki, addr: SocketAddr) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"));
        let controller = pki.controller();
        let tls = patchd_tls::TlsMaterial::load(&patchd_tls::TlsFiles {
            ca: controller.ca,
            cert: controller.cert,
            key: controller.key,
        })
        .unwrap_or_else(|e| panic!("cannot load the controller identity: {e}"));
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap_or_else(|e| panic!("bad endpoint {addr}: {e}"))
            .tls_config(tls.client_config(&addr.ip().to_string()))
            .unwrap_or_else(|e| panic!("bad TLS config: {e}"))
            .timeout(RPC_TIMEOUT)
            .connect_timeout(Duration::from_secs(20));
        let channel = runtime
            .block_on(endpoint.connect())
            .unwrap_or_else(|e| panic!("cannot connect to the agent at {addr}: {e:?}"));
        let client =
            AgentClient::new(channel).max_decoding_message_size(patchd_proto::MAX_MESSAGE_BYTES);
        Self { runtime, client }
    }

    /// Uploads `package` as a patchctl older than tree digest version 2 does ([`version_1_upload`], 1 MiB chunks).
    /// Returns its version-1 digest.
    pub fn upload_as_version_1(&mut self, package: &Path) -> String {
        let data = std::fs::read(package)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", package.display()));
        let (digest, messages) =
            version_1_upload(&data, patchd_package::digest::DEFAULT_CHUNK_SIZE);
        let reply = self
            .runtime
            .block_on(self.client.upload(futures::stream::iter(messages)))
            .unwrap_or_else(|e| panic!("version-1 upload of {} refused: {e:?}", package.display()))
            .into_inner();
        assert!(reply.complete, "{reply:?}");
        digest
    }

    pub fn stage(
        &mut self,
        service: &str,
        digest: &str,
    ) -> Result<v1::StageResponse, tonic::Status> {
        self.stage_signed(service, digest, Vec::new())
    }

    /// Stage with the texts of minisign signature files.
    pub fn stage_signed(
        &mut self,
        service: &str,
        digest: &str,
        signatures: Vec<String>,
    ) -> Result<v1::StageResponse, tonic::Status> {
        let request = v1::StageRequest {
            service: service.into(),
            digest: digest.into(),
            signatures,
        };
        let client = &mut self.client;
        self.runtime
            .block_on(client.stage(request))
            .map(tonic::Response::into_inner)
    }

    pub fn apply(
        &mut self,
        service: &str,
        digest: &str,
        patch_id: &str,
        offline: bool,
    ) -> Result<v1::ApplyResponse, tonic::Status> {
        self.apply_with(service, digest, patch_id, offline, None, Vec::new())
    }

    /// [`Self::apply`] carrying a lease ticket `(rollout id, holder)`.
    pub fn apply_leased(
        &mut self,
        service: &str,
        digest: &str,
        patch_id: &str,
        offline: bool,
        lease: Option<(&str, &str)>,
    ) -> Result<v1::ApplyResponse, tonic::Status> {
        self.apply_with(service, digest, patch_id, offline, lease, Vec::new())
    }

    /// Apply with the texts of minisign signature files.
    pub fn apply_signed(
        &mut self,
        service: &str,
        digest: &str,
        patch_id: &str,
        offline: bool,
        signatures: Vec<String>,
    ) -> Result<v1::ApplyResponse, tonic::Status> {
        self.apply_with(service, digest, patch_id, offline, None, signatures)
    }

    /// Apply with an optional lease ticket `(rollout id, holder)` and signature texts.
    pub fn apply_with(
        &mut self,
        service: &str,
        digest: &str,
        patch_id: &str,
        offline: bool,
        lease: Option<(&str, &str)>,
        signatures: Vec<String>,
    ) -> Result<v1::ApplyResponse, tonic::Status> {
        let request = v1::ApplyRequest {
            service: service.into(),
            digest: digest.into(),
            patch_id: patch_id.into(),
            offline,
            lease: lease.map(|(rollout_id, holder)| v1::LeaseTicket {
                rollout_id: rollout_id.into(),
                holder: holder.into(),
            }),
            signatures,
            env_add: Default::default(),
        };
        let client = &mut self.client;
        self.runtime
            .block_on(client.apply(request))
            .map(tonic::Response::into_inner)
    }

    /// Any ApplyRequest as it is (e.g. with `env_add`).
    pub fn apply_request(
        &mut self,
        request: v1::ApplyRequest,
    ) -> Result<v1::ApplyResponse, tonic::Status> {
        let client = &mut self.client;
        self.runtime
            .block_on(client.apply(request))
            .map(tonic::Response::into_inner)
    }

    /// One UpgradeStep call.
    pub fn upgrade_step(
        &mut self,
        request: v1::UpgradeStepRequest,
    ) -> Result<v1::UpgradeStepResponse, tonic::Status> {
        let client = &mut self.client;
        self.runtime
            .block_on(client.upgrade_step(request))
            .map(tonic::Response::into_inner)
    }

    pub fn rollback(
        &mut self,
        service: &str,
        to_patch_id: &str,
        patch_id: &str,
    ) -> Result<v1::ApplyResponse, tonic::Status> {
        let request = v1::RollbackRequest {
            service: service.into(),
            to_patch_id: to_patch_id.into(),
            patch_id: patch_id.into(),
            lease: None,
        };
        let client = &mut self.client;
        self.runtime
            .block_on(client.rollback(request))
            .map(tonic::Response::into_inner)
    }

    /// `Lease` of `service` for the ticket `(rollout id, holder)`: acquire (`ttl_ms`) or release.
    pub fn lease(
        &mut self,
        service: &str,
        action: v1::LeaseAction,
        ticket: (&str, &str),
        ttl_ms: u64,
    ) -> Result<v1::LeaseResponse, tonic::Status> {
        let request = v1::LeaseRequest {
            service: service.into(),
            ticket: Some(v1::LeaseTicket {
                rollout_id: ticket.0.into(),
                holder: ticket.1.into(),
            }),
            action: action.into(),
            ttl_ms,
        };
        let client = &mut self.client;
        self.runtime
            .block_on(client.lease(request))
            .map(tonic::Response::into_inner)
    }

    /// Status of one service; panics when the call fails.
    pub fn status(&mut self, service: &str) -> v1::ServiceStatus {
        let request = v1::StatusRequest {
            service: service.into(),
        };
        let client = &mut self.client;
        let response = self
            .runtime
            .block_on(client.status(request))
            .unwrap_or_else(|e| panic!("Status({service}) failed: {e}"))
            .into_inner();
        response
            .services
            .into_iter()
            .find(|s| s.name == service)
            .unwrap_or_else(|| panic!("no status for {service}"))
    }
}

/// The outcome of an apply response, as the enum.
pub fn outcome(response: &v1::ApplyResponse) -> v1::ApplyOutcome {
    v1::ApplyOutcome::try_from(response.outcome).unwrap_or(v1::ApplyOutcome::Unspecified)
}

/// The Upload messages a patchctl older than tree digest version 2 sends for `data`: no `tree_version` (0), a
/// version-1 (sha256) digest, sha256 chunk hashes. Returns that digest and the messages.
pub fn version_1_upload(data: &[u8], chunk_size: u32) -> (String, Vec<v1::UploadMessage>) {
    use patchd_package::digest::TreeVersion;
    use v1::upload_message::Kind;
    let digest = TreeVersion::V1
        .tree_digest_reader(data, chunk_size, data.len() as u64)
        .unwrap_or_else(|e| panic!("cannot hash {} bytes: {e}", data.len()));
    let header = v1::UploadMessage {
        kind: Some(Kind::Header(v1::UploadHeader {
            blob: Some(v1::BlobRef {
                digest: digest.clone(),
                total_size: data.len() as u64,
                chunk_size,
                tree_version: 0,
            }),
        })),
    };
    let chunks = data
        .chunks(chunk_size as usize)
        .enumerate()
        .map(|(index, bytes)| v1::UploadMessage {
            kind: Some(Kind::Chunk(v1::UploadChunk {
                index: index as u64,
                offset: index as u64 * u64::from(chunk_size),
                data: bytes::Bytes::copy_from_slice(bytes),
                hash: bytes::Bytes::copy_from_slice(&TreeVersion::V1.chunk_hash(bytes)),
            })),
        });
    (digest, std::iter::once(header).chain(chunks).collect())
}

/// `package` as a patchctl before manifest format 2 built it, written to `out`: the same entries in the same
/// order, with a format-1 manifest (each file's sha256 under `sha256`).
pub fn as_format_1(package: &Path, out: &Path) {
    use std::io::Read;
    let file = std::fs::File::open(package)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", package.display()));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut entries: Vec<(tar::Header, Vec<u8>)> = Vec::new();
    for entry in archive.entries().expect("readable archive") {
        let mut entry = entry.expect("readable entry");
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("readable entry data");
        entries.push((entry.header().clone(), data));
    }
    let contents: std::collections::HashMap<String, Vec<u8>> = entries
        .iter()
        .filter_map(|(header, data)| {
            let path = header.path().ok()?.to_string_lossy().into_owned();
            Some((path, data.clone()))
        })
        .collect();
    let writer = std::fs::File::create(out)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", out.display()));
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        writer,
        flate2::Compression::fast(),
    ));
    for (mut header, data) in entries {
        let is_manifest = header
            .path()
            .is_ok_and(|p| p == Path::new(patchd_package::MANIFEST_FILE));
        let data = if is_manifest {
            let mut manifest: serde_json::Value =
                serde_json::from_slice(&data).expect("manifest JSON");
            manifest["format"] = 1.into();
            for file in manifest["files"].as_array_mut().expect("files") {
                let path = file["path"].as_str().expect("path").to_owned();
                let object = file.as_object_mut().expect("file object");
                object.remove("digest");
                let sha256 = ring::digest::digest(&ring::digest::SHA256, &contents[&path]);
                object.insert("sha256".into(), hex::encode(sha256.as_ref()).into());
            }
            let json = serde_json::to_vec_pretty(&manifest).expect("manifest JSON");
            header.set_size(json.len() as u64);
            header.set_cksum();
            json
        } else {
            data
        };
        builder
            .append(&header, data.as_slice())
            .expect("archive entry");
    }
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

/// Pushes `package` to the agent at `addr` with `patchctl agent push` and returns its tree digest.
pub fn push(pki: &Pki, addr: &str, package: &Path) -> String {
    patchctl_ok(
        pki.home(),
        &["agent", "push", addr, &package.to_string_lossy()],
    );
    digest_of(package)
}

/// The tree digest (default chunk size) that names `package`.
pub fn digest_of(package: &Path) -> String {
    patchd_package::digest::tree_digest_file(package, patchd_package::digest::DEFAULT_CHUNK_SIZE)
        .unwrap_or_else(|e| panic!("cannot hash {}: {e}", package.display()))
}

/// A stamped copy of `demo-worker` at `out`: `mode` is ok, crash, fail-health or slow-start.
pub fn stamp_worker(out: &Path, version: &str, mode: &str, delay_ms: u64) {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    }
    let output = Command::new(bin("demo-worker"))
        .args([
            "stamp",
            "--version",
            version,
            "--mode",
            mode,
            "--delay-ms",
            &delay_ms.to_string(),
            "-o",
        ])
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run demo-worker stamp: {e}"));
    assert!(
        output.status.success(),
        "demo-worker stamp failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The content of the config file that travels with each worker version (so a package has two files).
pub fn worker_conf(version: &str) -> String {
    format!(
        "# demo-worker settings\nversion = {}\n",
        toml_string(version)
    )
}

/// A patchd package of a demo-worker variant: `demo-worker/demo-worker` (stamped) and
/// `demo-worker/conf/worker.toml`, built in `<dir>/<version>/`; returns the `.tar.gz`.
pub fn worker_package(dir: &Path, version: &str, mode: &str) -> PathBuf {
    worker_package_delayed(dir, version, mode, 0)
}

/// [`worker_package`] with a start delay (`mode` `slow-start`).
pub fn worker_package_delayed(dir: &Path, version: &str, mode: &str, delay_ms: u64) -> PathBuf {
    let root = dir.join(version).join("demo-worker");
    stamp_worker(&root.join("demo-worker"), version, mode, delay_ms);
    let conf = root.join("conf/worker.toml");
    std::fs::create_dir_all(conf.parent().unwrap_or(dir))
        .unwrap_or_else(|e| panic!("cannot create conf dir: {e}"));
    std::fs::write(&conf, worker_conf(version))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
    let out = dir.join(format!("demo-worker-{version}.tar.gz"));
    patchd_package::pack_dir(&root, version, &out)
        .unwrap_or_else(|e| panic!("cannot pack {version}: {e}"));
    out
}

/// A free loopback port (bound and released: fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}

/// `GET http://<addr><path>` with plain std sockets; `None` when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let socket: SocketAddr = addr.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&socket, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A demo-worker deployed under a deploy root and run by the agent's `process` backend.
#[derive(Debug, Clone)]
pub struct WorkerService {
    pub name: String,
    pub deploy_dir: PathBuf,
    /// `127.0.0.1:<port>` the worker serves on.
    pub listen: String,
}

impl WorkerService {
    /// A service `name` in `<deploy_root>/<name>` serving on a free loopback port.
    pub fn new(deploy_root: &Path, name: &str) -> Self {
        Self {
            name: name.to_string(),
            deploy_dir: deploy_root.join(name),
            listen: format!("127.0.0.1:{}", free_port()),
        }
    }

    /// The deployed main binary.
    pub fn binary(&self) -> PathBuf {
        self.deploy_dir.join("bin/demo-worker/demo-worker")
    }

    /// The deployed config file.
    pub fn conf(&self) -> PathBuf {
        self.deploy_dir.join("bin/demo-worker/conf/worker.toml")
    }

    /// Deploys the original version (what tiup would have installed): a stamped binary and its config file.
    pub fn install(&self, version: &str) {
        stamp_worker(&self.binary(), version, "ok", 0);
        let conf = self.conf();
        std::fs::create_dir_all(conf.parent().unwrap_or(&self.deploy_dir))
            .unwrap_or_else(|e| panic!("cannot create conf dir: {e}"));
        std::fs::write(&conf, worker_conf(version))
            .unwrap_or_else(|e| panic!("cannot write conf: {e}"));
    }

    /// The `[[service]]` section for this worker, run as root.
    pub fn toml(&self, min_healthy: &str, timeout: &str) -> String {
        self.toml_as("root", min_healthy, timeout)
    }

    /// The `[[service]]` section for this worker, run as `user`.
    pub fn toml_as(&self, user: &str, min_healthy: &str, timeout: &str) -> String {
        format!(
            "[[service]]\nname = {name}\ncomponent = \"demo-worker\"\ndeploy_dir = {dir}\nbackend = \"process\"\n\
             command = [\"{{deploy_dir}}/bin/demo-worker/demo-worker\", \"serve\", \"--listen\", {listen}, \"--name\", {name}]\n\
             user = {user}\nrestart_on_crash = true\nstop_timeout = \"5s\"\n\n[service.health]\nmin_healthy = {min}\n\
             http = {http}\ntimeout = {timeout}\n",
            name = toml_string(&self.name),
            user = toml_string(user),
            dir = toml_string(&self.deploy_dir.to_string_lossy()),
            listen = toml_string(&self.listen),
            min = toml_string(min_healthy),
            http = toml_string(&format!("http://{}/health", self.listen)),
            timeout = toml_string(timeout),
        )
    }

    /// The version label the running worker reports on `/version`, `None` when it does not answer.
    pub fn served_version(&self) -> Option<String> {
        let (status, body) = http_get(&self.listen, "/version")?;
        if status != 200 {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(&body).ok()?;
        value.get("version")?.as_str().map(str::to_string)
    }

    /// Waits until the worker serves `version`.
    pub fn wait_serving(&self, version: &str) {
        let mut last = None;
        crate::wait_for(
            Duration::from_secs(30),
            &format!("{} to serve {version}", self.name),
            || {
                last = self.served_version();
                last.as_deref() == Some(version)
            },
        );
    }

    /// sha256 of the deployed binary and config file.
    pub fn file_hashes(&self) -> (String, String) {
        (sha256_file(&self.binary()), sha256_file(&self.conf()))
    }
}

/// sha256 of the binary and config file a package built by [`worker_package`] deploys.
pub fn package_hashes(dir: &Path, version: &str) -> (String, String) {
    let root = dir.join(version).join("demo-worker");
    (
        sha256_file(&root.join("demo-worker")),
        sha256_file(&root.join("conf/worker.toml")),
    )
}

/// The pid recorded by the process backend for `service`, if any.
pub fn service_pid(state_dir: &Path, service: &str) -> Option<i32> {
    let text =
        std::fs::read_to_string(state_dir.join("run").join(format!("{service}.pid"))).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value
        .get("pid")?
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
}

/// Whether a pid is alive and not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    u32::try_from(pid).is_ok_and(patchd_procstat::is_running)
}

/// Start time of a process (field 22 of /proc/<pid>/stat): with the pid, it names one process since boot.
pub fn proc_start_ticks(pid: i32) -> Option<u64> {
    patchd_procstat::start_ticks(u32::try_from(pid).ok()?)
}

/// The journal of `service` as JSON.
pub fn journal(state_dir: &Path, service: &str) -> serde_json::Value {
    let path = state_dir.join("journal").join(format!("{service}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("journal {} is not JSON: {e}", path.display()))
}

/// The phase of the journal's current apply (`committed`, `reverted`, …).
pub fn journal_phase(state_dir: &Path, service: &str) -> String {
    journal(state_dir, service)["current"]["phase"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Kills (SIGKILL, whole process group) every service process the agent recorded under `<state>/run` when
/// dropped, and on [`ServiceReaper::reap`]. Service processes outlive the agent on purpose. A process is only
/// killed when its start time still matches the one recorded (never a reused pid).
#[derive(Debug)]
pub struct ServiceReaper {
    state_dir: PathBuf,
    tracked: std::sync::Mutex<Vec<(i32, u64)>>,
}

impl ServiceReaper {
    /// Also makes this test process the subreaper of orphans, so service processes left behind by a killed
    /// agent are reaped here rather than lingering as zombies under an init that does not reap.
    pub fn new(state_dir: &Path) -> Self {
        let _ = nix::sys::prctl::set_child_subreaper(true);
        Self {
            state_dir: state_dir.to_path_buf(),
            tracked: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Remembers the current process of `service` so it is killed even if the pid file changes later.
    pub fn track(&self, service: &str) {
        if let Some(process) = self.recorded(service)
            && let Ok(mut tracked) = self.tracked.lock()
        {
            tracked.push(process);
        }
    }

    /// `(pid, start ticks)` from the process backend's pid file.
    fn recorded(&self, service: &str) -> Option<(i32, u64)> {
        let text =
            std::fs::read_to_string(self.state_dir.join("run").join(format!("{service}.pid")))
                .ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        let pid = value
            .get("pid")?
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())?;
        let ticks = value.get("proc_start_ticks")?.as_u64()?;
        Some((pid, ticks))
    }

    pub fn reap(&self) {
        let mut processes: Vec<(i32, u64)> =
            self.tracked.lock().map(|t| t.clone()).unwrap_or_default();
        if let Ok(listing) = std::fs::read_dir(self.state_dir.join("run")) {
            for entry in listing.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(process) = name
                    .strip_suffix(".pid")
                    .and_then(|service| self.recorded(service))
                {
                    processes.push(process);
                }
            }
        }
        for (pid, ticks) in processes {
            if pid <= 1 || proc_start_ticks(pid) != Some(ticks) {
                continue;
            }
            if pid_alive(pid) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            reap_orphan(pid);
        }
    }
}

/// Collects `pid` if it is an orphan this process adopted (see [`ServiceReaper::new`]) and has exited or exits
/// within 2 s; returns at once when it is not our child. Only this pid: other tests' children are theirs to wait.
fn reap_orphan(pid: i32) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
            Ok(_) | Err(_) => return,
        }
    }
}

impl Drop for ServiceReaper {
    fn drop(&mut self) {
        self.reap();
    }
}

/// One real agent supervising `worker-1` (process backend, installed at v1.0.0 and serving), with its PKI, state
/// dir and a reaper for the service. Fields drop in order, so when a test fails the agent dies first (it could
/// restart the service), then the reaper stops the service, and the directory goes last.
pub struct WorkerRig {
    pub agent: AgentProcess,
    pub reaper: ServiceReaper,
    pub worker: WorkerService,
    pub pki: Pki,
    pub config_path: PathBuf,
    pub state: PathBuf,
    pub dir: tempfile::TempDir,
}

impl WorkerRig {
    /// Starts the agent with a probation of `min_healthy` (e.g. `"500ms"`) and waits until v1.0.0 serves.
    pub fn start(min_healthy: &str) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let pki = Pki::new(dir.path());
        let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
        let agent_dir = dir.path().join("agent-1");
        let worker = WorkerService::new(&agent_dir.join("deploy"), "worker-1");
        worker.install("v1.0.0");
        let config = AgentConfig::new(&agent_dir, &tls).extra(&worker.toml(min_healthy, "8s"));
        let config_path = config.write();
        let state = config.state_path().to_path_buf();
        let reaper = ServiceReaper::new(&state);
        // The agent starts the process service it supervises.
        let agent = AgentProcess::start(&config_path);
        worker.wait_serving("v1.0.0");
        reaper.track("worker-1");
        Self {
            agent,
            reaper,
            worker,
            pki,
            config_path,
            state,
            dir,
        }
    }

    /// Where a test builds its packages.
    pub fn packages(&self) -> PathBuf {
        self.dir.path().join("packages")
    }

    /// Stops the agent, then the service.
    pub fn stop(mut self) {
        self.agent.stop();
        self.reaper.reap();
    }
}
