//! Memory on demand: frozen generations of other hosts exposed as files of
//! one FUSE mount per host.
//!
//! A clone's QEMU maps a generation file from the mount with
//! `memory-backend-file,mem-path=<file>,share=off`: a `MAP_PRIVATE` mapping,
//! so guest writes are copy-on-write and guest reads fault pages in through
//! the page cache, which the co-located clones of one generation share. Each
//! page the kernel asks for is resolved, in order, from
//!
//! 1. memtap's local cache (a sparse file per generation plus a present
//!    bitmap),
//! 2. the hole map (zeros, nothing fetched),
//! 3. the origin host's [page server](crate::server), contiguous missing
//!    pages of one read in one request, stored into the cache before the
//!    reply.
//!
//! Reads that need the network are handed to a pool of fetch threads
//! ([`FETCH_THREADS`], growing to [`MAX_FETCH_THREADS`] while all are
//! busy), so that one slow fetch holds up neither the cached and hole reads
//! of other clones nor the fetches from other origins. A fetch retries on fresh
//! connections until [`MemtapConfig::fetch_timeout`]; then the read fails
//! with EIO, the generation is marked lost, [`MemtapEvent::OriginLost`] is
//! sent once, and later misses of that generation fail at once.
//!
//! Files, each with one job (imports point down this list):
//!
//! * `mount.rs`: the [`Memtap`] handle (mount, add and release
//!   generations, statistics, events, unmount), [`MemtapConfig`],
//!   [`MemtapError`];
//! * `fs.rs`: the FUSE callbacks; cached and hole reads;
//! * `fetch.rs`: the fetch threads and the read that misses pages;
//! * `origin_loss.rs`: what a failed fetch does to its generation;
//! * `state.rs`: the state the above share;
//! * `generation.rs`: one generation, its cache file and present map;
//! * [`client`]: the page server client (connection pool, retries);
//! * `events.rs`: [`MemtapEvent`].
//!
//! May import: [`crate::wire`], [`crate::stats`], `sys`, the crate
//! root. Nothing here knows how generations are frozen or served.

pub mod client;
mod complete;
mod events;
mod fetch;
mod fs;
mod generation;
mod mcast_rx;
mod mount;
mod origin_loss;
mod state;
mod trace;

pub use events::MemtapEvent;
pub use fetch::{FETCH_THREADS, MAX_FETCH_THREADS};
pub use mount::{GenerationSpec, Memtap, MemtapConfig, MemtapError, Progress};
