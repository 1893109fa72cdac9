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
//!                       for each k, concurrently:
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

use crate::admin::chain;
use crate::api::check_ticket;
use crate::daemon::{api_error, random_hex, Child, Daemon, MemSource, NewVm, TicketState, Vm};
use crate::net;
use crate::qmp::Qmp;
use snowflock_descriptor::{CloneSlot, Descriptor, FlockNet, MachineShape, MemoryLayout, Meta};
use snowflock_proto::admin::{AdminRequest, AdminResponse, CloneReport, CloneStart, VmState};
use snowflock_proto::api::{ApiErrorCode as E, ApiResponse, ChildState};
use snowflock_proto::channel::{CloneIdentity, HostMsg};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Timeline of one clone, in milliseconds since the request arrived.
#[derive(Clone)]
struct Timeline(Arc<Mutex<Vec<(String, f64)>>>, Instant);

impl Timeline {
    fn mark(&self, what: impl Into<String>) -> f64 {
        let ms = self.1.elapsed().as_secs_f64() * 1e3;
        self.0.lock().unwrap().push((what.into(), ms));
        ms
    }
}

struct Frozen {
    pause_ms: f64,
    state: Vec<u8>,
    mem: dom0_memtap::Frozen,
}

/// Connects to the device-state socket on drop, releasing a reader still
/// waiting in `accept`.
struct Unblock(PathBuf);

