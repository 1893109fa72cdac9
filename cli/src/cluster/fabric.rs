//! The simulated network: the fabric namespace `NAME-fab` with its bridge,
//! and one namespace per host joined to it by a veth pair. All of it is
//! done with the `ip` command.

use super::layout::{HostInfo, Layout};
use super::FABRIC_MTU;
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

const NETNS_DIR: &str = "/run/netns";
const FABRIC_BRIDGE: &str = "fab";
pub(crate) const HOST_LINK: &str = "fab0";

/// Runs `ip ARGS`, failing with its stderr.
pub(super) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("Cannot run `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Network namespaces of this cluster that exist now (hosts first, fabric last).
pub(crate) fn existing_netns(l: &Layout) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| l.owns_netns(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|n| (n.ends_with("-fab"), n.len(), n.clone()));
    v
}

/// Creates the fabric namespace `fab` with its bridge, all links up.
pub(crate) fn create(fab: &str) -> Result<()> {
    let mtu = FABRIC_MTU.to_string();
    ip(&["netns", "add", fab])?;
    ip(&["-n", fab, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        fab,
        "link",
        "add",
        FABRIC_BRIDGE,
        "mtu",
        &mtu,
        "type",
        "bridge",
        // Multicast (mcdist's page copies) floods every port, like a plain
        // switch: with IGMP snooping and no querier on the fabric, the
        // memberships the bridge learned would expire after 260 s.
        "mcast_snooping",
        "0",
    ])?;
    ip(&["-n", fab, "link", "set", FABRIC_BRIDGE, "up"])
}

/// Creates host `h`'s namespace and joins it to the bridge in `fab`: veth
/// `hI` on the bridge, `fab0` with the host's address in the namespace.
pub(crate) fn connect_host(fab: &str, h: &HostInfo) -> Result<()> {
    let mtu = FABRIC_MTU.to_string();
    let hn = &h.name;
    ip(&["netns", "add", &h.netns])?;
    ip(&[
        "-n", fab, "link", "add", hn, "mtu", &mtu, "type", "veth", "peer", "name", HOST_LINK,
        "mtu", &mtu, "netns", &h.netns,
    ])?;
    ip(&["-n", fab, "link", "set", hn, "master", FABRIC_BRIDGE, "up"])?;
    ip(&["-n", &h.netns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        &h.netns,
        "addr",
        "add",
        &format!("{}/24", h.ip),
        "dev",
        HOST_LINK,
    ])?;
    ip(&["-n", &h.netns, "link", "set", HOST_LINK, "up"])
}

/// Deletes the network namespace `ns` (a host's veth goes with it).
pub(super) fn delete_netns(ns: &str) -> Result<()> {
    ip(&["netns", "del", ns])
}
