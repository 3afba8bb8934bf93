//! Typed agent calls for rollouts and display: Stage, Apply, Rollback and Status over the generated gRPC client,
//! converted into controller domain types at this boundary (generated types do not leak further).

use crate::executor::{ApplyOutcome, CallError, NodeApplyResult};
use crate::untrusted::escaped;
use patchd_package::digest::TreeDigest;
use patchd_proto::v1;
use std::time::Duration;
use tonic::transport::Channel;

/// The generated gRPC client of the agent service.
pub type AgentRpc = v1::agent_client::AgentClient<Channel>;

/// What the agent said after staging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageInfo {
    /// Digest staged.
    pub digest: String,
    /// Component named by the staged manifest.
    pub component: String,
    /// Version named by the staged manifest.
    pub version: String,
    /// It was staged by an earlier call.
    pub already_staged: bool,
}

/// Run state of a managed service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Running.
    Running,
    /// Stopped.
    Stopped,
    /// Exited with an error, not restarted.
    Failed,
    /// Starting.
    Starting,
    /// The agent cannot tell.
    Unknown,
}

/// One apply or rollback the agent remembers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PatchRecord {
    /// Patch id (the controller's idempotency key).
    pub patch_id: String,
    /// Package digest.
    pub digest: String,
    /// Version label.
    pub version: String,
    /// Outcome.
    #[serde(serialize_with = "serialize_outcome")]
    pub outcome: ApplyOutcome,
    /// Reason when it did not commit.
    pub reason: String,
    /// When it finished (Unix seconds).
    pub finished_unix: i64,
    /// Who asked for it, as the agent recorded it from the controller certificate: CN, operator and serial
    /// ("" when the agent did not record it).
    pub caller: String,
}

fn serialize_outcome<S: serde::Serializer>(
    outcome: &ApplyOutcome,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(outcome_name(*outcome))
}

/// Text form of an outcome.
pub fn outcome_name(outcome: ApplyOutcome) -> &'static str {
    match outcome {
        ApplyOutcome::Committed => "committed",
        ApplyOutcome::Reverted => "reverted",
        ApplyOutcome::OfflineSwapped => "offline_swapped",
        ApplyOutcome::Failed => "failed",
    }
}

/// A managed service as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceInfo {
    /// Service name.
    pub name: String,
    /// Package component it accepts.
    pub component: String,
    /// Run state.
    pub state: RunState,
    /// Main process id (0 if none).
    pub pid: u32,
    /// Seconds since the service (re)started.
    pub uptime_seconds: u64,
    /// sha256 of the deployed main binary.
    pub binary_sha256: String,
    /// Version label of the running patch ("" when never patched).
    pub version: String,
    /// Deploy directory.
    pub deploy_dir: String,
    /// Last apply/rollback.
    pub last: Option<PatchRecord>,
    /// An apply is running right now.
    pub apply_in_flight: bool,
    /// Committed patches kept as backups, newest first.
    pub history: Vec<PatchRecord>,
    /// Why the agent quarantined the service and what to do ("" when it is not).
    pub quarantine: String,
    /// Backup sets the agent kept aside because no journal referred to them.
    pub quarantined_backups: Vec<String>,
    /// A container service's image, `tag (short id)` ("" for other backends).
    pub image: String,
}

impl ServiceInfo {
    /// The service runs a committed apply of `digest` (so patching it again would change nothing).
    pub fn runs_digest(&self, digest: &TreeDigest) -> bool {
        matches!(&self.last, Some(last) if *digest == last.digest && last.outcome == ApplyOutcome::Committed)
    }

    /// `Version` column: the version label, else the first 12 hex digits of the binary's sha256; a container
    /// service's image (`tag (short id)`) follows.
    pub fn version_label(&self) -> String {
        let label = self.file_version_label();
        if self.image.is_empty() {
            label
        } else if label == "-" {
            self.image.clone()
        } else {
            format!("{label} {}", self.image)
        }
    }

    fn file_version_label(&self) -> String {
        if !self.version.is_empty() {
            self.version.clone()
        } else if self.binary_sha256.is_empty() {
            "-".to_string()
        } else {
            self.binary_sha256.chars().take(12).collect()
        }
    }
}

