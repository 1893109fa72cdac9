//! The guest channel: guest agent <-> host daemon over virtio-serial.
//!
//! Framing is newline-delimited JSON, one message per line, at most
//! [`MAX_LINE`] bytes. Unlike the Unix sockets this channel survives a clone:
//! a clone resumes with whatever the parent's virtio-serial queues held, and
//! the host end is a fresh connection. Newline framing lets either side
//! resynchronise by dropping bytes up to the next newline, where a length
//! prefix would leave it lost mid-stream.
//!
//! ```text
//!  agent                                   snowflockd
//!    |<----------------- Hello ----------------|   on every (re)connect
//!    |------------------ Hello --------------->|
//!    |-- Request{id, ApiRequest} ------------->|   app called the API
//!    |<------------- Response{id, ApiResponse}-|   parent / ordinary calls
//!    |<---- BecomeClone{request_id, identity} -|   first message a clone gets
//!    |------------ Ready{clone_id} ----------->|   identity applied
//!    |<- ExecStart / ExecStdin / ExecKill -----|   `snowflock vm exec`
//!    |--- ExecOutput / ExecExit -------------->|
//! ```

use crate::api::{ApiRequest, ApiResponse};
use serde::{Deserialize, Serialize};

/// Longest accepted line, newline excluded.
pub const MAX_LINE: usize = 1 << 20;
/// Largest exec output/stdin chunk carried by one message.
pub const MAX_CHUNK: usize = 32 * 1024;

/// Output stream of an exec'd process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Everything a clone must change so it differs from its parent and siblings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneIdentity {
    /// 1..=m.
    pub clone_id: u32,
    pub ticket: String,
    /// VM name on the host, e.g. `vm1-t3f-c2`.
    pub vm: String,
    pub hostname: String,
    /// 32 lowercase hex digits, written to `/etc/machine-id`.
    pub machine_id: String,
    /// `aa:bb:cc:dd:ee:ff`, set on eth0.
    pub mac: String,
    /// `10.250.3.12/24`, set on eth0.
    pub ip_cidr: String,
    /// Fresh host randomness to mix into (and credit to) the guest RNG.
    #[serde(with = "crate::b64")]
    pub seed: Vec<u8>,
    /// Host wall clock, nanoseconds since the Unix epoch, when sent.
    pub unix_time_ns: u64,
}

/// Messages from the guest agent to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum GuestMsg {
    /// Handshake answer: agent version and the protocol versions it speaks.
    /// `instance` is random per agent process (0 = unknown): a new value
    /// means the agent restarted and lost its exec sessions.
    Hello {
        version: u32,
        agent: String,
        clone_id: u32,
        #[serde(default)]
        instance: u64,
    },
    /// An application API call, tagged with an agent-chosen id.
    Request { id: u64, req: ApiRequest },
    /// The identity in `BecomeClone` was applied; the clone is running.
    Ready { clone_id: u32 },
    /// Applying the identity failed (the host treats the clone as lost).
    CloneFailed { clone_id: u32, message: String },
    /// Output of an exec'd process.
    ExecOutput {
        exec: u64,
        stream: Stream,
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// The exec'd process ended with `code` (128+signal when killed).
    ExecExit { exec: u64, code: i32 },
    /// The exec could not be started.
    ExecError { exec: u64, message: String },
    /// Reply to `Ping`.
    Pong { seq: u64 },
}

/// Messages from the host to the guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum HostMsg {
    /// Sent on every connect; the agent answers with `GuestMsg::Hello`.
    Hello { version: u32 },
    /// Answer to `GuestMsg::Request{id}`.
    Response { id: u64, resp: ApiResponse },
    /// Sent to a fresh clone: apply `identity`, then answer the pending clone
    /// request `request_id` with `Cloned{clone_id}` and send `Ready`.
    BecomeClone {
        request_id: u64,
        identity: CloneIdentity,
    },
    /// Run `argv` (no shell) with `env` added to the agent's environment.
    ExecStart {
        exec: u64,
        argv: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
    },
    /// Stdin for an exec; `eof` closes the process's stdin after `data`.
    ExecStdin {
        exec: u64,
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
        eof: bool,
    },
    /// Kill an exec'd process (SIGKILL).
    ExecKill { exec: u64 },
    /// Liveness probe.
    Ping { seq: u64 },
}

/// Errors of line decoding.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The line is longer than [`MAX_LINE`].
    #[error("Line of {0} bytes exceeds {MAX_LINE}")]
    TooLong(usize),
    /// The line is not a valid message.
    #[error("Malformed channel message")]
    Malformed(#[source] serde_json::Error),
}

/// Serialises a message as one line, newline included.
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).expect("protocol types always serialize");
    debug_assert!(!v.contains(&b'\n'));
    v.push(b'\n');
    v
}

/// Splits a byte stream into lines, bounding the memory a peer can make it use.
///
/// Bytes of an over-long line are dropped up to the next newline and
/// reported once as [`LineError::TooLong`].
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
    discarding: bool,
}

