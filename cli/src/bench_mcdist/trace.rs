//! Fault traces: what one clone asked memtap for, and when.
//!
//! The format (version 1), written by memtap (`MemtapConfig::trace_dir`)
//! and by [`Trace::to_text`]:
//!
//! ```text
//! # snowflock fault trace v1
//! # generation <name> size <bytes>
//! <t_us> <first_page> <pages>
//! ...
//! ```
//!
//! `t_us` is microseconds since the clone process's first read of the
//! generation; one line per run of data pages (never holes) a FUSE read of
//! the clone's QEMU asked memtap for; lines in time order. Other lines
//! starting with `#` are comments, empty lines are skipped.
//!
//! [`synthetic`] makes a plausible trace when no recorded one is given.

use dom0_memtap::{wire, PAGE_SIZE};
use std::fmt::Write as _;

/// The first line of every trace.
pub const HEADER: &str = "# snowflock fault trace v1";

/// Why a trace was refused; `line` counts from 1.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("not a fault trace: the first line must be `{HEADER}`")]
    NotATrace,
    #[error("fault trace version {0} is not supported (this snowflock reads v1)")]
    Version(String),
    #[error("line {line}: expected `# generation <name> size <bytes>`, got {got:?}")]
    Generation { line: usize, got: String },
    #[error("line {line}: invalid generation name {name:?} (1-64 of [A-Za-z0-9._-])")]
    Name { line: usize, name: String },
    #[error("line {line}: generation size {size} is not a positive multiple of 4096")]
    Size { line: usize, size: u64 },
    #[error("line {line}: expected `<t_us> <first_page> <pages>`, got {got:?}")]
    Malformed { line: usize, got: String },
    #[error("line {line}: a fault of 0 pages")]
    Empty { line: usize },
    #[error("line {line}: t_us {t_us} is before the previous line's {prev}: lines must be in time order")]
    OutOfOrder { line: usize, t_us: u64, prev: u64 },
    #[error("line {line}: pages {first}..{end} are beyond the generation's {pages} pages")]
    OutOfRange {
        line: usize,
        first: u64,
        end: u64,
        pages: u64,
    },
    #[error("the trace has no faults")]
    NoFaults,
}

/// One FUSE read memtap saw: `pages` data pages from `first_page`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub t_us: u64,
    pub first_page: u64,
    pub pages: u64,
}

/// A parsed trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub generation: String,
    /// Bytes, a multiple of [`PAGE_SIZE`].
    pub size: u64,
    pub faults: Vec<Fault>,
}

impl Trace {
    /// Parses a trace, refusing anything the format does not allow.
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        match lines.next() {
            Some((_, HEADER)) => {}
            Some((_, l)) => {
                return Err(match l.strip_prefix("# snowflock fault trace ") {
                    Some(v) => TraceError::Version(v.to_string()),
                    None => TraceError::NotATrace,
                })
            }
            None => return Err(TraceError::NotATrace),
        }
        let (gl, g) = lines.next().ok_or(TraceError::NoFaults)?;
        let bad_gen = || TraceError::Generation {
            line: gl,
            got: g.to_string(),
        };
        let (generation, size) = match g.split_whitespace().collect::<Vec<_>>()[..] {
            ["#", "generation", name, "size", size] => (
                name.to_string(),
                size.parse::<u64>().map_err(|_| bad_gen())?,
            ),
            _ => return Err(bad_gen()),
        };
        if !wire::valid_generation_name(&generation) {
            return Err(TraceError::Name {
                line: gl,
                name: generation,
            });
        }
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(TraceError::Size { line: gl, size });
        }
        let pages = size / PAGE_SIZE;
        let mut faults = Vec::new();
        let mut prev = 0;
        for (line, l) in lines {
            if l.starts_with('#') {
                continue;
            }
            let malformed = || TraceError::Malformed {
                line,
                got: l.to_string(),
            };
            let nums = l
                .split_whitespace()
                .map(|w| w.parse::<u64>().map_err(|_| malformed()))
                .collect::<Result<Vec<_>, _>>()?;
            let [t_us, first_page, n] = nums[..] else {
                return Err(malformed());
            };
            if n == 0 {
                return Err(TraceError::Empty { line });
            }
            if t_us < prev {
                return Err(TraceError::OutOfOrder { line, t_us, prev });
            }
            let end = first_page.saturating_add(n);
            if end > pages {
                return Err(TraceError::OutOfRange {
                    line,
                    first: first_page,
                    end,
                    pages,
                });
            }
            prev = t_us;
            faults.push(Fault {
                t_us,
                first_page,
                pages: n,
            });
        }
        if faults.is_empty() {
            return Err(TraceError::NoFaults);
        }
        Ok(Trace {
            generation,
            size,
            faults,
        })
    }

    /// The trace in the v1 format ([`Trace::parse`] reads it back).
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{HEADER}\n# generation {} size {}\n",
            self.generation, self.size
        );
        for f in &self.faults {
            let _ = writeln!(s, "{} {} {}", f.t_us, f.first_page, f.pages);
        }
        s
    }

    /// Pages of the generation.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// One flag per page: read by some fault.
    pub fn touched(&self) -> Vec<bool> {
        let mut t = vec![false; self.pages() as usize];
        for f in &self.faults {
            for p in f.first_page..f.first_page + f.pages {
                t[p as usize] = true;
            }
        }
        t
    }

    /// Distinct pages read: what one host needs from the origin at least.
    pub fn distinct_pages(&self) -> u64 {
        self.touched().iter().filter(|t| **t).count() as u64
    }

    /// Time of the last fault.
    pub fn duration_us(&self) -> u64 {
        self.faults.last().map_or(0, |f| f.t_us)
    }
}

