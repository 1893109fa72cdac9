//! Merging a VM's frozen disk layers back into its first layer (node
//! `disk0`): a live active commit, the VM running on. Used before a clone
//! call when no clone reads the layers, and when a VM on a disk of the
//! user's own stops, so that everything it wrote lands in their disk.

use super::daemon::{blocking, Daemon};
use crate::state::vm::Vm;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time a merge may take.
pub const MERGE_TIMEOUT: Duration = Duration::from_secs(300);

impl Daemon {
    /// Commits every layer above `disk0` into it, deletes the merged files
    /// and withdraws their published names. Returns whether the chain is
    /// now a single layer (true also when there was nothing to merge). A
    /// failure is logged; the chain stays as it was.
    pub async fn merge_disk_layers(self: &Arc<Self>, vm: &Arc<Vm>) -> bool {
        let Some(layers) = vm.disk_layers.lock().clone() else {
            return true;
        };
        if layers.frozen.is_empty() {
            return true;
        }
        let (vmm, dir, top_node) = (self.vmm.clone(), vm.placed.dir.clone(), layers.top_node);
        let t0 = Instant::now();
        let merged = tokio::task::spawn_blocking(move || {
            vmm.control(&dir, Duration::from_secs(2)).and_then(|mut q| {
                q.merge_disk(&top_node, crate::host::qemu::DISK_NODE, MERGE_TIMEOUT)
            })
        })
        .await;
        match merged {
            Ok(Ok(())) => {
                let (gone, epoch, count) = {
                    let mut l = vm.disk_layers.lock();
                    let Some(l) = l.as_mut() else {
                        return true;
                    };
                    let (e, n) = (l.epoch, l.frozen.len() + usize::from(l.base.is_some()));
                    (l.merged(), e, n)
                };
                self.withdraw_disk_layers(vm.name(), epoch, count);
                let files = gone.len();
                let _ = blocking(move || {
                    for f in gone {
                        let _ = std::fs::remove_file(f);
                    }
                    Ok(())
                })
                .await;
                tracing::info!(vm = %vm.name(), layers = files, ms = t0.elapsed().as_millis() as u64, "disk layers merged");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(vm = %vm.name(), error = %snowflock_proto::error::chain(&e), "cannot merge the disk's layers");
                false
            }
            Err(_) => {
                tracing::warn!(vm = %vm.name(), "disk merge task failed");
                false
            }
        }
    }
}
