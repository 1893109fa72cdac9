//! The page server's connections: the accept loop, and the requests of
//! one authenticated connection, answered in order.
//!
//! May import: [`super`] (shared state, counters), [`crate::wire`],
//! `sys`, the crate root.

use super::mcast::Decision;
use super::{inc, ServerConfig, Shared};
use crate::mcast::DATAGRAM_LEN;
use crate::wire::{self, Status, REQUEST_LEN};
use crate::{sys, PAGE_SIZE};
use snowflock_proto::auth;
use snowflock_proto::error::chain;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

pub(super) fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        sys::wait_readable(listener.as_fd(), 100);
        // Reap finished connection threads.
        shared.conns.lock().retain(|_, (_, t)| !t.is_finished());
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
                shared.conns.lock().insert(next_id, (clone, t));
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
        warn!(%peer, "page server: {}", chain(&e));
        return Ok(());
    }
    let mut req = [0u8; REQUEST_LEN];
    let mut out: Vec<u8> = Vec::new();
    let mut dgram = Box::new([0u8; DATAGRAM_LEN]);
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
        let g = sh.gens.read().get(&r.name).cloned();
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
        let cast = sh.mcast.as_ref().zip(g.cast.as_ref());
        let sent = cast.map_or(0, |(_, c)| c.sent());
        if let Some((m, c)) = cast {
            if m.on_request(c, peer.ip(), &r) == Decision::Coalesce {
                s.write_all(&wire::encode_reply_with(
                    Status::Coalesced,
                    r.first,
                    r.count,
                    sent,
                ))?;
                continue;
            }
        }
        let len = wire::data_len(r.count);
        out.resize(wire::REPLY_LEN + len, 0);
        let data = &mut out[wire::REPLY_LEN..];
        let read = g
            .file
            .read_exact_at(data, r.first * PAGE_SIZE)
            .and_then(|()| match &g.layer {
                Some(l) => l.overlay(r.first, data),
                None => Ok(()),
            });
        if let Err(e) = read {
            warn!(
                generation = r.name,
                "page server cannot read the generation file: {e}"
            );
            s.write_all(&wire::encode_reply(Status::ServerError, r.first, r.count))?;
            continue;
        }
        // A member gets its pages by multicast, with the others, when all
        // of them could be sent; over TCP only the word that they are on
        // their way.
        let member = r.flags & wire::FLAG_MEMBER != 0 && r.flags & wire::FLAG_UNICAST == 0;
        if let (Some((m, cast)), true) = (cast, member) {
            // Tried once: what it could not send (flow control, pages lost
            // before) is not tried again after the TCP answer.
            if m.multicast(&r.name, cast, r.first, &out[wire::REPLY_LEN..], &mut dgram) {
                m.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                s.write_all(&wire::encode_reply_with(
                    Status::Coalesced,
                    r.first,
                    r.count,
                    cast.sent(),
                ))?;
                continue;
            }
        }
        out[..wire::REPLY_LEN].copy_from_slice(&wire::encode_reply_with(
            Status::Ok,
            r.first,
            r.count,
            sent,
        ));
        inc(&c.pages_served, r.count as u64);
        inc(&c.bytes_served, len as u64);
        s.write_all(&out)?;
        // The asker has its pages; now the copies for the other hosts.
        if let (Some((m, cast)), false) = (cast, member) {
            m.multicast(&r.name, cast, r.first, &out[wire::REPLY_LEN..], &mut dgram);
        }
    }
}
