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

use std::ffi::{c_int, c_void};

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
