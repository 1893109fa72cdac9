//! The admin socket: requests from the `snowflock` CLI.

use crate::daemon::{Daemon, DaemonError, ExecEvent, NewVm};
use snowflock_proto::admin::{
    Accel, AdminErrorCode as C, AdminRequest, AdminResponse, DaemonStatus, ExecInput,
};
use snowflock_proto::channel::{HostMsg, MAX_CHUNK};
use snowflock_proto::frame::tokio_io::{read_frame, write_frame};
use snowflock_proto::frame::FrameError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;

fn err(code: C, e: impl std::fmt::Display) -> AdminResponse {
    AdminResponse::Error {
        code,
        message: e.to_string(),
    }
}

/// Renders an error with its sources, the way users see it.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn daemon_err(e: DaemonError) -> AdminResponse {
    let code = match &e {
        DaemonError::NoSuchVm(_) => C::NotFound,
        DaemonError::VmExists(_) => C::AlreadyExists,
        DaemonError::BadRequest(_) => C::BadRequest,
        DaemonError::Image(_) => C::BadImage,
        DaemonError::NoCapacity(_) => C::Unavailable,
        _ => C::Failed,
    };
    err(code, chain(&e))
}

pub async fn serve(d: Arc<Daemon>, listener: UnixListener) {
    let mut shutdown = d.shutdown.subscribe();
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => { tokio::spawn(connection(d.clone(), s, false)); }
                Err(e) => { tracing::warn!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(50)).await; }
            },
            _ = crate::daemon::wait_until(&mut shutdown, |s| *s) => return,
        }
    }
}

/// Serves one admin connection: a local CLI's (`from_peer` false) or
/// another daemon's over the authenticated control channel. Requests naming
/// a VM this host does not run are forwarded to the host that runs it;
/// requests from peers are never forwarded again.
pub async fn connection<S>(d: Arc<Daemon>, mut s: S, from_peer: bool)
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
    if !from_peer && d.cfg.cluster.is_some() {
        let target = match &req {
            AdminRequest::VmStop { name }
            | AdminRequest::VmConsole { name }
            | AdminRequest::Exec { name, .. }
            | AdminRequest::Stats { name } => Some(name.clone()),
            _ => None,
        };
        if let Some(name) = target.filter(|n| d.vm(n).is_err()) {
            if let Some(host) = crate::peer::locate(&d, &name).await {
                tracing::debug!(vm = %name, %host, "forwarding admin request");
                if let Err(e) = crate::peer::forward(&d, &host, &req, &mut s).await {
                    let _ = write_frame(&mut s, &err(C::Unavailable, chain(&e))).await;
                }
                return;
            }
        }
    }
    let resp = match req {
        AdminRequest::Status => AdminResponse::Status(DaemonStatus {
            host: d.cfg.host.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            state_dir: d.cfg.state_dir.display().to_string(),
            vms: d.state.lock().unwrap().vms.len(),
            uptime_s: d.started.elapsed().as_secs(),
            accel: if crate::config::host_has_hw_virt() {
                "kvm".into()
            } else {
                "tcg".into()
            },
            counters: d.counter_map(),
            peers: crate::peer::peer_names(&d),
            recent_losses: d.losses.lock().unwrap().iter().cloned().collect(),
        }),
        AdminRequest::VmList if !from_peer => {
            let (vms, unreachable) = crate::peer::cluster_list(&d).await;
            AdminResponse::VmList { vms, unreachable }
        }
        AdminRequest::VmList | AdminRequest::VmListLocal => AdminResponse::VmList {
            vms: d.list(),
            unreachable: vec![],
        },
        AdminRequest::Stats { name } => match d.vm(&name) {
            Ok(vm) => AdminResponse::Stats(d.vm_stats(&vm)),
            Err(e) => daemon_err(e),
        },
        AdminRequest::PeerCapacity => {
            let free = {
                let mut st = d.state.lock().unwrap();
                crate::api::purge(&mut st);
                Daemon::free_slots(&st, d.cfg.max_vms)
            };
            AdminResponse::Capacity {
                host: d.cfg.host.clone(),
                free,
            }
        }
        AdminRequest::PeerStartClones {
            descriptor,
            clone_ids,
            page_server,
        } if from_peer => {
            crate::clone::start_remote(&d, &descriptor, &clone_ids, &page_server).await
        }
        AdminRequest::PeerStopClones { ticket, reason } if from_peer => {
            crate::api::stop_ticket_clones(&d, &ticket, &reason).await;
            AdminResponse::Ok
        }
        AdminRequest::PeerChildEnded {
            ticket,
            clone_id,
            state,
        } if from_peer => {
            crate::api::child_ended(&d, &ticket, clone_id, state);
            AdminResponse::Ok
        }
        AdminRequest::PeerStartClones { .. }
        | AdminRequest::PeerStopClones { .. }
        | AdminRequest::PeerChildEnded { .. } => err(
            C::BadRequest,
            "This request is only accepted from other hosts of the cluster",
        ),
        AdminRequest::VmStart {
            name,
            image,
            mem_mib,
            vcpus,
            accel,
        } => match vm_start(&d, name, image, mem_mib, vcpus, accel).await {
            Ok(r) => r,
            Err(e) => daemon_err(e),
        },
        AdminRequest::VmStop { name } => match d.vm(&name) {
            Ok(vm) => {
                d.stop_vm(&vm).await;
                AdminResponse::Ok
            }
            Err(e) => daemon_err(e),
        },
        AdminRequest::VmConsole { name } => match d.vm(&name) {
            // The last 2 MiB: the guest decides how much it prints.
            Ok(vm) => AdminResponse::Console {
                data: crate::daemon::read_tail(&crate::vm::console_path(&vm.dir), 2 << 20),
            },
            Err(e) => daemon_err(e),
        },
        AdminRequest::CloneReports => AdminResponse::CloneReports {
            reports: d.state.lock().unwrap().reports.clone(),
        },
        AdminRequest::Exec { name, argv } => return exec(d, s, name, argv).await,
        AdminRequest::Shutdown => {
            d.stop_all().await;
            let _ = write_frame(&mut s, &AdminResponse::Ok).await;
            d.shutdown.send_replace(true);
            return;
        }
    };
    let _ = write_frame(&mut s, &resp).await;
}

