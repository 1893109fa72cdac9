//! MPI on clones: `sfmpirun` with Debian's stock MPICH and Open MPI over
//! three hosts, `sf-exec` between real VMs, and a second ticket's clones
//! joining the first's (resizing).
//!
//! The Debian test image carries both MPIs and gcc (`snowflock_image::MPI_PACKAGES`); the
//! programs are compiled in the parent VM with `mpicc`.

use serde_json::Value;
use snowflock_tests::*;
use std::time::{Duration, Instant};

/// Ring + allreduce + a rank-dependent line per rank. `ring STATUS SECS`:
/// SECS seconds of barriers, then every rank finalizes and the last one
/// exits with STATUS; STATUS -1: the last rank kills itself (SIGKILL)
/// before finalizing, a crash.
const RING_C: &str = r#"
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int rank, size, token, sum, v, i;
    int status = argc > 1 ? atoi(argv[1]) : 0;
    int secs = argc > 2 ? atoi(argv[2]) : 0;
    char host[256];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    if (rank == 0) {
        token = 1;
        MPI_Send(&token, 1, MPI_INT, 1 % size, 0, MPI_COMM_WORLD);
        MPI_Recv(&token, 1, MPI_INT, size - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else {
        MPI_Recv(&token, 1, MPI_INT, rank - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        token++;
        MPI_Send(&token, 1, MPI_INT, (rank + 1) % size, 0, MPI_COMM_WORLD);
    }
    v = (rank + 1) * (rank + 1);
    MPI_Allreduce(&v, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("rank %d of %d on %s: token %d sum %d\n", rank, size, host, token, sum);
    fflush(stdout);
    for (i = 0; i < secs; i++) { sleep(1); MPI_Barrier(MPI_COMM_WORLD); }
    if (status < 0 && rank == size - 1) raise(SIGKILL);
    MPI_Finalize();
    return rank == size - 1 ? status : 0;
}
"#;

/// Counts the job's processes still running in a VM (by name, so the
/// shell running the count is not one of them).
const LEFTOVERS: &str = "ps -eo comm= | grep -cxE \
    'sf-exec|sfmpirun|mpiexec.hydra|hydra_pmi_proxy|mpirun.openmpi|orterun|orted|ring-mpich|ring-openmpi' \
    || true";

fn sh_in(h: &Daemon, vm: &str, script: &str) -> String {
    h.sh_ok(vm, script).trim().to_string()
}

/// The lines `ring` prints for `n` ranks, without host names, sorted.
fn ring_lines(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("rank "))
        .map(|l| {
            let (head, tail) = l.split_once(" on ").unwrap();
            format!("{head}: {}", tail.split_once(": ").unwrap().1)
        })
        .collect();
    v.sort();
    v
}

fn expected_ring(n: u32) -> Vec<String> {
    let sum: u32 = (1..=n).map(|k| k * k).sum();
    let mut v: Vec<String> = (0..n)
        .map(|r| {
            let token = if r == 0 { n } else { r + 1 };
            format!("rank {r} of {n}: token {token} sum {sum}")
        })
        .collect();
    v.sort();
    v
}

/// Every clone of parent `p` on the cluster (through the origin's list).
fn clones(h0: &Daemon) -> Vec<Value> {
    h0.vms()
        .into_iter()
        .filter(|v| v["clone_id"].as_u64().unwrap_or(0) > 0)
        .collect()
}

fn no_clones_left(h0: &Daemon) {
    let gone = wait_until(Duration::from_secs(30), || {
        clones(h0).is_empty().then_some(())
    });
    assert!(gone.is_some(), "clones left: {:?}", clones(h0));
}

/// No clone left, and none of the job's processes left in the parent.
fn nothing_left(h0: &Daemon, after: &str) {
    no_clones_left(h0);
    assert_eq!(
        sh_in(h0, "p", LEFTOVERS),
        "0",
        "{after}: processes left in the parent: {}",
        sh_in(h0, "p", "ps -eo pid,ppid,pgid,stat,args")
    );
}

/// A script that writes `ring.c` to `/root/mpi` and goes on there with
/// `then` (compiling it, and more).
fn with_ring(then: &str) -> String {
    format!("mkdir -p /root/mpi && cd /root/mpi && cat > ring.c <<'EOF'\n{RING_C}\nEOF\n{then}")
}

/// Runs a 600 s `ring-mpich` job of 3 ranks under `sfmpirun` in the
/// parent, output to `out`; once every rank printed, calls `act`, then
/// waits for `sfmpirun`. Returns its exit status (as printed) and what
/// `act` returned.
fn while_job_runs<T>(h0: &Daemon, out: &str, act: impl FnOnce() -> T) -> (String, T) {
    std::thread::scope(|s| {
        let job = s.spawn(|| {
            h0.sh(
                "p",
                &format!("cd /root/mpi && sfmpirun -np 3 ./ring-mpich 0 600 > {out} 2>&1; echo $?"),
            )
        });
        wait_until(Duration::from_secs(240), || {
            let (_, n, _) = h0.sh("p", &format!("grep -c '^rank' {out} || true"));
            (n.trim() == "3").then_some(())
        })
        .expect("the job started on 3 VMs");
        let acted = act();
        let (_, status, _) = job.join().unwrap();
        (status, acted)
    })
}

fn hosts_of(out: &str) -> std::collections::BTreeSet<String> {
    out.lines()
        .filter_map(|l| {
            l.split_once(" on ")
                .map(|(_, t)| t.split(':').next().unwrap().to_string())
        })
        .collect()
}

/// `sfmpirun -np 4` over three hosts with both MPIs: a normal world,
/// output from every rank, the job's exit status, the stock `cpi`
/// example agreeing with a run on one VM, and no clone left after any of
/// it.
#[test]
fn sfmpirun_runs_mpi_jobs_on_clones_with_mpich_and_open_mpi() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::debian();
    let c = Cluster::up(3, &[]);
    let h0 = c.host(0);
    h0.start_vm("p", &img, "512M");
    sh_in(
        h0,
        "p",
        &with_ring(
            "mpicc.mpich -O2 -o ring-mpich ring.c && mpicc.openmpi -O2 -o ring-openmpi ring.c && \
             mpicc.mpich -O2 -o cpi-mpich /usr/share/doc/mpich/examples/cpi.c -lm && \
             mpicc.openmpi -O2 -o cpi-openmpi /usr/share/doc/mpich/examples/cpi.c -lm",
        ),
    );
    for mpi in ["mpich", "openmpi"] {
        let t0 = Instant::now();
        let (code, out, err) = h0.sh(
            "p",
            &format!("cd /root/mpi && sfmpirun -v --mpi {mpi} -np 4 ./ring-{mpi}"),
        );
        eprintln!("{mpi}: sfmpirun -np 4 took {:?}\n{err}", t0.elapsed());
        assert_eq!(code, 0, "{mpi}: {out}{err}");
        assert_eq!(ring_lines(&out), expected_ring(4), "{mpi}: {out}");
        assert_eq!(hosts_of(&out).len(), 4, "one rank per VM: {out}");
        no_clones_left(h0);

        // A rank that exits 3: sfmpirun exits 3, and no clone is left.
        let (code, out, err) = h0.sh(
            "p",
            &format!("cd /root/mpi && sfmpirun --mpi {mpi} -np 4 ./ring-{mpi} 3"),
        );
        assert_eq!(code, 3, "{mpi}: {out}{err}");
        no_clones_left(h0);
        // A rank that crashes: the job stops, sfmpirun fails, nothing is
        // left in the parent either.
        let (code, out, err) = h0.sh(
            "p",
            &format!("cd /root/mpi && sfmpirun --mpi {mpi} -np 4 ./ring-{mpi} -1"),
        );
        assert_ne!(code, 0, "{mpi}: {out}{err}");
        nothing_left(h0, &format!("{mpi}, a crashed rank"));

        // The stock example: the same answer as on one VM.
        let one = sh_in(
            h0,
            "p",
            &format!(
                "cd /root/mpi && {} ./cpi-{mpi} | grep 'pi is'",
                if mpi == "mpich" {
                    "mpiexec.hydra -n 4"
                } else {
                    "mpirun.openmpi --allow-run-as-root --oversubscribe -np 4"
                }
            ),
        );
        let many = sh_in(
            h0,
            "p",
            &format!("cd /root/mpi && sfmpirun --mpi {mpi} -np 4 ./cpi-{mpi} | grep 'pi is'"),
        );
        let pi = |s: &str| -> f64 {
            s.split("approximately ")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|x| x.trim().parse().ok())
                .unwrap_or_else(|| panic!("no pi in {s:?}"))
        };
        assert!((pi(&one) - pi(&many)).abs() < 1e-12, "{one} vs {many}");
        assert!((pi(&many) - std::f64::consts::PI).abs() < 1e-8, "{many}");
        no_clones_left(h0);
    }

    // Too few clones for the ranks: a clear failure by default, naming the
    // way out.
    let (code, _, err) = h0.sh("p", "cd /root/mpi && sfmpirun -np 400 ./ring-mpich");
    assert_ne!(code, 0);
    assert!(err.contains("--oversubscribe"), "{err}");
    no_clones_left(h0);

    // Two vCPUs: one clone for four ranks, two ranks in each VM (the
    // second stage of the fork is MPI's own).
    h0.ok(&["vm", "stop", "p"]);
    h0.ok(&[
        "vm",
        "start",
        "q",
        "--image",
        img.path(),
        "--mem",
        "512M",
        "--vcpus",
        "2",
    ]);
    assert_eq!(sh_in(h0, "q", "nproc"), "2");
    let (code, out, err) = h0.sh(
        "q",
        &with_ring("mpicc.mpich -O2 -o ring-mpich ring.c && sfmpirun -v -np 4 ./ring-mpich"),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("2 per VM: 1 clone wanted"), "{err}");
    assert_eq!(ring_lines(&out), expected_ring(4), "{out}");
    assert_eq!(hosts_of(&out).len(), 2, "two ranks per VM: {out}");
    no_clones_left(h0);
}

