//! Receiving a generation's multicast pages (mcdist): one thread per
//! generation whose group this host joined, storing each page that passes
//! every check into the generation's cache.
//!
//! A datagram enters the cache only if its length, magic, version and MAC
//! are right ([`crate::mcast::open`]), it names this generation, and its
//! page lies inside the generation and is not a hole. Anything else is
//! dropped and counted (`mcast_dropped`); nothing of it is used. A page
//! already held is not written again.
//!
//! Also here: what a reply's multicast count tells this host (a group that
//! delivers nothing makes it fall back to unicast, with a warning).
//!
//! May import: `state.rs`, `generation.rs`, [`crate::mcast`], the crate
//! root.

use super::generation::Gen;
use super::state::Shared;
use crate::mcast::{self, McastKey, DATAGRAM_LEN};
use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tracing::{debug, warn};

/// How often the receiving thread checks whether its generation is gone.
pub(super) const POLL: Duration = Duration::from_millis(200);
/// The origin sent this many datagrams since this host joined, and none
/// arrived: the group does not reach this host.
const DEAF_AFTER: u64 = 512;

/// Starts the receiving thread of `g` on `sock` (joined to its group).
pub(super) fn spawn(sh: &Arc<Shared>, g: &Arc<Gen>, sock: UdpSocket) -> std::io::Result<()> {
    let weak = Arc::downgrade(g);
    let key = sh.mcast_key.clone();
    let siblings = sh.prefetch_siblings;
    std::thread::Builder::new()
        .name(format!("memtap-mcast-{}", g.ino))
        .spawn(move || receive(weak, sock, key, siblings))?;
    Ok(())
}

fn receive(weak: Weak<Gen>, sock: UdpSocket, key: McastKey, siblings: bool) {
    let mut buf = vec![0u8; DATAGRAM_LEN + 1];
    loop {
        let r = sock.recv_from(&mut buf);
        let Some(g) = weak.upgrade() else {
            return;
        };
        if g.cancel.load(Ordering::Acquire) {
            return;
        }
        let n = match r {
            Ok((n, _)) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                warn!(
                    generation = g.name,
                    "mcdist: receiving failed, leaving the group: {e}"
                );
                if let Some(rx) = &g.rx {
                    rx.member.store(false, Ordering::Relaxed);
                }
                return;
            }
        };
        accept(&g, &key, &buf[..n], siblings);
    }
}

/// Checks one datagram and stores its page; returns whether it was stored.
pub(super) fn accept(g: &Gen, key: &McastKey, d: &[u8], siblings: bool) -> bool {
    let Some(rx) = &g.rx else {
        return false;
    };
    let drop = |why: &str| {
        let n = {
            let mut s = g.stats.lock();
            s.s.mcast_dropped += 1;
            s.s.mcast_dropped
        };
        // The first few, then every thousandth: a flood must not flood the log.
        if n <= 3 || n.is_multiple_of(1000) {
            warn!(
                generation = g.name,
                dropped = n,
                "mcdist: datagram dropped: {why}"
            );
        }
        false
    };
    let page = match mcast::open(key, d) {
        Ok(p) => p,
        Err(e) => return drop(&e.to_string()),
    };
    if page.generation != g.name {
        return drop("another generation");
    }
    if page.page >= g.pages || g.hole(page.page) {
        return drop("page outside the generation's data");
    }
    rx.received.fetch_add(1, Ordering::Relaxed);
    if g.present(page.page) {
        return false;
    }
    if !siblings && !g.wanted(page.page) {
        return false;
    }
    match g.store_run(page.page, page.data, true) {
        Ok(s) if s.new > 0 => {
            g.stats.lock().s.mcast_pages += 1;
            true
        }
        Ok(_) => false,
        Err(e) => {
            debug!(generation = g.name, "mcdist: cannot store a page: {e}");
            false
        }
    }
}

/// Takes note of the origin's multicast count from a reply: a group that
/// delivered none of [`DEAF_AFTER`] datagrams sent since this host joined
/// does not reach it, and the host falls back to unicast.
pub(super) fn note_sent(g: &Gen, mcast_sent: u64) {
    let Some(rx) = &g.rx else {
        return;
    };
    let base = match rx.baseline.compare_exchange(
        u64::MAX,
        mcast_sent,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => mcast_sent,
        Err(b) => b,
    };
    if rx.received.load(Ordering::Relaxed) == 0
        && mcast_sent.saturating_sub(base) >= DEAF_AFTER
        && rx.member.swap(false, Ordering::AcqRel)
    {
        warn!(
            generation = g.name,
            group = %rx.group,
            sent = mcast_sent - base,
            "mcdist: the origin multicast {} page datagrams and none arrived here; this host falls back to unicast for this generation (does the network carry multicast? `mcast = false` in host.toml turns it off)",
            mcast_sent - base
        );
    }
}
