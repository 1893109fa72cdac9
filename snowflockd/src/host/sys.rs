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
pub fn try_lock(f: &std::fs::File) -> bool {
    // SAFETY: flock on a descriptor `f` owns and keeps open; no memory
    // arguments.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}
