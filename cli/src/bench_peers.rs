//! `snowflock bench peers`: a clone against what a user would do instead,
//! side by side in one run. The SnowFlock paper names the peers: "booting a
//! copy of her VM from scratch, resuming from a saved state on secondary
//! storage, or live-migrating an idle VM".
//!
//! One local cluster `sfbench` of `--hosts` hosts (removed afterwards). One
//! parent VM on h0 with `--mem` of memory, `--touch-mib` of it filled with a
//! pattern (`sf-memtest hold`). Per run, in this order:
//!
//! * **boot**: `vm start` of a fresh VM of the same image and memory on h1,
//!   until its agent answers. No state, and no VM is stopped: `pause_ms`
//!   is null. The VM stays up during `clone_local`. Every host allows 2
//!   VMs, and a ticket's clone goes to the host with the most free slots
//!   (ties to another host than the parent's): an idle VM (`peersfill1x0`)
//!   holds one of h1's slots for the whole run (and idle VMs all slots of
//!   h2 and up, with `--hosts` above 2), the boot VM the other during
//!   `clone_local`, so that clone lands on h0; with the boot VM stopped,
//!   `clone_remote` lands on h1. The bench checks where they land.
//! * **clone_local**, **clone_remote**: a ticket of one clone, placed on h0,
//!   then (the boot VM stopped) on h1. `pause_ms` is the daemon's parent
//!   pause, `ready_ms` its `clone1_ready` mark (from the daemon receiving
//!   `sf clone` to the clone back from it). The clone's memory is the
//!   parent's on demand; in the first run the bench also times
//!   `sf-memtest verify` of the whole pattern in the clone (`verify_ms`,
//!   not part of `ready_ms`).
//! * **restore**: QMP `stop` of the parent's QEMU, `migrate` to
//!   `exec:cat > FILE` (QEMU 7.2 has no `file:`; the file is on the root
//!   disk, `/var/tmp`, no fsync), then `cont`: the parent is resumed for the
//!   next measurements, where a user moving the VM would end it. `pause_ms`
//!   is `stop` until the save completed. Then a new QEMU with the parent's
//!   command line and `-incoming defer`, fed the file with
//!   `migrate-incoming exec:cat FILE` and `cont` once loaded (the saved VM
//!   was stopped); `ready_ms` is from starting it until it runs.
//!   `total_ms` = save + restore.
//! * **migrate**: a QEMU with the parent's command line listening on
//!   `-incoming tcp:` in h1's namespace (started beforehand, not timed),
//!   then `migrate` of the running parent to it (max-bandwidth lifted, the
//!   default 300 ms downtime limit). `pause_ms` is QEMU's reported
//!   downtime, `ready_ms` from `migrate` until the destination runs. The
//!   source is resumed (`cont`) afterwards.
//!
//! The copies of restore and migrate run the parent's exact command line
//! (read from `/proc/PID/cmdline`) with their own sockets and console, RAM
//! from `memory-backend-ram` instead of the parent's file, and a tap of
//! their own that QEMU creates in the copy's namespace (h0 for restore, h1
//! for migrate) and which is attached to nothing; they are killed
//! when measured. Their state is whole by construction (a migration stream
//! completed): they are not checked further.
//!
//! Figures, not tests: medians over `--runs`, ratios of one run's medians.

use crate::bench::{median, sh};
use crate::bench_hosts::on_bench_cluster;
use crate::client::Client;
use crate::qemu_copy::{copy_args, wait_for, CopyPaths, QemuCopy, Qmp};
use crate::{cluster, vm_cmd};
use anyhow::{bail, Context, Result};
use qapi::qmp::{self, MigrationInfo, MigrationStatus, RunState};
use serde::Serialize;
use snowflock_proto::admin::Accel;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct PeersArgs {
    pub hosts: u32,
    pub runs: u32,
    pub image: String,
    pub mem_mib: u32,
    pub touch_mib: u32,
    pub json: bool,
}

