//! The control channel between the daemons of a cluster.
//!
//! Each daemon listens on `listen` (TCP). A connection starts with the
//! cluster-key handshake of [`snowflock_proto::auth`] (both sides prove
//! they hold the key; nothing else is read before that) and then carries
//! exactly what the local admin socket carries: one [`AdminRequest`] and
//! its answers. Daemons use it to ask each other for capacity, to start
//! and stop clones, to report clones that ended, and to forward a user's
//! `vm exec|stop|console|stats` to the host that runs the VM. Holding the
//! cluster key is therefore cluster-admin power, as root on a host is.

use crate::admin::chain;
use crate::daemon::Daemon;
use snowflock_proto::admin::{AdminRequest, AdminResponse, VmInfo};
use snowflock_proto::auth::{self, ClusterKey};
use snowflock_proto::frame::tokio_io::{read_frame, write_frame};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Time a peer gets to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to open a connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Most control connections served at once.
const MAX_CONNECTIONS: usize = 256;

/// Errors talking to another host.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("host {0:?} is not in this host's cluster configuration")]
    UnknownHost(String),
    #[error("this host is not part of a cluster")]
    NoCluster,
    #[error("cannot reach host {host} at {addr}")]
    Connect {
        host: String,
        addr: SocketAddr,
        #[source]
        err: std::io::Error,
    },
    #[error("host {host} at {addr} failed the cluster-key handshake")]
    Auth {
        host: String,
        addr: SocketAddr,
        #[source]
        err: auth::AuthError,
    },
    #[error("host {host} did not answer in time")]
    Timeout { host: String },
    #[error("host {host} broke the control protocol")]
    Protocol {
        host: String,
        #[source]
        err: snowflock_proto::frame::FrameError,
    },
}

async fn server_handshake(s: &mut TcpStream, key: &ClusterKey) -> Result<(), auth::AuthError> {
    let (hs, hello) = auth::ServerHandshake::new();
    s.write_all(&hello).await?;
    let mut resp = [0u8; auth::RESPONSE_LEN];
    s.read_exact(&mut resp).await?;
    let confirm = hs.check(key, &resp)?;
    s.write_all(&confirm).await?;
    Ok(())
}

async fn client_handshake(s: &mut TcpStream, key: &ClusterKey) -> Result<(), auth::AuthError> {
    let mut hello = [0u8; auth::HELLO_LEN];
    s.read_exact(&mut hello).await?;
    let (hs, resp) = auth::ClientHandshake::respond(key, &hello)?;
    s.write_all(&resp).await?;
    let mut confirm = [0u8; auth::CONFIRM_LEN];
    s.read_exact(&mut confirm).await?;
    hs.check_confirm(key, &confirm)
}

/// Accepts control connections from other hosts until shutdown.
pub async fn serve(d: Arc<Daemon>, listener: TcpListener, key: Arc<ClusterKey>) {
    let mut shutdown = d.shutdown.subscribe();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut s, from) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::daemon::wait_until(&mut shutdown, |s| *s) => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%from, "too many control connections; refusing one");
            continue;
        };
        let (d, key) = (d.clone(), key.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = s.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, server_handshake(&mut s, &key)).await {
                Ok(Ok(())) => crate::admin::connection(d, s, true).await,
                Ok(Err(e)) => {
                    d.counters
                        .peer_auth_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%from, error = %chain(&e), "control connection refused");
                }
                Err(_) => {
                    d.counters
                        .peer_auth_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%from, "control connection did not complete the handshake in time");
                }
            }
        });
    }
}

/// Opens an authenticated control connection to `host`.
pub async fn connect(d: &Daemon, host: &str) -> Result<TcpStream, PeerError> {
    let c = d.cfg.cluster.as_ref().ok_or(PeerError::NoCluster)?;
    let key = d.key.as_ref().ok_or(PeerError::NoCluster)?;
    let addr = c
        .peer(host)
        .ok_or_else(|| PeerError::UnknownHost(host.into()))?
        .addr;
    let mut s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => {
            return Err(PeerError::Connect {
                host: host.into(),
                addr,
                err,
            })
        }
        Err(_) => return Err(PeerError::Timeout { host: host.into() }),
    };
    let _ = s.set_nodelay(true);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, client_handshake(&mut s, key)).await {
        Ok(Ok(())) => Ok(s),
        Ok(Err(err)) => Err(PeerError::Auth {
            host: host.into(),
            addr,
            err,
        }),
        Err(_) => Err(PeerError::Timeout { host: host.into() }),
    }
}