fn outcome_from_wire(value: i32) -> Option<ApplyOutcome> {
    match v1::ApplyOutcome::try_from(value).ok()? {
        v1::ApplyOutcome::Committed => Some(ApplyOutcome::Committed),
        v1::ApplyOutcome::Reverted => Some(ApplyOutcome::Reverted),
        v1::ApplyOutcome::OfflineSwapped => Some(ApplyOutcome::OfflineSwapped),
        v1::ApplyOutcome::Failed => Some(ApplyOutcome::Failed),
        v1::ApplyOutcome::Unspecified => None,
    }
}

fn patch_record(wire: v1::AppliedPatch) -> Option<PatchRecord> {
    Some(PatchRecord {
        outcome: outcome_from_wire(wire.outcome)?,
        patch_id: escaped(&wire.patch_id),
        digest: escaped(&wire.digest),
        version: escaped(&wire.version),
        reason: escaped(&wire.reason),
        finished_unix: wire.finished_unix,
        caller: wire.caller,
    })
}

fn service_info(wire: v1::ServiceStatus) -> ServiceInfo {
    let state = match v1::ServiceState::try_from(wire.state) {
        Ok(v1::ServiceState::Running) => RunState::Running,
        Ok(v1::ServiceState::Stopped) => RunState::Stopped,
        Ok(v1::ServiceState::Failed) => RunState::Failed,
        Ok(v1::ServiceState::Starting) => RunState::Starting,
        _ => RunState::Unknown,
    };
    // Everything here is text from the agent: escaped once, at this boundary (`crate::untrusted`).
    ServiceInfo {
        name: escaped(&wire.name),
        component: escaped(&wire.component),
        state,
        pid: wire.pid,
        uptime_seconds: wire.uptime_seconds,
        binary_sha256: escaped(&wire.binary_sha256),
        version: escaped(&wire.version),
        deploy_dir: escaped(&wire.deploy_dir),
        last: wire.last.and_then(patch_record),
        apply_in_flight: wire.apply_in_flight,
        history: wire.history.into_iter().filter_map(patch_record).collect(),
        quarantine: escaped(&wire.quarantine),
        quarantined_backups: wire
            .quarantined_backups
            .iter()
            .map(|path| escaped(path))
            .collect(),
        image: escaped(&wire.image),
    }
}

fn apply_result(wire: v1::ApplyResponse) -> Result<NodeApplyResult, CallError> {
    let outcome = outcome_from_wire(wire.outcome).ok_or_else(|| {
        CallError::Refused(format!(
            "the agent answered without an outcome (patch {})",
            escaped(&wire.patch_id)
        ))
    })?;
    tracing::debug!(
        patch = %escaped(&wire.patch_id),
        steps = ?wire.steps.iter().map(|step| (step.step.as_str(), step.millis)).collect::<Vec<_>>(),
        "the agent's apply steps (ms)"
    );
    let mut reason = escaped(&wire.reason);
    // The service's own last words explain a failed start; the agent's `--- patchd …` markers do not.
    let tail: Vec<&str> = wire
        .log_tail
        .iter()
        .map(|line| line.trim())
        .filter(|line| !line.is_empty() && !line.starts_with("--- patchd"))
        .collect();
    if outcome != ApplyOutcome::Committed && !tail.is_empty() {
        let last = &tail[tail.len().saturating_sub(2)..];
        reason = format!("{reason} (service output: {})", escaped(&last.join(" | ")));
    }
    Ok(NodeApplyResult {
        outcome,
        reason,
        replayed: wire.replayed,
        downtime: Duration::from_millis(wire.downtime_ms),
    })
}

/// Classifies a failed call on an established connection: codes that mean the agent decided (bad request,
/// unknown service, …) changed nothing; transport-level codes leave the outcome unknown.
pub fn classify(status: &tonic::Status) -> CallError {
    use tonic::Code;
    let text = format!(
        "{}: {}",
        code_name(status.code()),
        escaped(status.message())
    );
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Internal => CallError::Unknown(text),
        _ => CallError::Refused(text),
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// `Stage`: unpack a held blob for `service`; `signatures` are the package's minisign signature texts.
pub async fn stage(
    rpc: &mut AgentRpc,
    service: &str,
    digest: &TreeDigest,
    signatures: &[String],
) -> Result<StageInfo, tonic::Status> {
    let request = v1::StageRequest {
        service: service.to_string(),
        digest: digest.to_string(),
        signatures: signatures.to_vec(),
    };
    let response = rpc.stage(request).await?.into_inner();
    let manifest = response.manifest.unwrap_or_default();
    Ok(StageInfo {
        digest: escaped(&response.digest),
        component: escaped(&manifest.component),
        version: escaped(&manifest.version),
        already_staged: response.already_staged,
    })
}

/// A rollout's claim on the services it changes: its id and the controller's store id (the agent adds the
/// certificate's common name). See `crate::agent::lease`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTicket {
    /// The rollout (its patch id).
    pub rollout_id: String,
    /// The controller's store id ([`crate::store::Store::store_id`]).
    pub holder: String,
}

