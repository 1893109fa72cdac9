//! Freezing a generation in two phases, so that the VM is paused only for
//! the second (see [`Precopy`]), or in one go ([`freeze_generation`]).
//!
//! May import: [`super`] (errors, [`Frozen`]), `extents.rs`, `sys`,
//! the crate root.

use super::extents::page_extents;
use super::{FreezeError, Frozen};
use crate::{sys, PAGE_SIZE};
use bitvec::prelude::*;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A generation being frozen in two phases, so that the VM is paused only
/// for the second:
///
/// 1. [`Precopy::start`], VM running: copy the data extents of the RAM file.
/// 2. [`Precopy::finish`], VM paused: compare the RAM file's data extents
///    with the copy and copy the pages that changed (or were new).
///
/// The host kernel offers no dirty tracking for a shared file mapping
/// (soft-dirty is often compiled out, and QEMU's dirty log is internal), so
/// phase 2 compares. A compare reads both copies but writes only what
/// changed, about 3x faster than copying everything while paused. Holes are
/// never read through a mapping: on tmpfs that would allocate them.
pub struct Precopy {
    src: File,
    dst: File,
    dst_path: std::path::PathBuf,
    /// Both mappings are kept from phase 1, so their page tables are
    /// populated and phase 2 pays for memory bandwidth, not page faults
    /// (expensive on a virtualised host).
    src_map: Option<memmap2::Mmap>,
    dst_map: Option<memmap2::MmapMut>,
    size: u64,
    /// Pages copied in phase 1.
    copied: BitVec<u64, Lsb0>,
}

/// Reserves file space so that later writes through a mapping cannot fail.
fn allocate(f: &File, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    sys::fallocate(f, off, len)
}

/// Prefaults a range of a mapping; best effort (older kernels lack it).
fn populate(map: &[u8], a: usize, b: usize, write: bool) {
    sys::populate(&map[a..b], write);
}

impl Precopy {
    /// Creates `dst` (which must not exist) with the size of `src`, holes
    /// only. A clone VMM may map it privately from now on: pages it has not
    /// read yet show what phases 1 and 2 write.
    pub fn create(src: &Path, dst: &Path) -> Result<Precopy, FreezeError> {
        let serr = |err| FreezeError::Source {
            path: src.display().to_string(),
            err,
        };
        let derr = |err| FreezeError::Dest {
            path: dst.display().to_string(),
            err,
        };
        let s = File::open(src).map_err(serr)?;
        let size = s.metadata().map_err(serr)?.len();
        if size % PAGE_SIZE != 0 {
            return Err(FreezeError::Size(size));
        }
        let d = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst)
            .map_err(derr)?;
        d.set_len(size).map_err(derr)?;
        let pages = (size / PAGE_SIZE) as usize;
        Ok(Precopy {
            src: s,
            dst: d,
            dst_path: dst.to_path_buf(),
            src_map: None,
            dst_map: None,
            size,
            copied: bitvec![u64, Lsb0; 0; pages],
        })
    }

    /// Phase 1, VM running: copies the data extents of the source.
    pub fn copy(&mut self) -> Result<(), FreezeError> {
        let serr = |err| FreezeError::Source {
            path: "guest RAM".into(),
            err,
        };
        let derr = |err| FreezeError::Dest {
            path: self.dst_path.display().to_string(),
            err,
        };
        if self.size == 0 {
            return Ok(());
        }
        let extents = page_extents(&self.src, self.size).map_err(serr)?;
        // The source is guest RAM, read racily on purpose: phase 2
        // rechecks every page with the VM paused. The destination is our
        // new file. Only data extents are touched (touching a tmpfs hole
        // would allocate it).
        let sm = sys::map_guest_ram(&self.src).map_err(serr)?;
        let mut dm = sys::map_new_generation(&self.dst).map_err(derr)?;
        let ps = PAGE_SIZE as usize;
        for &(a, b) in &extents {
            let (a, b) = (a as usize, b as usize);
            // Allocate first: writing an unallocatable page through the
            // mapping (tmpfs full) would be a SIGBUS, not an error.
            allocate(&self.dst, a as u64 * PAGE_SIZE, (b - a) as u64 * PAGE_SIZE).map_err(derr)?;
            populate(&sm, a * ps, b * ps, false);
            populate(&dm, a * ps, b * ps, true);
            dm[a * ps..b * ps].copy_from_slice(&sm[a * ps..b * ps]);
            self.copied[a..b].fill(true);
        }
        self.src_map = Some(sm);
        self.dst_map = Some(dm);
        Ok(())
    }

    /// [`Precopy::create`] then [`Precopy::copy`].
    pub fn start(src: &Path, dst: &Path) -> Result<Precopy, FreezeError> {
        let mut p = Precopy::create(src, dst)?;
        p.copy()?;
        Ok(p)
    }

    /// Phase 2, VM paused: brings the copy up to date and returns the
    /// frozen generation with its hole map.
    ///
    /// Drop the `Precopy` only after resuming the VM: unmapping hundreds of
    /// megabytes of populated mappings takes longer than the compare.
    pub fn finish(&mut self) -> Result<Frozen, FreezeError> {
        let serr = |err| FreezeError::Source {
            path: "guest RAM".into(),
            err,
        };
        let pages = (self.size / PAGE_SIZE) as usize;
        let mut holes = bitvec![u64, Lsb0; 1; pages];
        let mut fixed = 0;
        let extents = page_extents(&self.src, self.size).map_err(serr)?;
        // Pages that appeared since phase 1 need room too (see `copy`).
        let derr = |err| FreezeError::Dest {
            path: self.dst_path.display().to_string(),
            err,
        };
        for &(a, b) in &extents {
            let mut p = a as usize;
            while p < b as usize {
                if self.copied[p] {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < b as usize && !self.copied[p] {
                    p += 1;
                }
                allocate(
                    &self.dst,
                    start as u64 * PAGE_SIZE,
                    (p - start) as u64 * PAGE_SIZE,
                )
                .map_err(derr)?;
            }
        }
        if let (Some(src), Some(dst)) = (&self.src_map, &mut self.dst_map) {
            let ps = PAGE_SIZE as usize;
            for &(a, b) in &extents {
                for p in a as usize..b as usize {
                    let r = p * ps..(p + 1) * ps;
                    if !self.copied[p] || src[r.clone()] != dst[r.clone()] {
                        dst[r.clone()].copy_from_slice(&src[r]);
                        fixed += PAGE_SIZE;
                    }
                }
                holes[a as usize..b as usize].fill(false);
            }
        }
        // Pages copied in phase 1 hold data even if the guest has since
        // returned them (free page reporting): they are not holes.
        for p in self.copied.iter_ones() {
            holes.set(p, false);
        }
        let data = (pages - holes.count_ones()) as u64 * PAGE_SIZE;
        Ok(Frozen {
            size: self.size,
            copied: data,
            holes,
            fixed,
        })
    }
}

