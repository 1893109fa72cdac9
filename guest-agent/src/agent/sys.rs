//! The agent's only raw system call: crediting entropy to the kernel RNG.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])` from `<linux/random.h>`.
const RNDADDENTROPY: libc::c_ulong = {
    const IOC_WRITE: libc::c_ulong = 1;
    (IOC_WRITE << 30) | ((2 * std::mem::size_of::<libc::c_int>() as libc::c_ulong) << 16) | ((b'R' as libc::c_ulong) << 8) | 0x03
};
const _: () = assert!(RNDADDENTROPY == 0x4008_5203);

/// Mixes `seed` into the kernel pool and credits 8 bits per byte
/// (`RNDADDENTROPY`; needs `CAP_SYS_ADMIN`). `f` is `/dev/urandom` or
/// `/dev/random`.
pub fn add_entropy(f: &File, seed: &[u8]) -> io::Result<()> {
    let len = libc::c_int::try_from(seed.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bits = len.checked_mul(8).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_on_a_non_random_device_fails_cleanly() {
        // /dev/null does not implement RNDADDENTROPY: ENOTTY, no crash.
        // (Not run on /dev/urandom so the test never touches the host's RNG.)
        let f = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
        assert!(add_entropy(&f, &[1, 2, 3, 4, 5]).is_err());
    }
}
