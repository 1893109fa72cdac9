//! `libsnowflock_qemu_shim.so`, preloaded into the QEMU of every clone.
//!
//! QEMU advises `MADV_HUGEPAGE` on all guest RAM. For a clone the RAM is a
//! private mapping of a generation file, on another host a memtap (FUSE)
//! file, and for a `VM_HUGEPAGE` file mapping the kernel answers every page
//! fault with a read of the whole 2 MiB window around it, whatever the
//! file system's readahead setting. Measured here: a resumed clone made
//! memtap fetch 64 MiB while it touched 27. QEMU has no option to skip the
//! advice, so this shim turns exactly that advice into a successful no-op
//! and passes every other `madvise` to the kernel. Huge pages are only a
//! performance hint; nothing else changes.
//!
//! QEMU 7.2 also discards guest RAM the guest reports free (virtio-balloon
//! free page reporting) by punching a hole in the RAM *file*, then
//! `MADV_DONTNEED` on the mapping, even when the mapping is private. For a
//! clone the file is the generation that its siblings (and, after a
//! restart, the parent) map too, so the hole would turn pages they still
//! use into zeros. The daemon names the RAM file in
//! [`RAM_FILE_ENV`] (`<st_dev>:<st_ino>`), and the shim turns a hole punch
//! on exactly that file into `MADV_DONTNEED` of the range in QEMU's
//! mapping of it (found in `/proc/self/maps`): that frees the VM's private
//! copy of the pages, which QEMU 7.2 itself does not do for a file it
//! maps privately, and the pages read back as the generation's content,
//! which the guest does not rely on for a free page. Every other
//! `fallocate` (disk images) is passed on.
//!
//! A parent VM that was handed to a new QEMU runs on a private mapping too.
//! Its skipped punches are what the next freeze needs to keep free pages
//! out of the next generation, so when [`DISCARD_LOG_ENV`] names a file,
//! each one is appended to it as two little-endian `u64`s (offset,
//! length).

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

/// Environment variable naming the shared RAM file as `<st_dev>:<st_ino>`.
pub const RAM_FILE_ENV: &str = "SNOWFLOCK_RAM_FILE";

/// Environment variable naming the file skipped punches are logged to.
pub const DISCARD_LOG_ENV: &str = "SNOWFLOCK_DISCARD_LOG";

/// The discard log, opened once (appending, so each record lands whole).
fn discard_log() -> Option<&'static std::fs::File> {
    static LOG: OnceLock<Option<std::fs::File>> = OnceLock::new();
    LOG.get_or_init(|| {
        let path = std::env::var_os(DISCARD_LOG_ENV)?;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .ok()
    })
    .as_ref()
}

/// Appends one skipped punch to the discard log, if there is one.
fn log_discard(offset: i64, len: i64) {
    if let Some(mut f) = discard_log() {
        let mut rec = [0u8; 16];
        rec[..8].copy_from_slice(&(offset as u64).to_le_bytes());
        rec[8..].copy_from_slice(&(len as u64).to_le_bytes());
        let _ = std::io::Write::write_all(&mut f, &rec);
    }
}

/// The RAM file's identity from [`RAM_FILE_ENV`], read once.
fn ram_file() -> Option<(u64, u64)> {
    static ID: OnceLock<Option<(u64, u64)>> = OnceLock::new();
    *ID.get_or_init(|| parse_id(&std::env::var(RAM_FILE_ENV).ok()?))
}

fn parse_id(s: &str) -> Option<(u64, u64)> {
    let (d, i) = s.split_once(':')?;
    Some((d.parse().ok()?, i.parse().ok()?))
}

/// Whether `fd` is the shared RAM file.
fn is_ram_file(fd: c_int) -> bool {
    let Some(want) = ram_file() else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer we own.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    (st.st_dev, st.st_ino) == want
}

/// glibc's `major`/`minor` split of a `st_dev`.
fn split_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The mappings of file (`dev`, `ino`) in `maps` (the text of
/// `/proc/self/maps`): start, end and file offset of each.
fn mappings_of(maps: &str, dev: u64, ino: u64) -> Vec<(u64, u64, u64)> {
    let want_dev = split_dev(dev);
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let (range, _perms, off, d, i) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let (a, b) = range.split_once('-')?;
            let (ma, mi) = d.split_once(':')?;
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            let d = (hex(ma)?, hex(mi)?);
            (i.parse::<u64>().ok()? == ino && d == want_dev).then_some((
                hex(a)?,
                hex(b)?,
                hex(off)?,
            ))
        })
        .collect()
}

