//! The multicast page datagram (mcdist, version 1): one page of one
//! generation, authenticated under a subkey of the cluster key.
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"SFPM"` |
//! | 4 | 2 | version = 1 |
//! | 6 | 2 | name length, 1..=64 |
//! | 8 | 64 | generation name, zero padded |
//! | 72 | 8 | page number |
//! | 80 | 8 | sequence: the sender's datagram count for this generation |
//! | 88 | 4096 | the page |
//! | 4184 | 32 | HMAC-SHA256 of bytes 0..4184 under [`McastKey`] |
//!
//! [`DATAGRAM_LEN`] = 4216 bytes. A datagram of any other length, magic,
//! version, name or MAC is refused by [`open`]; whether the page belongs
//! to the receiver's generation and lies inside it is the receiver's check
//! (it knows the generation).
//!
//! One page per datagram: a lost IP fragment loses one page, never a run.

use crate::wire::{valid_generation_name, MAX_NAME};
use crate::PAGE_SIZE;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use snowflock_proto::auth::ClusterKey;
use std::net::Ipv4Addr;

/// Magic of a page datagram.
pub const MAGIC: [u8; 4] = *b"SFPM";
/// Datagram format version.
pub const VERSION: u16 = 1;
/// Header bytes before the page.
pub const HEADER_LEN: usize = 88;
/// MAC bytes after the page.
pub const MAC_LEN: usize = 32;
/// Size of every page datagram.
pub const DATAGRAM_LEN: usize = HEADER_LEN + PAGE_SIZE as usize + MAC_LEN;

/// Label of the subkey that MACs page datagrams.
const SUBKEY_LABEL: &[u8] = b"mcdist page datagram v1";

/// The key page datagrams are MACed with: a subkey of the cluster key
/// (see [`ClusterKey::subkey`]). Cheap to clone; keying is done once.
#[derive(Clone)]
pub struct McastKey(Hmac<Sha256>);

impl std::fmt::Debug for McastKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("McastKey(<secret>)")
    }
}

impl McastKey {
    /// The datagram key of a cluster.
    pub fn new(cluster: &ClusterKey) -> McastKey {
        let k = cluster.subkey(SUBKEY_LABEL);
        McastKey(<Hmac<Sha256> as KeyInit>::new_from_slice(&k).expect("HMAC takes any key length"))
    }

    fn tag(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut m = self.0.clone();
        m.update(data);
        m.finalize().into_bytes().into()
    }
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("wrong length")]
    Length,
    #[error("not a page datagram (magic or version)")]
    Magic,
    #[error("malformed generation name")]
    Name,
    #[error("MAC does not verify (forged, corrupted or another cluster's)")]
    Mac,
}

/// A datagram that passed [`open`].
#[derive(Debug, PartialEq, Eq)]
pub struct Page<'a> {
    pub generation: &'a str,
    pub page: u64,
    pub seq: u64,
    pub data: &'a [u8],
}

/// Builds the datagram for `page` of `generation` into `out`
/// ([`DATAGRAM_LEN`] bytes). `data` is one page.
pub fn seal(
    key: &McastKey,
    generation: &str,
    page: u64,
    seq: u64,
    data: &[u8],
    out: &mut [u8; DATAGRAM_LEN],
) {
    debug_assert_eq!(data.len(), PAGE_SIZE as usize);
    out[..HEADER_LEN].fill(0);
    out[0..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&VERSION.to_le_bytes());
    let n = generation.len().min(MAX_NAME);
    out[6..8].copy_from_slice(&(n as u16).to_le_bytes());
    out[8..8 + n].copy_from_slice(&generation.as_bytes()[..n]);
    out[72..80].copy_from_slice(&page.to_le_bytes());
    out[80..88].copy_from_slice(&seq.to_le_bytes());
    out[HEADER_LEN..HEADER_LEN + PAGE_SIZE as usize].copy_from_slice(data);
    let tag = key.tag(&out[..HEADER_LEN + PAGE_SIZE as usize]);
    out[HEADER_LEN + PAGE_SIZE as usize..].copy_from_slice(&tag);
}

/// Checks a received datagram: length, magic, version, name, MAC.
pub fn open<'a>(key: &McastKey, d: &'a [u8]) -> Result<Page<'a>, Refused> {
    if d.len() != DATAGRAM_LEN {
        return Err(Refused::Length);
    }
    if d[0..4] != MAGIC || u16::from_le_bytes([d[4], d[5]]) != VERSION {
        return Err(Refused::Magic);
    }
    let body = HEADER_LEN + PAGE_SIZE as usize;
    // The MAC first: nothing of a forged datagram is interpreted.
    let mut m = key.0.clone();
    m.update(&d[..body]);
    m.verify_slice(&d[body..]).map_err(|_| Refused::Mac)?;
    let n = u16::from_le_bytes([d[6], d[7]]) as usize;
    if n == 0 || n > MAX_NAME || d[8 + n..72].iter().any(|&b| b != 0) {
        return Err(Refused::Name);
    }
    let generation = std::str::from_utf8(&d[8..8 + n]).map_err(|_| Refused::Name)?;
    if !valid_generation_name(generation) {
        return Err(Refused::Name);
    }
    let word = |a: usize| u64::from_le_bytes(d[a..a + 8].try_into().expect("8 bytes"));
    Ok(Page {
        generation,
        page: word(72),
        seq: word(80),
        data: &d[HEADER_LEN..body],
    })
}

/// The multicast group of a generation: an address of the
/// organization-local scope 239.192.0.0/14 (RFC 2365) chosen by a hash of
/// the name, so origin and clone hosts agree without telling each other.
/// Two generations may share a group; receivers tell them apart by name.
pub fn group_of(generation: &str) -> Ipv4Addr {
    // FNV-1a: stable across builds and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in generation.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    let low = h & 0x0003_ffff; // 18 bits
    Ipv4Addr::from(0xefc0_0000 | low)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> McastKey {
        McastKey::new(&ClusterKey::from_bytes(&[7u8; 32]).unwrap())
    }

    fn sealed(name: &str, page: u64) -> [u8; DATAGRAM_LEN] {
        let data: Vec<u8> = (0..PAGE_SIZE).map(|i| (i as u8) ^ page as u8).collect();
        let mut out = [0u8; DATAGRAM_LEN];
        seal(&key(), name, page, 9, &data, &mut out);
        out
    }

    #[test]
    fn roundtrip() {
        let d = sealed("h0.p-g1", 77);
        let p = open(&key(), &d).unwrap();
        assert_eq!(p.generation, "h0.p-g1");
        assert_eq!((p.page, p.seq), (77, 9));
        assert_eq!(p.data[1], 1 ^ 77);
    }

    #[test]
    fn refuses_what_it_should() {
        let d = sealed("h0.p-g1", 3);
        assert_eq!(open(&key(), &d[..DATAGRAM_LEN - 1]), Err(Refused::Length));
        let mut m = d;
        m[0] = b'X';
        assert_eq!(open(&key(), &m), Err(Refused::Magic));
        for at in [8, 72, 80, 100, 4000, DATAGRAM_LEN - 1] {
            let mut c = d;
            c[at] ^= 1;
            assert_eq!(open(&key(), &c), Err(Refused::Mac), "byte {at}");
        }
        let other = McastKey::new(&ClusterKey::from_bytes(&[8u8; 32]).unwrap());
        assert_eq!(open(&other, &d), Err(Refused::Mac));
        // A valid MAC over a bad name (a sender bug) is still refused.
        let mut bad = [0u8; DATAGRAM_LEN];
        seal(&key(), "a/b", 1, 0, &[0u8; 4096], &mut bad);
        assert_eq!(open(&key(), &bad), Err(Refused::Name));
    }

    #[test]
    fn groups_are_organization_local_and_stable() {
        let g = group_of("h0.p-g1");
        assert_eq!(g, group_of("h0.p-g1"));
        assert_eq!(g.octets()[0], 239);
        assert_eq!(g.octets()[1] & 0xfc, 192);
        assert_ne!(group_of("h0.p-g1"), group_of("h0.p-g2"));
    }
}
