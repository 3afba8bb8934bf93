//! The agent configuration (`patchd.toml`, format in ARCHITECTURE.md): parsing, and the checks behind
//! `patchd validate` and the start of `patchd run`. Every problem names the key or path and says what to do.

use patchd_apply::layout::StateLayout;
use patchd_apply::spec::{BackendKind, ServiceSpec};
use patchd_package::signing::{TrustPolicy, TrustedKey};
use patchd_tls::{Role, TlsFiles, TlsMaterial};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// The whole `patchd.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server binds (port 0: any free port, printed at start). A wildcard address (`0.0.0.0`,
    /// `[::]`) is refused unless [`Config::allow_wildcard_listen`]: the agent serves on the cluster-facing
    /// interface only (`install.sh --listen-interface` fills in its address).
    pub listen: SocketAddr,
    /// Accept a wildcard `listen` address (every interface of the host). Off by default.
    #[serde(default)]
    pub allow_wildcard_listen: bool,
    /// Everything the agent owns: blobs/, staging/, backups/, journal/, logs/, run/.
    pub state_dir: PathBuf,
    /// The only places besides `state_dir` the agent writes to.
    #[serde(default)]
    pub deploy_roots: Vec<PathBuf>,
    pub tls: TlsSection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub bounds: Bounds,
    /// Managed services (`[[service]]`).
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub trust: TrustSection,
    /// `[upgrade]`: what upgrade runbook steps may run and touch ([`crate::upgrade`]).
    #[serde(default)]
    pub upgrade: crate::upgrade::config::UpgradeSection,
}

/// `[trust]`: the minisign public keys whose signatures packages must carry before this agent stages them,
/// whatever the controller says. No key: packages are not checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustSection {
    /// Each a minisign public key: the `RW…` base64 line, or the absolute path of a minisign `.pub` file.
    pub keys: Vec<String>,
    /// How many distinct trusted keys must have signed a package (k of n), 1 to the number of keys.
    pub threshold: u32,
}

impl Default for TrustSection {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            threshold: 1,
        }
    }
}

impl TrustSection {
    /// The signing policy: every key parsed (files read); `Err` lists each problem under its key.
    pub fn policy(&self) -> Result<TrustPolicy, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut keys: Vec<TrustedKey> = Vec::new();
        for (i, entry) in self.keys.iter().enumerate() {
            let key = format!("trust.keys[{i}]");
            let parsed = if entry.starts_with('/') {
                std::fs::read_to_string(entry)
                    .map_err(|e| format!("cannot read the public key file {entry}: {e}"))
                    .and_then(|text| TrustedKey::parse(&text).map_err(|e| e.to_string()))
            } else {
                TrustedKey::parse(entry).map_err(|e| e.to_string())
            };
            match parsed {
                Ok(parsed) if keys.iter().any(|known| known.id() == parsed.id()) => {
                    problems.push(Problem {
                        key,
                        message: format!(
                            "key {} is listed twice: list each key once (the threshold counts distinct keys)",
                            parsed.id()
                        ),
                    });
                }
                Ok(parsed) => keys.push(parsed),
                Err(message) => problems.push(Problem { key, message }),
            }
        }
        let threshold = usize::try_from(self.threshold).unwrap_or(usize::MAX);
        if threshold == 0 || (!self.keys.is_empty() && threshold > self.keys.len()) {
            problems.push(Problem {
                key: "trust.threshold".into(),
                message: format!(
                    "is {threshold} but must be between 1 and the number of keys ({}): a package can never \
                     carry more valid signatures than there are trusted keys",
                    self.keys.len().max(1)
                ),
            });
        }
        if problems.is_empty() {
            Ok(TrustPolicy::new(keys, threshold))
        } else {
            Err(problems)
        }
    }
}

/// `[tls]`: the agent's identity and the cluster CA that issues controller certificates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA's certificate revocation list (`patchctl ca crl`): a client certificate it lists is refused at the
    /// handshake. Re-read when the file changes, without a restart. Absent: nothing is revoked.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