impl LeaseTicket {
    pub(crate) fn to_wire(&self) -> v1::LeaseTicket {
        v1::LeaseTicket {
            rollout_id: self.rollout_id.clone(),
            holder: self.holder.clone(),
        }
    }
}

/// What the agent granted for a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Expiry on the agent's clock (Unix ms).
    pub expires_unix_ms: i64,
    /// The expired lease of another rollout this one replaced, described ("" when none).
    pub taken_over: String,
}

/// `Lease(ACQUIRE)`: take or renew `ticket`'s lease on `service` for `ttl`. A lease held by another rollout
/// comes back as `FAILED_PRECONDITION` naming it.
pub async fn acquire_lease(
    rpc: &mut AgentRpc,
    service: &str,
    ticket: &LeaseTicket,
    ttl: Duration,
) -> Result<LeaseGrant, tonic::Status> {
    let request = v1::LeaseRequest {
        service: service.to_string(),
        ticket: Some(ticket.to_wire()),
        action: v1::LeaseAction::Acquire.into(),
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
    };
    let response = rpc.lease(request).await?.into_inner();
    Ok(LeaseGrant {
        expires_unix_ms: response.expires_unix_ms,
        taken_over: response.taken_over,
    })
}

/// `Lease(RELEASE)`: give `ticket`'s lease on `service` back (nothing changes when it does not hold it).
pub async fn release_lease(
    rpc: &mut AgentRpc,
    service: &str,
    ticket: &LeaseTicket,
) -> Result<(), tonic::Status> {
    let request = v1::LeaseRequest {
        service: service.to_string(),
        ticket: Some(ticket.to_wire()),
        action: v1::LeaseAction::Release.into(),
        ttl_ms: 0,
    };
    rpc.lease(request).await?;
    Ok(())
}

/// `Apply` with `patch_id` as the idempotency key, under the rollout's lease when it has one; `signatures` as
/// for [`stage`].
pub async fn apply(
    rpc: &mut AgentRpc,
    service: &str,
    digest: &TreeDigest,
    patch_id: &str,
    offline: bool,
    lease: Option<&LeaseTicket>,
    signatures: &[String],
) -> Result<NodeApplyResult, CallError> {
    apply_with_env(
        rpc,
        service,
        digest,
        patch_id,
        offline,
        lease,
        signatures,
        &std::collections::BTreeMap::new(),
    )
    .await
}

/// [`apply`] whose new container gets `env_add` on top of the old one's environment (backend `docker` only: an
/// upgrade runbook's container swap).
#[allow(clippy::too_many_arguments)] // one per field of ApplyRequest
pub async fn apply_with_env(
    rpc: &mut AgentRpc,
    service: &str,
    digest: &TreeDigest,
    patch_id: &str,
    offline: bool,
    lease: Option<&LeaseTicket>,
    signatures: &[String],
    env_add: &std::collections::BTreeMap<String, String>,
) -> Result<NodeApplyResult, CallError> {
    let request = v1::ApplyRequest {
        service: service.to_string(),
        digest: digest.to_string(),
        patch_id: patch_id.to_string(),
        offline,
        lease: lease.map(LeaseTicket::to_wire),
        signatures: signatures.to_vec(),
        env_add: env_add
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
    };
    let response = rpc
        .apply(request)
        .await
        .map_err(|status| classify(&status))?
        .into_inner();
    apply_result(response)
}

/// `Rollback` of `service` to before `to_patch_id` (or the last committed patch), as operation `patch_id`, under
/// the rollout's lease when it has one.
pub async fn rollback(
    rpc: &mut AgentRpc,
    service: &str,
    to_patch_id: Option<&str>,
    patch_id: &str,
    lease: Option<&LeaseTicket>,
) -> Result<NodeApplyResult, CallError> {
    let request = v1::RollbackRequest {
        service: service.to_string(),
        to_patch_id: to_patch_id.unwrap_or_default().to_string(),
        patch_id: patch_id.to_string(),
        lease: lease.map(LeaseTicket::to_wire),
    };
    let response = rpc
        .rollback(request)
        .await
        .map_err(|status| classify(&status))?
        .into_inner();
    apply_result(response)
}

