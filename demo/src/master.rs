//! DEMO ONLY: the demo master: an in-memory member table with fake tasks, leader choice, offline/online, test controls.
//!
//! Leader rule: the alive master with the smallest name among itself and its peers (peers are pinged on `/health`
//! every 500 ms). Followers forward the member API (`GET /api/members[/{name}]`, `POST …/offline|online`) to the
//! leader, so any master answers with the leader's view; a forwarded request is never forwarded again, and when the
//! leader cannot be reached the follower answers 503 naming it. Registrations (heartbeats) go to every master.

use crate::stamp::{Mode, Stamp};
use crate::worker::{Registration, VersionInfo};
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

/// A worker (or peer master) without a heartbeat for longer than this is `Down`.
pub const DOWN_AFTER: Duration = Duration::from_secs(2);
/// How often peers are pinged.
pub const PEER_PING_INTERVAL: Duration = Duration::from_millis(500);
/// Header marking a request forwarded by a follower (never forwarded again).
pub const FORWARDED_HEADER: &str = "x-demo-forwarded";
/// The call log keeps the most recent calls only (a long-running demo must not grow without bound).
pub const MAX_LOGGED_CALLS: usize = 10_000;
/// Header marking a peer's liveness ping (not recorded in the call log).
pub const PEER_HEADER: &str = "x-demo-peer";

/// Another master, as given by `--peer NAME=URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Base URL, e.g. `http://127.0.1.2:8261`.
    pub url: String,
    /// `host:port` of the URL.
    pub addr: String,
}

impl Peer {
    /// Parses `NAME=URL`.
    pub fn parse(text: &str) -> Result<Peer, String> {
        let (name, url) = text.split_once('=').ok_or_else(|| {
            format!("peer `{text}` is not NAME=URL; write e.g. master-2=http://127.0.1.2:8261")
        })?;
        let parsed = reqwest::Url::parse(url).map_err(|e| {
            format!("peer `{text}`: bad URL ({e}); write e.g. master-2=http://127.0.1.2:8261")
        })?;
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("peer `{text}`: the URL has no host"))?;
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| format!("peer `{text}`: the URL has no port"))?;
        if name.is_empty() {
            return Err(format!(
                "peer `{text}` has an empty name; write e.g. master-2=http://127.0.1.2:8261"
            ));
        }
        Ok(Peer {
            name: name.to_string(),
            url: url.trim_end_matches('/').to_string(),
            addr: format!("{host}:{port}"),
        })
    }
}

/// A master's identity and settings.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub name: String,
    pub peers: Vec<Peer>,
    /// Number of fake tasks handed to available workers.
    pub tasks: usize,
    pub stamp: Stamp,
    pub binary_sha256: crate::cli::OwnDigest,
    pub started_unix: u64,
}

/// State of a member as the master reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// A master that answers.
    Healthy,
    /// An available worker without a task.
    Free,
    /// An available worker holding at least one task.
    Bound,
    /// A worker taken offline through the API (gets no work until put online).
    Offline,
    /// No heartbeat (worker) or ping answer (peer master) for more than 2 s.
    Down,
}

/// One row of `GET /api/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub role: String,
    pub addr: String,
    pub state: MemberState,
    pub version: Option<String>,
    /// Milliseconds since the last heartbeat (workers) or successful ping (peers); 0 for the answering master.
    pub last_seen_ms: Option<u64>,
    /// Fake task ids held by this worker.
    #[serde(default)]
    pub tasks: Vec<usize>,
}

/// Answer of `GET /api/leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub leader: String,
    pub addr: String,
}

/// Test control: how `POST /api/members/{name}/offline` behaves (`POST /api/_test/drain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainMode {
    /// Offline at once.
    #[default]
    Normal,
    /// Answer 503, change nothing.
    Refuse,
    /// Answer 200 but never reach `Offline`.
    Never,
    /// Answer 200 and reach `Offline` after `delay_ms`.
    Delay,
}

