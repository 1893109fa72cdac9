//! The host end of a VM's guest channel (virtio-serial, QEMU chardev socket).
//!
//! One task per VM owns the connection: it (re)connects to the chardev
//! socket, says `Hello`, forwards queued [`HostMsg`]s and dispatches every
//! [`GuestMsg`]. The guest's bytes are untrusted: lines are bounded and
//! malformed ones are counted and dropped, never fatal.

use crate::lifecycle::daemon::wait_until;
use crate::lifecycle::Daemon;
use crate::ops::api;
use crate::state::metrics::bump;
use crate::state::vm::{deliver, ChannelHold, ExecEvent, NotReady, Vm, MAX_PENDING_REQUESTS};
use futures::future::BoxFuture;
use snowflock_proto::api::ApiResponse;
use snowflock_proto::channel::{decode_line, encode_line, GuestMsg, HostMsg, LineReader};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

/// The daemon's [`crate::lifecycle::daemon::GuestLink`]: the task that owns
/// a new VM's guest channel.
pub fn link(
    d: Arc<Daemon>,
    vm: Arc<Vm>,
    rx: mpsc::UnboundedReceiver<HostMsg>,
) -> BoxFuture<'static, ()> {
    Box::pin(run(d, vm, rx))
}

async fn run(d: Arc<Daemon>, vm: Arc<Vm>, mut rx: mpsc::UnboundedReceiver<HostMsg>) {
    let path = crate::host::qemu::agent_path(&vm.placed.dir);
    let mut ended = vm.life.subscribe();
    // Messages queued while no connection exists (or writes are held for
    // a handover) wait here.
    let mut backlog: Vec<HostMsg> = Vec::new();
    let mut hold = vm.channel_hold.subscribe();
    loop {
        let done = ended.borrow().is_ended();
        if done {
            return;
        }
        // A connection to the QEMU the VM was handed to, made before it ran.
        let next = vm
            .next_channel
            .lock()
            .take()
            .and_then(|s| s.set_nonblocking(true).ok().map(|()| s))
            .and_then(|s| UnixStream::from_std(s).ok());
        let handed_over = next.is_some();
        if handed_over {
            vm.channel_hold.send_replace(ChannelHold::Off);
        }
        let connected = match next {
            Some(s) => Ok(s),
            None => UnixStream::connect(&path).await,
        };
        let stream = match connected {
            Ok(s) => s,
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = wait_until(&mut ended, |l| l.is_ended()) => {}
                    m = rx.recv() => match m { Some(m) => backlog.push(m), None => return },
                }
                continue;
            }
        };
        tracing::debug!(handed_over, "agent channel connected");
        let (mut rd, mut wr) = stream.into_split();
        let mut reader = LineReader::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut ok = wr
            .write_all(&encode_line(&HostMsg::Hello {
                version: snowflock_proto::CHANNEL_VERSION,
            }))
            .await
            .is_ok();
        let held = |h: &watch::Receiver<ChannelHold>| *h.borrow() != ChannelHold::Off;
        if !held(&hold) {
            for m in backlog.drain(..) {
                ok = ok && wr.write_all(&encode_line(&m)).await.is_ok();
            }
        }
        while ok {
            ok = tokio::select! {
                c = hold.changed() => {
                    let now = *hold.borrow_and_update();
                    match (c, now) {
                        (Err(_), _) => return,
                        (_, ChannelHold::Requested) => {
                            drain(wr.as_ref()).await;
                            vm.channel_hold.send_replace(ChannelHold::Drained);
                            true
                        }
                        (_, ChannelHold::Off) => {
                            let mut sent = true;
                            for m in backlog.drain(..) {
                                sent = sent && wr.write_all(&encode_line(&m)).await.is_ok();
                            }
                            sent
                        }
                        (_, ChannelHold::Drained) => true,
                    }
                },
                n = rd.read(&mut buf) => match n {
                    Ok(0) | Err(_) => false,
                    Ok(n) => {
                        let mut msgs = Vec::new();
                        reader.feed(&buf[..n], |line| match line.map_err(|e| e.to_string())
                            .and_then(|l| decode_line::<GuestMsg>(l).map_err(|e| e.to_string())) {
                            Ok(m) => msgs.push(m),
                            Err(e) => {
                                let c = bump(&d.counters.malformed_guest_lines);
                                if c < 10 || c.is_power_of_two() {
                                    tracing::warn!(error = %e, total = c + 1, "malformed line from guest dropped");
                                }
                            }
                        });
                        for m in msgs {
                            dispatch(&d, &vm, m);
                        }
                        true
                    }
                },
                m = rx.recv() => match m {
                    Some(m) if held(&hold) => {
                        backlog.push(m);
                        true
                    }
                    Some(m) => {
                        let sent = wr.write_all(&encode_line(&m)).await.is_ok();
                        if !sent {
                            backlog.push(m);
                        }
                        sent
                    }
                    None => return,
                },
                _ = wait_until(&mut ended, |l| l.is_ended()) => return,
            };
        }
        vm.agent_up.send_replace(false);
        tracing::debug!("agent channel closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 300 ms) until the QEMU at the other end of `sock` has read
/// everything written to it.
async fn drain(sock: &UnixStream) {
    use std::os::fd::AsFd;
    for _ in 0..300 {
        match crate::host::sys::unread_by_peer(sock.as_fd()) {
            Ok(0) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    tracing::warn!("the guest channel did not drain before the handover");
}

fn dispatch(d: &Arc<Daemon>, vm: &Arc<Vm>, msg: GuestMsg) {
    match msg {
        GuestMsg::Hello {
            version,
            agent,
            clone_id,
            instance,
        } => {
            tracing::debug!(version, %agent, clone_id, instance, "agent hello");
            let previous = vm.agent_instance.swap(instance, Ordering::SeqCst);
            if previous != 0 && instance != previous {
                // A new agent process: whatever the old one ran is gone.
                tracing::warn!("guest agent restarted");
                for (_, tx) in vm.execs.lock().drain() {
                    deliver(
                        tx,
                        ExecEvent::Error(
                            "The guest agent restarted; the command's fate is unknown".into(),
                        ),
                    );
                }
                vm.send(HostMsg::Hello {
                    version: snowflock_proto::CHANNEL_VERSION,
                });
            }
            vm.agent_up.send_replace(true);
            vm.agent_ready();
        }
        GuestMsg::Request { id, req } => match vm.requests.clone().try_acquire_owned() {
            Ok(permit) => {
                let (d, vm) = (d.clone(), vm.clone());
                tokio::spawn(async move {
                    api::handle(d, vm, id, req).await;
                    drop(permit);
                });
            }
            Err(_) => vm.send(HostMsg::Response {
                id,
                resp: ApiResponse::error(
                    snowflock_proto::api::ApiErrorCode::BadRequest,
                    format!("Too many API calls pending (at most {MAX_PENDING_REQUESTS})"),
                ),
            }),
        },
        GuestMsg::Ready { clone_id } => {
            if clone_id != vm.spec.clone_id {
                tracing::warn!(clone_id, "Ready for the wrong clone id ignored");
                return;
            }
            if let Some(tx) = vm.ready.lock().take() {
                let _ = tx.send(Ok(()));
            }
        }
        GuestMsg::CloneFailed { clone_id, message } => {
            tracing::warn!(clone_id, %message, "clone failed to apply its identity");
            if let Some(tx) = vm.ready.lock().take() {
                let _ = tx.send(Err(NotReady::Refused(message)));
            }
        }
        GuestMsg::ExecOutput { exec, stream, data } => {
            let mut execs = vm.execs.lock();
            let full = execs.get(&exec).is_some_and(|tx| {
                matches!(
                    tx.try_send(ExecEvent::Output(stream, data)),
                    Err(mpsc::error::TrySendError::Full(_))
                )
            });
            if full {
                // The client does not keep up: end the command rather than
                // buffer without bound. Dropping the sender tells the client.
                execs.remove(&exec);
                vm.send(HostMsg::ExecKill { exec });
            }
        }
        GuestMsg::ExecExit { exec, code } => {
            if let Some(tx) = vm.execs.lock().remove(&exec) {
                deliver(tx, ExecEvent::Exit(code));
            }
        }
        GuestMsg::ExecError { exec, message } => {
            if let Some(tx) = vm.execs.lock().remove(&exec) {
                deliver(tx, ExecEvent::Error(message));
            }
        }
        GuestMsg::Pong { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::Harness;
    use snowflock_proto::api::{ApiRequest as R, ApiResponse};
    use snowflock_proto::channel::GuestMsg;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn junk_on_the_guest_channel_is_counted_and_dropped() {
        let h = Harness::new();
        let (_, p) = h.start("a").await;
        p.send_raw(b"not json at all\n{\"t\":\"nonsense\"}\n");
        p.send_raw(&vec![b'x'; 200 * 1024]);
        p.send_raw(b"\n");
        p.send(GuestMsg::Ready { clone_id: 5 });
        // The channel still works.
        assert!(matches!(
            p.call(1, R::Id).await,
            ApiResponse::Identity { clone_id: 0, .. }
        ));
        assert!(h.d.counters.map()["malformed_guest_lines"] >= 3);
        assert_eq!(h.vmm.running(), ["a"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guest_has_a_bounded_number_of_calls_in_flight() {
        let h = Harness::new();
        let (_, p) = h.start("p").await;
        let ticket = h.ticket_and_clone(&p, 1).await;
        let max = crate::state::vm::MAX_PENDING_REQUESTS as u64;
        // Joins wait while the clone runs: they hold every slot.
        for id in 0..max {
            p.request(
                100 + id,
                R::Join {
                    ticket: ticket.clone(),
                },
            );
        }
        p.request(999, R::Id);
        let (id, resp) = p.response().await;
        assert_eq!(id, 999);
        match resp {
            ApiResponse::Error { message, .. } => {
                assert_eq!(
                    message,
                    format!("Too many API calls pending (at most {max})")
                )
            }
            other => panic!("{other:?}"),
        }
        // Once the clone exits, the joins are answered and slots free up.
        h.proc("p-g1c1").call(1, R::Exit { status: 0 }).await;
        for _ in 0..max {
            p.response().await;
        }
        assert!(matches!(
            p.call(1000, R::Id).await,
            ApiResponse::Identity { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_agent_fails_open_exec_sessions() {
        let h = Harness::new();
        let (vm, p) = h.start("a").await;
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        vm.execs.lock().insert(77, tx);
        p.send(GuestMsg::Hello {
            version: 1,
            agent: "new".into(),
            clone_id: 0,
            instance: 12345,
        });
        match rx.recv().await {
            Some(crate::state::vm::ExecEvent::Error(m)) => {
                assert!(m.contains("agent restarted"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}
