//! The rollout engine's live effects: agents over mutual TLS (stage, apply, rollback, status) and the cluster's
//! HTTP hooks.

use super::client::{AgentClient, AgentClientError, PreparedBlob, PushOptions, PushProgress};
use super::lease::LeaseKeeper;
use super::ops;
use crate::executor::{
    Action, ApplyCall, CallError, HookFailure, HookKind, HookOutcome, LeaseFailure,
    NodeApplyResult, NodeRef, RolloutEffects, StageReport,
};
use crate::hooks::ClusterHooks;
use crate::tls_files::ControllerTls;
use crate::topology::{Node, Topology};
use crate::untrusted::escaped;
use std::sync::Arc;
use std::time::Duration;

/// How long one Apply/Rollback call may take (stop, swap, start, probation) before its answer counts as lost.
pub const APPLY_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Progress callback of the uploads: (node, bytes done, total).
pub type PushProgressFn = Arc<dyn Fn(&NodeRef, PushProgress) + Send + Sync>;

/// Agents over mutual TLS and the cluster's hooks.
pub struct LiveEffects {
    topology: Arc<Topology>,
    hooks: ClusterHooks,
    tls: ControllerTls,
    blob: Option<Arc<PreparedBlob>>,
    on_push: PushProgressFn,
    leases: LeaseKeeper,
}

impl LiveEffects {
    /// Effects for a cluster; `blob` is the prepared package of a patch (`None` for a rollback); `leases` the
    /// rollout's leases (its ticket goes with every Apply and Rollback).
    pub fn new(
        topology: Arc<Topology>,
        hooks: ClusterHooks,
        tls: ControllerTls,
        blob: Option<Arc<PreparedBlob>>,
        on_push: PushProgressFn,
        leases: LeaseKeeper,
    ) -> Self {
        Self {
            topology,
            hooks,
            tls,
            blob,
            on_push,
            leases,
        }
    }

    fn node(&self, node: &NodeRef) -> Result<&Node, CallError> {
        self.topology.node_by_id(&node.id).ok_or_else(|| {
            CallError::Refused(format!(
                "node {} is no longer in the cluster's topology",
                node.id
            ))
        })
    }

    async fn connect(&self, node: &Node) -> Result<AgentClient, CallError> {
        AgentClient::connect(&node.agent_address(), &self.tls)
            .await
            .map_err(|error| CallError::NotSent(error.to_string()))
    }
}

/// A push's error: the agent refused, or it could not be reached (it may have died mid-upload: the connection
/// broke). Either way nothing live changed on the node (this is staging).
fn client_error(error: AgentClientError) -> CallError {
    match &error {
        AgentClientError::Connect { .. } | AgentClientError::BadAddress(_) => {
            CallError::NotSent(error.to_string())
        }
        AgentClientError::Rpc { code, detail, .. } if connection_lost(*code, detail) => {
            CallError::NotSent(error.to_string())
        }
        _ => CallError::Refused(error.to_string()),
    }
}

/// tonic reports a connection that broke under a call as `Unavailable`, or as `Unknown` with a transport error:
/// no answer of the agent's.
fn connection_lost(code: tonic::Code, detail: &str) -> bool {
    code == tonic::Code::Unavailable
        || (code == tonic::Code::Unknown && detail.starts_with("transport error"))
}

impl RolloutEffects for LiveEffects {
    async fn stage(&self, node_ref: &NodeRef) -> Result<StageReport, CallError> {
        let node = self.node(node_ref)?;
        let Some(blob) = &self.blob else {
            return Err(CallError::Refused(
                "nothing to stage: no package".to_string(),
            ));
        };
        let mut client = self.connect(node).await?;
        let services = ops::status(client.raw(), Some(&node.service))
            .await
            .map_err(|status| {
                CallError::Refused(format!("Status: {}", escaped(status.message())))
            })?;
        let Some(service) = services
            .into_iter()
            .find(|service| service.name == node.service)
        else {
            return Err(CallError::Refused(format!(
                "agent {} manages no service `{}`: add it to the agent's patchd.toml or fix the topology",
                node.agent_address(),
                node.service
            )));
        };
        if service.runs_digest(&blob.digest) {
            return Ok(StageReport {
                already_running: true,
                bytes_pushed: 0,
            });
        }
        let on_push = Arc::clone(&self.on_push);
        let report = client
            .push(blob, &PushOptions::default(), |progress| {
                on_push(node_ref, progress)
            })
            .await
            .map_err(client_error)?;
        ops::stage(client.raw(), &node.service, &blob.digest, &blob.signatures)
            .await
            .map_err(|status| {
                CallError::Refused(format!(
                    "Stage: {:?}: {}",
                    status.code(),
                    escaped(status.message())
                ))
            })?;
        Ok(StageReport {
            already_running: false,
            bytes_pushed: report.bytes_sent,
        })
    }

