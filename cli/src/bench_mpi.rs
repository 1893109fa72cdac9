//! `snowflock bench mpi`: one MPI job three ways, side by side in one run
//! on a local cluster (`sfbench`, removed afterwards). The comparison of
//! the SnowFlock paper's figure 4:
//!
//! * **sfmpirun**: `sfmpirun -np R` from one VM: clone, run, tear down;
//! * **idle VMs**: the paper's "zero-cost" baseline, the same number of VMs
//!   already running and idle (clones made beforehand, not timed) and the
//!   job started by the same launcher over them (`sfmpirun --ticket`);
//! * **boot first**: booting those VMs from the image (measured: `vm start`
//!   of R-1 VMs in parallel across the hosts until their agents answer),
//!   plus the idle-VM job. Booted VMs are separate flocks in snowflock, so
//!   this column is that sum, not one job.
//!
//! Each column gives the time until every rank runs (a barrier right after
//! `MPI_Init`, stamped by rank 0 on the parent's clock) and the total.
//! Figures, not tests: medians over `--runs`.

use crate::bench::{median, sh};
use crate::bench_hosts::on_bench_cluster;
use crate::client::Client;
use crate::{cluster, vm_cmd};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use snowflock_proto::admin::Accel;
use std::time::Instant;

pub struct MpiBenchArgs {
    pub ranks: u32,
    pub hosts: u32,
    pub runs: u32,
    pub image: Option<std::path::PathBuf>,
    pub work: u64,
    pub json: bool,
}

/// The job: barrier after `MPI_Init` (all ranks running), then a pi
/// integration of WORK intervals split over the ranks, reduced to rank 0.
const BENCH_C: &str = r#"
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_REALTIME, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    int rank, size; long i, n = argc > 1 ? atol(argv[1]) : 1000000; double h, x, s = 0, pi;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) printf("RUNNING %.6f\n", now());
    h = 1.0 / n;
    for (i = rank; i < n; i += size) { x = h * (i + 0.5); s += 4.0 / (1.0 + x * x); }
    s *= h;
    MPI_Reduce(&s, &pi, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0) printf("PI %.12f\n", pi);
    MPI_Finalize();
    return 0;
}
"#;

/// One column's medians, in milliseconds.
#[derive(Serialize, Default, Clone, Copy)]
pub struct Column {
    pub ranks_running_ms: f64,
    pub total_ms: f64,
}

#[derive(Serialize)]
pub struct MpiBench {
    pub ranks: u32,
    pub hosts: u32,
    pub runs: u32,
    pub work: u64,
    pub sfmpirun: Column,
    pub idle_vms: Column,
    pub boot_first: Column,
    /// Time to `vm start` the R-1 VMs in parallel, median.
    pub boot_ms: f64,
    /// sfmpirun total over idle-VM total.
    pub overhead_ratio: f64,
    pub overhead_ms: f64,
}

/// Runs `launch` (a shell command) in the parent with start and end
/// stamps; returns (ms until all ranks ran, total ms).
fn timed_job(c: &Client, vm: &str, launch: &str) -> Result<(f64, f64)> {
    let out = sh(
        c,
        vm,
        &format!(
            "cd /root/bench && S=$(date +%s.%N) && {launch} > out 2>err; R=$?; E=$(date +%s.%N); \
             [ $R = 0 ] || {{ cat err >&2; exit $R; }}; echo START $S; echo END $E; cat out"
        ),
    )?;
    let stamp = |k: &str| -> Result<f64> {
        out.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().parse::<f64>()))
            .with_context(|| format!("no {k} in {out:?}"))?
            .with_context(|| format!("bad {k} in {out:?}"))
    };
    let (s, e, r) = (stamp("START ")?, stamp("END ")?, stamp("RUNNING ")?);
    if !out.contains("PI 3.14159") {
        bail!("the job computed no pi: {out}");
    }
    Ok(((r - s) * 1e3, (e - s) * 1e3))
}

