//! `snowflock bench clone --image debian`: the Debian disk image's figures,
//! measured side by side in one run on a local two-host cluster
//! (`sfbench`, removed afterwards):
//!
//! * boot: `vm start` of the image until its agent answers (what a user
//!   would otherwise do to get another VM), against clone: `sf_clone` until
//!   the clone on the other host answers;
//! * the parent's pause and, inside it, the disk freeze;
//! * disk bytes a clone on the other host fetches to read a file of
//!   `--read-mib` MiB the parent wrote before the clone (its page cache
//!   dropped first, so the reads reach the disk).
//!
//! Figures, not tests: medians over `--runs`.

use crate::bench::{median, report_for, sh, stats};
use crate::bench_hosts::on_bench_cluster;
use crate::client::Client;
use crate::vm_cmd;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use snowflock_proto::admin::{Accel, VmStats};
use std::time::{Duration, Instant};

pub struct DiskBenchArgs {
    pub image: String,
    pub runs: u32,
    pub mem_mib: u32,
    pub read_mib: u32,
    pub json: bool,
}

#[derive(Serialize, Default)]
pub struct DiskRow {
    pub runs: u32,
    pub boot_ms: f64,
    pub clone_ms: f64,
    pub parent_pause_ms: f64,
    pub disk_freeze_ms: f64,
    pub read_mib: u32,
    pub disk_fetched_mib: f64,
    pub fetched_per_read: f64,
    pub disk_read_p50_us: f64,
    pub disk_read_p99_us: f64,
}

/// Milliseconds between two marks of a clone's timeline.
fn between(timeline: &[(String, f64)], from: &str, to: &str) -> Option<f64> {
    let at = |m: &str| timeline.iter().find(|(n, _)| n == m).map(|(_, t)| *t);
    Some(at(to)? - at(from)?)
}

/// One clone of the parent onto the other host: the clone drops its page
/// cache, reads the file and waits; the bench reads its disk figures, then
/// lets it exit. Returns (clone ms, pause ms, freeze ms, stats).
fn one_run(c: &Client, vm: &str) -> Result<(f64, f64, f64, VmStats)> {
    let script = "T=$(sf ticket 1) || exit 1; ID=$(sf clone $T) || exit 1; \
         if [ \"$ID\" != 0 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; \
         cat /root/bench.dat > /dev/null; touch /run/read-done; \
         while [ ! -e /run/go ]; do sleep 0.1; done; sf exit 0; fi; echo $T";
    let t = sh(c, vm, script)?.trim().to_string();
    let report = report_for(c, &t)?;
    let kid = clone_of(c, &t)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while sh(c, &kid, "test -e /run/read-done && echo y || echo n")?.trim() != "y" {
        if Instant::now() > deadline {
            bail!("{kid} did not finish reading");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = stats(c, &kid)?;
    sh(c, &kid, "touch /run/go")?;
    sh(c, vm, &format!("sf join {t} >/dev/null"))?;
    let freeze = between(&report.timeline, "parent_paused", "disk_frozen").unwrap_or(f64::NAN);
    Ok((report.all_ready_ms, report.parent_pause_ms, freeze, s))
}

/// The name of ticket `t`'s clone, from the VM list.
fn clone_of(c: &Client, t: &str) -> Result<String> {
    let vms = vm_cmd::list_vms(c)?;
    vms.iter()
        .find(|v| v.ticket.as_deref() == Some(t))
        .map(|v| v.name.clone())
        .with_context(|| format!("no clone of ticket {t} in the VM list"))
}

pub fn run(a: DiskBenchArgs) -> Result<()> {
    let row = on_bench_cluster(2, 4, |hosts| {
        let c = Client::new(&hosts[0].socket);
        let (mut boots, mut clones, mut pauses, mut freezes) = (vec![], vec![], vec![], vec![]);
        let (mut fetched, mut p50, mut p99) = (vec![], vec![], vec![]);
        for r in 0..a.runs {
            let vm = format!("bench{r}");
            eprintln!("bench: boot {}/{} of the Debian image", r + 1, a.runs);
            let t0 = Instant::now();
            vm_cmd::start(&c, &vm, &a.image, a.mem_mib, 1, Accel::Auto, false)?;
            boots.push(t0.elapsed().as_secs_f64() * 1e3);
            let run = (|| -> Result<()> {
                sh(
                    &c,
                    &vm,
                    &format!(
                        "head -c {}M /dev/urandom > /root/bench.dat && sync",
                        a.read_mib
                    ),
                )?;
                eprintln!(
                    "bench: clone {}/{} reading {} MiB",
                    r + 1,
                    a.runs,
                    a.read_mib
                );
                let (clone_ms, pause, freeze, s) = one_run(&c, &vm)?;
                clones.push(clone_ms);
                pauses.push(pause);
                freezes.push(freeze);
                fetched.push(s.disk.disk_bytes_fetched as f64);
                p50.push(s.disk.disk_read_p50_us as f64);
                p99.push(s.disk.disk_read_p99_us as f64);
                Ok(())
            })();
            let _ = vm_cmd::stop(&c, &vm);
            run?;
        }
        let read = (a.read_mib as f64) * 1048576.0;
        let f = median(fetched);
        Ok(DiskRow {
            runs: a.runs,
            boot_ms: median(boots),
            clone_ms: median(clones),
            parent_pause_ms: median(pauses),
            disk_freeze_ms: median(freezes),
            read_mib: a.read_mib,
            disk_fetched_mib: f / 1048576.0,
            fetched_per_read: f / read,
            disk_read_p50_us: median(p50),
            disk_read_p99_us: median(p99),
        })
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&row)?);
    } else {
        // A parent handed to a new QEMU has no separate disk freeze: the
        // new QEMU opens the chain with a new top layer.
        let freeze = if row.disk_freeze_ms.is_nan() {
            " (the disk's new layer comes with the new QEMU)".to_string()
        } else {
            format!(", of which disk freeze {:.1} ms", row.disk_freeze_ms)
        };
        println!(
            "Debian image, {} run(s), medians:\n  boot (vm start until the agent answers) {:>9.0} ms\n  \
             clone on another host (sf_clone until ready) {:>4.0} ms  ({:.1}x faster)\n  \
             parent pause {:>6.1} ms{}\n  \
             clone read {} MiB: fetched {:.1} MiB of disk ({:.3}x), read latency p50 {:.0} us, p99 {:.0} us",
            row.runs,
            row.boot_ms,
            row.clone_ms,
            row.boot_ms / row.clone_ms,
            row.parent_pause_ms,
            freeze,
            row.read_mib,
            row.disk_fetched_mib,
            row.fetched_per_read,
            row.disk_read_p50_us,
            row.disk_read_p99_us
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_spans() {
        let tl = vec![
            ("parent_paused".to_string(), 10.0),
            ("disk_frozen".to_string(), 14.5),
        ];
        assert_eq!(between(&tl, "parent_paused", "disk_frozen"), Some(4.5));
        assert_eq!(between(&tl, "parent_paused", "nope"), None);
    }
}