async fn vm_start(
    d: &Arc<Daemon>,
    name: String,
    image: String,
    mem_mib: u32,
    vcpus: u32,
    accel: Accel,
) -> Result<AdminResponse, DaemonError> {
    if !snowflock_proto::admin::valid_vm_name(&name) {
        return Err(DaemonError::BadRequest(format!(
            "Invalid VM name {name:?}: use 1-48 of a-z, 0-9 and '-', starting with a letter"
        )));
    }
    if !(64..=65536).contains(&mem_mib) {
        return Err(DaemonError::BadRequest(format!(
            "Memory must be 64 MiB to 64 GiB, got {mem_mib} MiB"
        )));
    }
    if !(1..=64).contains(&vcpus) {
        return Err(DaemonError::BadRequest(format!(
            "vCPUs must be 1 to 64, got {vcpus}"
        )));
    }
    let accel = match accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
        Accel::Auto if crate::config::host_has_hw_virt() => "kvm",
        Accel::Auto => "tcg",
    };
    if looks_like_clone_name(&name) {
        return Err(DaemonError::BadRequest(format!(
            "Invalid VM name {name:?}: names ending in -g<N>c<N> are reserved for clones"
        )));
    }
    let image_dir = PathBuf::from(&image);
    let img = snowflock_image::Image::open(&image_dir)?;
    let image_dir = std::fs::canonicalize(&image_dir).unwrap_or(image_dir);
    let flock = {
        let mut st = d.state.lock().unwrap();
        if st.vms.contains_key(&name) {
            return Err(DaemonError::VmExists(name));
        }
        crate::api::purge(&mut st);
        if Daemon::free_slots(&st, d.cfg.max_vms) == 0 {
            return Err(DaemonError::NoCapacity(format!(
                "This host runs its maximum of {} VMs",
                d.cfg.max_vms
            )));
        }
        d.alloc_flock(&mut st)?
    };
    // Under TCG the guest calibrates its TSC against emulated timers, which
    // fails on a loaded host and can hang the boot; tell it the rate.
    let tsc = snowflock_image::host_tsc_khz()
        .map(|k| format!(" tsc_early_khz={k}"))
        .unwrap_or_default();
    let cmdline = format!(
        "{}{tsc} sf.vm={name} sf.hostname={name} sf.ip={} sf.mac={} sf.machine_id={}",
        img.manifest.cmdline,
        crate::net::ip_cidr(flock, 0),
        crate::net::mac(flock, 0),
        crate::daemon::random_hex(16)
    );
    let created = d
        .create_vm(NewVm {
            name: name.clone(),
            flock,
            clone_id: 0,
            ticket: None,
            parent: name.clone(),
            mem_mib,
            vcpus,
            accel: accel.into(),
            image: image_dir,
            kernel: img.vmlinux.clone(),
            initrd: img.initramfs.clone(),
            cmdline,
            generation_ram: None,
            origin: None,
            memory: crate::daemon::MemSource::Own,
        })
        .await;
    let vm = match created {
        Ok(vm) => vm,
        Err(e) => {
            d.state.lock().unwrap().flocks.remove(&flock);
            return Err(e);
        }
    };
    if let Err(e) = d
        .wait_agent(&vm, Duration::from_secs(d.cfg.boot_timeout_s))
        .await
    {
        d.stop_vm(&vm).await;
        return Err(e);
    }
    Ok(AdminResponse::Vm(vm.info(&d.cfg.host)))
}