/// Guest memory left to the kernel and agent besides the filled part.
const HEADROOM_MIB: u32 = 128;
/// Slots per host: the parent and a clone on h0, the filler and the boot
/// VM or a clone on h1.
const MAX_VMS: u32 = 2;
/// The destination port of the live migration, in h1's namespace.
const MIGRATE_PORT: u16 = 7199;
/// Longest a save, restore or migration may take.
const MIGRATION_DEADLINE: Duration = Duration::from_secs(180);
/// Memory of an idle VM that holds a slot (see [`fillers`]).
const FILLER_MIB: u32 = 256;
/// The parent's pattern socket in the guest (`sf-memtest hold`).
const PATTERN_SOCK: &str = "/tmp/bench-mt.sock";

/// The methods, in the order of the rows.
pub const METHODS: [&str; 5] = ["clone_local", "clone_remote", "boot", "restore", "migrate"];

pub fn check_args(a: &PeersArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if !(2..=cluster::MAX_HOSTS).contains(&a.hosts) {
        bail!(
            "--hosts must be 2 to {} (h0 and another host)",
            cluster::MAX_HOSTS
        );
    }
    if u64::from(a.touch_mib) + u64::from(HEADROOM_MIB) > u64::from(a.mem_mib) {
        bail!(
            "--touch-mib {} leaves less than {HEADROOM_MIB} MiB of --mem {}M to the guest",
            a.touch_mib,
            a.mem_mib
        );
    }
    Ok(())
}

/// One method's medians. `None`: not applicable (boot's pause), or the
/// method is unavailable (then `unavailable` says why).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Row {
    pub method: &'static str,
    /// Where the worker runs.
    pub host: String,
    /// Runs measured.
    pub runs: u32,
    /// How long the original VM was stopped.
    pub pause_ms: Option<f64>,
    /// Until the worker runs with the state (see the module comment).
    pub ready_ms: Option<f64>,
    /// From the request to a running worker (restore: save + restore).
    pub total_ms: Option<f64>,
    /// Clones, first run: the worker reading the whole pattern.
    pub verify_ms: Option<f64>,
    pub unavailable: Option<String>,
}

/// What one run of a method measured.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    pause_ms: Option<f64>,
    ready_ms: f64,
    total_ms: f64,
    verify_ms: Option<f64>,
}

/// The samples of one method so far, or why it stopped.
struct Method {
    name: &'static str,
    host: String,
    samples: Vec<Sample>,
    failed: Option<String>,
}

impl Method {
    fn new(name: &'static str, host: &str) -> Method {
        Method {
            name,
            host: host.into(),
            samples: Vec::new(),
            failed: None,
        }
    }

    /// Runs `f` unless an earlier run failed; a failure makes the method
    /// unavailable (reported, the other methods go on).
    fn measure(&mut self, f: impl FnOnce() -> Result<Sample>) {
        if self.failed.is_some() {
            return;
        }
        match f() {
            Ok(s) => self.samples.push(s),
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("bench: {} unavailable: {msg}", self.name);
                self.failed = Some(msg);
            }
        }
    }

    fn row(&self) -> Row {
        row_of(self.name, &self.host, &self.samples, self.failed.clone())
    }
}

fn row_of(method: &'static str, host: &str, s: &[Sample], failed: Option<String>) -> Row {
    let med = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
    let ok = failed.is_none() && !s.is_empty();
    Row {
        method,
        host: host.into(),
        runs: s.len() as u32,
        pause_ms: if ok {
            med(s.iter().filter_map(|x| x.pause_ms).collect())
        } else {
            None
        },
        ready_ms: if ok {
            med(s.iter().map(|x| x.ready_ms).collect())
        } else {
            None
        },
        total_ms: if ok {
            med(s.iter().map(|x| x.total_ms).collect())
        } else {
            None
        },
        verify_ms: if ok {
            s.iter().find_map(|x| x.verify_ms)
        } else {
            None
        },
        unavailable: failed.or_else(|| s.is_empty().then(|| "not measured".to_string())),
    }
}

