//! `snowflock bench mcdist`: multicast page distribution at scale, without
//! VMs. A clone's page-fault trace (recorded by memtap, or a synthetic
//! one) is replayed from many simulated clone hosts against one real page
//! server, with multicast on and off, side by side.
//!
//! The setup, per host count H and mode (see `docs/performance.md`):
//!
//! * namespaces like a local cluster's (`net.rs`): a fabric bridge, the
//!   origin `sfmcdist-h0` and clone hosts `sfmcdist-h1..hH`, multicast
//!   flooded by the bridge;
//! * in the origin, `snowflock bench mcdist-origin` (`origin.rs`): a real
//!   `PageServer` serving a generation of the trace's size whose traced
//!   pages hold pseudo-random data;
//! * in each clone host, `snowflock bench mcdist-host` (`host.rs`): a real
//!   memtap FUSE mount, and K processes `snowflock bench mcdist-clone`
//!   (`clone.rs`), each a "clone" replaying the trace with `pread`s of the
//!   mount's file, checking every page's bytes.
//!
//! Origin egress is the origin link's `tx_bytes` over the replay; the
//! rest comes from memtap's figures of each host and the hosts' UDP
//! counters (`report.rs`). The trace format and the synthetic trace are in
//! `trace.rs`.

mod clone;
mod host;
mod net;
mod origin;
mod report;
mod trace;

pub use clone::{run_clone, CloneOpts};
pub use host::{run_host, HostOpts};
pub use origin::{run_origin, OriginOpts};

use anyhow::{bail, Context, Result};
use dom0_memtap::PAGE_SIZE;
use net::{Group, Net};
use origin::OriginReport;
use report::{HostMsg, HostResult, Row, RunInfo};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use trace::{Synthetic, Trace};

/// Multicast in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    On,
    Off,
}

/// `--mcast`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum McastArg {
    On,
    Off,
    Both,
}

/// Options of `snowflock bench mcdist`.
#[derive(clap::Args, Debug)]
pub struct Opts {
    /// Simulated clone hosts, one run per value (and mode).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub hosts: Vec<u32>,
    /// Clones replaying the trace on each host (they share its page cache).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub clones_per_host: u32,
    /// A fault trace recorded by memtap. Without it the bench makes a
    /// synthetic trace (see --synthetic-faults) and says so.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Faults (of one page) of the synthetic trace.
    #[arg(long, default_value_t = 20_000, conflicts_with = "trace")]
    pub synthetic_faults: u64,
    /// Size of the synthetic trace's generation, MiB.
    #[arg(long, default_value_t = 256, conflicts_with = "trace")]
    pub synthetic_mib: u64,
    /// Multicast on, off, or both side by side.
    #[arg(long, value_enum, default_value = "both")]
    pub mcast: McastArg,
    /// Factor on the trace's times: 1 replays at the recorded pace, 0
    /// faults as fast as the reads return.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Spread the hosts' starts over this many milliseconds (0: all start
    /// at once, in lockstep).
    #[arg(long, default_value_t = 0)]
    pub start_skew_ms: u64,
    /// Seed of the synthetic trace and of the pages' contents.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// One JSON row per host count and mode, instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Logging of the bench's processes: tracing to stderr (their log files),
/// `RUST_LOG` or warnings; they end with the process that started them
/// (SIGTERM when it dies), and take the signals the bench blocks for its
/// signal thread (a blocked mask is inherited through `ip netns exec`).
pub(crate) fn init_child() {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        set.add(s);
    }
    let _ = set.thread_unblock();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
}

/// The trace a run replays, and how to say which it is.
struct Loaded {
    trace: Trace,
    label: String,
    describe: String,
}

fn load_trace(o: &Opts) -> Result<Loaded> {
    if let Some(p) = &o.trace {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("Cannot read {}", p.display()))?;
        let trace = Trace::parse(&text).with_context(|| format!("{}", p.display()))?;
        let describe = format!(
            "trace {} (recorded): generation {} of {} MiB, {} faults, {} distinct pages, {:.2} s",
            p.display(),
            trace.generation,
            trace.size >> 20,
            trace.faults.len(),
            trace.distinct_pages(),
            trace.duration_us() as f64 / 1e6
        );
        return Ok(Loaded {
            trace,
            label: p.display().to_string(),
            describe,
        });
    }
    if o.synthetic_mib == 0 || o.synthetic_mib > 64 << 10 || o.synthetic_faults == 0 {
        bail!("--synthetic-mib must be 1 to 65536 and --synthetic-faults at least 1");
    }
    let s = Synthetic {
        faults: o.synthetic_faults,
        size: o.synthetic_mib << 20,
        seed: o.seed,
    };
    let trace = trace::synthetic(s);
    let describe = format!(
        "trace SYNTHETIC (no --trace given): {} faults of 1 page over {} MiB, hot set + sequential runs, seed {}, {:.2} s",
        trace.faults.len(),
        o.synthetic_mib,
        o.seed,
        trace.duration_us() as f64 / 1e6
    );
    Ok(Loaded {
        trace,
        label: "synthetic".into(),
        describe,
    })
}

