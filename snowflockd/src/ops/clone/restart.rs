//! Freezing the parent by handing it to a new QEMU (see
//! `docs/design.md#toward-a-clone-cost-flat-in-memory`): the RAM file the
//! parent ran on becomes the generation, nothing is copied while it is
//! paused, and the parent continues in a QEMU that maps the file
//! privately. A parent already on a private mapping adds the pages it
//! wrote since the file last changed (read from the stopped process) to
//! the file it runs on, if no clone maps that file any more (`in_place`),
//! or else to a layer over it (`dom0_memtap::Layer`), which its new QEMU
//! gets too: a clone point never copies the memory that did not change.

use super::freeze::{read_state, Frozen};
use super::start::load_state;
use super::{CloneError, Timeline};
use crate::host::qemu::{agent_path, qmp_path, QemuSpec};
use crate::host::vmm::{Vmm, VmmProcess};
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
/// The pages the guest freed since its file last changed, which the file
/// does not show as holes (a page map; see `dom0_memtap::save_map`), in
/// its directory. Only while generations are layers over the file.
const FREED: &str = "freed.map";

fn io(what: &str) -> impl Fn(std::io::Error) -> CloneError + '_ {
    move |err| CloneError::Io {
        what: what.to_string(),
        err,
    }
}

/// The new QEMU: like `current`, but waiting for the device state, with
/// its RAM file mapped privately, its sockets in `next`, and the tap the
/// old one holds.
fn successor_spec(
    current: &QemuSpec,
    old_pid: Option<u32>,
    ram: &Path,
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
        ram_path: ram.to_path_buf(),
        share: false,
        incoming: true,
        dir: next.to_path_buf(),
        tap_fd,
        discard_log: Some(discard_log),
        disk: disk.or_else(|| current.disk.clone()),
        ..current.clone()
    }
}

/// What became of the pages the guest freed (and did not write again)
/// since its file last changed.
enum Freed {
    /// Punched out of the file.
    Punched,
    /// Zero pages of the layer; the file still holds old contents there.
    Carried(bitvec::vec::BitVec<u64, bitvec::order::Lsb0>),
}

/// With the parent (process `pid`, QEMU `current`) paused: copies the
/// pages it wrote into its file (`top` is `None`) or into the layer `top`
/// (its map beside it), and then into the new QEMU `successor` too, which
/// maps the unchanged file. Pages the guest freed become holes or zero
/// pages of the layer. Returns the bytes copied.
fn freeze_written(
    current: &QemuSpec,
    pid: u32,
    gen_ram: &Path,
    top: Option<&std::fs::File>,
    successor: Option<u32>,
) -> Result<(u64, Freed), CloneError> {
    let pages = ((u64::from(current.mem_mib) << 20) / dom0_memtap::PAGE_SIZE) as usize;
    let ram = &current.ram_path;
    // What the parent wrote since its file last changed (its private pages).
    let w = dom0_memtap::written_pages(pid, ram, pages).map_err(CloneError::Written)?;
    // Pages the guest reported free since, or before while generations
    // were layers, and did not write again.
    let log = current
        .discard_log
        .as_ref()
        .and_then(|l| std::fs::read(l).ok())
        .unwrap_or_default();
    let mut free = dom0_memtap::discarded_pages(&log, pages);
    if let Ok(before) = dom0_memtap::load_map(&current.dir.join(FREED), pages) {
        free |= before;
    }
    free &= !w.clone();
    let Some(top) = top else {
        // Into the file itself: freed pages become holes, as they would
        // have been in a shared RAM.
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .open(gen_ram)
            .map_err(io("open the generation"))?;
        let fixed = dom0_memtap::copy_written(pid, ram, &w, &dst).map_err(CloneError::Written)?;
        let punched = dom0_memtap::punch_pages(&dst, &free).map_err(io("punch free pages"))?;
        tracing::info!(
            written_kib = fixed / 1024,
            punched_kib = punched / 1024,
            "changes since the last freeze, into the file"
        );
        return Ok((fixed, Freed::Punched));
    };
    let fixed = dom0_memtap::copy_written(pid, ram, &w, top).map_err(CloneError::Written)?;
    let map = w.clone() | free.clone();
    let gen_dir = gen_ram.parent().unwrap_or(Path::new("."));
    dom0_memtap::save_map(&gen_dir.join(dom0_memtap::TOP_MAP), &map)
        .map_err(io("save the layer's map"))?;
    // The new QEMU maps the file: it gets the written pages as its own.
    let new_pid = successor.ok_or(CloneError::TaskFailed)?;
    dom0_memtap::write_into_process(new_pid, ram, &w, top).map_err(CloneError::Written)?;
    tracing::info!(
        written_kib = fixed / 1024,
        freed_kib = free.count_ones() as u64 * 4,
        "changes since the file last changed, into a layer"
    );
    Ok((fixed, Freed::Carried(free)))
}

/// Pauses the parent (QEMU `current`, process `old_pid`), freezes its
/// memory into `gen_dir/ram` and resumes it in a new QEMU; on failure the
/// old QEMU is resumed. A parent with a disk passes its chain as the new
/// QEMU opens it (`disk`: a prepared overlay on top of the old top, which
/// the old QEMU flushes and stops writing at the pause). Blocking.
pub fn freeze_by_restart(
    vmm: &Arc<dyn Vmm>,
    current: &QemuSpec,
    old_pid: Option<u32>,
    in_place: bool,
    disk: Option<serde_json::Value>,
    gen_dir: &Path,
    tl: &Timeline,
) -> Result<Handover, CloneError> {
    let vm_dir = current.dir.clone();
    let next = vm_dir.join("next");
    let _ = std::fs::remove_dir_all(&next);
    std::fs::create_dir_all(&next).map_err(io("create the new QEMU's directory"))?;
    let gen_ram = gen_dir.join("ram");
    // The file the new QEMU maps is the parent's own, and the generation's
    // base: its contents on its first freeze, or when no clone maps it,
    // with what the parent wrote; else a layer over it holds that.
    let in_place = current.share || in_place;
    let ram = current.ram_path.clone();
    std::fs::hard_link(&ram, &gen_ram).map_err(io("link the RAM file"))?;
    let top = if in_place {
        None
    } else {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(gen_dir.join(dom0_memtap::TOP))
            .and_then(|f| f.set_len(u64::from(current.mem_mib) << 20).map(|()| f))
            .map_err(io("create the generation's layer"))?;
        Some(f)
    };
    // One discard log per QEMU, named after the generation it starts on.
    let gen_name = gen_dir.file_name().unwrap_or_default().to_string_lossy();
    let log = vm_dir.join(format!("discards-{gen_name}"));
    let _ = std::fs::remove_file(&log);
    let spec = successor_spec(current, old_pid, &ram, &next, log, disk);
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
                let (n, f) = freeze_written(current, pid, &gen_ram, top.as_ref(), process.pid)?;
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
            std::fs::rename(&from, &to).map_err(io("move the new QEMU's sockets"))?;
        }
        let _ = std::fs::remove_dir_all(&next);
        if let Some(log) = &current.discard_log {
            let _ = std::fs::remove_file(log);
        }
        // The freed pages the file does not show, for the next freeze.
        let freed_map = vm_dir2.join(FREED);
        match freed {
            Some(Freed::Carried(bits)) => {
                dom0_memtap::save_map(&freed_map, &bits).map_err(io("save the freed pages"))?
            }
            _ => {
                let _ = std::fs::remove_file(&freed_map);
            }
        }
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
