//! Exit supervision: what happens when a VM's process ends, whoever ended
//! it; stopping clones whose memory origin is gone; console trimming.

use super::daemon::{wait_until, Daemon};
use crate::host::console;
use crate::state::metrics::bump;
use crate::state::vm::{outcome, DiskPlan, EndCause, MemSource, Vm};
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
        exit: BoxFuture<'static, std::io::Result<std::process::ExitStatus>>,
    ) {
        let pid = *vm.pid.lock();
        let mut exit = exit;
        let status = loop {
            let status = exit.await;
            // Ended on purpose because a new QEMU took the VM over (a
            // freeze): follow the new process.
            match self.vmms.take_successor(vm.name()) {
                Some(next) => {
                    tracing::info!(pid = ?*vm.pid.lock(), "VM handed over to a new QEMU");
                    exit = next;
                }
                None => break status,
            }
        };
        self.vmms.remove(vm.name());
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
        let out = outcome(&vm.life(), &status, fetch_failed);
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
        if let (None, Some(ticket)) = (&spec.origin, &spec.ticket) {
            // A clone of this host's parent: its generation may be idle now.
            self.unlink_idle_generation(ticket);
        }
        if let (Some(DiskPlan::Remote { memtap: names, .. }), Some(m)) = (&spec.disk, &self.memtap)
        {
            names.iter().for_each(|n| m.release_generation(n));
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
        self.release_flock_links(spec.flock).await;
        vm.finish(out.ended);
        self.bump_tickets();
        if !spec.is_clone() && !out.requested {
            self.stop_children(vm.name(), "its parent VM ended").await;
            self.cleanup_generations(vm.name()).await;
            if let Some(l) = vm.disk_layers.lock().clone() {
                self.withdraw_disk_layers(vm.name(), l.epoch, l.frozen.len() + 1);
            }
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
        let victims = self.with(|r| r.vms_of_generation(generation));
        tracing::warn!(%generation, %origin, %reason, clones = victims.len(), "origin lost; stopping its clones");
        let stops = victims.iter().map(|v| {
            let why = if v.reads_disk_layer(generation) {
                format!(
                    "its disk origin {origin} stopped serving disk layer {generation}: {reason}"
                )
            } else {
                format!(
                    "its memory origin {origin} stopped serving generation {generation}: {reason}"
                )
            };
            v.begin_stop(EndCause::Lost(why));
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

#[cfg(test)]
mod tests {
    use crate::state::vm::{EndCause, MemSource};
    use crate::testing::Harness;
    use snowflock_proto::api::{ApiRequest as R, ApiResponse, ChildState};
    use snowflock_proto::peer::PeerRequest;
    use std::sync::atomic::Ordering;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_that_dies_is_lost_cleaned_up_and_counted() {
        let h = Harness::new();
        let (vm, p) = h.start("p").await;
        let (tap, bridge) = (vm.placed.tap.clone(), h.d.names.bridge(vm.spec.flock));
        assert!(h.net.has(&tap) && h.net.has(&bridge));
        p.crash();
        h.until("p is gone", || h.d.vm("p").is_err()).await;
        h.until("its links are gone", || {
            !h.net.has(&tap) && !h.net.has(&bridge)
        })
        .await;
        let losses = h.d.counters.recent_losses();
        assert_eq!(losses[0].vm, "p");
        assert_eq!(
            losses[0].reason,
            "QEMU exited unexpectedly (signal: 11 (SIGSEGV))"
        );
        assert!(!vm.placed.dir.exists(), "its directory is removed");
        assert!(
            h.d.with(|r| !r.flock_in_use(vm.spec.flock)),
            "its flock is free again"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parent_that_dies_takes_its_clones_along() {
        let h = Harness::new();
        let (_, p) = h.start("p").await;
        let ticket = h.ticket_and_clone(&p, 2).await;
        assert_eq!(h.vmm.running(), ["p", "p-g1c1", "p-g1c2"]);
        p.crash();
        h.until("every VM is gone", || h.vmm.running().is_empty())
            .await;
        h.until("nothing registered", || h.d.list().is_empty())
            .await;
        let t = h.d.with(|r| r.tickets[&ticket].state.clone());
        assert_eq!(
            t,
            crate::state::ticket::TicketState::Discarded("its parent VM ended")
        );
        // Its generations are removed (off the runtime, so a moment later).
        let gen = h.d.cfg.state_dir.join("gens/p-g1");
        h.until("its generations are removed", || !gen.exists())
            .await;
        // The clones were stopped, not lost; the parent was lost.
        assert_eq!(h.d.counters.map()["vms_lost"], 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clone_that_dies_is_lost_for_its_parent() {
        let h = Harness::new();
        let (_, p) = h.start("p").await;
        let ticket = h.ticket_and_clone(&p, 1).await;
        h.proc("p-g1c1").crash();
        match p.call(3, R::Join { ticket }).await {
            ApiResponse::Joined { children } => match &children[0].state {
                ChildState::Lost { reason } => {
                    assert!(reason.contains("QEMU exited unexpectedly"), "{reason}")
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert_eq!(h.vmm.running(), ["p"], "the parent is untouched");
    }

    /// A clone of another host's VM, created as `start_remote` would.
    async fn remote_clone(h: &Harness, generation: &str) -> std::sync::Arc<crate::state::vm::Vm> {
        let ram = h.d.cfg.state_dir.join("remote-ram");
        std::fs::create_dir_all(&h.d.cfg.state_dir).unwrap();
        std::fs::File::create(&ram)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mut spec = crate::state::vm::tests::spec("p-g1c2", 2);
        spec.parent = "p".into();
        spec.ticket = Some("t-remote".into());
        spec.origin = Some("h1".into());
        spec.memory = MemSource::Remote {
            generation: generation.into(),
            ram,
        };
        h.d.create_vm(spec).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_remote_clone_is_reported_to_its_origin() {
        let h = Harness::new();
        h.peer("h1", |_| snowflock_proto::admin::AdminResponse::Ok);
        let _vm = remote_clone(&h, "h1.p-g1").await;
        h.proc("p-g1c2").crash();
        h.until("h1 is told", || {
            h.peers.sent.lock().iter().any(|(host, r)| {
                host == "h1"
                    && matches!(r, PeerRequest::ChildEnded { ticket, clone_id: 2, state: ChildState::Lost { .. } } if ticket == "t-remote")
            })
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_memory_origin_stops_its_clones_with_the_reason() {
        let h = Harness::new();
        h.peer("h1", |_| snowflock_proto::admin::AdminResponse::Ok);
        let vm = remote_clone(&h, "h1.p-g1").await;
        h.d.origin_lost("h1.p-g1", "10.0.0.2:7171", "connection refused")
            .await;
        assert!(vm.is_ended());
        let lost = h.d.counters.recent_losses();
        assert!(
            lost[0]
                .reason
                .starts_with("its memory origin 10.0.0.2:7171 stopped serving generation h1.p-g1"),
            "{lost:?}"
        );
        assert_eq!(h.d.counters.origin_lost_kills.load(Ordering::Relaxed), 1);
        h.until("h1 hears of the loss", || {
            h.peers.sent.lock().iter().any(|(_, r)| matches!(r, PeerRequest::ChildEnded { state: ChildState::Lost { reason }, .. } if reason.contains("memory origin")))
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vmm_that_ignores_quit_is_killed() {
        let h = Harness::new();
        let (vm, p) = h.start("p").await;
        p.ignore_quit.store(true, Ordering::Relaxed);
        h.d.stop_vm(&vm).await;
        assert!(p.has_exited());
        assert_eq!(p.calls.lock().last(), Some(&"quit"));
        assert_eq!(
            vm.life(),
            crate::state::vm::Life::Ended(crate::state::vm::Ended::Stopped)
        );
        assert!(!vm.begin_stop(EndCause::Requested));
        assert_eq!(
            h.d.counters.map()["vms_lost"],
            0,
            "a requested stop is no loss"
        );
    }
}
