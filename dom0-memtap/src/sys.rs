//! The few raw system calls the crate makes, behind safe functions: the
//! only `unsafe` code of the crate (the crate root denies `unsafe_code`
//! everywhere else). Every block says why it is sound.
//!
//! May import: nothing of this crate (the bottom, beside [`crate::wire`]).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// `lseek(2)`: the new offset, or the raw OS error (e.g. `ENXIO` past the
/// last data for `SEEK_DATA`).
pub(crate) fn lseek(file: &File, off: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor that `file` keeps open; it takes no
    // pointers.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// `fallocate(2)` with mode 0: reserves `[off, off + len)` of `file`.
pub(crate) fn fallocate(file: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor that `file` keeps open; it takes no
    // pointers.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, off as libc::off_t, len as libc::off_t) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Prefaults the page tables of `range`, a page-aligned part of a file
/// mapping (`MADV_POPULATE_WRITE` if `write`, else `_READ`); best effort,
/// older kernels lack it.
pub(crate) fn populate(range: &[u8], write: bool) {
    let advice = if write {
        libc::MADV_POPULATE_WRITE
    } else {
        libc::MADV_POPULATE_READ
    };
    // SAFETY: the address and length come from one live slice, so the
    // range is mapped; these advices only prefault page tables and never
    // change the contents (a write prefault of a shared file mapping
    // allocates what the caller has already fallocated).
    unsafe { libc::madvise(range.as_ptr() as *mut libc::c_void, range.len(), advice) };
}

/// Maps `file` (guest RAM) shared and read-only.
///
/// For [`Precopy`](crate::Precopy) only: the guest may write the pages
/// while they are mapped, so their contents are read racily, on purpose
/// (phase 2 rechecks every page with the VM paused); nobody truncates a
/// guest RAM file while its VM exists.
pub(crate) fn map_guest_ram(file: &File) -> io::Result<memmap2::Mmap> {
    // SAFETY: see above: the file keeps its size while mapped, and racy
    // contents are expected and rechecked.
    unsafe { memmap2::MmapOptions::new().map(file) }
}

/// Maps `file`, a generation being written, shared and writable.
///
/// For [`Precopy`](crate::Precopy) only: the file was created by the
/// caller (`create_new`, mode 0600), and nothing else writes or truncates
/// it while it is being frozen.
pub(crate) fn map_new_generation(file: &File) -> io::Result<memmap2::MmapMut> {
    // SAFETY: see above: the caller owns the new file; no one else changes
    // it while mapped.
    unsafe { memmap2::MmapOptions::new().map_mut(file) }
}

/// `umount2(path, MNT_DETACH)`: lazily unmounts.
pub(crate) fn umount_detach(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string for the whole call;
    // umount2 has no other pointer arguments.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    Err(io::Error::last_os_error())
}

/// The effective user and group ids of this process.
pub(crate) fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid take no arguments and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Waits up to `ms` milliseconds for `fd` to become readable.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, ms: i32) {
    let mut p = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, on a descriptor kept open by the borrow.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// Whether `fd` has data to read right now (a datagram queued on a
/// socket), without waiting.
pub(crate) fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, on a descriptor kept open by the borrow;
    // a zero timeout does not block.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// Sets a socket's receive buffer to `bytes` past `net.core.rmem_max`
/// (`SO_RCVBUFFORCE`, which needs `CAP_NET_ADMIN`); `false` if refused.
pub(crate) fn force_recv_buffer(fd: BorrowedFd<'_>, bytes: usize) -> bool {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt on a descriptor the caller keeps open, with a
    // pointer to a live c_int and its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

#[cfg(test)]
pub(crate) fn map_private_for_test(file: &File) -> io::Result<memmap2::MmapMut> {
    // SAFETY: a test's own temporary file, which nobody truncates while it
    // is mapped; writes go to private copies.
    unsafe { memmap2::MmapOptions::new().map_copy(file) }
}

/// `process_vm_readv(2)` of one range: reads `buf.len()` bytes at `addr` in
/// process `pid` into `buf`; the number of bytes read.
pub(crate) fn read_process(pid: u32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which we own mutably for the call;
    // the remote address is only read by the kernel, with the target's
    // permissions checked by it (a bad address is an error, not UB here).
    let r = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// `process_vm_writev(2)` of one range: writes `buf` at `addr` in process
/// `pid`; the number of bytes written.
pub(crate) fn write_process(pid: u32, addr: u64, buf: &[u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which the kernel only reads; the
    // remote range belongs to another process and is checked by the kernel
    // (a bad address is an error, never a write into this process).
    let r = unsafe { libc::process_vm_writev(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// `fallocate(2)` punching `[off, off + len)` out of `file`, keeping its size.
pub(crate) fn punch(file: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor that `file` keeps open; it takes no
    // pointers.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn readable_now_sees_a_queued_datagram_without_waiting() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let probe = rx.try_clone().unwrap();
        assert!(!readable_now(probe.as_fd()));
        tx.send_to(b"page", rx.local_addr().unwrap()).unwrap();
        let t0 = std::time::Instant::now();
        while !readable_now(probe.as_fd()) {
            assert!(t0.elapsed().as_secs() < 5, "the datagram never queued");
        }
        let mut buf = [0u8; 8];
        assert_eq!(rx.recv(&mut buf).unwrap(), 4);
        // Taken by the socket it was cloned from: nothing left for the probe.
        assert!(!readable_now(probe.as_fd()));
    }
}
