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
//! on exactly that file into a successful no-op. The `MADV_DONTNEED` that
//! follows still frees the clone's private copy; the page reads back as
//! the generation's content, which the guest does not rely on for a free
//! page. Every other `fallocate` (disk images) is passed on.

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

/// Environment variable naming the shared RAM file as `<st_dev>:<st_ino>`.
pub const RAM_FILE_ENV: &str = "SNOWFLOCK_RAM_FILE";

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

/// A hole punch on the shared RAM file is skipped; anything else is passed on.
fn shim_fallocate(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int {
    if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 && is_ram_file(fd) {
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
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(super::shim_fallocate(ram.as_raw_fd(), punch, 0, 1 << 20), 0);
        let mut back = Vec::new();
        ram.rewind().unwrap();
        ram.read_to_end(&mut back).unwrap();
        assert!(back.iter().all(|b| *b == 7), "the RAM file kept its data");
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