impl TlsSection {
    /// The same paths as a [`TlsFiles`].
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// `[limits]`: resource bounds on what a controller may send.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest package (blob) accepted, bytes.
    pub max_blob_bytes: u64,
    /// Most files a package may unpack to.
    pub max_files: u64,
    /// Largest total unpacked size, bytes.
    pub max_unpacked_bytes: u64,
    /// Backups kept per service.
    pub keep_backups: u32,
    /// Cached blobs, staged packages and partial uploads touched more recently are never pruned (`"24h"`).
    #[serde(with = "humantime_duration")]
    pub cache_min_age: Duration,
}

/// Shortest `limits.cache_min_age` accepted: between `QueryBlob` (which touches a cached blob) and Stage, a
/// controller needs some minutes; less could prune a blob it was just told the agent holds.
pub const MIN_CACHE_MIN_AGE: Duration = Duration::from_secs(60);

/// serde adapter: durations written as humantime strings ("24h", "90m").
mod humantime_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = String::deserialize(d)?;
        humantime::parse_duration(&raw).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{raw}` is not a duration ({e}): write it like \"24h\" or \"90m\""
            ))
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_blob_bytes: 4 << 30,
            max_files: 10_000,
            max_unpacked_bytes: 8 << 30,
            keep_backups: 3,
            cache_min_age: patchd_apply::prune::DEFAULT_CACHE_MIN_AGE,
        }
    }
}

/// `[bounds]`: how much of the host's disk, threads and connections concurrent callers may hold at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bounds {
    /// Uploads receiving at the same time; one more is refused (`RESOURCE_EXHAUSTED`) until one ends.
    pub max_concurrent_uploads: u32,
    /// HTTP/2 streams (calls) open at once on one connection (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// Connections open at once; one more is closed as soon as it is accepted. Each holds a 128 KiB read buffer.
    pub max_connections: u32,
    /// An upload that sends nothing for this long is ended (its verified chunks are kept).
    #[serde(with = "humantime_duration")]
    pub upload_idle_timeout: Duration,
    /// How often unused blobs, staged packages and partial uploads are pruned while the agent runs.
    #[serde(with = "humantime_duration")]
    pub prune_interval: Duration,
    /// Partial uploads untouched this long are pruned; default `limits.cache_min_age`.
    #[serde(default, with = "humantime_duration_opt")]
    pub partial_max_age: Option<Duration>,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_concurrent_uploads: 8,
            max_streams_per_connection: 32,
            max_connections: 64,
            upload_idle_timeout: Duration::from_secs(30),
            prune_interval: Duration::from_secs(10 * 60),
            partial_max_age: None,
        }
    }
}

impl Config {
    /// Age after which a partial upload no upload is using is pruned.
    pub fn partial_max_age(&self) -> Duration {
        self.bounds
            .partial_max_age
            .unwrap_or(self.limits.cache_min_age)
    }
}

/// Shortest `bounds.prune_interval`, `bounds.partial_max_age` and `bounds.upload_idle_timeout` accepted.
pub const MIN_BOUNDS_DURATION: Duration = Duration::from_secs(1);

/// serde adapter: an optional humantime duration.
mod humantime_duration_opt {
    use serde::Deserializer;
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::humantime_duration::deserialize(d).map(Some)
    }
}

/// A config file that cannot be used. `Invalid` lists every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {cause} (pass an existing file with --config)", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("config {} has {} problem(s):\n{}", path.display(), problems.len(), format_problems(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// One problem: the key it concerns and what is wrong, including what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Subdirectories of `state_dir` the agent uses.
pub const STATE_SUBDIRS: [&str; 7] = [
    StateLayout::BLOBS,
    StateLayout::STAGING,
    StateLayout::BACKUPS,
    StateLayout::JOURNAL,
    StateLayout::LOGS,
    StateLayout::RUN,
    StateLayout::LEASES,
];

impl Config {
    /// Reads and parses `path` (syntax and types only; see [`Config::validate`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Reads, parses and validates `path`.
    pub fn load_and_validate(path: &Path) -> Result<Self, ConfigError> {
        let config = Self::load(path)?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Every problem with this config and the files and directories it names; empty when it is usable.
    /// Touches nothing except a probe file in an existing state directory (removed at once).
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_string(),
                message,
            })
        };

        if self.listen.port() != 0 && self.listen.port() < 1024 && !nix::unistd::geteuid().is_root()
        {
            problem(
                "listen",
                format!("port {} needs root: use a port >= 1024", self.listen.port()),
            );
        }

        if self.listen.ip().is_unspecified() && !self.allow_wildcard_listen {
            problem(
                "listen",
                format!(
                    "{} listens on every interface of the host: name the cluster-facing address instead (install.sh \
                     --listen-interface IFACE fills it in), or set allow_wildcard_listen = true if every interface \
                     is meant",
                    self.listen
                ),
            );
        }

        match check_state_dir(&self.state_dir) {
            Ok(()) => {}
            Err(message) => problem("state_dir", message),
        }

        if self.deploy_roots.is_empty() && !self.services.is_empty() {
            problem(
                "deploy_roots",
                "is empty but services are declared: list the directories services deploy under"
                    .into(),
            );
        }
        for (i, root) in self.deploy_roots.iter().enumerate() {
            let key = format!("deploy_roots[{i}]");
            if let Err(message) = check_absolute_normal(root) {
                problem(&key, message);
            } else if !root.is_dir() {
                problem(
                    &key,
                    format!(
                        "{} does not exist or is not a directory: create it first",
                        root.display()
                    ),
                );
            } else if self.state_dir.starts_with(root) || root.starts_with(&self.state_dir) {
                problem(
                    &key,
                    format!(
                        "{} overlaps state_dir {}: keep them apart",
                        root.display(),
                        self.state_dir.display()
                    ),
                );
            }
        }

        for (key, path) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if let Err(message) = check_absolute_normal(path) {
                problem(key, message);
            } else if let Err(e) = std::fs::File::open(path).and_then(|f| {
                if f.metadata()?.is_dir() {
                    Err(std::io::Error::other("is a directory"))
                } else {
                    Ok(())
                }
            }) {
                problem(key, format!("cannot read {}: {e}", path.display()));
            }
        }
        if !problems_with_prefix(&problems, "tls.") {
            match TlsMaterial::load(&self.tls.files()).and_then(|m| m.check(Role::Agent)) {
                Ok(_) => {}
                Err(e) => {
                    let key = match &e {
                        patchd_tls::TlsError::BadKey { .. } => "tls.key",
                        patchd_tls::TlsError::Identity { path, .. }
                        | patchd_tls::TlsError::BadCertificate { path, .. }
                            if path == &self.tls.ca =>
                        {
                            "tls.ca"
                        }
                        patchd_tls::TlsError::Identity { path, .. } if path == &self.tls.key => {
                            "tls.key"
                        }
                        _ => "tls.cert",
                    };
                    problems.push(Problem {
                        key: key.to_string(),
                        message: e.to_string(),
                    });
                }
            }
        }

        if let Some(crl) = &self.tls.crl {
            let message = match check_absolute_normal(crl) {
                Err(message) => Some(message),
                Ok(()) if problems_with_prefix(&problems, "tls.ca") => None,
                Ok(()) => patchd_tls::load_crl(crl, &self.tls.ca)
                    .err()
                    .map(|e| e.to_string()),
            };
            if let Some(message) = message {
                problems.push(Problem {
                    key: "tls.crl".into(),
                    message,
                });
            }
        }

        if self.limits.max_blob_bytes == 0 {
            problems.push(Problem {
                key: "limits.max_blob_bytes".into(),
                message: "must be > 0".into(),
            });
        }

        if self.limits.cache_min_age < MIN_CACHE_MIN_AGE {
            problems.push(Problem {
                key: "limits.cache_min_age".into(),
                message: format!(
                    "{} is too short: use at least \"1m\" (a controller needs time between QueryBlob and Stage; the default is \"24h\")",
                    humantime::format_duration(self.limits.cache_min_age)
                ),
            });
        }

        for (key, value) in [
            (
                "bounds.max_concurrent_uploads",
                self.bounds.max_concurrent_uploads,
            ),
            (
                "bounds.max_streams_per_connection",
                self.bounds.max_streams_per_connection,
            ),
            ("bounds.max_connections", self.bounds.max_connections),
        ] {
            if value == 0 {
                problems.push(Problem {
                    key: key.into(),
                    message: "must be at least 1 (remove the key for the default)".into(),
                });
            }
        }
        for (key, value) in [
            (
                "bounds.upload_idle_timeout",
                Some(self.bounds.upload_idle_timeout),
            ),
            ("bounds.prune_interval", Some(self.bounds.prune_interval)),
            ("bounds.partial_max_age", self.bounds.partial_max_age),
        ] {
            if value.is_some_and(|v| v < MIN_BOUNDS_DURATION) {
                problems.push(Problem {
                    key: key.into(),
                    message: "is too short: use at least \"1s\"".into(),
                });
            }
        }

        if let Err(trust_problems) = self.trust.policy() {
            problems.extend(trust_problems);
        }

        problems.extend(
            self.upgrade
                .validate(&self.state_dir, &self.services)
                .into_iter()
                .map(|(key, message)| Problem { key, message }),
        );

        let mut names = BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            for message in check_service(service, &self.deploy_roots) {
                problems.push(Problem {
                    key: format!("service[{i}] ({})", service.name),
                    message,
                });
            }
            if !names.insert(service.name.as_str()) {
                problems.push(Problem {
                    key: format!("service[{i}].name"),
                    message: format!(
                        "`{}` is declared twice: service names must be unique",
                        service.name
                    ),
                });
            }
        }
        problems
    }

    /// Creates `state_dir` and its subdirectories (mode 0700).
    pub fn prepare_state_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        builder.create(&self.state_dir)?;
        for sub in STATE_SUBDIRS {
            builder.create(self.state_dir.join(sub))?;
        }
        Ok(())
    }

    /// The directory of the blob cache.
    pub fn blobs_dir(&self) -> PathBuf {
        StateLayout::new(&self.state_dir).blobs()
    }

    /// Whether `path` lies under one of the deploy roots (lexically: `path` must be absolute with no `..`).
    pub fn is_under_deploy_root(&self, path: &Path) -> bool {
        is_under_any(path, &self.deploy_roots)
    }
}

fn problems_with_prefix(problems: &[Problem], prefix: &str) -> bool {
    problems.iter().any(|p| p.key.starts_with(prefix))
}

fn check_absolute_normal(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!(
            "`{}` is relative: use an absolute path",
            path.display()
        ));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!(
            "`{}` contains `.` or `..`: write the plain absolute path",
            path.display()
        ));
    }
    Ok(())
}

fn is_under_any(path: &Path, roots: &[PathBuf]) -> bool {
    check_absolute_normal(path).is_ok()
        && roots
            .iter()
            .any(|root| path.starts_with(root) && path != root)
}

fn check_state_dir(dir: &Path) -> Result<(), String> {
    check_absolute_normal(dir)?;
    if dir.exists() {
        if !dir.is_dir() {
            return Err(format!(
                "{} exists and is not a directory: point state_dir at a directory",
                dir.display()
            ));
        }
        let probe = dir.join(format!(".patchd-validate-{}", std::process::id()));
        return match std::fs::write(&probe, b"") {
            Ok(()) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) => Err(format!(
                "{} is not writable ({e}): fix its owner or permissions",
                dir.display()
            )),
        };
    }
    // It will be created at start: the nearest existing ancestor must be a writable directory.
    let mut ancestor = dir.parent();
    while let Some(a) = ancestor {
        if a.exists() {
            if !a.is_dir() {
                return Err(format!(
                    "cannot be created: {} is not a directory; point state_dir somewhere else",
                    a.display()
                ));
            }
            return match nix::unistd::access(
                a,
                nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
            ) {
                Ok(()) => Ok(()),
                Err(e) => Err(format!(
                    "{} does not exist and cannot be created in {} ({e}): create it or fix permissions",
                    dir.display(),
                    a.display()
                )),
            };
        }
        ancestor = a.parent();
    }
    Err(format!(
        "{} cannot be created: no existing ancestor",
        dir.display()
    ))
}

fn check_service(service: &ServiceSpec, roots: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with('.')
    };
    if !valid_name(&service.name) {
        out.push(format!(
            "name `{}`: use letters, digits, '-', '_' or '.'",
            service.name
        ));
    }
    if !valid_name(&service.component) {
        out.push(format!(
            "component `{}`: use letters, digits, '-', '_' or '.'",
            service.component
        ));
    }
    if service.backend == BackendKind::Docker {
        // A container's files are in its image: no deploy dir, only the docker keys and the probes.
        if let Err(e) = service.validate(roots) {
            out.push(e.problem);
        }
        return out;
    }
    if let Err(e) = service.check_docker_keys() {
        out.push(e.problem);
    }
    if let Err(message) = check_absolute_normal(&service.deploy_dir) {
        out.push(format!("deploy_dir: {message}"));
    } else if !is_under_any(&service.deploy_dir, roots) {
        out.push(format!(
            "deploy_dir {} is not under any deploy root ({}): move it under one, or add its parent to deploy_roots",
            service.deploy_dir.display(),
            roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    for (key, rel) in [
        ("install_dir", &service.install_dir),
        ("binary", &service.binary),
    ] {
        if let Some(rel) = rel
            && (rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))))
        {
            out.push(format!(
                "{key} `{}` must be a relative path inside deploy_dir, without `..`",
                rel.display()
            ));
        }
    }
    match service.check_run_settings() {
        Err(e) => out.push(e.problem),
        Ok(Some(run_as)) => {
            let me = nix::unistd::geteuid();
            if !me.is_root() && run_as.uid != me.as_raw() {
                out.push(format!(
                    "user {:?} (uid {}) differs from the agent's own uid {me}, and only root can switch users: run patchd as root, or set `user` to the agent's own account",
                    service.user.as_deref().unwrap_or_default(),
                    run_as.uid
                ));
            }
        }
        Ok(None) => {}
    }
    match service.backend {
        BackendKind::Process => {
            if service.command.is_empty() {
                out.push(
                    "backend \"process\" needs `command` (the argv that starts the service)".into(),
                );
            }
        }
        BackendKind::Systemd => {
            if service.unit.as_deref().is_none_or(str::is_empty) {
                out.push("backend \"systemd\" needs `unit` (e.g. \"demo-worker.service\")".into());
            }
        }
        BackendKind::Docker => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> String {
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{0}/state\"\ndeploy_roots = [\"{0}/deploy\"]\n[tls]\nca = \"{0}/ca.crt\"\ncert = \"{0}/a.crt\"\nkey = \"{0}/a.key\"\n",
            dir.display()
        )
    }

    #[test]
    fn a_wildcard_listen_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let listen_problems = |text: &str| -> Vec<String> {
            Config::parse(Path::new("x.toml"), text)
                .unwrap()
                .validate()
                .into_iter()
                .filter(|p| p.key == "listen")
                .map(|p| p.message)
                .collect()
        };
        let named = base(dir.path());
        assert!(listen_problems(&named).is_empty());
        for wildcard in ["0.0.0.0:7480", "[::]:7480"] {
            let text = named.replace("127.0.0.1:0", wildcard);
            let problems = listen_problems(&text);
            assert_eq!(problems.len(), 1, "{wildcard}: {problems:?}");
            assert!(
                problems[0].contains("every interface")
                    && problems[0].contains("allow_wildcard_listen"),
                "{}",
                problems[0]
            );
            let allowed = format!("allow_wildcard_listen = true\n{text}");
            assert!(listen_problems(&allowed).is_empty(), "{wildcard} allowed");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{}\nbogus = 1\n", base(dir.path()));
        let err = Config::parse(Path::new("x.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn deploy_dir_outside_roots_and_duplicates_are_problems() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("deploy")).unwrap();
        let text = format!(
            "{}\n[[service]]\nname = \"w\"\ncomponent = \"w\"\ndeploy_dir = \"/etc/w\"\ncommand = [\"x\"]\n\
             [[service]]\nname = \"w\"\ncomponent = \"w\"\ndeploy_dir = \"{}/deploy/w\"\nbackend = \"systemd\"\n",
            base(dir.path()),
            dir.path().display()
        );
        let config = Config::parse(Path::new("x.toml"), &text).unwrap();
        let problems = config.validate();
        let all = format_problems(&problems);
        assert!(all.contains("/etc/w is not under any deploy root"), "{all}");
        assert!(all.contains("declared twice"), "{all}");
        assert!(all.contains("needs `unit`"), "{all}");
        assert!(all.contains("tls.ca"), "{all}");
    }

    #[test]
    fn cache_min_age_is_a_humantime_duration_of_at_least_a_minute() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(Path::new("x.toml"), &base(dir.path())).unwrap();
        assert_eq!(config.limits.cache_min_age, Duration::from_secs(24 * 3600));

        let text = format!("{}[limits]\ncache_min_age = \"90m\"\n", base(dir.path()));
        let config = Config::parse(Path::new("x.toml"), &text).unwrap();
        assert_eq!(config.limits.cache_min_age, Duration::from_secs(90 * 60));
        assert!(!problems_with_prefix(&config.validate(), "limits."));

        let text = format!("{}[limits]\ncache_min_age = \"10s\"\n", base(dir.path()));
        let config = Config::parse(Path::new("x.toml"), &text).unwrap();
        let all = format_problems(&config.validate());
        assert!(
            all.contains("limits.cache_min_age: 10s is too short"),
            "{all}"
        );

        let text = format!("{}[limits]\ncache_min_age = \"a day\"\n", base(dir.path()));
        let err = Config::parse(Path::new("x.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cache_min_age") && err.contains("not a duration"),
            "{err}"
        );
    }

    #[test]
    fn bounds_have_defaults_and_refuse_zero_and_tiny_values() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(Path::new("x.toml"), &base(dir.path())).unwrap();
        assert_eq!(config.bounds.max_concurrent_uploads, 8);
        assert_eq!(config.partial_max_age(), config.limits.cache_min_age);
        assert!(!problems_with_prefix(&config.validate(), "bounds."));

        let text = format!(
            "{}[bounds]\nmax_concurrent_uploads = 2\nprune_interval = \"1s\"\npartial_max_age = \"3s\"\n",
            base(dir.path())
        );
        let config = Config::parse(Path::new("x.toml"), &text).unwrap();
        assert_eq!(config.bounds.max_concurrent_uploads, 2);
        assert_eq!(config.bounds.prune_interval, Duration::from_secs(1));
        assert_eq!(config.partial_max_age(), Duration::from_secs(3));
        assert!(!problems_with_prefix(&config.validate(), "bounds."));

        let text = format!(
            "{}[bounds]\nmax_connections = 0\nprune_interval = \"10ms\"\n",
            base(dir.path())
        );
        let config = Config::parse(Path::new("x.toml"), &text).unwrap();
        let all = format_problems(&config.validate());
        assert!(
            all.contains("bounds.max_connections: must be at least 1"),
            "{all}"
        );
        assert!(all.contains("bounds.prune_interval: is too short"), "{all}");
    }

    #[test]
    fn docker_services_need_a_container_and_take_only_their_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let service = |body: &str| {
            let text = format!(
                "{}\n[[service]]\nname = \"oms\"\ncomponent = \"oms\"\nbackend = \"docker\"\n{body}",
                base(dir.path())
            );
            let config = Config::parse(Path::new("x.toml"), &text).unwrap();
            format_problems(&config.validate())
        };
        let fine = service("container = \"oms_431\"\nenv_add = [\"IS_UPGRADE=true\"]\n");
        assert!(!fine.contains("service"), "{fine}");
        assert!(service("").contains("needs `container`"));
        assert!(service("container = \"-bad name\"\n").contains("not a Docker container name"));
        assert!(service("container = \"oms\"\nenv_add = [\"NOEQUALS\"]\n").contains("KEY=VALUE"));
        assert!(
            service("container = \"oms\"\ndeploy_dir = \"/opt/oms\"\n")
                .contains("`deploy_dir` does not apply to backend \"docker\"")
        );
        let text = format!(
            "{}\n[[service]]\nname = \"w\"\ncomponent = \"w\"\ndeploy_dir = \"{}/deploy/w\"\nbackend = \"systemd\"\n\
             unit = \"w.service\"\ncontainer = \"w\"\n",
            base(dir.path()),
            dir.path().display()
        );
        let config = Config::parse(Path::new("x.toml"), &text).unwrap();
        let all = format_problems(&config.validate());
        assert!(
            all.contains("`container` applies to backend \"docker\" only"),
            "{all}"
        );
    }

    #[test]
    fn upgrade_declarations_are_checked_by_validate() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}[upgrade]\nroots = [\"{}/nowhere\"]\n[[upgrade.action]]\nname = \"dump\"\nargv = [\"/usr/bin/mysqldump\", \"{{db}}\"]\n",
            base(dir.path()),
            dir.path().display()
        );
        let config = Config::parse(Path::new("x.toml"), &text).unwrap();
        let all = format_problems(&config.validate());
        assert!(all.contains("upgrade.roots[0]"), "{all}");
        assert!(
            all.contains("upgrade.action[0] (dump): argv[1] uses `{db}`"),
            "{all}"
        );
    }

    #[test]
    fn deploy_root_containment_is_lexical_and_strict() {
        let roots = vec![PathBuf::from("/opt/demo")];
        assert!(is_under_any(Path::new("/opt/demo/w"), &roots));
        assert!(!is_under_any(Path::new("/opt/demo"), &roots));
        assert!(!is_under_any(Path::new("/opt/demo2/w"), &roots));
        assert!(!is_under_any(Path::new("/opt/demo/../etc"), &roots));
    }

    #[test]
    fn trust_keys_parse_from_lines_and_files_and_the_threshold_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(Path::new("x.toml"), &base(dir.path())).unwrap();
        assert!(!config.trust.policy().unwrap().is_enforced());

        let a = patchd_package::signing::generate_keys().unwrap();
        let b = patchd_package::signing::generate_keys().unwrap();
        let b_file = dir.path().join("b.pub");
        std::fs::write(&b_file, &b.public_file).unwrap();
        let text = format!(
            "{}[trust]\nkeys = [\"{}\", \"{}\"]\nthreshold = 2\n",
            base(dir.path()),
            a.public_key,
            b_file.display()
        );
        let config = Config::parse(Path::new("x.toml"), &text).unwrap();
        let policy = config.trust.policy().unwrap();
        assert_eq!(policy.key_ids(), vec![a.key_id, b.key_id]);
        assert!(!problems_with_prefix(&config.validate(), "trust."));

        let text = format!(
            "{}[trust]\nkeys = [\"{}\", \"RWnot-a-key\", \"{}\"]\nthreshold = 4\n",
            base(dir.path()),
            a.public_key,
            a.public_key
        );
        let config = Config::parse(Path::new("x.toml"), &text).unwrap();
        let all = format_problems(&config.validate());
        assert!(
            all.contains("trust.keys[1]: `RWnot-a-key` is not a minisign public key"),
            "{all}"
        );
        assert!(
            all.contains("trust.keys[2]: key") && all.contains("listed twice"),
            "{all}"
        );
        assert!(all.contains("trust.threshold: is 4"), "{all}");
    }
}
