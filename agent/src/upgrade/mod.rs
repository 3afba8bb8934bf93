//! The agent's part of upgrade runbooks (`UpgradeStep`, issue 14): each operation of a runbook step that must
//! happen on a node. Invariant: **the controller cannot make an agent run an undeclared command or touch a path
//! outside the declared roots**. A request names a declared action (`[[upgrade.action]]`) and typed arguments
//! ([`template`]), never a command; files are read and written only below `[upgrade] roots` and the backup area
//! `<state_dir>/upgrade/<upgrade_id>/<step>/` ([`paths`]), through handles no symlink or `..` leads out of;
//! containers only when they are a `docker` service's `container`. Anything else is `PERMISSION_DENIED` naming
//! what was refused and what to declare.
//!
//! Operations: [`Upgrades::run_action`] (host or `docker exec`), [`Upgrades::backup_paths`],
//! [`Upgrades::backup_command`] (a dump: stdout streamed into a temporary file, fsynced, renamed; refused and
//! removed when empty, below `min_bytes` or on a non-zero exit), [`Upgrades::restore`] (every sha256 checked
//! before anything is written; copied back byte for byte with its mode, or fed to a `stdin = true` action),
//! [`Upgrades::yaml_edit`] (original backed up once, edited bytes renamed into place; idempotent) and
//! [`Upgrades::container_power`] (idempotent stop/start). The lease check is the caller's (`server.rs`).

pub mod config;
mod error;
mod files;
pub mod paths;
mod run;
pub mod template;

#[cfg(test)]
mod tests;

pub use error::UpgradeError;

use crate::config::Config;
use config::{ActionSpec, ParamType, UpgradeSection};
use patchd_apply::spec::{BackendKind, ServiceSpec};
use patchd_package::ContentAlgorithm;
use patchd_proto::v1;
use patchd_runbook::yaml_edit::{Edit, apply_edits};
use paths::Roots;
use run::{Finished, Streams};
use std::io::Seek;
use std::path::Path;
use std::sync::Arc;

/// The largest file a yaml_edit reads: configuration files are small, and the whole file is held in memory.
pub const MAX_YAML_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// The largest `edits_json` a yaml_edit accepts.
pub const MAX_EDITS_JSON_BYTES: usize = 256 * 1024;

/// What one agent may do for upgrade steps: its `[upgrade]` section and docker services.
#[derive(Debug, Clone)]
pub struct Upgrades {
    section: UpgradeSection,
    roots: Roots,
    services: Vec<ServiceSpec>,
}

/// Runs file work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, UpgradeError> + Send + 'static,
) -> Result<T, UpgradeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| UpgradeError::Internal(format!("upgrade step task failed: {e}")))?
}

fn response_of(finished: Finished, note: String) -> v1::UpgradeStepResponse {
    v1::UpgradeStepResponse {
        exit_code: finished.exit_code,
        stdout: finished.stdout.into(),
        stderr_tail: finished.stderr_tail,
        backups: Vec::new(),
        note,
    }
}

fn backup_of(roots: &Roots, written: &files::Written, source: &str) -> v1::UpgradeBackup {
    v1::UpgradeBackup {
        path: roots.state_path(&written.rel).display().to_string(),
        source: source.to_string(),
        size: written.size,
        sha256: written.sha256.clone(),
    }
}

impl Upgrades {
    pub fn new(config: &Config) -> Self {
        Self::with(
            config.upgrade.clone(),
            &config.state_dir,
            config.services.clone(),
        )
    }

    /// From the parts of a config: the section, the state dir (its `upgrade/` is the backup area), the services.
    pub fn with(section: UpgradeSection, state_dir: &Path, services: Vec<ServiceSpec>) -> Self {
        Upgrades {
            roots: Roots::new(&section.roots, state_dir),
            section,
            services,
        }
    }