/// Describes the file at `path` as a frozen generation, without copying
/// it: a RAM file nobody writes any more (its VM moved to a private
/// mapping of it). `fixed` is what the caller wrote into it while the VM
/// was paused.
pub fn frozen_in_place(path: &Path, fixed: u64) -> Result<Frozen, FreezeError> {
    let serr = |err| FreezeError::Source {
        path: path.display().to_string(),
        err,
    };
    let f = File::open(path).map_err(serr)?;
    let size = f.metadata().map_err(serr)?.len();
    if size % PAGE_SIZE != 0 {
        return Err(FreezeError::Size(size));
    }
    let pages = (size / PAGE_SIZE) as usize;
    let mut holes = bitvec![u64, Lsb0; 1; pages];
    for (a, b) in page_extents(&f, size).map_err(serr)? {
        holes[a as usize..b as usize].fill(false);
    }
    let copied = (pages - holes.count_ones()) as u64 * PAGE_SIZE;
    Ok(Frozen {
        size,
        copied,
        fixed,
        holes,
    })
}

/// Copies the RAM file `src` to a new generation file `dst` in one go (both
/// phases of [`Precopy`] back to back). The VM must be paused.
pub fn freeze_generation(src: &Path, dst: &Path) -> Result<Frozen, FreezeError> {
    Precopy::start(src, dst)?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_frozen_in_place_keeps_its_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram");
        let f = File::create(&p).unwrap();
        f.set_len(8 * PAGE_SIZE).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[5u8; 4096], 2 * PAGE_SIZE).unwrap();
        let fr = frozen_in_place(&p, 7).unwrap();
        assert_eq!((fr.size, fr.fixed), (8 * PAGE_SIZE, 7));
        assert!(!fr.holes[2] && fr.holes[0] && fr.holes[7]);
        assert_eq!(fr.copied, fr.size - fr.hole_pages() * PAGE_SIZE);
    }
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn freeze_copies_data_and_maps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ram");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 * PAGE_SIZE).unwrap();
        f.seek(SeekFrom::Start(5 * PAGE_SIZE + 10)).unwrap();
        f.write_all(b"hello").unwrap();
        f.seek(SeekFrom::Start(40 * PAGE_SIZE)).unwrap();
        f.write_all(&[7u8; 4096 * 2]).unwrap();
        drop(f);
        let dst = dir.path().join("gen");
        let fr = freeze_generation(&src, &dst).unwrap();
        assert_eq!(fr.size, 64 * PAGE_SIZE);
        let mut a = Vec::new();
        let mut b = Vec::new();
        File::open(&src).unwrap().read_to_end(&mut a).unwrap();
        File::open(&dst).unwrap().read_to_end(&mut b).unwrap();
        assert_eq!(a, b);
        assert!(!fr.holes[5] && !fr.holes[40] && !fr.holes[41]);
        // Filesystems may allocate in larger extents than a page, but never
        // report a written page as a hole, and a sparse file must have some.
        assert!(fr.hole_pages() > 0 && fr.copied < fr.size, "{fr:?}");
        assert!(
            freeze_generation(&src, &dst).is_err(),
            "must not overwrite a generation"
        );
    }

    #[test]
    fn precopy_catches_changes_made_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ram");
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src)
            .unwrap();
        f.set_len(32 * PAGE_SIZE).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        let mut pc = Precopy::start(&src, &dir.path().join("gen")).unwrap();
        // While "running": change a copied page and write a new one.
        f.seek(SeekFrom::Start(10)).unwrap();
        f.write_all(b"changed").unwrap();
        f.seek(SeekFrom::Start(20 * PAGE_SIZE)).unwrap();
        f.write_all(b"new page").unwrap();
        drop(f);
        let fr = pc.finish().unwrap();
        let mut a = Vec::new();
        let mut b = Vec::new();
        File::open(&src).unwrap().read_to_end(&mut a).unwrap();
        File::open(dir.path().join("gen"))
            .unwrap()
            .read_to_end(&mut b)
            .unwrap();
        assert_eq!(a, b);
        assert!(!fr.holes[0] && !fr.holes[20]);
        assert!(fr.fixed >= 2 * PAGE_SIZE && fr.fixed < fr.size, "{fr:?}");
    }

    #[test]
    fn odd_size_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ram");
        File::create(&src).unwrap().set_len(4097).unwrap();
        assert!(matches!(
            freeze_generation(&src, &dir.path().join("g")),
            Err(FreezeError::Size(4097))
        ));
    }
}
