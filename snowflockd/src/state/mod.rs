//! Pure state and rules: VMs ([`vm`]), tickets as a state machine
//! ([`ticket`]), the registry with capacity, quota and flock numbering
//! ([`registry`]), clone placement ([`placement`]) and counters
//! ([`metrics`]).
//!
//! May import: `snowflock_proto` types, std, sync primitives. Never
//! `host`, `cluster`, `lifecycle`, `ops` or `frontends`, and no I/O.

pub mod metrics;
pub mod placement;
pub mod registry;
pub mod ticket;
pub mod vm;