    async fn hook(&self, node_ref: &NodeRef, hook: HookKind) -> Result<HookOutcome, HookFailure> {
        let node = self
            .node(node_ref)
            .map_err(|error| HookFailure::Failed(error.to_string()))?;
        // A hook's failure quotes the cluster API's answer: service text, escaped before the store and terminal.
        self.hooks
            .run(node, hook)
            .await
            .map_err(|failure| match failure {
                HookFailure::Timeout { waited, last } => HookFailure::Timeout {
                    waited,
                    last: escaped(&last),
                },
                HookFailure::Failed(message) => HookFailure::Failed(escaped(&message)),
            })
    }

    async fn apply(
        &self,
        node_ref: &NodeRef,
        call: &ApplyCall,
    ) -> Result<NodeApplyResult, CallError> {
        let node = self.node(node_ref)?;
        // A fresh connection per call: a refused connection then proves the request was never sent.
        let mut client = self.connect(node).await?;
        let answer = match &call.action {
            Action::Patch { digest, offline } => {
                let signatures = self
                    .blob
                    .as_ref()
                    .map_or(&[][..], |blob| blob.signatures.as_slice());
                tokio::time::timeout(
                    APPLY_CALL_TIMEOUT,
                    ops::apply(
                        client.raw(),
                        &node.service,
                        digest,
                        &call.patch_id,
                        *offline,
                        Some(self.leases.ticket()),
                        signatures,
                    ),
                )
                .await
            }
            Action::Rollback { to_patch_id } => {
                tokio::time::timeout(
                    APPLY_CALL_TIMEOUT,
                    ops::rollback(
                        client.raw(),
                        &node.service,
                        to_patch_id.as_deref(),
                        &call.patch_id,
                        Some(self.leases.ticket()),
                    ),
                )
                .await
            }
        };
        answer.unwrap_or_else(|_| {
            Err(CallError::Unknown(format!(
                "no answer within {}s",
                APPLY_CALL_TIMEOUT.as_secs()
            )))
        })
    }

    async fn undo(&self, node_ref: &NodeRef, patch_id: &str) -> Result<NodeApplyResult, CallError> {
        let node = self.node(node_ref)?;
        let mut client = self.connect(node).await?;
        let operation = format!("{patch_id}-undo");
        tokio::time::timeout(
            APPLY_CALL_TIMEOUT,
            ops::rollback(
                client.raw(),
                &node.service,
                Some(patch_id),
                &operation,
                Some(self.leases.ticket()),
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(CallError::Unknown(format!(
                "no answer within {}s",
                APPLY_CALL_TIMEOUT.as_secs()
            )))
        })
    }

    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }

    async fn lease(&self, node_ref: &NodeRef) -> Result<(), LeaseFailure> {
        let node = self
            .node(node_ref)
            .map_err(|error| LeaseFailure::Unanswered(error.to_string()))?;
        self.leases.take(node).await
    }

    async fn release_leases(&self) {
        self.leases.release_all().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(code: tonic::Code, detail: &str) -> AgentClientError {
        AgentClientError::Rpc {
            addr: "127.0.1.4:7480".into(),
            call: "Upload",
            code,
            detail: detail.into(),
        }
    }

    #[test]
    fn a_push_cut_by_a_dead_agent_is_unreachable_and_a_refusal_stays_a_refusal() {
        let cut = rpc(
            tonic::Code::Unknown,
            "transport error: connection error: peer closed connection without sending TLS close_notify",
        );
        assert!(matches!(client_error(cut), CallError::NotSent(_)));
        let gone = rpc(tonic::Code::Unavailable, "connection reset");
        assert!(matches!(client_error(gone), CallError::NotSent(_)));
        let refused = rpc(tonic::Code::ResourceExhausted, "not enough disk space");
        assert!(matches!(client_error(refused), CallError::Refused(_)));
        let other_unknown = rpc(tonic::Code::Unknown, "the agent panicked");
        assert!(matches!(client_error(other_unknown), CallError::Refused(_)));
    }
}