    /// One step's operation.
    pub async fn step(
        self: Arc<Self>,
        request: v1::UpgradeStepRequest,
    ) -> Result<v1::UpgradeStepResponse, UpgradeError> {
        use v1::upgrade_step_request::Op;
        let op = request.op.ok_or_else(|| {
            UpgradeError::Invalid(
                "missing `op`: send one of run, backup_paths, backup_command, restore, yaml_edit, container_power"
                    .into(),
            )
        })?;
        match op {
            Op::Run(op) => self.run_action(op).await,
            Op::BackupPaths(op) => {
                let area = backup_area(&request.upgrade_id, &request.step)?;
                self.backup_paths(area, op).await
            }
            Op::BackupCommand(op) => self.backup_command(op).await,
            Op::Restore(op) => self.restore(op).await,
            Op::YamlEdit(op) => {
                let area = backup_area(&request.upgrade_id, &request.step)?;
                self.yaml_edit(area, op).await
            }
            Op::ContainerPower(op) => self.container_power(op).await,
        }
    }

    /// The declared action a call names, else `PERMISSION_DENIED`.
    fn action(
        &self,
        call: Option<&v1::ActionCall>,
    ) -> Result<(&ActionSpec, Vec<String>), UpgradeError> {
        let call = call.ok_or_else(|| {
            UpgradeError::Invalid("missing `call`: name a declared action and its arguments".into())
        })?;
        let action = self.section.action(&call.action).ok_or_else(|| {
            let declared: Vec<&str> = self.section.actions.iter().map(|a| a.name.as_str()).collect();
            UpgradeError::Denied(format!(
                "action `{}` is not declared on this agent (declared: {}); declare it in patchd.toml as an \
                 [[upgrade.action]] with its argv and params, or fix the runbook",
                call.action,
                if declared.is_empty() { "none".to_string() } else { declared.join(", ") }
            ))
        })?;
        let argv = template::render(action, &call.args, &self.roots)?;
        Ok((action, argv))
    }

    /// The docker service whose container is `container`, else `PERMISSION_DENIED`.
    fn docker_service(&self, container: &str) -> Result<&ServiceSpec, UpgradeError> {
        self.services
            .iter()
            .find(|s| s.backend == BackendKind::Docker && s.container.as_deref() == Some(container))
            .ok_or_else(|| {
                UpgradeError::Denied(format!(
                    "container `{container}` is not the container of a docker service on this agent; declare it \
                     in patchd.toml as a [[service]] with backend = \"docker\" and container = \"{container}\""
                ))
            })
    }

    async fn engine_for(
        &self,
        service: &ServiceSpec,
    ) -> Result<patchd_docker::Engine, UpgradeError> {
        patchd_docker::Engine::connect(&service.docker_socket())
            .await
            .map_err(|e| UpgradeError::Precondition(e.to_string()))
    }

