//! The host adapters' raw system calls outside networking.

use std::os::fd::AsRawFd;

/// Makes a child process die with SIGKILL when the daemon thread that
/// started it dies (so a crashed daemon leaves no guests behind), in a
/// process group of its own.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec and calls only prctl
    // and setpgid, which are async-signal-safe and touch no memory of the
    // parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
}

/// A copy of the descriptor process `pid` holds open on `target` (what its
/// `/proc/PID/fd` link reads), taken with `pidfd_getfd`; `None` if it has
/// none. Used to hand a VM's tap from one QEMU to the next: a tap without
/// multi-queue accepts one attachment, which the new QEMU shares.
pub fn dup_fd_of(pid: u32, target: &str) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    let dir = format!("/proc/{pid}/fd");
    let mut found = None;
    for e in std::fs::read_dir(&dir)?.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == target) {
            found = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
            break;
        }
    }
    let Some(remote) = found else {
        return Ok(None);
    };
    // SAFETY: pidfd_open takes a pid and flags, no pointers; the result is
    // checked and owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes descriptors and flags, no pointers; the
    // new descriptor (close-on-exec) is checked and owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), remote, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(Some(unsafe {
        std::os::fd::OwnedFd::from_raw_fd(fd as i32)
    }))
}

/// Makes `fd` the child's descriptor 3, kept open across `exec`.
pub fn pass_fd_as_3(cmd: &mut tokio::process::Command, fd: std::os::fd::RawFd) {
    // SAFETY: the closure runs between fork and exec and calls only dup2
    // and fcntl, which are async-signal-safe; `fd` stays open in the
    // parent until the child has been spawned (the caller holds it).
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Punches out `[0, len)` of a file, keeping its size.
pub fn punch_hole(f: &std::fs::File, len: u64) -> std::io::Result<()> {
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        len as libc::off_t,
    )
    .map_err(std::io::Error::from)
}

/// Takes an exclusive, non-blocking lock on a file; false if another
/// process holds it.
/// Bytes written to the stream socket `fd` that its peer has not read
/// yet (`SIOCOUTQ`).
pub fn unread_by_peer(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points to
    // `n`, alive for the call; the descriptor is kept open by the borrow.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

pub fn try_lock(f: &std::fs::File) -> bool {
    // SAFETY: flock on a descriptor `f` owns and keeps open; no memory
    // arguments.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}
