//! Raw network ioctls (tun, bridge, interface flags): the only unsafe
//! code of host networking.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn ioctl(fd: &OwnedFd, cmd: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `r` is a valid ifreq; these requests read and write only
    // inside it.
    if unsafe { libc::ioctl(fd.as_raw_fd(), cmd as _, r as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: no memory arguments; the result is checked and owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates tap `name` (`IFF_TAP | IFF_NO_PI`, as `ip tuntap add mode
/// tap` does) and makes it persistent, so QEMU can attach by name.
pub fn create_persistent_tap(name: &str) -> io::Result<()> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let tun = OwnedFd::from(tun);
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    ioctl(&tun, TUNSETIFF, &mut r)?;
    // SAFETY: TUNSETPERSIST takes an integer argument, no pointer.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Adds interface `port` to bridge `bridge`.
pub fn bridge_add_if(bridge: &str, port: &str) -> io::Result<()> {
    let cname =
        std::ffi::CString::new(port).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let mut r = ifreq(bridge)?;
    r.ifr_ifru.ifru_ifindex = index as libc::c_int;
    ioctl(&inet_socket()?, SIOCBRADDIF, &mut r)
}

/// Sets `IFF_UP` on an interface.
pub fn set_up(name: &str) -> io::Result<()> {
    let s = inet_socket()?;
    let mut r = ifreq(name)?;
    ioctl(&s, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(&s, libc::SIOCSIFFLAGS, &mut r)
}
