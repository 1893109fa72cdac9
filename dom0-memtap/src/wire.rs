//! The page server's wire protocol (version 1).
//!
//! A TCP connection starts with the cluster-key handshake of
//! [`snowflock_proto::auth`]. Then the client sends requests and the server
//! answers each in order, one at a time. All integers are little-endian.
//!
//! Request, [`REQUEST_LEN`] = 88 bytes:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"SFPQ"` |
//! | 4 | 2 | version = 1 |
//! | 6 | 2 | name length, 1..=64 |
//! | 8 | 64 | generation name, zero padded (`[A-Za-z0-9._-]`, not `.`/`..`) |
//! | 72 | 8 | first page |
//! | 80 | 4 | page count, 1..=[`MAX_PAGES`] |
//! | 84 | 4 | reserved, 0 |
//!
//! Reply, [`REPLY_LEN`] = 24 bytes, then `count * 4096` bytes of page data
//! when the status is [`Status::Ok`] (nothing otherwise):
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"SFPR"` |
//! | 4 | 4 | status ([`Status`]) |
//! | 8 | 8 | first page (echoed) |
//! | 16 | 4 | page count (echoed) |
//! | 20 | 4 | reserved, 0 |
//!
//! After a [`Status::Malformed`] reply the server closes the connection; the
//! other errors leave it open.
//!
//! May import: the crate root (`PAGE_SIZE`) only: this is the bottom layer,
//! shared by the [page server](crate::server) and the
//! [client](crate::memtap::client). The decode functions are public (and
//! stay so) for tests and fuzzers.

use crate::PAGE_SIZE;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Magic of a request.
pub const REQUEST_MAGIC: [u8; 4] = *b"SFPQ";
/// Magic of a reply.
pub const REPLY_MAGIC: [u8; 4] = *b"SFPR";
/// Protocol version.
pub const VERSION: u16 = 1;
/// Longest generation name, in bytes.
pub const MAX_NAME: usize = 64;
/// Most pages one request may ask for (1 MiB).
pub const MAX_PAGES: u32 = 256;
/// Size of a request.
pub const REQUEST_LEN: usize = 88;
/// Size of a reply header.
pub const REPLY_LEN: usize = 24;

/// A request, as on the wire.
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeader {
    pub magic: [u8; 4],
    pub version: U16,
    pub name_len: U16,
    pub name: [u8; MAX_NAME],
    pub first: U64,
    pub count: U32,
    pub reserved: U32,
}

/// A reply header, as on the wire.
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReplyHeader {
    pub magic: [u8; 4],
    pub status: U32,
    pub first: U64,
    pub count: U32,
    pub reserved: U32,
}

const _: () = assert!(std::mem::size_of::<RequestHeader>() == REQUEST_LEN);
const _: () = assert!(std::mem::size_of::<ReplyHeader>() == REPLY_LEN);

/// Reply status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Page data follows.
    Ok = 0,
    /// The server does not serve (or no longer serves) that generation.
    UnknownGeneration = 1,
    /// The pages lie beyond the end of the generation.
    OutOfRange = 2,
    /// The request was not understood; the server closes the connection.
    Malformed = 3,
    /// The server could not read the generation file.
    ServerError = 4,
}

impl Status {
    /// Decodes a status word.
    pub fn from_u32(v: u32) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::UnknownGeneration,
            2 => Status::OutOfRange,
            3 => Status::Malformed,
            4 => Status::ServerError,
            _ => return None,
        })
    }
}

/// Whether `name` may name a generation: 1..=64 bytes of
/// `[A-Za-z0-9._-]`, not `.` or `..` nor containing `..`. Names are never
/// used as paths by the server, but they become file names in the memtap
/// mount and its cache directory.
pub fn valid_generation_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && name != "."
        && !name.contains("..")
}

/// Encodes a request. The name must be valid and the count in range; the
/// caller checks (see [`valid_generation_name`]).
pub fn encode_request(name: &str, first: u64, count: u32) -> [u8; REQUEST_LEN] {
    let mut n = [0u8; MAX_NAME];
    let len = name.len().min(MAX_NAME);
    n[..len].copy_from_slice(&name.as_bytes()[..len]);
    let h = RequestHeader {
        magic: REQUEST_MAGIC,
        version: U16::new(VERSION),
        name_len: U16::new(len as u16),
        name: n,
        first: U64::new(first),
        count: U32::new(count),
        reserved: U32::new(0),
    };
    let mut out = [0u8; REQUEST_LEN];
    out.copy_from_slice(h.as_bytes());
    out
}

/// A request that passed [`decode_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub name: String,
    pub first: u64,
    pub count: u32,
}

