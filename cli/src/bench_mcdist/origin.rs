//! The origin: the generation file the bench serves, and the hidden
//! `snowflock bench mcdist-origin`, a real page server running in the
//! origin's namespace.
//!
//! The origin process prints one JSON line ([`OriginReport`]) when it
//! serves, and another for every `stats` line it reads on stdin; at the
//! end of stdin it stops the server and exits.

use super::trace::{SplitMix, Trace};
use super::{init_child, Mode};
use anyhow::{Context, Result};
use dom0_memtap::mcast::McastConfig;
use dom0_memtap::{PageServer, ServerConfig, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use snowflock_proto::auth::ClusterKey;
use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The contents of page `p` of the bench's generation: pseudo-random
/// bytes from `seed` and `p`, so that a host can check every page it reads
/// without a copy of the file.
pub fn page_content(seed: u64, p: u64, buf: &mut [u8]) {
    let mut r = SplitMix(seed ^ p.wrapping_mul(0xd6e8_feb8_6659_fd93));
    for w in buf.chunks_mut(8) {
        let v = r.next_u64().to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

/// Writes the generation a trace reads: a file of the trace's size whose
/// pages the trace reads hold [`page_content`]; the others (never read)
/// are left as holes of the file.
pub fn write_generation(path: &Path, trace: &Trace, seed: u64) -> Result<()> {
    let f =
        std::fs::File::create(path).with_context(|| format!("Cannot create {}", path.display()))?;
    f.set_len(trace.size)?;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for (p, t) in trace.touched().into_iter().enumerate() {
        if t {
            page_content(seed, p as u64, &mut buf);
            f.write_all_at(&buf, p as u64 * PAGE_SIZE)
                .with_context(|| format!("Cannot write {}", path.display()))?;
        }
    }
    Ok(())
}

/// Options of `snowflock bench mcdist-origin` (the bench's own use).
#[derive(clap::Args, Debug)]
pub struct OriginOpts {
    /// The generation file to serve.
    #[arg(long)]
    pub file: PathBuf,
    /// The name it is published as.
    #[arg(long)]
    pub generation: String,
    /// Address the page server listens on (the origin's fabric address).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The cluster key file.
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long, value_enum)]
    pub mcast: Mode,
    /// The page server's connection limit.
    #[arg(long)]
    pub max_connections: usize,
    /// The interface whose counters are the origin's egress.
    #[arg(long)]
    pub link: String,
}

/// What the origin reports: its link's counters and the page server's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OriginReport {
    pub addr: SocketAddr,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    /// `ServerStats`, as the page server has them (new counters show up
    /// here without a change to the bench).
    pub server: serde_json::Value,
}

/// A counter of `link` in this network namespace (`ip netns exec`
/// mounts the namespace's own /sys).
fn link_counter(link: &str, what: &str) -> Result<u64> {
    let p = format!("/sys/class/net/{link}/statistics/{what}");
    let s = std::fs::read_to_string(&p).with_context(|| format!("Cannot read {p}"))?;
    s.trim()
        .parse()
        .with_context(|| format!("{p}: not a number: {s:?}"))
}

/// `snowflock bench mcdist-origin`.
pub fn run_origin(o: OriginOpts) -> Result<()> {
    init_child();
    let key = Arc::new(
        ClusterKey::load(&o.key).with_context(|| format!("Cannot load {}", o.key.display()))?,
    );
    let iface = match o.listen.ip() {
        std::net::IpAddr::V4(a) => Some(a),
        std::net::IpAddr::V6(_) => None::<Ipv4Addr>,
    };
    let cfg = ServerConfig {
        max_connections: o.max_connections,
        mcast: (o.mcast == Mode::On).then(|| McastConfig::new(iface)),
        ..Default::default()
    };
    let server = PageServer::start_with(o.listen, key, cfg)
        .with_context(|| format!("Cannot start a page server on {}", o.listen))?;
    server
        .publish(&o.generation, &o.file)
        .with_context(|| format!("Cannot publish {}", o.file.display()))?;
    let report = || -> Result<OriginReport> {
        Ok(OriginReport {
            addr: server.local_addr(),
            tx_bytes: link_counter(&o.link, "tx_bytes")?,
            tx_packets: link_counter(&o.link, "tx_packets")?,
            rx_bytes: link_counter(&o.link, "rx_bytes")?,
            server: serde_json::to_value(server.stats())?,
        })
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&report()?)?)?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        if line?.trim() == "stats" {
            writeln!(out, "{}", serde_json::to_string(&report()?)?)?;
            out.flush()?;
        }
    }
    server.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_mcdist::trace::{Fault, Trace};

    #[test]
    fn page_contents_differ_by_page_and_seed() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        page_content(1, 5, &mut a);
        page_content(1, 5, &mut b);
        assert_eq!(a, b);
        page_content(1, 6, &mut b);
        assert_ne!(a, b);
        page_content(2, 5, &mut b);
        assert_ne!(a, b);
        assert!(a.iter().any(|x| *x != 0));
    }

    #[test]
    fn generation_file_holds_the_traced_pages() {
        let dir = tempfile::tempdir().unwrap();
        let tr = Trace {
            generation: "g".into(),
            size: 8 * 4096,
            faults: vec![Fault {
                t_us: 0,
                first_page: 2,
                pages: 3,
            }],
        };
        let path = dir.path().join("gen");
        write_generation(&path, &tr, 7).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 8 * 4096);
        let mut want = vec![0u8; 4096];
        for p in 0..8u64 {
            let got = &bytes[(p * 4096) as usize..((p + 1) * 4096) as usize];
            if (2..5).contains(&p) {
                page_content(7, p, &mut want);
                assert_eq!(got, &want[..], "page {p}");
            } else {
                assert!(got.iter().all(|x| *x == 0), "page {p}");
            }
        }
    }
}
