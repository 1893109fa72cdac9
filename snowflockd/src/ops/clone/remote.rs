//! Clones on other hosts: the origin asks a host to start some clones of a
//! descriptor ([`start_on_host`]); that host starts them with their memory
//! served on demand by memtap from the origin's page server
//! ([`start_remote`]).

use super::start::{resume_clone, spawn_clone, Source};
use super::{CloneError, Timeline};
use crate::lifecycle::generations;
use crate::lifecycle::Daemon;
use crate::state::metrics::bump;
use crate::state::vm::DiskPlan;
use crate::state::vm::MemSource;
use snowflock_descriptor::{CloneSlot, Descriptor};
use snowflock_proto::admin::{AdminErrorCode as C, AdminResponse, CloneStart};
use snowflock_proto::error::chain;
use snowflock_proto::peer::PeerRequest;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Asks `host` to start clones `ids` of the descriptor; one outcome per ID.
pub async fn start_on_host(
    d: &Arc<Daemon>,
    host: &str,
    encoded: &[u8],
    ids: Vec<u32>,
    tl: &Timeline,
) -> Vec<(u32, Result<(), CloneError>)> {
    let page_server = d
        .cfg
        .cluster
        .as_ref()
        .map(|c| c.page_server.to_string())
        .unwrap_or_default();
    let req = PeerRequest::StartClones {
        descriptor: encoded.to_vec(),
        clone_ids: ids.clone(),
        page_server,
    };
    let timeout = Duration::from_secs(d.cfg.clone_timeout_s + 60);
    let res = d.peers.call(host, &req, timeout).await;
    tl.mark(format!("{host}_answered"));
    let fail = |why: String| CloneError::Remote {
        host: host.to_string(),
        why,
    };
    let each = |out: &dyn Fn(u32) -> Result<(), CloneError>| {
        ids.iter().map(|id| (*id, out(*id))).collect()
    };
    match res {
        Ok(AdminResponse::ClonesStarted { results }) => {
            each(&|id| match results.iter().find(|r| r.clone_id == id) {
                Some(CloneStart { error: None, .. }) => Ok(()),
                Some(CloneStart { error: Some(e), .. }) => Err(fail(e.clone())),
                None => Err(fail("it did not report on this clone".into())),
            })
        }
        Ok(AdminResponse::Error { message, .. }) => {
            each(&|_| Err(fail(format!("refused: {message}"))))
        }
        Ok(other) => each(&|_| Err(fail(format!("answered {other:?}")))),
        Err(e) => {
            let msg = chain(&e);
            each(&|_| Err(fail(msg.clone())))
        }
    }
}

/// Whether this host joins the multicast groups of a descriptor's
/// generation and disk layers: the origin multicasts (`mcast_port`) and
/// this host has `mcast` on, on the same port. Ports that differ are a
/// configuration mistake: warned about once per origin and port, and the
/// pages come by unicast.
fn joins_mcast(d: &Daemon, desc: &Descriptor) -> bool {
    let mine = d.cfg.cluster.as_ref().and_then(|c| c.mcast).map(|m| m.port);
    match mcast_join(desc.meta.mcast_port, mine) {
        McastJoin::Join => true,
        McastJoin::Unicast => false,
        McastJoin::OtherPort { origin, mine } => {
            static WARNED: parking_lot::Mutex<Vec<(String, u16)>> =
                parking_lot::Mutex::new(Vec::new());
            let key = (desc.meta.origin_host.clone(), origin);
            let mut warned = WARNED.lock();
            if !warned.contains(&key) {
                tracing::warn!(
                    origin = %desc.meta.origin_host,
                    origin_port = origin,
                    mcast_port = mine,
                    "the origin multicasts pages on another port than this host's mcast_port: its pages come by unicast only (set the same mcast_port on every host)"
                );
                warned.push(key);
            }
            false
        }
    }
}

