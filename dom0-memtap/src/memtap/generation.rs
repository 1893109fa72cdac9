//! One generation in the mount ([`Gen`]): its hole map, its local cache
//! (a sparse cache file plus the `present` bitmap of the pages it holds),
//! its origin, its state (lost, cancelled) and its statistics; and the
//! cache files on disk.
//!
//! Pages are stored into the cache file first and marked present after,
//! so a reader that sees a page present may read it from the file.
//!
//! May import: `client.rs`, [`crate::stats`], the crate root.

use super::client::OriginClient;
use crate::stats::{Acc, ReadOutcome};
use crate::PAGE_SIZE as PS;
use bitvec::prelude::*;
use fuser::{FileAttr, FileType, INodeNo};
use parking_lot::{Condvar, Mutex};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use tracing::warn;

/// Suffix of cache files in the cache directory.
pub(super) const CACHE_SUFFIX: &str = "memtap-cache";

/// Bit `i` of an atomic bitmap (`present`, `prefetched`).
pub(super) fn bit(bits: &[AtomicU64], i: u64) -> bool {
    bits[(i / 64) as usize].load(Ordering::Acquire) >> (i % 64) & 1 == 1
}

/// Sets bit `i` of an atomic bitmap.
pub(super) fn set_bit(bits: &[AtomicU64], i: u64) {
    bits[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
}

/// Sets bit `i`; returns whether it was clear before.
pub(super) fn set_bit_new(bits: &[AtomicU64], i: u64) -> bool {
    let m = 1u64 << (i % 64);
    bits[(i / 64) as usize].fetch_or(m, Ordering::AcqRel) & m == 0
}

/// Clears a bit; returns whether it was set.
pub(super) fn take_bit(bits: &[AtomicU64], i: u64) -> bool {
    let m = 1u64 << (i % 64);
    bits[(i / 64) as usize].fetch_and(!m, Ordering::AcqRel) & m != 0
}

/// A generation served by the mount; shared by the table, open files and
/// fetch jobs. Its cache file is deleted when the last of them drops it.
pub(super) struct Gen {
    pub(super) name: String,
    pub(super) ino: u64,
    pub(super) size: u64,
    pub(super) pages: u64,
    pub(super) holes: BitVec<u64, Lsb0>,
    pub(super) origin: SocketAddr,
    pub(super) client: Arc<OriginClient>,
    pub(super) cache: File,
    pub(super) cache_path: PathBuf,
    pub(super) present: Vec<AtomicU64>,
    pub(super) prefetched: Vec<AtomicU64>,
    /// Pages a read waits for by multicast (they are kept even when
    /// `prefetch_siblings` is off).
    pub(super) wanted: Vec<AtomicU64>,
    /// Fetches failed past the deadline; misses fail at once.
    pub(super) lost: AtomicBool,
    /// Stop fetching (lost, or unmounting).
    pub(super) cancel: AtomicBool,
    pub(super) stats: Mutex<Acc>,
    pub(super) created: SystemTime,
    /// This memtap's id in requests ([`crate::wire::Asker::host`]).
    pub(super) host_id: u32,
    /// Most pages the cache may hold ([`MemtapConfig::cache_limit`]).
    ///
    /// [`MemtapConfig::cache_limit`]: super::MemtapConfig::cache_limit
    pub(super) limit: u64,
    /// Pages the cache holds (present bits set).
    pub(super) held: AtomicU64,
    /// Logged once: the cache reached its limit.
    pub(super) said_full: AtomicBool,
    /// Multicast reception, for a generation whose group this host joined.
    pub(super) rx: Option<Rx>,
    /// Signalled when pages arrive by multicast (lockstep waits).
    pub(super) arrived: Condvar,
    pub(super) arrived_lock: Mutex<()>,
}

/// Multicast reception state of a generation (mcdist).
pub(super) struct Rx {
    /// This host asks as a member of the group (cleared when the group
    /// turns out not to reach it).
    pub(super) member: AtomicBool,
    /// Valid datagrams of this generation received (duplicates included):
    /// this host's report to the origin.
    pub(super) received: AtomicU64,
    /// The origin's datagram count when this host first heard from it
    /// (`u64::MAX` before).
    pub(super) baseline: AtomicU64,
    pub(super) group: std::net::SocketAddrV4,
    /// The receiving socket (a duplicate of the receiving thread's): a
    /// datagram queued there means the thread is behind.
    pub(super) probe: Option<std::net::UdpSocket>,
}

impl Rx {
    /// Whether datagrams wait in the socket that the receiving thread has
    /// not taken yet.
    pub(super) fn behind(&self) -> bool {
        use std::os::fd::AsFd;
        self.probe
            .as_ref()
            .is_some_and(|s| crate::sys::readable_now(s.as_fd()))
    }
}

/// What [`Gen::store_run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stored {
    /// Pages newly in the cache.
    pub(super) new: u64,
    /// Pages not kept because the cache is at its limit.
    pub(super) refused: u64,
}

impl Gen {
    pub(super) fn hole(&self, p: u64) -> bool {
        self.holes[p as usize]
    }

    pub(super) fn present(&self, p: u64) -> bool {
        bit(&self.present, p)
    }