    /// RunActionOp: a declared action, on the host or (declared `container = true`) in a declared container.
    pub async fn run_action(
        &self,
        op: v1::RunActionOp,
    ) -> Result<v1::UpgradeStepResponse, UpgradeError> {
        let (action, argv) = self.action(op.call.as_ref())?;
        match (action.container, op.container.is_empty()) {
            (false, true) => {
                let finished = run::run_host(
                    &action.name,
                    &argv,
                    &action.env,
                    Streams::default(),
                    action.timeout,
                )
                .await?;
                let note = format!("{} exited {}", action.name, finished.exit_code);
                Ok(response_of(finished, note))
            }
            (true, false) => {
                let service = self.docker_service(&op.container)?;
                let engine = self.engine_for(service).await?;
                let env: Vec<String> = action.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let exec = engine.exec(
                    &op.container,
                    &argv,
                    &env,
                    run::STDOUT_CAP,
                    run::STDERR_TAIL_BYTES,
                );
                let output = tokio::time::timeout(action.timeout, exec)
                    .await
                    .map_err(|_| {
                        UpgradeError::Timeout(format!(
                            "action `{}` in container `{}` did not finish within {}; the agent stopped waiting \
                             (the engine cannot kill an exec: check the container), raise its `timeout` if it \
                             needs longer",
                            action.name,
                            op.container,
                            humantime::format_duration(action.timeout)
                        ))
                    })?
                    .map_err(|e| UpgradeError::Precondition(e.to_string()))?;
                let exit_code = output
                    .exit_code
                    .and_then(|code| i32::try_from(code).ok())
                    .unwrap_or(-1);
                let finished = Finished {
                    exit_code,
                    stdout: output.stdout,
                    stderr_tail: run::tail_lines(&output.stderr_tail),
                };
                let note = format!("{} in {} exited {exit_code}", action.name, op.container);
                Ok(response_of(finished, note))
            }
            (true, true) => Err(UpgradeError::Invalid(format!(
                "action `{}` is declared to run in a container (container = true): name the container",
                action.name
            ))),
            (false, false) => Err(UpgradeError::Denied(format!(
                "action `{}` is declared to run on the host, not in container `{}`; declare it with container = \
                 true to run it there",
                action.name, op.container
            ))),
        }
    }

    /// A declared host action (dumps and loads run on the host).
    fn host_action(
        &self,
        call: Option<&v1::ActionCall>,
    ) -> Result<(ActionSpec, Vec<String>), UpgradeError> {
        let (action, argv) = self.action(call)?;
        if action.container {
            return Err(UpgradeError::Invalid(format!(
                "action `{}` runs in a container; backups and restores run host actions only",
                action.name
            )));
        }
        Ok((action.clone(), argv))
    }

