//! One simulated clone: the hidden `snowflock bench mcdist-clone`, started
//! by its host's process in the host's namespaces (network and mount).
//!
//! A process of its own, like the QEMU it stands for, and not a thread of
//! the memtap process: a process that dies with files open on its own
//! FUSE mount hangs in its exit for good (closing them waits for a FUSE
//! daemon that is gone), so readers and server must be apart.
//!
//! It opens the generation's file in the mount, prints `ready`, waits for
//! `go <unix_us>` on stdin, then reads every fault's pages with `pread` at
//! the trace's time, or as soon as its previous read returned if that is
//! later (a vCPU waits for its fault), checks every page's bytes, prints
//! [`CloneResult`] and exits. The clones of one host share the kernel's
//! page cache of the file, as clones mapping one generation file do.

use super::init_child;
use super::origin::page_content;
use super::trace::Trace;
use anyhow::{bail, Context, Result};
use dom0_memtap::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::debug;

/// Options of `snowflock bench mcdist-clone` (the bench's own use).
#[derive(clap::Args, Debug)]
pub struct CloneOpts {
    /// The generation's file in the host's memtap mount.
    #[arg(long)]
    pub file: PathBuf,
    #[arg(long)]
    pub trace: PathBuf,
    /// Seed of the pages' contents.
    #[arg(long)]
    pub seed: u64,
    /// Factor on the trace's times (0: every fault as soon as the previous
    /// returned).
    #[arg(long)]
    pub time_scale: f64,
}

/// What one clone saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CloneResult {
    /// Time of each read, in trace order.
    pub latencies_us: Vec<u64>,
    /// Reads that failed.
    pub errors: u64,
    /// Pages whose bytes were not the generation's.
    pub wrong_pages: u64,
    /// From `go` to the last read done.
    pub took_ms: f64,
}

fn replay(file: &File, trace: &Trace, start: Instant, scale: f64, seed: u64) -> CloneResult {
    let mut out = CloneResult {
        latencies_us: Vec::with_capacity(trace.faults.len()),
        ..Default::default()
    };
    let ps = PAGE_SIZE as usize;
    let mut buf = Vec::new();
    let mut want = vec![0u8; ps];
    for f in &trace.faults {
        let due = start + Duration::from_micros((f.t_us as f64 * scale) as u64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        buf.resize(f.pages as usize * ps, 0);
        let t0 = Instant::now();
        let r = file.read_exact_at(&mut buf, f.first_page * PAGE_SIZE);
        out.latencies_us.push(t0.elapsed().as_micros() as u64);
        if let Err(e) = r {
            debug!("read of pages {}+{}: {e}", f.first_page, f.pages);
            out.errors += 1;
            continue;
        }
        for (i, got) in buf.chunks(ps).enumerate() {
            page_content(seed, f.first_page + i as u64, &mut want);
            if got != want {
                out.wrong_pages += 1;
            }
        }
    }
    out.took_ms = start.elapsed().as_secs_f64() * 1e3;
    out
}

/// Parses `go <unix_us>` into the instant it names.
pub fn parse_go(line: &str) -> Result<Instant> {
    let Some(at) = line
        .trim()
        .strip_prefix("go ")
        .and_then(|s| s.parse::<u64>().ok())
    else {
        bail!("expected `go <unix_us>`, got {line:?}");
    };
    let now_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as u64;
    Ok(Instant::now() + Duration::from_micros(at.saturating_sub(now_us)))
}

/// `snowflock bench mcdist-clone`.
pub fn run_clone(o: CloneOpts) -> Result<()> {
    init_child();
    let text = std::fs::read_to_string(&o.trace)
        .with_context(|| format!("Cannot read {}", o.trace.display()))?;
    let trace = Trace::parse(&text).with_context(|| format!("{}", o.trace.display()))?;
    let file = File::open(&o.file).with_context(|| format!("Cannot open {}", o.file.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        return Ok(()); // the host gave up
    }
    let start = parse_go(&line)?;
    let r = replay(&file, &trace, start, o.time_scale, o.seed);
    drop(file);
    writeln!(out, "{}", serde_json::to_string(&r)?)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_lines() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let t = parse_go(&format!("go {}\n", now + 2_000_000)).unwrap();
        let d = t.duration_since(Instant::now());
        assert!(
            d > Duration::from_millis(1500) && d <= Duration::from_secs(2),
            "{d:?}"
        );
        // In the past: now.
        assert!(parse_go("go 5").unwrap() <= Instant::now());
        for bad in ["", "go", "go x", "start 5", "go -1"] {
            assert!(parse_go(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replays_a_file_and_counts_wrong_pages() {
        use super::super::trace::Fault;
        let dir = tempfile::tempdir().unwrap();
        let trace = Trace {
            generation: "g".into(),
            size: 8 * 4096,
            faults: vec![
                Fault {
                    t_us: 0,
                    first_page: 1,
                    pages: 2,
                },
                Fault {
                    t_us: 2000,
                    first_page: 6,
                    pages: 1,
                },
            ],
        };
        let path = dir.path().join("gen");
        super::super::origin::write_generation(&path, &trace, 3).unwrap();
        let f = File::open(&path).unwrap();
        let r = replay(&f, &trace, Instant::now(), 1.0, 3);
        assert_eq!(r.latencies_us.len(), 2);
        assert_eq!((r.errors, r.wrong_pages), (0, 0));
        assert!(r.took_ms >= 2.0, "{}", r.took_ms);
        // Another seed: every page is wrong.
        let r = replay(&f, &trace, Instant::now(), 0.0, 4);
        assert_eq!(r.wrong_pages, 3);
        // Beyond the end of the file: an error.
        std::fs::File::create(&path).unwrap().set_len(4096).unwrap();
        let f = File::open(&path).unwrap();
        let r = replay(&f, &trace, Instant::now(), 0.0, 3);
        assert_eq!(r.errors, 2);
    }
}
