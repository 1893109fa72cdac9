//! The multicast page datagram (`dom0_memtap::mcast::open`), which every
//! clone host reads from its network: whatever arrives, it is refused or
//! opened without a panic, and an opened datagram reseals to itself.
#![no_main]

use dom0_memtap::mcast::{open, seal, McastKey, DATAGRAM_LEN};
use libfuzzer_sys::fuzz_target;
use snowflock_proto::auth::ClusterKey;

fuzz_target!(|data: &[u8]| {
    let key = McastKey::new(&ClusterKey::from_bytes(&[0x5a; 32]).expect("key"));
    // Random bytes: refused (a MAC cannot be guessed).
    assert!(open(&key, data).is_err() || data.len() == DATAGRAM_LEN);
    // A sealed page made from the input opens to what was sealed, and any
    // one flipped byte is refused.
    let mut page = [0u8; 4096];
    let n = data.len().min(4096);
    page[..n].copy_from_slice(&data[..n]);
    let mut d = [0u8; DATAGRAM_LEN];
    seal(&key, "h0.p-g1", n as u64, 7, &page, &mut d);
    let p = open(&key, &d).expect("a sealed datagram opens");
    assert_eq!((p.generation, p.page, p.seq), ("h0.p-g1", n as u64, 7));
    assert_eq!(p.data, &page[..]);
    let at = data.first().map_or(0, |&b| b as usize * 16) % DATAGRAM_LEN;
    d[at] ^= 0x01;
    assert!(open(&key, &d).is_err());
});
