//! The page server: serves frozen generations to other hosts over TCP.
//!
//! One accept thread, one thread per connection (at most
//! [`ServerConfig::max_connections`]; more are closed at once). Every
//! connection must first pass the cluster-key handshake; then it sends
//! requests of the [`wire`](crate::wire) protocol. Only generations
//! [published](PageServer::publish) by name are served, never paths.

use crate::wire::{self, Status, REQUEST_LEN};
use crate::PAGE_SIZE;
use serde::Serialize;
use snowflock_proto::auth::{self, ClusterKey};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{debug, info, warn};

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
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
}

struct Shared {
    key: Arc<ClusterKey>,
    cfg: ServerConfig,
    gens: RwLock<HashMap<String, Arc<Published>>>,
    counters: Counters,
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
        let shared = Arc::new(Shared {
            key,
            cfg,
            gens: RwLock::new(HashMap::new()),
            counters: Counters::default(),
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
    pub fn publish(&self, generation: &str, file: &Path) -> io::Result<()> {
        if !wire::valid_generation_name(generation) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid generation name {generation:?} (1-64 of [A-Za-z0-9._-])"),
            ));
        }
        let f = File::open(file)?;
        let size = f.metadata()?.len();
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: size {size} is not a multiple of 4 KiB", file.display()),
            ));
        }
        let p = Arc::new(Published {
            file: f,
            pages: size / PAGE_SIZE,
        });
        self.shared
            .gens
            .write()
            .unwrap()
            .insert(generation.to_string(), p);
        debug!(generation, file = %file.display(), size, "published");
        Ok(())
    }

    /// Stops serving `generation`; requests for it get
    /// [`Status::UnknownGeneration`]. Requests being answered finish.
    pub fn withdraw(&self, generation: &str) {
        if self
            .shared
            .gens
            .write()
            .unwrap()
            .remove(generation)
            .is_some()
        {
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
        let conns: Vec<_> = self.shared.conns.lock().unwrap().drain().collect();
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

/// Waits up to `ms` for the listener to become readable.
fn wait_readable(fd: i32, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        wait_readable(listener.as_raw_fd(), 100);
        // Reap finished connection threads.
        shared
            .conns
            .lock()
            .unwrap()
            .retain(|_, (_, t)| !t.is_finished());
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                continue
            }
            Err(e) => {
                warn!("page server accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        inc(&shared.counters.connections, 1);
        if shared.active.load(Ordering::SeqCst) >= shared.cfg.max_connections {
            inc(&shared.counters.refused_connections, 1);
            warn!(%peer, max = shared.cfg.max_connections, "page server: too many connections, refusing");
            continue;
        }
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        shared.active.fetch_add(1, Ordering::SeqCst);
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name("page-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, peer, &s) {
                    debug!(%peer, "page connection ended: {e}");
                }
                s.active.fetch_sub(1, Ordering::SeqCst);
            });
        match t {
            Ok(t) => {
                next_id += 1;
                shared.conns.lock().unwrap().insert(next_id, (clone, t));
            }
            Err(e) => {
                shared.active.fetch_sub(1, Ordering::SeqCst);
                warn!("page server cannot spawn a connection thread: {e}");
            }
        }
    }
}

/// Reads a whole request; `Ok(None)` on a clean end or idle timeout.
fn read_request(
    s: &mut TcpStream,
    cfg: &ServerConfig,
    buf: &mut [u8; REQUEST_LEN],
) -> io::Result<Option<()>> {
    s.set_read_timeout(Some(cfg.idle_timeout))?;
    let n = match s.read(&mut buf[..1]) {
        Ok(0) => return Ok(None),
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            debug!("page connection idle for {:?}, closing", cfg.idle_timeout);
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    s.set_read_timeout(Some(cfg.request_timeout))?;
    s.read_exact(&mut buf[n..])?;
    Ok(Some(()))
}

fn serve(mut s: TcpStream, peer: SocketAddr, sh: &Shared) -> io::Result<()> {
    let c = &sh.counters;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(sh.cfg.handshake_timeout))?;
    s.set_write_timeout(Some(sh.cfg.write_timeout))?;
    if let Err(e) = auth::server_blocking(&mut s, &sh.key) {
        inc(&c.auth_failures, 1);
        warn!(%peer, "page server: {e}");
        return Ok(());
    }
    let mut req = [0u8; REQUEST_LEN];
    let mut out: Vec<u8> = Vec::new();
    loop {
        match read_request(&mut s, &sh.cfg, &mut req) {
            Ok(Some(())) => {}
            Ok(None) => return Ok(()),
            Err(e) => {
                inc(&c.malformed_requests, 1);
                warn!(%peer, "page server: incomplete request ({e}), closing");
                return Ok(());
            }
        }
        let r = match wire::decode_request(&req) {
            Ok(r) => r,
            Err((first, count)) => {
                inc(&c.malformed_requests, 1);
                warn!(%peer, "page server: malformed request, closing");
                let _ = s.write_all(&wire::encode_reply(Status::Malformed, first, count));
                return Ok(());
            }
        };
        inc(&c.requests, 1);
        let g = sh.gens.read().unwrap().get(&r.name).cloned();
        let Some(g) = g else {
            s.write_all(&wire::encode_reply(
                Status::UnknownGeneration,
                r.first,
                r.count,
            ))?;
            continue;
        };
        match r.first.checked_add(r.count as u64) {
            Some(end) if end <= g.pages => {}
            _ => {
                s.write_all(&wire::encode_reply(Status::OutOfRange, r.first, r.count))?;
                continue;
            }
        }
        let len = wire::data_len(r.count);
        out.resize(wire::REPLY_LEN + len, 0);
        if let Err(e) = g
            .file
            .read_exact_at(&mut out[wire::REPLY_LEN..], r.first * PAGE_SIZE)
        {
            warn!(
                generation = r.name,
                "page server cannot read the generation file: {e}"
            );
            s.write_all(&wire::encode_reply(Status::ServerError, r.first, r.count))?;
            continue;
        }
        out[..wire::REPLY_LEN].copy_from_slice(&wire::encode_reply(Status::Ok, r.first, r.count));
        inc(&c.pages_served, r.count as u64);
        inc(&c.bytes_served, len as u64);
        s.write_all(&out)?;
    }
}