/// Sends one request to `host` and reads one answer, within `timeout`.
pub async fn call(
    d: &Daemon,
    host: &str,
    req: &AdminRequest,
    timeout: Duration,
) -> Result<AdminResponse, PeerError> {
    let work = async {
        let mut s = connect(d, host).await?;
        write_frame(&mut s, req)
            .await
            .map_err(|err| PeerError::Protocol {
                host: host.into(),
                err,
            })?;
        read_frame::<_, AdminResponse>(&mut s)
            .await
            .map_err(|err| PeerError::Protocol {
                host: host.into(),
                err,
            })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| PeerError::Timeout { host: host.into() })?
}

/// Names of the other hosts.
pub fn peer_names(d: &Daemon) -> Vec<String> {
    d.cfg
        .cluster
        .as_ref()
        .map(|c| c.peers.iter().map(|p| p.name.clone()).collect())
        .unwrap_or_default()
}

/// Sends `req` to every other host at once; one answer per peer, in
/// configuration order.
pub async fn call_all(
    d: &Daemon,
    req: &AdminRequest,
    timeout: Duration,
) -> Vec<(String, Result<AdminResponse, PeerError>)> {
    let peers = peer_names(d);
    let answers = futures::future::join_all(peers.iter().map(|p| call(d, p, req, timeout))).await;
    peers.into_iter().zip(answers).collect()
}

/// Every host's VMs: this host's, then each peer's. Hosts that do not
/// answer are listed with the reason.
pub async fn cluster_list(d: &Arc<Daemon>) -> (Vec<VmInfo>, Vec<String>) {
    let mut vms = d.list();
    let mut unreachable = Vec::new();
    for (p, a) in call_all(d, &AdminRequest::VmListLocal, Duration::from_secs(3)).await {
        match a {
            Ok(AdminResponse::VmList { vms: v, .. }) => vms.extend(v),
            Ok(other) => unreachable.push(format!("{p}: unexpected answer {other:?}")),
            Err(e) => unreachable.push(format!("{p}: {}", chain(&e))),
        }
    }
    (vms, unreachable)
}

/// The peer that runs VM `name`, if any answers for it.
pub async fn locate(d: &Arc<Daemon>, name: &str) -> Option<String> {
    let (vms, _) = cluster_list(d).await;
    vms.into_iter()
        .find(|v| v.name == name && v.host != d.cfg.host)
        .map(|v| v.host)
}

/// Hands a user's admin connection to the host that runs the VM: sends the
/// request there and relays bytes both ways until either side closes.
pub async fn forward<S>(
    d: &Arc<Daemon>,
    host: &str,
    req: &AdminRequest,
    mut client: S,
) -> Result<(), PeerError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut s = connect(d, host).await?;
    write_frame(&mut s, req)
        .await
        .map_err(|err| PeerError::Protocol {
            host: host.into(),
            err,
        })?;
    let _ = tokio::io::copy_bidirectional(&mut client, &mut s).await;
    Ok(())
}

/// Reports to the origin host that one of its clones ended. Retried for a
/// while: the origin may be busy or briefly unreachable.
pub fn notify_child_ended(
    d: Arc<Daemon>,
    origin: String,
    ticket: String,
    clone_id: u32,
    state: snowflock_proto::api::ChildState,
) {
    tokio::spawn(async move {
        let req = AdminRequest::PeerChildEnded {
            ticket: ticket.clone(),
            clone_id,
            state,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            match call(&d, &origin, &req, Duration::from_secs(5)).await {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%origin, %ticket, clone_id, error = %chain(&e), "cannot report a clone's end yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::warn!(%origin, %ticket, clone_id, error = %chain(&e), "gave up reporting a clone's end to its origin");
                    return;
                }
            }
        }
    });
}
