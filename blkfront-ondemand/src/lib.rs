//! blkfront-ondemand: a clone's disk read on demand from its parent's host.
//!
//! SnowFlock's Xen `blkfront` fetched a clone's disk blocks from the parent
//! the first time they were read. Here the same job is done with the
//! memory machinery of `dom0-memtap`, because a frozen disk layer is, like
//! a frozen memory generation, a file that never changes again:
//!
//! ```text
//!  origin host                               clone host
//!  parent QEMU                               clone QEMU
//!   top layer (written)                       private overlay (4 KiB clusters)
//!   frozen layers ----+                        | backing chain given explicitly
//!   image disk (raw) -+-> page server  --TCP-> memtap files <mount>/<host>.<p>-e<E>d<i>
//!                        (publish)             cache file on this host's disk,
//!                                              present bitmap, hole map
//! ```
//!
//! * [`layout`] (origin host): the chain's layers, base first, each with its
//!   size (rounded up to whole pages) and data extents (`SEEK_DATA`/
//!   `SEEK_HOLE`), as the descriptor carries them. Holes (never-written
//!   blocks, blocks the parent's file system discarded) are never fetched.
//! * [`attach`] (clone host): each layer added to memtap with its hole map;
//!   a block is fetched the first time any clone of this host reads it and
//!   kept in memtap's cache file, so co-located clones fetch it once. Like
//!   memory, layers may also arrive by multicast and be fetched whole in
//!   the background ([`Fetch`]).
//!
//! Blocks a clone overwrites before reading are never fetched: its
//! overlay's clusters are 4 KiB, the guest file system's block size, so a
//! write never needs the rest of a cluster from below. A fetch past the
//! deadline marks the layer lost and the daemon stops the clones reading
//! it, with the reason (as for memory).
//!
//! The daemon keeps the naming (`<parent>-e<epoch>d<i>`), publication and
//! the merge of idle chains; this crate knows files, extents and memtap.

use snowflock_descriptor::{DiskLayer, DiskLayout, MAX_DISK_LAYERS, PAGE_SIZE};
use std::path::{Path, PathBuf};

/// Format of a layer file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    Raw,
    Qcow2,
}

impl LayerFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerFormat::Raw => "raw",
            LayerFormat::Qcow2 => "qcow2",
        }
    }
}

/// Errors listing or attaching a frozen disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A layer file could not be read (or rounded up).
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// The chain cannot be served as it is.
    #[error("{0}")]
    Unsupported(String),
    /// memtap refused a layer.
    #[error("memtap refused disk layer {name}")]
    Memtap {
        name: String,
        #[source]
        err: dom0_memtap::MemtapError,
    },
}

/// Data extents of a layer file, widened to whole pages and merged.
pub fn extents(path: &Path, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
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

/// The descriptor's view of a chain: `layers` are (file, format, source
/// name), base first; the base must be raw, the rest qcow2. A qcow2 layer
/// whose size is not whole pages is extended to whole pages (qcow2 ignores
/// trailing space; the page service serves whole pages). Blocking.
pub fn layout(layers: &[(PathBuf, LayerFormat, String)]) -> Result<DiskLayout, DiskError> {
    if layers.is_empty() || layers.len() > MAX_DISK_LAYERS {
        return Err(DiskError::Unsupported(format!(
            "a chain of {} layers (1 to {MAX_DISK_LAYERS} can be served)",
            layers.len()
        )));
    }
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |err| DiskError::Io { what, path, err }
    };
    let mut out = Vec::new();
    for (i, (path, format, source)) in layers.iter().enumerate() {
        if (i == 0) != (*format == LayerFormat::Raw) {
            return Err(DiskError::Unsupported(format!(
                "layer {i} ({}) is {}: the base must be raw and the layers above it qcow2",
                path.display(),
                format.as_str()
            )));
        }
        let mut size = std::fs::metadata(path).map_err(io("read", path))?.len();
        if !size.is_multiple_of(PAGE_SIZE) {
            if *format == LayerFormat::Raw {
                return Err(DiskError::Unsupported(format!(
                    "the base disk {} is not a whole number of 4 KiB blocks",
                    path.display()
                )));
            }
            size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(size))
                .map_err(io("round up", path))?;
        }
        out.push(DiskLayer {
            source: source.clone(),
            format: format.as_str().to_string(),
            size,
            data: extents(path, size).map_err(io("read the extents of", path))?,
        });
    }
    let virtual_size = out[0].size;
    Ok(DiskLayout {
        virtual_size,
        layers: out,
    })
}

