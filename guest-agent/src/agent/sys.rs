//! The agent's raw system calls: crediting entropy to the kernel RNG,
//! reconfiguring a network interface, and making inherited descriptors
//! close-on-exec.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

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

/// A network interface, reconfigured in place with `ioctl`s on a datagram
/// socket. No `ip` processes: under TCG each one costs ~50 ms and a clone
/// does this while its parent waits.
pub struct Netdev {
    sock: std::os::fd::OwnedFd,
    name: String,
}

impl Netdev {
    /// A handle on interface `dev` (which need not exist yet: each call
    /// fails with `ENODEV` then).
    pub fn open(dev: &str) -> io::Result<Netdev> {
        if dev.is_empty() || dev.len() >= libc::IFNAMSIZ {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: socket() has no memory arguments; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(Netdev {
            sock,
            name: dev.to_string(),
        })
    }

    fn req(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r.ifr_name.iter_mut().zip(self.name.bytes()) {
            *d = s as libc::c_char;
        }
        r
    }

    fn ioctl(&self, cmd: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: `r` is a valid ifreq for these SIOC* requests, which
        // read or write only inside it.
        if unsafe { libc::ioctl(self.sock.as_raw_fd(), cmd as _, r as *mut libc::ifreq) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The interface flags (`IFF_*`).
    pub fn flags(&self) -> io::Result<libc::c_short> {
        let mut r = self.req();
        self.ioctl(libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        Ok(unsafe { r.ifr_ifru.ifru_flags })
    }

    /// Brings the interface up or down, keeping its other flags. Down also
    /// flushes its neighbour entries.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        let flags = self.flags()?;
        let up_flag = libc::IFF_UP as libc::c_short;
        let mut r = self.req();
        r.ifr_ifru.ifru_flags = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        self.ioctl(libc::SIOCSIFFLAGS, &mut r)
    }

    /// Sets the MAC address; most drivers want the interface down.
    pub fn set_mac(&self, mac: [u8; 6]) -> io::Result<()> {
        let mut r = self.req();
        r.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        // SAFETY: writing the hwaddr member of the union we just selected.
        for (d, s) in unsafe { r.ifr_ifru.ifru_hwaddr.sa_data.iter_mut() }.zip(mac) {
            *d = s as libc::c_char;
        }
        self.ioctl(libc::SIOCSIFHWADDR, &mut r)
    }

    /// Sets the primary IPv4 address and its netmask.
    pub fn set_ipv4(&self, ip: std::net::Ipv4Addr, prefix: u8) -> io::Result<()> {
        if prefix > 32 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let inet = |a: std::net::Ipv4Addr| -> libc::sockaddr {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(a).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in and sockaddr have the same size on Linux.
            unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
        };
        let mut r = self.req();
        r.ifr_ifru.ifru_addr = inet(ip);
        self.ioctl(libc::SIOCSIFADDR, &mut r)?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        let mut r = self.req();
        r.ifr_ifru.ifru_netmask = inet(std::net::Ipv4Addr::from(mask));
        self.ioctl(libc::SIOCSIFNETMASK, &mut r)
    }
}

/// Moves interface `dev` to a new MAC and primary IPv4 address: down
/// (which flushes stale neighbour entries), MAC, address and netmask, up.
pub fn configure_interface(
    dev: &str,
    mac: [u8; 6],
    ip: std::net::Ipv4Addr,
    prefix: u8,
) -> io::Result<()> {
    if prefix > 32 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let n = Netdev::open(dev)?;
    n.set_up(false)?;
    n.set_mac(mac)?;
    n.set_ipv4(ip, prefix)?;
    n.set_up(true)
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

    #[test]
    fn netdev_reads_flags_and_refuses_bad_names() {
        // Reading flags needs no privilege; nothing on the host is changed.
        let lo = Netdev::open("lo").unwrap().flags().unwrap();
        assert_ne!(lo & libc::IFF_LOOPBACK as libc::c_short, 0);
        let e = Netdev::open("sf-no-such-if").unwrap().flags().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
        assert!(Netdev::open("").is_err());
        assert!(Netdev::open("abcdefghijklmnop").is_err());
        assert!(configure_interface("lo", [2, 0, 0, 0, 0, 1], [10, 0, 0, 1].into(), 33).is_err());
    }
}
