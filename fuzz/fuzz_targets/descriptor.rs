//! The VM descriptor decoder (`snowflock_descriptor::Descriptor::decode`),
//! which reads descriptors from files and from other hosts.
//!
//! The header's checksum (FNV-1a 64 of everything after the 32-byte
//! header) is recomputed here, so inputs reach the metadata parser and
//! the validation behind it. Unless bit 15 of the header's `flags` (which
//! the decoder ignores) is set, the section lengths are fixed up as well
//! so that they add up to the input's length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_descriptor::{Descriptor, MAX_DESCRIPTOR};

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100000001b3)
    })
}

fn u32_at(b: &[u8], off: usize) -> usize {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as usize
}

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    if b.len() >= 32 {
        let rest = b.len() - 32;
        let flags = u16::from_le_bytes([b[10], b[11]]);
        if flags & 0x8000 == 0 {
            let ml = u32_at(&b, 12).min(rest);
            let sl = u32_at(&b, 16).min(rest - ml);
            let hl = rest - ml - sl;
            b[12..16].copy_from_slice(&(ml as u32).to_le_bytes());
            b[16..20].copy_from_slice(&(sl as u32).to_le_bytes());
            b[20..24].copy_from_slice(&(hl as u32).to_le_bytes());
        }
        let sum = fnv1a(&b[32..]);
        b[24..32].copy_from_slice(&sum.to_le_bytes());
    }
    let Ok(d) = Descriptor::decode(&b) else {
        return;
    };
    // What decodes is valid, re-encodes within the size cap, and comes
    // back the same; the re-encoding is stable.
    d.validate().expect("decoded descriptor is valid");
    assert_eq!(d.holes.len() as u64, d.pages());
    let enc = d.encode().expect("decoded descriptor re-encodes");
    assert!(enc.len() <= MAX_DESCRIPTOR);
    assert!(
        enc.len() <= b.len(),
        "re-encoding grew: {} > {}",
        enc.len(),
        b.len()
    );
    let back = Descriptor::decode(&enc).expect("own encoding decodes");
    assert_eq!(back, d);
    assert_eq!(back.encode().unwrap(), enc, "encoding is not stable");
});
