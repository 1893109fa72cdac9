//! Where a file holds data: its data extents, found with
//! `SEEK_DATA`/`SEEK_HOLE`, in bytes or in whole pages. The hole map of a
//! generation is the complement of its page extents.
//!
//! May import: the crate root (`PAGE_SIZE`).

use crate::PAGE_SIZE;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

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
        let Some(start) = seek(fd, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(fd, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Data extents of `file` in whole pages `[first, end)`.
pub(crate) fn page_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    Ok(data_extents(file, size)?
        .into_iter()
        .map(|(a, b)| (a / PAGE_SIZE, b.div_ceil(PAGE_SIZE).min(size / PAGE_SIZE)))
        .collect())
}
