//! The cluster channel, server side: accepts other daemons' connections,
//! checks the cluster key, and answers [`PeerRequest`]s. Only peer requests
//! are accepted here (never a CLI-only one such as `vm start` or
//! `shutdown`), and nothing is forwarded again.

use super::admin::{console, stats, vm_stop};
use crate::cluster::tcp::HANDSHAKE_TIMEOUT;
use crate::lifecycle::Daemon;
use crate::state::metrics::bump;
use snowflock_proto::admin::{AdminErrorCode as C, AdminResponse};
use snowflock_proto::auth::{self, ClusterKey};
use snowflock_proto::error::chain;
use snowflock_proto::frame::tokio_io::{read_frame, write_frame};
use snowflock_proto::frame::FrameError;
use snowflock_proto::peer::PeerRequest;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tracing::Instrument;

/// Most control connections served at once.
const MAX_CONNECTIONS: usize = 256;

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
            _ = crate::lifecycle::daemon::wait_until(&mut shutdown, |s| *s) => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%from, "too many control connections; refusing one");
            continue;
        };
        let (d, key) = (d.clone(), key.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = s.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, auth::server_async(&mut s, &key)).await {
                Ok(Ok(())) => connection(d, s).await,
                Ok(Err(e)) => {
                    bump(&d.counters.peer_auth_failures);
                    tracing::warn!(%from, error = %chain(&e), "control connection refused");
                }
                Err(_) => {
                    bump(&d.counters.peer_auth_failures);
                    tracing::warn!(%from, "control connection did not complete the handshake in time");
                }
            }
        });
    }
}

/// Serves one authenticated connection from another host.
pub async fn connection<S>(d: Arc<Daemon>, mut s: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let req: PeerRequest = match read_frame(&mut s).await {
        Ok(r) => r,
        Err(FrameError::Closed) => return,
        Err(e) => {
            let msg = format!("Malformed request: {}", chain(&e));
            let _ = write_frame(&mut s, &super::reply::err(C::BadRequest, msg)).await;
            return;
        }
    };
    if let PeerRequest::Exec { name, argv } = req {
        return super::exec::exec(d, s, name, argv).await;
    }
    let resp = answer(&d, req).await;
    let _ = write_frame(&mut s, &resp).await;
}

/// The answer to one peer request (all but `Exec`, which streams).
pub async fn answer(d: &Arc<Daemon>, req: PeerRequest) -> AdminResponse {
    match req {
        PeerRequest::VmListLocal => AdminResponse::VmList {
            vms: d.list(),
            unreachable: vec![],
        },
        PeerRequest::Capacity => AdminResponse::Capacity {
            host: d.cfg.host.clone(),
            free: d.free_slots(),
        },
        PeerRequest::StartClones {
            descriptor,
            clone_ids,
            page_server,
        } => {
            let span = tracing::info_span!("remote_start", ticket = tracing::field::Empty, ids = ?clone_ids);
            crate::ops::clone::remote::start_remote(d, &descriptor, &clone_ids, &page_server)
                .instrument(span)
                .await
        }
        PeerRequest::StopClones { ticket, reason } => {
            d.stop_ticket_clones(&ticket, &reason)
                .instrument(tracing::info_span!("stop_clones", %ticket))
                .await;
            AdminResponse::Ok
        }
        PeerRequest::ChildEnded {
            ticket,
            clone_id,
            state,
        } => {
            crate::ops::api::child_ended(d, &ticket, clone_id, state);
            AdminResponse::Ok
        }
        PeerRequest::VmStop { name } => vm_stop(d, &name).await,
        PeerRequest::VmConsole { name } => console(d, &name),
        PeerRequest::Stats { name } => stats(d, &name),
        PeerRequest::Exec { .. } => super::reply::err(C::BadRequest, "exec streams"),
    }
}
