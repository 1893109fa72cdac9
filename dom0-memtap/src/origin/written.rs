//! Which pages of a private file mapping a process has written.
//!
//! A VMM that maps a generation file privately (`MAP_PRIVATE`, QEMU
//! `share=off`) gets a private, anonymous copy of each page it writes; the
//! pages it only read stay the file's page cache. `/proc/PID/pagemap` says
//! which is which without touching the pages: bit 61 ("file page or shared
//! anonymous") is clear for exactly the written ones. This works on kernels
//! without soft-dirty bits, and it costs 8 bytes read per guest page, not
//! a compare of the page: the written set of a VM restarted on its last
//! generation is what changed since that generation.
//!
//! May import: the crate root (`PAGE_SIZE`).

use crate::PAGE_SIZE;
use bitvec::prelude::*;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// pagemap bits (see the kernel's `Documentation/admin-guide/mm/pagemap.rst`).
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE_OR_SHARED: u64 = 1 << 61;

/// Errors of finding a mapping or reading its page map.
#[derive(Debug, thiserror::Error)]
pub enum WrittenError {
    /// `/proc/PID/maps` or `/proc/PID/pagemap` could not be read.
    #[error("cannot read {path}")]
    Proc {
        path: String,
        #[source]
        err: io::Error,
    },
    /// The process does not map the file.
    #[error("process {pid} does not map the file (device {dev:#x}, inode {ino})")]
    NotMapped { pid: u32, dev: u64, ino: u64 },
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsLine {
    pub start: u64,
    pub end: u64,
    /// The `p`/`s` flag: a private mapping.
    pub private: bool,
    /// Offset in the file, bytes.
    pub offset: u64,
    pub dev_major: u64,
    pub dev_minor: u64,
    pub inode: u64,
}

/// Parses one line of `/proc/PID/maps`; `None` for anything malformed.
pub fn parse_maps_line(line: &str) -> Option<MapsLine> {
    let mut f = line.split_ascii_whitespace();
    let (range, perms, offset, dev, inode) =
        (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let l = MapsLine {
        start: hex(start)?,
        end: hex(end)?,
        private: perms.as_bytes().get(3) == Some(&b'p'),
        offset: hex(offset)?,
        dev_major: hex(major)?,
        dev_minor: hex(minor)?,
        inode: inode.parse().ok()?,
    };
    (l.end > l.start).then_some(l)
}

/// glibc's `major`/`minor` split of a `st_dev`.
fn split_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The private mappings of file (`dev`, `ino`) in `maps` (the text of
/// `/proc/PID/maps`), in address order.
pub fn private_mappings_of(maps: &str, dev: u64, ino: u64) -> Vec<MapsLine> {
    let (major, minor) = split_dev(dev);
    maps.lines()
        .filter_map(parse_maps_line)
        .filter(|l| l.private && l.inode == ino && l.dev_major == major && l.dev_minor == minor)
        .collect()
}

/// Whether a pagemap entry is a page the process wrote (a private,
/// anonymous copy, in memory or swapped out).
pub fn entry_is_written(entry: u64) -> bool {
    entry & (PRESENT | SWAPPED) != 0 && entry & FILE_OR_SHARED == 0
}

/// The pages of `file` (its device and inode) that process `pid` has
/// written through its private mapping: one bit per page of the file's
/// first `pages` pages. The process should be stopped (a paused VM), or
/// the answer is a moment's view.
pub fn written_pages(
    pid: u32,
    file: &Path,
    pages: usize,
) -> Result<BitVec<u64, Lsb0>, WrittenError> {
    use std::os::unix::fs::MetadataExt;
    let proc_err = |path: String| move |err| WrittenError::Proc { path, err };
    let meta = std::fs::metadata(file).map_err(proc_err(file.display().to_string()))?;
    let maps_path = format!("/proc/{pid}/maps");
    let maps = std::fs::read_to_string(&maps_path).map_err(proc_err(maps_path))?;
    let mappings = private_mappings_of(&maps, meta.dev(), meta.ino());
    if mappings.is_empty() {
        return Err(WrittenError::NotMapped {
            pid,
            dev: meta.dev(),
            ino: meta.ino(),
        });
    }
    let pm_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pm_path).map_err(proc_err(pm_path.clone()))?;
    let mut written = bitvec![u64, Lsb0; 0; pages];
    for m in mappings {
        scan(&pagemap, &m, &mut written).map_err(proc_err(pm_path.clone()))?;
    }
    Ok(written)
}

/// Calls `f(address, file offset, length)` for every run of pages set in
/// `bits` (indexed by page of `file`), with the address of that run in
/// process `pid`'s private mapping of the file. Runs of neighbouring pages
/// come in one call (up to `max_run` bytes, and split where a mapping ends).
fn for_each_mapped_run(
    pid: u32,
    file: &Path,
    bits: &BitVec<u64, Lsb0>,
    max_run: usize,
    mut f: impl FnMut(u64, u64, usize) -> Result<(), WrittenError>,
) -> Result<(), WrittenError> {
    use std::os::unix::fs::MetadataExt;
    let proc_err = |path: String| move |err| WrittenError::Proc { path, err };
    let meta = std::fs::metadata(file).map_err(proc_err(file.display().to_string()))?;
    let maps_path = format!("/proc/{pid}/maps");
    let maps = std::fs::read_to_string(&maps_path).map_err(proc_err(maps_path))?;
    let mappings = private_mappings_of(&maps, meta.dev(), meta.ino());
    let page = PAGE_SIZE as usize;
    let mut ones = bits.iter_ones().peekable();
    while let Some(first) = ones.next() {
        // A run of neighbouring pages, bounded by `max_run`.
        let mut last = first;
        while let Some(&n) = ones.peek() {
            if n != last + 1 || (n - first + 1) * page > max_run {
                break;
            }
            last = n;
            ones.next();
        }
        let off = first as u64 * PAGE_SIZE;
        let len = (last - first + 1) * page;
        // QEMU maps guest RAM in one piece; a run crossing two mappings is
        // split at the boundary.
        let mut done = 0;
        while done < len {
            let at = off + done as u64;
            let m = mappings
                .iter()
                .find(|m| at >= m.offset && at < m.offset + (m.end - m.start))
                .ok_or(WrittenError::NotMapped {
                    pid,
                    dev: meta.dev(),
                    ino: meta.ino(),
                })?;
            let in_map = (m.offset + (m.end - m.start) - at) as usize;
            let take = (len - done).min(in_map);
            f(m.start + (at - m.offset), at, take)?;
            done += take;
        }
    }
    Ok(())
}

/// Buffer (and longest run) of one transfer.
const RUN: usize = 1 << 20;

/// An error reading or writing the memory of process `pid`.
fn mem_err(pid: u32) -> impl Fn(io::Error) -> WrittenError {
    move |err| WrittenError::Proc {
        path: format!("the memory of process {pid}"),
        err,
    }
}

/// A short `process_vm_readv`/`writev` of process `pid`.
fn short(pid: u32) -> WrittenError {
    mem_err(pid)(io::Error::from(io::ErrorKind::UnexpectedEof))
}

/// Copies the pages of `written` (indexed by page of the file) from
/// process `pid`'s private mapping of the file into `dst` at the same
/// offsets; returns the bytes copied. The process must be stopped. Runs of
/// neighbouring pages are read with one system call each (up to 1 MiB).
pub fn copy_written(
    pid: u32,
    file: &Path,
    written: &BitVec<u64, Lsb0>,
    dst: &File,
) -> Result<u64, WrittenError> {
    let mut buf = vec![0u8; RUN];
    let mut copied = 0;
    for_each_mapped_run(pid, file, written, RUN, |addr, at, len| {
        let n = crate::sys::read_process(pid, addr, &mut buf[..len]).map_err(mem_err(pid))?;
        if n != len {
            return Err(short(pid));
        }
        dst.write_all_at(&buf[..len], at)
            .map_err(|err| WrittenError::Proc {
                path: "the generation file".into(),
                err,
            })?;
        copied += len as u64;
        Ok(())
    })?;
    Ok(copied)
}

/// The reverse of [`copy_written`]: writes the pages of `pages` from `src`
/// (at their offsets) into process `pid`'s private mapping of `file`, which
/// makes them private copies there. For a VMM that is not running yet (a
/// clone or a parent's new QEMU, started `-incoming`) whose generation is
/// its RAM file plus a layer. Returns the bytes written.
pub fn write_into_process(
    pid: u32,
    file: &Path,
    pages: &BitVec<u64, Lsb0>,
    src: &File,
) -> Result<u64, WrittenError> {
    let mut buf = vec![0u8; RUN];
    let mut written = 0;
    for_each_mapped_run(pid, file, pages, RUN, |addr, at, len| {
        src.read_exact_at(&mut buf[..len], at)
            .map_err(|err| WrittenError::Proc {
                path: "the generation's layer".into(),
                err,
            })?;
        let n = crate::sys::write_process(pid, addr, &buf[..len]).map_err(mem_err(pid))?;
        if n != len {
            return Err(short(pid));
        }
        written += len as u64;
        Ok(())
    })?;
    Ok(written)
}

/// The whole pages a discard log covers (see `qemu-shim`: records of two
/// little-endian `u64`s, offset and length, one per page range the guest
/// reported free), one bit per page of the first `pages`. A torn last
/// record and ranges past the end are ignored.
pub fn discarded_pages(log: &[u8], pages: usize) -> BitVec<u64, Lsb0> {
    let mut bits = bitvec![u64, Lsb0; 0; pages];
    for rec in log.chunks_exact(16) {
        let off = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(rec[8..].try_into().unwrap_or_default());
        let first = off.div_ceil(PAGE_SIZE).min(pages as u64) as usize;
        let end = (off.saturating_add(len) / PAGE_SIZE).min(pages as u64) as usize;
        if first < end {
            bits[first..end].fill(true);
        }
    }
    bits
}

/// Punches the pages set in `bits` out of `file` (runs at a time), keeping
/// its size: they read as zeros, hold no memory, and clones never fetch
/// them. Returns the bytes punched.
pub fn punch_pages(file: &File, bits: &BitVec<u64, Lsb0>) -> io::Result<u64> {
    let mut punched = 0;
    let mut ones = bits.iter_ones().peekable();
    while let Some(first) = ones.next() {
        let mut last = first;
        while ones.peek() == Some(&(last + 1)) {
            last += 1;
            ones.next();
        }
        let len = (last - first + 1) as u64 * PAGE_SIZE;
        crate::sys::punch(file, first as u64 * PAGE_SIZE, len)?;
        punched += len;
    }
    Ok(punched)
}

/// Marks the written pages of mapping `m` in `written` (indexed by page of
/// the file).
fn scan(pagemap: &File, m: &MapsLine, written: &mut BitVec<u64, Lsb0>) -> io::Result<()> {
    const CHUNK: usize = 4096; // entries per read: 32 KiB
    let page = PAGE_SIZE;
    let first_file_page = (m.offset / page) as usize;
    let n = ((m.end - m.start) / page) as usize;
    let mut buf = vec![0u8; CHUNK * 8];
    let mut done = 0;
    while done < n {
        let take = CHUNK.min(n - done);
        let bytes = &mut buf[..take * 8];
        pagemap.read_exact_at(bytes, (m.start / page + done as u64) * 8)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().unwrap_or_default());
            let idx = first_file_page + done + i;
            if entry_is_written(entry) && idx < written.len() {
                written.set(idx, true);
            }
        }
        done += take;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let l = parse_maps_line(
            "7f0000000000-7f0000400000 rw-p 00001000 00:1a 4242                       /dev/shm/x/ram (deleted)",
        )
        .unwrap();
        assert_eq!(
            l,
            MapsLine {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0040_0000,
                private: true,
                offset: 0x1000,
                dev_major: 0,
                dev_minor: 0x1a,
                inode: 4242,
            }
        );
        assert!(
            !parse_maps_line("7f00-7f10 rw-s 0 00:1a 1 /x")
                .unwrap()
                .private
        );
        for bad in [
            "",
            "zz-10 rw-p 0 00:01 1",
            "10-10 rw-p 0 00:01 1",
            "10-20 rw-p 0 0001 1",
        ] {
            assert_eq!(parse_maps_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn discard_logs_become_whole_pages() {
        let rec = |off: u64, len: u64| {
            let mut r = off.to_le_bytes().to_vec();
            r.extend(len.to_le_bytes());
            r
        };
        let mut log = rec(4096, 8192); // pages 1, 2
        log.extend(rec(5 * 4096 + 1, 4096)); // no whole page
        log.extend(rec(7 * 4096, u64::MAX)); // clipped at the end
        log.extend([1, 2, 3]); // torn record
        let bits = discarded_pages(&log, 8);
        assert_eq!(bits.iter_ones().collect::<Vec<_>>(), [1, 2, 7]);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![3u8; 8 * 4096]).unwrap();
        let f = File::options().write(true).open(&p).unwrap();
        assert_eq!(punch_pages(&f, &bits).unwrap(), 3 * 4096);
        let back = std::fs::read(&p).unwrap();
        assert_eq!(back.len(), 8 * 4096);
        assert!(back[4096..3 * 4096].iter().all(|b| *b == 0));
        assert!(back[..4096].iter().all(|b| *b == 3));
    }

    #[test]
    fn entries_classify() {
        assert!(entry_is_written(PRESENT | 77));
        assert!(entry_is_written(SWAPPED));
        assert!(!entry_is_written(PRESENT | FILE_OR_SHARED));
        assert!(!entry_is_written(0));
    }

    #[test]
    fn devices_split_like_glibc() {
        assert_eq!(split_dev(0x1a), (0, 0x1a));
        assert_eq!(split_dev((8 << 8) | 1), (8, 1));
    }

    #[test]
    fn written_pages_of_this_process_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let page = PAGE_SIZE as usize;
        std::fs::write(&path, vec![1u8; 16 * page]).unwrap();
        let file = File::open(&path).unwrap();
        let mut map = crate::sys::map_private_for_test(&file).unwrap();
        // Read every page, write pages 3 and 11.
        let sum: u64 = map.iter().step_by(page).map(|b| *b as u64).sum();
        assert_eq!(sum, 16);
        map[3 * page] = 9;
        map[11 * page + 5] = 9;
        let w = written_pages(std::process::id(), &path, 16).unwrap();
        assert_eq!(w.iter_ones().collect::<Vec<_>>(), [3, 11]);
        // Copy them into another file: exactly the written pages change.
        let dst_path = dir.path().join("next");
        std::fs::write(&dst_path, vec![1u8; 16 * page]).unwrap();
        let dst = File::options().write(true).open(&dst_path).unwrap();
        let n = copy_written(std::process::id(), &path, &w, &dst).unwrap();
        assert_eq!(n, 2 * PAGE_SIZE);
        let back = std::fs::read(&dst_path).unwrap();
        let changed: Vec<usize> = (0..back.len()).filter(|&i| back[i] != 1).collect();
        assert_eq!(changed, [3 * page, 11 * page + 5]);
        // And back: pages 5 and 6 of `next` go into this process's mapping.
        let mut back_bits = bitvec![u64, Lsb0; 0; 16];
        back_bits[5..7].fill(true);
        std::os::unix::fs::FileExt::write_all_at(&dst, &[7u8; 8192], 5 * PAGE_SIZE).unwrap();
        let src = File::open(&dst_path).unwrap();
        let n = write_into_process(std::process::id(), &path, &back_bits, &src).unwrap();
        assert_eq!(n, 2 * PAGE_SIZE);
        assert!(map[5 * page..7 * page].iter().all(|b| *b == 7));
        assert_eq!((map[4 * page], map[7 * page]), (1, 1));
        let w = written_pages(std::process::id(), &path, 16).unwrap();
        assert_eq!(w.iter_ones().collect::<Vec<_>>(), [3, 5, 6, 11]);
        drop(map);
        assert!(matches!(
            written_pages(std::process::id(), &path, 16),
            Err(WrittenError::NotMapped { .. })
        ));
    }
}