pub fn run(a: PeersArgs) -> Result<Vec<Row>> {
    check_args(&a)?;
    // This run's files, removed when dropped: on the root disk, where a
    // saved VM would go.
    let work = tempfile::Builder::new()
        .prefix("snowflock-peers-")
        .tempdir_in("/var/tmp")
        .context("cannot create a directory in /var/tmp")?;
    let rows = on_bench_cluster(a.hosts, MAX_VMS, |hosts| {
        let (h0, h1) = (&hosts[0], &hosts[1]);
        let c = Client::new(&h0.socket);
        let vm = "peers";
        vm_cmd::start(&c, vm, &a.image, a.mem_mib, 1, Accel::Auto, false)?;
        let res = (|| -> Result<Vec<Row>> {
            if a.touch_mib > 0 {
                eprintln!("bench: {vm} fills {} MiB", a.touch_mib);
                crate::bench::fill(&c, vm, a.touch_mib, 1, PATTERN_SOCK)?;
            }
            // Idle VMs that hold slots for the whole run (see the module
            // comment).
            for (name, i) in fillers(a.hosts) {
                let hc = Client::new(&hosts[i].socket);
                vm_cmd::start(&hc, &name, &a.image, FILLER_MIB, 1, Accel::Auto, false)?;
            }
            let h1c = Client::new(&h1.socket);
            // Where each method's worker runs, in the order of METHODS.
            let at = [&h0.name, &h1.name, &h1.name, &h0.name, &h1.name];
            let mut m: Vec<Method> = METHODS
                .iter()
                .zip(at)
                .map(|(name, host)| Method::new(name, host))
                .collect();
            let [local, remote, boot, restore, migrate] = &mut m[..] else {
                unreachable!("five methods")
            };
            let verify = a.touch_mib > 0;
            for r in 0..a.runs {
                let step = |what: &str| eprintln!("bench: run {}/{}: {what}", r + 1, a.runs);
                step("boot on h1");
                let booted = format!("peerboot{r}");
                boot.measure(|| {
                    let t0 = Instant::now();
                    vm_cmd::start(&h1c, &booted, &a.image, a.mem_mib, 1, Accel::Auto, false)?;
                    let ms = ms_since(t0);
                    Ok(Sample {
                        pause_ms: None,
                        ready_ms: ms,
                        total_ms: ms,
                        verify_ms: None,
                    })
                });
                step("clone on h0");
                local.measure(|| clone_once(&c, vm, &h0.name, verify && r == 0));
                if boot.failed.is_none() {
                    vm_cmd::stop(&h1c, &booted)?;
                }
                step("clone on h1");
                remote.measure(|| clone_once(&c, vm, &h1.name, verify && r == 0));
                let parent = ParentQemu::find(&c, vm, &h0.state_dir)?;
                step("save to a file and restore");
                restore.measure(|| {
                    let res = save_restore(&parent, work.path(), h0, r);
                    parent.resume_if_stopped()?;
                    res
                });
                step("live migration to h1");
                migrate.measure(|| {
                    let res = live_migrate(&parent, work.path(), h1, r);
                    parent.resume_if_stopped()?;
                    res
                });
            }
            Ok(m.iter().map(Method::row).collect())
        })();
        let _ = vm_cmd::stop(&c, vm);
        res
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{} MiB guest, {} MiB filled, {} hosts; medians of {} runs",
            a.mem_mib, a.touch_mib, a.hosts, a.runs
        );
        print!("{}", table(&rows));
        for l in ratios(&rows) {
            println!("{l}");
        }
    }
    Ok(rows)
}

