//! Where a file holds data: its data extents, found with
//! `SEEK_DATA`/`SEEK_HOLE`, in bytes or in whole pages. The hole map of a
//! generation is the complement of its page extents.
//!
//! May import: `sys`, the crate root (`PAGE_SIZE`).

use crate::{sys, PAGE_SIZE};
use std::fs::File;
use std::io;

fn seek(file: &File, off: u64, whence: i32) -> io::Result<Option<u64>> {
    match sys::lseek(file, off, whence) {
        Ok(r) => Ok(Some(r)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Data extents `[start, end)` of a file, using `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(file, start, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .min(size);
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