    /// Whether this host asks as a multicast member: it joined the group,
    /// the group reaches it, and its cache can still take pages.
    pub(super) fn member(&self) -> bool {
        self.rx
            .as_ref()
            .is_some_and(|r| r.member.load(Ordering::Relaxed))
            && self.held.load(Ordering::Relaxed) < self.limit
    }

    /// Stores pages `first..` (`data`, whole pages) into the cache and marks
    /// them present, as far as the limit allows; pages already present are
    /// left as they are. `speculative` pages (prefetch, multicast,
    /// completion) are marked so that a later read counts a prefetch hit.
    pub(super) fn store_run(
        &self,
        first: u64,
        data: &[u8],
        speculative: bool,
    ) -> io::Result<Stored> {
        let n = (data.len() as u64) / PS;
        let missing: Vec<u64> = (first..first + n).filter(|&p| !self.present(p)).collect();
        let mut out = Stored { new: 0, refused: 0 };
        if missing.is_empty() {
            return Ok(out);
        }
        // Reserve room for the missing pages, or as many as fit.
        let want = missing.len() as u64;
        let mut got = 0;
        let _ = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                got = want.min(self.limit.saturating_sub(h));
                (got > 0).then_some(h + got)
            });
        out.refused = want - got;
        if out.refused > 0 && !self.said_full.swap(true, Ordering::Relaxed) {
            warn!(
                generation = self.name,
                limit_pages = self.limit,
                "memtap: the generation's cache is at its limit; further pages are read from the origin each time and not kept"
            );
        }
        if got == 0 {
            return Ok(out);
        }
        let keep = &missing[..got as usize];
        let res = if got == want && want == n {
            self.cache.write_all_at(data, first * PS)
        } else {
            keep.iter().try_for_each(|&p| {
                let i = ((p - first) * PS) as usize;
                self.cache.write_all_at(&data[i..i + PS as usize], p * PS)
            })
        };
        if let Err(e) = res {
            self.held.fetch_sub(got, Ordering::AcqRel);
            return Err(e);
        }
        // Stored first, then marked present: readers read marked pages only.
        for &p in keep {
            if set_bit_new(&self.present, p) {
                out.new += 1;
                if speculative {
                    set_bit(&self.prefetched, p);
                }
            }
        }
        // Pages another thread marked meanwhile were reserved twice.
        self.held.fetch_sub(got - out.new, Ordering::AcqRel);
        if out.new > 0 && self.rx.is_some() {
            let _l = self.arrived_lock.lock();
            self.arrived.notify_all();
        }
        Ok(out)
    }

    /// Waits until pages `first..first+n` are present (they were coalesced
    /// by the origin and come by multicast), at most `wait`.
    pub(super) fn wait_present(&self, first: u64, n: u64, wait: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        let all = || (first..first + n).all(|p| self.present(p));
        (first..first + n).for_each(|p| set_bit(&self.wanted, p));
        let mut l = self.arrived_lock.lock();
        let arrived = loop {
            if all() {
                break true;
            }
            if self.arrived.wait_until(&mut l, deadline).timed_out() {
                break all();
            }
        };
        drop(l);
        (first..first + n).for_each(|p| {
            take_bit(&self.wanted, p);
        });
        arrived
    }

    pub(super) fn wanted(&self, p: u64) -> bool {
        bit(&self.wanted, p)
    }

    /// Speculatively stored pages not read yet, in bytes.
    pub(super) fn wasted_bytes(&self) -> u64 {
        self.prefetched
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum::<u64>()
            * PS
    }

    pub(super) fn attr(&self, uid: u32, gid: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.ino),
            size: self.size,
            blocks: self.size / 512,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: PS as u32,
            flags: 0,
        }
    }

    /// Fills the pages of `[offset, end)` that `skip` does not claim:
    /// cached pages from the cache file, holes as zeros. `buf` starts at
    /// `offset` and is zeroed. Counts cache, hole and prefetch hits.
    pub(super) fn fill(
        &self,
        buf: &mut [u8],
        offset: u64,
        end: u64,
        skip: impl Fn(u64) -> bool,
        o: &mut ReadOutcome,
    ) -> io::Result<()> {
        let (first, last) = (offset / PS, (end - 1) / PS);
        let mut p = first;
        while p <= last {
            if skip(p) {
                p += 1;
                continue;
            }
            if self.present(p) {
                // A run of cached pages: one pread.
                let a = p;
                while p <= last && !skip(p) && self.present(p) {
                    o.cache_hits += 1;
                    o.prefetch_hits += take_bit(&self.prefetched, p) as u64;
                    p += 1;
                }
                let (lo, hi) = ((a * PS).max(offset), (p * PS).min(end));
                self.cache
                    .read_exact_at(&mut buf[(lo - offset) as usize..(hi - offset) as usize], lo)?;
                continue;
            }
            if self.hole(p) {
                o.zero_pages += 1; // already zero in `buf`
                p += 1;
                continue;
            }
            return Err(io::Error::other(format!(
                "page {p} is neither cached nor a hole"
            )));
        }
        Ok(())
    }
}

impl Drop for Gen {
    fn drop(&mut self) {
        remove_cache_file(&self.cache_path);
    }
}

pub(super) fn remove_cache_file(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("cannot remove memtap cache file {}: {e}", p.display()),
    }
}

/// Removes cache files of an earlier run.
pub(super) fn clean_cache_dir(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == CACHE_SUFFIX) {
            remove_cache_file(&p);
        }
    }
    Ok(())
}
