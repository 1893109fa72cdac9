//! The guest channel (`snowflock_proto::channel`): `LineReader` splitting
//! a byte stream into lines, and `decode_line` of `GuestMsg` (what the
//! daemon reads from a guest) and `HostMsg` (what the agent reads).
//!
//! The input is a list of operations so that lines around `MAX_LINE`
//! (1 MiB) are reachable from small inputs (operation byte modulo 4):
//! `0x00 n bytes...` feeds the next `n` bytes as one chunk,
//! `0x01 n0 n1 n2` feeds a run of `n` (24-bit little endian) bytes `x` as
//! one chunk (all runs of an input together at most `2 * MAX_LINE + 2`),
//! `0x02` feeds a newline, `0x03` resets the reader.
//! A simple model of the framing rules is checked against the reader:
//! every newline-terminated line is delivered if it is 1..=MAX_LINE bytes
//! long, reported once as `TooLong` if longer, skipped if empty; an
//! unterminated tail over MAX_LINE bytes is reported once as well.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_fuzz::assert_roundtrip;
use snowflock_proto::channel::{
    decode_line, encode_line, GuestMsg, HostMsg, LineError, LineReader, MAX_LINE,
};

#[derive(Debug, PartialEq)]
enum Ev {
    Line(Vec<u8>),
    TooLong,
}

/// The model: the current partial line and whether it was reported.
#[derive(Default)]
struct Model {
    cur: Vec<u8>,
    reported: bool,
    ev: Vec<Ev>,
}

impl Model {
    /// Same rules as byte-at-a-time, applied per newline-free segment.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let nl = data.iter().position(|&b| b == b'\n');
            let seg = &data[..nl.unwrap_or(data.len())];
            if !self.reported {
                if self.cur.len() + seg.len() > MAX_LINE {
                    self.ev.push(Ev::TooLong);
                    self.cur.clear();
                    self.reported = true;
                } else {
                    self.cur.extend_from_slice(seg);
                }
            }
            match nl {
                Some(p) => {
                    if !self.reported && !self.cur.is_empty() {
                        self.ev.push(Ev::Line(std::mem::take(&mut self.cur)));
                    }
                    self.cur.clear();
                    self.reported = false;
                    data = &data[p + 1..];
                }
                None => data = &[],
            }
        }
    }
}

fn check_message(line: &[u8]) {
    if let Ok(m) = decode_line::<GuestMsg>(line) {
        assert_roundtrip(&m);
        let enc = encode_line(&m);
        assert_eq!(enc.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(enc.last(), Some(&b'\n'));
        assert_eq!(decode_line::<GuestMsg>(&enc[..enc.len() - 1]).unwrap(), m);
    }
    if let Ok(m) = decode_line::<HostMsg>(line) {
        assert_roundtrip(&m);
        let enc = encode_line(&m);
        assert_eq!(enc.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(decode_line::<HostMsg>(&enc[..enc.len() - 1]).unwrap(), m);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = LineReader::new();
    let mut model = Model::default();
    let mut got = Vec::new();
    let mut i = 0;
    let mut chunks = Vec::new();
    let mut checked = 0;
    // Bytes of runs per input: enough for two lines just over MAX_LINE,
    // few enough to keep executions fast.
    let mut budget = 2 * MAX_LINE + 2;
    while i < data.len() {
        let op = data[i];
        i += 1;
        let chunk: Vec<u8> = match op % 4 {
            0 => {
                let n = data.get(i).copied().unwrap_or(0) as usize;
                i += 1;
                let end = (i + n).min(data.len());
                let c = data[i.min(end)..end].to_vec();
                i = end;
                c
            }
            1 => {
                let mut n = [0u8; 4];
                let end = (i + 3).min(data.len());
                n[..end - i].copy_from_slice(&data[i..end]);
                i = end;
                let n = (u32::from_le_bytes(n) as usize).min(budget);
                budget -= n;
                vec![b'x'; n]
            }
            2 => b"\n".to_vec(),
            _ => {
                r.reset();
                model.cur.clear();
                model.reported = false;
                continue;
            }
        };
        model.feed(&chunk);
        r.feed(&chunk, |l| match l {
            Ok(l) => {
                assert!(
                    !l.is_empty() && l.len() <= MAX_LINE,
                    "line of {} bytes",
                    l.len()
                );
                assert!(!l.contains(&b'\n'));
                got.push(Ev::Line(l.to_vec()));
            }
            Err(LineError::TooLong(n)) => {
                assert!(n > MAX_LINE);
                got.push(Ev::TooLong);
            }
            Err(e) => panic!("unexpected {e:?}"),
        });
        chunks.push(chunk.len());
        assert_eq!(got.len(), model.ev.len(), "chunks {chunks:?}");
        assert!(got[checked..] == model.ev[checked..], "chunks {chunks:?}");
        checked = got.len();
    }
    for e in &got {
        if let Ev::Line(l) = e {
            check_message(l);
        }
    }
});