/// Body of `POST /api/_test/drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DrainBehaviour {
    pub mode: DrainMode,
    #[serde(default)]
    pub delay_ms: u64,
}

/// One entry of the call log (`GET /api/_test/calls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub method: String,
    pub path: String,
    pub member: Option<String>,
}

#[derive(Debug)]
struct Worker {
    addr: String,
    version: Option<String>,
    last_seen: Instant,
    offline: bool,
    /// `delay` drain mode: becomes offline at this instant.
    offline_at: Option<Instant>,
}

impl Worker {
    fn is_down(&self, now: Instant) -> bool {
        now.duration_since(self.last_seen) > DOWN_AFTER
    }

    fn is_available(&self, now: Instant) -> bool {
        !self.offline && !self.is_down(now)
    }
}

#[derive(Debug, Default)]
struct Table {
    workers: BTreeMap<String, Worker>,
    /// Last successful ping per peer name.
    peer_seen: HashMap<String, Instant>,
    /// Task id → worker holding it.
    tasks: Vec<Option<String>>,
    drain: DrainBehaviour,
    calls: Vec<Call>,
}

impl Table {
    /// Applies delayed offlines and hands tasks held by unavailable workers (or by nobody) to available ones.
    fn refresh(&mut self, now: Instant) {
        for worker in self.workers.values_mut() {
            if worker.offline_at.is_some_and(|at| at <= now) {
                worker.offline = true;
                worker.offline_at = None;
            }
        }
        let available: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.is_available(now))
            .map(|(name, _)| name.clone())
            .collect();
        if available.is_empty() {
            for task in &mut self.tasks {
                *task = None;
            }
            return;
        }
        for task in 0..self.tasks.len() {
            let holder_ok = self.tasks[task]
                .as_ref()
                .is_some_and(|name| available.contains(name));
            if !holder_ok {
                self.tasks[task] = self.least_loaded(&available).map(|(_, name)| name);
            }
        }
        // Spread the tasks: move one from the busiest to the idlest worker while they differ by two or more,
        // so a worker that joins or comes back online gets work (3 workers, 2 tasks: 2 Bound, 1 Free).
        while let (Some((least, idle)), Some((most, busy))) =
            (self.least_loaded(&available), self.most_loaded(&available))
        {
            if most < least + 2 {
                break;
            }
            if let Some(task) = self
                .tasks
                .iter_mut()
                .rev()
                .find(|t| t.as_deref() == Some(busy.as_str()))
            {
                *task = Some(idle);
            }
        }
    }

    fn load(&self, name: &str) -> usize {
        self.tasks
            .iter()
            .filter(|t| t.as_deref() == Some(name))
            .count()
    }

    /// The available worker with the fewest tasks (first by name on ties).
    fn least_loaded(&self, available: &[String]) -> Option<(usize, String)> {
        available
            .iter()
            .map(|name| (self.load(name), name.clone()))
            .min()
    }

    /// The available worker with the most tasks (first by name on ties).
    fn most_loaded(&self, available: &[String]) -> Option<(usize, String)> {
        available
            .iter()
            .map(|name| (self.load(name), name.clone()))
            .min_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)))
    }

    fn tasks_of(&self, name: &str) -> Vec<usize> {
        self.tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.as_deref() == Some(name))
            .map(|(i, _)| i)
            .collect()
    }

    fn worker_member(&self, name: &str, worker: &Worker, now: Instant) -> Member {
        let tasks = self.tasks_of(name);
        let state = if worker.offline {
            MemberState::Offline
        } else if worker.is_down(now) {
            MemberState::Down
        } else if tasks.is_empty() {
            MemberState::Free
        } else {
            MemberState::Bound
        };
        Member {
            name: name.to_string(),
            role: "worker".to_string(),
            addr: worker.addr.clone(),
            state,
            version: worker.version.clone(),
            last_seen_ms: Some(millis(now.duration_since(worker.last_seen))),
            tasks,
        }
    }
}