impl Drop for Unblock {
    fn drop(&mut self) {
        let _ = std::os::unix::net::UnixStream::connect(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Upper bound on a device-state stream.
const MAX_DEVICE_STATE: usize = 16 << 20;

/// Pauses the parent, saves its device state and freezes its memory, and
/// resumes it whatever happens.
fn freeze(
    qmp_path: &Path,
    mut precopy: dom0_memtap::Precopy,
    gen_dir: &Path,
    tl: &Timeline,
) -> Result<Frozen, String> {
    let mut q = Qmp::connect(qmp_path, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    q.ignore_shared_ram().map_err(|e| e.to_string())?;
    let state_path = gen_dir.join("state");
    // QEMU streams the device state to a socket we read into memory: no
    // helper process to spawn while the parent is paused (exec:cat costs
    // ~10 ms here).
    let sock_path = gen_dir.join("mig.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock_path)
        .map_err(|e| format!("cannot listen for device state: {e}"))?;
    let reader = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        use std::io::Read;
        let (s, _) = listener.accept().map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        // Device state is ~100 KB; far more means RAM leaked into the stream.
        s.take(MAX_DEVICE_STATE as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| e.to_string())?;
        if buf.len() > MAX_DEVICE_STATE {
            return Err(format!(
                "device state exceeds {MAX_DEVICE_STATE} bytes: is guest RAM shared?"
            ));
        }
        Ok(buf)
    });
    let sock_for_unblock = sock_path.clone();
    // Whatever path this function leaves by, the reader must not wait for a
    // QEMU that never connects.
    let _unblock = Unblock(sock_path.clone());
    // Copy the RAM while the parent still runs; only changes are copied
    // while it is paused.
    precopy.copy().map_err(|e| chain(&e))?;
    tl.mark("memory_precopied");
    let t0 = Instant::now();
    q.stop().map_err(|e| e.to_string())?;
    tl.mark("parent_paused");
    let work = (|| -> Result<dom0_memtap::Frozen, String> {
        q.migrate(&format!("unix:{}", sock_path.display()))
            .map_err(|e| e.to_string())?;
        q.wait_migration(Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        tl.mark("device_state_saved");
        let mem = precopy.finish().map_err(|e| chain(&e))?;
        tl.mark("memory_frozen");
        Ok(mem)
    })();
    // Always resume the parent; retry on a fresh connection if needed.
    let mut resumed = q.cont();
    for _ in 0..3 {
        if resumed.is_ok() {
            break;
        }
        tracing::warn!(error = ?resumed, "resuming the parent failed; retrying");
        resumed = Qmp::connect(qmp_path, Duration::from_secs(2)).and_then(|mut q| q.cont());
    }
    let pause_ms = t0.elapsed().as_secs_f64() * 1e3;
    tl.mark("parent_resumed");
    // Unmapping takes tens of milliseconds; nobody needs to wait for it.
    std::thread::spawn(move || drop(precopy));
    if let Err(e) = resumed {
        return Err(format!("cannot resume the parent: {e}"));
    }
    if work.is_err() {
        // Unblock the reader if QEMU never connected.
        let _ = std::os::unix::net::UnixStream::connect(&sock_for_unblock);
    }
    let state = reader
        .join()
        .map_err(|_| "device state reader panicked".to_string())?;
    let _ = std::fs::remove_file(&sock_for_unblock);
    let mem = work?;
    let state = state?;
    std::fs::write(&state_path, &state).map_err(|e| format!("cannot write device state: {e}"))?;
    Ok(Frozen {
        pause_ms,
        state,
        mem,
    })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs `sf_clone(ticket)` for `parent`; returns the parent's answer.
pub async fn clone(
    d: Arc<Daemon>,
    parent: Arc<Vm>,
    request_id: u64,
    ticket: String,
) -> ApiResponse {
    let tl = Timeline(Arc::new(Mutex::new(Vec::new())), Instant::now());
    tl.mark("request_received");
    if parent.clone_id != 0 {
        return api_error(
            E::WrongRole,
            "Nested cloning is not supported: only an original VM (clone ID 0) can clone",
        );
    }
    let _one_at_a_time = parent.clone_lock.lock().await;
    let (granted, placement) = {
        let mut st = d.state.lock().unwrap();
        let t = match check_ticket(&mut st, &parent, &ticket) {
            Ok(t) => t,
            Err(e) => return e,
        };
        if t.state != TicketState::Granted {
            return api_error(
                E::TicketUsed,
                format!("Ticket {ticket} was already used by sf_clone"),
            );
        }
        t.state = TicketState::Cloning;
        (t.granted, t.placement.clone())
    };
    d.counters.clone_ops.fetch_add(1, Ordering::Relaxed);
    let generation = parent.generations.fetch_add(1, Ordering::SeqCst) + 1;
    let gen_name = format!("{}-g{generation}", parent.name);
    let gen_dir = d.cfg.state_dir.join("gens").join(&gen_name);
    let result = match std::fs::create_dir_all(&gen_dir) {
        Ok(()) => {
            let job = Job {
                request_id,
                ticket: &ticket,
                granted,
                placement: &placement,
                generation,
                gen_name: &gen_name,
                gen_dir: &gen_dir,
            };
            do_clone(&d, &parent, &job, &tl).await
        }
        Err(e) => Err(format!("cannot create {}: {e}", gen_dir.display())),
    };
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&gen_dir);
    }
    let mut st = d.state.lock().unwrap();
    let t = st.tickets.get_mut(&ticket);
    match result {
        Ok((gen_dir, report)) => {
            if let Some(t) = t {
                t.generation = Some(gen_dir);
                if t.state == TicketState::Cloning {
                    t.state = TicketState::Active;
                }
            }
            drop(st);
            d.bump_tickets();
            tracing::info!(vm = %parent.name, %ticket, pause_ms = report.parent_pause_ms, all_ready_ms = report.all_ready_ms, "clone done");
            d.record_report(report);
            ApiResponse::Cloned {
                clone_id: 0,
                ticket,
            }
        }
        Err(msg) => {
            d.counters.clone_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = t {
                t.state = TicketState::Discarded("the clone failed");
            }
            drop(st);
            d.bump_tickets();
            tracing::warn!(vm = %parent.name, %ticket, error = %msg, "clone failed");
            api_error(E::Failed, format!("Clone failed: {msg}"))
        }
    }
}

type CloneOutcome = (PathBuf, CloneReport);

/// One `sf_clone` on the origin host.
struct Job<'a> {
    request_id: u64,
    ticket: &'a str,
    granted: u32,
    /// (host, clones), this host first.
    placement: &'a [(String, u32)],
    generation: u64,
    gen_name: &'a str,
    gen_dir: &'a Path,
}

impl Job<'_> {
    /// Host of each clone ID, in order.
    fn hosts(&self, me: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .placement
            .iter()
            .flat_map(|(h, n)| std::iter::repeat_n(h.clone(), *n as usize))
            .collect();
        v.resize(self.granted as usize, me.to_string());
        v
    }
}

async fn do_clone(
    d: &Arc<Daemon>,
    parent: &Arc<Vm>,
    job: &Job<'_>,
    tl: &Timeline,
) -> Result<CloneOutcome, String> {
    let Job {
        request_id,
        ticket,
        granted,
        generation,
        gen_name,
        gen_dir,
        ..
    } = *job;
    let hosts = job.hosts(&d.cfg.host);
    let image = snowflock_image::Image::open(&parent.image).map_err(|e| chain(&e))?;
    let slots: Vec<CloneSlot> = (1..=granted)
        .map(|k| CloneSlot {
            clone_id: k,
            vm: format!("{}-g{generation}c{k}", parent.name),
            mac: net::mac(parent.flock, k),
            ip_cidr: net::ip_cidr(parent.flock, k),
        })
        .collect();
    let gen_ram = gen_dir.join("ram");
    let precopy =
        dom0_memtap::Precopy::create(&parent.ram_path, &gen_ram).map_err(|e| chain(&e))?;
    {
        // Children exist from now on, so a clone that exits at once is
        // recorded as exited, not overwritten later.
        let mut st = d.state.lock().unwrap();
        if let Some(t) = st.tickets.get_mut(ticket) {
            t.children = slots
                .iter()
                .zip(&hosts)
                .map(|(s, h)| {
                    (
                        s.clone_id,
                        Child {
                            vm: s.vm.clone(),
                            host: h.clone(),
                            state: ChildState::Running,
                        },
                    )
                })
                .collect();
        }
    }
    parent.set_state(VmState::Cloning);
    let frozen = {
        let (q, g, tl2) = (parent.qmp_path(), gen_dir.to_path_buf(), tl.clone());
        tokio::task::spawn_blocking(move || freeze(&q, precopy, &g, &tl2))
            .await
            .map_err(|e| e.to_string())
    };
    parent.set_state(VmState::Running);
    let frozen = frozen.and_then(|f| f)?;

    let desc = Descriptor {
        meta: Meta {
            parent: parent.name.clone(),
            origin_host: d.cfg.host.clone(),
            ticket: ticket.to_string(),
            request_id,
            memory: MemoryLayout {
                size: frozen.mem.size,
                generation,
                source: format!("{}:{gen_name}", d.cfg.host),
                data_bytes: frozen.mem.copied,
            },
            machine: MachineShape {
                vcpus: parent.vcpus,
                mem_mib: parent.mem_mib,
                accel: parent.accel.clone(),
                image: parent.image.display().to_string(),
                cmdline: parent.cmdline.clone(),
            },
            net: FlockNet {
                flock: parent.flock,
                subnet: net::subnet(parent.flock),
            },
            clones: slots.clone(),
        },
        device_state: frozen.state,
        holes: frozen.mem.holes.clone(),
    };
    let encoded = desc.encode().map_err(|e| chain(&e))?;
    std::fs::write(gen_dir.join("descriptor"), &encoded)
        .map_err(|e| format!("cannot write descriptor: {e}"))?;
    tl.mark("descriptor_built");

    // Clones start from the descriptor alone (plus the generation's memory).
    let desc = Descriptor::decode(&encoded).map_err(|e| chain(&e))?;
    let state_file = gen_dir.join("state");
    let remote_hosts: Vec<String> = job
        .placement
        .iter()
        .skip(1)
        .filter(|(_, n)| *n > 0)
        .map(|(h, _)| h.clone())
        .collect();
    if !remote_hosts.is_empty() {
        let pages = d
            .pages
            .as_ref()
            .ok_or("clones placed on other hosts, but this host has no page server")?;
        // Published as other hosts' memtap names it: `<origin>.<generation>`.
        let name = shared_generation_name(&d.cfg.host, gen_name);
        pages
            .publish(&name, &gen_ram)
            .map_err(|e| format!("cannot publish the generation: {e}"))?;
        if let Some(t) = d.state.lock().unwrap().tickets.get_mut(ticket) {
            t.published = Some(name);
        }
    }
    let local: Vec<&CloneSlot> = desc
        .meta
        .clones
        .iter()
        .zip(&hosts)
        .filter(|(_, h)| **h == d.cfg.host)
        .map(|(s, _)| s)
        .collect();
    // Clone QEMUs start only now, once nothing can fail before they are
    // resumed or stopped. Starting them during the precopy (they could map
    // the generation early) was measured slower on a 2-core host: QEMU
    // start-up and the precopy compete for the same CPUs.
    let src = Source {
        image: &image,
        ram: &gen_ram,
        memory: MemSource::Local,
        origin: None,
    };
    let local_run = async {
        let spawned =
            futures::future::join_all(local.iter().map(|slot| spawn_clone(d, &desc, &src, slot)))
                .await;
        tl.mark("clone_vmms_started");
        let starts = spawned.into_iter().zip(&local).map(|(vm, slot)| {
            let (state_file, desc) = (&state_file, &desc);
            async move {
                match vm {
                    Ok(vm) => resume_clone(d, Some(parent), vm, desc, slot, state_file, tl).await,
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
            .zip(&hosts)
            .filter(|(_, x)| *x == h)
            .map(|(s, _)| s.clone_id)
            .collect();
        start_on_host(d, h, &encoded, ids, tl)
    }));
    let (local_out, remote_out) = futures::join!(local_run, remote_run);
    let mut by_id: std::collections::BTreeMap<u32, Result<(), String>> =
        local_out.into_iter().collect();
    for r in remote_out {
        by_id.extend(r);
    }
    let outcomes: Vec<Result<(), String>> = desc
        .meta
        .clones
        .iter()
        .map(|s| {
            by_id
                .remove(&s.clone_id)
                .unwrap_or(Err("never started".into()))
        })
        .collect();
    tl.mark("clones_ready");

    // Every local clone QEMU has mapped the generation and loaded the state
    // (or failed): the files can go; the generation's pages live as long as
    // a clone maps them. Other hosts fetch pages from the file until the
    // ticket ends. The descriptor stays until the ticket is discarded.
    if remote_hosts.is_empty() {
        let _ = std::fs::remove_file(gen_dir.join("ram"));
    }
    let _ = std::fs::remove_file(gen_dir.join("state"));

    {
        let mut st = d.state.lock().unwrap();
        for (slot, outcome) in desc.meta.clones.iter().zip(outcomes) {
            if let Err(reason) = outcome {
                tracing::warn!(clone = %slot.vm, %reason, "clone lost while starting");
                let c = st
                    .tickets
                    .get_mut(ticket)
                    .and_then(|t| t.children.get_mut(&slot.clone_id));
                if let Some(c) = c {
                    c.state = ChildState::Lost { reason };
                }
            }
        }
    }
    let all_ready_ms = tl.mark("parent_answered");
    let report = CloneReport {
        parent: parent.name.clone(),
        ticket: ticket.to_string(),
        clones: granted,
        parent_pause_ms: frozen.pause_ms,
        descriptor_bytes: encoded.len() as u64,
        device_state_bytes: desc.device_state.len() as u64,
        frozen_bytes: frozen.mem.copied,
        paused_copy_bytes: frozen.mem.fixed,
        guest_ram_bytes: frozen.mem.size,
        all_ready_ms,
        timeline: tl.0.lock().unwrap().clone(),
    };
    Ok((gen_dir.to_path_buf(), report))
}

/// Asks `host` to start clones `ids` of the descriptor; one outcome per ID.
async fn start_on_host(
    d: &Arc<Daemon>,
    host: &str,
    encoded: &[u8],
    ids: Vec<u32>,
    tl: &Timeline,
) -> Vec<(u32, Result<(), String>)> {
    let page_server = d
        .cfg
        .cluster
        .as_ref()
        .map(|c| c.page_server.to_string())
        .unwrap_or_default();
    let req = AdminRequest::PeerStartClones {
        descriptor: encoded.to_vec(),
        clone_ids: ids.clone(),
        page_server,
    };
    let timeout = Duration::from_secs(d.cfg.clone_timeout_s + 60);
    let res = crate::peer::call(d, host, &req, timeout).await;
    tl.mark(format!("{host}_answered"));
    match res {
        Ok(AdminResponse::ClonesStarted { results }) => ids
            .iter()
            .map(|id| {
                let r = results.iter().find(|r| r.clone_id == *id);
                let out = match r {
                    Some(CloneStart { error: None, .. }) => Ok(()),
                    Some(CloneStart { error: Some(e), .. }) => Err(format!("on {host}: {e}")),
                    None => Err(format!("{host} did not report on this clone")),
                };
                (*id, out)
            })
            .collect(),
        Ok(AdminResponse::Error { message, .. }) => ids
            .iter()
            .map(|id| (*id, Err(format!("{host} refused: {message}"))))
            .collect(),
        Ok(other) => ids
            .iter()
            .map(|id| (*id, Err(format!("{host} answered {other:?}"))))
            .collect(),
        Err(e) => {
            let msg = chain(&e);
            ids.iter().map(|id| (*id, Err(msg.clone()))).collect()
        }
    }
}

/// Where a clone's VMM gets its memory from.
struct Source<'a> {
    image: &'a snowflock_image::Image,
    ram: &'a Path,
    memory: MemSource,
    origin: Option<String>,
}

/// Starts a clone's QEMU, paused and waiting for its device state.
async fn spawn_clone(
    d: &Arc<Daemon>,
    desc: &Descriptor,
    src: &Source<'_>,
    slot: &CloneSlot,
) -> Result<Arc<Vm>, String> {
    let m = &desc.meta;
    d.create_vm(NewVm {
        name: slot.vm.clone(),
        flock: m.net.flock,
        clone_id: slot.clone_id,
        ticket: Some(m.ticket.clone()),
        parent: m.parent.clone(),
        mem_mib: m.machine.mem_mib,
        vcpus: m.machine.vcpus,
        accel: m.machine.accel.clone(),
        image: PathBuf::from(&m.machine.image),
        kernel: src.image.vmlinux.clone(),
        initrd: src.image.initramfs.clone(),
        cmdline: m.machine.cmdline.clone(),
        generation_ram: Some(src.ram.to_path_buf()),
        origin: src.origin.clone(),
        memory: src.memory.clone(),
    })
    .await
    .map_err(|e| chain(&e))
}

/// Memtap name of a generation from another host: `<origin>.<generation>`.
fn remote_generation_name(meta: &Meta) -> Result<String, String> {
    let gen = meta
        .memory
        .source
        .split_once(':')
        .map(|(_, g)| g)
        .ok_or_else(|| format!("malformed memory source {:?}", meta.memory.source))?;
    let ok = |s: &str| {
        !s.is_empty() && s.len() <= 60 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !ok(&meta.origin_host) || !ok(gen) {
        return Err(format!("malformed memory source {:?}", meta.memory.source));
    }
    Ok(shared_generation_name(&meta.origin_host, gen))
}

/// Name of a generation on the page server and in memtap on other hosts:
/// `<origin host>.<generation>`, unique across the cluster.
pub fn shared_generation_name(origin: &str, generation: &str) -> String {
    format!("{origin}.{generation}")
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
    let refuse = |m: String| AdminResponse::Error {
        code: snowflock_proto::admin::AdminErrorCode::BadRequest,
        message: m,
    };
    let desc = match Descriptor::decode(encoded) {
        Ok(d) => d,
        Err(e) => return refuse(format!("bad descriptor: {}", chain(&e))),
    };
    let Some(memtap) = d.memtap.as_ref() else {
        return refuse("this host has no memtap (not in a cluster)".into());
    };
    let origin_addr: std::net::SocketAddr = match page_server.parse() {
        Ok(a) => a,
        Err(_) => return refuse(format!("bad page server address {page_server:?}")),
    };
    let slots: Vec<CloneSlot> = desc
        .meta
        .clones
        .iter()
        .filter(|s| ids.contains(&s.clone_id))
        .cloned()
        .collect();
    if slots.len() != ids.len() || ids.is_empty() {
        return refuse("clone IDs do not match the descriptor".into());
    }
    let gen_name = match remote_generation_name(&desc.meta) {
        Ok(n) => n,
        Err(e) => return refuse(e),
    };
    let image = match snowflock_image::Image::open(Path::new(&desc.meta.machine.image)) {
        Ok(i) => i,
        Err(e) => {
            return refuse(format!(
                "the parent's image is not usable on this host: {}",
                chain(&e)
            ))
        }
    };
    {
        let mut st = d.state.lock().unwrap();
        crate::api::purge(&mut st);
        let free = Daemon::free_slots(&st, d.cfg.max_vms);
        if free < ids.len() as u32 {
            return AdminResponse::Error {
                code: snowflock_proto::admin::AdminErrorCode::Unavailable,
                message: format!(
                    "{} has {free} free VM slots, {} asked",
                    d.cfg.host,
                    ids.len()
                ),
            };
        }
    }
    let tl = Timeline(Arc::new(Mutex::new(Vec::new())), Instant::now());
    // One reference per clone VM; each is released when that VM ends.
    let mut ram = None;
    let mut added = 0;
    for _ in &slots {
        let spec = dom0_memtap::GenerationSpec {
            name: gen_name.clone(),
            size: desc.meta.memory.size,
            holes: desc.holes.clone(),
            origin: origin_addr,
        };
        match memtap.add_generation(spec) {
            Ok(p) => {
                ram = Some(p);
                added += 1;
            }
            Err(e) => {
                for _ in 0..added {
                    memtap.release_generation(&gen_name);
                }
                return AdminResponse::Error {
                    code: snowflock_proto::admin::AdminErrorCode::Failed,
                    message: format!("memtap: {}", chain(&e)),
                };
            }
        }
    }
    let ram = ram.expect("at least one slot");
    let dir = d
        .cfg
        .state_dir
        .join("gens")
        .join(format!("{gen_name}-{}", random_hex(4)));
    let state_file = dir.join("state");
    if let Err(e) =
        std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&state_file, &desc.device_state))
    {
        for _ in &slots {
            memtap.release_generation(&gen_name);
        }
        let _ = std::fs::remove_dir_all(&dir);
        return AdminResponse::Error {
            code: snowflock_proto::admin::AdminErrorCode::Failed,
            message: format!("cannot write device state: {e}"),
        };
    }
    let src = Source {
        image: &image,
        ram: &ram,
        memory: MemSource::Remote {
            generation: gen_name.clone(),
        },
        origin: Some(desc.meta.origin_host.clone()),
    };
    let spawned =
        futures::future::join_all(slots.iter().map(|slot| spawn_clone(d, &desc, &src, slot))).await;
    let starts = spawned.into_iter().zip(&slots).map(|(vm, slot)| {
        let (state_file, desc, tl, gen_name) = (&state_file, &desc, &tl, &gen_name);
        async move {
            match vm {
                Ok(vm) => resume_clone(d, None, vm, desc, slot, state_file, tl).await,
                Err(e) => {
                    // No VM holds this reference.
                    memtap.release_generation(gen_name);
                    Err(e)
                }
            }
        }
    });
    let res = futures::future::join_all(starts).await;
    let _ = std::fs::remove_dir_all(&dir);
    let results = slots
        .iter()
        .zip(res)
        .map(|(s, r)| {
            if r.is_ok() {
                d.counters
                    .remote_clones_started
                    .fetch_add(1, Ordering::Relaxed);
            }
            CloneStart {
                clone_id: s.clone_id,
                vm: s.vm.clone(),
                error: r.err(),
            }
        })
        .collect();
    tracing::info!(origin = %desc.meta.origin_host, ticket = %desc.meta.ticket, ?ids, "clones from another host started");
    AdminResponse::ClonesStarted { results }
}

/// Stops clones whose memory origin is gone, with the reason, so that a
/// clone waiting for a page never waits forever. Runs on its own thread.
pub fn watch_memtap(
    d: Arc<Daemon>,
    rx: std::sync::mpsc::Receiver<dom0_memtap::MemtapEvent>,
    rt: tokio::runtime::Handle,
) {
    while let Ok(ev) = rx.recv() {
        let dom0_memtap::MemtapEvent::OriginLost {
            generation,
            origin,
            reason,
        } = ev;
        let why =
            format!("its memory origin {origin} stopped serving generation {generation}: {reason}");
        let victims: Vec<Arc<Vm>> = d
            .state
            .lock()
            .unwrap()
            .vms
            .values()
            .filter(
                |v| matches!(&v.memory, MemSource::Remote { generation: g } if *g == generation),
            )
            .cloned()
            .collect();
        tracing::warn!(%generation, %origin, %reason, clones = victims.len(), "memory origin lost; stopping its clones");
        for v in victims {
            *v.lost_reason.lock().unwrap() = Some(why.clone());
            d.counters.origin_lost_kills.fetch_add(1, Ordering::Relaxed);
            let d2 = d.clone();
            rt.spawn(async move { d2.stop_vm(&v).await });
        }
    }
}

/// Loads the device state into a spawned clone, resumes it and gives it
/// its identity; returns once it is ready.
async fn resume_clone(
    d: &Arc<Daemon>,
    parent: Option<&Arc<Vm>>,
    vm: Arc<Vm>,
    desc: &Descriptor,
    slot: &CloneSlot,
    state_file: &Path,
    tl: &Timeline,
) -> Result<(), String> {
    let m = &desc.meta;
    let request_id = m.request_id;
    if parent.is_some_and(|p| p.stopping.load(Ordering::SeqCst) || p.is_ended()) {
        // The parent was stopped while we cloned it: its children go too.
        d.stop_vm(&vm).await;
        return Err("the parent VM was stopped during the clone".into());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    *vm.ready.lock().unwrap() = Some(tx);
    let res = async {
        let (q, s) = (vm.qmp_path(), state_file.to_path_buf());
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut q = Qmp::connect(&q, Duration::from_secs(30)).map_err(|e| chain(&e))?;
            q.ignore_shared_ram().map_err(|e| e.to_string())?;
            q.migrate_incoming(&format!("exec:cat '{}'", s.display()))
                .map_err(|e| e.to_string())?;
            q.wait_incoming(Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            q.cont().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        tl.mark(format!("clone{}_resumed", slot.clone_id));
        let mut seed = vec![0u8; 64];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut seed);
        vm.send(HostMsg::BecomeClone {
            request_id,
            identity: CloneIdentity {
                clone_id: slot.clone_id,
                ticket: m.ticket.clone(),
                vm: slot.vm.clone(),
                hostname: slot.vm.clone(),
                machine_id: random_hex(16),
                mac: slot.mac.clone(),
                ip_cidr: slot.ip_cidr.clone(),
                seed,
                unix_time_ns: now_ns(),
            },
        });
        match tokio::time::timeout(Duration::from_secs(d.cfg.clone_timeout_s), rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(msg))) => Err(msg),
            Ok(Err(_)) => Err("clone VM went away before it was ready".to_string()),
            Err(_) => Err(format!(
                "clone did not report ready within {} s",
                d.cfg.clone_timeout_s
            )),
        }
    }
    .await;
    match res {
        Ok(()) => {
            d.counters.clones_started.fetch_add(1, Ordering::Relaxed);
            vm.set_state(VmState::Running);
            vm.agent_up.send_replace(true);
            tl.mark(format!("clone{}_ready", slot.clone_id));
            Ok(())
        }
        Err(e) => {
            d.counters.clones_lost.fetch_add(1, Ordering::Relaxed);
            d.stop_vm(&vm).await;
            Err(e)
        }
    }
}
