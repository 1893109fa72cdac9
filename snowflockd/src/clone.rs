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
use crate::daemon::{api_error, random_hex, Child, Daemon, NewVm, TicketState, Vm};
use crate::net;
use crate::qmp::Qmp;
use snowflock_descriptor::{CloneSlot, Descriptor, FlockNet, MachineShape, MemoryLayout, Meta};
use snowflock_proto::admin::{CloneReport, VmState};
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
    let listener =
        std::os::unix::net::UnixListener::bind(&sock_path).map_err(|e| format!("cannot listen for device state: {e}"))?;
    let reader = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        use std::io::Read;
        let (s, _) = listener.accept().map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        // Device state is ~100 KB; far more means RAM leaked into the stream.
        s.take(MAX_DEVICE_STATE as u64 + 1).read_to_end(&mut buf).map_err(|e| e.to_string())?;
        if buf.len() > MAX_DEVICE_STATE {
            return Err(format!("device state exceeds {MAX_DEVICE_STATE} bytes: is guest RAM shared?"));
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
        q.migrate(&format!("unix:{}", sock_path.display())).map_err(|e| e.to_string())?;
        q.wait_migration(Duration::from_secs(30)).map_err(|e| e.to_string())?;
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
    let state = reader.join().map_err(|_| "device state reader panicked".to_string())?;
    let _ = std::fs::remove_file(&sock_for_unblock);
    let mem = work?;
    let state = state?;
    std::fs::write(&state_path, &state).map_err(|e| format!("cannot write device state: {e}"))?;
    Ok(Frozen { pause_ms, state, mem })
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Runs `sf_clone(ticket)` for `parent`; returns the parent's answer.
pub async fn clone(d: Arc<Daemon>, parent: Arc<Vm>, request_id: u64, ticket: String) -> ApiResponse {
    let tl = Timeline(Arc::new(Mutex::new(Vec::new())), Instant::now());
    tl.mark("request_received");
    if parent.clone_id != 0 {
        return api_error(E::WrongRole, "Nested cloning is not supported: only an original VM (clone ID 0) can clone");
    }
    let _one_at_a_time = parent.clone_lock.lock().await;
    let granted = {
        let mut st = d.state.lock().unwrap();
        let t = match check_ticket(&mut st, &parent, &ticket) {
            Ok(t) => t,
            Err(e) => return e,
        };
        if t.state != TicketState::Granted {
            return api_error(E::TicketUsed, format!("Ticket {ticket} was already used by sf_clone"));
        }
        t.state = TicketState::Cloning;
        t.granted
    };
    d.counters.clone_ops.fetch_add(1, Ordering::Relaxed);
    let generation = parent.generations.fetch_add(1, Ordering::SeqCst) + 1;
    let gen_name = format!("{}-g{generation}", parent.name);
    let gen_dir = d.cfg.state_dir.join("gens").join(&gen_name);
    let result = match std::fs::create_dir_all(&gen_dir) {
        Ok(()) => do_clone(&d, &parent, request_id, &ticket, granted, &tl, generation, &gen_name, &gen_dir).await,
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
            ApiResponse::Cloned { clone_id: 0, ticket }
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

#[allow(clippy::too_many_arguments)]
async fn do_clone(
    d: &Arc<Daemon>,
    parent: &Arc<Vm>,
    request_id: u64,
    ticket: &str,
    granted: u32,
    tl: &Timeline,
    generation: u64,
    gen_name: &str,
    gen_dir: &Path,
) -> Result<CloneOutcome, String> {
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
    let precopy = dom0_memtap::Precopy::create(&parent.ram_path, &gen_ram).map_err(|e| chain(&e))?;
    {
        // Children exist from now on, so a clone that exits at once is
        // recorded as exited, not overwritten later.
        let mut st = d.state.lock().unwrap();
        if let Some(t) = st.tickets.get_mut(ticket) {
            t.children =
                slots.iter().map(|s| (s.clone_id, Child { vm: s.vm.clone(), state: ChildState::Running })).collect();
        }
    }
    parent.set_state(VmState::Cloning);
    let frozen = {
        let (q, g, tl2) = (parent.qmp_path(), gen_dir.to_path_buf(), tl.clone());
        tokio::task::spawn_blocking(move || freeze(&q, precopy, &g, &tl2)).await.map_err(|e| e.to_string())
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
            net: FlockNet { flock: parent.flock, subnet: net::subnet(parent.flock) },
            clones: slots.clone(),
        },
        device_state: frozen.state,
        holes: frozen.mem.holes.clone(),
    };
    let encoded = desc.encode().map_err(|e| chain(&e))?;
    std::fs::write(gen_dir.join("descriptor"), &encoded).map_err(|e| format!("cannot write descriptor: {e}"))?;
    tl.mark("descriptor_built");

    // Clones start from the descriptor alone (plus the generation's memory).
    let desc = Descriptor::decode(&encoded).map_err(|e| chain(&e))?;
    let state_file = gen_dir.join("state");
    // Clone QEMUs start only now, once nothing can fail before they are
    // resumed or stopped. Starting them during the precopy (they could map
    // the generation early) was measured slower on a 2-core host: QEMU
    // start-up and the precopy compete for the same CPUs.
    let spawned =
        futures::future::join_all(slots.iter().map(|slot| spawn_clone(d, parent, slot, ticket, &image, &gen_ram)))
            .await;
    tl.mark("clone_vmms_started");
    let starts = spawned.into_iter().zip(&desc.meta.clones).map(|(vm, slot)| {
        let state_file = &state_file;
        let desc = &desc;
        async move {
            match vm {
                Ok(vm) => resume_clone(d, parent, vm, desc, slot, state_file, request_id, tl).await,
                Err(e) => Err(e),
            }
        }
    });
    let outcomes = futures::future::join_all(starts).await;
    tl.mark("clones_ready");

    // Every clone QEMU has mapped the generation and loaded the state (or
    // failed): the files can go; the generation's pages live as long as a
    // clone maps them. The descriptor stays until the ticket is discarded.
    let _ = std::fs::remove_file(gen_dir.join("ram"));
    let _ = std::fs::remove_file(gen_dir.join("state"));

    {
        let mut st = d.state.lock().unwrap();
        for (slot, outcome) in desc.meta.clones.iter().zip(outcomes) {
            if let Err(reason) = outcome {
                tracing::warn!(clone = %slot.vm, %reason, "clone lost while starting");
                let c = st.tickets.get_mut(ticket).and_then(|t| t.children.get_mut(&slot.clone_id));
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

/// Starts a clone's QEMU, paused and waiting for its device state.
async fn spawn_clone(
    d: &Arc<Daemon>,
    parent: &Arc<Vm>,
    slot: &CloneSlot,
    ticket: &str,
    image: &snowflock_image::Image,
    gen_ram: &Path,
) -> Result<Arc<Vm>, String> {
    d.create_vm(NewVm {
        name: slot.vm.clone(),
        flock: parent.flock,
        clone_id: slot.clone_id,
        ticket: Some(ticket.to_string()),
        parent: parent.name.clone(),
        mem_mib: parent.mem_mib,
        vcpus: parent.vcpus,
        accel: parent.accel.clone(),
        image: parent.image.clone(),
        kernel: image.vmlinux.clone(),
        initrd: image.initramfs.clone(),
        cmdline: parent.cmdline.clone(),
        generation_ram: Some(gen_ram.to_path_buf()),
    })
    .await
    .map_err(|e| chain(&e))
}

/// Loads the device state into a spawned clone, resumes it and gives it
/// its identity; returns once it is ready.
#[allow(clippy::too_many_arguments)]
async fn resume_clone(
    d: &Arc<Daemon>,
    parent: &Arc<Vm>,
    vm: Arc<Vm>,
    desc: &Descriptor,
    slot: &CloneSlot,
    state_file: &Path,
    request_id: u64,
    tl: &Timeline,
) -> Result<(), String> {
    let m = &desc.meta;
    if parent.stopping.load(Ordering::SeqCst) || parent.is_ended() {
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
            q.migrate_incoming(&format!("exec:cat '{}'", s.display())).map_err(|e| e.to_string())?;
            q.wait_incoming(Duration::from_secs(60)).map_err(|e| e.to_string())?;
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
            Err(_) => Err(format!("clone did not report ready within {} s", d.cfg.clone_timeout_s)),
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