/// `Status` of one service (`Some`) or of all.
pub async fn status(
    rpc: &mut AgentRpc,
    service: Option<&str>,
) -> Result<Vec<ServiceInfo>, tonic::Status> {
    let request = v1::StatusRequest {
        service: service.unwrap_or_default().to_string(),
    };
    let response = rpc.status(request).await?.into_inner();
    Ok(response.services.into_iter().map(service_info).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_answers_convert_with_the_service_output_on_failure() {
        let wire = v1::ApplyResponse {
            patch_id: "p".into(),
            outcome: v1::ApplyOutcome::Reverted as i32,
            reason: "exited with status 3".into(),
            log_tail: vec![
                "a".into(),
                "b".into(),
                "c".into(),
                "--- patchd 2026: starting x".into(),
                "boom".into(),
            ],
            replayed: true,
            downtime_ms: 1500,
            ..Default::default()
        };
        let result = apply_result(wire).unwrap();
        assert_eq!(result.outcome, ApplyOutcome::Reverted);
        assert!(result.replayed);
        assert_eq!(result.downtime, Duration::from_millis(1500));
        assert_eq!(
            result.reason,
            "exited with status 3 (service output: c | boom)"
        );
        let missing = v1::ApplyResponse {
            outcome: 0,
            ..Default::default()
        };
        assert!(matches!(apply_result(missing), Err(CallError::Refused(_))));
    }

    #[test]
    fn agent_and_service_text_arrives_escaped() {
        let wire = v1::ApplyResponse {
            patch_id: "p".into(),
            outcome: v1::ApplyOutcome::Reverted as i32,
            reason: "exited\x1b[2J".into(),
            log_tail: vec!["\x1b]8;;https://evil.example\x07click\x1b]8;;\x07".into()],
            ..Default::default()
        };
        let result = apply_result(wire).unwrap();
        assert!(!result.reason.contains('\x1b'), "{}", result.reason);
        assert_eq!(
            result.reason,
            "exited\\x1b[2J (service output: \\x1b]8;;https://evil.example\\x07click\\x1b]8;;\\x07)"
        );
        let info = service_info(v1::ServiceStatus {
            name: "svc".into(),
            version: "v1\u{202e}1v".into(),
            quarantine: "journal\x1b]0;owned\x07".into(),
            quarantined_backups: vec!["/q/\x1b[31mred".into()],
            last: Some(v1::AppliedPatch {
                outcome: v1::ApplyOutcome::Failed as i32,
                reason: "bad\x07".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(info.version, "v1\\u{202e}1v");
        assert_eq!(info.quarantine, "journal\\x1b]0;owned\\x07");
        assert_eq!(info.quarantined_backups, ["/q/\\x1b[31mred"]);
        assert_eq!(info.last.unwrap().reason, "bad\\x07");
        let CallError::Refused(text) =
            classify(&tonic::Status::permission_denied("no\x1b]0;x\x07"))
        else {
            panic!("a refusal");
        };
        assert_eq!(text, "PermissionDenied: no\\x1b]0;x\\x07");
    }

    #[test]
    fn transport_failures_leave_the_outcome_unknown_and_refusals_do_not() {
        assert!(matches!(
            classify(&tonic::Status::unavailable("reset")),
            CallError::Unknown(_)
        ));
        assert!(matches!(
            classify(&tonic::Status::not_found("no service x")),
            CallError::Refused(_)
        ));
        assert!(matches!(
            classify(&tonic::Status::failed_precondition("not staged")),
            CallError::Refused(_)
        ));
    }

    #[test]
    fn a_service_runs_a_digest_only_after_a_committed_apply() {
        let digest = |c: &str| -> TreeDigest { c.repeat(64).parse().unwrap() };
        let record = |outcome| PatchRecord {
            patch_id: "p".into(),
            digest: "d".repeat(64),
            version: "v".into(),
            outcome,
            reason: String::new(),
            finished_unix: 0,
            caller: String::new(),
        };
        let mut info = service_info(v1::ServiceStatus {
            binary_sha256: "0123456789abcdef".into(),
            ..Default::default()
        });
        assert_eq!(info.version_label(), "0123456789ab");
        info.last = Some(record(ApplyOutcome::Reverted));
        assert!(!info.runs_digest(&digest("d")));
        info.last = Some(record(ApplyOutcome::Committed));
        assert!(info.runs_digest(&digest("d")));
        assert!(!info.runs_digest(&digest("e")));
    }
}
