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
use parking_lot::Mutex;
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
    /// Fetches failed past the deadline; misses fail at once.
    pub(super) lost: AtomicBool,
    /// Stop fetching (lost, or unmounting).
    pub(super) cancel: AtomicBool,
    pub(super) stats: Mutex<Acc>,
    pub(super) created: SystemTime,
}

impl Gen {
    pub(super) fn hole(&self, p: u64) -> bool {
        self.holes[p as usize]
    }

    pub(super) fn present(&self, p: u64) -> bool {
        bit(&self.present, p)
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
