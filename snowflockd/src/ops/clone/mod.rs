//! The clone operation on the parent's host.
//!
//! ```text
//!  parent guest        snowflockd                                clone k
//!   sf_clone(T) ----->  check ticket T (owner, unused)
//!                       QMP stop                        -+
//!                       migrate (x-ignore-shared) -> state| parent pause
//!                       freeze RAM -> generation G        |
//!                       QMP cont                        -+
//!                       descriptor(state, G, holes, net, slots)
//!                       for each k, concurrently (here, or on host h):
//!                         tap + QEMU -incoming defer, RAM = G (private) --> starts paused
//!                         migrate-incoming state, cont                  --> resumes at the
//!                         BecomeClone{identity k}                           same instruction
//!                                                          <-- Ready{k}  (identity applied,
//!                                                                          sf_clone returned k)
//!   <---- 0  (after every child is Ready or recorded lost)
//! ```
//!
//! The parent is resumed in every path once it was stopped, including
//! failures; a failed child is recorded as lost and never blocks the parent.
//! [`freeze`] pauses and freezes, [`start`] starts one clone, [`remote`]
//! starts clones on other hosts.

pub mod channel;
pub mod disk;
pub mod freeze;
pub mod remote;
pub mod restart;
pub mod start;
pub mod written;

