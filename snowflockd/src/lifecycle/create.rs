//! Creating a VM: its directory, its flock bridge (and VXLAN port in a
//! cluster), its tap, its VMM process; then registering it and starting
//! its guest channel, console trimming and exit supervision.

use super::daemon::{blocking, Daemon, DaemonError, Result};
use crate::host::qemu::QemuSpec;
use crate::state::metrics::bump;
use crate::state::vm::{Placed, Vm, VmSpec};
use std::sync::Arc;
use tracing::Instrument;

impl Daemon {
    /// Creates and starts a VM. Returns once its VMM runs.
    pub async fn create_vm(self: &Arc<Self>, spec: VmSpec) -> Result<Arc<Vm>> {
        let index = self.with(|r| r.reserve(&spec.name, spec.flock))?;
        // The name stays reserved until registered or failed.
        let (name, flock) = (spec.name.clone(), spec.flock);
        let res = self.create_vm_inner(spec, index).await;
        self.with(|r| r.creating.remove(&name));
        if res.is_err() {
            // It may have made the flock's links; nothing else may use them.
            self.release_flock_links(flock).await;
        }
        res
    }

    /// Deletes a flock's bridge and VXLAN port once no VM here uses the
    /// flock (its last VM ended, or the only one being created failed),
    /// checked under the lock creation takes, so a VM being created keeps
    /// them.
    pub(super) async fn release_flock_links(self: &Arc<Self>, flock: u32) {
        let d = self.clone();
        let _ = blocking(move || {
            let _links = d.flock_links.lock();
            if d.with(|r| r.flock_in_use(flock)) {
                return Ok(());
            }
            for link in [d.names.vxlan(flock), d.names.bridge(flock)] {
                if let Err(e) = d.net.delete_link(&link) {
                    tracing::warn!(%link, flock, error = %snowflock_proto::error::chain(&e), "cannot delete a flock link");
                }
            }
            Ok(())
        })
        .await;
    }

    async fn create_vm_inner(self: &Arc<Self>, spec: VmSpec, index: u64) -> Result<Arc<Vm>> {
        let dir = self.cfg.state_dir.join("vms").join(&spec.name);
        let placed = Placed {
            index,
            ram_path: spec
                .memory
                .generation_ram()
                .cloned()
                .unwrap_or_else(|| dir.join("ram")),
            mac: crate::host::net::mac(spec.flock, spec.clone_id),
            ip: crate::host::net::ip_cidr(spec.flock, spec.clone_id),
            tap: self.names.tap(index),
            dir,
        };
        self.prepare_host(&spec, &placed).await?;
        use crate::state::vm::DiskPlan;
        let overlay = match &spec.disk {
            Some(DiskPlan::Overlay { base, format }) => Some((base.clone(), *format, None)),
            Some(DiskPlan::Remote {
                layers,
                virtual_size,
                ..
            }) => layers
                .last()
                .map(|(top, format)| (top.clone(), *format, Some(*virtual_size))),
            _ => None,
        };
        if let Some((base, format, size)) = overlay {
            let top = placed.dir.join(crate::state::vm::OVERLAY);
            let made = blocking(move || {
                Ok(crate::host::disk::create_overlay(
                    &top, &base, format, size,
                )?)
            })
            .await;
            if let Err(e) = made {
                let (net, tap, dir) = (self.net.clone(), placed.tap.clone(), placed.dir.clone());
                let _ = blocking(move || {
                    let _ = net.delete_link(&tap);
                    let _ = std::fs::remove_dir_all(&dir);
                    Ok(())
                })
                .await;
                return Err(e);
            }
        }
        let qemu = QemuSpec {
            qemu: self.cfg.qemu.clone(),
            accel: spec.accel.clone(),
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
            ram_path: placed.ram_path.clone(),
            share: spec.memory.generation_ram().is_none(),
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline: spec.cmdline.clone(),
            dir: placed.dir.clone(),
            tap: placed.tap.clone(),
            tap_fd: None,
            console: crate::host::qemu::console_path(&placed.dir),
            discard_log: None,
            mac: placed.mac.clone(),
            incoming: spec.memory.generation_ram().is_some(),
            disk: spec.disk.as_ref().map(|d| d.blockdev(&placed.dir)),
        };
        let (vm, agent_rx) = Vm::new(spec, placed);
        let vm = Arc::new(vm);
        self.with(|r| r.vms.insert(vm.name().to_string(), vm.clone()));
        let process = match self.vmm.spawn(&qemu) {
            Ok(p) => p,
            Err(e) => {
                self.with(|r| r.vms.remove(vm.name()));
                self.release_vm_resources(&vm).await;
                return Err(e.into());
            }
        };
        *vm.pid.lock() = process.pid;
        if qemu.share {
            // An original VM: a freeze may hand it to a new QEMU.
            self.vmms.insert(vm.name(), qemu);
        }
        bump(&self.counters.vms_started);
        let span = tracing::info_span!("vm", vm = %vm.name(), ticket = vm.spec.ticket.as_deref().unwrap_or("-"));
        span.in_scope(|| tracing::info!(pid = ?process.pid, "QEMU started"));
        tokio::spawn(
            (self.guest_link)(self.clone(), vm.clone(), agent_rx).instrument(span.clone()),
        );
        tokio::spawn(super::supervise::bound_console(vm.clone()));
        tokio::spawn(
            self.clone()
                .monitor(vm.clone(), process.exit)
                .instrument(span),
        );
        Ok(vm)
    }