impl LineReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; calls `on_line` for each complete line (without `\n`).
    ///
    /// Lines of 1..=[`MAX_LINE`] bytes are passed on; empty lines are
    /// skipped; a longer line is reported once as [`LineError::TooLong`]
    /// (as soon as it is known to be too long) and dropped up to its
    /// newline. At most [`MAX_LINE`] bytes are buffered.
    pub fn feed(&mut self, mut data: &[u8], mut on_line: impl FnMut(Result<&[u8], LineError>)) {
        while !data.is_empty() {
            let newline = data.iter().position(|&b| b == b'\n');
            let part = &data[..newline.unwrap_or(data.len())];
            if !self.discarding {
                let len = self.buf.len() + part.len();
                if len > MAX_LINE {
                    on_line(Err(LineError::TooLong(len)));
                    self.buf.clear();
                    self.discarding = true;
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            match newline {
                Some(pos) => {
                    if !self.discarding && !self.buf.is_empty() {
                        on_line(Ok(&self.buf));
                    }
                    self.buf.clear();
                    self.discarding = false;
                    data = &data[pos + 1..];
                }
                None => data = &[],
            }
        }
    }

    /// Drops any partial line (used when the peer reconnects).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.discarding = false;
    }
}

/// Parses one line as a message.
pub fn decode_line<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, LineError> {
    serde_json::from_slice(line).map_err(LineError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_roundtrip_across_chunks() {
        let m = HostMsg::ExecStdin {
            exec: 1,
            data: b"a\nb".to_vec(),
            eof: true,
        };
        let bytes = [encode_line(&m), encode_line(&HostMsg::Ping { seq: 9 })].concat();
        let mut r = LineReader::new();
        let mut got = Vec::new();
        for chunk in bytes.chunks(5) {
            r.feed(chunk, |l| {
                got.push(decode_line::<HostMsg>(l.unwrap()).unwrap())
            });
        }
        assert_eq!(got, vec![m, HostMsg::Ping { seq: 9 }]);
    }

    #[test]
    fn overlong_line_is_dropped_and_stream_resyncs() {
        let mut r = LineReader::new();
        let mut errs = 0;
        let mut ok = Vec::new();
        let junk = vec![b'x'; MAX_LINE + 10];
        r.feed(&junk, |l| match l {
            Err(_) => errs += 1,
            Ok(l) => ok.push(l.to_vec()),
        });
        r.feed(b"more junk\n{\"t\":\"ping\",\"seq\":1}\n", |l| match l {
            Err(_) => errs += 1,
            Ok(l) => ok.push(l.to_vec()),
        });
        assert_eq!(errs, 1);
        assert_eq!(ok, vec![br#"{"t":"ping","seq":1}"#.to_vec()]);
    }

    #[test]
    fn random_bytes_never_panic_and_memory_stays_bounded() {
        let mut next = crate::test_rng(0x2545f4914f6cdd1d);
        let mut r = LineReader::new();
        let valid = encode_line(&GuestMsg::Pong { seq: 1 });
        for round in 0..3000 {
            let len = (next() % 512) as usize;
            let mut chunk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 10 == 0 {
                chunk.extend_from_slice(&valid);
            }
            r.feed(&chunk, |l| {
                if let Ok(l) = l {
                    let _ = decode_line::<GuestMsg>(l);
                    let _ = decode_line::<HostMsg>(l);
                }
            });
            assert!(r.buf.len() <= MAX_LINE);
        }
    }

    #[test]
    fn garbage_line_is_malformed() {
        assert!(decode_line::<GuestMsg>(b"\x00\x01garbage").is_err());
        assert!(decode_line::<GuestMsg>(br#"{"t":"request","id":1,"req":{"op":"nope"}}"#).is_err());
    }

    /// Found while writing the model of the `channel_lines` fuzz target,
    /// which reproduces it (input `01 00 00 10 00 02 61 0a`: a run of
    /// MAX_LINE bytes, then a chunk `a\n`). A line that went over MAX_LINE
    /// in the chunk holding its newline was passed on whole (1 MiB + 1
    /// here), not reported as `TooLong`.
    #[test]
    fn fuzz_regression_overlong_line_ending_in_the_same_chunk() {
        let mut r = LineReader::new();
        let mut got = Vec::new();
        let mut record =
            |l: Result<&[u8], LineError>| got.push(l.map(|l| l.len()).map_err(|e| e.to_string()));
        r.feed(&vec![b'x'; MAX_LINE], &mut record);
        r.feed(b"a\n", &mut record);
        r.feed(b"ok\n", &mut record);
        // The same with the whole line in one chunk.
        let mut one = vec![b'y'; MAX_LINE + 1];
        one.extend_from_slice(b"\nok\n");
        r.feed(&one, &mut record);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[0].is_err() && got[2].is_err(), "{got:?}");
        assert_eq!((got[1].clone(), got[3].clone()), (Ok(2), Ok(2)));
    }
}
