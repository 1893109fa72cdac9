//! Background completion: fetch every page of a generation this host does
//! not hold yet, so that its clones stop depending on the origin
//! ([`GenerationSpec::complete`](super::GenerationSpec::complete)).
//!
//! One thread per such generation sweeps the pages from a random start,
//! skipping holes and pages already held (fetched for a clone, or received
//! by multicast), and asks for the missing ones in runs of up to
//! [`RUN_PAGES`] as a multicast member: the origin sends copies to the
//! group, so every host's sweep fills every host's cache, and hosts that
//! start at different places do not ask for the same pages. It never
//! competes with a clone's fault: while any fetch of a read is queued or
//! running it waits, and it keeps to [`MemtapConfig::completion_rate`].
//! When the sweep is done the generation is held whole and the thread logs
//! it and ends. A fetch that fails past the deadline is an origin loss,
//! handled like one of a read (`origin_loss.rs`).
//!
//! May import: `state.rs`, `generation.rs`, `fetch.rs`, `origin_loss.rs`,
//! [`crate::wire`], the crate root.
//!
//! [`MemtapConfig::completion_rate`]: super::MemtapConfig::completion_rate

use super::fetch::{fetch_run, Got, Tally};
use super::generation::Gen;
use super::origin_loss::fetch_failed;
use super::state::Shared;
use crate::wire;
use crate::PAGE_SIZE as PS;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Most pages one completion request asks for.
pub(super) const RUN_PAGES: u64 = 64;
/// Sweeps over the generation before giving up on pages that would not
/// stay (a cache file that fails writes).
const PASSES: u32 = 3;

/// Starts background completion of `g`.
pub(super) fn spawn(sh: &Arc<Shared>, g: &Arc<Gen>) -> std::io::Result<()> {
    let (s, w) = (sh.clone(), Arc::downgrade(g));
    std::thread::Builder::new()
        .name(format!("memtap-complete-{}", g.ino))
        .spawn(move || run(s, w))?;
    Ok(())
}

/// The next run of missing data pages at or after `*cursor` (wrapping),
/// at most [`RUN_PAGES`] long; `None` after a whole pass found none.
fn next_missing(g: &Gen, cursor: &mut u64, left: &mut u64) -> Option<(u64, u64)> {
    let missing = |p: u64| !g.hole(p) && !g.present(p);
    while *left > 0 {
        let p = *cursor;
        *cursor = (p + 1) % g.pages;
        *left -= 1;
        if missing(p) {
            let mut b = p + 1;
            while b < g.pages && b - p < RUN_PAGES && missing(b) {
                b += 1;
            }
            let extra = b - p - 1;
            *cursor = b % g.pages;
            *left = left.saturating_sub(extra);
            return Some((p, b));
        }
    }
    None
}

fn run(sh: Arc<Shared>, weak: Weak<Gen>) {
    let mut scratch = vec![0u8; wire::data_len(RUN_PAGES as u32)];
    let (name, pages, rate) = match weak.upgrade() {
        Some(g) => (g.name.clone(), g.pages, sh.completion_rate.max(1) as f64),
        None => return,
    };
    let start = rand::random::<u64>() % pages.max(1);
    let t0 = Instant::now();
    let mut bytes = 0u64;
    info!(
        generation = name,
        start, "memtap: background completion started"
    );
    for _ in 0..PASSES {
        let mut cursor = start;
        let mut left = pages;
        loop {
            let Some(g) = weak.upgrade() else {
                return;
            };
            if g.cancel.load(Ordering::Acquire) || g.lost.load(Ordering::Acquire) {
                return;
            }
            // Clones' faults first.
            if sh.pending.load(Ordering::SeqCst) > 0 {
                drop(g);
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let Some((a, b)) = next_missing(&g, &mut cursor, &mut left) else {
                break;
            };
            if g.held.load(Ordering::Relaxed) >= g.limit {
                warn!(
                    generation = name,
                    limit_pages = g.limit,
                    "memtap: background completion stops at the cache limit; this host's clones keep depending on the origin"
                );
                return;
            }
            let data = &mut scratch[..((b - a) * PS) as usize];
            let deadline = Instant::now() + sh.fetch_timeout;
            let mut tally = Tally::default();
            let got = fetch_run(&g, a, (b - a) as u32, data, deadline, &mut tally);
            {
                let mut s = g.stats.lock();
                s.s.coalesced += tally.coalesced;
                s.s.rerequests += tally.rerequests;
            }
            match got {
                Ok(Got::Data) => {
                    if let Err(e) = g.store_run(a, data, true) {
                        warn!(generation = name, "memtap cannot write its cache file: {e}");
                    }
                    bytes += (b - a) * PS;
                }
                // Multicast for this request: the origin sent them too, so
                // they count against the rate.
                Ok(Got::Arrived) => bytes += (b - a) * PS,
                Ok(Got::CaughtUp) => {}
                Err(e) => {
                    fetch_failed(&sh, &g, &e);
                    return;
                }
            }
            drop(g);
            let due = Duration::from_secs_f64(bytes as f64 / rate);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let Some(g) = weak.upgrade() else {
            return;
        };
        if (0..g.pages).all(|p| g.hole(p) || g.present(p)) {
            info!(
                generation = name,
                fetched_mib = bytes >> 20,
                secs = t0.elapsed().as_secs_f64(),
                "memtap: this host holds the whole generation; its clones no longer need the origin"
            );
            return;
        }
    }
    warn!(generation = name, "memtap: background completion could not keep every page; clones still depend on the origin");
}
