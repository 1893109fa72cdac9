//! One simulated clone host: the hidden `snowflock bench mcdist-host`,
//! run by the bench in the host's namespace.
//!
//! It mounts a real memtap (FUSE, its own cache), adds the generation
//! (joining its multicast group when multicast is on), starts `--clones`
//! clone processes (`clone.rs`) reading the generation's file in the
//! mount, prints [`HostMsg::Ready`] once they are, waits for
//! `go <unix_us>` on stdin and passes it on (later by `--skew-us`). When
//! every clone has reported it prints [`HostMsg::Result`]: the clones'
//! reads, memtap's figures of the generation, the namespace's UDP
//! counters; then it unmounts.

use super::clone::CloneResult;
use super::report::{percentile, HostMsg, HostResult};
use super::trace::Trace;
use super::{init_child, Mode};
use anyhow::{bail, Context, Result};
use bitvec::prelude::*;
use dom0_memtap::mcast::McastConfig;
use dom0_memtap::{GenerationSpec, Memtap, MemtapConfig};
use snowflock_proto::auth::ClusterKey;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;

/// Options of `snowflock bench mcdist-host` (the bench's own use).
#[derive(clap::Args, Debug)]
pub struct HostOpts {
    /// This host's number (1 = the first clone host).
    #[arg(long)]
    pub index: u32,
    /// This host's fabric address (multicast joins and sends here).
    #[arg(long)]
    pub ip: Ipv4Addr,
    /// The origin's page server.
    #[arg(long)]
    pub origin: SocketAddr,
    #[arg(long)]
    pub trace: PathBuf,
    /// Clones replaying the trace on this host.
    #[arg(long)]
    pub clones: u32,
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long, value_enum)]
    pub mcast: Mode,
    /// Directory of the mount and the cache (created).
    #[arg(long)]
    pub dir: PathBuf,
    /// Seed of the pages' contents.
    #[arg(long)]
    pub seed: u64,
    /// Factor on the trace's times (0: every fault as soon as the previous
    /// returned).
    #[arg(long)]
    pub time_scale: f64,
    /// This host starts this long after the others' common start.
    #[arg(long, default_value_t = 0)]
    pub skew_us: u64,
}

/// `/proc/net/snmp` as `Proto.Field` -> value (the counters of this
/// network namespace).
pub fn snmp(text: &str) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((p, names)), Some((q, values))) = (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        if p != q {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse::<u64>() {
                m.insert(format!("{p}.{n}"), v);
            }
        }
    }
    m
}

fn read_snmp() -> HashMap<String, u64> {
    snmp(&std::fs::read_to_string("/proc/net/snmp").unwrap_or_default())
}

fn say(msg: &HostMsg) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(msg)?)?;
    out.flush()?;
    Ok(())
}

/// The clone processes of this host; killed on drop if still running.
struct Clones(Vec<(Child, ChildStdin, BufReader<ChildStdout>)>);

