//! Where a clone finds its parent on the flock network.

use std::net::Ipv4Addr;

/// An address [`parent_addr`] cannot work with.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("Bad prefix length in {0:?}")]
    Prefix(String),
    #[error("Not an IPv4 address: {0:?}")]
    NotIpv4(String),
    #[error("Prefix /{prefix} of {ip:?} leaves no room for a parent host")]
    NoRoom { prefix: u32, ip: String },
}

/// The parent's address for a clone whose address is `ip` (`A.B.C.D` or
/// `A.B.C.D/P`, as `id().ip` gives it): the first host of the clone's subnet.
/// On a flock's `/24` that is the clone's address with the last octet
/// replaced by 1; without a prefix, a `/24` is assumed.
pub fn parent_addr(ip: &str) -> Result<Ipv4Addr, AddrError> {
    let (addr, prefix) = match ip.trim().split_once('/') {
        Some((a, p)) => {
            let p: u32 = p.parse().map_err(|_| AddrError::Prefix(ip.to_string()))?;
            (a, p)
        }
        None => (ip.trim(), 24),
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| AddrError::NotIpv4(ip.to_string()))?;
    if prefix > 30 {
        return Err(AddrError::NoRoom {
            prefix,
            ip: ip.to_string(),
        });
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ok(Ipv4Addr::from((u32::from(addr) & mask) | 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_host_of_the_subnet() {
        assert_eq!(
            parent_addr("10.250.3.5/24").unwrap(),
            Ipv4Addr::new(10, 250, 3, 1)
        );
        assert_eq!(
            parent_addr("10.250.3.1/24").unwrap(),
            Ipv4Addr::new(10, 250, 3, 1)
        );
        assert_eq!(
            parent_addr("10.250.17.255/24").unwrap(),
            Ipv4Addr::new(10, 250, 17, 1)
        );
        assert_eq!(
            parent_addr("10.250.3.6").unwrap(),
            Ipv4Addr::new(10, 250, 3, 1)
        );
        assert_eq!(
            parent_addr(" 10.250.3.6/24\n").unwrap(),
            Ipv4Addr::new(10, 250, 3, 1)
        );
        assert_eq!(
            parent_addr("10.1.2.3/16").unwrap(),
            Ipv4Addr::new(10, 1, 0, 1)
        );
        assert_eq!(
            parent_addr("127.0.0.5/8").unwrap(),
            Ipv4Addr::new(127, 0, 0, 1)
        );
        assert_eq!(
            parent_addr("192.168.1.70/26").unwrap(),
            Ipv4Addr::new(192, 168, 1, 65)
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "10.250.3",
            "fe80::1/64",
            "10.250.3.5/x",
            "10.250.3.5/33",
            "10.250.3.5/31",
            "host/24",
        ] {
            assert!(parent_addr(bad).is_err(), "{bad}");
        }
    }
}