/// Refuses runs that would not fit in memory: every host holds the traced
/// pages twice (memtap's cache in /dev/shm, the mount's page cache).
fn check_memory(trace: &Trace, hosts: u32) -> Result<()> {
    let per_host = trace.distinct_pages() * PAGE_SIZE * 2;
    let need = per_host * hosts as u64 + trace.distinct_pages() * PAGE_SIZE;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let avail = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024);
    if let Some(avail) = avail {
        if need > avail / 10 * 8 {
            bail!(
                "{hosts} hosts need about {} MiB ({} MiB each) and {} MiB are available: use fewer hosts or a smaller trace",
                need >> 20,
                per_host >> 20,
                avail >> 20
            );
        }
    }
    Ok(())
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What every run shares.
struct Ctx<'a> {
    net: &'a Net,
    o: &'a Opts,
    loaded: &'a Loaded,
    trace_file: PathBuf,
    gen_file: PathBuf,
    key_file: PathBuf,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// One host count in one mode.
fn one_run(c: &Ctx, hosts: u32, mode: Mode) -> Result<Row> {
    let trace = &c.loaded.trace;
    let what = format!(
        "{hosts} host(s), multicast {}",
        if mode == Mode::On { "on" } else { "off" }
    );
    let t_run = Instant::now();
    let mode_arg = if mode == Mode::On { "on" } else { "off" };
    let dir = c.net.dir();
    let oh = c.net.host(0);
    let listen = format!("{}:{}", oh.ip, crate::cluster::PAGE_PORT);
    let mut origin = Group::new();
    origin.spawn(
        "the origin",
        &oh.netns,
        &[
            "bench".into(),
            "mcdist-origin".into(),
            "--file".into(),
            s(&c.gen_file),
            "--generation".into(),
            trace.generation.clone(),
            "--listen".into(),
            listen,
            "--key".into(),
            s(&c.key_file),
            "--mcast".into(),
            mode_arg.into(),
            "--max-connections".into(),
            (hosts * (16 + c.o.clones_per_host) + 16).to_string(),
            "--link".into(),
            crate::cluster::HOST_LINK.into(),
        ],
        &dir.join("origin.log"),
    )?;
    let ask = |g: &mut Group, deadline| -> Result<OriginReport> {
        let (_, line) = g.next(deadline)?;
        serde_json::from_str(&line).with_context(|| format!("the origin said {line:?}"))
    };
    let first = ask(&mut origin, Instant::now() + Duration::from_secs(20))?;
    let mut group = Group::new();
    let skew = c.o.start_skew_ms * 1000;
    for i in 1..=hosts {
        let h = c.net.host(i);
        let hdir = dir.join(&h.name);
        group.spawn(
            &h.name,
            &h.netns,
            &[
                "bench".into(),
                "mcdist-host".into(),
                "--index".into(),
                i.to_string(),
                "--ip".into(),
                h.ip.clone(),
                "--origin".into(),
                first.addr.to_string(),
                "--trace".into(),
                s(&c.trace_file),
                "--clones".into(),
                c.o.clones_per_host.to_string(),
                "--key".into(),
                s(&c.key_file),
                "--mcast".into(),
                mode_arg.into(),
                "--dir".into(),
                s(&hdir),
                "--seed".into(),
                c.o.seed.to_string(),
                "--time-scale".into(),
                c.o.time_scale.to_string(),
                "--skew-us".into(),
                (skew * (i as u64 - 1) / hosts as u64).to_string(),
            ],
            &dir.join(format!("{}.log", h.name)),
        )?;
    }
    let ready_by = Instant::now() + Duration::from_secs(30) + Duration::from_millis(500) * hosts;
    for n in 1..=hosts {
        let (i, line) = group.next(ready_by)?;
        match serde_json::from_str::<HostMsg>(&line) {
            Ok(HostMsg::Ready { .. }) => {}
            _ => bail!("host {} said {line:?} instead of ready", i + 1),
        }
        if n % 16 == 0 && n < hosts {
            eprintln!("bench mcdist: {what}: {n}/{hosts} hosts mounted");
        }
    }
    origin.send(0, "stats")?;
    let before = ask(&mut origin, Instant::now() + Duration::from_secs(10))?;
    let go = unix_us() + 200_000;
    for i in 0..hosts as usize {
        group.send(i, &format!("go {go}"))?;
    }
    eprintln!(
        "bench mcdist: {what}: replaying ({} faults x {} clone(s) per host)",
        trace.faults.len(),
        c.o.clones_per_host
    );
    let trace_ms = trace.duration_us() as f64 / 1e3 * c.o.time_scale;
    // A guard against hangs, not an expectation: 200 us per fault per host.
    let done_by = Instant::now()
        + Duration::from_secs(120)
        + Duration::from_secs_f64(trace_ms / 1e3 + skew as f64 / 1e6)
        + Duration::from_micros(200 * trace.faults.len() as u64 * hosts as u64);
    let mut results: Vec<HostResult> = Vec::new();
    let t0 = Instant::now();
    let mut said = Instant::now();
    while results.len() < hosts as usize {
        if said.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "bench mcdist: {what}: {}/{hosts} hosts done ({:.0} s)",
                results.len(),
                t0.elapsed().as_secs_f64()
            );
            said = Instant::now();
        }
        if Instant::now() >= done_by {
            bail!(
                "{what}: the replay took too long ({}/{hosts} hosts done)",
                results.len()
            );
        }
        let Some((i, line)) = group.next_until(done_by.min(said + Duration::from_secs(5)))? else {
            continue;
        };
        match serde_json::from_str::<HostMsg>(&line) {
            Ok(HostMsg::Result(r)) => {
                group.done(i);
                results.push(*r)
            }
            _ => bail!("host {} said {line:?} instead of its result", i + 1),
        }
    }
    origin.send(0, "stats")?;
    let after = ask(&mut origin, Instant::now() + Duration::from_secs(10))?;
    group.finish(Duration::from_secs(30))?;
    origin.finish(Duration::from_secs(10))?;
    for i in 1..=hosts {
        let _ = std::fs::remove_dir_all(dir.join(c.net.host(i).name));
    }
    results.sort_by_key(|r| r.host);
    let row = report::aggregate(
        &RunInfo {
            hosts,
            clones_per_host: c.o.clones_per_host,
            mcast: mode == Mode::On,
            trace: &c.loaded.label,
            trace_pages: trace.distinct_pages(),
            trace_ms,
        },
        &results,
        &before,
        &after,
    );
    eprintln!(
        "bench mcdist: {what}: {:.1} MiB out of the origin, replay {:.0} ms ({:.0} s in all)",
        row.origin_egress_bytes as f64 / 1048576.0,
        row.replay_ms,
        t_run.elapsed().as_secs_f64()
    );
    Ok(row)
}

