//! Freezing the parent: pause it, save its device state without RAM,
//! freeze its memory into a generation, and resume it whatever happens.

use super::{CloneError, Timeline};
use crate::host::vmm::Vmm;
use crate::state::vm::Vm;
use std::io::Read;
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

/// Connects to the device-state socket on drop, releasing a reader still
/// waiting in `accept`.
struct Unblock(PathBuf);

impl Drop for Unblock {
    fn drop(&mut self) {
        let _ = std::os::unix::net::UnixStream::connect(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads one device-state stream from `listener`, bounded.
fn read_state(listener: std::os::unix::net::UnixListener) -> Result<Vec<u8>, CloneError> {
    let (s, _) = listener.accept().map_err(CloneError::DeviceState)?;
    let mut buf = Vec::new();
    // Device state is ~100 KB; far more means RAM leaked into the stream.
    s.take(MAX_DEVICE_STATE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(CloneError::DeviceState)?;
    if buf.len() > MAX_DEVICE_STATE {
        return Err(CloneError::DeviceStateTooLarge(MAX_DEVICE_STATE));
    }
    Ok(buf)
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
    q.ignore_shared_ram()?;
    // QEMU streams the device state to a socket we read into memory: no
    // helper process to spawn while the parent is paused (exec:cat costs
    // ~10 ms here).
    let sock_path = gen_dir.join("mig.sock");
    let listener =
        std::os::unix::net::UnixListener::bind(&sock_path).map_err(CloneError::DeviceState)?;
    let reader = std::thread::spawn(move || read_state(listener));
    // Whatever path this function leaves by, the reader must not wait for a
    // VMM that never connects.
    let unblock = Unblock(sock_path.clone());
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
        q.migrate(&format!("unix:{}", sock_path.display()))?;
        q.wait_migration(Duration::from_secs(30))?;
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
    drop(unblock);
    let state = reader.join().map_err(|_| CloneError::ReaderPanicked)?;
    let mem = work?;
    let state = state?;
    std::fs::write(gen_dir.join("state"), &state).map_err(|err| CloneError::Io {
        what: "write the device state".into(),
        err,
    })?;
    Ok(Frozen {
        pause_ms,
        state,
        mem,
    })
}
