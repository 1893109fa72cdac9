//! What a parent on a private mapping of its RAM file wrote since the file
//! last changed (its private pages, read from the paused process): written
//! into the file itself when no clone maps it, or else into a *layer* of
//! the generation (`dom0_memtap::Layer`), so that a clone point never
//! copies the memory that did not change. Pages the guest freed since
//! become holes of the file, or zero pages of the layer; in the second case
//! the file still holds their old contents, so they are remembered for the
//! next freeze (`freed.map` in the VM's directory).

use super::CloneError;
use crate::host::qemu::QemuSpec;
use bitvec::prelude::*;
use std::fs::File;
use std::path::Path;

/// The pages the guest freed since its file last changed, which the file
/// does not show as holes (a page map; see `dom0_memtap::save_map`), in
/// the VM's directory. Only while generations are layers over the file.
const FREED: &str = "freed.map";

/// What became of the pages the guest freed (and did not write again)
/// since its file last changed.
pub enum Freed {
    /// Punched out of the file.
    Punched,
    /// Zero pages of the layer; the file still holds old contents there.
    Carried(BitVec<u64, Lsb0>),
}

/// Links the parent's RAM file as the base of the generation in `gen_dir`
/// and creates its (empty) layer, `size` bytes of holes.
pub fn create_layer(ram: &Path, gen_dir: &Path, size: u64) -> Result<File, CloneError> {
    std::fs::hard_link(ram, gen_dir.join("ram")).map_err(CloneError::io("link the RAM file"))?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(gen_dir.join(dom0_memtap::TOP))
        .and_then(|f| f.set_len(size).map(|()| f))
        .map_err(CloneError::io("create the generation's layer"))
}

/// With the parent (process `pid`, QEMU `current`) paused: copies the
/// pages it wrote into `gen_ram` (its own file, `top` is `None`) or into
/// the layer `top` (and writes the layer's map beside it). Returns the
/// bytes copied and what became of freed pages.
pub fn freeze_written(
    current: &QemuSpec,
    pid: u32,
    gen_ram: &Path,
    top: Option<&File>,
) -> Result<(u64, Freed), CloneError> {
    let pages = ((u64::from(current.mem_mib) << 20) / dom0_memtap::PAGE_SIZE) as usize;
    let ram = &current.ram_path;
    let w = dom0_memtap::written_pages(pid, ram, pages).map_err(CloneError::Written)?;
    // Pages the guest reported free since the last freeze, or before while
    // generations were layers, and did not write again.
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
            .map_err(CloneError::io("open the generation"))?;
        let fixed = dom0_memtap::copy_written(pid, ram, &w, &dst).map_err(CloneError::Written)?;
        let punched =
            dom0_memtap::punch_pages(&dst, &free).map_err(CloneError::io("punch free pages"))?;
        tracing::info!(
            written_kib = fixed / 1024,
            punched_kib = punched / 1024,
            "changes since the last freeze, into the file"
        );
        return Ok((fixed, Freed::Punched));
    };
    let fixed = dom0_memtap::copy_written(pid, ram, &w, top).map_err(CloneError::Written)?;
    let map = w | free.clone();
    let gen_dir = gen_ram.parent().unwrap_or(Path::new("."));
    dom0_memtap::save_map(&gen_dir.join(dom0_memtap::TOP_MAP), &map)
        .map_err(CloneError::io("save the layer's map"))?;
    tracing::info!(
        written_kib = fixed / 1024,
        freed_kib = free.count_ones() as u64 * 4,
        "changes since the file last changed, into a layer"
    );
    Ok((fixed, Freed::Carried(free)))
}

/// Empties a QEMU's discard log (it keeps appending to it; it makes the
/// file at its first record, so a missing one is fine).
pub fn restart_log(log: &Path) -> Result<(), CloneError> {
    let emptied = std::fs::OpenOptions::new()
        .write(true)
        .open(log)
        .and_then(|f| f.set_len(0));
    match emptied {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(CloneError::io("restart the discard log")(e))
        }
        _ => Ok(()),
    }
}

/// Remembers (or forgets) the freed pages the file of the VM in `vm_dir`
/// does not show, for its next freeze.
pub fn keep_freed(vm_dir: &Path, freed: Option<&Freed>) -> Result<(), CloneError> {
    let path = vm_dir.join(FREED);
    match freed {
        Some(Freed::Carried(bits)) => {
            dom0_memtap::save_map(&path, bits).map_err(CloneError::io("save the freed pages"))
        }
        _ => {
            let _ = std::fs::remove_file(&path);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_pages_are_kept_only_while_carried() {
        let dir = tempfile::tempdir().unwrap();
        let mut bits = bitvec![u64, Lsb0; 0; 16];
        bits.set(3, true);
        keep_freed(dir.path(), Some(&Freed::Carried(bits.clone()))).unwrap();
        let back = dom0_memtap::load_map(&dir.path().join(FREED), 16).unwrap();
        assert_eq!(back, bits);
        keep_freed(dir.path(), Some(&Freed::Punched)).unwrap();
        assert!(!dir.path().join(FREED).exists());
        keep_freed(dir.path(), None).unwrap();
    }

    #[test]
    fn a_discard_log_restarts_empty_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("discards");
        restart_log(&log).unwrap();
        assert!(!log.exists(), "not made");
        std::fs::write(&log, [1u8; 32]).unwrap();
        restart_log(&log).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert!(restart_log(&dir.path().join("no/such/dir/log")).is_ok());
    }

    #[test]
    fn a_layer_starts_as_holes_over_a_linked_base() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("ram-src");
        std::fs::write(&ram, [1u8; 8192]).unwrap();
        let gen = dir.path().join("g");
        std::fs::create_dir(&gen).unwrap();
        let top = create_layer(&ram, &gen, 8192).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&gen.join("ram")), ino(&ram));
        assert_eq!(top.metadata().unwrap().len(), 8192);
        assert_eq!(top.metadata().unwrap().blocks(), 0);
        // Only once.
        assert!(create_layer(&ram, &gen, 8192).is_err());
    }
}
