//! `snowflock bench clone --hosts H`: clones spread over a local cluster,
//! with memory on demand. Figures, not tests: every row is measured in the
//! same run, side by side (avoidance on and off, each clone count).
//!
//! Per clone count and avoidance mode, the parent (on h0, holding
//! `--touch-mib` of patterned memory and having filled and freed
//! `--fill-mib` more before the clone) clones; every clone then reads the
//! parent's pattern (pages it must fetch) and fills `--fill-mib` of fresh
//! memory (pages it should not fetch). The bench then reads every clone's
//! memtap figures and kills the ticket.
//!
//! `--mcast on|off|both` makes the cluster once per mode (multicast page
//! distribution on or off in every host.toml). Origin egress is measured
//! at the origin: the bytes h0's fabric link sent from the clone request
//! until every clone finished reading the parent's memory; bytes received
//! likewise on each clone host's link.

use crate::bench::{sh, stats};
use crate::client::Client;
use crate::cluster;
use crate::vm_cmd;
use anyhow::{bail, Result};
use serde::Serialize;
use snowflock_proto::admin::{Accel, CloneReport, VmStats};
use std::time::{Duration, Instant};

/// Runs `f` with the hosts of a local cluster of `hosts` hosts (`sfbench`,
/// at most `max_vms` VMs each), h0 first. The cluster is
/// removed afterwards, whatever `f` returned, if this call made it.
pub(crate) fn on_bench_cluster<T>(
    hosts: u32,
    max_vms: u32,
    f: impl FnOnce(&[cluster::HostInfo]) -> Result<T>,
) -> Result<T> {
    let settings = cluster::Settings {
        max_vms,
        ..Default::default()
    };
    on_bench_cluster_with(hosts, settings, f)
}

/// [`on_bench_cluster`] with every setting given (`--slurm` among them).
pub(crate) fn on_bench_cluster_with<T>(
    hosts: u32,
    settings: cluster::Settings,
    f: impl FnOnce(&[cluster::HostInfo]) -> Result<T>,
) -> Result<T> {
    let up = cluster::up(&cluster::UpOpts {
        name: BENCH_CLUSTER.into(),
        hosts: Some(hosts),
        settings,
    })?;
    let res = f(&up.info.hosts);
    if up.started {
        let _ = cluster::down(BENCH_CLUSTER);
    }
    res
}

/// The local cluster the benchmarks make.
const BENCH_CLUSTER: &str = "sfbench";

pub struct HostsArgs {
    pub hosts: u32,
    pub clones: Vec<u32>,
    pub runs: u32,
    pub image: String,
    pub mem_mib: u32,
    pub touch_mib: u32,
    pub fill_mib: u32,
    pub modes: Vec<bool>,
    /// Multicast on, off, or both (a cluster per mode).
    pub mcast: Vec<bool>,
    pub json: bool,
}

#[derive(Serialize)]
pub struct HostsRow {
    pub hosts: u32,
    pub clones: u32,
    /// `"on"` or `"off"`.
    pub mcast: &'static str,
    pub avoidance: bool,
    pub runs: u32,
    /// Median over runs: bytes h0 sent on the fabric from the clone request
    /// until every clone finished reading the parent's memory.
    pub origin_egress_bytes: u64,
    /// The same, received per clone host (mean over the hosts).
    pub rx_bytes_per_host: u64,
    /// Median over runs: from `sf clone` returning in the parent until the
    /// last clone finished reading the parent's memory.
    pub all_finished_ms: f64,
    /// Median over runs: request to every clone back from `sf_clone`.
    pub all_returned_ms: f64,
    pub parent_pause_ms: f64,
    pub descriptor_bytes: u64,
    /// Bytes fetched over bytes of data pages the clones read (all clones).
    pub fetched_per_read: f64,
    /// Median over clones of each clone's fault latency percentiles.
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    /// Mean MiB fetched per clone, and the part of it during the fill.
    pub fetched_mib_per_clone: f64,
    pub fill_fetched_pct: f64,
    pub zero_pages_per_clone: f64,
}

/// Waits until the parent's RAM file stops shrinking (free page reporting
/// has caught up), at most a minute.
fn settle(ram: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let size = || {
        std::fs::metadata(ram)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    };
    let start = Instant::now();
    let mut last = size();
    while start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(3));
        let now = size();
        if now + (1 << 20) >= last {
            return;
        }
        last = now;
    }
}

