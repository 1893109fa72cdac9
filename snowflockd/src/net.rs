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
/// Number of distinct flocks per host.
pub const MAX_FLOCKS: u32 = 256;

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

/// Raw network ioctls (tun, bridge, interface flags).
mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    const SIOCBRADDIF: libc::c_ulong = 0x89a2;

    fn ifreq(name: &str) -> io::Result<libc::ifreq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(r)
    }

    fn ioctl(fd: &OwnedFd, cmd: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: `r` is a valid ifreq; these requests read and write only
        // inside it.
        if unsafe { libc::ioctl(fd.as_raw_fd(), cmd as _, r as *mut libc::ifreq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn inet_socket() -> io::Result<OwnedFd> {
        // SAFETY: no memory arguments; the result is checked and owned.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Creates tap `name` (`IFF_TAP | IFF_NO_PI`, as `ip tuntap add mode
    /// tap` does) and makes it persistent, so QEMU can attach by name.
    pub fn create_persistent_tap(name: &str) -> io::Result<()> {
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let tun = OwnedFd::from(tun);
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        ioctl(&tun, TUNSETIFF, &mut r)?;
        // SAFETY: TUNSETPERSIST takes an integer argument, no pointer.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Adds interface `port` to bridge `bridge`.
    pub fn bridge_add_if(bridge: &str, port: &str) -> io::Result<()> {
        let cname = std::ffi::CString::new(port)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let mut r = ifreq(bridge)?;
        r.ifr_ifru.ifru_ifindex = index as libc::c_int;
        ioctl(&inet_socket()?, SIOCBRADDIF, &mut r)
    }

    /// Sets `IFF_UP` on an interface.
    pub fn set_up(name: &str) -> io::Result<()> {
        let s = inet_socket()?;
        let mut r = ifreq(name)?;
        ioctl(&s, libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        ioctl(&s, libc::SIOCSIFFLAGS, &mut r)
    }
}

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
pub fn ensure_overlay(
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
    format!("10.250.{}.{}/24", flock % MAX_FLOCKS, clone_id + 1)
}

/// Subnet of a flock.
pub fn subnet(flock: u32) -> String {
    format!("10.250.{}.0/24", flock % MAX_FLOCKS)
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
pub fn ensure_bridge(name: &str) -> Result<(), NetError> {
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
pub fn create_tap(tap: &str, bridge: &str) -> Result<(), NetError> {
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
pub fn remove_stale_links(names: &NetNames) -> Vec<String> {
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
        let n = NetNames {
            prefix: "sf".into(),
        };
        assert!(n.tap(99999).len() <= 15 && n.bridge(255).len() <= 15);
    }
}
