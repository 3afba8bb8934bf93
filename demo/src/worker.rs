//! DEMO ONLY: the demo worker's HTTP service (`/health`, `/version`) and its registration heartbeat to the masters.

use crate::stamp::{Mode, Stamp};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How often a worker registers itself with each master (registration doubles as the heartbeat).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// What `GET /version` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub name: String,
    pub version: String,
    pub mode: String,
    pub binary_sha256: String,
    pub pid: u32,
    pub started_unix: u64,
}

/// Body of `POST /api/members/register` (sent by workers to every master).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub name: String,
    pub role: String,
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A running worker's identity and behaviour.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub name: String,
    pub stamp: Stamp,
    pub binary_sha256: crate::cli::OwnDigest,
    /// Base URLs of the masters to register with (`http://127.0.1.1:8261`); may be empty.
    pub masters: Vec<String>,
    pub started_unix: u64,
}

/// Serves the worker on `listener` and heartbeats to the masters until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?.to_string();
    let config = Arc::new(config);
    let heartbeat = tokio::spawn(heartbeat_loop(config.clone(), addr));
    let app = router(config);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    heartbeat.abort();
    result
}

fn router(config: Arc<WorkerConfig>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version))
        .with_state(config)
}

async fn health(State(config): State<Arc<WorkerConfig>>) -> (StatusCode, &'static str) {
    if config.stamp.mode == Mode::FailHealth {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "unhealthy (demo fail-health mode)",
        )
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn version(State(config): State<Arc<WorkerConfig>>) -> Json<VersionInfo> {
    Json(VersionInfo {
        name: config.name.clone(),
        version: config.stamp.version.clone(),
        mode: config.stamp.mode.as_str().to_string(),
        binary_sha256: config.binary_sha256.get().await,
        pid: std::process::id(),
        started_unix: config.started_unix,
    })
}

/// Registers with every master every [`HEARTBEAT_INTERVAL`]; a master that is down is retried quietly.
async fn heartbeat_loop(config: Arc<WorkerConfig>, addr: String) {
    if config.masters.is_empty() {
        return;
    }
    // reqwest's rustls backend (on in the workspace for the controller's https hooks) uses the process's crypto
    // provider: ring, as everywhere in patchd (a no-op when one is installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Plain http to the masters: no root store, so a worker in a scratch container (no CA bundle) still registers.
    let client = match reqwest::Client::builder()
        .tls_certs_only(std::iter::empty())
        .no_proxy()
        .timeout(Duration::from_millis(1000))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!(
                "demo-worker: cannot build an HTTP client, not registering with masters: {e}"
            );
            return;
        }
    };
    let registration = Registration {
        name: config.name.clone(),
        role: "worker".to_string(),
        addr,
        version: Some(config.stamp.version.clone()),
    };
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let calls = config.masters.iter().map(|master| {
            let url = format!("{}/api/members/register", master.trim_end_matches('/'));
            client.post(url).json(&registration).send()
        });
        // Errors are expected while a master restarts; the next tick retries.
        let _ = futures::future::join_all(calls).await;
    }
}