/// Bytes received and sent on a host's fabric link, read in its namespace.
fn link_bytes(netns: &str) -> Result<(u64, u64)> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-s", "-j", "link", "show", cluster::HOST_LINK])
        .output()?;
    if !out.status.success() {
        bail!(
            "ip -n {netns} link show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = &v[0]["stats64"];
    match (s["rx"]["bytes"].as_u64(), s["tx"]["bytes"].as_u64()) {
        (Some(rx), Some(tx)) => Ok((rx, tx)),
        _ => bail!("no link statistics for {} in {netns}", cluster::HOST_LINK),
    }
}

/// One clone run's figures.
struct Run {
    report: CloneReport,
    /// Per clone: its stats and what it fetched during the fill.
    clones: Vec<(VmStats, u64)>,
    origin_egress: u64,
    rx_per_host: u64,
    all_finished_ms: f64,
}

fn one_run(c: &Client, hosts: &[cluster::HostInfo], vm: &str, n: u32, fill: u32) -> Result<Run> {
    let script = format!(
        "T=$(sf ticket {n}) || exit 1; ID=$(sf clone $T) || exit 1; \
         if [ \"$ID\" != 0 ]; then sf-memtest ctl --sock /tmp/bench-mt.sock verify >/dev/null; touch /tmp/read-done; sleep 100000; fi; echo $T"
    );
    let links = |h: &cluster::HostInfo| link_bytes(&h.netns);
    let before: Vec<(u64, u64)> = hosts.iter().map(links).collect::<Result<_>>()?;
    let ticket = sh(c, vm, &script)?.trim().to_string();
    let returned = Instant::now();
    let result = (|| -> Result<Run> {
        let rep = crate::bench::report_for(c, &ticket)?;
        let kids: Vec<(String, String)> = vm_cmd::list_vms(c)?
            .into_iter()
            .filter(|v| v.ticket.as_deref() == Some(&ticket))
            .map(|v| (v.name, v.host))
            .collect();
        // Every clone reads the parent's memory at once; wait for the last.
        for (k, _) in &kids {
            sh(c, k, "i=0; while [ ! -e /tmp/read-done ] && [ $i -lt 30000 ]; do sleep 0.01; i=$((i+1)); done; [ -e /tmp/read-done ]")?;
        }
        let all_finished_ms = returned.elapsed().as_secs_f64() * 1000.0;
        let after: Vec<(u64, u64)> = hosts.iter().map(links).collect::<Result<_>>()?;
        let clone_hosts: Vec<usize> = (1..hosts.len())
            .filter(|&i| kids.iter().any(|(_, h)| *h == hosts[i].name))
            .collect();
        let rx: u64 = clone_hosts
            .iter()
            .map(|&i| after[i].0.saturating_sub(before[i].0))
            .sum();
        let mut out = Vec::new();
        for (k, _) in &kids {
            let before = stats(c, k)?.fetch.bytes_fetched;
            sh(
                c,
                k,
                &format!(
                    "sf-memtest hold --mib {fill} --seed 2 --sock /tmp/fill.sock </dev/null >/dev/null 2>&1 & \
                     i=0; while [ ! -S /tmp/fill.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
                     sf-memtest ctl --sock /tmp/fill.sock verify >/dev/null"
                ),
            )?;
            let s = stats(c, k)?;
            let during_fill = s.fetch.bytes_fetched.saturating_sub(before);
            out.push((s, during_fill));
        }
        Ok(Run {
            report: rep,
            clones: out,
            origin_egress: after[0].1.saturating_sub(before[0].1),
            rx_per_host: rx / clone_hosts.len().max(1) as u64,
            all_finished_ms,
        })
    })();
    let _ = sh(c, vm, &format!("sf kill {ticket} >/dev/null"));
    result
}

pub fn run(a: HostsArgs) -> Result<()> {
    let need = a.clones.iter().copied().max().unwrap_or(1);
    let per_host = need / a.hosts.saturating_sub(1).max(1) + 3;
    let mut rows = Vec::new();
    for &mcast in &a.mcast {
        let settings = cluster::Settings {
            max_vms: per_host.max(4),
            mcast,
            ..Default::default()
        };
        rows.extend(on_bench_cluster_with(a.hosts, settings, |hosts| {
            mode_rows(&a, hosts, mcast)
        })?);
    }
    print_rows(&a, &rows)
}

/// The rows of one multicast mode, on a cluster made for it.
fn mode_rows(a: &HostsArgs, hosts: &[cluster::HostInfo], mcast: bool) -> Result<Vec<HostsRow>> {
    let h0 = &hosts[0];
    let c = Client::new(&h0.socket);
    let mut rows = Vec::new();
    for &avoid in &a.modes {
        let vm = format!("bench{}", if avoid { "on" } else { "off" });
        vm_cmd::start(&c, &vm, &a.image, a.mem_mib, 1, Accel::Auto, false)?;
        let setup = format!(
                "mkdir -p /etc/snowflock && printf '[balloon]\\nfree_page_reporting = {avoid}\\nreporting_order = 0\\n[hooks]\\nmalloc_trim = {avoid}\\n' \
                 > /etc/snowflock/agent.toml && kill -HUP $(cat /run/snowflock/agent.pid) && sleep 1; \
                 sf-memtest hold --mib {} --seed 9 --sock /tmp/churn.sock </dev/null >/dev/null 2>&1 & P=$!; \
                 i=0; while [ ! -S /tmp/churn.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; kill $P; \
                 sf-memtest hold --mib {} --seed 1 --sock /tmp/bench-mt.sock </dev/null >/dev/null 2>&1 & \
                 i=0; while [ ! -S /tmp/bench-mt.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ -S /tmp/bench-mt.sock ]",
                a.fill_mib, a.touch_mib
            );
        sh(&c, &vm, &setup)?;
        eprintln!("bench: {vm}: waiting for free page reporting to settle");
        settle(&h0.state_dir.join("vms").join(&vm).join("ram"));
        for &n in &a.clones {
            let mut reps = Vec::new();
            let mut clones = Vec::new();
            let (mut egress, mut rx, mut finished) = (Vec::new(), Vec::new(), Vec::new());
            for r in 0..a.runs {
                eprintln!(
                    "bench: {vm}: {n} clone(s) over {} hosts, multicast {}, run {}/{} ...",
                    a.hosts,
                    if mcast { "on" } else { "off" },
                    r + 1,
                    a.runs
                );
                let run = one_run(&c, hosts, &vm, n, a.fill_mib)?;
                reps.push(run.report);
                clones.extend(run.clones);
                egress.push(run.origin_egress as f64);
                rx.push(run.rx_per_host as f64);
                finished.push(run.all_finished_ms);
            }
            let med = |v: Vec<f64>| crate::bench::median(v);
            let read: u64 = clones
                .iter()
                .map(|(s, _)| (s.fetch.faults.saturating_sub(s.fetch.zero_pages)) * 4096)
                .sum();
            let fetched: u64 = clones.iter().map(|(s, _)| s.fetch.bytes_fetched).sum();
            let k = clones.len().max(1) as f64;
            rows.push(HostsRow {
                hosts: a.hosts,
                clones: n,
                mcast: if mcast { "on" } else { "off" },
                avoidance: avoid,
                runs: a.runs,
                origin_egress_bytes: med(egress) as u64,
                rx_bytes_per_host: med(rx) as u64,
                all_finished_ms: med(finished),
                all_returned_ms: med(reps.iter().map(|r| r.all_ready_ms).collect()),
                parent_pause_ms: med(reps.iter().map(|r| r.parent_pause_ms).collect()),
                descriptor_bytes: med(reps.iter().map(|r| r.descriptor_bytes as f64).collect())
                    as u64,
                fetched_per_read: if read == 0 {
                    f64::NAN
                } else {
                    fetched as f64 / read as f64
                },
                latency_p50_us: med(clones
                    .iter()
                    .map(|(s, _)| s.fetch.latency_p50_us as f64)
                    .collect()),
                latency_p99_us: med(clones
                    .iter()
                    .map(|(s, _)| s.fetch.latency_p99_us as f64)
                    .collect()),
                fetched_mib_per_clone: fetched as f64 / k / 1048576.0,
                fill_fetched_pct: clones.iter().map(|(_, f)| *f as f64).sum::<f64>()
                    / k
                    / (u64::from(a.fill_mib) << 20) as f64
                    * 100.0,
                zero_pages_per_clone: clones
                    .iter()
                    .map(|(s, _)| s.fetch.zero_pages as f64)
                    .sum::<f64>()
                    / k,
            });
        }
        let _ = vm_cmd::stop(&c, &vm);
    }
    Ok(rows)
}

fn print_rows(a: &HostsArgs, rows: &[HostsRow]) -> Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:>5} {:>6} {:>5} {:>5} {:>11} {:>6} {:>11} {:>12} {:>15} {:>9} {:>12} {:>8} {:>8} {:>10} {:>7} {:>8}",
        "hosts",
        "clones",
        "mcast",
        "avoid",
        "egress_MiB",
        "x_one",
        "rx_MiB/host",
        "finished_ms",
        "all_returned_ms",
        "pause_ms",
        "fetched/read",
        "p50_us",
        "p99_us",
        "MiB/clone",
        "fill_%",
        "zero_pg"
    );
    for r in rows {
        println!(
            "{:>5} {:>6} {:>5} {:>5} {:>11.1} {:>6} {:>11.1} {:>12.0} {:>15.1} {:>9.1} {:>12.3} {:>8.0} {:>8.0} {:>10.1} {:>7.1} {:>8.0}",
            r.hosts,
            r.clones,
            r.mcast,
            if r.avoidance { "on" } else { "off" },
            r.origin_egress_bytes as f64 / 1048576.0,
            egress_ratio(rows, r).map_or("-".into(), |x| format!("{x:.2}")),
            r.rx_bytes_per_host as f64 / 1048576.0,
            r.all_finished_ms,
            r.all_returned_ms,
            r.parent_pause_ms,
            r.fetched_per_read,
            r.latency_p50_us,
            r.latency_p99_us,
            r.fetched_mib_per_clone,
            r.fill_fetched_pct,
            r.zero_pages_per_clone
        );
    }
    Ok(())
}