/// A clone killed from the host while the job runs: `sfmpirun` names it,
/// stops the job, ends the other clones and exits non-zero. Then SIGTERM
/// to `sfmpirun` mid-run does the same.
#[test]
fn a_clone_lost_mid_run_stops_the_job_cleanly() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::debian();
    let c = Cluster::up(3, &[]);
    let h0 = c.host(0);
    h0.start_vm("p", &img, "512M");
    sh_in(h0, "p", &with_ring("mpicc.mpich -O2 -o ring-mpich ring.c"));
    // The job runs for up to 600 s; its output goes to a file in the
    // parent so the test can see when it started.
    let (status, (victim, t0)) = while_job_runs(h0, "/root/job.out", || {
        let victim = wait_until(Duration::from_secs(30), || clones(h0).into_iter().next())
            .expect("a clone runs the job");
        let pid = victim["pid"].as_u64().unwrap() as u32;
        let t0 = Instant::now();
        signal(pid, libc::SIGKILL);
        (victim, t0)
    });
    let took = t0.elapsed();
    let log = sh_in(h0, "p", "cat /root/job.out");
    eprintln!("sfmpirun ended {took:?} after the kill:\n{log}");
    assert_ne!(status.trim(), "0", "{log}");
    let id = victim["clone_id"].as_u64().unwrap();
    assert!(
        log.contains(&format!("clone {id} ")) && log.contains("lost"),
        "the message names the lost clone: {log}"
    );
    assert!(took < Duration::from_secs(120), "stopped after {took:?}");
    nothing_left(h0, "a lost clone");

    // SIGTERM to sfmpirun (as Ctrl-C or a batch system would send): one
    // line, 128 + 15, the clones ended, nothing left.
    let (status, ()) = while_job_runs(h0, "/root/job2.out", || {
        sh_in(h0, "p", "kill -TERM $(pidof sfmpirun)");
    });
    let log = sh_in(h0, "p", "cat /root/job2.out");
    assert_eq!(status.trim(), "143", "{log}");
    assert!(log.contains("sfmpirun: stopped by SIGTERM"), "{log}");
    nothing_left(h0, "SIGTERM");
}

