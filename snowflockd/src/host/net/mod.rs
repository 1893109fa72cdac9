//! Flock networks: a Linux bridge per flock per host, a tap per VM, and in
//! a cluster a VXLAN port per flock bridge that joins the flock's bridges on
//! all hosts into one L2 segment (VNI = flock + 1; flood entries to every
//! peer, MACs learnt from traffic).
//!
//! Bridges carry no IP address, so the host's own network stack has no
//! route into a flock: flocks are private L2 segments that only their VMs
//! use. Two flocks are two bridges (two VNIs) and cannot reach each other.
//! Flock numbers are cluster-wide: each host allocates only numbers in its
//! own slice (see `Cluster::slot`), so two hosts never pick the same VNI.
//!
//! Links are made with iproute2 (`ip`), the tool every sysadmin reads.
//!
//! Addressing: flock `F` uses subnet `10.250.F.0/24`; clone ID `k` gets
//! `10.250.F.(k+1)` and MAC `52:54:00:F:00:k` (parent k = 0).

use std::process::Command;

/// Largest clone ID a flock's /24 can address (.1 is the parent).
pub const MAX_CLONE_ID: u32 = 253;
/// Flock subnets: `10.250.F.0/24`, F below this.
pub const FLOCK_SUBNETS: u32 = 256;

/// Errors configuring host networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An iproute2 command (`ip`, `bridge`) failed.
    #[error("`{cmd}` failed: {stderr}")]
    Ip { cmd: String, stderr: String },
    /// `ip` could not be run at all.
    #[error("Cannot run `ip` (is iproute2 installed?)")]
    Spawn(#[source] std::io::Error),
    /// A network ioctl failed.
    #[error("Cannot {what}")]
    Ioctl {
        what: String,
        #[source]
        err: std::io::Error,
    },
}

mod sys;

/// Runs an iproute2 tool (`ip`, `bridge`); a failure names the command line.
fn iproute2(tool: &str, args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(NetError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        let cmd = format!("{tool} {}", args.join(" "));
        Err(NetError::Ip {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    iproute2("ip", args)
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
    pub fn vxlan(&self, flock: u32) -> String {
        format!("{}x{flock}", self.prefix)
    }
}

/// UDP port of the flock overlay.
pub const VXLAN_PORT: u16 = 4789;

/// VXLAN network id of a flock (0 is avoided: some tools treat it as unset).
pub fn vni(flock: u32) -> u32 {
    flock + 1
}

/// Joins the flock bridge to the same flock on the other hosts: a VXLAN
/// port sourced from `local` with a flood entry per peer. Idempotent.
fn ensure_overlay(
    names: &NetNames,
    flock: u32,
    local: std::net::IpAddr,
    peers: &[std::net::IpAddr],
) -> Result<(), NetError> {
    let vx = names.vxlan(flock);
    if link_exists(&vx) {
        return Ok(());
    }
    let (vni, port, local) = (
        vni(flock).to_string(),
        VXLAN_PORT.to_string(),
        local.to_string(),
    );
    let res = (|| {
        ip(&[
            "link", "add", &vx, "type", "vxlan", "id", &vni, "dstport", &port, "local", &local,
        ])?;
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{vx}/disable_ipv6"), "1");
        ip(&[
            "link",
            "set",
            &vx,
            "mtu",
            "1500",
            "master",
            &names.bridge(flock),
            "up",
        ])?;
        for p in peers {
            iproute2(
                "bridge",
                &[
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    &vx,
                    "dst",
                    &p.to_string(),
                ],
            )?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = delete_link(&vx);
    }
    res
}

/// IPv4 address with prefix of clone `clone_id` in flock `flock`.
pub fn ip_cidr(flock: u32, clone_id: u32) -> String {
    format!("10.250.{}.{}/24", flock % FLOCK_SUBNETS, clone_id + 1)
}

/// Subnet of a flock.
pub fn subnet(flock: u32) -> String {
    format!("10.250.{}.0/24", flock % FLOCK_SUBNETS)
}

/// MAC address of clone `clone_id` in flock `flock`.
pub fn mac(flock: u32, clone_id: u32) -> String {
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        flock & 0xff,
        (clone_id >> 8) & 0xff,
        clone_id & 0xff
    )
}

/// Creates the flock bridge if missing. IPv6 is disabled on it so the host
/// sends nothing (no router solicitations, no MLD) into the flock.
fn ensure_bridge(name: &str) -> Result<(), NetError> {
    if link_exists(name) {
        return Ok(());
    }
    ip(&["link", "add", name, "type", "bridge"])?;
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip(&["link", "set", name, "up"])
}

/// Creates a persistent tap attached to `bridge` and brings it up.
///
/// Done with `ioctl`s rather than `ip`: a clone needs a tap while its
/// parent waits, and three `ip` processes per clone cost ~30 ms here.
fn create_tap(tap: &str, bridge: &str) -> Result<(), NetError> {
    if link_exists(tap) {
        ip(&["link", "del", tap])?;
    }
    let fail = |what: &str, e: std::io::Error| NetError::Ioctl {
        what: format!("{what} {tap}"),
        err: e,
    };
    sys::create_persistent_tap(tap).map_err(|e| fail("create tap", e))?;
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    let res = sys::bridge_add_if(bridge, tap)
        .map_err(|e| fail(&format!("attach to {bridge}:"), e))
        .and_then(|()| sys::set_up(tap).map_err(|e| fail("bring up", e)));
    if res.is_err() {
        let _ = delete_link(tap);
    }
    res
}

/// Deletes bridges, taps and VXLAN ports named like this daemon's
/// (`<prefix>b<N>`, `<prefix>t<N>`, `<prefix>x<N>`): leftovers of a daemon with the same prefix that
/// crashed. Only one daemon serves a socket, and its prefix is its own.
fn remove_stale_links(names: &NetNames) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/class/net") else {
        return removed;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        let ours = n
            .strip_prefix(&names.prefix)
            .and_then(|r| {
                r.strip_prefix('b')
                    .or_else(|| r.strip_prefix('t'))
                    .or_else(|| r.strip_prefix('x'))
            })
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()));
        if ours && delete_link(&n).is_ok() {
            removed.push(n);
        }
    }
    removed
}

