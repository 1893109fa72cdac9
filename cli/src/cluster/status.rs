//! `snowflock cluster status`: every host of `cluster.json` with its
//! daemon's answer, as a table or as JSON.

use super::daemon::probe_all;
use super::layout::{load, HostInfo};
use anyhow::Result;
use serde::Serialize;
use snowflock_proto::admin::DaemonStatus;

/// Status of one host for `cluster status --json`.
#[derive(Serialize)]
struct HostStatus<'a> {
    #[serde(flatten)]
    host: &'a HostInfo,
    /// The daemon's answer; `null` when it is down.
    status: Option<DaemonStatus>,
}

/// `snowflock cluster status`.
pub fn status(name: &str, json: bool) -> Result<()> {
    let info = load(name)?;
    let st = probe_all(&info);
    if json {
        let hosts: Vec<HostStatus> = info
            .hosts
            .iter()
            .zip(st)
            .map(|(host, status)| HostStatus { host, status })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "name": info.name,
                "hosts": hosts,
                // SLURM_CONF= for Slurm's own tools (run them in a host's namespace).
                "slurm_conf": info.slurm.as_ref().map(|s| &s.conf),
            }))?
        );
        return Ok(());
    }
    println!(
        "local cluster `{}` ({} hosts, fabric {})",
        info.name,
        info.hosts.len(),
        info.fabric_netns
    );
    if let Some(s) = &info.slurm {
        println!(
            "Slurm: SLURM_CONF={} (e.g. `ip netns exec {} env SLURM_CONF={} squeue`)",
            s.conf.display(),
            info.hosts.first().map_or("", |h| h.netns.as_str()),
            s.conf.display()
        );
    }
    println!(
        "{:<5} {:<14} {:<12} {:>8} {:<6} {:>4} {:>9}",
        "HOST", "NETNS", "IP", "PID", "STATE", "VMS", "UPTIME_S"
    );
    for (h, s) in info.hosts.iter().zip(st) {
        match s {
            Some(s) => println!(
                "{:<5} {:<14} {:<12} {:>8} {:<6} {:>4} {:>9}",
                h.name, h.netns, h.ip, s.pid, "up", s.vms, s.uptime_s
            ),
            None => println!(
                "{:<5} {:<14} {:<12} {:>8} {:<6} {:>4} {:>9}",
                h.name,
                h.netns,
                h.ip,
                h.pid.map_or("-".into(), |p| p.to_string()),
                "down",
                "-",
                "-"
            ),
        }
    }
    Ok(())
}
