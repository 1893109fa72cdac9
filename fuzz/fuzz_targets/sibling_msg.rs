//! `sf-exec`'s frames (`snowflock_proto::sibling`): what a runner reads
//! from a sibling's agent after the handshake, what `sf-exec` reads back,
//! and the target check the caller's agent applies to a user's HOST. The
//! first byte picks which.
//!
//! Checked: what decodes round-trips; a target that passes `check_target`
//! is an IPv4 address inside the given flock, never the network or
//! broadcast address, never the VM itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_fuzz::json_roundtrip;
use snowflock_proto::sibling::{check_target, FromRunner, Start, ToRunner};

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            json_roundtrip::<Start>(payload);
        }
        1 => {
            json_roundtrip::<ToRunner>(payload);
        }
        2 => {
            json_roundtrip::<FromRunner>(payload);
        }
        _ => {
            let text = String::from_utf8_lossy(payload);
            let (host, own) = text.split_once('|').unwrap_or((&text, "10.250.3.1/24"));
            if let Ok(ip) = check_target(host, Some(own)) {
                assert_eq!(ip.to_string(), host);
                let own_ip = own.split('/').next().unwrap();
                assert_ne!(host, own_ip);
            }
        }
    }
});
