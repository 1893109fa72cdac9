//! The length-prefixed frame reader (`snowflock_proto::frame`), blocking
//! and tokio versions, on a stream of frames. The first input byte picks
//! the message type; the rest is the stream.
//!
//! Checked: both readers give the same outcome and consume the same
//! bytes; a frame is accepted only if its length is at most `MAX_FRAME`
//! and the whole body was there; `TooLarge` only for lengths above the
//! cap; `Closed` only at a clean end between frames; what decodes round-trips through `encode` and `read_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use snowflock_fuzz::{assert_roundtrip, block_on};
use snowflock_proto::admin::{AdminRequest, AdminResponse, ExecInput};
use snowflock_proto::api::{ApiRequest, ApiResponse};
use snowflock_proto::frame::{self, FrameError, MAX_FRAME};
use std::fmt::Debug;

fn kind(e: &FrameError) -> String {
    match e {
        FrameError::Io(e) => format!("io:{:?}", e.kind()),
        FrameError::Malformed(_) => "malformed".into(),
        e => format!("{e:?}"),
    }
}

fn frames<T: Serialize + DeserializeOwned + PartialEq + Debug>(stream: &[u8]) {
    let mut sync: &[u8] = stream;
    let mut asyn: &[u8] = stream;
    loop {
        let before = sync.len();
        let a = frame::read_frame::<_, T>(&mut sync);
        let b = block_on(frame::tokio_io::read_frame::<_, T>(&mut asyn));
        match (&a, &b) {
            (Ok(x), Ok(y)) => assert_eq!(x, y),
            (Err(x), Err(y)) => assert_eq!(kind(x), kind(y)),
            _ => panic!("blocking {a:?} but async {b:?}"),
        }
        if !matches!(a, Err(FrameError::Io(_))) {
            assert_eq!(sync.len(), asyn.len(), "readers consumed different amounts");
        }
        let at = &stream[stream.len() - before..];
        let announced = at
            .get(..4)
            .map(|l| u32::from_le_bytes(l.try_into().unwrap()) as usize);
        match a {
            Ok(v) => {
                let len = announced.unwrap();
                assert!(len <= MAX_FRAME);
                assert_eq!(before - sync.len(), 4 + len, "consumed != 4 + length");
                assert_roundtrip(&v);
                let enc = frame::encode(&v);
                let back: T = frame::read_frame(&mut &enc[..]).expect("own frame reads back");
                assert_eq!(back, v);
            }
            Err(FrameError::TooLarge(n)) => {
                assert!(n > MAX_FRAME);
                assert_eq!(Some(n), announced);
                return;
            }
            Err(FrameError::Closed) => {
                // Only a clean end between frames is `Closed`; a cut
                // length prefix is a truncated frame.
                assert_eq!(before, 0, "Closed with {before} bytes left");
                return;
            }
            Err(FrameError::Malformed(_)) => {
                assert_eq!(before - sync.len(), 4 + announced.unwrap());
            }
            Err(FrameError::Io(_)) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, stream)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => frames::<ApiRequest>(stream),
        1 => frames::<ApiResponse>(stream),
        2 => frames::<AdminRequest>(stream),
        3 => frames::<AdminResponse>(stream),
        4 => frames::<ExecInput>(stream),
        _ => frames::<serde_json::Value>(stream),
    }
});
