//! `snowflockd`: the per-host snowflock daemon.
//!
//! It runs VMs (QEMU processes driven over QMP), answers SnowFlock API calls
//! from their guest agents, clones VMs, allocates tickets, and keeps each
//! flock's private network. The CLI talks to it over the admin socket,
//! other hosts' daemons over the cluster channel.
//!
//! Layers, each importing only the ones below it:
//!
//! ```text
//!  frontends/   admin socket, cluster channel server, guest channel
//!  ops/         guest API calls, clone, vm start, cluster-wide views
//!  lifecycle/   the daemon context; create, supervise, stop, generations,
//!               allocations kept in step with tickets
//!  alloc/       ticket allocators (Allocator seam): static slots, Slurm
//!  cluster/     cluster channel client (PeerChannel seam)
//!  state/       VMs, tickets, registry, placement, counters (no I/O)
//!  host/        config, QEMU + QMP (Vmm seam), networking (HostNet seam)
//! ```
//!
//! `start` wires them together.

pub mod alloc;
pub mod cluster;
pub mod frontends;
pub mod host;
pub mod lifecycle;
pub mod ops;
mod start;
pub mod state;
#[cfg(test)]
mod testing;

pub use start::{run, StartError};