    /// The VM's directory, bridge, overlay and tap, off the async runtime
    /// (iproute2 processes, directory removal).
    async fn prepare_host(&self, spec: &VmSpec, placed: &Placed) -> Result<()> {
        let net = self.net.clone();
        let links = self.flock_links.clone();
        let names = self.names.clone();
        let overlay = self.cfg.cluster.as_ref().map(|c| {
            let peers: Vec<std::net::IpAddr> = c.peers.iter().map(|p| p.addr.ip()).collect();
            (c.listen.ip(), peers)
        });
        let (dir, tap, flock) = (placed.dir.clone(), placed.tap.clone(), spec.flock);
        blocking(move || {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|err| DaemonError::Io {
                what: format!("Cannot create {}", dir.display()),
                err,
            })?;
            let bridge = names.bridge(flock);
            let setup = (|| -> Result<()> {
                {
                    // Clones of one flock start at once: one of them
                    // creates the flock's links, and none is torn down
                    // meanwhile.
                    let _links = links.lock();
                    net.ensure_bridge(&bridge)?;
                    if let Some((local, peers)) = &overlay {
                        net.ensure_overlay(&names, flock, *local, peers)?;
                    }
                }
                net.create_tap(&tap, &bridge)?;
                Ok(())
            })();
            if setup.is_err() {
                let _ = net.delete_link(&tap);
                let _ = std::fs::remove_dir_all(&dir);
            }
            setup
        })
        .await
    }

    /// Deletes a VM's tap and directory, off the async runtime.
    pub async fn release_vm_resources(&self, vm: &Vm) {
        let (net, tap, dir, name) = (
            self.net.clone(),
            vm.placed.tap.clone(),
            vm.placed.dir.clone(),
            vm.name().to_string(),
        );
        let _ = blocking(move || {
            if let Err(e) = net.delete_link(&tap) {
                tracing::warn!(vm = %name, error = %e, "cannot delete tap");
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(vm = %name, error = %e, "cannot remove VM directory");
                }
            }
            Ok(())
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use crate::state::vm::tests::spec;
    use crate::testing::Harness;

    /// Clones of another host's VM arrive together on a host that has no
    /// link of their flock yet: one creates the bridge, all start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clones_of_a_new_flock_start_together() {
        let h = Harness::new();
        let specs: Vec<_> = (1..=4)
            .map(|k| {
                let mut s = spec(&format!("p-g1c{k}"), k);
                s.flock = 9;
                s
            })
            .collect();
        let made = futures::future::join_all(specs.into_iter().map(|s| h.d.create_vm(s))).await;
        for m in made {
            m.expect("every clone starts");
        }
        assert!(h.net.has(&h.d.names.bridge(9)));
        assert_eq!(h.vmm.running().len(), 4);
        // The flock's links go with its last VM, not before.
        for k in 1..=4 {
            let vm = h.d.vm(&format!("p-g1c{k}")).unwrap();
            assert!(h.net.has(&h.d.names.bridge(9)), "still used");
            h.d.stop_vm(&vm).await;
        }
        assert!(!h.net.has(&h.d.names.bridge(9)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_whose_process_cannot_start_leaves_nothing() {
        let h = Harness::new();
        *h.vmm.fail_spawn.lock() = Some("p".into());
        let Err(e) = h.d.create_vm(spec("p", 0)).await else {
            panic!("the VMM refused to start");
        };
        assert!(
            snowflock_proto::error::chain(&e).contains("refused by the test"),
            "{e}"
        );
        assert!(h.d.list().is_empty());
        assert!(
            h.d.with(|r| r.creating.is_empty()),
            "the name is free again"
        );
        assert!(!h.d.cfg.state_dir.join("vms/p").exists());
        let tap = h.d.names.tap(1);
        assert!(!h.net.has(&tap));
        assert!(!h.net.has(&h.d.names.bridge(0)), "no bridge is left");
    }
}
