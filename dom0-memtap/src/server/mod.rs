//! The page server: serves frozen generations to other hosts over TCP.
//!
//! One accept thread, one thread per connection (at most
//! [`ServerConfig::max_connections`]; more are closed at once). Every
//! connection must first pass the cluster-key handshake; then it sends
//! requests of the [`wire`] protocol. Only generations
//! [published](PageServer::publish) by name are served, never paths.
//!
//! * this file: the [`PageServer`] handle (start, publish, withdraw,
//!   counters, shutdown) and its settings;
//! * `connection.rs`: the accept loop and one connection's requests;
//! * `mcast.rs`: multicast copies of served pages (mcdist): lockstep
//!   detection, flow control, end game.
//!
//! May import: [`crate::wire`], [`crate::mcast`], [`crate::origin::Layer`]
//! (reading a layered generation), `sys`, the crate root. Nothing here knows about
//! memtap or how generations are frozen.

mod connection;
mod mcast;

use crate::wire;
use crate::PAGE_SIZE;
use connection::accept_loop;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use snowflock_proto::auth::ClusterKey;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Why [`PageServer::publish`] refused a generation. The messages are
/// those the daemon shows.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The name is not a valid generation name (and never a path).
    #[error("invalid generation name {name:?} (1-64 of [A-Za-z0-9._-])")]
    InvalidName { name: String },
    /// The file's size is not a whole number of pages.
    #[error("{path}: size {size} is not a multiple of 4 KiB")]
    Size { path: String, size: u64 },
    /// The file cannot be opened or inspected.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Limits and timeouts of a [`PageServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Time allowed for the authentication handshake.
    pub handshake_timeout: Duration,
    /// An authenticated connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for the rest of a request once its first byte came.
    pub request_timeout: Duration,
    /// Time a reply may wait for a client that does not read.
    pub write_timeout: Duration,
    /// Multicast a copy of each page served to the generation's group
    /// (default `None`: unicast only).
    pub mcast: Option<crate::mcast::McastConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            mcast: None,
        }
    }
}

/// Counters of a [`PageServer`], since it started.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted (including refused ones).
    pub connections: u64,
    /// Connections closed at once because `max_connections` were open.
    pub refused_connections: u64,
    /// Connections that failed the cluster-key handshake.
    pub auth_failures: u64,
    /// Requests that were not understood (the connection was closed).
    pub malformed_requests: u64,
    /// Well-formed requests, whatever their answer.
    pub requests: u64,
    /// Pages sent.
    pub pages_served: u64,
    /// Page bytes sent.
    pub bytes_served: u64,
    /// Page datagrams multicast (mcdist).
    #[serde(default)]
    pub mcast_datagrams: u64,
    /// Requests answered "coalesced": the pages were on their way by
    /// multicast.
    #[serde(default)]
    pub coalesced: u64,
    /// Pages members asked for although they had been multicast: lost (or
    /// not kept) by the asker.
    #[serde(default)]
    pub rerequested: u64,
    /// Page copies not multicast because flow control's rate was used up.
    #[serde(default)]
    pub mcast_skipped: u64,
    /// Current multicast rate allowed by flow control, bytes per second.
    #[serde(default)]
    pub mcast_rate: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    refused_connections: AtomicU64,
    auth_failures: AtomicU64,
    malformed_requests: AtomicU64,
    requests: AtomicU64,
    pages_served: AtomicU64,
    bytes_served: AtomicU64,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Published {
    file: File,
    pages: u64,
    /// The pages that differ from `file`, for a layered generation.
    layer: Option<crate::origin::Layer>,
    /// Multicast state, when the server multicasts.
    cast: Option<mcast::GenCast>,
}

struct Shared {
    key: Arc<ClusterKey>,
    cfg: ServerConfig,
    gens: RwLock<HashMap<String, Arc<Published>>>,
    counters: Counters,
    mcast: Option<mcast::Sender>,
    stop: AtomicBool,
    active: AtomicUsize,
    /// Open connections, so that `shutdown` can close them.
    conns: Mutex<HashMap<u64, (TcpStream, JoinHandle<()>)>>,
}

