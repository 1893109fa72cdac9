//! `snowflock bench clone`: clone figures, medians over runs.

use crate::client::Client;
use crate::vm_cmd;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use snowflock_proto::admin::{Accel, AdminRequest, AdminResponse, CloneReport, VmStats};

pub struct BenchArgs {
    pub clones: Vec<u32>,
    pub runs: u32,
    pub image: String,
    pub mem_mib: u32,
    /// MiB the guest fills (and keeps) before cloning, one fresh VM per
    /// value, to show how the clone's cost grows with touched memory.
    pub touch_mib: Vec<u32>,
    pub json: bool,
}

/// MiB the parent writes between its clones for the "second clone" line.
pub const DIRTY_MIB: u32 = 32;

#[derive(Serialize)]
pub struct Row {
    /// MiB the guest filled before its first clone.
    pub touch_mib: u32,
    pub clones: u32,
    pub runs: u32,
    /// Empty, or what the parent did since its previous clone.
    pub after: String,
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

/// Runs `script` with `sh -c` in `vm`; its stdout, or an error with its
/// stderr. Shared by the benches.
pub(crate) fn sh(c: &Client, vm: &str, script: &str) -> Result<String> {
    let out = vm_cmd::exec(c, vm, &["sh".into(), "-c".into(), script.into()], true)?;
    if out.code != 0 {
        bail!(
            "in {vm}: `{script}` failed ({}): {}",
            out.code,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `snowflock stats VM`.
pub(crate) fn stats(c: &Client, vm: &str) -> Result<VmStats> {
    match c.call(&AdminRequest::Stats { name: vm.into() })? {
        AdminResponse::Stats(s) => Ok(s),
        other => bail!("Unexpected answer: {other:?}"),
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

/// Runs `sf clone` with `n` clones in the guest and leaves the clones
/// running (they wait); returns the ticket.
pub(crate) fn clone_and_keep(c: &Client, vm: &str, n: u32) -> Result<String> {
    let script = format!(
        "T=$(sf ticket {n} 2>/dev/null) || exit 1; ID=$(sf clone $T) || exit 1; \
         if [ \"$ID\" != 0 ]; then exec sleep 100000; fi; echo $T"
    );
    Ok(sh(c, vm, &script)?.trim().to_string())
}

/// Starts `sf-memtest hold` in the guest: `mib` MiB written (seed
/// `seed`) and kept, served on `sock`.
pub(crate) fn fill(c: &Client, vm: &str, mib: u32, seed: u32, sock: &str) -> Result<()> {
    let script = format!(
        "sf-memtest hold --mib {mib} --seed {seed} --sock {sock} </dev/null >/dev/null 2>&1 & \
         i=0; while [ ! -S {sock} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; [ -S {sock} ]"
    );
    let out = vm_cmd::exec(c, vm, &["sh".into(), "-c".into(), script], true)?;
    if out.code != 0 {
        bail!("the guest could not fill {mib} MiB");
    }
    Ok(())
}

fn row(touch_mib: u32, runs: u32, after: &str, reps: &[CloneReport]) -> Row {
    let last = reps.last().expect("runs >= 1");
    let med = |f: &dyn Fn(&CloneReport) -> f64| median(reps.iter().map(f).collect());
    Row {
        touch_mib,
        clones: last.clones,
        runs,
        after: after.to_string(),
        parent_pause_ms: med(&|r| r.parent_pause_ms),
        descriptor_bytes: med(&|r| r.descriptor_bytes as f64) as u64,
        device_state_bytes: med(&|r| r.device_state_bytes as f64) as u64,
        frozen_bytes: med(&|r| r.frozen_bytes as f64) as u64,
        paused_copy_bytes: med(&|r| r.paused_copy_bytes as f64) as u64,
        all_returned_ms: med(&|r| r.all_ready_ms),
        guest_ram_bytes: last.guest_ram_bytes,
    }
}

/// The rows of one fresh VM that fills `touch` MiB: one per clone count,
/// then one clone after the parent dirtied [`DIRTY_MIB`] MiB more.
fn one_size(c: &Client, a: &BenchArgs, touch: u32) -> Result<Vec<Row>> {
    let vm = format!("bench{}-{touch}", std::process::id());
    vm_cmd::start(c, &vm, &a.image, a.mem_mib, 1, Accel::Auto, false)?;
    let res = (|| -> Result<Vec<Row>> {
        if touch > 0 {
            eprintln!("bench: {vm} fills {touch} MiB before cloning");
            fill(c, &vm, touch, 1, "/tmp/bench-mt.sock")?;
        }
        let mut rows = Vec::new();
        for &n in &a.clones {
            let mut reps = Vec::new();
            for r in 0..a.runs {
                eprintln!(
                    "bench: {touch} MiB touched, {n} clone(s), run {}/{} ...",
                    r + 1,
                    a.runs
                );
                reps.push(clone_cycle(c, &vm, n)?);
            }
            rows.push(row(touch, a.runs, "", &reps));
        }
        eprintln!("bench: {vm} dirties {DIRTY_MIB} MiB, then clones once more");
        fill(c, &vm, DIRTY_MIB, 2, "/tmp/bench-dirty.sock")?;
        let again = clone_cycle(c, &vm, a.clones[0])?;
        rows.push(row(touch, 1, &format!("dirtied {DIRTY_MIB} MiB"), &[again]));
        // The same while the earlier clones still run: the file they map
        // cannot change, so the generation is a layer over it.
        eprintln!("bench: {vm} clones, dirties {DIRTY_MIB} MiB, clones again meanwhile");
        let kept = clone_and_keep(c, &vm, a.clones[0])?;
        let layered = fill(c, &vm, DIRTY_MIB, 3, "/tmp/bench-dirty2.sock")
            .and_then(|()| clone_cycle(c, &vm, a.clones[0]));
        let killed = vm_cmd::exec(c, &vm, &["sf".into(), "kill".into(), kept.clone()], true);
        let layered = layered?;
        killed?;
        rows.push(row(touch, 1, "same, clones run", &[layered]));
        Ok(rows)
    })();
    let _ = vm_cmd::stop(c, &vm);
    res
}

pub fn run(c: &Client, a: BenchArgs) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &touch in &a.touch_mib {
        rows.extend(one_size(c, &a, touch)?);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(rows);
    }
    println!(
        "{:>9} {:>6} {:>5} {:>16} {:>15} {:>14} {:>10} {:>15} {:>16} {:>8}",
        "touch_MiB",
        "clones",
        "runs",
        "after",
        "parent_pause_ms",
        "device_state_B",
        "frozen_MiB",
        "paused_copy_KiB",
        "all_returned_ms",
        "ram_MiB"
    );
    for r in &rows {
        println!(
            "{:>9} {:>6} {:>5} {:>16} {:>15.1} {:>14} {:>10.1} {:>15.0} {:>16.1} {:>8}",
            r.touch_mib,
            r.clones,
            r.runs,
            if r.after.is_empty() { "-" } else { &r.after },
            r.parent_pause_ms,
            r.device_state_bytes,
            r.frozen_bytes as f64 / 1048576.0,
            r.paused_copy_bytes as f64 / 1024.0,
            r.all_returned_ms,
            r.guest_ram_bytes >> 20
        );
    }
    // Side by side: each size against the first (the 1.25x goal).
    if let Some(base) = rows.iter().find(|r| r.after.is_empty()) {
        let (p0, a0) = (base.parent_pause_ms, base.all_returned_ms);
        for r in rows
            .iter()
            .filter(|r| r.after.is_empty() && r.clones == base.clones)
        {
            println!(
                "{} MiB touched vs {} MiB: pause {:.2}x, all returned {:.2}x",
                r.touch_mib,
                base.touch_mib,
                r.parent_pause_ms / p0,
                r.all_returned_ms / a0
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