/// Drops this process's private copy of `[offset, offset + len)` of the
/// RAM file, wherever it maps that range.
fn drop_private_copy(offset: i64, len: i64) {
    let Some((dev, ino)) = ram_file() else {
        return;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let (off, end) = (offset as u64, offset as u64 + len as u64);
    for (start, stop, moff) in mappings_of(&maps, dev, ino) {
        let mend = moff + (stop - start);
        let (a, b) = (off.max(moff), end.min(mend));
        if a < b {
            // SAFETY: the range lies inside a mapping of the RAM file that
            // QEMU asked to discard; MADV_DONTNEED on a private mapping
            // only drops the private copies, so later reads see the file.
            unsafe {
                libc::syscall(
                    libc::SYS_madvise,
                    (start + (a - moff)) as *mut c_void,
                    (b - a) as usize,
                    libc::MADV_DONTNEED,
                )
            };
        }
    }
}

/// A hole punch on the shared RAM file becomes `MADV_DONTNEED` of the
/// private copy (and a line in the discard log); anything else is passed
/// on.
fn shim_fallocate(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int {
    if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 && is_ram_file(fd) {
        drop_private_copy(offset, len);
        log_discard(offset, len);
        return 0;
    }
    // SAFETY: forwarded unchanged to the system call the caller asked for.
    let r = unsafe { libc::syscall(libc::SYS_fallocate, fd, mode, offset, len) };
    if r < 0 {
        -1
    } else {
        0
    }
}

/// Interposes libc's `fallocate`.
///
/// # Safety
/// Same contract as `fallocate(2)`.
#[no_mangle]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int {
    shim_fallocate(fd, mode, offset, len)
}

/// Interposes libc's `fallocate64` (the same call on 64-bit Linux).
///
/// # Safety
/// Same contract as `fallocate(2)`.
#[no_mangle]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int {
    shim_fallocate(fd, mode, offset, len)
}

/// Interposes libc's `madvise` (found first through `LD_PRELOAD`).
///
/// # Safety
/// Same contract as `madvise(2)`: the caller owns the range.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    if advice == libc::MADV_HUGEPAGE {
        return 0;
    }
    // SAFETY: forwarded unchanged to the system call the caller asked for.
    let r = unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) };
    if r < 0 {
        -1
    } else {
        r as c_int
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    fn allocated(f: &std::fs::File) -> u64 {
        f.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn hole_punches_skip_only_the_ram_file() {
        let dir = std::env::temp_dir().join(format!("sf-shim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ram = std::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("ram"))
            .unwrap();
        let mut disk = std::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("disk"))
            .unwrap();
        for f in [&mut ram, &mut disk] {
            f.write_all(&vec![7u8; 1 << 20]).unwrap();
            f.sync_all().unwrap();
        }
        let m = ram.metadata().unwrap();
        std::env::set_var(super::RAM_FILE_ENV, format!("{}:{}", m.dev(), m.ino()));
        let log = dir.join("discards");
        std::env::set_var(super::DISCARD_LOG_ENV, &log);
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: a private mapping of the test's own file, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                1 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                ram.as_raw_fd(),
                0,
            )
        } as *mut u8;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        // SAFETY: inside the mapping.
        unsafe { p.add(8192).write(9) };
        assert_eq!(super::shim_fallocate(ram.as_raw_fd(), punch, 0, 1 << 20), 0);
        // The private copy is gone: the page reads the file again.
        // SAFETY: inside the mapping, which is then unmapped.
        unsafe {
            assert_eq!(p.add(8192).read(), 7);
            libc::munmap(p as *mut libc::c_void, 1 << 20);
        }
        let mut back = Vec::new();
        ram.rewind().unwrap();
        ram.read_to_end(&mut back).unwrap();
        assert!(back.iter().all(|b| *b == 7), "the RAM file kept its data");
        let logged = std::fs::read(&log).unwrap();
        assert_eq!(logged.len(), 16, "one record: offset, length");
        assert_eq!(u64::from_le_bytes(logged[8..].try_into().unwrap()), 1 << 20);
        let before = allocated(&disk);
        assert_eq!(
            super::shim_fallocate(disk.as_raw_fd(), punch, 0, 1 << 20),
            0
        );
        // Another file is punched for real (if its file system can).
        let mut back = Vec::new();
        disk.rewind().unwrap();
        disk.read_to_end(&mut back).unwrap();
        assert!(back.iter().all(|b| *b == 0) || allocated(&disk) == before);
        // A bad descriptor still fails like the real call.
        assert_eq!(super::shim_fallocate(-1, punch, 0, 4096), -1);
        assert_eq!(super::parse_id("1:2"), Some((1, 2)));
        let maps = "7f00-7f10 rw-p 00002000 00:1a 42 /x\n7f20-7f30 rw-p 0 00:1b 42 /y\n";
        assert_eq!(
            super::mappings_of(maps, 0x1a, 42),
            [(0x7f00, 0x7f10, 0x2000)]
        );
        assert_eq!(super::parse_id("x"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hugepage_advice_is_dropped_and_others_pass() {
        let len = 4 << 20;
        // SAFETY: a fresh anonymous mapping we own and unmap.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(super::madvise(p, len, libc::MADV_HUGEPAGE), 0);
            assert_eq!(super::madvise(p, len, libc::MADV_DONTNEED), 0);
            // An invalid advice still fails like the real call.
            assert_eq!(super::madvise(p, len, 12345), -1);
            libc::munmap(p, len);
        }
    }
}
