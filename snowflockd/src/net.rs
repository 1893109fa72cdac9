//! Flock networks on one host: a Linux bridge per flock, a tap per VM.
//!
//! Bridges carry no IP address, so the host's own network stack has no
//! route into a flock: flocks are private L2 segments that only their VMs
//! use. Two flocks are two bridges and cannot reach each other.
//!
//! Links are made with iproute2 (`ip`), the tool every sysadmin reads.
//!
//! Addressing: flock `F` uses subnet `10.250.F.0/24`; clone ID `k` gets
//! `10.250.F.(k+1)` and MAC `52:54:00:F:00:k` (parent k = 0).

use std::process::Command;

/// Largest clone ID a flock's /24 can address (.1 is the parent).
pub const MAX_CLONE_ID: u32 = 253;
/// Number of distinct flocks per host.
pub const MAX_FLOCKS: u32 = 256;

/// Errors configuring host networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    /// `ip` could not be run at all.
    #[error("Cannot run `ip` (is iproute2 installed?)")]
    Spawn(#[source] std::io::Error),
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new("ip").args(args).output().map_err(NetError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Ip { args: args.join(" "), stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Names of interfaces, built from a short per-daemon prefix.
#[derive(Debug, Clone)]
pub struct NetNames {
    pub prefix: String,
}

impl NetNames {
    pub fn bridge(&self, flock: u32) -> String {
        format!("{}b{flock}", self.prefix)
    }
    pub fn tap(&self, vm_index: u64) -> String {
        format!("{}t{vm_index}", self.prefix)
    }
}

/// IPv4 address with prefix of clone `clone_id` in flock `flock`.
pub fn ip_cidr(flock: u32, clone_id: u32) -> String {
    format!("10.250.{}.{}/24", flock % MAX_FLOCKS, clone_id + 1)
}

/// Subnet of a flock.
pub fn subnet(flock: u32) -> String {
    format!("10.250.{}.0/24", flock % MAX_FLOCKS)
}

/// MAC address of clone `clone_id` in flock `flock`.
pub fn mac(flock: u32, clone_id: u32) -> String {
    format!("52:54:00:{:02x}:{:02x}:{:02x}", flock & 0xff, (clone_id >> 8) & 0xff, clone_id & 0xff)
}

/// Creates the flock bridge if missing. IPv6 is disabled on it so the host
/// sends nothing (no router solicitations, no MLD) into the flock.
pub fn ensure_bridge(name: &str) -> Result<(), NetError> {
    if !link_exists(name) {
        ip(&["link", "add", name, "type", "bridge"])?;
    }
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip(&["link", "set", name, "up"])
}

/// Creates a tap attached to `bridge`.
pub fn create_tap(tap: &str, bridge: &str) -> Result<(), NetError> {
    if link_exists(tap) {
        ip(&["link", "del", tap])?;
    }
    ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    ip(&["link", "set", tap, "master", bridge])?;
    ip(&["link", "set", tap, "up"])
}

/// Deletes a link if it exists.
pub fn delete_link(name: &str) -> Result<(), NetError> {
    if link_exists(name) {
        ip(&["link", "del", name])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing() {
        assert_eq!(ip_cidr(3, 0), "10.250.3.1/24");
        assert_eq!(ip_cidr(3, 5), "10.250.3.6/24");
        assert_eq!(mac(3, 0), "52:54:00:03:00:00");
        assert_eq!(mac(255, 258), "52:54:00:ff:01:02");
        let n = NetNames { prefix: "sf".into() };
        assert!(n.tap(99999).len() <= 15 && n.bridge(255).len() <= 15);
    }
}