/// The shared state behind a master's HTTP API.
#[derive(Debug)]
struct Master {
    config: MasterConfig,
    self_addr: String,
    client: reqwest::Client,
    table: Mutex<Table>,
}

impl Master {
    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-updated in a way that matters for a demo.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn peer_alive(&self, table: &Table, peer: &Peer, now: Instant) -> bool {
        table
            .peer_seen
            .get(&peer.name)
            .is_some_and(|seen| now.duration_since(*seen) <= DOWN_AFTER)
    }

    fn leader(&self) -> LeaderInfo {
        let now = Instant::now();
        let table = self.table();
        let mut leader = LeaderInfo {
            leader: self.config.name.clone(),
            addr: self.self_addr.clone(),
        };
        for peer in &self.config.peers {
            if peer.name < leader.leader && self.peer_alive(&table, peer, now) {
                leader = LeaderInfo {
                    leader: peer.name.clone(),
                    addr: peer.addr.clone(),
                };
            }
        }
        leader
    }

    fn members(&self) -> Vec<Member> {
        let now = Instant::now();
        let mut table = self.table();
        table.refresh(now);
        let mut members = vec![Member {
            name: self.config.name.clone(),
            role: "master".to_string(),
            addr: self.self_addr.clone(),
            state: MemberState::Healthy,
            version: Some(self.config.stamp.version.clone()),
            last_seen_ms: Some(0),
            tasks: Vec::new(),
        }];
        for peer in &self.config.peers {
            let seen = table.peer_seen.get(&peer.name);
            members.push(Member {
                name: peer.name.clone(),
                role: "master".to_string(),
                addr: peer.addr.clone(),
                state: if self.peer_alive(&table, peer, now) {
                    MemberState::Healthy
                } else {
                    MemberState::Down
                },
                version: None,
                last_seen_ms: seen.map(|s| millis(now.duration_since(*s))),
                tasks: Vec::new(),
            });
        }
        for (name, worker) in &table.workers {
            members.push(table.worker_member(name, worker, now));
        }
        members
    }

    /// Forwards a member-API request to the leader when this master is not the leader.
    async fn forward_to_leader(
        &self,
        headers: &HeaderMap,
        method: Method,
        uri: &Uri,
    ) -> Option<Response> {
        let leader = self.leader();
        if leader.leader == self.config.name || headers.contains_key(FORWARDED_HEADER) {
            return None;
        }
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let url = format!("http://{}{}", leader.addr, path);
        let sent = self
            .client
            .request(method, &url)
            .header(FORWARDED_HEADER, &self.config.name)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => return Some(leader_unreachable(&leader, &e.to_string())),
        };
        let status = response.status();
        match response.bytes().await {
            Ok(body) => {
                Some((status, [("content-type", "application/json")], body).into_response())
            }
            Err(e) => Some(leader_unreachable(&leader, &e.to_string())),
        }
    }
}

fn leader_unreachable(leader: &LeaderInfo, reason: &str) -> Response {
    let message = format!(
        "this master is a follower and cannot reach the leader {} at {}: {reason}; retry shortly or ask the leader directly",
        leader.leader, leader.addr
    );
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": message, "leader": leader.leader, "addr": leader.addr})),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// Serves the master on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    config: MasterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let self_addr = listener.local_addr()?.to_string();
    // reqwest's rustls backend (on in the workspace for the controller's https hooks) uses the process's crypto
    // provider: ring, as everywhere in patchd (a no-op when one is installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Plain http to the workers: no root store, so the master does not depend on the platform's CA bundle.
    let client = reqwest::Client::builder()
        .tls_certs_only(std::iter::empty())
        .no_proxy()
        .timeout(Duration::from_millis(1500))
        .build()
        .map_err(|e| std::io::Error::other(format!("cannot build an HTTP client: {e}")))?;
    let table = Table {
        tasks: vec![None; config.tasks],
        ..Table::default()
    };
    let master = Arc::new(Master {
        config,
        self_addr,
        client,
        table: Mutex::new(table),
    });
    // One ping round before answering, so a fresh master does not claim leadership over a live peer.
    ping_peers(&master).await;
    let pinger = tokio::spawn(ping_loop(master.clone()));
    let result = axum::serve(listener, router(master))
        .with_graceful_shutdown(shutdown)
        .await;
    pinger.abort();
    result
}