    /// BackupCommandOp: the action's standard output into `output`, or nothing at all.
    pub async fn backup_command(
        &self,
        op: v1::BackupCommandOp,
    ) -> Result<v1::UpgradeStepResponse, UpgradeError> {
        let (action, argv) = self.host_action(op.call.as_ref())?;
        let (root, rel) = self.roots.locate(&op.output, "backup output")?;
        let output_path = op.output.clone();
        let (parent, name, temp) = blocking(move || {
            if let Some(dir) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                root.create_dir_all(dir)
                    .map_err(|e| paths::fs_error(e, "the backup output's directory"))?;
            }
            let (parent, name) = root
                .parent_of(&rel)
                .map_err(|e| paths::fs_error(e, "backup output"))?;
            let name = name.to_os_string();
            let temp = files::temp_name(&name, "partial");
            parent
                .remove_file(Path::new(&temp))
                .map_err(|e| paths::fs_error(e, "a leftover partial dump"))?;
            if let Some(stat) = parent
                .stat_entry(&name)
                .map_err(|e| paths::fs_error(e, "backup output"))?
                && patchd_apply::fsutil::FileType::from_raw_mode(stat.st_mode)
                    == patchd_apply::fsutil::FileType::Symlink
            {
                return Err(paths::symlink_refused(
                    Path::new(&output_path),
                    "backup output",
                ));
            }
            Ok((parent, name, temp))
        })
        .await?;
        let file = parent
            .create_new_file(Path::new(&temp), 0o600)
            .map_err(|e| paths::fs_error(e, "backup output"))?;
        let streams = Streams {
            stdin: None,
            stdout: Some(file),
        };
        let ran = run::run_host(&action.name, &argv, &action.env, streams, action.timeout).await;
        let min_bytes = op.min_bytes.max(1);
        let output = op.output.clone();
        blocking(move || {
            let discard = |parent: &patchd_apply::fsutil::DirHandle, error: UpgradeError| {
                let _ = parent.remove_file(Path::new(&temp));
                let _ = parent.sync();
                Err(error)
            };
            let finished = match ran {
                Ok(finished) => finished,
                Err(error) => return discard(&parent, error),
            };
            if finished.exit_code != 0 {
                return discard(
                    &parent,
                    UpgradeError::Precondition(format!(
                        "backup command `{}` exited {}: no backup kept at {output}; stderr: {}",
                        action.name, finished.exit_code, finished.stderr_tail
                    )),
                );
            }
            let (file, _) = files::open_with_mode(&parent, Path::new(&temp), "the dump")?;
            let size = file
                .metadata()
                .map_err(|e| UpgradeError::Internal(format!("cannot stat the dump: {e}")))?
                .len();
            if size < min_bytes {
                return discard(
                    &parent,
                    UpgradeError::Precondition(format!(
                        "backup command `{}` wrote {size} bytes, less than the {min_bytes} required: no backup \
                         kept at {output}; check the command (and the database it dumps) before upgrading",
                        action.name
                    )),
                );
            }
            file.sync_all()
                .map_err(|e| UpgradeError::Internal(format!("cannot fsync the dump: {e}")))?;
            let sha256 = parent
                .digest(Path::new(&temp), ContentAlgorithm::Sha256)
                .map_err(|e| paths::fs_error(e, "the dump"))?;
            patchd_apply::fsutil::DirHandle::rename_in(&parent, &temp, &name)
                .map_err(|e| paths::fs_error(e, "backup output"))?;
            parent.sync().map_err(|e| paths::fs_error(e, "backup output"))?;
            Ok(v1::UpgradeStepResponse {
                exit_code: 0,
                stdout: Default::default(),
                stderr_tail: finished.stderr_tail,
                backups: vec![v1::UpgradeBackup {
                    path: output.clone(),
                    source: String::new(),
                    size,
                    sha256,
                }],
                note: format!("{} wrote {size} bytes to {output}", action.name),
            })
        })
        .await
    }

    /// BackupPathsOp: each path (file or directory) copied into the backup area.
    pub async fn backup_paths(
        &self,
        area: BackupArea,
        op: v1::BackupPathsOp,
    ) -> Result<v1::UpgradeStepResponse, UpgradeError> {
        if op.paths.is_empty() {
            return Err(UpgradeError::Invalid(
                "`paths` is empty: name what to back up".into(),
            ));
        }
        let located = op
            .paths
            .iter()
            .map(|path| {
                self.roots
                    .locate(path, "backup path")
                    .map(|found| (path.clone(), found))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let roots = self.roots.clone();
        blocking(move || {
            let state = roots.state_handle()?;
            let mut backups = Vec::new();
            for (path, (root, rel)) in located {
                let dest = Roots::backup_rel(&area.upgrade_id, &area.step, Path::new(&path));
                let copied = files::copy_tree(&root, &rel, &state, &dest, "backup path")?;
                let total: u64 = copied.iter().map(|(_, w)| w.size).sum();
                if total < op.min_bytes {
                    for (_, written) in &copied {
                        let _ = state.remove_file(&written.rel);
                    }
                    return Err(UpgradeError::Precondition(format!(
                        "backup of {path} holds {total} bytes, less than the {} required: check the path before \
                         upgrading",
                        op.min_bytes
                    )));
                }
                for (source_rel, written) in &copied {
                    let source = root.display_path(source_rel).display().to_string();
                    backups.push(backup_of(&roots, written, &source));
                }
            }
            let note = format!("{} file(s) backed up", backups.len());
            Ok(v1::UpgradeStepResponse {
                backups,
                note,
                ..Default::default()
            })
        })
        .await
    }

    /// RestoreOp: every backup's sha256 checked first, then each put back (or fed to the declared action).
    pub async fn restore(
        &self,
        op: v1::RestoreOp,
    ) -> Result<v1::UpgradeStepResponse, UpgradeError> {
        if op.backups.is_empty() {
            return Err(UpgradeError::Invalid(
                "`backups` is empty: name what to restore".into(),
            ));
        }
        let call = match op.call.as_ref() {
            Some(call) => {
                let (action, argv) = self.host_action(Some(call))?;
                if !action.stdin {
                    return Err(UpgradeError::Invalid(format!(
                        "action `{}` does not read its standard input (declare it with stdin = true) and cannot \
                         load a backup",
                        action.name
                    )));
                }
                Some((action, argv))
            }
            None => None,
        };
        let mut plan = Vec::new();
        for backup in &op.backups {
            let saved = self.roots.locate_saved(&backup.path)?;
            let target = if call.is_none() {
                if backup.source.is_empty() {
                    return Err(UpgradeError::Invalid(format!(
                        "backup {} has no `source` to copy back to; restore a command's output with `call`",
                        backup.path
                    )));
                }
                Some(self.roots.locate(&backup.source, "restore target")?)
            } else {
                None
            };
            plan.push((backup.clone(), saved, target));
        }
        // Each backup is opened once, hashed through that descriptor and rewound: what is restored is the very
        // file whose sha256 was checked, not whatever a rename put at its path meanwhile.
        let plan = blocking(move || {
            let mut opened = Vec::new();
            for (backup, (dir, rel), target) in plan {
                let (mut file, mode) = files::open_with_mode(&dir, &rel, "backup file")?;
                let shown = dir.display_path(&rel);
                let actual = patchd_apply::fsutil::hash_reader(&mut file, ContentAlgorithm::Sha256, &shown)
                    .map_err(|e| paths::fs_error(e, "backup file"))?;
                if actual != backup.sha256 {
                    return Err(UpgradeError::Precondition(format!(
                        "backup {} changed since it was taken (sha256 {actual}, recorded {}): nothing was \
                         restored; find out who changed it, and restore by hand from a copy you trust",
                        backup.path, backup.sha256
                    )));
                }
                file.rewind().map_err(|e| {
                    UpgradeError::Internal(format!("cannot rewind backup {}: {e}", backup.path))
                })?;
                opened.push((backup, file, mode, target));
            }
            Ok(opened)
        })
        .await?;
        let mut response = v1::UpgradeStepResponse::default();
        let count = plan.len();
        for (backup, mut file, mode, target) in plan {
            match (&call, target) {
                (Some((action, argv)), _) => {
                    let streams = Streams {
                        stdin: Some(file),
                        stdout: None,
                    };
                    let finished =
                        run::run_host(&action.name, argv, &action.env, streams, action.timeout)
                            .await?;
                    if finished.exit_code != 0 {
                        return Err(UpgradeError::Precondition(format!(
                            "loading {} with `{}` exited {}; stderr: {}",
                            backup.path, action.name, finished.exit_code, finished.stderr_tail
                        )));
                    }
                    response.stderr_tail = finished.stderr_tail;
                }
                (None, Some((root, target_rel))) => {
                    blocking(move || {
                        files::write_file(&root, &target_rel, mode, |out| {
                            std::io::copy(&mut file, out).map(|_| ())
                        })
                        .map(|_| ())
                    })
                    .await?;
                }
                (None, None) => {}
            }
        }
        response.note = match &call {
            Some((action, _)) => format!("{count} backup(s) loaded with {}", action.name),
            None => format!("{count} file(s) restored"),
        };
        Ok(response)
    }

    /// YamlEditOp: the original backed up (once: a retry keeps the first copy), the edited bytes written.
    pub async fn yaml_edit(
        &self,
        area: BackupArea,
        op: v1::YamlEditOp,
    ) -> Result<v1::UpgradeStepResponse, UpgradeError> {
        if op.edits_json.len() > MAX_EDITS_JSON_BYTES {
            return Err(UpgradeError::Invalid(format!(
                "`edits_json` is {} bytes, more than the {MAX_EDITS_JSON_BYTES} a yaml_edit step may send: split \
                 the edits over several steps",
                op.edits_json.len()
            )));
        }
        let edits: Vec<Edit> = serde_json::from_str(&op.edits_json).map_err(|e| {
            UpgradeError::Invalid(format!(
                "`edits_json` is not a list of yaml_edit edits: {e}"
            ))
        })?;
        let (root, rel) = self.roots.locate(&op.file, "yaml_edit file")?;
        let roots = self.roots.clone();
        blocking(move || {
            let (original, mode) =
                files::read_file_capped(&root, &rel, MAX_YAML_FILE_BYTES, "yaml_edit file")?;
            let edited = apply_edits(&original, &edits).map_err(|e| {
                UpgradeError::Precondition(format!("yaml_edit of {}: {e}", op.file))
            })?;
            let state = roots.state_handle()?;
            let backup_rel = Roots::backup_rel(&area.upgrade_id, &area.step, Path::new(&op.file));
            let kept = state
                .stat(&backup_rel)
                .map_err(|e| paths::fs_error(e, "the yaml_edit backup"))?
                .is_some();
            let saved = if kept {
                let (bytes, _) = files::read_file_capped(
                    &state,
                    &backup_rel,
                    MAX_YAML_FILE_BYTES,
                    "the yaml_edit backup",
                )?;
                files::Written {
                    rel: backup_rel,
                    size: bytes.len() as u64,
                    sha256: hex::encode(
                        ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
                    ),
                }
            } else {
                files::write_file(&state, &backup_rel, mode, |out| out.write_all(&original))?
            };
            if !edited.changes.is_empty() {
                files::write_file(&root, &rel, mode, |out| out.write_all(&edited.bytes))?;
            }
            let note = if edited.changes.is_empty() {
                "already edited: nothing changed".to_string()
            } else {
                format!("{} change(s)", edited.changes.len())
            };
            Ok(v1::UpgradeStepResponse {
                backups: vec![backup_of(&roots, &saved, &op.file)],
                note,
                ..Default::default()
            })
        })
        .await
    }

    /// ContainerPowerOp: stop or start a declared container; already so is fine.
    pub async fn container_power(
        &self,
        op: v1::ContainerPowerOp,
    ) -> Result<v1::UpgradeStepResponse, UpgradeError> {
        let service = self.docker_service(&op.container)?;
        let engine = self.engine_for(service).await?;
        let failed = |e: patchd_docker::DockerError| UpgradeError::Precondition(e.to_string());
        let running = engine
            .inspect_container(&op.container)
            .await
            .map_err(failed)?
            .ok_or_else(|| {
                UpgradeError::Precondition(format!(
                    "container `{}` does not exist on this host: create it (or fix the service's `container`)",
                    op.container
                ))
            })?
            .state
            .and_then(|state| state.running)
            .unwrap_or(false);
        let note = match (op.start, running) {
            (true, true) => "already running".to_string(),
            (false, false) => "already stopped".to_string(),
            (true, false) => {
                engine
                    .start_container(&op.container)
                    .await
                    .map_err(failed)?;
                "started".to_string()
            }
            (false, true) => {
                engine
                    .stop_container(&op.container, service.stop_timeout())
                    .await
                    .map_err(failed)?;
                "stopped".to_string()
            }
        };
        Ok(v1::UpgradeStepResponse {
            note,
            ..Default::default()
        })
    }
}

/// The upgrade and step a backup belongs to: both name a directory of the backup area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupArea {
    pub upgrade_id: String,
    pub step: String,
}

/// The backup area of a request, its names checked (they become directory names).
pub fn backup_area(upgrade_id: &str, step: &str) -> Result<BackupArea, UpgradeError> {
    for (key, value) in [("upgrade_id", upgrade_id), ("step", step)] {
        if ParamType::Word.check(value).is_err() || value.starts_with('.') {
            return Err(UpgradeError::Invalid(format!(
                "`{key}` {value:?} must be 1 to 128 of letters, digits or `_.:@-` (it names a backup directory)"
            )));
        }
    }
    Ok(BackupArea {
        upgrade_id: upgrade_id.to_string(),
        step: step.to_string(),
    })
}
