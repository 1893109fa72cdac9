//! The page server's wire decoders (`dom0_memtap::wire`): requests, which
//! a page server reads from other hosts, and reply headers, which memtap
//! reads from page servers.
#![no_main]

use dom0_memtap::wire::{
    data_len, decode_reply, decode_request, encode_reply_with, encode_request_with,
    valid_generation_name, Asker, MAX_NAME, MAX_PAGES, REPLY_LEN, REQUEST_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut req = [0u8; REQUEST_LEN];
    let n = data.len().min(REQUEST_LEN);
    req[..n].copy_from_slice(&data[..n]);
    match decode_request(&req) {
        Ok(r) => {
            assert!(valid_generation_name(&r.name), "{:?}", r.name);
            assert!(!r.name.is_empty() && r.name.len() <= MAX_NAME);
            assert!((1..=MAX_PAGES).contains(&r.count));
            // An accepted request is in canonical form: it re-encodes to
            // exactly the bytes that were read.
            let asker = Asker {
                flags: r.flags,
                mcast_received: r.mcast_received,
                host: r.host,
            };
            assert_eq!(encode_request_with(&r.name, r.first, r.count, asker), req);
        }
        Err((first, count)) => {
            // The echo is zeros or the request's own fields.
            let f = u64::from_le_bytes(req[72..80].try_into().unwrap());
            let c = u32::from_le_bytes(req[80..84].try_into().unwrap());
            assert!((first, count) == (0, 0) || (first, count) == (f, c));
        }
    }

    let mut rep = [0u8; REPLY_LEN];
    let tail = &data[n..];
    let m = tail.len().min(REPLY_LEN);
    rep[..m].copy_from_slice(&tail[..m]);
    if let Some(r) = decode_reply(&rep) {
        let again = encode_reply_with(r.status, r.first, r.count, r.mcast_sent);
        assert_eq!(again, rep);
        assert_eq!(decode_reply(&again), Some(r));
        let _ = data_len(r.count);
    }
});
