//! The VM lifecycle: the daemon's context ([`daemon`]), creating VMs
//! ([`create`]), supervising their exit ([`supervise`]), stopping them
//! ([`stop`]), their generations ([`generations`]), the merge of their
//! frozen disk layers ([`disk_layers`]), the allocations kept in step
//! with the tickets ([`allocations`]), and the current QEMU of each
//! original VM, which a freeze may replace ([`handover`]).
//!
//! May import: `host`, `state`, `cluster` (client side), `alloc`. Never `ops` or
//! `frontends`: the guest channel is started through
//! [`daemon::GuestLink`], wired in at start.

pub mod allocations;
pub mod create;
pub mod daemon;
pub mod disk_layers;
pub mod generations;
pub mod handover;
pub mod stop;
pub mod supervise;

pub use daemon::{Daemon, DaemonError};

use crate::state::vm::Vm;

/// The last lines of a VM's serial console, for error messages.
pub fn console_tail(vm: &Vm) -> String {
    crate::host::console::tail_lines(&crate::host::qemu::console_path(&vm.placed.dir))
}
