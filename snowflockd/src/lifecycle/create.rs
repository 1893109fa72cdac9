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
        let index = self.with(|r| r.reserve(&spec.name))?;
        // The name stays reserved until registered or failed.
        let name = spec.name.clone();
        let res = self.create_vm_inner(spec, index).await;
        self.with(|r| r.creating.remove(&name));
        res
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
            mac: placed.mac.clone(),
            incoming: spec.memory.generation_ram().is_some(),
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
                net.ensure_bridge(&bridge)?;
                if let Some((local, peers)) = &overlay {
                    net.ensure_overlay(&names, flock, *local, peers)?;
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
