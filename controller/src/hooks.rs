//! Cluster-API hooks: render a role's hook URL for a node, call it over HTTP, check the status and a JSON field,
//! poll the `wait_*` and `health` hooks until they hold or time out, and find a role's current leader.
//!
//! `http://` and `https://` URLs: on `https://` the server's certificate must chain to the system roots or to the
//! registered cluster's own CA (`ca.crt` of its TLS directory), and name the URL's host. Redirects are never
//! followed (a hook answers where it is asked, or fails naming the `Location`), and at most
//! [`MAX_ANSWER_BYTES`] of an answer are read: a longer one fails the call with a clear error.

use crate::executor::{HookFailure, HookKind, HookOutcome};
use crate::tls_files::ControllerTls;
use crate::topology::{HookSpec, HttpMethod, Node, TemplateError, Topology, render_url};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a hook call did not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// The URL or body template could not be rendered.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// No HTTP answer.
    #[error("{method} {url}: {message}")]
    Http {
        /// Method.
        method: &'static str,
        /// Rendered URL.
        url: String,
        /// What went wrong (connection refused, timeout…).
        message: String,
    },
    /// The answer's status is not the expected one.
    #[error("{method} {url}: HTTP {status}, expected {expected}")]
    Status {
        /// Method.
        method: &'static str,
        /// Rendered URL.
        url: String,
        /// Status received.
        status: u16,
        /// What was expected.
        expected: String,
    },
    /// The answer's JSON field is missing or does not compare as asked.
    #[error("{method} {url}: {message}")]
    Field {
        /// Method.
        method: &'static str,
        /// Rendered URL.
        url: String,
        /// What is wrong with the field.
        message: String,
    },
    /// The answer is a redirect, which hooks do not follow.
    #[error(
        "{method} {url}: HTTP {status} redirect to `{location}`: hooks do not follow redirects; put the final URL in \
         the topology"
    )]
    Redirect {
        /// Method.
        method: &'static str,
        /// Rendered URL.
        url: String,
        /// Status received.
        status: u16,
        /// Where it points (`-` when absent).
        location: String,
    },
    /// The answer is longer than [`MAX_ANSWER_BYTES`].
    #[error(
        "{method} {url}: the answer is larger than {limit} bytes, the most a hook reads; point the hook at an \
         endpoint that answers briefly"
    )]
    TooLarge {
        /// Method.
        method: &'static str,
        /// Rendered URL.
        url: String,
        /// The bound.
        limit: usize,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client for hooks: {0}")]
    Client(String),
}

/// The most of an answer a hook reads (JSON status documents are a few KiB).
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// An answer that met the hook's expectation.
#[derive(Debug, Clone, PartialEq)]
pub struct HookAnswer {
    /// HTTP status.
    pub status: u16,
    /// The value of `field` when the hook names one.
    pub field_value: Option<serde_json::Value>,
}

/// Calls hooks over HTTP.
#[derive(Debug, Clone)]
pub struct HookClient {
    http: reqwest::Client,
}

impl HookClient {
    /// A client with no proxy (hooks target the cluster's own addresses) that trusts the system roots on
    /// `https://`.
    pub fn new() -> Result<Self, HookError> {
        Self::trusting(Vec::new())
    }

    /// [`Self::new`] that also trusts the cluster's own CA (from its TLS identity) on `https://`.
    pub fn for_cluster(tls: &ControllerTls) -> Result<Self, HookError> {
        let ders = tls
            .ca_certs_der()
            .map_err(|error| HookError::Client(format!("cannot read the cluster CA: {error}")))?;
        Self::trusting(ders)
    }

