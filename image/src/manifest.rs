//! `image.json`: the [`Manifest`] of an image, and the constants it records.

use serde::{Deserialize, Serialize};

/// Manifest format this crate writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Kernel command line the daemon starts from (it appends the `sf.*` params).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";

/// `image.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// Kernel release (`uname -r` in the guest).
    pub kernel_version: String,
    /// Build time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Every path in the initramfs (absolute), in archive order.
    pub files: Vec<String>,
    /// Default kernel command line ([`DEFAULT_CMDLINE`]).
    pub cmdline: String,
}
