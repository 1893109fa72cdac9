//! Exit supervision: what happens when a VM's process ends, whoever ended
//! it; stopping clones whose memory origin is gone; console trimming.

use super::daemon::{wait_until, Daemon};
use crate::host::console;
use crate::state::metrics::bump;
use crate::state::vm::{outcome, EndCause, MemSource, Vm};
use futures::future::BoxFuture;
use snowflock_proto::admin::VmState;
use snowflock_proto::api::ChildState;
use snowflock_proto::peer::PeerRequest;
use std::sync::Arc;
use std::time::Duration;

impl Daemon {
    /// Waits for the VM's process to exit, then cleans up and records why:
    /// in its ticket (here, or on the origin host for a remote clone), in
    /// the counters, and for whoever waits on the VM. A parent that died on
    /// its own takes its clones with it.
    pub(super) async fn monitor(
        self: Arc<Self>,
        vm: Arc<Vm>,
        exit: BoxFuture<'static, Result<String, String>>,
    ) {
        let pid = *vm.pid.lock();
        let status = exit.await;
        // A clone whose origin stopped serving pages dies of SIGBUS on the
        // failed read, possibly before the memtap event has named the cause.
        let fetch_failed = match (&vm.spec.memory, &self.memtap) {
            (MemSource::Remote { generation, .. }, Some(m))
                if m.generation_stats(generation)
                    .is_some_and(|s| s.fetch_errors > 0) =>
            {
                Some(format!(
                    "its memory origin {} stopped serving pages (a page fetch failed)",
                    vm.spec.origin.as_deref().unwrap_or("?")
                ))
            }
            _ => None,
        };
        let out = outcome(&vm.life(), status, fetch_failed);
        if out.requested {
            tracing::info!("VM stopped");
        } else {
            let log = std::fs::read_to_string(vm.placed.dir.join("qemu.log"))
                .ok()
                .map(|l| l.lines().rev().take(3).collect::<Vec<_>>().join(" | "))
                .unwrap_or_default();
            tracing::warn!(reason = %out.reason, qemu_log = %log, "VM lost");
            self.counters.lost(vm.name(), &out.reason);
        }
        *vm.console_tail.lock() = super::console_tail(&vm);
        *vm.pid.lock() = None;
        vm.set_state(VmState::Stopping);
        vm.fail_waiters(&out.reason);
        let spec = &vm.spec;
        self.with(|r| {
            r.vms.remove(vm.name());
            if let Some(t) = &spec.ticket {
                r.child_ended(t, spec.clone_id, out.child_state.clone());
            }
            if !spec.is_clone() {
                r.flocks.remove(&spec.flock);
            }
        });
        if let (Some(origin), Some(ticket)) = (&spec.origin, &spec.ticket) {
            self.notify_child_ended(origin, ticket, spec.clone_id, out.child_state.clone());
        }
        if let (MemSource::Remote { generation, .. }, Some(m)) = (&spec.memory, &self.memtap) {
            m.release_generation(generation);
            if let Some(pid) = pid {
                m.forget_pid(pid);
            }
        }
        self.release_vm_resources(&vm).await;
        // The flock's links go with its last VM on this host (and the
        // parent's reservation of the number).
        if !self.with(|r| r.flock_in_use(spec.flock)) {
            let (net, vx, br) = (
                self.net.clone(),
                self.names.vxlan(spec.flock),
                self.names.bridge(spec.flock),
            );
            let _ = super::daemon::blocking(move || {
                let _ = net.delete_link(&vx);
                let _ = net.delete_link(&br);
                Ok(())
            })
            .await;
        }
        vm.finish(out.ended);
        self.bump_tickets();
        if !spec.is_clone() && !out.requested {
            self.stop_children(vm.name(), "its parent VM ended").await;
            self.cleanup_generations(vm.name());
        }
    }

    /// Reports to the origin host that one of its clones ended. Retried for
    /// a while: the origin may be busy or briefly unreachable.
    fn notify_child_ended(
        self: &Arc<Self>,
        origin: &str,
        ticket: &str,
        clone_id: u32,
        state: ChildState,
    ) {
        let d = self.clone();
        let (origin, ticket) = (origin.to_string(), ticket.to_string());
        tokio::spawn(async move {
            let req = PeerRequest::ChildEnded {
                ticket: ticket.clone(),
                clone_id,
                state,
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                match d.peers.call(&origin, &req, Duration::from_secs(5)).await {
                    Ok(_) => return,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(%origin, %ticket, clone_id, error = %snowflock_proto::error::chain(&e), "cannot report a clone's end yet; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        tracing::warn!(%origin, %ticket, clone_id, error = %snowflock_proto::error::chain(&e), "gave up reporting a clone's end to its origin");
                        return;
                    }
                }
            }
        });
    }

    /// Stops the clones whose memory origin stopped serving `generation`,
    /// with the reason, so that a clone waiting for a page never waits
    /// forever.
    pub async fn origin_lost(self: &Arc<Self>, generation: &str, origin: &str, reason: &str) {
        let why =
            format!("its memory origin {origin} stopped serving generation {generation}: {reason}");
        let victims = self.with(|r| r.vms_of_generation(generation));
        tracing::warn!(%generation, %origin, %reason, clones = victims.len(), "memory origin lost; stopping its clones");
        let stops = victims.iter().map(|v| {
            v.begin_stop(EndCause::Lost(why.clone()));
            bump(&self.counters.origin_lost_kills);
            self.stop_vm(v)
        });
        futures::future::join_all(stops).await;
    }
}

/// Forwards memtap's events to the daemon until memtap goes. Runs on its
/// own thread (the receiver blocks).
pub fn watch_memtap(
    d: Arc<Daemon>,
    rx: std::sync::mpsc::Receiver<dom0_memtap::MemtapEvent>,
    rt: tokio::runtime::Handle,
) {
    while let Ok(ev) = rx.recv() {
        let dom0_memtap::MemtapEvent::OriginLost {
            generation,
            origin,
            reason,
        } = ev;
        let d = d.clone();
        rt.spawn(async move {
            d.origin_lost(&generation, &origin.to_string(), &reason)
                .await
        });
    }
}

/// Keeps a VM's console log from growing without bound, every few seconds
/// until the VM ends.
pub(super) async fn bound_console(vm: Arc<Vm>) {
    let path = crate::host::qemu::console_path(&vm.placed.dir);
    let mut life = vm.life.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = wait_until(&mut life, |l| l.is_ended()) => return,
        }
        let p = path.clone();
        let trimmed = tokio::task::spawn_blocking(move || console::trim(&p)).await;
        if let Ok(Err(e)) = trimmed {
            tracing::warn!(vm = %vm.name(), error = %e, "cannot trim console log");
            return;
        }
    }
}