/// SplitMix64: a small, fast generator with a 64-bit state; the bench's
/// one source of pseudo-random numbers (synthetic traces, page contents),
/// so every run with the same seed is the same.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

/// Shape of a [`synthetic`] trace.
#[derive(Debug, Clone, Copy)]
pub struct Synthetic {
    /// Faults (one page each).
    pub faults: u64,
    /// Generation size in bytes.
    pub size: u64,
    pub seed: u64,
}

impl Default for Synthetic {
    /// 20 000 faults over a 256 MiB generation.
    fn default() -> Self {
        Synthetic {
            faults: 20_000,
            size: 256 << 20,
            seed: 1,
        }
    }
}

/// Name of the generation of a synthetic trace.
pub const SYNTHETIC_NAME: &str = "mcdist-synthetic";

/// A plausible clone's trace, one page per fault (memtap's reads are one
/// page: no FUSE readahead), each page at most once (the page cache keeps
/// it): 10 % of the faults a scattered hot set in the first eighth of the
/// memory (kernel and libraries) right after the clone resumes, 30 to 200
/// us apart; then the job's data in sequential runs of 8 to 256 pages at
/// random places of the rest, 20 to 60 us apart within a run, 0.2 to 5 ms
/// of compute between runs, with another 5 % of hot-set faults scattered
/// among them.
pub fn synthetic(s: Synthetic) -> Trace {
    let pages = s.size / PAGE_SIZE;
    assert!(pages >= 64, "synthetic traces need at least 64 pages");
    let faults = s.faults.min(pages * 3 / 4);
    let mut r = SplitMix(s.seed);
    let hot_region = pages / 8;
    let n_hot = (faults * 15 / 100).min(hot_region);
    let n_first = n_hot * 2 / 3;
    // The hot set: a random sample of the hot region, in random order.
    let mut hot: Vec<u64> = (0..hot_region).collect();
    for i in 0..n_hot as usize {
        let j = r.range(i as u64, hot_region) as usize;
        hot.swap(i, j);
    }
    hot.truncate(n_hot as usize);
    let mut used = vec![false; pages as usize];
    for &p in &hot {
        used[p as usize] = true;
    }
    let mut out = Vec::with_capacity(faults as usize);
    let mut t = 0u64;
    let push = |out: &mut Vec<Fault>, t: u64, p: u64| {
        out.push(Fault {
            t_us: t,
            first_page: p,
            pages: 1,
        })
    };
    for &p in &hot[..n_first as usize] {
        push(&mut out, t, p);
        t += r.range(30, 200);
    }
    let mut later_hot = hot[n_first as usize..].iter().copied();
    let data_faults = faults - n_hot;
    let mut data = 0;
    let mut misses = 0;
    while data < data_faults && misses < 10_000 {
        let len = r
            .range(8, 257)
            .min(data_faults - data)
            .min(pages - hot_region);
        let start = r.range(hot_region, pages - len + 1);
        if used[start as usize..(start + len) as usize]
            .iter()
            .any(|u| *u)
        {
            misses += 1;
            continue;
        }
        t += r.range(200, 5000);
        for p in start..start + len {
            used[p as usize] = true;
            push(&mut out, t, p);
            t += r.range(20, 60);
            data += 1;
            // About 1 in 17 data faults is followed by a hot-set one.
            if r.range(0, 17) == 0 {
                if let Some(h) = later_hot.next() {
                    push(&mut out, t, h);
                    t += r.range(20, 60);
                }
            }
        }
    }
    for h in later_hot {
        push(&mut out, t, h);
        t += r.range(20, 60);
    }
    Trace {
        generation: SYNTHETIC_NAME.into(),
        size: s.size,
        faults: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(body: &str) -> Result<Trace, TraceError> {
        Trace::parse(&format!("{HEADER}\n# generation g1 size 40960\n{body}"))
    }

    #[test]
    fn parses_a_good_trace() {
        let tr = t("0 3 1\n# a comment\n\n15 4 2\n15 9 1\n").unwrap();
        assert_eq!(tr.generation, "g1");
        assert_eq!(tr.size, 40960);
        assert_eq!(tr.pages(), 10);
        assert_eq!(
            tr.faults,
            [
                Fault {
                    t_us: 0,
                    first_page: 3,
                    pages: 1
                },
                Fault {
                    t_us: 15,
                    first_page: 4,
                    pages: 2
                },
                Fault {
                    t_us: 15,
                    first_page: 9,
                    pages: 1
                },
            ]
        );
        assert_eq!(tr.distinct_pages(), 4);
        assert_eq!(tr.duration_us(), 15);
        // Round trip through the writer.
        assert_eq!(Trace::parse(&tr.to_text()).unwrap(), tr);
        // Surrounding blank space and CRLF line ends are tolerated.
        let crlf = tr.to_text().replace('\n', "\r\n");
        assert_eq!(Trace::parse(&format!("\n{crlf}")).unwrap(), tr);
    }

    #[test]
    fn refuses_bad_headers() {
        assert_eq!(Trace::parse(""), Err(TraceError::NotATrace));
        assert_eq!(Trace::parse("0 1 1\n"), Err(TraceError::NotATrace));
        assert_eq!(
            Trace::parse("# snowflock fault trace v2\n"),
            Err(TraceError::Version("v2".into()))
        );
        assert_eq!(
            Trace::parse(&format!("{HEADER}\n")),
            Err(TraceError::NoFaults)
        );
        for (g, want) in [
            (
                "# generation g1 40960",
                TraceError::Generation {
                    line: 2,
                    got: "# generation g1 40960".into(),
                },
            ),
            (
                "# generation g1 size -1",
                TraceError::Generation {
                    line: 2,
                    got: "# generation g1 size -1".into(),
                },
            ),
            (
                "# generation a/b size 4096",
                TraceError::Name {
                    line: 2,
                    name: "a/b".into(),
                },
            ),
            (
                "# generation g1 size 4097",
                TraceError::Size {
                    line: 2,
                    size: 4097,
                },
            ),
            (
                "# generation g1 size 0",
                TraceError::Size { line: 2, size: 0 },
            ),
        ] {
            assert_eq!(
                Trace::parse(&format!("{HEADER}\n{g}\n0 0 1\n")),
                Err(want),
                "{g}"
            );
        }
    }

    #[test]
    fn refuses_malformed_lines() {
        for bad in ["1 2", "1 2 3 4", "a 2 3", "1 -2 3", "1 2 3.0", "0x1 2 3"] {
            assert_eq!(
                t(&format!("0 0 1\n{bad}\n")),
                Err(TraceError::Malformed {
                    line: 4,
                    got: bad.into()
                }),
                "{bad}"
            );
        }
        assert_eq!(t("0 0 0\n"), Err(TraceError::Empty { line: 3 }));
        assert_eq!(t("# only comments\n"), Err(TraceError::NoFaults));
    }

    #[test]
    fn refuses_out_of_order_and_out_of_range() {
        assert_eq!(
            t("10 0 1\n9 1 1\n"),
            Err(TraceError::OutOfOrder {
                line: 4,
                t_us: 9,
                prev: 10
            })
        );
        assert_eq!(
            t("0 9 2\n"),
            Err(TraceError::OutOfRange {
                line: 3,
                first: 9,
                end: 11,
                pages: 10
            })
        );
        assert_eq!(
            t("0 10 1\n"),
            Err(TraceError::OutOfRange {
                line: 3,
                first: 10,
                end: 11,
                pages: 10
            })
        );
        // No overflow on absurd numbers.
        assert!(matches!(
            t(&format!("0 {} 2\n", u64::MAX)),
            Err(TraceError::OutOfRange { .. })
        ));
        assert!(t("0 9 1\n").is_ok());
    }

    #[test]
    fn synthetic_shape() {
        let s = Synthetic::default();
        let tr = synthetic(s);
        assert_eq!(tr.size, 256 << 20);
        assert_eq!(tr.faults.len(), 20_000);
        // Valid: parses back, in time order, in range, one page each.
        assert_eq!(Trace::parse(&tr.to_text()).unwrap(), tr);
        assert!(tr.faults.iter().all(|f| f.pages == 1));
        // Every page at most once.
        assert_eq!(tr.distinct_pages(), 20_000);
        // The hot set: 15 %, in the first eighth; the first tenth of the
        // faults all hot.
        let hot_region = tr.pages() / 8;
        let hot = tr
            .faults
            .iter()
            .filter(|f| f.first_page < hot_region)
            .count();
        assert_eq!(hot, 3000);
        assert!(tr.faults[..2000].iter().all(|f| f.first_page < hot_region));
        // Sequential runs: most data faults follow their page's neighbour.
        let data: Vec<u64> = tr
            .faults
            .iter()
            .filter(|f| f.first_page >= hot_region)
            .map(|f| f.first_page)
            .collect();
        let seq = data.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(seq * 10 > data.len() * 9, "{seq} of {}", data.len());
        // A plausible duration: about a second, not minutes.
        let d = tr.duration_us();
        assert!((300_000..5_000_000).contains(&d), "{d} us");
        // Same seed, same trace; another seed, another.
        assert_eq!(synthetic(s), tr);
        assert_ne!(synthetic(Synthetic { seed: 2, ..s }), tr);
        // Small generations cap the faults.
        let small = synthetic(Synthetic {
            faults: 1000,
            size: 64 * 4096,
            seed: 3,
        });
        assert!(small.faults.len() <= 48 && !small.faults.is_empty());
        assert_eq!(Trace::parse(&small.to_text()).unwrap(), small);
    }
}
