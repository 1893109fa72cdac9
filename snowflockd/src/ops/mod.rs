//! Operations: what the front ends ask for. Guest API calls ([`api`]),
//! cloning ([`clone`]), `vm start` ([`vm_start`]) and cluster-wide views
//! ([`cluster`]).
//!
//! May import: `lifecycle`, `state`, `cluster`, `host`. Never `frontends`.

pub mod api;
pub mod clone;
pub mod cluster;
pub mod vm_start;
