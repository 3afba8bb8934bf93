//! Rollout leases: at most one rollout at a time may change a service. A lease names the rollout, the controller
//! that runs it (its store id, as the ticket says, and the common name of the certificate that took the lease, as
//! the handshake proved) and when it expires unless renewed.
//!
//! * `Lease(ACQUIRE)` takes a free or expired lease, or renews the caller's own; a lease held by another rollout
//!   or controller is refused with `FAILED_PRECONDITION` naming the holder, its rollout and the expiry.
//! * Apply and Rollback of a leased service must carry the lease's ticket from the same certificate; a caller
//!   without a ticket is let through only while nobody holds a live lease (single-operator tools, older
//!   controllers). Stage needs no lease: it changes nothing live and the staging cache is shared.
//! * Every change is written durably (`<state>/leases/<service>.json`, atomic replace; removal then a directory
//!   sync) before it is answered, so an agent restart keeps the lease. Expiry is by the agent's wall clock.

use patchd_apply::fsutil::{self, FsError};
use patchd_apply::layout::StateLayout;
use patchd_proto::v1;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::Status;

/// Shortest lease the agent grants: a shorter ask would expire between two renewals.
pub const MIN_TTL: Duration = Duration::from_secs(5);
/// Longest lease the agent grants: a controller that died holds a service at most this long.
pub const MAX_TTL: Duration = Duration::from_secs(600);
/// Longest rollout id or holder accepted in a ticket.
const MAX_TICKET_FIELD: usize = 128;

/// Who holds (or asks for) a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The rollout's id (its patch id).
    pub rollout_id: String,
    /// The controller's store id.
    pub holder: String,
}

impl Ticket {
    /// The ticket of a request; `None` when the request carries none.
    pub fn from_wire(wire: Option<v1::LeaseTicket>) -> Result<Option<Self>, Status> {
        let Some(wire) = wire else { return Ok(None) };
        if wire.rollout_id.is_empty() && wire.holder.is_empty() {
            return Ok(None);
        }
        for (field, value) in [("rollout_id", &wire.rollout_id), ("holder", &wire.holder)] {
            let printable = value.chars().all(|c| c.is_ascii_graphic());
            if value.is_empty() || value.len() > MAX_TICKET_FIELD || !printable {
                return Err(Status::invalid_argument(format!(
                    "lease ticket `{field}` must be 1 to {MAX_TICKET_FIELD} printable ASCII characters without \
                     spaces"
                )));
            }
        }
        Ok(Some(Self {
            rollout_id: wire.rollout_id,
            holder: wire.holder,
        }))
    }
}

/// One service's lease as stored in `<state>/leases/<service>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The leased service.
    pub service: String,
    /// Rollout and controller store.
    pub ticket: Ticket,
    /// Common name of the certificate that took the lease.
    pub holder_cn: String,
    /// When it was first granted (Unix ms, agent clock).
    pub acquired_unix_ms: i64,
    /// When it expires unless renewed (Unix ms, agent clock).
    pub expires_unix_ms: i64,
}

impl Lease {
    fn is_live(&self, now_ms: i64) -> bool {
        self.expires_unix_ms > now_ms
    }

    fn is_held_by(&self, ticket: &Ticket, cn: &str) -> bool {
        self.ticket == *ticket && self.holder_cn == cn
    }

    /// "rollout `r` of controller `cn` (store s), until <time> (in 42 s)".
    pub fn describe(&self, now_ms: i64) -> String {
        let until =
            UNIX_EPOCH + Duration::from_millis(u64::try_from(self.expires_unix_ms).unwrap_or(0));
        let left = Duration::from_millis(u64::try_from(self.expires_unix_ms - now_ms).unwrap_or(0));
        format!(
            "rollout `{}` of controller `{}` (store {}), until {} (in {} s)",
            self.ticket.rollout_id,
            self.holder_cn,
            self.ticket.holder,
            humantime::format_rfc3339_seconds(until),
            left.as_secs()
        )
    }
}

/// A lease call that was not granted.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another rollout holds a live lease on the service.
    #[error(
        "service `{service}` is leased by {holder}: another rollout is changing it; wait for that rollout to end \
         (or for its lease to expire) and run again"
    )]
    Held {
        /// The service.
        service: String,
        /// [`Lease::describe`] of the live lease.
        holder: String,
    },
    /// The service is not one of this agent's.
    #[error("no service `{0}` on this agent")]
    UnknownService(String),
    /// The lease could not be written or removed durably; nothing was granted.
    #[error("cannot record the lease: {0}")]
    Persist(#[from] FsError),
}

