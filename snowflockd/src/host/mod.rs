//! Adapters to the host, holding no daemon state: configuration
//! ([`config`]), QEMU processes ([`qemu`], [`qmp`], and the [`vmm`] seam),
//! host networking ([`net`], with its `HostNet` seam), console logs
//! ([`console`]), the memory a VM takes ([`memuse`]) and the few raw
//! system calls ([`sys`]).
//!
//! May import: std, system crates, `snowflock_proto`, `snowflock_image`.
//! Never `state`, `cluster`, `lifecycle`, `ops` or `frontends`.

pub mod config;
pub mod console;
pub mod disk;
#[cfg(test)]
pub mod fake_vmm;
pub mod memuse;
pub mod net;
pub mod qemu;
pub mod qmp;
pub mod sys;
pub mod vmm;
