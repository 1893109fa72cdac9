//! Host side of guest memory ("dom0" is Xen's word for the host).
//!
//! Today this crate freezes a memory *generation*: an immutable copy of a
//! paused VM's RAM file, made hole-aware so that pages the guest never
//! touched (or returned through free page reporting) are neither copied nor
//! later fetched. Clones on the same host map the generation privately
//! (`MAP_PRIVATE`, QEMU `share=off`), so they share its pages through the
//! page cache and their writes stay their own.
//!
//! Serving generations to other hosts on demand (FUSE files, page server,
//! multicast) is the next stage; see `docs/design.md`.

use bitvec::prelude::*;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Page granularity of hole maps.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of freezing a generation.
#[derive(Debug, thiserror::Error)]
pub enum MemtapError {
    /// The source RAM file could not be opened or inspected.
    #[error("Cannot read guest RAM file {path}")]
    Source { path: String, #[source] err: io::Error },
    /// The generation file could not be created or written.
    #[error("Cannot write memory generation {path}")]
    Dest { path: String, #[source] err: io::Error },
    /// The RAM file size is not a multiple of the page size.
    #[error("Guest RAM file size {0} is not a multiple of 4 KiB")]
    Size(u64),
}

/// Result of freezing a generation.
#[derive(Debug, Clone)]
pub struct Frozen {
    /// Guest RAM size in bytes.
    pub size: u64,
    /// Bytes actually copied (data extents).
    pub copied: u64,
    /// One bit per page, set where the page is a hole (reads as zeros).
    pub holes: BitVec<u64, Lsb0>,
}

impl Frozen {
    /// Number of hole pages.
    pub fn hole_pages(&self) -> u64 {
        self.holes.count_ones() as u64
    }
}

fn seek(fd: i32, off: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid fd with no memory arguments.
    let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Data extents `[start, end)` of a file, using `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek(fd, pos, libc::SEEK_DATA)? else { break };
        if start >= size {
            break;
        }
        let end = seek(fd, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut off_in = start as libc::loff_t;
    let mut off_out = start as libc::loff_t;
    while (off_in as u64) < end {
        let len = (end - off_in as u64).min(1 << 30) as usize;
        // SAFETY: both fds are valid for the call; the offsets are ours.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, len, 0)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source ended early"));
        }
    }
    Ok(())
}

/// Copies the RAM file `src` to a new generation file `dst` (which must not
/// exist), skipping holes, and returns the hole map.
///
/// The VM must be paused: the copy is only consistent if nothing writes
/// `src` meanwhile.
pub fn freeze_generation(src: &Path, dst: &Path) -> Result<Frozen, MemtapError> {
    let serr = |err| MemtapError::Source { path: src.display().to_string(), err };
    let derr = |err| MemtapError::Dest { path: dst.display().to_string(), err };
    let s = File::open(src).map_err(serr)?;
    let size = s.metadata().map_err(serr)?.len();
    if size % PAGE_SIZE != 0 {
        return Err(MemtapError::Size(size));
    }
    let d = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dst).map_err(derr)?;
    d.set_len(size).map_err(derr)?;
    let extents = data_extents(&s, size).map_err(serr)?;
    let pages = (size / PAGE_SIZE) as usize;
    let mut holes = bitvec![u64, Lsb0; 1; pages];
    let mut copied = 0;
    for &(a, b) in &extents {
        let (a, b) = (a / PAGE_SIZE * PAGE_SIZE, b.div_ceil(PAGE_SIZE) * PAGE_SIZE);
        copy_range(&s, &d, a, b).map_err(derr)?;
        holes[(a / PAGE_SIZE) as usize..(b / PAGE_SIZE) as usize].fill(false);
        copied += b - a;
    }
    Ok(Frozen { size, copied, holes })
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert!(freeze_generation(&src, &dst).is_err(), "must not overwrite a generation");
    }

    #[test]
    fn odd_size_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ram");
        File::create(&src).unwrap().set_len(4097).unwrap();
        assert!(matches!(freeze_generation(&src, &dir.path().join("g")), Err(MemtapError::Size(4097))));
    }
}
