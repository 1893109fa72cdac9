//! Origin loss: when a fetch fails past [`MemtapConfig::fetch_timeout`]
//! (or the origin answers that it no longer serves the generation), the
//! generation is marked lost, its other fetches are cancelled, later misses
//! fail at once with EIO, and [`MemtapEvent::OriginLost`] is sent once, so
//! that the daemon stops the clones that would wait for pages forever.
//!
//! May import: `state.rs`, `generation.rs`, `events.rs`, `client.rs`.
//!
//! [`MemtapConfig::fetch_timeout`]: super::MemtapConfig::fetch_timeout

use super::client::FetchError;
use super::events::MemtapEvent;
use super::generation::Gen;
use super::state::Shared;
use snowflock_proto::error::chain;
use std::sync::atomic::Ordering;
use tracing::error;

/// Handles a fetch of `g` that failed with `e` (its read has already
/// failed with EIO): marks the generation lost and tells the daemon, once.
/// A fetch cancelled by unmounting is no loss.
pub(super) fn fetch_failed(sh: &Shared, g: &Gen, e: &FetchError) {
    if matches!(e, FetchError::Cancelled { .. }) && !g.lost.load(Ordering::Acquire) {
        return; // unmounting
    }
    if !g.lost.swap(true, Ordering::AcqRel) {
        g.cancel.store(true, Ordering::Release);
        let reason = chain(e);
        error!(generation = g.name, origin = %g.origin, "memtap: origin lost: {reason}");
        sh.emit(MemtapEvent::OriginLost {
            generation: g.name.clone(),
            origin: g.origin,
            reason,
        });
    }
}
