//! The client side of the cluster-key handshake (`client_blocking` and
//! `client_async` of `snowflock_proto::auth`) fed arbitrary HELLO and
//! CONFIRM bytes.
//!
//! Input: `mode` byte, 40 HELLO bytes, 33 CONFIRM mask bytes (missing
//! bytes are zero, and cut the message there when `mode & 2`). Mode bit 0
//! set: the HELLO's first 8 bytes are replaced by the magic. The peer
//! sends the HELLO, reads the client's RESPONSE, and sends the CONFIRM an
//! honest server would (computed here from the protocol description),
//! XORed with the mask.
//!
//! Checked: the client's RESPONSE carries a correct MAC for the HELLO's
//! nonce; the outcome is exactly the one the protocol prescribes
//! (`ClosedByServer` for a cut message, `Malformed` for a bad magic or
//! status byte, `Rejected` for status 0, `ServerNotProven` for a wrong
//! MAC, success only for the unmodified CONFIRM); blocking and async agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_fuzz::{auth_kind, block_on, hmac, Peer, KEY};
use snowflock_proto::auth::{self, ClusterKey, CONFIRM_LEN, HELLO_LEN, RESPONSE_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key = ClusterKey::from_bytes(&KEY).unwrap();
    let cut_short = mode & 2 != 0;
    let mut hello = rest[..rest.len().min(HELLO_LEN)].to_vec();
    if !cut_short {
        hello.resize(HELLO_LEN, 0);
    }
    if mode & 1 == 1 && hello.len() >= 8 {
        hello[..8].copy_from_slice(b"SFAUTH1\0");
    }
    let rest = &rest[rest.len().min(HELLO_LEN)..];
    let mut mask = rest[..rest.len().min(CONFIRM_LEN)].to_vec();
    if !cut_short {
        mask.resize(CONFIRM_LEN, 0);
    }

    let answer = |written: &[u8], step: &mut u8| -> Option<Vec<u8>> {
        *step += 1;
        match *step {
            1 => Some(hello.clone()),
            2 if written.len() == RESPONSE_LEN => {
                let (nc, tag) = written.split_at(32);
                let ns = &hello[8..HELLO_LEN];
                assert_eq!(tag, hmac(&KEY, b"client", ns, nc), "client MAC is wrong");
                let mut confirm = vec![1u8];
                confirm.extend_from_slice(&hmac(&KEY, b"server", ns, nc));
                confirm.truncate(mask.len());
                for (c, m) in confirm.iter_mut().zip(&mask) {
                    *c ^= m;
                }
                Some(confirm)
            }
            _ => None,
        }
    };

    let mut step = 0;
    let mut p = Peer::new(|w: &[u8]| answer(w, &mut step));
    let rb = auth::client_blocking(&mut p, &key);
    let wb = p.written;
    let mut step = 0;
    let mut p = Peer::new(|w: &[u8]| answer(w, &mut step));
    let ra = block_on(auth::client_async(&mut p, &key));
    let wa = p.written;
    assert_eq!(auth_kind(&rb), auth_kind(&ra), "blocking and async differ");
    assert_eq!(wb.len(), wa.len());

    let expected = if hello.len() < HELLO_LEN {
        "ClosedByServer"
    } else if &hello[..8] != b"SFAUTH1\0" {
        "Malformed"
    } else if mask.len() < CONFIRM_LEN {
        "ClosedByServer"
    } else {
        match 1 ^ mask[0] {
            0 => "Rejected",
            1 if mask[1..].iter().all(|&m| m == 0) => "ok",
            1 => "ServerNotProven",
            _ => "Malformed",
        }
    };
    assert_eq!(auth_kind(&rb), expected);
    let sent = if hello.len() == HELLO_LEN && &hello[..8] == b"SFAUTH1\0" {
        RESPONSE_LEN
    } else {
        0
    };
    assert_eq!(
        wb.len(),
        sent,
        "the client sends one RESPONSE, nothing else"
    );
});
