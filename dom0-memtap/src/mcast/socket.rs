//! The UDP sockets of mcdist, made with `socket2` (well kept, and it sets
//! the options std's `UdpSocket` lacks before binding).
//!
//! May import: `sys`, the crate root.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

/// Receive buffer of a group socket: a few 256-page answers.
const RECV_BUFFER: usize = 8 << 20;

/// A socket that sends to groups from `iface` (TTL 1: the cluster's own
/// link; loopback of our own datagrams off).
pub fn sender(iface: Option<Ipv4Addr>) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_multicast_ttl_v4(1)?;
    s.set_multicast_loop_v4(false)?;
    if let Some(a) = iface {
        s.set_multicast_if_v4(&a)?;
        s.bind(&SockAddr::from(SocketAddrV4::new(a, 0)))?;
    }
    // Bursts of pages: a large send buffer, the pacing is ours.
    let _ = s.set_send_buffer_size(4 << 20);
    Ok(s.into())
}

/// A socket bound to `group:port` and joined to `group` on `iface`; it
/// receives that group's datagrams only. Reads time out after `poll`, so a
/// receiving thread can notice it should end.
pub fn receiver(
    group: Ipv4Addr,
    port: u16,
    iface: Option<Ipv4Addr>,
    poll: Duration,
) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Generations whose names hash to one group share it, on one host too.
    s.set_reuse_address(true)?;
    s.set_multicast_all_v4(false)?;
    // Bursts of a 256-page answer: past rmem_max when allowed (root).
    if !crate::sys::force_recv_buffer(std::os::fd::AsFd::as_fd(&s), RECV_BUFFER) {
        let _ = s.set_recv_buffer_size(RECV_BUFFER);
    }
    s.bind(&SockAddr::from(SocketAddrV4::new(group, port)))?;
    s.join_multicast_v4(&group, &iface.unwrap_or(Ipv4Addr::UNSPECIFIED))?;
    s.set_read_timeout(Some(poll))?;
    Ok(s.into())
}
