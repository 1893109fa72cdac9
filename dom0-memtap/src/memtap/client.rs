//! Client of an origin's page server: a small pool of authenticated
//! connections, and fetches that retry on fresh connections until a
//! deadline.
//!
//! A reply is checked before its data is used: magic, status, and the echo
//! of the requested pages; the data is read completely into the caller's
//! buffer before the fetch returns `Ok`. A connection that misbehaves in
//! any way (short reply, wrong pages, bad status, stall past the deadline,
//! close, failed authentication) is dropped.
//!
//! May import: [`crate::wire`] only (the server's side of the protocol
//! lives in [`crate::server`], which this does not import).

use crate::wire::{self, Status};
use parking_lot::Mutex;
use snowflock_proto::auth::{self, ClusterKey};
use snowflock_proto::error::chain;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::debug;

/// Idle connections kept per origin.
pub const MAX_IDLE: usize = 8;
/// Pooled connections idle longer than this are not reused (the server
/// closes idle connections after 30 s by default).
const IDLE_REUSE: Duration = Duration::from_secs(20);
/// Longest single connect attempt.
const CONNECT_CAP: Duration = Duration::from_secs(3);

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The origin answered that it does not serve the generation.
    #[error("origin {origin} does not serve generation {generation} (withdrawn?)")]
    UnknownGeneration {
        origin: SocketAddr,
        generation: String,
    },
    /// The origin answered that the pages lie beyond the generation's end.
    #[error("origin {origin}: pages {first}..{end} are beyond the end of generation {generation}")]
    OutOfRange {
        origin: SocketAddr,
        generation: String,
        first: u64,
        end: u64,
    },
    /// No good answer before the deadline.
    #[error("no valid answer from origin {origin} within {timeout:?} ({attempts} attempts; last: {last})")]
    Timeout {
        origin: SocketAddr,
        timeout: Duration,
        attempts: u32,
        last: String,
    },
    /// The caller cancelled the fetch.
    #[error("fetch from origin {origin} cancelled")]
    Cancelled { origin: SocketAddr },
    /// The request itself is invalid (a bug of the caller).
    #[error("invalid page request: {0}")]
    Invalid(String),
}

/// What a fetch got when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// The pages are in the caller's buffer.
    Data {
        /// The server's multicast count for the generation (0 without
        /// multicast).
        mcast_sent: u64,
    },
    /// The server says the pages are on their way by multicast (only for a
    /// [`wire::FLAG_MEMBER`] request without [`wire::FLAG_UNICAST`]); the
    /// buffer holds nothing.
    Coalesced { mcast_sent: u64 },
}

enum Attempt {
    /// Drop the connection and try again on a fresh one.
    Retry(String),
    /// A definitive answer.
    Final(FetchError),
}

impl From<io::Error> for Attempt {
    fn from(e: io::Error) -> Self {
        Attempt::Retry(match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".into(),
            io::ErrorKind::UnexpectedEof => "connection closed (short reply)".into(),
            _ => e.to_string(),
        })
    }
}