pub fn run(a: MpiBenchArgs) -> Result<()> {
    if a.ranks < 2 {
        bail!("--ranks must be 2 or more");
    }
    let image = match &a.image {
        Some(i) => i.clone(),
        None => crate::demo_mpi::image()?,
    };
    let image = image.display().to_string();
    let b = on_bench_cluster(a.hosts, a.ranks.div_ceil(a.hosts) + 2, |hosts| {
        let c = Client::new(&hosts[0].socket);
        let vm = "mpibench";
        eprintln!("bench: booting the parent VM");
        vm_cmd::start(&c, vm, &image, 512, 1, Accel::Auto, false)?;
        let run = (|| -> Result<MpiBench> {
            sh(
                &c,
                vm,
                &format!(
                    "mkdir -p /root/bench && cd /root/bench && cat > bench.c <<'EOF'\n{BENCH_C}\nEOF\n\
                     mpicc.mpich -O2 -o bench bench.c"
                ),
            )?;
            let job = format!("./bench {}", a.work);
            let (mut sf, mut idle, mut boots) = (vec![], vec![], vec![]);
            for r in 0..a.runs {
                eprintln!("bench: run {}/{}: sfmpirun", r + 1, a.runs);
                sf.push(timed_job(
                    &c,
                    vm,
                    &format!("sfmpirun --mpi mpich -np {} {job}", a.ranks),
                )?);
                eprintln!("bench: run {}/{}: idle VMs", r + 1, a.runs);
                let t = sh(
                    &c,
                    vm,
                    &format!(
                        "T=$(sf ticket {}) && ID=$(sf clone $T) && if [ \"$ID\" = 0 ]; then echo $T; fi",
                        a.ranks - 1
                    ),
                )?
                .trim()
                .to_string();
                // Idle and answering before the clock starts.
                sh(
                    &c,
                    vm,
                    &format!("for ip in $(sf status {t} | tail -n +2 | cut -d' ' -f3); do until sf-exec -n $ip true; do sleep 0.2; done; done"),
                )?;
                let one = timed_job(
                    &c,
                    vm,
                    &format!("sfmpirun --mpi mpich --ticket {t} -np {} {job}", a.ranks),
                );
                let _ = sh(&c, vm, &format!("sf kill {t} >/dev/null"));
                idle.push(one?);
                eprintln!(
                    "bench: run {}/{}: booting {} VMs",
                    r + 1,
                    a.ranks - 1,
                    a.ranks - 1
                );
                boots.push(boot_vms(hosts, &image, a.ranks - 1, r)?);
            }
            let col = |v: &[(f64, f64)]| Column {
                ranks_running_ms: median(v.iter().map(|x| x.0).collect()),
                total_ms: median(v.iter().map(|x| x.1).collect()),
            };
            let (sfc, idlec, boot) = (col(&sf), col(&idle), median(boots));
            Ok(MpiBench {
                ranks: a.ranks,
                hosts: a.hosts,
                runs: a.runs,
                work: a.work,
                sfmpirun: sfc,
                idle_vms: idlec,
                boot_first: Column {
                    ranks_running_ms: boot + idlec.ranks_running_ms,
                    total_ms: boot + idlec.total_ms,
                },
                boot_ms: boot,
                overhead_ratio: sfc.total_ms / idlec.total_ms,
                overhead_ms: sfc.total_ms - idlec.total_ms,
            })
        })();
        let _ = vm_cmd::stop(&c, vm);
        run
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(());
    }
    println!(
        "MPI job of {} ranks (1 per VM) on {} hosts, pi over {} intervals, medians of {} runs:",
        b.ranks, b.hosts, b.work, b.runs
    );
    println!("  {:<34} {:>14} {:>12}", "", "ranks running", "total");
    for (name, col) in [
        ("sfmpirun (clone, run, tear down)", b.sfmpirun),
        ("idle VMs (zero-cost baseline)", b.idle_vms),
        ("boot VMs first (boot + baseline)", b.boot_first),
    ] {
        println!(
            "  {name:<34} {:>11.0} ms {:>9.0} ms",
            col.ranks_running_ms, col.total_ms
        );
    }
    println!(
        "  sfmpirun over the baseline: {:.2}x ({:+.0} ms); booting {} VMs took {:.0} ms",
        b.overhead_ratio,
        b.overhead_ms,
        b.ranks - 1,
        b.boot_ms
    );
    Ok(())
}

/// Boots `n` VMs of `image` in parallel, round robin over the hosts other
/// than h0 first; returns the ms until all answered. They are stopped
/// afterwards.
fn boot_vms(hosts: &[cluster::HostInfo], image: &str, n: u32, run: u32) -> Result<f64> {
    let t0 = Instant::now();
    let started: Vec<Result<(Client, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let h = &hosts[(i as usize + 1) % hosts.len()];
                let name = format!("mpiboot{run}x{i}");
                s.spawn(move || {
                    let c = Client::new(&h.socket);
                    vm_cmd::start(&c, &name, image, 512, 1, Accel::Auto, false)?;
                    Ok((c, name))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a boot thread failed")))
            .collect()
    });
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut err = None;
    for r in started {
        match r {
            Ok((c, name)) => {
                let _ = vm_cmd::stop(&c, &name);
            }
            Err(e) => err = Some(e),
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(ms),
    }
}
