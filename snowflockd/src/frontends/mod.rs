//! Front ends: the admin socket for the CLI ([`admin`], with `vm exec`
//! sessions in [`exec`]), the cluster channel's server ([`peer`]) and each
//! VM's guest channel ([`guest`]).
//!
//! May import anything below: `ops`, `lifecycle`, `cluster`, `state`,
//! `host`. Nothing imports front ends but the daemon's start-up.

pub mod admin;
pub mod exec;
pub mod guest;
pub mod peer;
pub mod reply;