use crate::host::qmp::QmpError;
use crate::lifecycle::daemon::DaemonError;
use crate::lifecycle::generations;
use crate::lifecycle::Daemon;
use crate::state::metrics::bump;
use crate::state::placement::hosts_by_clone;
use crate::state::vm::{DiskLayers, DiskPlan, Format, MemSource, Vm};
use parking_lot::Mutex;
use snowflock_descriptor::{CloneSlot, Descriptor, FlockNet, MachineShape, MemoryLayout, Meta};
use snowflock_proto::admin::{CloneReport, VmState};
use snowflock_proto::api::{ApiErrorCode as E, ApiResponse, ChildState};
use snowflock_proto::error::chain;
use start::{resume_clone, spawn_clone, Source};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Why a clone (or one child of it) failed.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// A file or directory of the generation.
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        err: std::io::Error,
    },
    /// The parent's image cannot be opened.
    #[error("the parent's image")]
    Image(#[from] snowflock_image::ImageError),
    /// Freezing the parent's memory failed.
    #[error("freezing memory")]
    Memory(#[from] dom0_memtap::FreezeError),
    /// Reading what the parent wrote since its last generation failed.
    #[error("reading the parent's changed memory")]
    Written(#[source] dom0_memtap::WrittenError),
    /// The parent's new QEMU could not be started.
    #[error("starting the parent's new QEMU")]
    Successor(#[from] crate::host::vmm::VmmError),
    /// The VMM refused a control command.
    #[error("QEMU")]
    Vmm(#[from] QmpError),
    /// The parent's disk could not be frozen (the parent keeps writing to
    /// its old top layer).
    #[error("freezing the disk")]
    DiskFreeze(#[source] QmpError),
    /// The overlay for the parent's next writes could not be made.
    #[error("preparing the disk freeze")]
    DiskPrepare(#[source] DaemonError),
    /// A disk this snowflock cannot clone yet.
    #[error("{0}")]
    DiskUnsupported(&'static str),
    /// The frozen disk cannot be listed for other hosts.
    #[error("the frozen disk")]
    DiskLayout(#[from] blkfront_ondemand::DiskError),
    /// The parent could not be resumed (it stays paused: stop it).
    #[error("cannot resume the parent")]
    Resume(#[source] QmpError),
    /// Reading (on the parent) or feeding (to a clone) the device state failed.
    #[error("device state I/O")]
    DeviceState(#[source] std::io::Error),
    /// The device-state stream is far too large.
    #[error("device state exceeds {0} bytes")]
    DeviceStateTooLarge(usize),
    /// A background task of the clone failed.
    #[error("a clone task failed")]
    TaskFailed,
    /// The descriptor could not be encoded or decoded.
    #[error("descriptor")]
    Descriptor(#[from] snowflock_descriptor::DescriptorError),
    /// Clones were placed on other hosts, but this host has no page server.
    #[error("clones placed on other hosts, but this host has no page server")]
    NoPageServer,
    /// Publishing the generation on the page server failed.
    #[error("cannot publish the generation")]
    Publish(#[source] dom0_memtap::PublishError),
    /// Starting a clone's VM failed.
    #[error("cannot start the clone VM")]
    Start(#[from] DaemonError),
    /// The parent was stopped while it was cloned.
    #[error("the parent VM was stopped during the clone")]
    ParentStopped,
    /// The clone never said it was ready.
    #[error(transparent)]
    NotReady(#[from] crate::state::vm::NotReady),
    /// The clone's VM ended before it was ready.
    #[error("clone VM went away before it was ready")]
    WentAway,
    /// The clone did not report ready in time.
    #[error("clone did not report ready within {0} s")]
    ReadyTimeout(u64),
    /// Another host could not start the clone.
    #[error("on {host}: {why}")]
    Remote { host: String, why: String },
    /// No host started this clone.
    #[error("never started")]
    NeverStarted,
}

/// Timeline of one clone, in milliseconds since the request arrived.
#[derive(Clone)]
pub struct Timeline(Arc<Mutex<Vec<(String, f64)>>>, Instant);

impl CloneError {
    /// [`CloneError::Io`] for `what`, as a `map_err` argument.
    pub(crate) fn io(what: &str) -> impl Fn(std::io::Error) -> CloneError + '_ {
        move |err| CloneError::Io {
            what: what.to_string(),
            err,
        }
    }
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline(Arc::new(Mutex::new(Vec::new())), Instant::now())
    }

    pub fn mark(&self, what: impl Into<String>) -> f64 {
        let ms = self.1.elapsed().as_secs_f64() * 1e3;
        self.0.lock().push((what.into(), ms));
        ms
    }

    pub fn phases(&self) -> Vec<(String, f64)> {
        self.0.lock().clone()
    }
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::new()
    }
}

/// Runs `sf_clone(ticket)` for `parent`; returns the parent's answer.
pub async fn clone(
    d: Arc<Daemon>,
    parent: Arc<Vm>,
    request_id: u64,
    ticket: String,
) -> ApiResponse {
    let tl = Timeline::new();
    tl.mark("request_received");
    if parent.spec.is_clone() {
        return ApiResponse::error(
            E::WrongRole,
            "Nested cloning is not supported: only an original VM (clone ID 0) can clone",
        );
    }
    let _one_at_a_time = parent.clone_lock.lock().await;
    let begun = d.with(|r| {
        let t = r.owned_ticket(parent.name(), &ticket)?;
        t.begin_clone()?;
        Ok::<_, crate::state::ticket::TicketError>((
            t.clone_ids(),
            t.placement.clone(),
            t.independent,
        ))
    });
    let (ids, placement, independent) = match begun {
        Ok(b) => b,
        Err(e) => return ApiResponse::error(e.code(), e.to_string()),
    };
    bump(&d.counters.clone_ops);
    let generation = parent.generations.fetch_add(1, Ordering::SeqCst) + 1;
    let gen_name = generations::local_name(parent.name(), generation);
    let gen_dir = d.cfg.state_dir.join("gens").join(&gen_name);
    let job = Job {
        request_id,
        ticket: &ticket,
        granted: ids.clone().count() as u32,
        ids,
        placement: &placement,
        generation,
        gen_name: &gen_name,
        gen_dir: &gen_dir,
        independent,
    };
    let result = match std::fs::create_dir_all(&gen_dir) {
        Ok(()) => do_clone(&d, &parent, &job, &tl).await,
        Err(err) => Err(CloneError::Io {
            what: format!("create {}", gen_dir.display()),
            err,
        }),
    };
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&gen_dir);
    }
    match result {
        Ok(report) => {
            d.with(|r| {
                if let Some(t) = r.tickets.get_mut(&ticket) {
                    t.clone_done(gen_dir.clone());
                }
                r.record_report(report.clone());
            });
            d.bump_tickets();
            tracing::info!(
                pause_ms = report.parent_pause_ms,
                all_ready_ms = report.all_ready_ms,
                "clone done"
            );
            ApiResponse::Cloned {
                clone_id: 0,
                ticket,
            }
        }
        Err(e) => {
            bump(&d.counters.clone_failures);
            d.with(|r| {
                if let Some(t) = r.tickets.get_mut(&ticket) {
                    t.clone_failed();
                }
            });
            d.bump_tickets();
            let msg = chain(&e);
            tracing::warn!(error = %msg, "clone failed");
            ApiResponse::error(E::Failed, format!("Clone failed: {msg}"))
        }
    }
}

/// One `sf_clone` on the origin host.
struct Job<'a> {
    request_id: u64,
    ticket: &'a str,
    granted: u32,
    /// The clone IDs of the children, `granted` of them.
    ids: std::ops::RangeInclusive<u32>,
    /// (host, clones), this host first.
    placement: &'a [(String, u32)],
    generation: u64,
    gen_name: &'a str,
    gen_dir: &'a Path,
    /// The ticket asked for independence (background completion).
    independent: bool,
}

/// The descriptor of a frozen parent.
fn descriptor(
    d: &Daemon,
    parent: &Vm,
    job: &Job<'_>,
    slots: Vec<CloneSlot>,
    state: Vec<u8>,
    mem: &dom0_memtap::Frozen,
    disk: Option<snowflock_descriptor::DiskLayout>,
) -> Descriptor {
    let s = &parent.spec;
    Descriptor {
        meta: Meta {
            parent: s.name.clone(),
            origin_host: d.cfg.host.clone(),
            ticket: job.ticket.to_string(),
            request_id: job.request_id,
            memory: MemoryLayout {
                size: mem.size,
                generation: job.generation,
                source: format!("{}:{}", d.cfg.host, job.gen_name),
                data_bytes: mem.copied,
            },
            machine: MachineShape {
                vcpus: s.vcpus,
                mem_mib: s.mem_mib,
                accel: s.accel.clone(),
                image: s.image.display().to_string(),
                cmdline: s.cmdline.clone(),
            },
            net: FlockNet {
                flock: s.flock,
                subnet: crate::host::net::subnet(s.flock),
            },
            clones: slots,
            disk,
            // This host's page server multicasts what it serves (host.toml
            // `mcast`): clone hosts with the same port join the groups.
            mcast_port: d
                .cfg
                .cluster
                .as_ref()
                .and_then(|c| c.mcast)
                .filter(|_| d.pages.is_some())
                .map(|m| m.port),
            complete: job.independent,
        },
        device_state: state,
        holes: mem.holes.clone(),
    }
}

/// Checks that the parent's disk can be cloned here and prepares the
/// overlay its writes go to after the freeze (outside the pause).
async fn prepare_disk_freeze(
    d: &Arc<Daemon>,
    parent: &Arc<Vm>,
    job: &Job<'_>,
    any_remote: bool,
) -> Result<Option<freeze::DiskFreeze>, CloneError> {
    if parent.disk_layers.lock().is_none() {
        return Ok(None);
    }
    disk::merge_if_idle(d, parent).await;
    let Some(layers) = parent.disk_layers.lock().clone() else {
        return Ok(None);
    };
    if any_remote && layers.base.is_none() && layers.first_format != Format::Raw {
        return Err(CloneError::DiskUnsupported(
            "clones on other hosts need a raw disk, or an image's disk behind an overlay; this VM runs on a qcow2 disk of your own",
        ));
    }
    let (file, new_node) = layers.next(parent.name(), job.generation);
    let (f, top, top_format) = (file.clone(), layers.top.clone(), layers.top_format());
    crate::lifecycle::daemon::blocking(move || {
        Ok(crate::host::disk::create_overlay(
            &f, &top, top_format, None,
        )?)
    })
    .await
    .map_err(CloneError::DiskPrepare)?;
    Ok(Some(freeze::DiskFreeze {
        vm: parent.clone(),
        file,
        new_node,
    }))
}

async fn do_clone(
    d: &Arc<Daemon>,
    parent: &Arc<Vm>,
    job: &Job<'_>,
    tl: &Timeline,
) -> Result<CloneReport, CloneError> {
    let me = d.cfg.host.clone();
    let hosts = hosts_by_clone(job.placement, job.granted, &me);
    let image = snowflock_image::Image::open(&parent.spec.image)?;
    let flock = parent.spec.flock;
    let slots: Vec<CloneSlot> = job
        .ids
        .clone()
        .map(|k| CloneSlot {
            clone_id: k,
            vm: format!("{}c{k}", job.gen_name),
            mac: crate::host::net::mac(flock, k),
            ip_cidr: crate::host::net::ip_cidr(flock, k),
        })
        .collect();
    let any_remote = job.placement.iter().skip(1).any(|(_, n)| *n > 0);
    // The parent is handed to a new QEMU on its frozen RAM: nothing is
    // copied (see restart.rs); its disk gets a new top layer there. That
    // needs a file no clone maps: the file the parent runs on, on its first
    // freeze, or once no clone of an earlier point runs. Otherwise what it
    // wrote since becomes a layer over that file, and it stays in its QEMU.
    let handover = d.vmms.spec(parent.name()).filter(|_| d.vmm.hands_over());
    let in_place = !d.with(|r| r.generations_in_use(parent.name(), job.ticket));
    let (handover, layer) = match handover {
        Some(s) if s.share || in_place => (Some(s), None),
        Some(s) => (None, parent.pid.lock().map(|pid| (s, pid))),
        None => (None, None),
    };
    if let Some(current) = handover {
        let disk = prepare_disk_freeze(d, parent, job, any_remote).await?;
        let new_layers = disk.as_ref().and_then(|f| {
            let mut l = parent.disk_layers.lock().clone()?;
            l.frozen_into(f.file.clone(), f.new_node.clone());
            Some(l)
        });
        let chain = new_layers.as_ref().map(|l| l.blockdev());
        set_children(d, job, &slots, &hosts);
        parent.set_state(VmState::Cloning);
        let (vmm, g, tl2, old_pid, p2) = (
            d.vmm.clone(),
            job.gen_dir.to_path_buf(),
            tl.clone(),
            *parent.pid.lock(),
            parent.clone(),
        );
        let done = tokio::task::spawn_blocking(move || {
            restart::freeze_by_restart(&vmm, &p2, &current, old_pid, chain, &g, &tl2)
        })
        .await
        .map_err(|_| CloneError::TaskFailed);
        parent.set_state(VmState::Running);
        let h = match done.and_then(|r| r) {
            Ok(h) => h,
            Err(e) => {
                // The old QEMU kept the VM and its disk: the overlay is unused.
                if let Some(f) = &disk {
                    let _ = std::fs::remove_file(&f.file);
                }
                return Err(e);
            }
        };
        if let Some(l) = new_layers {
            // The new QEMU writes to the overlay; the old top is frozen.
            *parent.disk_layers.lock() = Some(l);
        }
        // The exit monitor follows the new process once the old one ends.
        *parent.pid.lock() = h.process.pid;
        d.vmms.hand_over(parent.name(), h.spec, h.process.exit);
        if let Some(pid) = old_pid {
            d.vmm.kill(pid);
        }
        tracing::info!(pid = ?*parent.pid.lock(), "parent continues in a new QEMU on a private mapping of its frozen RAM");
        let layers = parent.disk_layers.lock().clone();
        return start_clones(d, parent, job, tl, &image, &hosts, slots, h.frozen?, layers).await;
    }
    let disk = prepare_disk_freeze(d, parent, job, any_remote).await?;
    let prepared = disk.as_ref().map(|f| f.file.clone());
    let mem = match layer {
        Some((spec, pid)) => freeze::MemFreeze::Layer {
            spec: Box::new(spec),
            pid,
        },
        None => {
            let (src, dst) = (parent.placed.ram_path.clone(), job.gen_dir.join("ram"));
            let p = tokio::task::spawn_blocking(move || dom0_memtap::Precopy::create(&src, &dst))
                .await
                .map_err(|_| CloneError::TaskFailed)??;
            freeze::MemFreeze::Precopy(p)
        }
    };
    set_children(d, job, &slots, &hosts);
    parent.set_state(VmState::Cloning);
    let frozen = {
        let (vmm, dir, g, tl2, p2) = (
            d.vmm.clone(),
            parent.placed.dir.clone(),
            job.gen_dir.to_path_buf(),
            tl.clone(),
            parent.clone(),
        );
        tokio::task::spawn_blocking(move || {
            channel::hold(&p2, None);
            let frozen = freeze::freeze(&vmm, &dir, mem, disk, &g, &tl2);
            channel::release(&p2);
            frozen
        })
        .await
        .map_err(|_| CloneError::TaskFailed)
    };
    parent.set_state(VmState::Running);
    let layers = parent.disk_layers.lock().clone();
    if let Some(p) = prepared {
        // Not switched to (the freeze failed before): nobody uses it.
        if layers.as_ref().is_some_and(|l| l.top != p) {
            let _ = std::fs::remove_file(&p);
        }
    }
    start_clones(d, parent, job, tl, &image, &hosts, slots, frozen??, layers).await
}

/// Children exist from the freeze on, so a clone that exits at once is
/// recorded as exited, not overwritten later.
fn set_children(d: &Daemon, job: &Job<'_>, slots: &[CloneSlot], hosts: &[String]) {
    d.with(|r| {
        if let Some(t) = r.tickets.get_mut(job.ticket) {
            t.set_children(slots.iter().zip(hosts).map(|(s, h)| {
                let child = crate::state::ticket::Child {
                    vm: s.vm.clone(),
                    host: h.clone(),
                    ip: s.ip_cidr.split('/').next().unwrap_or_default().to_string(),
                    state: ChildState::Running,
                };
                (s.clone_id, child)
            }));
        }
    });
}

/// Everything after the freeze: the descriptor, then the clones, here and
/// on other hosts, concurrently.
#[allow(clippy::too_many_arguments)]
async fn start_clones(
    d: &Arc<Daemon>,
    parent: &Arc<Vm>,
    job: &Job<'_>,
    tl: &Timeline,
    image: &snowflock_image::Image,
    hosts: &[String],
    slots: Vec<CloneSlot>,
    frozen: freeze::Frozen,
    layers: Option<DiskLayers>,
) -> Result<CloneReport, CloneError> {
    let me = d.cfg.host.clone();
    let any_remote = job.placement.iter().skip(1).any(|(_, n)| *n > 0);
    let gen_ram = job.gen_dir.join("ram");
    let freeze::Frozen {
        pause_ms,
        state,
        mem,
    } = frozen;

    // Clones on other hosts read the frozen disk's layers through the page
    // server: list them (with their data extents) and publish them.
    let disk_layout = match (&layers, any_remote) {
        (Some(l), true) => {
            let (l, parent_name, me2) = (l.clone(), parent.name().to_string(), me.clone());
            let (layout, files) =
                tokio::task::spawn_blocking(move || disk::layout(&parent_name, &me2, &l))
                    .await
                    .map_err(|_| CloneError::TaskFailed)??;
            let pages = d.pages.as_ref().ok_or(CloneError::NoPageServer)?;
            for (name, path) in files {
                pages
                    .publish(&generations::shared_name(&me, &name), &path)
                    .map_err(CloneError::Publish)?;
            }
            tl.mark("disk_published");
            Some(layout)
        }
        _ => None,
    };
    let encoded = descriptor(d, parent, job, slots, state, &mem, disk_layout).encode()?;
    std::fs::write(job.gen_dir.join("descriptor"), &encoded)
        .map_err(CloneError::io("write the descriptor"))?;
    tl.mark("descriptor_built");

    // Clones start from the descriptor alone (plus the generation's memory).
    let desc = Descriptor::decode(&encoded)?;
    let state_file = job.gen_dir.join("state");
    let remote_hosts: Vec<String> = job
        .placement
        .iter()
        .skip(1)
        .filter(|(_, n)| *n > 0)
        .map(|(h, _)| h.clone())
        .collect();
    if !remote_hosts.is_empty() {
        let pages = d.pages.as_ref().ok_or(CloneError::NoPageServer)?;
        // Published as other hosts' memtap names it.
        let name = generations::shared_name(&me, job.gen_name);
        let pages_n = (mem.size / dom0_memtap::PAGE_SIZE) as usize;
        let layer = dom0_memtap::Layer::open(job.gen_dir, pages_n)
            .map_err(CloneError::io("open the generation's layer"))?;
        pages
            .publish_layered(&name, &gen_ram, layer)
            .map_err(CloneError::Publish)?;
        d.with(|r| {
            if let Some(t) = r.tickets.get_mut(job.ticket) {
                t.published = Some(name);
            }
        });
    }
    let local: Vec<&CloneSlot> = desc
        .meta
        .clones
        .iter()
        .zip(hosts)
        .filter(|(_, h)| **h == me)
        .map(|(s, _)| s)
        .collect();
    // Clone QEMUs start only now, once nothing can fail before they are
    // resumed or stopped. Starting them during the precopy (they could map
    // the generation early) was measured slower on a 2-core host: QEMU
    // start-up and the precopy compete for the same CPUs.
    let src = Source {
        image,
        memory: MemSource::Local {
            ram: gen_ram.clone(),
        },
        origin: None,
        disk: layers.as_ref().and_then(|l| {
            let i = l.frozen.len().checked_sub(1)?;
            Some(DiskPlan::Overlay {
                base: l.frozen[i].clone(),
                format: l.frozen_format(i),
            })
        }),
    };
    let local_run = async {
        let spawned =
            futures::future::join_all(local.iter().map(|slot| spawn_clone(d, &desc, &src, slot)))
                .await;
        tl.mark("clone_vmms_started");
        let starts = spawned.into_iter().zip(&local).map(|(vm, slot)| {
            let desc = &desc;
            async move {
                match vm {
                    Ok(vm) => resume_clone(d, Some(parent), vm, desc, slot, tl).await,
                    Err(e) => Err(e),
                }
            }
        });
        let res = futures::future::join_all(starts).await;
        local
            .iter()
            .map(|s| s.clone_id)
            .zip(res)
            .collect::<Vec<_>>()
    };
    let remote_run = futures::future::join_all(remote_hosts.iter().map(|h| {
        let ids: Vec<u32> = desc
            .meta
            .clones
            .iter()
            .zip(hosts)
            .filter(|(_, x)| *x == h)
            .map(|(s, _)| s.clone_id)
            .collect();
        remote::start_on_host(d, h, &encoded, ids, tl)
    }));
    let (local_out, remote_out) = futures::join!(local_run, remote_run);
    let mut by_id: BTreeMap<u32, Result<(), CloneError>> = local_out.into_iter().collect();
    for r in remote_out {
        by_id.extend(r);
    }
    tl.mark("clones_ready");

    // Every local clone QEMU has loaded the state (or failed): it can go.
    // The generation's file stays while a clone of it runs (so `stats`
    // can count it; see `Daemon::unlink_idle_generation`), and while
    // other hosts may fetch from it, until the ticket ends.
    let _ = std::fs::remove_file(&state_file);
    d.with(|r| {
        for slot in &desc.meta.clones {
            let outcome = by_id
                .remove(&slot.clone_id)
                .unwrap_or(Err(CloneError::NeverStarted));
            if let Err(e) = outcome {
                let reason = chain(&e);
                tracing::warn!(clone = %slot.vm, %reason, "clone lost while starting");
                r.child_ended(job.ticket, slot.clone_id, ChildState::Lost { reason });
            }
        }
    });
    let running = d.with(|r| r.tickets.get(job.ticket).is_some_and(|t| !t.all_done()));
    if !running && remote_hosts.is_empty() {
        generations::unlink_memory(job.gen_dir);
    }
    let all_ready_ms = tl.mark("parent_answered");
    Ok(CloneReport {
        parent: parent.name().to_string(),
        ticket: job.ticket.to_string(),
        clones: job.granted,
        parent_pause_ms: pause_ms,
        descriptor_bytes: encoded.len() as u64,
        device_state_bytes: desc.device_state.len() as u64,
        frozen_bytes: mem.copied,
        paused_copy_bytes: mem.fixed,
        guest_ram_bytes: mem.size,
        all_ready_ms,
        timeline: tl.phases(),
    })
}
