//! A parent's frozen disk for clones on other hosts: the daemon's side of
//! `blkfront-ondemand` (which knows files, extents and memtap):
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
use blkfront_ondemand::LayerFormat;
use snowflock_descriptor::DiskLayout;
use std::path::PathBuf;
use std::sync::Arc;

pub use crate::lifecycle::generations::disk_layer_name as layer_name;

/// Keeps the parent's chain short: when no clone of the parent runs
/// anywhere (none here, no ticket with a running child), nothing reads its
/// frozen layers, so they are merged back into its first layer with a live
/// active commit (the parent keeps running) and deleted
/// ([`Daemon::merge_disk_layers`]). Called before each clone call, under
/// the parent's clone lock. A failed merge is logged and leaves the chain
/// as it was: the clone goes on with one more layer.
pub async fn merge_if_idle(d: &Arc<Daemon>, parent: &Arc<Vm>) {
    let frozen = parent
        .disk_layers
        .lock()
        .as_ref()
        .is_some_and(|l| !l.frozen.is_empty());
    if !frozen {
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
    if idle {
        d.merge_disk_layers(parent).await;
    }
}

fn layer_format(f: Format) -> LayerFormat {
    match f {
        Format::Raw => LayerFormat::Raw,
        Format::Qcow2 => LayerFormat::Qcow2,
    }
}

/// The parent's chain as the descriptor lists it (see
/// [`blkfront_ondemand::layout`]), and the files to publish under their
/// names. Blocking.
pub fn layout(
    parent: &str,
    host: &str,
    layers: &DiskLayers,
) -> Result<(DiskLayout, Vec<(String, PathBuf)>), CloneError> {
    // The image's disk under the first overlay, or (a disk of the user's
    // own) the first frozen layer is the disk itself.
    let mut files: Vec<(PathBuf, Format)> = layers.base.iter().cloned().collect();
    files.extend(
        layers
            .frozen
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), layers.frozen_format(i))),
    );
    let chain: Vec<(PathBuf, LayerFormat, String)> = files
        .iter()
        .enumerate()
        .map(|(i, (p, f))| {
            let name = layer_name(parent, layers.epoch, i);
            (p.clone(), layer_format(*f), format!("{host}:{name}"))
        })
        .collect();
    let layout = blkfront_ondemand::layout(&chain)?;
    let publish = files
        .into_iter()
        .enumerate()
        .map(|(i, (p, _))| (layer_name(parent, layers.epoch, i), p))
        .collect();
    Ok((layout, publish))
}

/// Errors attaching another host's disk layers.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("malformed disk layer source {0:?}")]
    Source(String),
    #[error("the parent's frozen disk")]
    Disk(#[from] blkfront_ondemand::DiskError),
}

/// Adds the descriptor's disk layers to memtap (one reference each, for
/// one clone VM), fetched as the memory is (`fetch`), and returns the
/// clone's disk plan.
pub fn attach(
    memtap: &dom0_memtap::Memtap,
    origin_host: &str,
    origin: std::net::SocketAddr,
    disk: &DiskLayout,
    fetch: blkfront_ondemand::Fetch,
) -> Result<DiskPlan, AttachError> {
    let names = disk
        .layers
        .iter()
        .map(|l| {
            crate::lifecycle::generations::remote_name(origin_host, &l.source)
                .map_err(|_| AttachError::Source(l.source.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let a = blkfront_ondemand::attach(memtap, origin, disk, &names, fetch)?;
    Ok(DiskPlan::Remote {
        layers: a
            .layers
            .into_iter()
            .map(|(p, f)| {
                let f = match f {
                    LayerFormat::Raw => Format::Raw,
                    LayerFormat::Qcow2 => Format::Qcow2,
                };
                (p, f)
            })
            .collect(),
        memtap: a.names,
        virtual_size: disk.virtual_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(layer_name("web", 0, 0), "web-e0d0");
        assert_eq!(
            crate::lifecycle::generations::remote_name("h0", "h0:web-e3d2").unwrap(),
            "h0.web-e3d2"
        );
    }
}
