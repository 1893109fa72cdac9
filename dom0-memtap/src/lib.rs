//! Host side of guest memory ("dom0" is Xen's word for the host).
//!
//! A paused VM's RAM file is frozen into a memory *generation*: an
//! immutable, hole-aware copy. Clones on the same host map it privately;
//! other hosts get its memory on demand (see `docs/memory.md`). The crate
//! is split by role, and imports point down this list (no module imports
//! one beside or above it):
//!
//! * [`memtap`]: on a clone's host, the memtap FUSE mount whose files a
//!   clone's QEMU maps; pages come from a local cache, the hole map or the
//!   origin's page server ([`client`]);
//! * [`server`]: on the origin host, the page server, which serves frozen
//!   generations to other hosts over TCP, cluster-key authenticated;
//! * [`origin`]: on the origin host, freezing a generation and its hole
//!   map;
//! * [`wire`]: the page server protocol, shared by server and client;
//! * [`stats`]: per-process and per-generation fault statistics;
//! * `sys`: the few raw system calls, the only `unsafe` code.
//!
//! The items used elsewhere are re-exported here, so `dom0_memtap::Memtap`,
//! `dom0_memtap::freeze_generation` and the like work whatever module they
//! live in.

#![deny(unsafe_code)]

pub mod mcast;
pub mod memtap;
pub mod origin;
pub mod server;
pub mod stats;
#[allow(unsafe_code)]
mod sys;
pub mod wire;

/// The page server client, part of [`memtap`]; the older path.
pub use memtap::client;
pub use memtap::{
    GenerationSpec, Memtap, MemtapConfig, MemtapError, MemtapEvent, Progress, FETCH_THREADS,
    MAX_FETCH_THREADS,
};
pub use origin::{
    copy_written, data_extents, discarded_pages, freeze_generation, frozen_in_place,
    frozen_layered, load_map, punch_pages, save_map, write_into_process, written_pages,
    FreezeError, Frozen, Layer, Precopy, WrittenError, TOP, TOP_MAP,
};
pub use server::{PageServer, PublishError, ServerConfig, ServerStats};
pub use stats::FaultStats;

/// Page granularity of hole maps, caches and the wire protocol.
pub const PAGE_SIZE: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Memtap>();
        shared::<PageServer>();
        shared::<client::OriginClient>();
    }
}