/// A row's origin egress over that of one clone in the same mode (the
/// brief's target: 16 clones over 4 hosts at most 1.5x one clone).
fn egress_ratio(rows: &[HostsRow], r: &HostsRow) -> Option<f64> {
    let one = rows
        .iter()
        .find(|o| o.clones == 1 && o.mcast == r.mcast && o.avoidance == r.avoidance)?;
    (one.origin_egress_bytes > 0)
        .then(|| r.origin_egress_bytes as f64 / one.origin_egress_bytes as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(clones: u32, mcast: &'static str, egress: u64) -> HostsRow {
        HostsRow {
            hosts: 5,
            clones,
            mcast,
            avoidance: true,
            runs: 1,
            origin_egress_bytes: egress,
            rx_bytes_per_host: 0,
            all_finished_ms: 1.0,
            all_returned_ms: 1.0,
            parent_pause_ms: 1.0,
            descriptor_bytes: 1,
            fetched_per_read: 1.0,
            latency_p50_us: 1.0,
            latency_p99_us: 2.0,
            fetched_mib_per_clone: 1.0,
            fill_fetched_pct: 0.0,
            zero_pages_per_clone: 0.0,
        }
    }

    #[test]
    fn egress_ratio_is_against_one_clone_of_the_same_mode() {
        let rows = vec![
            row(1, "on", 100),
            row(16, "on", 140),
            row(1, "off", 100),
            row(16, "off", 1600),
        ];
        assert_eq!(egress_ratio(&rows, &rows[1]), Some(1.4));
        assert_eq!(egress_ratio(&rows, &rows[3]), Some(16.0));
        assert_eq!(egress_ratio(&rows[1..2], &rows[1]), None);
    }

    #[test]
    fn json_rows_carry_the_issue_fields() {
        let v = serde_json::to_value(row(4, "off", 7)).unwrap();
        for k in [
            "hosts",
            "clones",
            "mcast",
            "origin_egress_bytes",
            "all_finished_ms",
            "latency_p50_us",
            "latency_p99_us",
        ] {
            assert!(v.get(k).is_some(), "{k} missing: {v}");
        }
        assert_eq!(v["mcast"], "off");
    }
}
