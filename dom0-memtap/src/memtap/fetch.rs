//! The fetch path: reads that miss pages are queued to a pool of fetch
//! threads ([`FETCH_THREADS`], growing to [`MAX_FETCH_THREADS`] while all
//! are busy), which fetch the missing runs from the origin, store them into
//! the cache, and reply. A failed fetch goes to `origin_loss.rs`.
//!
//! Logging: each read that misses runs in a `memtap_fetch` span naming the
//! generation and origin; nothing is logged per fault (the statistics
//! count them).
//!
//! May import: `state.rs`, `generation.rs`, `origin_loss.rs`, `client.rs`,
//! [`crate::wire`], [`crate::stats`], the crate root.

use super::client::{FetchError, Fetched};
use super::generation::Gen;
use super::mcast_rx::note_sent;
use super::origin_loss::fetch_failed;
use super::state::{Job, Shared};
use crate::stats::ReadOutcome;
use crate::wire;
use crate::PAGE_SIZE as PS;
use fuser::Errno;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug_span, error, warn};

/// Threads that fetch missing pages from origins (more are added while
/// all are busy, up to [`MAX_FETCH_THREADS`]).
pub const FETCH_THREADS: usize = 8;
/// Most fetch threads.
pub const MAX_FETCH_THREADS: usize = 64;
/// Extra fetch threads end after this long without work.
const WORKER_IDLE_EXIT: Duration = Duration::from_secs(10);
/// How long a read waits for pages the origin coalesced (sent by multicast
/// for another host a moment ago) before asking again by unicast.
const COALESCE_WAIT: Duration = Duration::from_millis(30);
/// Longest a read waits, before asking the origin, for this host's
/// receiving thread to take datagrams already queued for it (one of them
/// may hold the page: asking for a page multicast before gets it over TCP).
const CATCH_UP: Duration = Duration::from_millis(20);

/// How a run's pages came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Got {
    /// Over TCP, into the caller's buffer (not stored yet).
    Data,
    /// By multicast, sent for this request (the origin answered
    /// "coalesced"): they are in the cache; the buffer holds nothing.
    Arrived,
    /// Already on their way before anything was asked: multicast for
    /// another host, queued on the group socket. In the cache too.
    CaughtUp,
}

/// Lockstep figures of fetches, for the statistics.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    pub(super) coalesced: u64,
    pub(super) rerequests: u64,
}

/// Fetches pages `first..first+n` of `g` into `data`. As a multicast
/// member the origin may answer that they are on their way (lockstep
/// detection): then wait for them, and ask again by unicast if they do not
/// come in time (a lost datagram).
pub(super) fn fetch_run(
    g: &Gen,
    first: u64,
    n: u32,
    data: &mut [u8],
    deadline: Instant,
    tally: &mut Tally,
) -> Result<Got, FetchError> {
    if g.member() && caught_up(g, first, n as u64) {
        return Ok(Got::CaughtUp);
    }
    let mut unicast = false;
    loop {
        let mut flags = 0;
        if g.member() {
            flags |= wire::FLAG_MEMBER;
        }
        if unicast {
            flags |= wire::FLAG_UNICAST;
        }
        let received =
            g.rx.as_ref()
                .map_or(0, |r| r.received.load(Ordering::Relaxed));
        let asker = wire::Asker {
            flags,
            mcast_received: received,
            host: g.host_id,
        };
        let got = g
            .client
            .fetch_with(&g.name, first, n, asker, data, deadline, &g.cancel)?;
        match got {
            Fetched::Data { mcast_sent } => {
                note_sent(g, mcast_sent);
                return Ok(Got::Data);
            }
            Fetched::Coalesced { mcast_sent } => {
                note_sent(g, mcast_sent);
                tally.coalesced += 1;
                if g.wait_present(first, n as u64, COALESCE_WAIT) {
                    return Ok(Got::Arrived);
                }
                tally.rerequests += 1;
                unicast = true;
            }
        }
    }
}

/// Whether pages `first..first+n` arrived while this host's receiving
/// thread caught up with the datagrams queued for it (at most
/// [`CATCH_UP`]). With nothing queued it returns at once: the pages are
/// not on their way.
fn caught_up(g: &Gen, first: u64, n: u64) -> bool {
    let Some(rx) = &g.rx else {
        return false;
    };
    let end = Instant::now() + CATCH_UP;
    while rx.behind() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if g.wait_present(first, n, left.min(Duration::from_millis(1))) {
            return true;
        }
    }
    (first..first + n).all(|p| g.present(p))
}

/// Queues a read that needs the network, adding a fetch thread when all
/// are busy (a stalled origin must not starve the others).
pub(super) fn dispatch(sh: &Arc<Shared>, job: Job) {
    let jobs = sh.jobs.lock();
    let Some(tx) = &*jobs else {
        return job.reply.error(Errno::EIO); // unmounting
    };
    let pending = sh.pending.fetch_add(1, Ordering::SeqCst) + 1;
    if let Err(mpsc::SendError(job)) = tx.send(job) {
        sh.pending.fetch_sub(1, Ordering::SeqCst);
        return job.reply.error(Errno::EIO);
    }
    if pending > sh.threads.load(Ordering::SeqCst)
        && sh.threads.load(Ordering::SeqCst) < MAX_FETCH_THREADS
    {
        if let Err(e) = spawn_worker(sh) {
            warn!("memtap cannot add a fetch thread: {e}");
        }
    }
}

