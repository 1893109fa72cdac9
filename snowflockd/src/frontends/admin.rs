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
        allocator: d.alloc.kind().into(),
        allocations: d
            .alloc
            .held()
            .into_iter()
            .map(|(ticket, job)| snowflock_proto::admin::Allocation { ticket, job })
            .collect(),
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
            disk,
            kernel,
            initrd,
        } => {
            let req = StartRequest {
                name,
                image,
                mem_mib,
                vcpus,
                accel,
                disk,
                kernel,
                initrd,
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

#[cfg(test)]
mod tests {
    use crate::testing::Harness;
    use snowflock_proto::admin::{
        Accel, AdminErrorCode as C, AdminRequest, AdminResponse, ExecInput,
    };
    use snowflock_proto::frame::tokio_io::{read_frame, write_frame};
    use tokio::io::AsyncWriteExt;

    /// Sends one request over a real in-memory stream; the first answer.
    async fn ask(h: &Harness, req: &AdminRequest) -> AdminResponse {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(super::connection(h.d.clone(), server));
        write_frame(&mut client, req).await.unwrap();
        read_frame(&mut client).await.unwrap()
    }

    fn start(h: &Harness, name: &str) -> AdminRequest {
        AdminRequest::VmStart {
            name: name.into(),
            image: h.image.display().to_string(),
            mem_mib: 64,
            vcpus: 1,
            accel: Accel::Tcg,
            disk: None,
            kernel: None,
            initrd: None,
        }
    }

    fn error(r: AdminResponse) -> (C, String) {
        match r {
            AdminResponse::Error { code, message } => (code, message),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vm_start_list_stop_and_their_errors() {
        let h = Harness::build(|c| c.max_vms = 2, false);
        assert!(matches!(ask(&h, &start(&h, "a")).await, AdminResponse::Vm(v) if v.name == "a"));
        let (code, msg) = error(ask(&h, &start(&h, "a")).await);
        assert_eq!(
            (code, msg.as_str()),
            (C::AlreadyExists, "A VM named \"a\" already exists")
        );
        let (code, _) = error(ask(&h, &start(&h, "Bad Name")).await);
        assert_eq!(code, C::BadRequest);
        let mut bad = start(&h, "b");
        if let AdminRequest::VmStart { image, .. } = &mut bad {
            *image = "/nonexistent".into();
        }
        assert_eq!(error(ask(&h, &bad).await).0, C::BadImage);
        assert!(matches!(
            ask(&h, &start(&h, "b")).await,
            AdminResponse::Vm(_)
        ));
        let (code, msg) = error(ask(&h, &start(&h, "c")).await);
        assert_eq!(code, C::Unavailable);
        assert!(msg.contains("maximum of 2 VMs"), "{msg}");
        match ask(&h, &AdminRequest::VmList).await {
            AdminResponse::VmList { vms, unreachable } => {
                assert_eq!(vms.len(), 2);
                assert!(unreachable.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ask(&h, &AdminRequest::VmStop { name: "a".into() }).await,
            AdminResponse::Ok
        );
        let (code, msg) = error(ask(&h, &AdminRequest::VmStop { name: "a".into() }).await);
        assert_eq!((code, msg.as_str()), (C::NotFound, "No VM named \"a\""));
        match ask(&h, &AdminRequest::Status).await {
            AdminResponse::Status(s) => {
                assert_eq!(s.vms, 1);
                assert_eq!(s.counters["vms_started"], 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vms_that_fetch_nothing_are_complete_but_not_independent() {
        let h = Harness::new();
        let (_, p) = h.start("p").await;
        h.ticket_and_clone(&p, 1).await;
        for (vm, memory) in [("p", "own"), ("p-g1c1", "local")] {
            match ask(&h, &AdminRequest::Stats { name: vm.into() }).await {
                AdminResponse::Stats(s) => {
                    assert_eq!(s.memory, memory);
                    assert_eq!(s.completion, 1.0);
                    assert!(!s.independent);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_frames_get_a_clear_answer() {
        let h = Harness::new();
        let (mut client, server) = tokio::io::duplex(4096);
        tokio::spawn(super::connection(h.d.clone(), server));
        client.write_all(&5u32.to_le_bytes()).await.unwrap();
        client.write_all(b"{junk").await.unwrap();
        let (code, msg) = error(read_frame(&mut client).await.unwrap());
        assert_eq!(code, C::BadRequest);
        assert!(msg.starts_with("Malformed request"), "{msg}");
        // A peer-only request is not an admin request.
        let (mut client, server) = tokio::io::duplex(4096);
        tokio::spawn(super::connection(h.d.clone(), server));
        write_frame(
            &mut client,
            &serde_json::json!({"op": "peer_stop_clones", "ticket": "t", "reason": "r"}),
        )
        .await
        .unwrap();
        assert_eq!(
            error(read_frame(&mut client).await.unwrap()).0,
            C::BadRequest
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exec_streams_output_and_exit_code() {
        let h = Harness::new();
        h.start("a").await;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(super::connection(h.d.clone(), server));
        let argv = vec!["echo".to_string(), "hi".to_string()];
        write_frame(
            &mut client,
            &AdminRequest::Exec {
                name: "a".into(),
                argv,
            },
        )
        .await
        .unwrap();
        // The fake command ends at once: the session may be gone before
        // stdin's end arrives, which is fine.
        let _ = write_frame(
            &mut client,
            &ExecInput {
                data: vec![],
                eof: true,
            },
        )
        .await;
        match read_frame(&mut client).await.unwrap() {
            AdminResponse::ExecOutput { data, .. } => assert_eq!(data, b"echo hi"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read_frame::<_, AdminResponse>(&mut client).await.unwrap(),
            AdminResponse::ExecExit { code: 0 }
        );
        let empty = AdminRequest::Exec {
            name: "a".into(),
            argv: vec![],
        };
        assert_eq!(error(ask(&h, &empty).await).0, C::BadRequest);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_one_task_does_not_take_the_daemon_down() {
        let h = Harness::new();
        h.start("a").await;
        // A task panics while it holds the registry lock.
        let d = h.d.clone();
        let crashed = tokio::spawn(async move {
            d.with(|r| {
                r.next_index += 1;
                panic!("a bug in one request");
            })
        })
        .await;
        assert!(crashed.unwrap_err().is_panic());
        // The lock is not poisoned and every path that takes it still works.
        assert_eq!(h.d.list().len(), 1);
        assert!(matches!(
            ask(&h, &start(&h, "b")).await,
            AdminResponse::Vm(_)
        ));
        assert_eq!(
            ask(&h, &AdminRequest::VmStop { name: "a".into() }).await,
            AdminResponse::Ok
        );
        assert_eq!(h.vmm.running(), ["b"]);
    }
}
