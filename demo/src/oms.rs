//! DEMO ONLY: `demo-oms`, a stand-in for an OMS node and its console, made for the upgrade runbook
//! (`examples/oms/`). A node reads its `config.yaml` at start and refuses the key layout its version cannot use
//! (v4.3.1 needs `oms_cm_meta_*`/`oms_rm_meta_*` and no `oms_meta_*`, as the OMS upgrade guide says), then serves
//! `/health` and `/version`. The master serves the console's `ha.config` system parameter and counts its calls.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

/// Where OMS mounts its configuration inside its container.
pub const DEFAULT_CONFIG: &str = "/home/admin/conf/config.yaml";
/// The first version whose configuration splits the meta database keys into CM and RM ones.
pub const SPLIT_META_VERSION: (u32, u32, u32) = (4, 3, 1);
/// The connection settings each meta database prefix needs.
pub const META_FIELDS: [&str; 4] = ["host", "port", "user", "password"];
/// The name of the system parameter the master serves.
pub const HA_PARAM: &str = "ha.config";
/// Its value when the master starts, unless given.
pub const DEFAULT_HA_CONFIG: &str =
    r#"{"enable":true,"perceiveStoreClientCheckpoint":false,"refetchStoreIntervalMin":30}"#;

/// Why a node refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum OmsError {
    #[error("cannot read the configuration {path}: {source}; mount it or pass --config")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration {path} is not a YAML mapping of keys: {detail}")]
    ParseConfig { path: PathBuf, detail: String },
    #[error("`{label}` is not a version like v4.3.1; pass --oms-version vMAJOR.MINOR.PATCH")]
    Version { label: String },
    #[error(
        "OMS {version} refuses to start: {path} still holds {keys}, which {version} no longer reads; copy them to \
         oms_cm_meta_* and oms_rm_meta_* and delete them (the upgrade runbook's config-migrate step does)"
    )]
    OldKeys {
        version: String,
        path: PathBuf,
        keys: String,
    },
    #[error(
        "OMS {version} refuses to start: {path} lacks {keys}; add them (the meta database connection)"
    )]
    MissingKeys {
        version: String,
        path: PathBuf,
        keys: String,
    },
}

/// A node's identity and what its configuration said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub version: String,
    pub config: String,
    /// The `*meta*` keys of the configuration, in file order.
    pub meta_keys: Vec<String>,
    /// `IS_UPGRADE` of the environment (the upgrade's `env_add`), if set.
    pub is_upgrade: Option<String>,
    /// `OMS_HOST_IP` of the environment, if set.
    pub host_ip: Option<String>,
    pub pid: u32,
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub info: NodeInfo,
    /// `/health` answers 503: the demo's broken release.
    pub unhealthy: bool,
}

/// `v4.3.1` → `(4, 3, 1)`.
pub fn parse_version(label: &str) -> Result<(u32, u32, u32), OmsError> {
    let bad = || OmsError::Version {
        label: label.to_string(),
    };
    let mut parts = label.strip_prefix('v').unwrap_or(label).split('.');
    let mut next = || -> Result<u32, OmsError> {
        parts
            .next()
            .and_then(|part| part.parse().ok())
            .ok_or_else(bad)
    };
    let version = (next()?, next()?, next()?);
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(version)
}

