//! A parent's frozen disk for clones on other hosts (`blkfront-ondemand`'s
//! two ends, built on the memory machinery):
//!
//! * on the origin host, [`layout`] lists the chain's layers (the image's
//!   disk, then every layer frozen by a clone call) with their data
//!   extents, and publishes each on the page server like a memory
//!   generation;
//! * on a clone's host, [`attach`] adds each layer to memtap, so the
//!   clone's QEMU reads them from files in the memtap mount: a block is
//!   fetched the first time any clone of this host reads it, kept in
//!   memtap's cache file on the host's disk, and never fetched if the
//!   layer holds a hole there.
//!
//! Layer `i` of parent `p` is named `p-e<epoch>d<i>` (0 is the base). A
//! frozen layer never changes, so its name is stable across clone calls
//! and clones of later generations share the cache; a merge of the chain
//! (see [`merge_if_idle`]) starts a new epoch, so a name never stands for
//! two contents.

use super::CloneError;
use crate::lifecycle::Daemon;
use crate::state::vm::{DiskLayers, DiskPlan, Format, Vm};
use snowflock_descriptor::{DiskLayer, DiskLayout, MAX_DISK_LAYERS, PAGE_SIZE};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::lifecycle::generations::disk_layer_name as layer_name;

/// Time a merge of the parent's chain may take.
const MERGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Keeps the parent's chain short: when no clone of the parent runs
/// anywhere (none here, no ticket with a running child), nothing reads its
/// frozen layers, so they are merged back into its first overlay with a
/// live active commit (the parent keeps running) and deleted; the chain is
/// `base <- first overlay` again. Called before each clone call, under the
/// parent's clone lock. A failed merge is logged and leaves the chain as
/// it was: the clone goes on with one more layer.
pub async fn merge_if_idle(d: &Arc<Daemon>, parent: &Arc<Vm>) {
    let Some(layers) = parent.disk_layers.lock().clone() else {
        return;
    };
    if layers.frozen.is_empty() {
        return;
    }
    let name = parent.name().to_string();
    let idle = d.with(|r| {
        r.clones_of(&name).is_empty()
            && r.tickets
                .values()
                .filter(|t| t.owner == name)
                .all(|t| t.all_done())
    });
    if !idle {
        return;
    }
    let (vmm, dir, top_node) = (
        d.vmm.clone(),
        parent.placed.dir.clone(),
        layers.top_node.clone(),
    );
    let t0 = std::time::Instant::now();
    let merged = tokio::task::spawn_blocking(move || {
        vmm.control(&dir, std::time::Duration::from_secs(2))
            .and_then(|mut q| q.merge_disk(&top_node, crate::host::qemu::DISK_NODE, MERGE_TIMEOUT))
    })
    .await;
    match merged {
        Ok(Ok(())) => {
            let (gone, old_epoch, old_count) = {
                let mut l = parent.disk_layers.lock();
                let Some(l) = l.as_mut() else { return };
                let (e, n) = (l.epoch, l.frozen.len() + 1);
                (l.merged(), e, n)
            };
            d.withdraw_disk_layers(&name, old_epoch, old_count);
            let files = gone.len();
            let _ = crate::lifecycle::daemon::blocking(move || {
                for f in gone {
                    let _ = std::fs::remove_file(f);
                }
                Ok(())
            })
            .await;
            tracing::info!(vm = %name, layers = files, ms = t0.elapsed().as_millis() as u64, "disk layers merged");
        }
        Ok(Err(e)) => {
            tracing::warn!(vm = %name, error = %snowflock_proto::error::chain(&e), "cannot merge the disk's layers; the chain grows by one");
        }
        Err(_) => tracing::warn!(vm = %name, "disk merge task failed"),
    }
}

/// Data extents of a layer file, widened to whole pages.
fn extents(path: &Path, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let f = std::fs::File::open(path)?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in dom0_memtap::data_extents(&f, size)? {
        let (a, b) = (a / PAGE_SIZE * PAGE_SIZE, b.div_ceil(PAGE_SIZE) * PAGE_SIZE);
        match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b.min(size)),
            _ => out.push((a, b.min(size))),
        }
    }
    Ok(out)
}

