//! The page server's wire protocol (version 2: version 1 plus the
//! multicast fields of mcdist).
//!
//! A TCP connection starts with the cluster-key handshake of
//! [`snowflock_proto::auth`]. Then the client sends requests and the server
//! answers each in order, one at a time. All integers are little-endian.
//!
//! Request, [`REQUEST_LEN`] = 104 bytes:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"SFPQ"` |
//! | 4 | 2 | version = 1 |
//! | 6 | 2 | name length, 1..=64 |
//! | 8 | 64 | generation name, zero padded (`[A-Za-z0-9._-]`, not `.`/`..`) |
//! | 72 | 8 | first page |
//! | 80 | 4 | page count, 1..=[`MAX_PAGES`] |
//! | 84 | 4 | flags: [`FLAG_MEMBER`], [`FLAG_UNICAST`]; other bits 0 |
//! | 88 | 8 | multicast page datagrams of this generation the asking host accepted so far (its report for flow control) |
//! | 96 | 4 | the asking memtap's random id (tells hosts behind one address apart), 0 if none |
//! | 100 | 4 | reserved, 0 |
//!
//! Reply, [`REPLY_LEN`] = 32 bytes, then `count * 4096` bytes of page data
//! when the status is [`Status::Ok`] (nothing otherwise):
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"SFPR"` |
//! | 4 | 4 | status ([`Status`]) |
//! | 8 | 8 | first page (echoed) |
//! | 16 | 4 | page count (echoed) |
//! | 20 | 4 | reserved, 0 |
//! | 24 | 8 | page datagrams the server multicast for this generation so far |
//!
//! [`Status::Coalesced`] is only answered to a [`FLAG_MEMBER`] request
//! without [`FLAG_UNICAST`]: the pages were multicast to the generation's
//! group a moment ago, so the asker waits for them there, and asks again
//! with [`FLAG_UNICAST`] if they do not come.
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
pub const VERSION: u16 = 2;
/// Request flag: the asking host receives the generation's multicast
/// group, so it may be answered [`Status::Coalesced`].
pub const FLAG_MEMBER: u32 = 1;
/// Request flag: answer with the data, never [`Status::Coalesced`] (a
/// re-request after coalesced pages did not arrive).
pub const FLAG_UNICAST: u32 = 2;
/// Longest generation name, in bytes.
pub const MAX_NAME: usize = 64;
/// Most pages one request may ask for (1 MiB).
pub const MAX_PAGES: u32 = 256;
/// Size of a request.
pub const REQUEST_LEN: usize = 104;
/// Size of a reply header.
pub const REPLY_LEN: usize = 32;

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
    pub flags: U32,
    pub mcast_received: U64,
    pub host: U32,
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
    pub mcast_sent: U64,
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
    /// The pages are on their way to the generation's multicast group; no
    /// data follows.
    Coalesced = 5,
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
            5 => Status::Coalesced,
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

/// Encodes a plain request (no flags). The name must be valid and the
/// count in range; the caller checks (see [`valid_generation_name`]).
pub fn encode_request(name: &str, first: u64, count: u32) -> [u8; REQUEST_LEN] {
    encode_request_with(name, first, count, Asker::default())
}

/// What a request says about its asker (mcdist).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asker {
    /// [`FLAG_MEMBER`], [`FLAG_UNICAST`].
    pub flags: u32,
    /// Datagrams of the generation the asker accepted so far.
    pub mcast_received: u64,
    /// The asking memtap's id.
    pub host: u32,
}

/// Encodes a request with what it says about the asker.
pub fn encode_request_with(name: &str, first: u64, count: u32, a: Asker) -> [u8; REQUEST_LEN] {
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
        flags: U32::new(a.flags),
        mcast_received: U64::new(a.mcast_received),
        host: U32::new(a.host),
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
    pub flags: u32,
    pub mcast_received: u64,
    pub host: u32,
}

/// Decodes and validates a request. On error returns what to echo in the
/// [`Status::Malformed`] reply (first page, count; zeros if unknown).
pub fn decode_request(buf: &[u8; REQUEST_LEN]) -> Result<Request, (u64, u32)> {
    let h = RequestHeader::read_from_bytes(buf).map_err(|_| (0, 0))?;
    let known = FLAG_MEMBER | FLAG_UNICAST;
    if h.magic != REQUEST_MAGIC
        || h.version.get() != VERSION
        || h.flags.get() & !known != 0
        || h.reserved.get() != 0
    {
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
        flags: h.flags.get(),
        mcast_received: h.mcast_received.get(),
        host: h.host.get(),
    })
}

/// Encodes a reply header (no multicast report).
pub fn encode_reply(status: Status, first: u64, count: u32) -> [u8; REPLY_LEN] {
    encode_reply_with(status, first, count, 0)
}

/// Encodes a reply header with the server's multicast count.
pub fn encode_reply_with(
    status: Status,
    first: u64,
    count: u32,
    mcast_sent: u64,
) -> [u8; REPLY_LEN] {
    let h = ReplyHeader {
        magic: REPLY_MAGIC,
        status: U32::new(status as u32),
        first: U64::new(first),
        count: U32::new(count),
        reserved: U32::new(0),
        mcast_sent: U64::new(mcast_sent),
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
    pub mcast_sent: u64,
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
        mcast_sent: h.mcast_sent.get(),
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
                count: 3,
                flags: 0,
                mcast_received: 0,
                host: 0,
            })
        );
        let asker = |flags| Asker {
            flags,
            mcast_received: 99,
            host: 5,
        };
        let m = encode_request_with("gen-7", 1, 1, asker(FLAG_MEMBER | FLAG_UNICAST));
        let d = decode_request(&m).unwrap();
        assert_eq!((d.flags, d.mcast_received, d.host), (3, 99, 5));
        let unknown_flag = encode_request_with("gen-7", 1, 1, asker(4));
        assert_eq!(decode_request(&unknown_flag), Err((0, 0)));
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
        version[4] = 1;
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
                count: 7,
                mcast_sent: 0,
            })
        );
        let c = decode_reply(&encode_reply_with(Status::Coalesced, 5, 1, 1234)).unwrap();
        assert_eq!((c.status, c.mcast_sent), (Status::Coalesced, 1234));
        let mut bad = r;
        bad[4] = 99;
        assert_eq!(decode_reply(&bad), None);
    }
}