/// Decodes and validates a request. On error returns what to echo in the
/// [`Status::Malformed`] reply (first page, count; zeros if unknown).
pub fn decode_request(buf: &[u8; REQUEST_LEN]) -> Result<Request, (u64, u32)> {
    let h = RequestHeader::read_from_bytes(buf).map_err(|_| (0, 0))?;
    if h.magic != REQUEST_MAGIC || h.version.get() != VERSION || h.reserved.get() != 0 {
        return Err((0, 0));
    }
    let echo = (h.first.get(), h.count.get());
    let len = h.name_len.get() as usize;
    if len == 0 || len > MAX_NAME || h.name[len..].iter().any(|&b| b != 0) {
        return Err(echo);
    }
    let Ok(name) = std::str::from_utf8(&h.name[..len]) else {
        return Err(echo);
    };
    if !valid_generation_name(name) || echo.1 == 0 || echo.1 > MAX_PAGES {
        return Err(echo);
    }
    Ok(Request {
        name: name.to_string(),
        first: echo.0,
        count: echo.1,
    })
}

/// Encodes a reply header.
pub fn encode_reply(status: Status, first: u64, count: u32) -> [u8; REPLY_LEN] {
    let h = ReplyHeader {
        magic: REPLY_MAGIC,
        status: U32::new(status as u32),
        first: U64::new(first),
        count: U32::new(count),
        reserved: U32::new(0),
    };
    let mut out = [0u8; REPLY_LEN];
    out.copy_from_slice(h.as_bytes());
    out
}

/// A decoded reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub first: u64,
    pub count: u32,
}

/// Decodes a reply header; `None` if it is not one.
pub fn decode_reply(buf: &[u8; REPLY_LEN]) -> Option<Reply> {
    let h = ReplyHeader::read_from_bytes(buf).ok()?;
    if h.magic != REPLY_MAGIC || h.reserved.get() != 0 {
        return None;
    }
    Some(Reply {
        status: Status::from_u32(h.status.get())?,
        first: h.first.get(),
        count: h.count.get(),
    })
}

/// Bytes of page data that follow an OK reply for `count` pages.
pub fn data_len(count: u32) -> usize {
    count as usize * PAGE_SIZE as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["gen-1", "a", "G.2_x", &"x".repeat(64), ".hidden"] {
            assert!(valid_generation_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a..b",
            "x y",
            "é",
            &"x".repeat(65),
            "a\0",
        ] {
            assert!(!valid_generation_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn request_roundtrip_and_rejects() {
        let r = encode_request("gen-7", 12, 3);
        assert_eq!(
            decode_request(&r),
            Ok(Request {
                name: "gen-7".into(),
                first: 12,
                count: 3
            })
        );
        let mut bad = r;
        bad[0] = b'X';
        assert_eq!(decode_request(&bad), Err((0, 0)));
        assert_eq!(
            decode_request(&encode_request("gen-7", 12, 0)),
            Err((12, 0))
        );
        assert_eq!(
            decode_request(&encode_request("gen-7", 12, 257)),
            Err((12, 257))
        );
        assert!(decode_request(&encode_request("a/b", 0, 1)).is_err());
        assert!(decode_request(&encode_request("..", 0, 1)).is_err());
        let mut trailing = r;
        trailing[8 + 10] = b'x';
        assert!(decode_request(&trailing).is_err());
        let mut version = r;
        version[4] = 2;
        assert!(decode_request(&version).is_err());
    }

    #[test]
    fn reply_roundtrip() {
        let r = encode_reply(Status::OutOfRange, u64::MAX, 7);
        assert_eq!(
            decode_reply(&r),
            Some(Reply {
                status: Status::OutOfRange,
                first: u64::MAX,
                count: 7
            })
        );
        let mut bad = r;
        bad[4] = 99;
        assert_eq!(decode_reply(&bad), None);
    }
}