pub(super) fn spawn_worker(sh: &Arc<Shared>) -> io::Result<()> {
    let n = sh.threads.fetch_add(1, Ordering::SeqCst);
    let s = sh.clone();
    match std::thread::Builder::new()
        .name(format!("memtap-fetch-{n}"))
        .spawn(move || worker(s))
    {
        Ok(t) => {
            let mut w = sh.workers.lock();
            w.retain(|t| !t.is_finished());
            w.push(t);
            Ok(())
        }
        Err(e) => {
            sh.threads.fetch_sub(1, Ordering::SeqCst);
            Err(e)
        }
    }
}

/// Runs fetch jobs until the queue closes; threads beyond
/// [`FETCH_THREADS`] end after a while without work.
fn worker(sh: Arc<Shared>) {
    let mut scratch = vec![0u8; wire::data_len(wire::MAX_PAGES)];
    loop {
        let job = match sh.queue.lock().recv_timeout(WORKER_IDLE_EXIT) {
            Ok(j) => j,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let shrink = sh
                    .threads
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                        (t > FETCH_THREADS).then(|| t - 1)
                    });
                if shrink.is_ok() {
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        serve_miss(&sh, job, &mut scratch);
        sh.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers a read that misses pages: fetches them, stores them into the
/// cache, replies.
fn serve_miss(sh: &Shared, job: Job, scratch: &mut [u8]) {
    let Job {
        gen: g,
        offset,
        end,
        reply,
        t0,
        pid,
    } = job;
    let (first, last) = (offset / PS, (end - 1) / PS);
    // One span per read that misses, not per fault: the logs of its
    // fetches, their retries and an origin loss name the generation.
    let span = debug_span!(
        "memtap_fetch",
        generation = %g.name,
        origin = %g.origin,
        first,
        pages = last - first + 1,
    );
    let _in_span = span.enter();
    let mut o = ReadOutcome {
        pages: last - first + 1,
        ..Default::default()
    };
    // Runs [a, b) of missing pages; another worker may have fetched some
    // since the read was queued.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in first..=last {
        if g.present(p) || g.hole(p) {
            continue;
        }
        match runs.last_mut() {
            Some((_, b)) if *b == p => *b += 1,
            _ => runs.push((p, p + 1)),
        }
    }
    // Prefetch: extend the last run past the read.
    let mut prefetch_from = u64::MAX;
    if let Some((_, b)) = runs.last_mut() {
        if *b == last + 1 {
            let limit = (*b + sh.prefetch_pages as u64).min(g.pages);
            let start = *b;
            while *b < limit && !g.hole(*b) && !g.present(*b) {
                *b += 1;
            }
            if *b > start {
                prefetch_from = start;
            }
        }
    }
    let mut buf = vec![0u8; (end - offset) as usize];
    let deadline = Instant::now() + sh.fetch_timeout;
    let mut failure: Option<FetchError> = None;
    // Runs whose data came over TCP and was copied into `buf`; the others
    // came by multicast and are read from the cache.
    let mut copied: Vec<(u64, u64)> = Vec::new();
    let mut tally = Tally::default();
    'runs: for &(a, b) in &runs {
        let mut p = a;
        while p < b {
            let n = (b - p).min(wire::MAX_PAGES as u64) as u32;
            let data = &mut scratch[..wire::data_len(n)];
            match fetch_run(&g, p, n, data, deadline, &mut tally) {
                Ok(Got::Data) => {}
                Ok(got @ (Got::Arrived | Got::CaughtUp)) => {
                    // Pages the origin multicast because this read asked
                    // count as fetched; pages another host's request
                    // brought count as multicast pages only.
                    if got == Got::Arrived {
                        o.pages_fetched += n as u64;
                    }
                    p += n as u64;
                    continue;
                }
                Err(e) => {
                    failure = Some(e);
                    break 'runs;
                }
            }
            o.pages_fetched += n as u64;
            copied.push((p, p + n as u64));
            // Copy what the read asked for.
            let (lo, hi) = ((p * PS).max(offset), ((p + n as u64) * PS).min(end));
            if lo < hi {
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&data[(lo - p * PS) as usize..(hi - p * PS) as usize]);
            }
            // Store (then marked present: readers only read marked pages);
            // pages past the read are prefetch.
            let split = prefetch_from.clamp(p, p + n as u64);
            let (asked, ahead) = data.split_at(((split - p) * PS) as usize);
            let stored = g
                .store_run(p, asked, false)
                .and_then(|_| g.store_run(split, ahead, true));
            if let Err(e) = stored {
                warn!(
                    generation = g.name,
                    "memtap cannot write its cache file: {e}"
                );
            }
            p += n as u64;
        }
    }
    o.coalesced = tally.coalesced;
    o.rerequests = tally.rerequests;
    if let Some(e) = failure {
        o.fetch_error = true;
        o.latency_us = t0.elapsed().as_micros() as u64;
        sh.account(&g, pid, &o);
        reply.error(Errno::EIO);
        fetch_failed(sh, &g, &e);
        return;
    }
    let fetched = |p: u64| copied.iter().any(|&(a, b)| (a..b).contains(&p));
    let r = g.fill(&mut buf, offset, end, fetched, &mut o);
    o.latency_us = t0.elapsed().as_micros() as u64;
    o.fetch_error = r.is_err();
    sh.account(&g, pid, &o);
    match r {
        Ok(()) => reply.data(&buf),
        Err(e) => {
            error!(generation = g.name, "memtap cache read failed: {e}");
            reply.error(Errno::EIO);
        }
    }
}
