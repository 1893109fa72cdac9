//! Daemon configuration.

use std::path::PathBuf;

/// Settings of one `snowflockd`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Host name reported in `vm list` and descriptors.
    pub host: String,
    /// Admin socket path.
    pub socket: PathBuf,
    /// Where VM directories, RAM files and generations live. Should be a
    /// tmpfs (RAM files are guest memory).
    pub state_dir: PathBuf,
    /// Prefix of bridge and tap names (keep it short: names max 15 chars).
    pub net_prefix: String,
    /// Most VMs (parents and clones) this host runs at once.
    pub max_vms: u32,
    /// Most clones one ticket may be granted.
    pub quota_per_ticket: u32,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Seconds to wait for a booting VM's agent.
    pub boot_timeout_s: u64,
    /// Seconds to wait for a clone to report `Ready`.
    pub clone_timeout_s: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: hostname(),
            socket: PathBuf::from(snowflock_proto::DAEMON_SOCKET),
            state_dir: PathBuf::from("/dev/shm/snowflock"),
            net_prefix: "sf".into(),
            max_vms: 64,
            quota_per_ticket: 32,
            qemu: PathBuf::from("qemu-system-x86_64"),
            boot_timeout_s: 180,
            clone_timeout_s: 120,
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// A short link-name prefix unique to a state directory: `s` and 4 hex
/// digits. One daemon owns a state directory (it holds its lock), so links
/// with this prefix are that daemon's, and a restarted daemon may remove
/// them as leftovers.
pub fn net_prefix_for(state_dir: &std::path::Path) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x01000193);
    }
    format!("s{:04x}", (h ^ (h >> 16)) & 0xffff)
}

/// Resolves `auto` to `kvm` only when the CPU has hardware virtualization
/// (`vmx` or `svm` in /proc/cpuinfo) and /dev/kvm exists. Some hosts expose
/// a /dev/kvm that is not hardware-backed (PVM); there TCG is the right
/// choice, which the CPU flags tell apart.
pub fn host_has_hw_virt() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && std::path::Path::new("/dev/kvm").exists()
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes_are_short_and_differ_by_state_dir() {
        let a = super::net_prefix_for(std::path::Path::new("/dev/shm/snowflock"));
        let b = super::net_prefix_for(std::path::Path::new("/dev/shm/snowflock-demo"));
        assert_eq!(a.len(), 5);
        assert!(a.starts_with('s'));
        assert_ne!(a, b);
        assert_eq!(a, super::net_prefix_for(std::path::Path::new("/dev/shm/snowflock")));
    }
}