impl Clones {
    fn spawn(o: &HostOpts, file: &Path) -> Result<Clones> {
        let exe = std::env::current_exe().context("Cannot find the snowflock binary")?;
        let mut v = Clones(Vec::new());
        for _ in 0..o.clones.max(1) {
            let mut c = Command::new(&exe)
                .args(["bench", "mcdist-clone", "--file"])
                .arg(file)
                .arg("--trace")
                .arg(&o.trace)
                .args(["--seed", &o.seed.to_string()])
                .args(["--time-scale", &o.time_scale.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("Cannot start a clone")?;
            let (i, out) = (c.stdin.take(), c.stdout.take());
            v.0.push((c, i.expect("piped"), BufReader::new(out.expect("piped"))));
        }
        Ok(v)
    }

    /// The next line of clone `i`.
    fn line(&mut self, i: usize) -> Result<String> {
        let (c, _, out) = &mut self.0[i];
        let mut line = String::new();
        if out.read_line(&mut line)? == 0 {
            let st = c.wait()?;
            bail!("clone {} ended ({st})", i + 1);
        }
        Ok(line)
    }
}

impl Drop for Clones {
    fn drop(&mut self) {
        for (c, _, _) in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// `snowflock bench mcdist-host`.
pub fn run_host(o: HostOpts) -> Result<()> {
    init_child();
    let text = std::fs::read_to_string(&o.trace)
        .with_context(|| format!("Cannot read {}", o.trace.display()))?;
    let trace = Trace::parse(&text).with_context(|| format!("{}", o.trace.display()))?;
    let key = Arc::new(
        ClusterKey::load(&o.key).with_context(|| format!("Cannot load {}", o.key.display()))?,
    );
    let mut cfg = MemtapConfig::new(o.dir.join("mnt"), o.dir.join("cache"), key);
    if o.mcast == Mode::On {
        cfg.mcast = Some(McastConfig::new(Some(o.ip)));
    }
    let memtap = Memtap::mount(cfg)?;
    let path = memtap.add_generation(GenerationSpec {
        name: trace.generation.clone(),
        size: trace.size,
        holes: bitvec![u64, Lsb0; 0; trace.pages() as usize],
        origin: o.origin,
        mcast: o.mcast == Mode::On,
        complete: false,
    })?;
    let mut clones = Clones::spawn(&o, &path)?;
    for i in 0..clones.0.len() {
        let l = clones.line(i)?;
        if l.trim() != "ready" {
            bail!("clone {} said {l:?} instead of ready", i + 1);
        }
    }
    let before = read_snmp();
    say(&HostMsg::Ready {
        group: (o.mcast == Mode::On)
            .then(|| dom0_memtap::mcast::group_of(&trace.generation).to_string()),
    })?;
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        tracing::info!("the bench closed stdin before `go`");
        return Ok(()); // the bench gave up
    }
    let go = line
        .trim()
        .strip_prefix("go ")
        .and_then(|s| s.parse::<u64>().ok())
        .with_context(|| format!("expected `go <unix_us>`, got {line:?}"))?;
    let go = format!("go {}", go + o.skew_us);
    for (_, stdin, _) in &mut clones.0 {
        writeln!(stdin, "{go}")?;
        stdin.flush()?;
    }
    let mut outs = Vec::new();
    for i in 0..clones.0.len() {
        let l = clones.line(i)?;
        let r: CloneResult =
            serde_json::from_str(&l).with_context(|| format!("clone {} said {l:?}", i + 1))?;
        outs.push(r);
    }
    let after = read_snmp();
    let delta = |k: &str| {
        after
            .get(k)
            .unwrap_or(&0)
            .saturating_sub(*before.get(k).unwrap_or(&0))
    };
    let mut lat: Vec<u64> = outs
        .iter()
        .flat_map(|c| c.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let memtap_stats = memtap
        .generation_stats(&trace.generation)
        .unwrap_or_default();
    let result = HostResult {
        host: o.index,
        clones: o.clones,
        replay_ms: outs.iter().map(|c| c.took_ms).fold(0.0, f64::max) + o.skew_us as f64 / 1e3,
        reads: lat.len() as u64,
        read_p50_us: percentile(&lat, 0.50),
        read_p99_us: percentile(&lat, 0.99),
        read_errors: outs.iter().map(|c| c.errors).sum(),
        wrong_pages: outs.iter().map(|c| c.wrong_pages).sum(),
        udp_rcvbuf_errors: delta("Udp.RcvbufErrors"),
        udp_in_errors: delta("Udp.InErrors"),
        ip_reasm_fails: delta("Ip.ReasmFails"),
        memtap: memtap_stats,
    };
    // The clones have closed the file; they exit now.
    drop(clones);
    say(&HostMsg::Result(Box::new(result)))?;
    memtap.unmount();
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_counters() {
        let text = "\
Ip: Forwarding DefaultTTL InReceives ReasmFails
Ip: 2 64 1000 7
Icmp: InMsgs
Icmp: 3
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors
Udp: 500 1 12 40 9
UdpLite: InDatagrams
UdpLite: 0
";
        let m = snmp(text);
        assert_eq!(m["Ip.ReasmFails"], 7);
        assert_eq!(m["Udp.RcvbufErrors"], 9);
        assert_eq!(m["Udp.InErrors"], 12);
        assert_eq!(m["UdpLite.InDatagrams"], 0);
        assert!(!m.contains_key("Udp.Forwarding"));
        assert!(snmp("").is_empty());
        assert!(snmp("Ip: A\nUdp: 1\n").is_empty());
    }
}
