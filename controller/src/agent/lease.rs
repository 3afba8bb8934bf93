//! The controller's side of rollout leases: take a rollout's lease on each node's service, renew every lease it
//! holds in the background (every third of the lease's lifetime) while the rollout runs, and give them all back
//! at the end. The agent's side and the rules: `patchd_agent::lease`; the rollout's use of them: the `executor`
//! module doc.

use super::client::AgentClient;
use super::ops::{self, LeaseTicket};
use crate::executor::LeaseFailure;
use crate::tls_files::ControllerTls;
use crate::topology::Node;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How long a lease holds without renewal: long enough to ride out a short network cut, short enough that a
/// controller killed mid-rollout blocks others only briefly.
pub const LEASE_TTL: Duration = Duration::from_secs(60);
/// How long one lease call (connect included) may take.
const LEASE_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The leases one rollout holds.
pub struct LeaseKeeper {
    ticket: LeaseTicket,
    tls: ControllerTls,
    ttl: Duration,
    held: Arc<Mutex<Vec<Node>>>,
    renewer: Mutex<Option<JoinHandle<()>>>,
}

impl LeaseKeeper {
    /// Leases for `ticket`, held for [`LEASE_TTL`] between renewals.
    pub fn new(ticket: LeaseTicket, tls: ControllerTls) -> Self {
        Self {
            ticket,
            tls,
            ttl: LEASE_TTL,
            held: Arc::new(Mutex::new(Vec::new())),
            renewer: Mutex::new(None),
        }
    }

    /// The rollout's ticket (Apply and Rollback carry it).
    pub fn ticket(&self) -> &LeaseTicket {
        &self.ticket
    }

    /// Takes (or renews) the lease of `node`'s service and keeps it renewed until [`Self::release_all`].
    pub async fn take(&self, node: &Node) -> Result<(), LeaseFailure> {
        let grant = tokio::time::timeout(
            LEASE_CALL_TIMEOUT,
            acquire(&self.tls, node, &self.ticket, self.ttl),
        )
        .await
        .unwrap_or_else(|_| {
            Err(LeaseFailure::Unanswered(format!(
                "no answer to the lease call within {}s",
                LEASE_CALL_TIMEOUT.as_secs()
            )))
        })?;
        if !grant.taken_over.is_empty() {
            tracing::warn!(
                node = %node.id,
                "took over an expired lease: {}",
                grant.taken_over
            );
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !held.iter().any(|known| known.id == node.id) {
            held.push(node.clone());
        }
        drop(held);
        self.start_renewing();
        Ok(())
    }

    fn start_renewing(&self) {
        let mut renewer = self.renewer.lock().unwrap_or_else(|p| p.into_inner());
        if renewer.is_some() {
            return;
        }
        let held = Arc::clone(&self.held);
        let tls = self.tls.clone();
        let ticket = self.ticket.clone();
        let ttl = self.ttl;
        *renewer = Some(tokio::spawn(async move {
            let every = ttl / 3;
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let nodes = held.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let renewals = nodes.iter().map(|node| {
                    let (tls, ticket) = (&tls, &ticket);
                    async move {
                        let renewed = tokio::time::timeout(
                            LEASE_CALL_TIMEOUT,
                            acquire(tls, node, ticket, ttl),
                        )
                        .await;
                        match renewed {
                            Ok(Ok(_)) => {}
                            Ok(Err(failure)) => tracing::warn!(
                                node = %node.id,
                                "cannot renew the rollout's lease (the agent refuses changes once another \
                                 rollout holds it): {failure}"
                            ),
                            Err(_) => tracing::warn!(
                                node = %node.id,
                                "no answer renewing the rollout's lease"
                            ),
                        }
                    }
                });
                futures::future::join_all(renewals).await;
            }
        }));
    }

    /// Stops renewing and releases every lease taken (best effort: one not released expires by itself).
    pub async fn release_all(&self) {
        if let Some(renewer) = self
            .renewer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            renewer.abort();
        }
        let nodes = std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()));
        let releases = nodes.iter().map(|node| async move {
            let released =
                tokio::time::timeout(LEASE_CALL_TIMEOUT, release(&self.tls, node, &self.ticket))
                    .await;
            if !matches!(released, Ok(Ok(()))) {
                tracing::warn!(
                    node = %node.id,
                    "could not release the rollout's lease; it expires within {}s",
                    self.ttl.as_secs()
                );
            }
        });
        futures::future::join_all(releases).await;
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(renewer) = self
            .renewer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            renewer.abort();
        }
    }
}

async fn acquire(
    tls: &ControllerTls,
    node: &Node,
    ticket: &LeaseTicket,
    ttl: Duration,
) -> Result<ops::LeaseGrant, LeaseFailure> {
    let mut client = AgentClient::connect(&node.agent_address(), tls)
        .await
        .map_err(|error| LeaseFailure::Unanswered(error.to_string()))?;
    ops::acquire_lease(client.raw(), &node.service, ticket, ttl)
        .await
        .map_err(|status| match status.code() {
            tonic::Code::FailedPrecondition => LeaseFailure::Held(status.message().to_string()),
            tonic::Code::Unimplemented => LeaseFailure::Unanswered(
                "the agent does not know leases (an older patchd): upgrade it so that two controllers cannot \
                 collide on it"
                    .to_string(),
            ),
            code => LeaseFailure::Unanswered(format!("Lease: {code:?}: {}", status.message())),
        })
}

async fn release(tls: &ControllerTls, node: &Node, ticket: &LeaseTicket) -> Result<(), String> {
    let mut client = AgentClient::connect(&node.agent_address(), tls)
        .await
        .map_err(|error| error.to_string())?;
    ops::release_lease(client.raw(), &node.service, ticket)
        .await
        .map_err(|status| status.message().to_string())
}