fn router(master: Arc<Master>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/api/leader", get(leader))
        .route("/api/members", get(list_members))
        .route("/api/members/register", post(register))
        .route("/api/members/{name}", get(get_member))
        .route("/api/members/{name}/offline", post(offline))
        .route("/api/members/{name}/online", post(online))
        .route("/api/_test/drain", post(set_drain).get(get_drain))
        .route("/api/_test/calls", get(calls).delete(clear_calls))
        .layer(middleware::from_fn_with_state(master.clone(), record_call))
        .with_state(master)
}

/// Records every API call except heartbeats, peer pings and the call log itself.
async fn record_call(State(master): State<Arc<Master>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let skip = path == "/api/members/register"
        || path.starts_with("/api/_test/")
        || request.headers().contains_key(PEER_HEADER);
    if !skip {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let member = match segments.as_slice() {
            ["api", "members", name, ..] => Some((*name).to_string()),
            _ => None,
        };
        let call = Call {
            at_ms: unix_ms(),
            method: request.method().to_string(),
            path: path.clone(),
            member,
        };
        let mut table = master.table();
        if table.calls.len() >= MAX_LOGGED_CALLS {
            table.calls.drain(..MAX_LOGGED_CALLS / 10);
        }
        table.calls.push(call);
    }
    next.run(request).await
}

async fn ping_loop(master: Arc<Master>) {
    let mut ticker = tokio::time::interval(PEER_PING_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        ping_peers(&master).await;
    }
}

async fn ping_peers(master: &Master) {
    let pings = master.config.peers.iter().map(|peer| async move {
        let answer = master
            .client
            .get(format!("{}/health", peer.url))
            .header(PEER_HEADER, &master.config.name)
            .timeout(Duration::from_millis(400))
            .send()
            .await;
        let alive = answer.is_ok_and(|r| r.status().is_success());
        (peer.name.clone(), alive)
    });
    let results = futures::future::join_all(pings).await;
    let now = Instant::now();
    let mut table = master.table();
    for (name, alive) in results {
        if alive {
            table.peer_seen.insert(name, now);
        }
    }
}

async fn health(State(master): State<Arc<Master>>) -> (StatusCode, &'static str) {
    if master.config.stamp.mode == Mode::FailHealth {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "unhealthy (demo fail-health mode)",
        )
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn version(State(master): State<Arc<Master>>) -> Json<VersionInfo> {
    Json(VersionInfo {
        name: master.config.name.clone(),
        version: master.config.stamp.version.clone(),
        mode: master.config.stamp.mode.as_str().to_string(),
        binary_sha256: master.config.binary_sha256.get().await,
        pid: std::process::id(),
        started_unix: master.config.started_unix,
    })
}

async fn leader(State(master): State<Arc<Master>>) -> Json<LeaderInfo> {
    Json(master.leader())
}

async fn list_members(State(master): State<Arc<Master>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(forwarded) = master.forward_to_leader(&headers, Method::GET, &uri).await {
        return forwarded;
    }
    Json(master.members()).into_response()
}

async fn get_member(
    State(master): State<Arc<Master>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(forwarded) = master.forward_to_leader(&headers, Method::GET, &uri).await {
        return forwarded;
    }
    match master.members().into_iter().find(|m| m.name == name) {
        Some(member) => Json(member).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no member named `{name}`; list them with GET /api/members"),
        ),
    }
}