    /// System roots plus `extra_roots` (DER).
    fn trusting(extra_roots: Vec<Vec<u8>>) -> Result<Self, HookError> {
        // reqwest uses the process's rustls provider (ring, as everywhere in patchd).
        patchd_tls::install_crypto_provider();
        let roots = extra_roots
            .iter()
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| HookError::Client(format!("bad CA certificate: {error}")))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(30))
            .tls_certs_merge(roots)
            .build()
            .map_err(|error| HookError::Client(describe_reqwest_error(&error)))?;
        Ok(Self { http })
    }

    /// One call: the status must be `expect_status` (default any 2xx) and `field` must compare as asked.
    /// `limit` bounds the call (the smaller of it and the hook's timeout is used).
    pub async fn call_once(
        &self,
        spec: &HookSpec,
        url: &str,
        body: Option<&str>,
        limit: Duration,
    ) -> Result<HookAnswer, HookError> {
        let method = spec.method.as_str();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(HookError::Http {
                method,
                url: url.to_string(),
                message: "a hook URL starts with http:// or https://".to_string(),
            });
        }
        let http_method = match spec.method {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Patch => reqwest::Method::PATCH,
            HttpMethod::Delete => reqwest::Method::DELETE,
        };
        let mut request = self
            .http
            .request(http_method, url)
            .timeout(limit.min(spec.timeout));
        if let Some(body) = body {
            request = with_body(request, body);
        }
        let http_error = |error: reqwest::Error| HookError::Http {
            method,
            url: url.to_string(),
            message: describe_reqwest_error(&error),
        };
        let mut response = request.send().await.map_err(http_error)?;
        let status = response.status().as_u16();
        if response.status().is_redirection() && spec.expect_status != Some(status) {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("-")
                .to_string();
            return Err(HookError::Redirect {
                method,
                url: url.to_string(),
                status,
                location,
            });
        }
        let status_ok = match spec.expect_status {
            Some(expected) => status == expected,
            None => (200..300).contains(&status),
        };
        if !status_ok {
            let expected = spec
                .expect_status
                .map_or_else(|| "2xx".to_string(), |code| code.to_string());
            return Err(HookError::Status {
                method,
                url: url.to_string(),
                status,
                expected,
            });
        }
        let Some(field) = &spec.field else {
            return Ok(HookAnswer {
                status,
                field_value: None,
            });
        };
        let too_large = || HookError::TooLarge {
            method,
            url: url.to_string(),
            limit: MAX_ANSWER_BYTES,
        };
        if response
            .content_length()
            .is_some_and(|length| length > MAX_ANSWER_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(http_error)? {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        let field_error = |message: String| HookError::Field {
            method,
            url: url.to_string(),
            message,
        };
        let document: serde_json::Value = serde_json::from_slice(&bytes).map_err(|error| {
            field_error(format!(
                "the answer is not JSON ({error}), so field `{field}` cannot be read"
            ))
        })?;
        let value = lookup(&document, field)
            .filter(|value| !value.is_null())
            .ok_or_else(|| field_error(format!("the answer has no field `{field}`")))?
            .clone();
        let text = value_text(&value);
        if let Some(expected) = &spec.equals
            && &text != expected
        {
            return Err(field_error(format!(
                "`{field}` is `{text}`, waiting for `{expected}`"
            )));
        }
        if let Some(unwanted) = &spec.not_equals
            && &text == unwanted
        {
            return Err(field_error(format!("`{field}` is still `{text}`")));
        }
        Ok(HookAnswer {
            status,
            field_value: Some(value),
        })
    }
}

/// Reads a dotted path (`data.leader`, `members.0.name`) in a JSON document.
pub fn lookup<'v>(document: &'v serde_json::Value, path: &str) -> Option<&'v serde_json::Value> {
    path.split('.')
        .try_fold(document, |value, key| match value {
            serde_json::Value::Object(map) => map.get(key),
            serde_json::Value::Array(items) => {
                key.parse::<usize>().ok().and_then(|index| items.get(index))
            }
            _ => None,
        })
}