/// Clone VMs are named `<parent>-g<generation>c<clone id>`.
fn looks_like_clone_name(name: &str) -> bool {
    let Some((_, tail)) = name.rsplit_once("-g") else {
        return false;
    };
    let Some((g, c)) = tail.split_once('c') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(g) && digits(c)
}

/// Streams one `vm exec`: client frames are stdin, daemon frames output.
async fn exec<S>(d: Arc<Daemon>, s: S, name: String, argv: Vec<String>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(s);
    let vm = match d.vm(&name) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = write_frame(&mut wr, &daemon_err(e)).await;
            return;
        }
    };
    if argv.is_empty() {
        let _ = write_frame(&mut wr, &err(C::BadRequest, "No command given")).await;
        return;
    }
    if let Err(e) = d.wait_agent(&vm, Duration::from_secs(10)).await {
        let _ = write_frame(&mut wr, &daemon_err(e)).await;
        return;
    }
    let exec_id = {
        let mut st = d.state.lock().unwrap();
        st.next_exec += 1;
        st.next_exec
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(crate::daemon::EXEC_QUEUE);
    vm.execs.lock().unwrap().insert(exec_id, tx);
    vm.send(HostMsg::ExecStart {
        exec: exec_id,
        argv,
        env: vec![],
    });
    // Stdin frames are read by their own task: read_frame is not cancel-safe.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<ExecInput>>(4);
    let reader = tokio::spawn(async move {
        loop {
            match read_frame::<_, ExecInput>(&mut rd).await {
                Ok(i) => {
                    if in_tx.send(Some(i)).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = in_tx.send(None).await;
                    return;
                }
            }
        }
    });
    let mut stdin_open = true;
    let mut ended = vm.ended.subscribe();
    loop {
        tokio::select! {
            _ = crate::daemon::wait_until(&mut ended, |e| e.is_some()) => {
                // The monitor may have drained the sessions before ours was
                // registered: answer here rather than wait forever.
                let _ = write_frame(&mut wr, &err(C::Failed, format!("VM {} ended", vm.name))).await;
                break;
            }
            ev = rx.recv() => {
                let (resp, done) = match ev {
                    Some(ExecEvent::Output(stream, data)) => (AdminResponse::ExecOutput { stream, data }, false),
                    Some(ExecEvent::Exit(code)) => (AdminResponse::ExecExit { code }, true),
                    Some(ExecEvent::Error(m)) => (err(C::Failed, m), true),
                    None => (err(C::Failed, "The command's output outran this client; the command was killed"), true),
                };
                if write_frame(&mut wr, &resp).await.is_err() {
                    vm.send(HostMsg::ExecKill { exec: exec_id });
                    break;
                }
                if done { break; }
            }
            // Polled after stdin's EOF too, to notice the client leaving.
            i = in_rx.recv() => match i {
                Some(Some(_)) if !stdin_open => {}
                Some(Some(input)) => {
                    let eof = input.eof;
                    for (n, chunk) in input.data.chunks(MAX_CHUNK).enumerate() {
                        let last = (n + 1) * MAX_CHUNK >= input.data.len();
                        vm.send(HostMsg::ExecStdin { exec: exec_id, data: chunk.to_vec(), eof: eof && last });
                    }
                    if input.data.is_empty() {
                        vm.send(HostMsg::ExecStdin { exec: exec_id, data: vec![], eof });
                    }
                    if eof { stdin_open = false; }
                }
                _ => {
                    // Client went away: end the process.
                    vm.send(HostMsg::ExecKill { exec: exec_id });
                    break;
                }
            },
        }
    }
    vm.execs.lock().unwrap().remove(&exec_id);
    reader.abort();
}

#[cfg(test)]
mod tests {
    #[test]
    fn clone_names_are_reserved() {
        assert!(super::looks_like_clone_name("web-g1c2"));
        assert!(super::looks_like_clone_name("a-b-g12c300"));
        assert!(!super::looks_like_clone_name("web"));
        assert!(!super::looks_like_clone_name("web-g1"));
        assert!(!super::looks_like_clone_name("web-gxc1"));
        assert!(!super::looks_like_clone_name("web-g1c"));
    }
}