/// `sf-exec` between real VMs: stdin, stdout, stderr and the status,
/// refusals outside the flock; and resizing: a second ticket's clones get
/// new IDs on the same flock network and reach the first set.
#[test]
fn sf_exec_between_vms_and_a_second_ticket_joins_the_flock() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::debian();
    let c = Cluster::up(3, &[]);
    let h0 = c.host(0);
    let p = h0.start_vm("p", &img, "384M");
    let pip = p["ip"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let clone_script = "T=$(sf ticket 2) || exit 1; ID=$(sf clone $T) || exit 1; \
                        if [ \"$ID\" = 0 ]; then echo $T; fi";
    // A user of the VM, made before the clones so they know it too.
    sh_in(h0, "p", "useradd -m alice");
    let t1 = sh_in(h0, "p", clone_script);
    let t2 = sh_in(h0, "p", clone_script);
    let status = |t: &str| -> Vec<(u64, String)> {
        sh_in(h0, "p", &format!("sf status {t}"))
            .lines()
            .skip(1)
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(w[1], "running", "{l}");
                (w[0].parse().unwrap(), w[2].to_string())
            })
            .collect()
    };
    let first = status(&t1);
    let second = status(&t2);
    let ids: Vec<u64> = first.iter().chain(&second).map(|(i, _)| *i).collect();
    assert_eq!(
        ids,
        [1, 2, 3, 4],
        "the second ticket's IDs follow the first's"
    );
    let (a, b) = (&first[0].1, &second[1].1);

    // stdin in, stdout and stderr apart, the status back.
    let (code, out, err) = h0.sh(
        "p",
        &format!("printf 'one\\ntwo\\n' | sf-exec {a} 'sort -r; hostname; echo oops >&2; exit 4'"),
    );
    assert_eq!(code, 4, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["two", "one"], "{out}");
    assert_ne!(lines[2], "p", "ran in the clone, not the parent");
    assert_eq!(err.trim(), "oops");

    // The second set reaches the first: a chain from a clone of ticket 2
    // to a clone of ticket 1, and plain ping.
    let (code, out, err) = h0.sh(
        "p",
        &format!("sf-exec {b} 'ping -c 1 -W 5 {a} >/dev/null && sf-exec {a} sf id'"),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("clone_id=1"), "{out}");
    let (code, out, _) = h0.sh("p", &format!("sf-exec {b} sf-exec {pip} sf id"));
    assert_eq!(code, 0);
    assert!(
        out.contains("clone_id=0"),
        "a clone reaches its parent: {out}"
    );

    // Refusals: not in the flock, itself, not an address.
    for (host, why) in [
        ("10.250.254.2", "is not in this VM's flock network"),
        (pip.as_str(), "this VM's own address"),
        ("localhost", "is not an IPv4 address"),
    ] {
        let (code, _, err) = h0.sh("p", &format!("sf-exec {host} touch /tmp/nope"));
        assert_eq!(code, 255, "{host}: {err}");
        assert!(err.contains(why), "{host}: {err}");
    }
    // A user who is not root runs as themselves.
    let (code, out, err) = h0.sh("p", &format!("su alice -c 'cd && sf-exec {a} id -un'"));
    assert_eq!((code, out.trim()), (0, "alice"), "{err}");

    for t in [&t1, &t2] {
        sh_in(h0, "p", &format!("sf kill {t}"));
    }
    no_clones_left(h0);
}