/// The top-level keys of a YAML mapping, in file order.
pub fn top_level_keys(path: &Path, text: &str) -> Result<Vec<String>, OmsError> {
    let parsed: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| OmsError::ParseConfig {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let serde_norway::Value::Mapping(mapping) = parsed else {
        return Err(OmsError::ParseConfig {
            path: path.to_path_buf(),
            detail: "the document is not a mapping".into(),
        });
    };
    mapping
        .keys()
        .map(|key| {
            key.as_str()
                .map(str::to_string)
                .ok_or_else(|| OmsError::ParseConfig {
                    path: path.to_path_buf(),
                    detail: format!("key {key:?} is not a string"),
                })
        })
        .collect()
}

/// Checks that `keys` are a layout `version` reads: from v4.3.1 on `oms_cm_meta_*` and `oms_rm_meta_*`, and no
/// `oms_meta_*` left; before, `oms_meta_*` or the split keys (the guide rolls back by restarting the old container,
/// which may meet the migrated file before its backup is put back).
pub fn check_layout(version: &str, path: &Path, keys: &[String]) -> Result<(), OmsError> {
    let split = parse_version(version)? >= SPLIT_META_VERSION;
    let missing_of = |prefixes: &[&str]| -> Vec<String> {
        prefixes
            .iter()
            .flat_map(|prefix| META_FIELDS.iter().map(move |f| format!("{prefix}{f}")))
            .filter(|needed| !keys.contains(needed))
            .collect()
    };
    let missing = if split {
        let old: Vec<&str> = keys
            .iter()
            .filter(|key| key.starts_with("oms_meta_"))
            .map(String::as_str)
            .collect();
        if !old.is_empty() {
            return Err(OmsError::OldKeys {
                version: version.to_string(),
                path: path.to_path_buf(),
                keys: old.join(", "),
            });
        }
        missing_of(&["oms_cm_meta_", "oms_rm_meta_"])
    } else {
        let old_layout = missing_of(&["oms_meta_"]);
        if old_layout.is_empty() || missing_of(&["oms_cm_meta_", "oms_rm_meta_"]).is_empty() {
            Vec::new()
        } else {
            old_layout
        }
    };
    if missing.is_empty() {
        Ok(())
    } else {
        Err(OmsError::MissingKeys {
            version: version.to_string(),
            path: path.to_path_buf(),
            keys: missing.join(", "),
        })
    }
}

/// Reads `config` and checks it for `version`: what the node reports once it serves.
pub fn load_node(version: &str, config: &Path) -> Result<NodeInfo, OmsError> {
    let text = std::fs::read_to_string(config).map_err(|source| OmsError::ReadConfig {
        path: config.to_path_buf(),
        source,
    })?;
    let keys = top_level_keys(config, &text)?;
    check_layout(version, config, &keys)?;
    Ok(NodeInfo {
        version: version.to_string(),
        config: config.to_string_lossy().into_owned(),
        meta_keys: keys
            .into_iter()
            .filter(|key| key.contains("meta"))
            .collect(),
        is_upgrade: std::env::var("IS_UPGRADE").ok(),
        host_ip: std::env::var("OMS_HOST_IP").ok(),
        pid: std::process::id(),
    })
}

/// Serves a node on `listener` until `shutdown` completes.
pub async fn serve_node(
    listener: TcpListener,
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health", get(node_health))
        .route("/version", get(node_version))
        .with_state(Arc::new(config));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn node_health(State(config): State<Arc<NodeConfig>>) -> (StatusCode, &'static str) {
    if config.unhealthy {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy (demo broken release)",
        )
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn node_version(State(config): State<Arc<NodeConfig>>) -> Json<NodeInfo> {
    Json(config.info.clone())
}

/// What `GET /api/system/params/ha.config` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    pub value: String,
}

/// What `GET /api/stats` answers: every call to the parameter, for the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterStats {
    pub gets: u64,
    pub puts: u64,
    /// The value after each PUT, in order.
    pub put_values: Vec<String>,
    /// The value now.
    pub value: String,
}

type MasterState = Arc<Mutex<MasterStats>>;

/// Serves the console's system parameter `ha.config` (starting as `ha_config`) until `shutdown` completes.
pub async fn serve_master(
    listener: TcpListener,
    ha_config: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state: MasterState = Arc::new(Mutex::new(MasterStats {
        value: ha_config,
        ..MasterStats::default()
    }));
    let app = Router::new()
        .route(
            &format!("/api/system/params/{HA_PARAM}"),
            get(get_param).put(put_param),
        )
        .route("/api/stats", get(stats))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn lock(state: &MasterState) -> std::sync::MutexGuard<'_, MasterStats> {
    // A panicked handler cannot leave the counters half-written: keep serving them.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn get_param(State(state): State<MasterState>) -> Json<Param> {
    let mut stats = lock(&state);
    stats.gets += 1;
    Json(Param {
        value: stats.value.clone(),
    })
}

async fn put_param(State(state): State<MasterState>, body: String) -> (StatusCode, Json<Param>) {
    let value = put_value(&body);
    let mut stats = lock(&state);
    stats.puts += 1;
    stats.put_values.push(value.clone());
    stats.value = value.clone();
    (StatusCode::OK, Json(Param { value }))
}

/// The new value a PUT body sets: a JSON string's text, `{"value": "..."}`'s value (what GET answers, sent back),
/// or else the body itself (a JSON object such as `{"enable": false}`), as the console's edit dialog takes them.
pub fn put_value(body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(serde_json::Value::String(text)) => text,
        Ok(serde_json::Value::Object(object)) if object.len() == 1 => match object.get("value") {
            Some(serde_json::Value::String(text)) => text.clone(),
            _ => body.to_string(),
        },
        _ => body.to_string(),
    }
}

