//! Freezing the parent by handing it to a new QEMU (see
//! `docs/design.md#parent-pause`): the RAM file the
//! parent ran on becomes the generation, nothing is copied while it is
//! paused, and the parent continues in a QEMU that maps the file
//! privately. A parent already on a private mapping adds the pages it
//! wrote since (read from the stopped process, see `written.rs`) to the
//! file it runs on: only when no clone maps that file any more. Otherwise
//! it is not handed over (see `freeze.rs`, a layer).

use super::freeze::{read_state, Frozen};
use super::start::load_state;
use super::written::{freeze_written, keep_freed, Freed};
use super::{CloneError, Timeline};
use crate::host::qemu::{agent_path, qmp_path, QemuSpec};
use crate::host::vmm::{Vmm, VmmProcess};
use crate::state::vm::Vm;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A finished handover: the QEMU that now runs the parent (its command
/// line as the daemon will know it), and the generation (or why it could
/// not be described; the parent runs on either way).
pub struct Handover {
    pub frozen: Result<Frozen, CloneError>,
    pub spec: QemuSpec,
    pub process: VmmProcess,
}

/// Name of the link to the file the parent's QEMU maps, in its directory.
const RAM: &str = "ram";

/// The new QEMU: like `current`, but waiting for the device state, with
/// its RAM file mapped privately, its sockets in `next`, and the tap the
/// old one holds.
fn successor_spec(
    current: &QemuSpec,
    old_pid: Option<u32>,
    next: &Path,
    discard_log: PathBuf,
    disk: Option<serde_json::Value>,
) -> QemuSpec {
    let tap_fd = current.tap_fd.clone().or_else(|| {
        old_pid
            .and_then(|p| {
                crate::host::sys::dup_fd_of(p, "/dev/net/tun")
                    .ok()
                    .flatten()
            })
            .map(Arc::new)
    });
    QemuSpec {
        share: false,
        incoming: true,
        dir: next.to_path_buf(),
        tap_fd,
        discard_log: Some(discard_log),
        disk: disk.or_else(|| current.disk.clone()),
        ..current.clone()
    }
}

/// Pauses the parent (QEMU `current`, process `old_pid`), freezes its
/// memory into `gen_dir/ram` (a link to the file it runs on, which no
/// clone may map any more) and resumes it in a new QEMU; on failure the
/// old QEMU is resumed. A parent with a disk passes its chain as the new
/// QEMU opens it (`disk`: a prepared overlay on top of the old top, which
/// the old QEMU flushes and stops writing at the pause). Blocking.
pub fn freeze_by_restart(
    vmm: &Arc<dyn Vmm>,
    parent: &Vm,
    current: &QemuSpec,
    old_pid: Option<u32>,
    disk: Option<serde_json::Value>,
    gen_dir: &Path,
    tl: &Timeline,
) -> Result<Handover, CloneError> {
    let vm_dir = current.dir.clone();
    let next = vm_dir.join("next");
    let _ = std::fs::remove_dir_all(&next);
    std::fs::create_dir_all(&next).map_err(CloneError::io("create the new QEMU's directory"))?;
    let gen_ram = gen_dir.join("ram");
    // The file the new QEMU maps is the parent's own, and the generation:
    // its contents on its first freeze, else with what the parent wrote
    // since (no clone maps it any more).
    std::fs::hard_link(&current.ram_path, &gen_ram).map_err(CloneError::io("link the RAM file"))?;
    // One discard log per QEMU, named after the generation it starts on.
    let gen_name = gen_dir.file_name().unwrap_or_default().to_string_lossy();
    let log = vm_dir.join(format!("discards-{gen_name}"));
    let _ = std::fs::remove_file(&log);
    let spec = successor_spec(current, old_pid, &next, log, disk);
    // Spawned from a runtime worker, not from this blocking-pool thread:
    // QEMU gets SIGKILL when the thread that started it ends
    // (PR_SET_PDEATHSIG), and pool threads end after 10 s idle.
    let process = {
        let (vmm, spec) = (vmm.clone(), spec.clone());
        tokio::runtime::Handle::current()
            .block_on(tokio::spawn(async move { vmm.spawn(&spec) }))
            .map_err(|_| CloneError::TaskFailed)??
    };
    let result = (|| {
        let mut qn = vmm.control(&next, Duration::from_secs(30))?;
        tl.mark("successor_started");
        let mut q = vmm.control(&vm_dir, Duration::from_secs(2))?;
        super::channel::hold(parent, Some(&next));
        tl.mark("channel_held");
        let t0 = Instant::now();
        q.stop()?;
        tl.mark("parent_paused");
        let moved = (|| -> Result<(Vec<u8>, u64, Option<Freed>), CloneError> {
            let state_file = gen_dir.join("state");
            q.save_devices(&state_file)?;
            tl.mark("device_state_saved");
            let mut fixed = 0;
            let mut freed = None;
            if !current.share {
                let pid = old_pid.ok_or(CloneError::TaskFailed)?;
                let (n, f) = freeze_written(current, pid, &gen_ram, None)?;
                (fixed, freed) = (n, Some(f));
                tl.mark("memory_frozen");
            }
            let state = read_state(&state_file)?;
            load_state(&mut *qn, &next, &state, Duration::from_secs(30))?;
            qn.cont().map_err(CloneError::Resume)?;
            Ok((state, fixed, freed))
        })();
        match moved {
            Ok(m) => Ok((m, t0.elapsed().as_secs_f64() * 1e3)),
            Err(e) => {
                // The old QEMU still has the VM: resume it there.
                let mut resumed = q.cont();
                for _ in 0..3 {
                    if resumed.is_ok() {
                        break;
                    }
                    resumed = vmm
                        .control(&vm_dir, Duration::from_secs(2))
                        .and_then(|mut q| q.cont());
                }
                resumed.map_err(CloneError::Resume)?;
                Err(e)
            }
        }
    })();
    let ((state, fixed, freed), pause_ms) = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(pid) = process.pid {
                vmm.kill(pid);
            }
            // The old QEMU goes on: its channel too.
            super::channel::release(parent);
            let _ = std::fs::remove_dir_all(&next);
            let _ = std::fs::remove_file(&gen_ram);
            return Err(e);
        }
    };
    tl.mark("parent_resumed");
    // The new QEMU runs the VM: whatever happens now, it is handed over.
    let vm_dir2 = vm_dir.clone();
    let frozen = (|| -> Result<Frozen, CloneError> {
        // From now on the VM's files name the new QEMU's.
        for (from, to) in [
            (qmp_path(&next), qmp_path(&vm_dir2)),
            (agent_path(&next), agent_path(&vm_dir2)),
            (next.join("qemu.log"), vm_dir2.join("qemu.log")),
        ] {
            std::fs::rename(&from, &to).map_err(CloneError::io("move the new QEMU's sockets"))?;
        }
        let _ = std::fs::remove_dir_all(&next);
        if let Some(log) = &current.discard_log {
            let _ = std::fs::remove_file(log);
        }
        keep_freed(&vm_dir2, freed.as_ref())?;
        Ok(Frozen {
            pause_ms,
            state,
            mem: dom0_memtap::frozen_layered(&gen_ram, gen_dir, fixed)?,
        })
    })();
    Ok(Handover {
        frozen,
        spec: QemuSpec {
            ram_path: vm_dir.join(RAM),
            dir: vm_dir,
            incoming: false,
            ..spec
        },
        process,
    })
}