/// `snowflock bench mcdist`.
pub fn run(o: Opts) -> Result<Vec<Row>> {
    net::catch_signals()?;
    if !crate::sys::is_root() {
        bail!("`snowflock bench mcdist` must run as root (it creates network namespaces and FUSE mounts)");
    }
    if o.hosts.is_empty() || o.hosts.iter().any(|h| !(1..=net::MAX_HOSTS).contains(h)) {
        bail!("every --hosts value must be 1 to {}", net::MAX_HOSTS);
    }
    if !(o.time_scale >= 0.0 && o.time_scale.is_finite()) {
        bail!("--time-scale must be 0 or more");
    }
    let modes = match o.mcast {
        McastArg::On => vec![Mode::On],
        McastArg::Off => vec![Mode::Off],
        McastArg::Both => vec![Mode::On, Mode::Off],
    };
    let loaded = load_trace(&o)?;
    let max = *o.hosts.iter().max().expect("not empty");
    check_memory(&loaded.trace, max)?;
    eprintln!("bench mcdist: {}", loaded.describe);
    eprintln!("bench mcdist: making the fabric, the origin and {max} host namespaces");
    let net = Net::up(max)?;
    let dir = net.dir();
    let trace_file = dir.join("trace");
    std::fs::write(&trace_file, loaded.trace.to_text())
        .with_context(|| format!("Cannot write {}", trace_file.display()))?;
    let gen_file = dir.join("generation");
    origin::write_generation(&gen_file, &loaded.trace, o.seed)?;
    let key_file = dir.join("key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let key = snowflock_proto::auth::ClusterKey::generate();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .with_context(|| format!("Cannot create {}", key_file.display()))?;
        std::io::Write::write_all(&mut f, format!("{}\n", key.to_hex()).as_bytes())?;
    }
    let c = Ctx {
        net: &net,
        o: &o,
        loaded: &loaded,
        trace_file,
        gen_file,
        key_file,
    };
    let mut rows = Vec::new();
    for &h in &o.hosts {
        for &m in &modes {
            rows.push(one_run(&c, h, m)?);
        }
    }
    drop(net);
    if o.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{}", loaded.describe);
        println!(
            "clones per host: {}; time scale {}; start skew {} ms",
            o.clones_per_host, o.time_scale, o.start_skew_ms
        );
        println!(
            "egress: the origin link's bytes out (x_trace: over the trace's bytes; tcp: page bytes answered by TCP; mc_dgram: page datagrams multicast); \
             p50/p99: memtap's fault latency, median over hosts; rd99: a clone's read p99; rereq: memtap's re-requests of coalesced pages; \
             o_rereq: pages asked for after they were multicast; lost: datagrams the hosts' kernels dropped; wrong: pages read wrong or not at all"
        );
        print!("{}", report::table(&rows));
        let wrong: u64 = rows.iter().map(|r| r.wrong_pages + r.read_errors).sum();
        if wrong > 0 {
            println!("WARNING: {wrong} pages read wrong or not at all: see wrong_pages and read_errors in --json");
        }
    }
    Ok(rows)
}
