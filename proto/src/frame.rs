//! Length-prefixed JSON framing used on Unix sockets (agent API and admin).
//!
//! A frame is a little-endian `u32` payload length followed by that many
//! bytes of UTF-8 JSON. Lengths above [`MAX_FRAME`] are rejected before any
//! allocation, so a hostile peer cannot make the reader allocate unbounded
//! memory.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{self, Read, Write};

/// Largest accepted frame payload, in bytes.
pub const MAX_FRAME: usize = 4 << 20;

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    #[error("Connection closed")]
    Closed,
    /// The announced frame length is above [`MAX_FRAME`].
    #[error("Frame of {0} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    /// The payload is not valid JSON for the expected message type.
    #[error("Malformed message")]
    Malformed(#[source] serde_json::Error),
    /// An I/O error on the underlying stream.
    #[error("I/O error")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("protocol types always serialize");
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes a frame payload (without its length prefix).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(FrameError::Malformed)
}

/// The error for a stream that ends after `got` bytes of a length prefix:
/// [`FrameError::Closed`] only at a clean end between frames, a truncated
/// frame otherwise.
fn end_in_prefix(got: usize) -> FrameError {
    if got == 0 {
        FrameError::Closed
    } else {
        FrameError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("stream ended after {got} bytes of a frame's length"),
        ))
    }
}

/// Writes one frame to a blocking stream.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg))?;
    w.flush()?;
    Ok(())
}

/// Reads one frame from a blocking stream.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) => return Err(end_in_prefix(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    decode(&buf)
}

/// Async versions for tokio streams.
#[cfg(feature = "tokio")]
pub mod tokio_io {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Writes one frame.
    pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
        w: &mut W,
        msg: &T,
    ) -> Result<(), FrameError> {
        w.write_all(&encode(msg)).await?;
        w.flush().await?;
        Ok(())
    }

    /// Reads one frame.
    pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
        r: &mut R,
    ) -> Result<T, FrameError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < len.len() {
            match r.read(&mut len[got..]).await {
                Ok(0) => return Err(end_in_prefix(got)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).await?;
        decode(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let v = serde_json::json!({"a": 1});
        let bytes = encode(&v);
        let back: serde_json::Value = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(v, back);
    }

    #[test]
    fn rejects_oversized_length_without_allocating() {
        let bytes = u32::MAX.to_le_bytes();
        let err = read_frame::<_, serde_json::Value>(&mut &bytes[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)), "{err}");
    }

    #[test]
    fn clean_eof_is_closed_and_truncated_body_is_io() {
        let empty: &[u8] = &[];
        assert!(matches!(
            read_frame::<_, serde_json::Value>(&mut &empty[..]),
            Err(FrameError::Closed)
        ));
        let mut bytes = encode(&serde_json::json!({"a": 1}));
        bytes.truncate(6);
        assert!(matches!(
            read_frame::<_, serde_json::Value>(&mut &bytes[..]),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn random_frames_never_panic() {
        let mut next = crate::test_rng(0x853c49e6748fea9b);
        for _ in 0..3000 {
            let len = (next() % 64) as usize;
            let mut b = (len as u32).to_le_bytes().to_vec();
            b.extend((0..len).map(|_| next() as u8));
            let _ = read_frame::<_, crate::api::ApiRequest>(&mut &b[..]);
            let _ = read_frame::<_, crate::admin::AdminRequest>(&mut &b[..]);
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let mut bytes = 3u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{{{");
        assert!(matches!(
            read_frame::<_, serde_json::Value>(&mut &bytes[..]),
            Err(FrameError::Malformed(_))
        ));
    }

    /// Found by the `frame` fuzz target (input `0a 0a`: one byte of a
    /// length prefix, then the end of the stream). A cut length prefix was
    /// reported as `Closed`, the clean end between frames.
    #[test]
    fn fuzz_regression_cut_length_prefix_is_not_a_clean_close() {
        for cut in 1..4 {
            let bytes = encode(&serde_json::json!({"a": 1}));
            let r = read_frame::<_, serde_json::Value>(&mut &bytes[..cut]);
            assert!(
                matches!(&r, Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof),
                "{cut}: {r:?}"
            );
        }
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn fuzz_regression_cut_length_prefix_is_not_a_clean_close_async() {
        for cut in 0..4 {
            let bytes = encode(&serde_json::json!({"a": 1}));
            let r = tokio_io::read_frame::<_, serde_json::Value>(&mut &bytes[..cut]).await;
            if cut == 0 {
                assert!(matches!(r, Err(FrameError::Closed)), "{r:?}");
            } else {
                assert!(
                    matches!(&r, Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof),
                    "{cut}: {r:?}"
                );
            }
        }
    }
}
