//! `snowflock bench ticket`: what a ticket request costs with each
//! allocator, side by side in one run. The same local cluster is made
//! twice, once with the static allocator and once with its own Slurm
//! (`--slurm`, one clone per node); a VM on h0 asks for a ticket and kills
//! it, `--runs` times. Each request is timed from the CLI (`vm exec` of
//! `sf ticket N`), so both columns carry the same `vm exec` overhead and
//! their difference is the allocator's.

use crate::bench::{median, sh};
use crate::bench_hosts::on_bench_cluster_with;
use crate::client::Client;
use crate::cluster;
use crate::vm_cmd;
use anyhow::{bail, Result};
use serde::Serialize;
use snowflock_proto::admin::Accel;
use std::time::Instant;

pub struct TicketArgs {
    pub hosts: u32,
    pub clones: u32,
    pub runs: u32,
    pub image: String,
    pub json: bool,
}

#[derive(Serialize)]
pub struct TicketRow {
    /// `static` or `slurm`.
    pub allocator: String,
    pub hosts: u32,
    pub clones: u32,
    pub granted: u32,
    pub runs: u32,
    pub ticket_ms_median: f64,
    pub ticket_ms_min: f64,
    pub ticket_ms_max: f64,
}

/// Requests and kills `runs` tickets in a VM on h0 of `hosts`.
fn measure(a: &TicketArgs, allocator: &str, hosts: &[cluster::HostInfo]) -> Result<TicketRow> {
    let c = Client::new(&hosts[0].socket);
    let vm = format!("tbench{}", std::process::id());
    eprintln!("bench: {allocator}: booting the VM");
    vm_cmd::start(&c, &vm, &a.image, 256, 1, Accel::Auto, false)?;
    let res = (|| -> Result<TicketRow> {
        let (mut ms, mut granted) = (Vec::new(), 0);
        for r in 0..a.runs {
            eprintln!("bench: {allocator}: ticket {}/{}", r + 1, a.runs);
            let t0 = Instant::now();
            let out = vm_cmd::exec(
                &c,
                &vm,
                &["sf".into(), "ticket".into(), a.clones.to_string()],
                true,
            )?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
            if out.code != 0 {
                bail!(
                    "{allocator}: sf ticket failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let err = String::from_utf8_lossy(&out.stderr);
            granted = err
                .split_whitespace()
                .nth(1)
                .and_then(|g| g.parse().ok())
                .unwrap_or(0);
            let ticket = String::from_utf8_lossy(&out.stdout).trim().to_string();
            sh(&c, &vm, &format!("sf kill {ticket} >/dev/null"))?;
        }
        Ok(TicketRow {
            allocator: allocator.into(),
            hosts: a.hosts,
            clones: a.clones,
            granted,
            runs: a.runs,
            ticket_ms_median: median(ms.clone()),
            ticket_ms_min: ms.iter().copied().fold(f64::INFINITY, f64::min),
            ticket_ms_max: ms.iter().copied().fold(0.0, f64::max),
        })
    })();
    let _ = vm_cmd::stop(&c, &vm);
    res
}

pub fn run(a: TicketArgs) -> Result<Vec<TicketRow>> {
    if a.runs == 0 || a.clones == 0 || !(2..=cluster::MAX_HOSTS).contains(&a.hosts) {
        bail!(
            "--runs and --clones must be at least 1, --hosts 2 to {}",
            cluster::MAX_HOSTS
        );
    }
    let mut rows = Vec::new();
    for slurm in [false, true] {
        let settings = cluster::Settings {
            slurm: slurm.then_some(cluster::SlurmSettings {
                wait_s: 30,
                slots_per_node: Some(1),
            }),
            ..Default::default()
        };
        let allocator = if slurm { "slurm" } else { "static" };
        rows.push(on_bench_cluster_with(a.hosts, settings, |hosts| {
            measure(&a, allocator, hosts)
        })?);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(rows);
    }
    println!(
        "{:>9} {:>6} {:>7} {:>8} {:>5} {:>16} {:>13} {:>13}",
        "allocator",
        "hosts",
        "clones",
        "granted",
        "runs",
        "ticket_ms_median",
        "ticket_ms_min",
        "ticket_ms_max"
    );
    for r in &rows {
        println!(
            "{:>9} {:>6} {:>7} {:>8} {:>5} {:>16.1} {:>13.1} {:>13.1}",
            r.allocator,
            r.hosts,
            r.clones,
            r.granted,
            r.runs,
            r.ticket_ms_median,
            r.ticket_ms_min,
            r.ticket_ms_max
        );
    }
    println!(
        "slurm / static: {:.2}x ({:+.1} ms per ticket request)",
        rows[1].ticket_ms_median / rows[0].ticket_ms_median,
        rows[1].ticket_ms_median - rows[0].ticket_ms_median
    );
    Ok(rows)
}
