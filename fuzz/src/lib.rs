//! Helpers shared by the fuzz targets in `fuzz_targets/`.

use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;
use std::future::Future;
use std::sync::OnceLock;

/// Decodes `bytes` as JSON of type `T`; if that works, checks that the
/// value survives encode -> decode unchanged and that its encoding is
/// stable (encoding the re-decoded value gives the same bytes).
pub fn json_roundtrip<T>(bytes: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let v: T = serde_json::from_slice(bytes).ok()?;
    assert_roundtrip(&v);
    Some(v)
}

/// Encode -> decode -> encode of an already decoded value.
pub fn assert_roundtrip<T>(v: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let enc = serde_json::to_vec(v).expect("protocol types always serialize");
    let back: T = match serde_json::from_slice(&enc) {
        Ok(b) => b,
        Err(e) => panic!(
            "own encoding does not decode: {e}\nvalue {v:?}\nencoding {}",
            String::from_utf8_lossy(&enc)
        ),
    };
    assert_eq!(&back, v, "value changed across encode/decode");
    let enc2 = serde_json::to_vec(&back).unwrap();
    assert_eq!(enc, enc2, "encoding is not stable");
}

/// A current-thread tokio runtime, made once per process.
pub fn block_on<F: Future>(f: F) -> F::Output {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
    .block_on(f)
}

/// A scripted peer for the handshake targets: what the code under test
/// reads is produced by `answer` from what it has written so far; what it
/// writes is recorded. Implements both std and tokio I/O traits, so the
/// blocking and async drivers see the same peer.
pub struct Peer<F: FnMut(&[u8]) -> Option<Vec<u8>>> {
    /// Everything the code under test wrote.
    pub written: Vec<u8>,
    /// Bytes queued for the code under test to read.
    pending: Vec<u8>,
    /// Called when the reader runs dry, with everything written so far;
    /// returns more bytes to read, or `None` for end of stream.
    answer: F,
}

impl<F: FnMut(&[u8]) -> Option<Vec<u8>>> Peer<F> {
    pub fn new(answer: F) -> Self {
        Peer {
            written: Vec::new(),
            pending: Vec::new(),
            answer,
        }
    }

    fn read_some(&mut self, buf: &mut [u8]) -> usize {
        while self.pending.is_empty() {
            match (self.answer)(&self.written) {
                Some(more) if !more.is_empty() => self.pending = more,
                Some(_) => continue,
                None => return 0,
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        n
    }
}

impl<F: FnMut(&[u8]) -> Option<Vec<u8>>> std::io::Read for Peer<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(self.read_some(buf))
    }
}

impl<F: FnMut(&[u8]) -> Option<Vec<u8>>> std::io::Write for Peer<F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<F: FnMut(&[u8]) -> Option<Vec<u8>> + Unpin> tokio::io::AsyncRead for Peer<F> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = this.read_some(buf.initialize_unfilled());
        buf.advance(n);
        std::task::Poll::Ready(Ok(()))
    }
}

impl<F: FnMut(&[u8]) -> Option<Vec<u8>> + Unpin> tokio::io::AsyncWrite for Peer<F> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut().written.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A short, stable name for an `AuthError` variant, to compare outcomes.
pub fn auth_kind(r: &Result<(), snowflock_proto::auth::AuthError>) -> String {
    use snowflock_proto::auth::AuthError as E;
    match r {
        Ok(()) => "ok".into(),
        Err(E::Io(e)) => format!("io:{:?}", e.kind()),
        Err(e) => format!("{e:?}"),
    }
}

/// HMAC-SHA256(key, label || ns || nc), computed here from the protocol
/// description in `proto/src/auth.rs`, independently of its code.
pub fn hmac(key: &[u8], label: &[u8], ns: &[u8], nc: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
    m.update(label);
    m.update(ns);
    m.update(nc);
    m.finalize().into_bytes().into()
}

/// The fuzz targets' cluster key (any fixed 32 bytes).
pub const KEY: [u8; 32] = *b"snowflock-fuzz-cluster-key-32byt";
