//! The admin socket: requests from the `snowflock` CLI. A request naming a
//! VM this host does not run is forwarded to the host that runs it.

use super::reply::{daemon_err, err};
use crate::lifecycle::Daemon;
use crate::ops::vm_start::{vm_start, StartRequest};
use snowflock_proto::admin::{AdminErrorCode as C, AdminRequest, AdminResponse, DaemonStatus};
use snowflock_proto::error::chain;
use snowflock_proto::frame::tokio_io::{read_frame, write_frame};
use snowflock_proto::frame::FrameError;
use snowflock_proto::peer::PeerRequest;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;

/// Accepts CLI connections until shutdown.
pub async fn serve(d: Arc<Daemon>, listener: UnixListener) {
    let mut shutdown = d.shutdown.subscribe();
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => { tokio::spawn(connection(d.clone(), s)); }
                Err(e) => { tracing::warn!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(50)).await; }
            },
            _ = crate::lifecycle::daemon::wait_until(&mut shutdown, |s| *s) => return,
        }
    }
}

/// This host's status.
pub fn status(d: &Daemon) -> DaemonStatus {
    DaemonStatus {
        host: d.cfg.host.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        state_dir: d.cfg.state_dir.display().to_string(),
        vms: d.with(|r| r.vms.len()),
        uptime_s: d.started.elapsed().as_secs(),
        accel: if crate::host::config::host_has_hw_virt() {
            "kvm".into()
        } else {
            "tcg".into()
        },
        counters: d.counters.map(),
        peers: d.peers.peers(),
        recent_losses: d.counters.recent_losses(),
    }
}

/// Serves one CLI connection.
pub async fn connection<S>(d: Arc<Daemon>, mut s: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let req: AdminRequest = match read_frame(&mut s).await {
        Ok(r) => r,
        Err(FrameError::Closed) => return,
        Err(e) => {
            let _ = write_frame(
                &mut s,
                &err(C::BadRequest, format!("Malformed request: {}", chain(&e))),
            )
            .await;
            return;
        }
    };
    if d.cfg.cluster.is_some() {
        if let Some(fwd) = PeerRequest::forward(&req) {
            let name = fwd.vm_name().unwrap_or_default().to_string();
            if d.vm(&name).is_err() {
                if let Some(host) = crate::ops::cluster::locate(&d, &name).await {
                    tracing::debug!(vm = %name, %host, "forwarding admin request");
                    if let Err(e) = d.peers.forward(&host, &fwd, &mut s).await {
                        let _ = write_frame(&mut s, &err(C::Unavailable, chain(&e))).await;
                    }
                    return;
                }
            }
        }
    }
    let resp = match req {
        AdminRequest::Status => AdminResponse::Status(status(&d)),
        AdminRequest::VmList => {
            let (vms, unreachable) = crate::ops::cluster::cluster_list(&d).await;
            AdminResponse::VmList { vms, unreachable }
        }
        AdminRequest::Stats { name } => stats(&d, &name),
        AdminRequest::VmStart {
            name,
            image,
            mem_mib,
            vcpus,
            accel,
        } => {
            let req = StartRequest {
                name,
                image,
                mem_mib,
                vcpus,
                accel,
            };
            match vm_start(&d, req).await {
                Ok(vm) => AdminResponse::Vm(vm.info(&d.cfg.host)),
                Err(e) => daemon_err(e),
            }
        }
        AdminRequest::VmStop { name } => vm_stop(&d, &name).await,
        AdminRequest::VmConsole { name } => console(&d, &name),
        AdminRequest::CloneReports => AdminResponse::CloneReports {
            reports: d.with(|r| r.reports.clone()),
        },
        AdminRequest::Exec { name, argv } => return super::exec::exec(d, s, name, argv).await,
        AdminRequest::Shutdown => {
            d.stop_all().await;
            let _ = write_frame(&mut s, &AdminResponse::Ok).await;
            d.shutdown.send_replace(true);
            return;
        }
    };
    let _ = write_frame(&mut s, &resp).await;
}

/// `stats NAME` for a VM of this host.
pub(super) fn stats(d: &Daemon, name: &str) -> AdminResponse {
    match d.vm(name) {
        Ok(vm) => AdminResponse::Stats(d.vm_stats(&vm)),
        Err(e) => daemon_err(e),
    }
}

/// `vm stop NAME` for a VM of this host.
pub(super) async fn vm_stop(d: &Arc<Daemon>, name: &str) -> AdminResponse {
    match d.vm(name) {
        Ok(vm) => {
            d.stop_vm(&vm).await;
            AdminResponse::Ok
        }
        Err(e) => daemon_err(e),
    }
}

/// `vm console NAME`: the last 2 MiB (the guest decides how much it
/// prints).
pub(super) fn console(d: &Daemon, name: &str) -> AdminResponse {
    match d.vm(name) {
        Ok(vm) => AdminResponse::Console {
            data: crate::host::console::read_tail(
                &crate::host::qemu::console_path(&vm.placed.dir),
                2 << 20,
            ),
        },
        Err(e) => daemon_err(e),
    }
}