/// Serves published generations; see the module docs.
pub struct PageServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl PageServer {
    /// Binds `listen` and starts serving with the default [`ServerConfig`].
    pub fn start(listen: SocketAddr, key: Arc<ClusterKey>) -> io::Result<PageServer> {
        PageServer::start_with(listen, key, ServerConfig::default())
    }

    /// Binds `listen` and starts serving.
    pub fn start_with(
        listen: SocketAddr,
        key: Arc<ClusterKey>,
        cfg: ServerConfig,
    ) -> io::Result<PageServer> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mcast = cfg.mcast.as_ref().and_then(|m| {
            mcast::Sender::new(m, crate::mcast::McastKey::new(&key))
                .map_err(|e| {
                    warn!("page server: cannot open a multicast socket ({e}); unicast only");
                })
                .ok()
        });
        let shared = Arc::new(Shared {
            key,
            cfg,
            gens: RwLock::new(HashMap::new()),
            counters: Counters::default(),
            mcast,
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            conns: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || accept_loop(listener, s))?;
        info!(%addr, "page server listening");
        Ok(PageServer {
            shared,
            addr,
            accept: Some(accept),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `file` as generation `generation` (replacing any generation
    /// of that name). Its size is the generation's size, a multiple of 4 KiB.
    pub fn publish(&self, generation: &str, file: &Path) -> Result<(), PublishError> {
        self.publish_layered(generation, file, None)
    }

    /// Like [`publish`](Self::publish), for a generation that is `file`
    /// plus `layer` (see [`Layer`](crate::origin::Layer)).
    pub fn publish_layered(
        &self,
        generation: &str,
        file: &Path,
        layer: Option<crate::origin::Layer>,
    ) -> Result<(), PublishError> {
        if !wire::valid_generation_name(generation) {
            return Err(PublishError::InvalidName {
                name: generation.to_string(),
            });
        }
        let f = File::open(file)?;
        let size = f.metadata()?.len();
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(PublishError::Size {
                path: file.display().to_string(),
                size,
            });
        }
        let pages = size / PAGE_SIZE;
        let cast = self
            .shared
            .mcast
            .as_ref()
            .map(|m| mcast::GenCast::new(generation, m.port, pages));
        let p = Arc::new(Published {
            file: f,
            pages,
            layer,
            cast,
        });
        self.shared.gens.write().insert(generation.to_string(), p);
        debug!(generation, file = %file.display(), size, "published");
        Ok(())
    }

    /// Stops serving `generation`; requests for it get
    /// [`Status::UnknownGeneration`](wire::Status::UnknownGeneration). Requests being answered finish.
    pub fn withdraw(&self, generation: &str) {
        if self.shared.gens.write().remove(generation).is_some() {
            debug!(generation, "withdrawn");
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            connections: g(&c.connections),
            refused_connections: g(&c.refused_connections),
            auth_failures: g(&c.auth_failures),
            malformed_requests: g(&c.malformed_requests),
            requests: g(&c.requests),
            pages_served: g(&c.pages_served),
            bytes_served: g(&c.bytes_served),
            ..self.mcast_stats()
        }
    }

    fn mcast_stats(&self) -> ServerStats {
        let Some(m) = &self.shared.mcast else {
            return ServerStats::default();
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &m.counters;
        ServerStats {
            mcast_datagrams: g(&c.datagrams),
            coalesced: g(&c.coalesced),
            rerequested: g(&c.rerequested),
            mcast_skipped: g(&c.skipped),
            mcast_rate: m.rate(),
            ..ServerStats::default()
        }
    }

    /// Stops accepting, closes every connection and joins all threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = accept.join();
        let conns: Vec<_> = self.shared.conns.lock().drain().collect();
        for (_, (stream, _)) in &conns {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, (_, t)) in conns {
            let _ = t.join();
        }
        info!(addr = %self.addr, "page server stopped");
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop();
    }
}
