//! Starting one clone from a descriptor, on the origin host or another:
//! its VMM starts paused on the generation's memory, loads the device
//! state, resumes, and takes its identity; it counts once it says `Ready`.

use super::{CloneError, Timeline};
use crate::host::vmm::VmmControl;
use crate::lifecycle::daemon::random_hex;
use crate::lifecycle::Daemon;
use crate::state::metrics::bump;
use crate::state::vm::DiskPlan;
use crate::state::vm::{EndCause, MemSource, Vm, VmSpec};
use snowflock_descriptor::{CloneSlot, Descriptor};
use snowflock_proto::admin::VmState;
use snowflock_proto::channel::{CloneIdentity, HostMsg};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where a clone's VMM gets its memory and kernel from.
pub struct Source<'a> {
    pub image: &'a snowflock_image::Image,
    pub memory: MemSource,
    pub origin: Option<String>,
    /// The disk the clones get (an overlay over the frozen layer).
    pub disk: Option<DiskPlan>,
}

/// The spec of clone `slot` of a descriptor.
pub fn clone_spec(desc: &Descriptor, src: &Source<'_>, slot: &CloneSlot) -> VmSpec {
    let m = &desc.meta;
    VmSpec {
        name: slot.vm.clone(),
        flock: m.net.flock,
        clone_id: slot.clone_id,
        ticket: Some(m.ticket.clone()),
        parent: m.parent.clone(),
        mem_mib: m.machine.mem_mib,
        vcpus: m.machine.vcpus,
        accel: m.machine.accel.clone(),
        image: PathBuf::from(&m.machine.image),
        kernel: src.image.kernel.clone(),
        initrd: src.image.initrd.clone(),
        cmdline: m.machine.cmdline.clone(),
        origin: src.origin.clone(),
        memory: src.memory.clone(),
        disk: src.disk.clone(),
    }
}

/// Starts a clone's VMM, paused and waiting for its device state.
pub async fn spawn_clone(
    d: &Arc<Daemon>,
    desc: &Descriptor,
    src: &Source<'_>,
    slot: &CloneSlot,
) -> Result<Arc<Vm>, CloneError> {
    Ok(d.create_vm(clone_spec(desc, src, slot)).await?)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Loads device state `state` into the VMM in `dir`, started `incoming`
/// (it stays paused). QEMU listens on a socket the daemon writes the state
/// to: no helper process (`exec:cat` forked the whole QEMU, ~7 ms).
/// Blocking.
pub(super) fn load_state(
    q: &mut dyn VmmControl,
    dir: &Path,
    state: &[u8],
    timeout: Duration,
) -> Result<(), CloneError> {
    let sock = dir.join("incoming.sock");
    q.migrate_incoming(&format!("unix:{}", sock.display()))?;
    let fed = std::os::unix::net::UnixStream::connect(&sock)
        .and_then(|mut s| std::io::Write::write_all(&mut s, state));
    let _ = std::fs::remove_file(&sock);
    fed.map_err(CloneError::DeviceState)?;
    Ok(q.wait_incoming(timeout)?)
}

/// Gives a clone QEMU (process `pid`, not running yet) that maps the
/// generation's base file `ram` the pages of the generation's layer, if it
/// has one (see `dom0_memtap::Layer`). Blocking.
fn apply_layer(pid: u32, ram: &Path) -> Result<(), CloneError> {
    let dir = ram.parent().unwrap_or(Path::new("."));
    let size = std::fs::metadata(ram)
        .map_err(CloneError::io("read the generation"))?
        .len();
    let pages = (size / dom0_memtap::PAGE_SIZE) as usize;
    let Some(layer) =
        dom0_memtap::Layer::open(dir, pages).map_err(CloneError::io("open the layer"))?
    else {
        return Ok(());
    };
    let data = layer
        .data_pages()
        .map_err(CloneError::io("read the layer"))?;
    let n = dom0_memtap::write_into_process(pid, ram, &data, &layer.top)
        .map_err(CloneError::Written)?;
    tracing::debug!(kib = n / 1024, "layer applied");
    Ok(())
}

/// Loads the device state into a spawned clone, resumes it and gives it
/// its identity; returns once it is ready. A clone that fails is stopped.
pub async fn resume_clone(
    d: &Arc<Daemon>,
    parent: Option<&Arc<Vm>>,
    vm: Arc<Vm>,
    desc: &Descriptor,
    slot: &CloneSlot,
    tl: &Timeline,
) -> Result<(), CloneError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    *vm.ready.lock() = Some(tx);
    let res = async {
        if parent.is_some_and(|p| !p.is_running()) {
            // The parent was stopped while we cloned it: its children go too.
            return Err(CloneError::ParentStopped);
        }
        let (vmm, dir, state) = (
            d.vmm.clone(),
            vm.placed.dir.clone(),
            desc.device_state.clone(),
        );
        let layered = match &vm.spec.memory {
            MemSource::Local { ram } => vm.pid.lock().map(|pid| (pid, ram.clone())),
            _ => None,
        };
        tokio::task::spawn_blocking(move || -> Result<(), CloneError> {
            let mut q = vmm.control(&dir, Duration::from_secs(30))?;
            if let Some((pid, ram)) = layered {
                apply_layer(pid, &ram)?;
            }
            load_state(&mut *q, &dir, &state, Duration::from_secs(60))?;
            Ok(q.cont()?)
        })
        .await
        .map_err(|_| CloneError::TaskFailed)??;
        tl.mark(format!("clone{}_resumed", slot.clone_id));
        let mut seed = vec![0u8; 64];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut seed);
        vm.send(HostMsg::BecomeClone {
            request_id: desc.meta.request_id,
            identity: CloneIdentity {
                clone_id: slot.clone_id,
                ticket: desc.meta.ticket.clone(),
                vm: slot.vm.clone(),
                hostname: slot.vm.clone(),
                machine_id: random_hex(16),
                mac: slot.mac.clone(),
                ip_cidr: slot.ip_cidr.clone(),
                seed,
                unix_time_ns: now_ns(),
            },
        });
        let limit = d.cfg.clone_timeout_s;
        match tokio::time::timeout(Duration::from_secs(limit), rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(_)) => Err(CloneError::WentAway),
            Err(_) => Err(CloneError::ReadyTimeout(limit)),
        }
    }
    .await;
    match res {
        Ok(()) => {
            bump(&d.counters.clones_started);
            vm.set_state(VmState::Running);
            vm.agent_up.send_replace(true);
            tl.mark(format!("clone{}_ready", slot.clone_id));
            Ok(())
        }
        Err(e) => {
            bump(&d.counters.clones_lost);
            vm.begin_stop(EndCause::Lost(snowflock_proto::error::chain(&e)));
            d.stop_vm(&vm).await;
            Err(e)
        }
    }
}
