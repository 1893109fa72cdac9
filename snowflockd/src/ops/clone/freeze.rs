//! Freezing the parent: pause it, save its device state without RAM,
//! freeze its memory into a generation, and resume it whatever happens.

use super::{CloneError, Timeline};
use crate::host::vmm::Vmm;
use crate::state::vm::Vm;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bound on a device-state stream.
pub const MAX_DEVICE_STATE: usize = 16 << 20;

/// What a freeze produced.
pub struct Frozen {
    pub pause_ms: f64,
    pub state: Vec<u8>,
    pub mem: dom0_memtap::Frozen,
}

/// Reads the saved device state, bounded.
pub(super) fn read_state(file: &Path) -> Result<Vec<u8>, CloneError> {
    let len = std::fs::metadata(file)
        .map_err(CloneError::DeviceState)?
        .len();
    // Device state is a few KB; far more means something is wrong.
    if len > MAX_DEVICE_STATE as u64 {
        return Err(CloneError::DeviceStateTooLarge(MAX_DEVICE_STATE));
    }
    std::fs::read(file).map_err(CloneError::DeviceState)
}

/// The parent's disk to freeze with its memory: its top node, and the
/// prepared overlay that becomes its new top (node `new_node`).
pub struct DiskFreeze {
    pub vm: Arc<Vm>,
    pub file: PathBuf,
    pub new_node: String,
}

/// Pauses the parent in `vm_dir`, freezes its disk (if any), saves its
/// device state and freezes its memory, and resumes it whatever happens.
/// Blocking.
pub fn freeze(
    vmm: &Arc<dyn Vmm>,
    vm_dir: &Path,
    mut precopy: dom0_memtap::Precopy,
    disk: Option<DiskFreeze>,
    gen_dir: &Path,
    tl: &Timeline,
) -> Result<Frozen, CloneError> {
    let mut q = vmm.control(vm_dir, Duration::from_secs(2))?;
    let state_file = gen_dir.join("state");
    // Copy the RAM while the parent still runs; only changes are copied
    // while it is paused.
    precopy.copy()?;
    tl.mark("memory_precopied");
    let t0 = Instant::now();
    q.stop()?;
    tl.mark("parent_paused");
    let work = (|| -> Result<dom0_memtap::Frozen, CloneError> {
        if let Some(f) = &disk {
            // Same instant as the memory: the vCPUs are stopped; QEMU drains
            // and flushes the disk before switching the top layer.
            let node = f.vm.disk_layers.lock().as_ref().map(|l| l.top_node.clone());
            let node = node.ok_or(CloneError::TaskFailed)?;
            q.snapshot_disk(&node, &f.file, &f.new_node)
                .map_err(CloneError::DiskFreeze)?;
            if let Some(l) = f.vm.disk_layers.lock().as_mut() {
                l.frozen_into(f.file.clone(), f.new_node.clone());
            }
            tl.mark("disk_frozen");
        }
        // Device state only, straight to a file: ~22 KB in about a
        // millisecond (a RAM-less migration stream was ~70 KB, 3 ms).
        q.save_devices(&state_file)?;
        tl.mark("device_state_saved");
        let mem = precopy.finish()?;
        tl.mark("memory_frozen");
        Ok(mem)
    })();
    // Always resume the parent; retry on a fresh connection if needed.
    let mut resumed = q.cont();
    for _ in 0..3 {
        if resumed.is_ok() {
            break;
        }
        tracing::warn!(error = ?resumed, "resuming the parent failed; retrying");
        resumed = vmm
            .control(vm_dir, Duration::from_secs(2))
            .and_then(|mut q| q.cont());
    }
    let pause_ms = t0.elapsed().as_secs_f64() * 1e3;
    tl.mark("parent_resumed");
    // Unmapping takes tens of milliseconds; nobody needs to wait for it.
    std::thread::spawn(move || drop(precopy));
    resumed.map_err(CloneError::Resume)?;
    let mem = work?;
    let state = read_state(&state_file)?;
    Ok(Frozen {
        pause_ms,
        state,
        mem,
    })
}