impl From<LeaseError> for Status {
    fn from(error: LeaseError) -> Self {
        match error {
            LeaseError::Held { .. } => Status::failed_precondition(error.to_string()),
            LeaseError::UnknownService(_) => Status::not_found(error.to_string()),
            LeaseError::Persist(_) => Status::internal(error.to_string()),
        }
    }
}

/// What an acquire granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// New expiry (Unix ms).
    pub expires_unix_ms: i64,
    /// The expired lease this one replaced, described, when it was another rollout's.
    pub taken_over: Option<String>,
}

/// The leases of one agent, loaded at start and kept on disk.
#[derive(Debug)]
pub struct LeaseBook {
    layout: StateLayout,
    leases: Mutex<HashMap<String, Lease>>,
}

impl LeaseBook {
    /// Loads the lease files of `services` (an unreadable one is logged and counts as no lease: it cannot be
    /// told from a torn file, and refusing every rollout forever would be worse).
    pub fn open<'s>(layout: StateLayout, services: impl IntoIterator<Item = &'s str>) -> Self {
        let mut leases = HashMap::new();
        for service in services {
            let path = layout.lease_of(service);
            match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<Lease>(&bytes) {
                    Ok(lease) if lease.service == service => {
                        leases.insert(service.to_string(), lease);
                    }
                    Ok(_) | Err(_) => tracing::error!(
                        path = %path.display(),
                        "ignoring an unreadable lease file; remove it"
                    ),
                },
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => tracing::error!(
                    path = %path.display(),
                    "ignoring a lease file that cannot be read: {error}"
                ),
            }
        }
        Self {
            layout,
            leases: Mutex::new(leases),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes, takes over (expired) or renews the lease of `service` for `ticket` from certificate `cn`.
    pub fn acquire(
        &self,
        service: &str,
        ticket: &Ticket,
        cn: &str,
        ttl: Duration,
        now_ms: i64,
    ) -> Result<Granted, LeaseError> {
        let ttl = ttl.clamp(MIN_TTL, MAX_TTL);
        let mut leases = self.lock();
        let current = leases.get(service);
        let taken_over = match current {
            Some(lease) if lease.is_held_by(ticket, cn) => None,
            Some(lease) if lease.is_live(now_ms) => {
                return Err(LeaseError::Held {
                    service: service.to_string(),
                    holder: lease.describe(now_ms),
                });
            }
            Some(expired) => Some(expired.describe(now_ms)),
            None => None,
        };
        let acquired_unix_ms = match current {
            Some(lease) if lease.is_held_by(ticket, cn) => lease.acquired_unix_ms,
            _ => now_ms,
        };
        let lease = Lease {
            service: service.to_string(),
            ticket: ticket.clone(),
            holder_cn: cn.to_string(),
            acquired_unix_ms,
            expires_unix_ms: now_ms
                .saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
        };
        let bytes = serde_json::to_vec_pretty(&lease).map_err(|error| {
            LeaseError::Persist(FsError {
                op: "encode lease for",
                path: self.layout.lease_of(service),
                source: std::io::Error::other(error),
            })
        })?;
        fsutil::write_atomic(&self.layout.lease_of(service), &bytes)?;
        if let Some(previous) = &taken_over {
            tracing::warn!(service, "took over the expired lease of {previous}");
        }
        if acquired_unix_ms == now_ms {
            tracing::info!(service, "leased to {}", lease.describe(now_ms));
        }
        let granted = Granted {
            expires_unix_ms: lease.expires_unix_ms,
            taken_over,
        };
        leases.insert(service.to_string(), lease);
        Ok(granted)
    }

    /// Releases the lease of `service` when `ticket` from `cn` holds it; `false` when it did not (nothing changes).
    pub fn release(&self, service: &str, ticket: &Ticket, cn: &str) -> Result<bool, LeaseError> {
        let mut leases = self.lock();
        if !leases
            .get(service)
            .is_some_and(|lease| lease.is_held_by(ticket, cn))
        {
            return Ok(false);
        }
        let path = self.layout.lease_of(service);
        fsutil::remove_if_exists(&path)?;
        fsutil::fsync_dir(fsutil::parent_of(&path)?)?;
        leases.remove(service);
        Ok(true)
    }

    /// Whether a call carrying `ticket` (or none) from `cn` may change `service` now: yes when nobody holds a
    /// live lease on it, or the caller does.
    pub fn check(
        &self,
        service: &str,
        ticket: Option<&Ticket>,
        cn: &str,
        now_ms: i64,
    ) -> Result<(), LeaseError> {
        let leases = self.lock();
        match leases.get(service) {
            Some(lease)
                if lease.is_live(now_ms) && !ticket.is_some_and(|t| lease.is_held_by(t, cn)) =>
            {
                Err(LeaseError::Held {
                    service: service.to_string(),
                    holder: lease.describe(now_ms),
                })
            }
            _ => Ok(()),
        }
    }
}