/// The idle VMs (name, host index) that make the placement put
/// `clone_local` on h0 and `clone_remote` on h1: one on h1 (the boot VM
/// takes its other slot during `clone_local`), and every slot of h2 and up.
fn fillers(hosts: u32) -> Vec<(String, usize)> {
    let mut v = vec![("peersfill1x0".to_string(), 1)];
    for i in 2..hosts as usize {
        v.extend((0..MAX_VMS).map(|k| (format!("peersfill{i}x{k}"), i)));
    }
    v
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// One clone that must land on `want`; the clone waits (sleeps) until the
/// bench has found it, verified the pattern in it if `verify`, and killed
/// the ticket.
fn clone_once(c: &Client, vm: &str, want: &str, verify: bool) -> Result<Sample> {
    let ticket = crate::bench::clone_and_keep(c, vm, 1)?;
    let res = (|| -> Result<Sample> {
        let rep = crate::bench::report_for(c, &ticket)?;
        let ready = rep
            .timeline
            .iter()
            .find(|(k, _)| k == "clone1_ready")
            .map(|(_, t)| *t)
            .unwrap_or(rep.all_ready_ms);
        let kid = vm_cmd::list_vms(c)?
            .into_iter()
            .find(|v| v.ticket.as_deref() == Some(&ticket))
            .with_context(|| format!("no clone of ticket {ticket} is listed"))?;
        if kid.host != want {
            bail!(
                "the clone landed on {}, not {want} (ticket placement changed?)",
                kid.host
            );
        }
        let verify_ms = if verify {
            let t0 = Instant::now();
            let out = sh(
                c,
                &kid.name,
                &format!("sf-memtest ctl --sock {PATTERN_SOCK} verify"),
            )?;
            if !out.starts_with("ok") {
                bail!("the clone on {want} does not hold the parent's pattern: {out}");
            }
            Some(ms_since(t0))
        } else {
            None
        };
        Ok(Sample {
            pause_ms: Some(rep.parent_pause_ms),
            ready_ms: ready,
            total_ms: ready,
            verify_ms,
        })
    })();
    let _ = sh(c, vm, &format!("sf kill {ticket} >/dev/null"));
    res
}

/// The parent's current QEMU (a freeze hands the VM to a new process).
struct ParentQemu {
    qemu: String,
    args: Vec<String>,
    qmp: PathBuf,
}

impl ParentQemu {
    /// `vm`'s QEMU on the host whose state directory is `state_dir`.
    fn find(c: &Client, vm: &str, state_dir: &Path) -> Result<ParentQemu> {
        let info = vm_cmd::list_vms(c)?
            .into_iter()
            .find(|v| v.name == vm)
            .with_context(|| format!("VM {vm} is not listed"))?;
        let pid = info.pid.with_context(|| format!("VM {vm} has no pid"))?;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
            .with_context(|| format!("cannot read the command line of {vm}'s QEMU ({pid})"))?;
        let mut argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.is_empty() {
            bail!("{vm}'s QEMU ({pid}) has an empty command line");
        }
        let qemu = argv.remove(0);
        // The daemon's name for it, whichever QEMU answers there now (a
        // handed-over QEMU's command line names the socket where it was
        // made, in `next/`).
        let qmp = state_dir.join("vms").join(vm).join("qmp.sock");
        Ok(ParentQemu {
            qemu,
            args: argv,
            qmp,
        })
    }

    fn connect(&self) -> Result<Qmp> {
        Qmp::connect(&self.qmp, Duration::from_secs(10))
    }

    /// Starts a copy of this QEMU named `tag` (its files in `dir`) in
    /// network namespace `netns`, loading its state from `incoming`.
    fn spawn_copy(&self, dir: &Path, tag: &str, netns: &str, incoming: &str) -> Result<QemuCopy> {
        let paths = CopyPaths::new(dir, tag);
        let args = copy_args(&self.args, &paths, incoming)?;
        QemuCopy::spawn(
            &self.qemu,
            &args,
            Some(netns),
            &dir.join(format!("{tag}-qemu.log")),
            &paths.qmp,
        )
    }

    /// Cancels a migration still under way and resumes a stopped parent.
    fn resume_if_stopped(&self) -> Result<()> {
        use MigrationStatus::{active, cancelling, device, setup};
        let mut q = self.connect()?;
        let mig = q.migration()?;
        if matches!(mig.status, Some(active | setup | device)) {
            q.execute(&qmp::migrate_cancel {})?;
            wait_for(&mut q, "the migration to cancel", MIGRATION_DEADLINE, |q| {
                Ok(!matches!(
                    q.migration()?.status,
                    Some(active | setup | device | cancelling)
                ))
            })?;
        }
        if q.status()? != RunState::running {
            q.execute(&qmp::cont {})?;
        }
        Ok(())
    }
}

/// Polls `query-migrate` until the migration completed; its answer.
fn migration_done(q: &mut Qmp) -> Result<MigrationInfo> {
    let mut last = MigrationInfo::default();
    wait_for(q, "the migration", MIGRATION_DEADLINE, |q| {
        last = q.migration()?;
        migration_over(&last)
    })?;
    Ok(last)
}

/// Whether a `query-migrate` answer says the migration completed; an error
/// if it failed or was cancelled.
fn migration_over(m: &MigrationInfo) -> Result<bool> {
    match m.status {
        Some(MigrationStatus::completed) => Ok(true),
        Some(s @ (MigrationStatus::failed | MigrationStatus::cancelled)) => bail!(
            "migration {s:?}: {}",
            m.error_desc.as_deref().unwrap_or("no reason given")
        ),
        _ => Ok(false),
    }
}

/// Lifts QEMU's default migration bandwidth cap (the bench measures the
/// method, not a throttle); the old cap, to put back.
fn unthrottle(q: &mut Qmp) -> Result<Option<u64>> {
    let old = q.max_bandwidth()?;
    q.set_max_bandwidth(64 << 30)?;
    Ok(old)
}

fn restore_throttle(q: &mut Qmp, old: Option<u64>) {
    if let Some(bw) = old {
        let _ = q.set_max_bandwidth(bw);
    }
}

/// Save to a file (parent stopped), resume the parent, restore the file
/// in a new QEMU.
fn save_restore(
    parent: &ParentQemu,
    dir: &Path,
    host: &cluster::HostInfo,
    run: u32,
) -> Result<Sample> {
    let file = dir.join(format!("state{run}.mig"));
    let _rm = RemoveFile(file.clone());
    let pause_ms = {
        let mut q = parent.connect()?;
        let old = unthrottle(&mut q)?;
        let t0 = Instant::now();
        q.execute(&qmp::stop {})?;
        let res = q
            .migrate(&format!("exec:cat > {}", file.display()))
            .and_then(|_| migration_done(&mut q));
        let ms = ms_since(t0);
        restore_throttle(&mut q, old);
        res?;
        q.execute(&qmp::cont {})?;
        ms
    };
    eprintln!(
        "bench: saved {} MiB in {pause_ms:.0} ms",
        std::fs::metadata(&file).map(|m| m.len() >> 20).unwrap_or(0)
    );
    let t0 = Instant::now();
    let mut copy = parent.spawn_copy(dir, &format!("restore{run}"), &host.netns, "defer")?;
    (|| -> Result<()> {
        let mut q = copy.connect()?;
        q.migrate_incoming(&format!("exec:cat {}", file.display()))?;
        // The saved VM was stopped: the loaded one waits for `cont`.
        wait_for(
            &mut q,
            "the restored VM to run",
            MIGRATION_DEADLINE,
            |q| match q.status()? {
                RunState::running => Ok(true),
                RunState::paused => q.execute(&qmp::cont {}).map(|_| false),
                _ => Ok(false),
            },
        )
    })()
    .map_err(|e| copy.explain(e))?;
    let ready_ms = ms_since(t0);
    Ok(Sample {
        pause_ms: Some(pause_ms),
        ready_ms,
        total_ms: pause_ms + ready_ms,
        verify_ms: None,
    })
}

/// Live migration of the parent to a QEMU waiting in `to`'s namespace.
fn live_migrate(
    parent: &ParentQemu,
    dir: &Path,
    to: &cluster::HostInfo,
    run: u32,
) -> Result<Sample> {
    let uri = format!("tcp:{}:{MIGRATE_PORT}", to.ip);
    let mut copy = parent.spawn_copy(dir, &format!("migrate{run}"), &to.netns, &uri)?;
    let (done, ready_ms) = (|| -> Result<(MigrationInfo, f64)> {
        let mut dest = copy.connect()?;
        let mut q = parent.connect()?;
        let old = unthrottle(&mut q)?;
        let t0 = Instant::now();
        let res = q.migrate(&uri).and_then(|_| migration_done(&mut q));
        restore_throttle(&mut q, old);
        let done = res?;
        wait_for(
            &mut dest,
            "the migrated VM to run",
            MIGRATION_DEADLINE,
            |d| Ok(d.status()? == RunState::running),
        )?;
        Ok((done, ms_since(t0)))
    })()
    .map_err(|e| copy.explain(e))?;
    let downtime = done.downtime.context("query-migrate gave no downtime")? as f64;
    Ok(Sample {
        pause_ms: Some(downtime),
        ready_ms,
        total_ms: ready_ms,
        verify_ms: None,
    })
}

/// Removes a file when dropped.
struct RemoveFile(PathBuf);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}"))
}

