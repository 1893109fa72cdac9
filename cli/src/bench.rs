//! `snowflock bench clone`: clone figures, medians over runs.

use crate::client::Client;
use crate::vm_cmd;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use snowflock_proto::admin::{Accel, AdminRequest, AdminResponse, CloneReport};

pub struct BenchArgs {
    pub clones: Vec<u32>,
    pub runs: u32,
    pub image: String,
    pub mem_mib: u32,
    /// MiB the guest fills (and keeps) before cloning, to show how the
    /// pause grows with touched memory.
    pub touch_mib: u32,
    pub json: bool,
}

#[derive(Serialize)]
pub struct Row {
    pub clones: u32,
    pub runs: u32,
    pub parent_pause_ms: f64,
    pub descriptor_bytes: u64,
    pub device_state_bytes: u64,
    pub frozen_bytes: u64,
    pub paused_copy_bytes: u64,
    pub all_returned_ms: f64,
    pub guest_ram_bytes: u64,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn reports(c: &Client) -> Result<Vec<CloneReport>> {
    match c.call(&AdminRequest::CloneReports)? {
        AdminResponse::CloneReports { reports } => Ok(reports),
        other => bail!("Unexpected answer: {other:?}"),
    }
}

/// The daemon's report of the clone operation that used `ticket`.
pub fn report_for(c: &Client, ticket: &str) -> Result<CloneReport> {
    reports(c)?
        .into_iter()
        .rev()
        .find(|r| r.ticket == ticket)
        .with_context(|| format!("no clone report for ticket {ticket}"))
}

/// One clone + join cycle in the guest; returns the daemon's report.
pub fn clone_cycle(c: &Client, vm: &str, n: u32) -> Result<CloneReport> {
    let script = format!(
        "T=$(sf ticket {n}) || exit 1; ID=$(sf clone $T) || exit 1; \
         if [ \"$ID\" != 0 ]; then sf exit 0; fi; sf join $T >/dev/null || exit 1; echo $T"
    );
    let out = vm_cmd::exec(c, vm, &["sh".into(), "-c".into(), script], true)?;
    if out.code != 0 {
        bail!(
            "clone cycle in {vm} failed ({}): {}",
            out.code,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let ticket = String::from_utf8_lossy(&out.stdout).trim().to_string();
    report_for(c, &ticket)
}

pub fn run(c: &Client, a: BenchArgs) -> Result<Vec<Row>> {
    let vm = format!("bench{}", std::process::id());
    vm_cmd::start(c, &vm, &a.image, a.mem_mib, 1, Accel::Auto, false)?;
    let res = (|| -> Result<Vec<Row>> {
        if a.touch_mib > 0 {
            eprintln!("bench: guest fills {} MiB before cloning", a.touch_mib);
            let script = format!(
                "sf-memtest hold --mib {} --seed 1 --sock /tmp/bench-mt.sock </dev/null >/dev/null 2>&1 & \
                 i=0; while [ ! -S /tmp/bench-mt.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
                 [ -S /tmp/bench-mt.sock ]",
                a.touch_mib
            );
            let out = vm_cmd::exec(c, &vm, &["sh".into(), "-c".into(), script], true)?;
            if out.code != 0 {
                bail!("the guest could not fill {} MiB", a.touch_mib);
            }
        }
        let mut rows = Vec::new();
        for &n in &a.clones {
            let mut reps = Vec::new();
            for r in 0..a.runs {
                eprintln!("bench: {n} clone(s), run {}/{} ...", r + 1, a.runs);
                reps.push(clone_cycle(c, &vm, n)?);
            }
            let last = reps.last().expect("runs >= 1");
            rows.push(Row {
                clones: last.clones,
                runs: a.runs,
                parent_pause_ms: median(reps.iter().map(|r| r.parent_pause_ms).collect()),
                descriptor_bytes: median(reps.iter().map(|r| r.descriptor_bytes as f64).collect())
                    as u64,
                device_state_bytes: median(
                    reps.iter().map(|r| r.device_state_bytes as f64).collect(),
                ) as u64,
                frozen_bytes: median(reps.iter().map(|r| r.frozen_bytes as f64).collect()) as u64,
                paused_copy_bytes: median(reps.iter().map(|r| r.paused_copy_bytes as f64).collect())
                    as u64,
                all_returned_ms: median(reps.iter().map(|r| r.all_ready_ms).collect()),
                guest_ram_bytes: last.guest_ram_bytes,
            });
        }
        Ok(rows)
    })();
    let _ = vm_cmd::stop(c, &vm);
    let rows = res?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:>6} {:>5} {:>15} {:>16} {:>14} {:>10} {:>15} {:>16} {:>8}",
            "clones",
            "runs",
            "parent_pause_ms",
            "descriptor_bytes",
            "device_state_B",
            "frozen_MiB",
            "paused_copy_KiB",
            "all_returned_ms",
            "ram_MiB"
        );
        for r in &rows {
            println!(
                "{:>6} {:>5} {:>15.1} {:>16} {:>14} {:>10.1} {:>15.0} {:>16.1} {:>8}",
                r.clones,
                r.runs,
                r.parent_pause_ms,
                r.descriptor_bytes,
                r.device_state_bytes,
                r.frozen_bytes as f64 / 1048576.0,
                r.paused_copy_bytes as f64 / 1024.0,
                r.all_returned_ms,
                r.guest_ram_bytes >> 20
            );
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(vec![]).is_nan());
    }
}