/// The agent's wall clock in Unix milliseconds (lease expiry is by this clock).
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(rollout: &str, holder: &str) -> Ticket {
        Ticket {
            rollout_id: rollout.into(),
            holder: holder.into(),
        }
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_held_lease_refuses_others_and_names_its_holder_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let book = LeaseBook::open(StateLayout::new(dir.path()), ["db"]);
        let a = ticket("r-a", "store-a");
        let b = ticket("r-b", "store-b");
        let granted = book.acquire("db", &a, "ctl-a", TTL, 1_000).unwrap();
        assert_eq!(granted.expires_unix_ms, 61_000);
        assert_eq!(granted.taken_over, None);

        let refused = book.acquire("db", &b, "ctl-b", TTL, 2_000).unwrap_err();
        let text = refused.to_string();
        assert!(text.contains("rollout `r-a`"), "{text}");
        assert!(
            text.contains("controller `ctl-a` (store store-a)"),
            "{text}"
        );
        assert!(text.contains("in 59 s"), "{text}");
        assert_eq!(
            Status::from(refused).code(),
            tonic::Code::FailedPrecondition
        );
        // The same ticket from another certificate is not the holder.
        assert!(book.acquire("db", &a, "ctl-b", TTL, 2_000).is_err());
        assert!(book.check("db", Some(&b), "ctl-b", 2_000).is_err());
        assert!(book.check("db", None, "ctl-b", 2_000).is_err());
        book.check("db", Some(&a), "ctl-a", 2_000).unwrap();

        // Renewal keeps the first grant time and extends the expiry.
        let renewed = book.acquire("db", &a, "ctl-a", TTL, 30_000).unwrap();
        assert_eq!(renewed.expires_unix_ms, 90_000);

        // Expired: anyone may change the service, and another rollout takes it over.
        book.check("db", None, "ctl-b", 90_000).unwrap();
        let taken = book.acquire("db", &b, "ctl-b", TTL, 90_000).unwrap();
        assert!(taken.taken_over.unwrap().contains("rollout `r-a`"));
        assert!(book.check("db", Some(&a), "ctl-a", 90_001).is_err());
    }

    #[test]
    fn a_lease_survives_a_reopen_and_a_release_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StateLayout::new(dir.path());
        let a = ticket("r-a", "store-a");
        {
            let book = LeaseBook::open(layout.clone(), ["db", "web"]);
            book.acquire("db", &a, "ctl-a", TTL, 1_000).unwrap();
        }
        assert!(layout.lease_of("db").exists());
        let book = LeaseBook::open(layout.clone(), ["db", "web"]);
        assert!(book.check("db", None, "other", 2_000).is_err());
        book.check("web", None, "other", 2_000).unwrap();

        assert!(
            !book
                .release("db", &ticket("r-b", "store-b"), "ctl-b")
                .unwrap()
        );
        assert!(layout.lease_of("db").exists());
        assert!(book.release("db", &a, "ctl-a").unwrap());
        assert!(!layout.lease_of("db").exists());
        book.check("db", None, "other", 2_000).unwrap();
        let reopened = LeaseBook::open(layout, ["db"]);
        reopened.check("db", None, "other", 2_000).unwrap();
    }

    #[test]
    fn ttl_is_bounded_and_bad_tickets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let book = LeaseBook::open(StateLayout::new(dir.path()), ["db"]);
        let a = ticket("r-a", "store-a");
        let granted = book
            .acquire("db", &a, "c", Duration::from_secs(86_400), 0)
            .unwrap();
        assert_eq!(granted.expires_unix_ms, 600_000);
        let granted = book.acquire("db", &a, "c", Duration::ZERO, 0).unwrap();
        assert_eq!(granted.expires_unix_ms, 5_000);

        assert_eq!(Ticket::from_wire(None).unwrap(), None);
        let spaced = v1::LeaseTicket {
            rollout_id: "a b".into(),
            holder: "h".into(),
        };
        assert_eq!(
            Ticket::from_wire(Some(spaced)).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
