//! Ticket allocators: who decides how many clones a ticket gets and on
//! which hosts. [`Allocator`] is the seam: [`fixed::FixedSlots`] spreads
//! clones over this host and its peers by their free VM slots (the
//! `static` kind of `host.toml`), [`slurm::SlurmAllocator`] holds one Slurm
//! allocation per ticket, so the cluster's own scheduler decides (quota,
//! fairshare, accounting) and its nodes are the only ones clones land on.
//!
//! An allocator answers with an [`Offer`]: hosts and the clone slots each
//! may take. The ticket itself (quota per VM, clone IDs, the placement)
//! is still decided by `ops::api`, under the registry's lock.
//!
//! May import: `cluster` (capacity questions to peers), `host`
//! (configuration), `snowflock_proto`. Never `state`, `lifecycle`, `ops` or
//! `frontends`.

#[cfg(test)]
pub mod fake;
pub mod fixed;
pub mod slurm;
pub mod slurm_text;

use futures::future::BoxFuture;
use snowflock_proto::admin::AdminResponse;
use snowflock_proto::peer::PeerRequest;
use std::time::Duration;

/// What a ticket request asks of the allocator.
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    /// The ticket being granted (names the Slurm allocation).
    pub ticket: &'a str,
    /// The VM asking.
    pub vm: &'a str,
    /// Most clones the ticket may get (after quota and clone IDs).
    pub most: u32,
}

/// Where a ticket's clones may go.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    /// Hosts other than this one, with the clone slots each may take.
    pub hosts: Vec<(String, u32)>,
    /// Most clones this host itself may take (its free slots bound them
    /// too, counted when the ticket is granted); 0 for none.
    pub here: u32,
}

/// Why an allocator grants nothing.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Nothing free within the allowed wait.
    #[error("{0}")]
    NoCapacity(String),
    /// The scheduler cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The scheduler refused the request (a configuration matter).
    #[error("{0}")]
    Refused(String),
    /// The scheduler's commands cannot be run.
    #[error("cannot run {what}")]
    Spawn {
        what: String,
        #[source]
        err: std::io::Error,
    },
}

/// Grants tickets and releases what it holds for them.
pub trait Allocator: Send + Sync + 'static {
    /// `static` or `slurm`, for logs and `snowflock status`.
    fn kind(&self) -> &'static str;

    /// Where up to `want.most` clones may go. What it takes for the ticket
    /// (a Slurm allocation) is held until [`Allocator::keep_only`] no
    /// longer names the ticket, or [`Allocator::release`].
    fn offer<'a>(&'a self, want: Want<'a>) -> BoxFuture<'a, Result<Offer, AllocError>>;

    // The rest has defaults for an allocator that holds nothing.

    /// Releases what is held for `ticket` (a ticket that was not granted
    /// after all); nothing if nothing is held.
    fn release<'a>(&'a self, _ticket: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Releases everything held for tickets not in `live`, including what
    /// an earlier run of this daemon left behind. Called whenever tickets
    /// change and every few seconds.
    fn keep_only<'a>(&'a self, _live: &'a [String]) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// What is held now: (ticket, Slurm job), by ticket.
    fn held(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Tickets whose hold ended without being released (a Slurm time
    /// limit, `scancel` by an administrator), with the reason; each is
    /// reported once. Their clones should end.
    fn lost(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Notified when [`Allocator::lost`] has something new, for allocators
    /// whose holds can end on their own.
    fn lost_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
}

/// Free VM slots of `hosts` as their daemons report them, asked at once;
/// `None` for a host that did not answer.
pub async fn capacity_of(
    peers: &dyn crate::cluster::PeerChannel,
    hosts: &[String],
    timeout: Duration,
) -> Vec<(String, Option<u32>)> {
    let answers = futures::future::join_all(
        hosts
            .iter()
            .map(|h| peers.call(h, &PeerRequest::Capacity, timeout)),
    )
    .await;
    hosts
        .iter()
        .cloned()
        .zip(answers)
        .map(|(h, a)| match a {
            Ok(AdminResponse::Capacity { free, .. }) => (h, Some(free)),
            Ok(other) => {
                tracing::warn!(host = %h, answer = ?other, "unexpected capacity answer");
                (h, None)
            }
            Err(e) => {
                tracing::warn!(host = %h, error = %snowflock_proto::error::chain(&e), "no capacity answer");
                (h, None)
            }
        })
        .collect()
}
