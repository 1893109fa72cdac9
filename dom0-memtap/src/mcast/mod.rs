//! mcdist: multicast distribution of pages (the original's fourth
//! technique). Clone hosts ask the origin for pages by unicast, over the
//! page server's TCP protocol ([`crate::wire`]); the origin answers the
//! asker over that connection and sends a copy of each page to the
//! generation's multicast group, so the other hosts of the generation hold
//! it before their clones fault on it. See `docs/memory.md#mcdist`.
//!
//! * `datagram.rs`: the page datagram, its MAC, the group of a generation;
//! * `socket.rs`: the UDP sockets (sender, and receiver joined to a group).
//!
//! May import: [`crate::wire`], the crate root. The sending side lives in
//! [`crate::server`], the receiving side in [`crate::memtap`].

mod datagram;
mod socket;

pub use datagram::{
    group_of, open, seal, McastKey, Page, Refused, DATAGRAM_LEN, HEADER_LEN, MAC_LEN,
};
pub use socket::{receiver, sender};

use std::net::Ipv4Addr;

/// Default UDP port of the page datagrams.
pub const DEFAULT_PORT: u16 = 7404;

/// Multicast settings of a page server or a memtap mount (`host.toml`:
/// `mcast`, `mcast_port`, `mcast_rate_mib`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McastConfig {
    /// UDP port of every group.
    pub port: u16,
    /// The local address whose interface sends and joins (the host's
    /// cluster address); `None` lets the kernel choose by its routes.
    pub iface: Option<Ipv4Addr>,
    /// Highest rate at which a page server multicasts, in bytes per second
    /// (flow control lowers it while receivers lose datagrams).
    pub max_rate: u64,
}

impl McastConfig {
    /// Port [`DEFAULT_PORT`], interface chosen by routes, 256 MiB/s at most.
    pub fn new(iface: Option<Ipv4Addr>) -> McastConfig {
        McastConfig {
            port: DEFAULT_PORT,
            iface,
            max_rate: 256 << 20,
        }
    }
}
