//! Freezing the parent in place (no new QEMU): pause it, save its device
//! state without RAM, freeze its memory into a generation, and resume it
//! whatever happens. Its memory is either copied (a VMM that cannot hand a
//! VM over) or, for a parent on a private mapping of a file clones still
//! map, the pages it wrote become a layer over that file (`written.rs`).

use super::written::{create_layer, freeze_written, keep_freed, restart_log};
use super::{CloneError, Timeline};
use crate::host::qemu::QemuSpec;
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

/// How the parent's memory becomes the generation.
pub enum MemFreeze {
    /// A copy of its RAM file, made mostly while it runs.
    Precopy(dom0_memtap::Precopy),
    /// Its RAM file (`spec.ram_path`, mapped privately by process `pid`)
    /// plus a layer of the pages it wrote.
    Layer { spec: Box<QemuSpec>, pid: u32 },
}

/// What the paused part of a freeze produced: the generation, or for a
/// layer the bytes copied into it (described once the parent runs again:
/// that walks the file's extents).
enum Paused {
    Frozen(dom0_memtap::Frozen),
    Layered { fixed: u64 },
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
    mut mem: MemFreeze,
    disk: Option<DiskFreeze>,
    gen_dir: &Path,
    tl: &Timeline,
) -> Result<Frozen, CloneError> {
    let mut q = vmm.control(vm_dir, Duration::from_secs(2))?;
    let state_file = gen_dir.join("state");
    let gen_ram = gen_dir.join("ram");
    let top = match &mut mem {
        MemFreeze::Precopy(precopy) => {
            // Copy the RAM while the parent still runs; only changes are
            // copied while it is paused.
            precopy.copy()?;
            tl.mark("memory_precopied");
            None
        }
        MemFreeze::Layer { spec, .. } => Some(create_layer(
            &spec.ram_path,
            gen_dir,
            u64::from(spec.mem_mib) << 20,
        )?),
    };
    let mut freed = None;
    let t0 = Instant::now();
    q.stop()?;
    tl.mark("parent_paused");
    let work = (|| -> Result<Paused, CloneError> {
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
        let frozen = match (&mut mem, &top) {
            (MemFreeze::Precopy(precopy), _) => Paused::Frozen(precopy.finish()?),
            (MemFreeze::Layer { spec, pid }, Some(top)) => {
                let (fixed, f) = freeze_written(spec, *pid, &gen_ram, Some(top))?;
                freed = Some(f);
                if let Some(log) = &spec.discard_log {
                    restart_log(log)?;
                }
                Paused::Layered { fixed }
            }
            (MemFreeze::Layer { .. }, None) => return Err(CloneError::TaskFailed),
        };
        tl.mark("memory_frozen");
        Ok(frozen)
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
    let spec = match mem {
        MemFreeze::Precopy(precopy) => {
            std::thread::spawn(move || drop(precopy));
            None
        }
        MemFreeze::Layer { spec, .. } => Some(spec),
    };
    // What the QEMU freed is carried over even if the freeze failed later:
    // its log was restarted.
    if let (Some(spec), Some(f)) = (spec, &freed) {
        keep_freed(&spec.dir, Some(f))?;
    }
    resumed.map_err(CloneError::Resume)?;
    let mem = match work? {
        Paused::Frozen(mem) => mem,
        Paused::Layered { fixed } => dom0_memtap::frozen_layered(&gen_ram, gen_dir, fixed)?,
    };
    let state = read_state(&state_file)?;
    Ok(Frozen {
        pause_ms,
        state,
        mem,
    })
}
