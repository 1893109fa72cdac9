//! The CLI's process and mount calls: the one place with `unsafe` (the
//! `pre_exec` hook), and safe wrappers for the rest.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Starts `cmd` in a session of its own, so it outlives this CLI and the
/// terminal's signals.
pub fn detach(cmd: &mut Command) {
    // SAFETY: the hook runs between fork and exec and only calls setsid,
    // which is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            let _ = nix::unistd::setsid();
            Ok(())
        });
    }
}

/// Reaps `pid` if it is an exited child of this process; harmless when it
/// is not our child.
pub fn reap(pid: u32) {
    let _ = nix::sys::wait::waitpid(
        Pid::from_raw(pid as i32),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
}

/// Whether a process `pid` exists (a zombie still does).
pub fn exists(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// Asks `pid` to end (SIGTERM).
pub fn terminate(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
}

/// Kills `pid` at once.
pub fn kill_now(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Detaches the mount at `path` (lazy unmount).
pub fn unmount_detached(path: &Path) -> std::io::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)
}