/// [`joins_mcast`]'s decision.
#[derive(Debug, PartialEq, Eq)]
enum McastJoin {
    Join,
    /// The origin or this host does not multicast.
    Unicast,
    OtherPort {
        origin: u16,
        mine: u16,
    },
}

fn mcast_join(origin: Option<u16>, mine: Option<u16>) -> McastJoin {
    match (origin, mine) {
        (Some(o), Some(m)) if o == m => McastJoin::Join,
        (Some(origin), Some(mine)) => McastJoin::OtherPort { origin, mine },
        _ => McastJoin::Unicast,
    }
}

/// Why a host refuses to start clones for another.
#[derive(Debug, thiserror::Error)]
pub enum RemoteStartError {
    #[error("bad descriptor")]
    Descriptor(#[source] snowflock_descriptor::DescriptorError),
    #[error("this host has no memtap (not in a cluster)")]
    NoMemtap,
    #[error("bad page server address {0:?}")]
    PageServer(String),
    #[error("clone IDs do not match the descriptor")]
    Ids,
    #[error("bad generation name")]
    Generation(#[from] generations::GenerationError),
    #[error("the parent's image is not usable on this host")]
    Image(#[source] snowflock_image::ImageError),
    #[error("{host} has {free} free VM slots, {asked} asked")]
    NoCapacity {
        host: String,
        free: u32,
        asked: usize,
    },
    #[error("memtap")]
    Memtap(#[source] dom0_memtap::MemtapError),
    #[error("the parent's disk")]
    Disk(#[from] super::disk::AttachError),
}

impl RemoteStartError {
    fn code(&self) -> C {
        match self {
            RemoteStartError::NoCapacity { .. } => C::Unavailable,
            RemoteStartError::Memtap(_) | RemoteStartError::Disk(_) => C::Failed,
            _ => C::BadRequest,
        }
    }
}

/// On a clone host: starts clones `ids` of an encoded descriptor from
/// another host, their memory served on demand by memtap from the origin's
/// page server. Answers once every clone is ready or failed.
pub async fn start_remote(
    d: &Arc<Daemon>,
    encoded: &[u8],
    ids: &[u32],
    page_server: &str,
) -> AdminResponse {
    match try_start_remote(d, encoded, ids, page_server).await {
        Ok(results) => AdminResponse::ClonesStarted { results },
        Err(e) => AdminResponse::Error {
            code: e.code(),
            message: chain(&e),
        },
    }
}

async fn try_start_remote(
    d: &Arc<Daemon>,
    encoded: &[u8],
    ids: &[u32],
    page_server: &str,
) -> Result<Vec<CloneStart>, RemoteStartError> {
    let desc = Descriptor::decode(encoded).map_err(RemoteStartError::Descriptor)?;
    tracing::Span::current().record("ticket", desc.meta.ticket.as_str());
    let memtap = d.memtap.as_ref().ok_or(RemoteStartError::NoMemtap)?;
    let origin_addr: std::net::SocketAddr = page_server
        .parse()
        .map_err(|_| RemoteStartError::PageServer(page_server.to_string()))?;
    let slots: Vec<CloneSlot> = desc
        .meta
        .clones
        .iter()
        .filter(|s| ids.contains(&s.clone_id))
        .cloned()
        .collect();
    if slots.len() != ids.len() || ids.is_empty() {
        return Err(RemoteStartError::Ids);
    }
    let gen_name = generations::remote_name(&desc.meta.origin_host, &desc.meta.memory.source)?;
    let image = snowflock_image::Image::open(Path::new(&desc.meta.machine.image))
        .map_err(RemoteStartError::Image)?;
    let free = d.free_slots();
    if free < ids.len() as u32 {
        return Err(RemoteStartError::NoCapacity {
            host: d.cfg.host.clone(),
            free,
            asked: ids.len(),
        });
    }
    // Memory and disk layers alike: multicast copies from the origin, and
    // the whole clone point in the background if the ticket asked.
    let fetch = blkfront_ondemand::Fetch {
        mcast: joins_mcast(d, &desc),
        complete: desc.meta.complete,
    };
    let tl = Timeline::new();
    tl.mark("request_checked");
    // One memtap reference per clone VM; each is released when that VM
    // ends (or here, for a VM that never started).
    let release = |n: usize| (0..n).for_each(|_| memtap.release_generation(&gen_name));
    let mut ram = None;
    for added in 0..slots.len() {
        let spec = dom0_memtap::GenerationSpec {
            name: gen_name.clone(),
            size: desc.meta.memory.size,
            holes: desc.holes.clone(),
            origin: origin_addr,
            mcast: fetch.mcast,
            complete: fetch.complete,
        };
        match memtap.add_generation(spec) {
            Ok(p) => ram = Some(p),
            Err(e) => {
                release(added);
                return Err(RemoteStartError::Memtap(e));
            }
        }
    }
    let Some(ram) = ram else {
        return Err(RemoteStartError::Ids);
    };
    // The disk's layers: one memtap reference per layer per clone VM, like
    // the memory's.
    let mut disk = None;
    if let Some(layout) = &desc.meta.disk {
        for added in 0..slots.len() {
            match super::disk::attach(memtap, &desc.meta.origin_host, origin_addr, layout, fetch) {
                Ok(plan) => disk = Some(plan),
                Err(e) => {
                    release(slots.len());
                    if let Some(DiskPlan::Remote { memtap: names, .. }) = &disk {
                        for _ in 0..added {
                            names.iter().for_each(|n| memtap.release_generation(n));
                        }
                    }
                    return Err(e.into());
                }
            }
        }
    }
    let release_disk = |plan: &Option<DiskPlan>| {
        if let Some(DiskPlan::Remote { memtap: names, .. }) = plan {
            names.iter().for_each(|n| memtap.release_generation(n));
        }
    };
    let src = Source {
        image: &image,
        memory: MemSource::Remote {
            generation: gen_name.clone(),
            ram,
        },
        origin: Some(desc.meta.origin_host.clone()),
        disk: disk.clone(),
    };
    tl.mark("memory_attached");
    let spawned =
        futures::future::join_all(slots.iter().map(|slot| spawn_clone(d, &desc, &src, slot))).await;
    tl.mark("clone_vmms_started");
    let starts = spawned.into_iter().zip(&slots).map(|(vm, slot)| {
        let (desc, tl, disk) = (&desc, &tl, &disk);
        async move {
            match vm {
                Ok(vm) => resume_clone(d, None, vm, desc, slot, tl).await,
                Err(e) => {
                    // No VM holds these references.
                    release(1);
                    release_disk(disk);
                    Err(e)
                }
            }
        }
    });
    let res = futures::future::join_all(starts).await;
    tl.mark("clones_ready");
    tracing::info!(origin = %desc.meta.origin_host, ticket = %desc.meta.ticket, ?ids, timeline = ?tl.phases(), "clones from another host started");
    Ok(slots
        .iter()
        .zip(res)
        .map(|(s, r)| {
            if r.is_ok() {
                bump(&d.counters.remote_clones_started);
            }
            CloneStart {
                clone_id: s.clone_id,
                vm: s.vm.clone(),
                error: r.err().map(|e| chain(&e)),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_joins_the_origins_groups_only_on_the_same_port() {
        assert_eq!(mcast_join(Some(7404), Some(7404)), McastJoin::Join);
        assert_eq!(mcast_join(None, Some(7404)), McastJoin::Unicast);
        assert_eq!(mcast_join(Some(7404), None), McastJoin::Unicast);
        assert_eq!(mcast_join(None, None), McastJoin::Unicast);
        assert_eq!(
            mcast_join(Some(7404), Some(7500)),
            McastJoin::OtherPort {
                origin: 7404,
                mine: 7500
            }
        );
    }
}