/// A JSON value as the text hooks compare: strings without quotes, everything else as JSON.
pub fn value_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `request` carrying `body`, typed `application/json` when it reads as JSON (an object, list or string), else
/// `text/plain`.
pub(crate) fn with_body(request: reqwest::RequestBuilder, body: &str) -> reqwest::RequestBuilder {
    let content_type = if body.trim_start().starts_with(['{', '[', '"']) {
        "application/json"
    } else {
        "text/plain"
    };
    request
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(body.to_string())
}

/// What went wrong with an HTTP call: its kind, then every cause.
pub(crate) fn describe_reqwest_error(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut message = kind.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The least time given to one HTTP call (so the last poll attempt near the deadline still gets an answer).
const MIN_CALL_TIME: Duration = Duration::from_millis(100);

/// The hooks of one cluster: which spec a node's role has, leader resolution, rendering, calling and polling.
#[derive(Debug, Clone)]
pub struct ClusterHooks {
    topology: Arc<Topology>,
    client: HookClient,
}

impl ClusterHooks {
    /// Hooks of `topology`.
    pub fn new(topology: Arc<Topology>, client: HookClient) -> Self {
        Self { topology, client }
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The role's hook of this kind, if it defines one.
    pub fn spec(&self, node: &Node, kind: HookKind) -> Option<&HookSpec> {
        let hooks = &self.topology.role(&node.role)?.hooks;
        match kind {
            HookKind::Offline => hooks.offline.as_ref(),
            HookKind::WaitOffline => hooks.wait_offline.as_ref(),
            HookKind::Health => hooks.health.as_ref(),
            HookKind::Online => hooks.online.as_ref(),
            HookKind::WaitOnline => hooks.wait_online.as_ref(),
        }
    }

    /// The current leader of `role` through its `leader` hook, asking its nodes in order until one answers, all
    /// within `limit` in total. `Ok(None)` when the role has no leader hook.
    pub async fn leader(&self, role: &str, limit: Duration) -> Result<Option<Node>, HookError> {
        self.leader_by(role, Instant::now() + limit).await
    }

    /// [`Self::leader`] with every candidate's call sharing one deadline.
    async fn leader_by(&self, role: &str, deadline: Instant) -> Result<Option<Node>, HookError> {
        let Some(role) = self.topology.role(role) else {
            return Ok(None);
        };
        let Some(spec) = &role.hooks.leader else {
            return Ok(None);
        };
        let mut last_error = None;
        for candidate in &role.nodes {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && last_error.is_some() {
                break;
            }
            let url = render_url(&spec.url, candidate, &|_| None)?;
            let body = spec
                .body
                .as_deref()
                .map(|body| render_url(body, candidate, &|_| None))
                .transpose()?;
            match self
                .client
                .call_once(spec, &url, body.as_deref(), left.max(MIN_CALL_TIME))
                .await
            {
                Ok(answer) => {
                    let Some(value) = answer.field_value else {
                        return Err(HookError::Field {
                            method: spec.method.as_str(),
                            url,
                            message: "the leader hook needs `field:` naming the JSON field that holds the leader"
                                .to_string(),
                        });
                    };
                    let name = value_text(&value);
                    return match role.node_named(&name) {
                        Some(leader) => Ok(Some(leader.clone())),
                        None => Err(HookError::Field {
                            method: spec.method.as_str(),
                            url,
                            message: format!(
                                "the leader `{name}` is not a node of role {}",
                                role.name
                            ),
                        }),
                    };
                }
                Err(error) => last_error = Some(error),
            }
        }
        match last_error {
            Some(error) => Err(error),
            None => Ok(None),
        }
    }

    /// Renders `spec` for `node`, resolving the leaders its templates name before `deadline`.
    async fn render(
        &self,
        spec: &HookSpec,
        node: &Node,
        deadline: Instant,
    ) -> Result<(String, Option<String>), HookError> {
        let mut leaders: HashMap<String, Node> = HashMap::new();
        for role in spec.leader_roles() {
            if let Some(leader) = self.leader_by(&role, deadline).await? {
                leaders.insert(role, leader);
            }
        }
        let lookup = |role: &str| leaders.get(role);
        let url = render_url(&spec.url, node, &lookup)?;
        let body = spec
            .body
            .as_deref()
            .map(|body| render_url(body, node, &lookup))
            .transpose()?;
        Ok((url, body))
    }

    /// One call of a rendered hook; leader lookups and the call share `limit` in total.
    pub async fn check_once(
        &self,
        spec: &HookSpec,
        node: &Node,
        limit: Duration,
    ) -> Result<HookAnswer, HookError> {
        self.check_by(spec, node, Instant::now() + limit).await
    }

    /// [`Self::check_once`] against a deadline.
    async fn check_by(
        &self,
        spec: &HookSpec,
        node: &Node,
        deadline: Instant,
    ) -> Result<HookAnswer, HookError> {
        let (url, body) = self.render(spec, node, deadline).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        self.client
            .call_once(spec, &url, body.as_deref(), left.max(MIN_CALL_TIME))
            .await
    }

    /// Polls a hook every `interval` until it holds or its `timeout` passes (leaders re-resolved each time). One
    /// deadline bounds the whole wait: every leader lookup and call gets only the time left.
    pub async fn poll(&self, spec: &HookSpec, node: &Node) -> Result<HookAnswer, HookFailure> {
        let started = Instant::now();
        let deadline = started + spec.timeout;
        loop {
            let last = match self.check_by(spec, node, deadline).await {
                Ok(answer) => return Ok(answer),
                Err(HookError::Template(error)) => {
                    return Err(HookFailure::Failed(error.to_string()));
                }
                Err(error) => error.to_string(),
            };
            if started.elapsed() + spec.interval >= spec.timeout {
                return Err(HookFailure::Timeout {
                    waited: started.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(spec.interval).await;
        }
    }

    /// Runs a node's hook of this kind as the executor wants it: `offline`/`online` once, the others polled.
    pub async fn run(&self, node: &Node, kind: HookKind) -> Result<HookOutcome, HookFailure> {
        let Some(spec) = self.spec(node, kind) else {
            return Ok(HookOutcome::NotConfigured);
        };
        match kind {
            HookKind::Offline | HookKind::Online => self
                .check_once(spec, node, spec.timeout)
                .await
                .map(|_| HookOutcome::Done)
                .map_err(|error| HookFailure::Failed(error.to_string())),
            HookKind::WaitOffline | HookKind::WaitOnline | HookKind::Health => {
                self.poll(spec, node).await.map(|_| HookOutcome::Done)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A tiny HTTP server: answers each request with the next scripted (status, body); records request lines.
    async fn serve(script: Vec<(u16, &'static str)>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut index = 0;
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buffer = vec![0u8; 8192];
                let mut read = 0;
                while !buffer[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buffer[read..]).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    read += n;
                }
                let request = String::from_utf8_lossy(&buffer[..read]).to_string();
                log.lock()
                    .unwrap()
                    .push(request.lines().next().unwrap_or_default().to_string());
                let (status, body) = script[index.min(script.len() - 1)];
                index += 1;
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        (address.to_string(), seen)
    }

    fn topology(master: &str, worker_hooks: &str) -> Arc<Topology> {
        let (host, port) = master.split_once(':').unwrap();
        let worker_hooks = if worker_hooks.is_empty() {
            " {}\n".to_string()
        } else {
            format!("\n{worker_hooks}")
        };
        let text = format!(
            "roles:\n  master:\n    hooks:\n      leader: {{ url: \"http://{{host}}:{{port}}/api/leader\", field: leader }}\n    nodes:\n      - {{ host: {host}, port: {port}, name: master-1, deploy_dir: /opt/m }}\n  worker:\n    hooks:{worker_hooks}    nodes:\n      - {{ host: 127.0.1.2, port: 8262, name: worker-1, deploy_dir: /opt/w }}\n"
        );
        Arc::new(Topology::parse(&text).unwrap())
    }

    #[tokio::test]
    async fn wait_hooks_poll_until_the_field_matches_through_the_leader() {
        let (master, seen) = serve(vec![
            (200, r#"{"leader":"master-1"}"#),
            (200, r#"{"state":"Online"}"#),
            (200, r#"{"leader":"master-1"}"#),
            (200, r#"{"state":"Offline"}"#),
        ])
        .await;
        let hooks = "      wait_offline: { url: \"http://{master.leader.host}:{master.leader.port}/api/members/{name}\", field: state, equals: Offline, interval: 20ms, timeout: 5s }\n";
        let cluster = ClusterHooks::new(topology(&master, hooks), HookClient::new().unwrap());
        let worker = cluster
            .topology()
            .node_by_id("127.0.1.2:8262")
            .unwrap()
            .clone();
        assert_eq!(
            cluster.run(&worker, HookKind::WaitOffline).await,
            Ok(HookOutcome::Done)
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[1], "GET /api/members/worker-1 HTTP/1.1");
        assert_eq!(
            cluster.run(&worker, HookKind::Online).await,
            Ok(HookOutcome::NotConfigured)
        );
    }

    #[tokio::test]
    async fn a_wait_that_never_holds_times_out_with_the_last_observation() {
        let (master, _) = serve(vec![(200, r#"{"state":"Online"}"#)]).await;
        let hooks = format!(
            "      wait_offline: {{ url: \"http://{master}/m/{{name}}\", field: state, equals: Offline, interval: 20ms, timeout: 200ms }}\n"
        );
        let cluster = ClusterHooks::new(topology(&master, &hooks), HookClient::new().unwrap());
        let worker = cluster
            .topology()
            .node_by_id("127.0.1.2:8262")
            .unwrap()
            .clone();
        match cluster.run(&worker, HookKind::WaitOffline).await {
            Err(HookFailure::Timeout { last, .. }) => {
                assert!(last.contains("`state` is `Online`"), "{last}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn single_calls_check_the_status_and_send_the_method() {
        let (master, seen) = serve(vec![(500, "{}"), (204, "")]).await;
        let hooks =
            format!("      offline: {{ method: POST, url: \"http://{master}/off/{{name}}\" }}\n");
        let cluster = ClusterHooks::new(topology(&master, &hooks), HookClient::new().unwrap());
        let worker = cluster
            .topology()
            .node_by_id("127.0.1.2:8262")
            .unwrap()
            .clone();
        let first = cluster.run(&worker, HookKind::Offline).await;
        assert!(
            matches!(&first, Err(HookFailure::Failed(m)) if m.contains("HTTP 500")),
            "{first:?}"
        );
        assert_eq!(
            cluster.run(&worker, HookKind::Offline).await,
            Ok(HookOutcome::Done)
        );
        assert_eq!(seen.lock().unwrap()[0], "POST /off/worker-1 HTTP/1.1");
    }

    #[tokio::test]
    async fn the_leader_is_read_from_the_first_node_that_answers() {
        let (master, _) = serve(vec![(200, r#"{"leader":"master-1"}"#)]).await;
        let cluster = ClusterHooks::new(topology(&master, ""), HookClient::new().unwrap());
        let leader = cluster
            .leader("master", Duration::from_secs(2))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(leader.name, "master-1");
        assert_eq!(
            cluster
                .leader("worker", Duration::from_secs(2))
                .await
                .unwrap(),
            None
        );
    }

    /// A server that accepts connections and never answers.
    async fn silent() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        address.to_string()
    }

    #[tokio::test]
    async fn a_wait_through_silent_leader_candidates_keeps_to_its_timeout() {
        let mut masters = String::new();
        for index in 1..=4 {
            let address = silent().await;
            let (host, port) = address.split_once(':').unwrap();
            masters.push_str(&format!(
                "      - {{ host: {host}, port: {port}, name: master-{index}, deploy_dir: /opt/m }}\n"
            ));
        }
        let text = format!(
            "roles:\n  master:\n    hooks:\n      leader: {{ url: \"http://{{host}}:{{port}}/api/leader\", field: leader }}\n    nodes:\n{masters}  worker:\n    hooks:\n      wait_offline: {{ url: \"http://{{master.leader.host}}:{{master.leader.port}}/m/{{name}}\", field: state, equals: Offline, interval: 50ms, timeout: 1s }}\n    nodes:\n      - {{ host: 127.0.1.2, port: 8262, name: worker-1, deploy_dir: /opt/w }}\n"
        );
        let cluster = ClusterHooks::new(
            Arc::new(Topology::parse(&text).unwrap()),
            HookClient::new().unwrap(),
        );
        let worker = cluster
            .topology()
            .node_by_id("127.0.1.2:8262")
            .unwrap()
            .clone();
        let started = Instant::now();
        let outcome = cluster.run(&worker, HookKind::WaitOffline).await;
        let waited = started.elapsed();
        assert!(
            matches!(outcome, Err(HookFailure::Timeout { .. })),
            "{outcome:?}"
        );
        // Each of the 4 candidates given the whole timeout would take 4 s or more.
        assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    }

    /// An axum app on 127.0.0.1:0 over plain HTTP; its base URL.
    async fn serve_app(app: axum::Router) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    /// The worker's `offline` hook at `url`, with `field` when given.
    fn one_hook(url: &str, field: Option<&str>) -> (ClusterHooks, Node) {
        let field = field.map_or(String::new(), |f| format!(", field: {f}"));
        let text = format!(
            "roles:\n  worker:\n    hooks:\n      offline: {{ url: \"{url}\"{field}, timeout: 5s }}\n    nodes:\n      - {{ host: 127.0.0.1, port: 1, name: worker-1, deploy_dir: /opt/w }}\n"
        );
        let topology = Arc::new(Topology::parse(&text).unwrap());
        let node = topology.node_by_id("127.0.0.1:1").unwrap().clone();
        (
            ClusterHooks::new(topology, HookClient::new().unwrap()),
            node,
        )
    }

    #[tokio::test]
    async fn redirects_are_not_followed_and_the_error_names_the_location() {
        use axum::response::IntoResponse;
        let followed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = followed.clone();
        let app = axum::Router::new()
            .route(
                "/moved",
                axum::routing::get(|| async {
                    (
                        axum::http::StatusCode::FOUND,
                        [(axum::http::header::LOCATION, "/elsewhere")],
                    )
                        .into_response()
                }),
            )
            .route(
                "/elsewhere",
                axum::routing::get(move || {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async { "{}" }
                }),
            );
        let base = serve_app(app).await;
        let (hooks, node) = one_hook(&format!("{base}/moved"), None);
        let outcome = hooks.run(&node, HookKind::Offline).await;
        let Err(HookFailure::Failed(message)) = outcome else {
            panic!("a redirect fails the hook: {outcome:?}");
        };
        assert!(
            message.contains("HTTP 302 redirect to `/elsewhere`"),
            "{message}"
        );
        assert!(message.contains("do not follow redirects"), "{message}");
        assert_eq!(followed.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn answers_past_the_bound_fail_with_a_clear_error_with_or_without_a_length() {
        let big = format!(r#"{{"state":"{}"}}"#, "x".repeat(MAX_ANSWER_BYTES));
        let streamed = big.clone();
        let app = axum::Router::new()
            .route(
                "/sized",
                axum::routing::get(move || {
                    let big = big.clone();
                    async move { big }
                }),
            )
            .route(
                "/streamed",
                axum::routing::get(move || {
                    let chunks: Vec<Result<bytes::Bytes, std::convert::Infallible>> = streamed
                        .as_bytes()
                        .chunks(64 * 1024)
                        .map(|chunk| Ok(bytes::Bytes::copy_from_slice(chunk)))
                        .collect();
                    async move { axum::body::Body::from_stream(futures::stream::iter(chunks)) }
                }),
            )
            .route(
                "/small",
                axum::routing::get(|| async { r#"{"state":"Offline"}"# }),
            );
        let base = serve_app(app).await;
        for path in ["sized", "streamed"] {
            let (hooks, node) = one_hook(&format!("{base}/{path}"), Some("state"));
            let outcome = hooks.run(&node, HookKind::Offline).await;
            let Err(HookFailure::Failed(message)) = outcome else {
                panic!("{path}: a large answer fails the hook: {outcome:?}");
            };
            assert!(
                message.contains(&format!("larger than {MAX_ANSWER_BYTES} bytes")),
                "{path}: {message}"
            );
        }
        let (hooks, node) = one_hook(&format!("{base}/small"), Some("state"));
        assert_eq!(
            hooks.run(&node, HookKind::Offline).await,
            Ok(HookOutcome::Done)
        );
    }

    /// A TLS listener for `axum::serve`: each accepted connection is handshaken before it is handed over.
    struct TlsListener {
        tcp: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    }

    impl axum::serve::Listener for TlsListener {
        type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
        type Addr = std::net::SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((stream, peer)) = self.tcp.accept().await else {
                    continue;
                };
                if let Ok(tls) = self.acceptor.accept(stream).await {
                    return (tls, peer);
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }

    #[tokio::test]
    async fn https_hooks_trust_the_cluster_ca_and_refuse_a_server_it_did_not_issue() {
        use patchd_tls::{CertSpec, CertificateAuthority, Role};
        use rustls_pki_types::pem::PemObject;
        patchd_tls::install_crypto_provider();
        let ca = CertificateAuthority::generate("hooks test CA").unwrap();
        let server = ca
            .issue(&CertSpec::new(
                "api",
                Role::Agent,
                vec!["127.0.0.1".into()],
                1,
            ))
            .unwrap();
        let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
            rustls_pki_types::CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(patchd_tls::crypto_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = tcp.local_addr().unwrap();
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        };
        let app = axum::Router::new().route(
            "/state",
            axum::routing::get(|| async { r#"{"state":"Offline"}"# }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });

        // The controller's TLS directory of the cluster: its CA and a controller identity.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        ca.issue(&CertSpec::new("controller", Role::Controller, vec![], 1))
            .unwrap()
            .write(dir.path(), "controller")
            .unwrap();
        let tls = ControllerTls::load_dir(dir.path()).unwrap();

        let url = format!("https://127.0.0.1:{}/state", address.port());
        let (system_only, node) = one_hook(&url, Some("state"));
        let refused = system_only.run(&node, HookKind::Offline).await;
        let Err(HookFailure::Failed(message)) = refused else {
            panic!("a server the system roots do not know is refused: {refused:?}");
        };
        assert!(message.to_lowercase().contains("certificate"), "{message}");

        let cluster = ClusterHooks::new(
            Arc::clone(&system_only.topology),
            HookClient::for_cluster(&tls).unwrap(),
        );
        assert_eq!(
            cluster.run(&node, HookKind::Offline).await,
            Ok(HookOutcome::Done)
        );
    }

    #[test]
    fn dotted_paths_reach_into_objects_and_arrays() {
        let document = serde_json::json!({"data": {"members": [{"name": "a"}, {"name": 7}]}});
        assert_eq!(
            lookup(&document, "data.members.1.name").map(value_text),
            Some("7".to_string())
        );
        assert_eq!(
            lookup(&document, "data.members.0.name").map(value_text),
            Some("a".to_string())
        );
        assert_eq!(lookup(&document, "data.nope"), None);
    }
}
