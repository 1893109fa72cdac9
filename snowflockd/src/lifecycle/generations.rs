//! Generations: the frozen memory (and device state) of a parent at one
//! clone point. Their names, where their files live, and releasing them.

use super::daemon::{blocking, Daemon};
use crate::state::ticket::Release;

/// Name of generation `n` of VM `vm` on its own host: `<vm>-g<n>`.
pub fn local_name(vm: &str, n: u64) -> String {
    format!("{vm}-g{n}")
}

/// Name of a generation on the page server and in memtap on other hosts:
/// `<origin host>.<generation>`, unique across the cluster.
pub fn shared_name(origin: &str, generation: &str) -> String {
    format!("{origin}.{generation}")
}

/// Name of layer `i` of `parent`'s disk in merge epoch `epoch` (0 is the
/// base): `<parent>-e<epoch>d<i>`.
pub fn disk_layer_name(parent: &str, epoch: u32, i: usize) -> String {
    format!("{parent}-e{epoch}d{i}")
}

/// Whether directory name `dir` is a generation of `parent`.
pub fn is_generation_of(dir: &str, parent: &str) -> bool {
    dir.strip_prefix(parent)
        .and_then(|r| r.strip_prefix("-g"))
        .is_some_and(|g| !g.is_empty() && g.bytes().all(|c| c.is_ascii_digit()))
}

/// Unlinks the memory of the generation in `dir` (its base link and its
/// layer), keeping its descriptor.
pub fn unlink_memory(dir: &std::path::Path) {
    for f in ["ram", dom0_memtap::TOP, dom0_memtap::TOP_MAP] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// Errors naming another host's generation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerationError {
    /// The descriptor's memory source is not `<host>:<generation>` with
    /// safe names.
    #[error("malformed memory source {0:?}")]
    MalformedSource(String),
}

/// Memtap name of a generation from another host, from its descriptor's
/// origin host and memory source (`<host>:<generation>`).
pub fn remote_name(origin_host: &str, source: &str) -> Result<String, GenerationError> {
    let bad = || GenerationError::MalformedSource(source.to_string());
    let gen = source.split_once(':').map(|(_, g)| g).ok_or_else(bad)?;
    let ok = |s: &str| {
        !s.is_empty() && s.len() <= 60 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !ok(origin_host) || !ok(gen) {
        return Err(bad());
    }
    Ok(shared_name(origin_host, gen))
}

impl Daemon {
    /// Withdraws a ticket's generation from the page server and deletes
    /// its files (off the async runtime).
    pub async fn drop_generation(&self, release: Release) {
        if let (Some(name), Some(p)) = (release.published, &self.pages) {
            p.withdraw(&name);
        }
        if let Some(g) = release.generation {
            let _ = blocking(move || {
                let _ = std::fs::remove_dir_all(g);
                Ok(())
            })
            .await;
        }
    }

    /// The host memory `vm` takes: its private pages; for an original VM
    /// also the RAM file it runs on and the older generations it keeps
    /// (each file counted once; a layered generation by its layer).
    pub fn mem_use(&self, vm: &crate::state::vm::Vm) -> snowflock_proto::admin::MemUse {
        use std::os::unix::fs::MetadataExt;
        let pid = *vm.pid.lock();
        let current = self.vmms.spec(vm.name());
        let ram = current
            .as_ref()
            .map(|s| s.ram_path.clone())
            .or_else(|| vm.spec.memory.generation_ram().map(|p| p.to_path_buf()))
            .unwrap_or_else(|| vm.placed.ram_path.clone());
        let mut m = crate::host::memuse::of_vm(pid, &ram, current.is_some());
        if current.is_some() {
            let own = std::fs::metadata(&ram).map(|m| m.ino()).ok();
            let gens = self.cfg.state_dir.join("gens");
            let mut seen = std::collections::HashSet::new();
            for e in std::fs::read_dir(gens).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !is_generation_of(&name, vm.name()) {
                    continue;
                }
                for f in ["ram", dom0_memtap::TOP] {
                    if let Ok(md) = std::fs::metadata(e.path().join(f)) {
                        if Some(md.ino()) != own && seen.insert(md.ino()) {
                            m.generations_bytes += md.blocks() * 512;
                        }
                    }
                }
            }
        }
        m
    }

    /// Unlinks the RAM file of `ticket`'s generation once none of its
    /// clones runs and no other host may read it: nothing maps it any more
    /// (the parent runs on its own link, if the file was its RAM), so its
    /// memory goes now rather than when the ticket ends. The descriptor
    /// stays until then.
    pub fn unlink_idle_generation(&self, ticket: &str) {
        let idle = self.with(|r| {
            let t = r.tickets.get(ticket)?;
            (t.all_done() && t.published.is_none())
                .then(|| t.generation.clone())
                .flatten()
        });
        if let Some(dir) = idle {
            unlink_memory(&dir);
        }
    }

    /// Withdraws the disk layers of `vm`'s current merge epoch from the
    /// page server (a parent that ended, or one whose chain was merged:
    /// `epoch` and `layers` give the names).
    pub fn withdraw_disk_layers(&self, parent: &str, epoch: u32, layers: usize) {
        if let Some(p) = &self.pages {
            for i in 0..layers {
                p.withdraw(&shared_name(
                    &self.cfg.host,
                    &disk_layer_name(parent, epoch, i),
                ));
            }
        }
    }

    /// Removes every generation of a parent that is gone or stopped.
    pub async fn cleanup_generations(&self, parent: &str) {
        let gens = self.cfg.state_dir.join("gens");
        let Ok(rd) = std::fs::read_dir(&gens) else {
            return;
        };
        let mut doomed = Vec::new();
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if is_generation_of(&n, parent) {
                if let Some(p) = &self.pages {
                    p.withdraw(&shared_name(&self.cfg.host, &n));
                }
                doomed.push(e.path());
            }
        }
        let _ = blocking(move || {
            for d in doomed {
                let _ = std::fs::remove_dir_all(d);
            }
            Ok(())
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names() {
        assert_eq!(local_name("web", 3), "web-g3");
        assert!(is_generation_of("web-g3", "web"));
        assert!(!is_generation_of("web-g3", "we"));
        assert!(!is_generation_of("web-2-g3", "web"));
        assert!(!is_generation_of("web-g", "web"));
        assert_eq!(remote_name("h0", "h0:web-g3").unwrap(), "h0.web-g3");
        for bad in ["web-g3", "h0:", "h0:../x", "h0:a.b"] {
            assert!(remote_name("h0", bad).is_err(), "{bad}");
        }
        assert!(remote_name("h/0", "h0:web-g1").is_err());
    }
}
