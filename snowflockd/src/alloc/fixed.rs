//! The `static` allocator: this host and every peer that answers, each
//! with its free VM slots (`max_vms` in its `host.toml` less what runs or
//! is reserved there). It holds nothing: the trait's no-op defaults stand
//! for releasing.

use super::{capacity_of, AllocError, Allocator, Offer, Want};
use crate::cluster::PeerChannel;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;

/// How long a peer may take to say how many slots it has free.
const CAPACITY_TIMEOUT: Duration = Duration::from_secs(2);

pub struct FixedSlots {
    peers: Arc<dyn PeerChannel>,
}

impl FixedSlots {
    pub fn new(peers: Arc<dyn PeerChannel>) -> FixedSlots {
        FixedSlots { peers }
    }
}

impl Allocator for FixedSlots {
    fn kind(&self) -> &'static str {
        "static"
    }

    fn offer<'a>(&'a self, _want: Want<'a>) -> BoxFuture<'a, Result<Offer, AllocError>> {
        async move {
            let names = self.peers.peers();
            let hosts = capacity_of(&*self.peers, &names, CAPACITY_TIMEOUT)
                .await
                .into_iter()
                // A host that does not answer is left out of the ticket.
                .filter_map(|(h, free)| free.map(|f| (h, f)))
                .collect();
            Ok(Offer {
                hosts,
                here: u32::MAX,
            })
        }
        .boxed()
    }
}