/// The layers of `layers` as the descriptor lists them, and the files to
/// publish under their names. Blocking (reads extents; rounds a frozen
/// qcow2 layer's size up to whole pages, which qcow2 ignores).
pub fn layout(
    parent: &str,
    host: &str,
    layers: &DiskLayers,
) -> Result<(DiskLayout, Vec<(String, PathBuf)>), CloneError> {
    let unsupported = CloneError::DiskUnsupported(
        "only a disk behind an overlay (a VM started from an image) can be cloned to other hosts",
    );
    let Some((base, base_format)) = &layers.base else {
        return Err(unsupported);
    };
    if *base_format != Format::Raw {
        return Err(unsupported);
    }
    let mut files = vec![(base.clone(), Format::Raw)];
    files.extend(layers.frozen.iter().map(|p| (p.clone(), Format::Qcow2)));
    if files.len() > MAX_DISK_LAYERS {
        return Err(CloneError::DiskUnsupported(
            "this VM's disk has been frozen too many times (layers are not merged yet)",
        ));
    }
    let io = |what: String| move |err| CloneError::Io { what, err };
    let virtual_size = std::fs::metadata(base)
        .map_err(io(format!("read {}", base.display())))?
        .len();
    if !virtual_size.is_multiple_of(PAGE_SIZE) {
        return Err(CloneError::DiskUnsupported(
            "the image's disk size is not a multiple of 4 KiB",
        ));
    }
    let mut out = Vec::new();
    let mut publish = Vec::new();
    for (i, (path, format)) in files.into_iter().enumerate() {
        let mut size = std::fs::metadata(&path)
            .map_err(io(format!("read {}", path.display())))?
            .len();
        if !size.is_multiple_of(PAGE_SIZE) && format == Format::Qcow2 {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(format!("open {}", path.display())))?;
            size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            f.set_len(size)
                .map_err(io(format!("round up {}", path.display())))?;
        }
        let data =
            extents(&path, size).map_err(io(format!("read the extents of {}", path.display())))?;
        let name = layer_name(parent, layers.epoch, i);
        out.push(DiskLayer {
            source: format!("{host}:{name}"),
            format: format.as_str().to_string(),
            size,
            data,
        });
        publish.push((name, path));
    }
    Ok((
        DiskLayout {
            virtual_size,
            layers: out,
        },
        publish,
    ))
}

/// Errors attaching another host's disk layers.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("malformed disk layer source {0:?}")]
    Source(String),
    #[error("memtap refused disk layer {name}")]
    Memtap {
        name: String,
        #[source]
        err: dom0_memtap::MemtapError,
    },
}

/// Adds the descriptor's disk layers to memtap (one reference each, for
/// one clone VM) and returns the clone's disk plan. On error, the
/// references taken are dropped again.
pub fn attach(
    memtap: &dom0_memtap::Memtap,
    origin_host: &str,
    origin: std::net::SocketAddr,
    disk: &DiskLayout,
) -> Result<DiskPlan, AttachError> {
    let mut layers = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let res = (|| {
        for l in &disk.layers {
            let name = crate::lifecycle::generations::remote_name(origin_host, &l.source)
                .map_err(|_| AttachError::Source(l.source.clone()))?;
            let pages = (l.size / PAGE_SIZE) as usize;
            let mut holes = bitvec::bitvec![u64, bitvec::order::Lsb0; 1; pages];
            for &(a, b) in &l.data {
                holes[(a / PAGE_SIZE) as usize..(b / PAGE_SIZE) as usize].fill(false);
            }
            let spec = dom0_memtap::GenerationSpec {
                name: name.clone(),
                size: l.size,
                holes,
                origin,
            };
            let path = memtap
                .add_generation(spec)
                .map_err(|err| AttachError::Memtap {
                    name: name.clone(),
                    err,
                })?;
            names.push(name);
            let format = if l.format == "raw" {
                Format::Raw
            } else {
                Format::Qcow2
            };
            layers.push((path, format));
        }
        Ok(())
    })();
    if let Err(e) = res {
        for n in &names {
            memtap.release_generation(n);
        }
        return Err(e);
    }
    Ok(DiskPlan::Remote {
        layers,
        memtap: names,
        virtual_size: disk.virtual_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_whole_pages_and_merged() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("layer");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"x", 5000).unwrap();
        f.write_all_at(b"y", 512 << 10).unwrap();
        let e = extents(&p, 1 << 20).unwrap();
        assert!(!e.is_empty());
        for &(a, b) in &e {
            assert!(a % PAGE_SIZE == 0 && b % PAGE_SIZE == 0 && a < b && b <= 1 << 20);
        }
        assert!(e.iter().any(|&(a, b)| a <= 4096 && b >= 8192));
        assert!(e.iter().any(|&(a, b)| a <= 512 << 10 && b > 512 << 10));
        // A whole-file read of the holes would be zeros: the extents cover
        // far less than the file.
        let covered: u64 = e.iter().map(|(a, b)| b - a).sum();
        assert!(covered < 1 << 20, "{covered}");
    }

    #[test]
    fn names() {
        assert_eq!(layer_name("web", 0, 0), "web-e0d0");
        assert_eq!(
            crate::lifecycle::generations::remote_name("h0", "h0:web-e3d2").unwrap(),
            "h0.web-e3d2"
        );
    }
}