async fn register(State(master): State<Arc<Master>>, body: Bytes) -> Response {
    let registration: Registration = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad registration ({e}); send {{name, role, addr}}"),
            );
        }
    };
    if registration.role != "worker" {
        return error(
            StatusCode::BAD_REQUEST,
            "only role `worker` registers; masters are given with --peer",
        );
    }
    if registration.name.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "registration has an empty name; give the worker --name",
        );
    }
    let now = Instant::now();
    let mut table = master.table();
    let worker = table
        .workers
        .entry(registration.name.clone())
        .or_insert_with(|| Worker {
            addr: registration.addr.clone(),
            version: None,
            last_seen: now,
            offline: false,
            offline_at: None,
        });
    worker.addr = registration.addr;
    worker.version = registration.version;
    worker.last_seen = now;
    table.refresh(now);
    let Some(worker) = table.workers.get(&registration.name) else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "worker vanished during registration",
        );
    };
    Json(table.worker_member(&registration.name, worker, now)).into_response()
}

async fn offline(
    State(master): State<Arc<Master>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(forwarded) = master.forward_to_leader(&headers, Method::POST, &uri).await {
        return forwarded;
    }
    let now = Instant::now();
    let mut table = master.table();
    table.refresh(now);
    let drain = table.drain;
    let Some(worker) = table.workers.get(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no worker named `{name}`; list members with GET /api/members"),
        );
    };
    if worker.offline {
        return Json(table.worker_member(&name, worker, now)).into_response();
    }
    if drain.mode == DrainMode::Refuse {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining is refused (test drain mode `refuse`)",
        );
    }
    let others_available = table
        .workers
        .iter()
        .any(|(other, w)| *other != name && w.is_available(now));
    if worker.is_available(now) && !others_available {
        return error(
            StatusCode::CONFLICT,
            format!(
                "`{name}` is the last available worker: taking it offline would stop all work; bring another worker online first"
            ),
        );
    }
    if let Some(worker) = table.workers.get_mut(&name) {
        match drain.mode {
            DrainMode::Normal => worker.offline = true,
            // `refuse` answered above; `never` accepts the call and leaves the worker as it is.
            DrainMode::Refuse | DrainMode::Never => {}
            DrainMode::Delay => {
                worker.offline_at = Some(now + Duration::from_millis(drain.delay_ms))
            }
        }
    }
    table.refresh(now);
    match table.workers.get(&name) {
        Some(worker) => Json(table.worker_member(&name, worker, now)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no worker named `{name}`")),
    }
}

async fn online(
    State(master): State<Arc<Master>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(forwarded) = master.forward_to_leader(&headers, Method::POST, &uri).await {
        return forwarded;
    }
    let now = Instant::now();
    let mut table = master.table();
    let Some(worker) = table.workers.get_mut(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no worker named `{name}`; list members with GET /api/members"),
        );
    };
    worker.offline = false;
    worker.offline_at = None;
    table.refresh(now);
    match table.workers.get(&name) {
        Some(worker) => Json(table.worker_member(&name, worker, now)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no worker named `{name}`")),
    }
}

async fn set_drain(State(master): State<Arc<Master>>, body: Bytes) -> Response {
    match serde_json::from_slice::<DrainBehaviour>(&body) {
        Ok(drain) => {
            master.table().drain = drain;
            Json(drain).into_response()
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!(
                "bad drain behaviour ({e}); send {{\"mode\": \"normal|refuse|never|delay\", \"delay_ms\": N}}"
            ),
        ),
    }
}

async fn get_drain(State(master): State<Arc<Master>>) -> Json<DrainBehaviour> {
    Json(master.table().drain)
}

async fn calls(State(master): State<Arc<Master>>) -> Json<Vec<Call>> {
    Json(master.table().calls.clone())
}

async fn clear_calls(State(master): State<Arc<Master>>) -> StatusCode {
    master.table().calls.clear();
    StatusCode::NO_CONTENT
}
