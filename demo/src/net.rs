//! Where a clone finds its parent on the flock network.

use std::net::Ipv4Addr;

/// The parent's address for a clone whose address is `ip` (`A.B.C.D` or
/// `A.B.C.D/P`, as `id().ip` gives it): the first host of the clone's subnet.
/// On a flock's `/24` that is the clone's address with the last octet
/// replaced by 1; without a prefix, a `/24` is assumed.
pub fn parent_addr(ip: &str) -> Result<Ipv4Addr, String> {
    let (addr, prefix) = match ip.trim().split_once('/') {
        Some((a, p)) => {
            let p: u32 = p
                .parse()
                .map_err(|_| format!("Bad prefix length in {ip:?}"))?;
            (a, p)
        }
        None => (ip.trim(), 24),
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("Not an IPv4 address: {ip:?}"))?;
    if prefix > 30 {
        return Err(format!(
            "Prefix /{prefix} of {ip:?} leaves no room for a parent host"
        ));
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