async fn stats(State(state): State<MasterState>) -> Json<MasterStats> {
    Json(lock(&state).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "\"cm_location\": \"2\"\n\"oms_meta_host\": \"h\"\n\"oms_meta_password\": \"p\"\n\
                       \"oms_meta_port\": \"2883\"\n\"oms_meta_user\": \"u\"\n";
    const NEW: &str = "\"cm_location\": \"2\"\n\"oms_cm_meta_host\": \"h\"\n\"oms_cm_meta_password\": \"p\"\n\
                       \"oms_cm_meta_port\": \"2883\"\n\"oms_cm_meta_user\": \"u\"\n\"oms_rm_meta_host\": \"h\"\n\
                       \"oms_rm_meta_password\": \"p\"\n\"oms_rm_meta_port\": \"2883\"\n\"oms_rm_meta_user\": \"u\"\n";

    fn check(version: &str, text: &str) -> Result<(), OmsError> {
        let path = Path::new("/c.yaml");
        check_layout(version, path, &top_level_keys(path, text)?)
    }

    #[test]
    fn each_version_starts_only_with_its_own_key_layout() {
        check("v4.3.0", OLD).unwrap();
        check("v4.3.1", NEW).unwrap();
        let refused = check("v4.3.1", OLD).unwrap_err().to_string();
        assert!(refused.contains("oms_meta_host"), "{refused}");
        assert!(refused.contains("copy them to oms_cm_meta_*"), "{refused}");
        check("v4.3.0", NEW).unwrap();
        let missing = check("v4.3.0", "\"cm_location\": \"2\"\n")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("lacks oms_meta_host"), "{missing}");
        let both = format!("{NEW}\"oms_meta_user\": \"u\"\n");
        assert!(matches!(
            check("v4.3.1", &both),
            Err(OmsError::OldKeys { .. })
        ));
    }

    #[test]
    fn versions_are_compared_as_numbers() {
        assert_eq!(parse_version("v4.3.1").unwrap(), (4, 3, 1));
        assert!(parse_version("v4.10.0").unwrap() > SPLIT_META_VERSION);
        assert!(parse_version("4.3").is_err());
        assert!(parse_version("v4.3.1.2").is_err());
    }

    #[test]
    fn a_put_body_sets_the_value_in_each_form_the_console_takes() {
        assert_eq!(put_value(r#"{"enable": false}"#), r#"{"enable": false}"#);
        assert_eq!(put_value(r#""{\"enable\":true}""#), r#"{"enable":true}"#);
        assert_eq!(
            put_value(r#"{"value": "{\"enable\":true}"}"#),
            r#"{"enable":true}"#
        );
    }
}