/// The text table, one line per method.
pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<13} {:<5} {:>4} {:>10} {:>10} {:>10} {:>10}\n",
        "method", "host", "runs", "pause_ms", "ready_ms", "total_ms", "verify_ms"
    );
    for r in rows {
        match &r.unavailable {
            Some(why) => s.push_str(&format!(
                "{:<13} {:<5} {:>4} unavailable: {why}\n",
                r.method, r.host, r.runs
            )),
            None => s.push_str(&format!(
                "{:<13} {:<5} {:>4} {:>10} {:>10} {:>10} {:>10}\n",
                r.method,
                r.host,
                r.runs,
                ms(r.pause_ms),
                ms(r.ready_ms),
                ms(r.total_ms),
                ms(r.verify_ms)
            )),
        }
    }
    s
}

/// Each peer against each clone: ratios of the medians (pause where both
/// stop the VM).
pub fn ratios(rows: &[Row]) -> Vec<String> {
    let get = |m: &str| {
        rows.iter()
            .find(|r| r.method == m && r.unavailable.is_none())
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut out = Vec::new();
    for peer in ["restore", "migrate", "boot"] {
        for clone in ["clone_remote", "clone_local"] {
            let (Some(p), Some(c)) = (get(peer), get(clone)) else {
                continue;
            };
            let mut parts = Vec::new();
            for (what, x) in [
                ("ready", ratio(p.ready_ms, c.ready_ms)),
                ("pause", ratio(p.pause_ms, c.pause_ms)),
                ("total", ratio(p.total_ms, c.total_ms)),
            ] {
                if let Some(x) = x {
                    parts.push(format!("{what} {x:.1}x"));
                }
            }
            if !parts.is_empty() {
                out.push(format!("{peer} / {clone}: {}", parts.join(", ")));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(hosts: u32, runs: u32, mem_mib: u32, touch_mib: u32) -> PeersArgs {
        PeersArgs {
            hosts,
            runs,
            image: String::new(),
            mem_mib,
            touch_mib,
            json: false,
        }
    }

    #[test]
    fn argument_checks() {
        assert!(check_args(&args(2, 3, 1024, 512)).is_ok());
        assert!(check_args(&args(2, 3, 1024, 896)).is_ok());
        assert!(check_args(&args(2, 3, 1024, 897)).is_err());
        assert!(check_args(&args(1, 3, 1024, 512)).is_err());
        assert!(check_args(&args(33, 3, 1024, 512)).is_err());
        assert!(check_args(&args(2, 0, 1024, 512)).is_err());
        assert!(check_args(&args(2, 1, 256, 0)).is_ok());
    }

    #[test]
    fn fillers_leave_h0_the_most_slots_then_h1() {
        assert_eq!(fillers(2), vec![("peersfill1x0".to_string(), 1)]);
        let f = fillers(4);
        assert_eq!(f.len(), 1 + 2 * MAX_VMS as usize);
        for i in 2..4 {
            assert_eq!(f.iter().filter(|x| x.1 == i).count(), MAX_VMS as usize);
        }
        let mut names: Vec<&String> = f.iter().map(|x| &x.0).collect();
        names.dedup();
        assert_eq!(names.len(), f.len());
    }

    fn sample(pause: Option<f64>, ready: f64) -> Sample {
        Sample {
            pause_ms: pause,
            ready_ms: ready,
            total_ms: ready + pause.unwrap_or(0.0),
            verify_ms: None,
        }
    }

    #[test]
    fn rows_take_medians_and_mark_failures() {
        let s = [
            sample(Some(10.0), 100.0),
            sample(Some(30.0), 300.0),
            sample(Some(20.0), 200.0),
        ];
        let r = row_of("restore", "h0", &s, None);
        assert_eq!(
            (r.pause_ms, r.ready_ms, r.total_ms),
            (Some(20.0), Some(200.0), Some(220.0))
        );
        assert_eq!((r.runs, r.unavailable.clone()), (3, None));
        let b = row_of("boot", "h1", &[sample(None, 5.0)], None);
        assert_eq!((b.pause_ms, b.ready_ms), (None, Some(5.0)));
        let f = row_of("migrate", "h1", &s[..1], Some("no tcp".into()));
        assert_eq!((f.pause_ms, f.ready_ms, f.runs), (None, None, 1));
        assert_eq!(f.unavailable.as_deref(), Some("no tcp"));
        assert!(row_of("boot", "h1", &[], None).unavailable.is_some());
    }

    #[test]
    fn migration_over_by_status() {
        let info = |status, desc: Option<&str>| MigrationInfo {
            status,
            error_desc: desc.map(String::from),
            ..Default::default()
        };
        assert!(migration_over(&info(Some(MigrationStatus::completed), None)).unwrap());
        assert!(!migration_over(&info(Some(MigrationStatus::active), None)).unwrap());
        assert!(!migration_over(&info(None, None)).unwrap());
        let e = migration_over(&info(Some(MigrationStatus::failed), Some("EPIPE"))).unwrap_err();
        assert_eq!(e.to_string(), "migration failed: EPIPE");
        let e = migration_over(&info(Some(MigrationStatus::cancelled), None)).unwrap_err();
        assert_eq!(e.to_string(), "migration cancelled: no reason given");
    }

    #[test]
    fn json_shape() {
        let r = row_of("boot", "h1", &[sample(None, 5.0)], None);
        let v = serde_json::to_value(vec![r]).unwrap();
        let o = v[0].as_object().unwrap();
        assert_eq!(o["method"], "boot");
        assert!(o["pause_ms"].is_null());
        assert_eq!(o["ready_ms"], 5.0);
        for k in ["host", "runs", "total_ms", "verify_ms", "unavailable"] {
            assert!(o.contains_key(k), "{k}");
        }
        assert!(METHODS.contains(&"clone_remote"));
    }

    #[test]
    fn table_and_ratios() {
        let rows = vec![
            row_of("clone_remote", "h1", &[sample(Some(10.0), 500.0)], None),
            row_of("boot", "h1", &[sample(None, 1000.0)], None),
            row_of("restore", "h0", &[sample(Some(4000.0), 5000.0)], None),
            row_of("migrate", "h1", &[], Some("no route".into())),
        ];
        let t = table(&rows);
        assert_eq!(t.lines().count(), 5);
        assert!(t.contains("unavailable: no route"));
        assert!(t
            .lines()
            .any(|l| l.starts_with("boot") && l.contains(" - ")));
        let r = ratios(&rows);
        assert_eq!(
            r,
            vec![
                "restore / clone_remote: ready 10.0x, pause 400.0x, total 17.6x".to_string(),
                "boot / clone_remote: ready 2.0x, total 2.0x".to_string(),
            ]
        );
    }
}
