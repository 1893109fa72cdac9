//! Fault traces: with [`MemtapConfig::trace_dir`] set, memtap records, per
//! clone process and generation, every run of data pages the process's
//! reads asked for (holes left out), with its time, and writes it when the
//! process is forgotten (its clone ended). `snowflock bench mcdist`
//! replays such traces. The format:
//!
//! ```text
//! # snowflock fault trace v1
//! # generation <name> size <bytes>
//! <t_us> <first_page> <pages>
//! ```
//!
//! `t_us` counts from the process's first read of the generation. A trace
//! keeps at most [`MAX_LINES`] lines; later reads are not recorded (the
//! file says so in a comment).
//!
//! May import: `generation.rs`, the crate root.
//!
//! [`MemtapConfig::trace_dir`]: super::MemtapConfig::trace_dir

use super::generation::Gen;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::{info, warn};

/// Most lines one trace keeps.
pub(super) const MAX_LINES: usize = 1 << 21;

struct Trace {
    name: String,
    size: u64,
    t0: Instant,
    lines: Vec<(u64, u64, u64)>,
    truncated: bool,
}

/// The traces being recorded.
pub(super) struct Tracer {
    dir: PathBuf,
    traces: Mutex<HashMap<(u32, u64), Trace>>,
}

impl Tracer {
    pub(super) fn new(dir: &Path) -> io::Result<Tracer> {
        std::fs::create_dir_all(dir)?;
        Ok(Tracer {
            dir: dir.to_path_buf(),
            traces: Mutex::new(HashMap::new()),
        })
    }

    /// Records a read of pages `first..=last` of `g` by `pid`.
    pub(super) fn record(&self, g: &Gen, pid: u32, first: u64, last: u64) {
        let now = Instant::now();
        let mut m = self.traces.lock();
        let t = m.entry((pid, g.ino)).or_insert_with(|| Trace {
            name: g.name.clone(),
            size: g.size,
            t0: now,
            lines: Vec::new(),
            truncated: false,
        });
        let us = now.duration_since(t.t0).as_micros() as u64;
        let mut p = first;
        while p <= last {
            if g.hole(p) {
                p += 1;
                continue;
            }
            let a = p;
            while p <= last && !g.hole(p) {
                p += 1;
            }
            if t.lines.len() >= MAX_LINES {
                t.truncated = true;
                return;
            }
            t.lines.push((us, a, p - a));
        }
    }

    /// Writes and forgets the traces of `pid`.
    pub(super) fn finish(&self, pid: u32) {
        let done: Vec<((u32, u64), Trace)> = {
            let mut m = self.traces.lock();
            let keys: Vec<_> = m.keys().filter(|(p, _)| *p == pid).copied().collect();
            keys.into_iter()
                .filter_map(|k| m.remove(&k).map(|t| (k, t)))
                .collect()
        };
        for ((pid, _), t) in done {
            let path = self.dir.join(format!("{}.{pid}.trace", t.name));
            match write(&path, &t) {
                Ok(()) => {
                    info!(path = %path.display(), faults = t.lines.len(), "memtap: fault trace written")
                }
                Err(e) => warn!(path = %path.display(), "memtap: cannot write a fault trace: {e}"),
            }
        }
    }
}

fn write(path: &Path, t: &Trace) -> io::Result<()> {
    let mut f = io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "# snowflock fault trace v1")?;
    writeln!(f, "# generation {} size {}", t.name, t.size)?;
    if t.truncated {
        writeln!(f, "# truncated at {MAX_LINES} lines")?;
    }
    for (us, a, n) in &t.lines {
        writeln!(f, "{us} {a} {n}")?;
    }
    f.flush()
}
