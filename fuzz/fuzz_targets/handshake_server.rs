//! The server side of the cluster-key handshake (`server_blocking` and
//! `server_async` of `snowflock_proto::auth`) fed arbitrary bytes as the
//! client's RESPONSE.
//!
//! Input: `mode` byte, then bytes. Mode even: the bytes are the client's
//! whole stream. Mode odd: the peer is an honest client (it answers the
//! server's HELLO with the right RESPONSE), XORed with the bytes as a mask
//! and cut to `mode / 2` bytes if that is under 64.
//!
//! Checked: the server sends a 40-byte HELLO with the magic, then after a
//! whole RESPONSE exactly one CONFIRM/REJECT of 33 bytes; it accepts only
//! the unmodified honest RESPONSE (and its CONFIRM then satisfies the
//! client); a short RESPONSE is an I/O error with nothing more sent; the
//! blocking and async drivers behave the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_fuzz::{auth_kind, block_on, Peer, KEY};
use snowflock_proto::auth::{
    self, ClientHandshake, ClusterKey, CONFIRM_LEN, HELLO_LEN, REJECT, RESPONSE_LEN,
};
use std::sync::Mutex;

/// The scripted client: bytes for the server to read, from what it wrote.
type Answer<'a> = dyn FnMut(&[u8]) -> Option<Vec<u8>> + 'a;
/// A driver's result and everything it wrote.
type Outcome = (Result<(), auth::AuthError>, Vec<u8>);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let key = ClusterKey::from_bytes(&KEY).unwrap();
    let honest = mode & 1 == 1;
    let cut = ((mode / 2) as usize).min(RESPONSE_LEN);
    let clean = honest && cut == RESPONSE_LEN && bytes.iter().take(RESPONSE_LEN).all(|&b| b == 0);

    let run = |drive: &dyn Fn(&mut Answer) -> Outcome| {
        let client: Mutex<Option<ClientHandshake>> = Mutex::new(None);
        let mut sent = false;
        let mut answer = |written: &[u8]| -> Option<Vec<u8>> {
            if sent {
                return None;
            }
            sent = true;
            if !honest {
                return Some(bytes.to_vec());
            }
            let hello: [u8; HELLO_LEN] = written.get(..HELLO_LEN)?.try_into().unwrap();
            let (hs, mut resp) = ClientHandshake::respond(&key, &hello).expect("own HELLO");
            *client.lock().unwrap() = Some(hs);
            for (r, m) in resp.iter_mut().zip(bytes) {
                *r ^= m;
            }
            Some(resp[..cut].to_vec())
        };
        let (r, written) = drive(&mut answer);
        (r, written, client.into_inner().unwrap())
    };

    let (rb, wb, cb) = run(&|a| {
        let mut p = Peer::new(a);
        let r = auth::server_blocking(&mut p, &key);
        (r, p.written)
    });
    let (ra, wa, _) = run(&|a| {
        let mut p = Peer::new(a);
        let r = block_on(auth::server_async(&mut p, &key));
        (r, p.written)
    });

    assert_eq!(auth_kind(&rb), auth_kind(&ra), "blocking and async differ");
    assert_eq!(wb.len(), wa.len());
    for w in [&wb, &wa] {
        assert!(w.len() >= HELLO_LEN);
        assert_eq!(&w[..8], b"SFAUTH1\0");
    }
    let full = if honest {
        cut == RESPONSE_LEN
    } else {
        bytes.len() >= RESPONSE_LEN
    };
    if !full {
        assert_eq!(auth_kind(&rb), "io:UnexpectedEof");
        assert_eq!(wb.len(), HELLO_LEN);
        return;
    }
    assert_eq!(wb.len(), HELLO_LEN + CONFIRM_LEN);
    let reply: [u8; CONFIRM_LEN] = wb[HELLO_LEN..].try_into().unwrap();
    if clean {
        assert!(rb.is_ok(), "honest client refused: {rb:?}");
        cb.expect("client state")
            .check_confirm(&key, &reply)
            .expect("server CONFIRM satisfies the client");
    } else {
        assert_eq!(auth_kind(&rb), "PeerFailed");
        assert_eq!(reply, REJECT);
        assert_eq!(&wa[HELLO_LEN..], &REJECT);
    }
});