/// What a clone's host fetches of the layers beyond the blocks its clones
/// read; the same as for the clone's memory (see
/// [`dom0_memtap::GenerationSpec`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetch {
    /// Join the layers' multicast groups: blocks other hosts' clones read
    /// arrive here too.
    pub mcast: bool,
    /// Fetch the whole layers in the background (background completion).
    pub complete: bool,
}

/// A frozen disk attached on a clone's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The layers' files in the memtap mount, base first.
    pub layers: Vec<(PathBuf, LayerFormat)>,
    /// Their memtap names (one reference each, to release when the clone
    /// ends).
    pub names: Vec<String>,
}

/// Adds the layers of `disk` to memtap under `names` (the daemon's
/// cluster-unique names, in layer order), one reference each, fetched as
/// `fetch` says. On error the references taken are dropped again.
pub fn attach(
    memtap: &dom0_memtap::Memtap,
    origin: std::net::SocketAddr,
    disk: &DiskLayout,
    names: &[String],
    fetch: Fetch,
) -> Result<Attached, DiskError> {
    if names.len() != disk.layers.len() {
        return Err(DiskError::Unsupported(format!(
            "{} names for {} layers",
            names.len(),
            disk.layers.len()
        )));
    }
    let mut layers = Vec::new();
    let mut added: Vec<String> = Vec::new();
    for (l, name) in disk.layers.iter().zip(names) {
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
            mcast: fetch.mcast,
            complete: fetch.complete,
        };
        match memtap.add_generation(spec) {
            Ok(path) => {
                added.push(name.clone());
                let format = if l.format == "raw" {
                    LayerFormat::Raw
                } else {
                    LayerFormat::Qcow2
                };
                layers.push((path, format));
            }
            Err(err) => {
                added.iter().for_each(|n| memtap.release_generation(n));
                return Err(DiskError::Memtap {
                    name: name.clone(),
                    err,
                });
            }
        }
    }
    Ok(Attached {
        layers,
        names: added,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_are_whole_pages_and_merged() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("layer");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"x", 5000).unwrap();
        f.write_all_at(b"y", 512 << 10).unwrap();
        let e = extents(&p, 1 << 20).unwrap();
        for &(a, b) in &e {
            assert!(a % PAGE_SIZE == 0 && b % PAGE_SIZE == 0 && a < b && b <= 1 << 20);
        }
        assert!(e.iter().any(|&(a, b)| a <= 4096 && b >= 8192));
        assert!(e.iter().any(|&(a, b)| a <= 512 << 10 && b > 512 << 10));
        let covered: u64 = e.iter().map(|(a, b)| b - a).sum();
        assert!(covered < 1 << 20, "{covered}");
    }

    #[test]
    fn layouts_round_qcow2_layers_up_and_refuse_odd_chains() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let top = d.path().join("top.qcow2");
        std::fs::write(&top, vec![1u8; 5000]).unwrap();
        let chain = vec![
            (base.clone(), LayerFormat::Raw, "h0:p-e0d0".to_string()),
            (top.clone(), LayerFormat::Qcow2, "h0:p-e0d1".to_string()),
        ];
        let l = layout(&chain).unwrap();
        assert_eq!(l.virtual_size, 1 << 20);
        assert_eq!(l.layers[0].data, Vec::<(u64, u64)>::new(), "a hole only");
        assert_eq!(l.layers[1].size, 8192);
        assert_eq!(std::fs::metadata(&top).unwrap().len(), 8192);
        assert!(layout(&[]).is_err());
        assert!(layout(&chain[1..]).is_err(), "a qcow2 base");
        std::fs::File::create(&base).unwrap().set_len(1000).unwrap();
        assert!(layout(&chain).is_err(), "a raw base of odd size");
    }
}