/// Connections to one origin's page server.
pub struct OriginClient {
    addr: SocketAddr,
    key: Arc<ClusterKey>,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl std::fmt::Debug for OriginClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl OriginClient {
    /// A client for the page server at `addr`; connects on demand.
    pub fn new(addr: SocketAddr, key: Arc<ClusterKey>) -> OriginClient {
        OriginClient {
            addr,
            key,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The origin's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Fetches pages `first..first+count` of `generation` into `out`
    /// (`count * 4096` bytes), retrying on fresh connections until
    /// `deadline`, or until `cancel` is set. `out` holds the pages only if
    /// this returns `Ok`.
    pub fn fetch(
        &self,
        generation: &str,
        first: u64,
        count: u32,
        out: &mut [u8],
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), FetchError> {
        let plain = wire::Asker::default();
        match self.fetch_with(generation, first, count, plain, out, deadline, cancel)? {
            Fetched::Data { .. } => Ok(()),
            Fetched::Coalesced { .. } => Err(FetchError::Invalid(
                "a plain request was answered as coalesced".into(),
            )),
        }
    }

    /// Like [`fetch`](Self::fetch), with request flags
    /// ([`wire::FLAG_MEMBER`], [`wire::FLAG_UNICAST`]) and this host's
    /// multicast report; a member may be answered [`Fetched::Coalesced`].
    #[allow(clippy::too_many_arguments)]
    pub fn fetch_with(
        &self,
        generation: &str,
        first: u64,
        count: u32,
        asker: wire::Asker,
        out: &mut [u8],
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<Fetched, FetchError> {
        if !wire::valid_generation_name(generation) {
            return Err(FetchError::Invalid(format!(
                "generation name {generation:?}"
            )));
        }
        if count == 0 || count > wire::MAX_PAGES || out.len() != wire::data_len(count) {
            return Err(FetchError::Invalid(format!(
                "{count} pages into {} bytes",
                out.len()
            )));
        }
        let req = wire::encode_request_with(generation, first, count, asker);
        // May the server answer "coalesced"?
        let member = asker.flags & wire::FLAG_MEMBER != 0 && asker.flags & wire::FLAG_UNICAST == 0;
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0;
        let mut last = String::from("no attempt");
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(FetchError::Cancelled { origin: self.addr });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FetchError::Timeout {
                    origin: self.addr,
                    timeout: deadline.saturating_duration_since(start),
                    attempts,
                    last,
                });
            }
            attempts += 1;
            match self.attempt(&req, member, generation, first, count, out, deadline) {
                Ok(f) => return Ok(f),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Retry(why)) => {
                    debug!(origin = %self.addr, generation, first, count, "page fetch attempt failed: {why}");
                    last = why;
                }
            }
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            std::thread::sleep(pause);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    fn connect(&self, deadline: Instant) -> Result<TcpStream, Attempt> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Attempt::Retry("deadline".into()));
        }
        let mut s = TcpStream::connect_timeout(&self.addr, left.min(CONNECT_CAP))?;
        s.set_nodelay(true)?;
        set_timeouts(&s, deadline)?;
        auth::client_blocking(&mut s, &self.key).map_err(|e| Attempt::Retry(chain(&e)))?;
        Ok(s)
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        req: &[u8; wire::REQUEST_LEN],
        member: bool,
        generation: &str,
        first: u64,
        count: u32,
        out: &mut [u8],
        deadline: Instant,
    ) -> Result<Fetched, Attempt> {
        let pooled = {
            let mut idle = self.idle.lock();
            idle.retain(|(_, t)| t.elapsed() < IDLE_REUSE);
            idle.pop()
        };
        let mut s = match pooled {
            Some((s, _)) => {
                set_timeouts(&s, deadline)?;
                s
            }
            None => self.connect(deadline)?,
        };
        s.write_all(req)?;
        let mut hdr = [0u8; wire::REPLY_LEN];
        s.read_exact(&mut hdr)?;
        let Some(r) = wire::decode_reply(&hdr) else {
            return Err(Attempt::Retry("malformed reply header".into()));
        };
        if r.first != first || r.count != count {
            return Err(Attempt::Retry(format!(
                "reply for pages {}+{} but asked for {first}+{count}",
                r.first, r.count
            )));
        }
        let end = first + count as u64;
        let mcast_sent = r.mcast_sent;
        let mut got = Fetched::Data { mcast_sent };
        let fin = match r.status {
            Status::Ok => {
                s.read_exact(out)?;
                None
            }
            Status::Coalesced if member => {
                got = Fetched::Coalesced { mcast_sent };
                None
            }
            Status::Coalesced => {
                return Err(Attempt::Retry(
                    "origin answered coalesced to a request that did not allow it".into(),
                ))
            }
            Status::UnknownGeneration => Some(FetchError::UnknownGeneration {
                origin: self.addr,
                generation: generation.into(),
            }),
            Status::OutOfRange => Some(FetchError::OutOfRange {
                origin: self.addr,
                generation: generation.into(),
                first,
                end,
            }),
            Status::Malformed => {
                return Err(Attempt::Retry(
                    "origin says our request is malformed".into(),
                ))
            }
            Status::ServerError => {
                return Err(Attempt::Retry("origin cannot read the generation".into()))
            }
        };
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push((s, Instant::now()));
        }
        match fin {
            None => Ok(got),
            Some(e) => Err(Attempt::Final(e)),
        }
    }
}

/// Read and write timeouts: what is left until `deadline`.
fn set_timeouts(s: &TcpStream, deadline: Instant) -> Result<(), Attempt> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        return Err(Attempt::Retry("deadline".into()));
    }
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))?;
    Ok(())
}