/// Deletes a link if it exists.
fn delete_link(name: &str) -> Result<(), NetError> {
    if link_exists(name) {
        ip(&["link", "del", name])?;
    }
    Ok(())
}

/// Host networking as the daemon uses it: a seam, so the daemon's logic
/// runs in tests without touching the host ([`fake::FakeNet`]).
pub trait HostNet: Send + Sync + 'static {
    /// Creates the flock bridge if missing.
    fn ensure_bridge(&self, name: &str) -> Result<(), NetError>;
    /// Joins the flock bridge to the other hosts' (VXLAN). Idempotent.
    fn ensure_overlay(
        &self,
        names: &NetNames,
        flock: u32,
        local: std::net::IpAddr,
        peers: &[std::net::IpAddr],
    ) -> Result<(), NetError>;
    /// Creates a tap attached to `bridge`, up.
    fn create_tap(&self, tap: &str, bridge: &str) -> Result<(), NetError>;
    /// Deletes a link if it exists.
    fn delete_link(&self, name: &str) -> Result<(), NetError>;
    /// Deletes this daemon's leftover links; returns their names.
    fn remove_stale_links(&self, names: &NetNames) -> Vec<String>;
}

/// The real host network: iproute2 and ioctls.
pub struct IpRoute2;

impl HostNet for IpRoute2 {
    fn ensure_bridge(&self, name: &str) -> Result<(), NetError> {
        ensure_bridge(name)
    }
    fn ensure_overlay(
        &self,
        names: &NetNames,
        flock: u32,
        local: std::net::IpAddr,
        peers: &[std::net::IpAddr],
    ) -> Result<(), NetError> {
        ensure_overlay(names, flock, local, peers)
    }
    fn create_tap(&self, tap: &str, bridge: &str) -> Result<(), NetError> {
        create_tap(tap, bridge)
    }
    fn delete_link(&self, name: &str) -> Result<(), NetError> {
        delete_link(name)
    }
    fn remove_stale_links(&self, names: &NetNames) -> Vec<String> {
        remove_stale_links(names)
    }
}

#[cfg(test)]
pub mod fake;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing() {
        assert_eq!(ip_cidr(3, 0), "10.250.3.1/24");
        assert_eq!(ip_cidr(3, 5), "10.250.3.6/24");
        assert_eq!(mac(3, 0), "52:54:00:03:00:00");
        assert_eq!(mac(255, 258), "52:54:00:ff:01:02");
        let n = NetNames {
            prefix: "sf".into(),
        };
        assert!(n.tap(99999).len() <= 15 && n.bridge(255).len() <= 15);
    }
}
