//! What memtap tells the daemon: [`MemtapEvent`]s, sent on the channel
//! that [`Memtap::events`](super::Memtap::events) returns.
//!
//! May import: nothing of this crate (the bottom of `memtap`).

use std::net::SocketAddr;

/// Something the daemon must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemtapEvent {
    /// Pages of `generation` could not be fetched within the fetch timeout;
    /// reads of its missing pages now fail with EIO. Sent once per
    /// generation.
    OriginLost {
        generation: String,
        origin: SocketAddr,
        reason: String,
    },
}
