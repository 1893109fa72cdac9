//! Stopping VMs: one VM (quit, then kill after a grace period), a parent
//! with its clones (here and on other hosts), everything at shutdown.

use super::daemon::Daemon;
use crate::state::vm::{EndCause, Vm};
use snowflock_proto::admin::VmState;
use snowflock_proto::peer::PeerRequest;
use std::sync::Arc;
use std::time::Duration;

/// Time a VMM gets to quit before it is killed.
pub const QUIT_GRACE: Duration = Duration::from_secs(3);
/// Time a guest on a disk of the user's own gets to shut down cleanly
/// (its file system is theirs to keep) before QEMU is told to quit.
pub const POWERDOWN_GRACE: Duration = Duration::from_secs(60);

impl Daemon {
    /// Stops a VM and returns once its process has exited and it is
    /// cleaned up. A parent's clones are stopped first, and again after it
    /// (a clone in progress may have started some meanwhile).
    pub async fn stop_vm(self: &Arc<Self>, vm: &Arc<Vm>) {
        // Recorded first: a clone in progress checks it before resuming
        // children.
        vm.begin_stop(EndCause::Requested);
        if vm.spec.is_clone() {
            self.stop_one(vm).await;
            return;
        }
        self.stop_children(vm.name(), "its parent VM was stopped")
            .await;
        self.stop_one(vm).await;
        self.stop_children(vm.name(), "its parent VM was stopped")
            .await;
        self.cleanup_generations(vm.name()).await;
        if let Some(l) = vm.disk_layers.lock().clone() {
            self.withdraw_disk_layers(vm.name(), l.epoch, l.frozen.len() + 1);
        }
    }

    /// Discards a parent's tickets and stops its clones, here and on the
    /// other hosts that run some.
    pub(super) async fn stop_children(self: &Arc<Self>, parent: &str, why: &'static str) {
        let (kids, remote) = self.with(|r| {
            let mut remote: Vec<(String, String)> = Vec::new();
            for t in r.tickets.values_mut().filter(|t| t.owner == parent) {
                for h in t.discard_for_owner(&self.cfg.host, why) {
                    remote.push((h, t.id.clone()));
                }
            }
            (r.clones_of(parent), remote)
        });
        futures::future::join_all(kids.iter().map(|k| self.stop_one(k))).await;
        self.stop_remote(remote, why).await;
        self.bump_tickets();
    }

    /// Asks other hosts to stop their clones of these tickets.
    pub async fn stop_remote(self: &Arc<Self>, which: Vec<(String, String)>, why: &str) {
        let calls = which.into_iter().map(|(host, ticket)| async move {
            let req = PeerRequest::StopClones {
                ticket: ticket.clone(),
                reason: why.to_string(),
            };
            if let Err(e) = self.peers.call(&host, &req, Duration::from_secs(15)).await {
                tracing::warn!(%host, %ticket, error = %snowflock_proto::error::chain(&e), "cannot stop clones on another host");
            }
        });
        futures::future::join_all(calls).await;
    }

    /// Stops this host's clones of another host's ticket (its parent was
    /// killed or ended).
    pub async fn stop_ticket_clones(self: &Arc<Self>, ticket: &str, reason: &str) {
        let kids = self.with(|r| r.remote_clones_of_ticket(ticket));
        tracing::info!(%ticket, %reason, clones = kids.len(), "stopping clones at the origin's request");
        futures::future::join_all(kids.iter().map(|k| self.stop_vm(k))).await;
    }

    /// Ends one VM's process: a VM on a disk of the user's own is asked to
    /// shut down first ([`POWERDOWN_GRACE`]); then quit, then kill after
    /// [`QUIT_GRACE`].
    async fn stop_one(self: &Arc<Self>, vm: &Arc<Vm>) {
        if !vm.begin_stop(EndCause::Requested) {
            return;
        }
        vm.set_state(VmState::Stopping);
        if matches!(
            vm.spec.disk,
            Some(crate::state::vm::DiskPlan::Direct { .. })
        ) {
            // Whatever it wrote since a clone went to layers beside the
            // user's disk: commit them into it first (the VM runs on).
            if !self.merge_disk_layers(vm).await {
                tracing::warn!(vm = %vm.name(), "the disk's layers stay beside it; merge them with `qemu-img commit`");
            }
            // Through the agent (`systemctl poweroff`; its output is
            // dropped), and the ACPI power button for a guest without one.
            if *vm.agent_up.borrow() {
                let exec = self.with(|r| r.exec_id());
                vm.send(snowflock_proto::channel::HostMsg::ExecStart {
                    exec,
                    argv: vec!["systemctl".into(), "poweroff".into()],
                    env: vec![],
                });
            }
            let (vmm, dir) = (self.vmm.clone(), vm.placed.dir.clone());
            let _ = tokio::task::spawn_blocking(move || {
                vmm.control(&dir, Duration::from_millis(500))
                    .and_then(|mut c| c.powerdown())
            })
            .await;
            let mut life = vm.life.subscribe();
            let down = tokio::time::timeout(
                POWERDOWN_GRACE,
                super::daemon::wait_until(&mut life, |l| l.is_ended()),
            )
            .await;
            if down.is_ok() {
                return;
            }
            tracing::warn!(vm = %vm.name(), "the guest did not shut down in time; quitting QEMU");
        }
        let (vmm, dir) = (self.vmm.clone(), vm.placed.dir.clone());
        let _ = tokio::task::spawn_blocking(move || {
            vmm.control(&dir, Duration::from_millis(500))
                .and_then(|mut c| c.quit())
        })
        .await;
        let mut life = vm.life.subscribe();
        let quit = tokio::time::timeout(
            QUIT_GRACE,
            super::daemon::wait_until(&mut life, |l| l.is_ended()),
        )
        .await;
        if quit.is_err() {
            if let Some(pid) = *vm.pid.lock() {
                tracing::warn!(vm = %vm.name(), pid, "QEMU ignored quit; killing");
                self.vmm.kill(pid);
            }
            let mut life = vm.life.subscribe();
            super::daemon::wait_until(&mut life, |l| l.is_ended()).await;
        }
    }

    /// Stops every VM (used on shutdown).
    pub async fn stop_all(self: &Arc<Self>) {
        let all: Vec<Arc<Vm>> = self.with(|r| r.vms.values().cloned().collect());
        futures::future::join_all(all.iter().map(|v| self.stop_vm(v))).await;
    }
}
