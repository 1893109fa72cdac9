//! The agent's raw system calls: crediting entropy to the kernel RNG, and
//! making inherited descriptors close-on-exec.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])` from `<linux/random.h>`.
const RNDADDENTROPY: libc::c_ulong = {
    const IOC_WRITE: libc::c_ulong = 1;
    (IOC_WRITE << 30)
        | ((2 * std::mem::size_of::<libc::c_int>() as libc::c_ulong) << 16)
        | ((b'R' as libc::c_ulong) << 8)
        | 0x03
};
const _: () = assert!(RNDADDENTROPY == 0x4008_5203);

/// Mixes `seed` into the kernel pool and credits 8 bits per byte
/// (`RNDADDENTROPY`; needs `CAP_SYS_ADMIN`). `f` is `/dev/urandom` or
/// `/dev/random`.
pub fn add_entropy(f: &File, seed: &[u8]) -> io::Result<()> {
    let len = libc::c_int::try_from(seed.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bits = len
        .checked_mul(8)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; },
    // built in a u32 buffer so the header ints are aligned.
    let words = 2 + seed.len().div_ceil(4);
    let mut info = vec![0u32; words];
    info[0] = bits as u32;
    info[1] = len as u32;
    for (i, chunk) in seed.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `info` is a valid rand_pool_info: two ints followed by
    // `buf_size` bytes, all inside the allocation, which outlives the call.
    // The kernel only reads it.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `_IO('R', 0x07)` from `<linux/random.h>`.
const RNDRESEEDCRNG: libc::c_ulong = ((b'R' as libc::c_ulong) << 8) | 0x07;
const _: () = assert!(RNDRESEEDCRNG == 0x5207);

/// Forces the kernel CRNG to reseed from the input pool now
/// (`RNDRESEEDCRNG`; needs `CAP_SYS_ADMIN`). Without it a clone's
/// `/dev/urandom` keeps producing its parent's stream until the next timed
/// reseed, however much entropy was added.
pub fn reseed_crng(f: &File) -> io::Result<()> {
    // SAFETY: the ioctl takes no argument and touches no user memory.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Marks every descriptor above stderr close-on-exec, so that whatever
/// the agent inherited from its parent never leaks into exec'd processes.
/// (Descriptors the agent opens itself are close-on-exec already.)
pub fn cloexec_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<libc::c_int> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD only change descriptor flags; on a
        // descriptor that is not open (such as read_dir's own, now closed)
        // they fail with EBADF and change nothing.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_on_a_non_random_device_fails_cleanly() {
        // /dev/null does not implement RNDADDENTROPY: ENOTTY, no crash.
        // (Not run on /dev/urandom so the test never touches the host's RNG.)
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        assert!(add_entropy(&f, &[1, 2, 3, 4, 5]).is_err());
    }
}
