//! Fault statistics: counters and a log-bucket latency histogram, kept per
//! generation and per process by [`memtap`](crate::memtap).
//!
//! May import: the crate root (`PAGE_SIZE`) and `snowflock_proto` only.

/// The figures themselves are a protocol type: the daemon hands them to the
/// CLI as they are.
pub use snowflock_proto::admin::FaultStats;

/// Buckets: exact below 16 us, then 4 per power of two up to 2^40 us.
const EXACT: u64 = 16;
const BUCKETS: usize = EXACT as usize + 4 * 37;

/// A latency histogram in microseconds with about 20% resolution.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

fn bucket(us: u64) -> usize {
    if us < EXACT {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as u64; // >= 4
    let sub = (us >> (e - 2)) & 3;
    ((EXACT + (e - 4) * 4 + sub) as usize).min(BUCKETS - 1)
}

/// Largest value that falls into bucket `b`.
fn upper(b: usize) -> u64 {
    if (b as u64) < EXACT {
        return b as u64;
    }
    let i = b as u64 - EXACT;
    let (e, sub) = (i / 4 + 4, i % 4);
    ((4 + sub + 1) << (e - 2)) - 1
}

impl Histogram {
    pub(crate) fn record(&mut self, us: u64, n: u64) {
        self.counts[bucket(us)] += n;
        self.total += n;
    }

    /// Adds another histogram's counts.
    pub(crate) fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
    }

    /// The `q` quantile (0..=1), as the upper bound of its bucket.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((self.total as f64 * q).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(b);
            }
        }
        upper(BUCKETS - 1)
    }
}

/// Accumulated statistics: counters plus histogram.
#[derive(Debug, Clone, Default)]
pub(crate) struct Acc {
    pub(crate) s: FaultStats,
    pub(crate) hist: Histogram,
}

/// What one FUSE read contributed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ReadOutcome {
    pub(crate) pages: u64,
    pub(crate) zero_pages: u64,
    pub(crate) cache_hits: u64,
    pub(crate) prefetch_hits: u64,
    pub(crate) coalesced: u64,
    pub(crate) rerequests: u64,
    pub(crate) pages_fetched: u64,
    pub(crate) fetch_error: bool,
    pub(crate) latency_us: u64,
}

impl Acc {
    pub(crate) fn add(&mut self, o: &ReadOutcome) {
        let s = &mut self.s;
        s.faults += o.pages;
        s.zero_pages += o.zero_pages;
        s.cache_hits += o.cache_hits;
        s.prefetch_hits += o.prefetch_hits;
        s.coalesced += o.coalesced;
        s.rerequests += o.rerequests;
        s.pages_fetched += o.pages_fetched;
        s.bytes_fetched += o.pages_fetched * crate::PAGE_SIZE;
        s.fetch_errors += o.fetch_error as u64;
        if o.pages > 0 {
            self.hist.record(o.latency_us, o.pages);
        }
    }

    /// Adds another accumulation (of other generations).
    pub(crate) fn merge(&mut self, o: &Acc) {
        let (s, t) = (&mut self.s, &o.s);
        s.faults += t.faults;
        s.zero_pages += t.zero_pages;
        s.cache_hits += t.cache_hits;
        s.prefetch_hits += t.prefetch_hits;
        s.coalesced += t.coalesced;
        s.rerequests += t.rerequests;
        s.mcast_pages += t.mcast_pages;
        s.mcast_dropped += t.mcast_dropped;
        s.pages_fetched += t.pages_fetched;
        s.bytes_fetched += t.bytes_fetched;
        s.fetch_errors += t.fetch_errors;
        self.hist.merge(&o.hist);
    }

    pub(crate) fn snapshot(&self) -> FaultStats {
        FaultStats {
            latency_p50_us: self.hist.quantile(0.50),
            latency_p99_us: self.hist.quantile(0.99),
            ..self.s.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_values() {
        let mut prev = 0;
        for v in (0..100_000u64).chain([1 << 30, (1 << 40) - 1]) {
            let b = bucket(v);
            assert!(b >= prev, "monotonic at {v}");
            prev = b;
            assert!(upper(b) >= v, "{v} in bucket {b} with upper {}", upper(b));
            if b > 0 {
                assert!(upper(b - 1) < v, "{v}");
            }
            // Resolution: the bucket's bound is within 25% of the value.
            assert!(
                upper(b) as f64 <= v as f64 * 1.25 + 1.0,
                "{v} -> {}",
                upper(b)
            );
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        h.record(10, 98);
        h.record(1000, 1);
        h.record(100_000, 1);
        assert_eq!(h.quantile(0.5), 10);
        let p99 = h.quantile(0.99);
        assert!((1000..1250).contains(&p99), "{p99}");
        let p100 = h.quantile(1.0);
        assert!((100_000..125_000).contains(&p100), "{p100}");
    }
}
