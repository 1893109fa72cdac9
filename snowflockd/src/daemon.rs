//! The daemon's state: VMs, tickets, flocks, and the VM lifecycle.

use crate::agent_link;
use crate::config::Config;
use crate::net::{self, NetNames};
use crate::qmp::Qmp;
use crate::vm::{self, QemuSpec};
use snowflock_proto::admin::{AdminRequest, CloneReport, VmInfo, VmState};
use snowflock_proto::api::{ApiErrorCode, ApiResponse, ChildState, ChildStatus};
use snowflock_proto::channel::{HostMsg, Stream};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Errors of daemon operations, mapped to admin/API error codes by callers.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No VM of that name.
    #[error("No VM named {0:?}")]
    NoSuchVm(String),
    /// A VM of that name exists.
    #[error("A VM named {0:?} already exists")]
    VmExists(String),
    /// Arguments out of range or malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The image directory is unusable.
    #[error("Bad image")]
    Image(#[from] snowflock_image::ImageError),
    /// Host capacity exhausted.
    #[error("{0}")]
    NoCapacity(String),
    /// Host networking failed.
    #[error("Network setup failed")]
    Net(#[from] net::NetError),
    /// QEMU could not be started or driven.
    #[error("QEMU failed")]
    Qmp(#[from] crate::qmp::QmpError),
    /// An I/O error on the daemon's files.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        err: std::io::Error,
    },
    /// The VM did not get ready in time or died while starting.
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

/// Events for one `vm exec` session.
#[derive(Debug)]
pub enum ExecEvent {
    Output(Stream, Vec<u8>),
    Exit(i32),
    Error(String),
}

/// Output chunks queued per `vm exec` session before a slow client makes
/// the daemon kill the command (32 MiB at 32 KiB a chunk).
pub const EXEC_QUEUE: usize = 1024;

/// Hands a session its final event. Never blocks the caller: a full queue
/// is waited on in a task of its own.
pub fn deliver(tx: mpsc::Sender<ExecEvent>, ev: ExecEvent) {
    if let Err(mpsc::error::TrySendError::Full(ev)) = tx.try_send(ev) {
        tokio::spawn(async move {
            let _ = tx.send(ev).await;
        });
    }
}

/// Why a VM's QEMU ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// We stopped it (stop, exit, kill).
    Stopped,
    /// It went away on its own.
    Lost(String),
}

/// A VM known to the daemon.
pub struct Vm {
    pub name: String,
    pub dir: PathBuf,
    pub index: u64,
    pub flock: u32,
    pub clone_id: u32,
    pub ticket: Option<String>,
    /// The original VM of this flock (itself for a parent).
    pub parent: String,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub accel: String,
    pub image: PathBuf,
    pub cmdline: String,
    pub mac: String,
    pub ip: String,
    pub tap: String,
    pub ram_path: PathBuf,
    pub pid: Mutex<Option<u32>>,
    pub state: Mutex<VmState>,
    /// Messages to the guest agent.
    pub agent_tx: mpsc::UnboundedSender<HostMsg>,
    /// Set once the agent answered Hello on the current connection.
    pub agent_up: watch::Sender<bool>,
    /// Instance id of the guest agent process last heard from (0 = none).
    pub agent_instance: AtomicU64,
    /// Open `vm exec` sessions.
    pub execs: Mutex<HashMap<u64, mpsc::Sender<ExecEvent>>>,
    /// Waiter for a clone's `Ready` / `CloneFailed`.
    pub ready: Mutex<Option<oneshot::Sender<std::result::Result<(), String>>>>,
    /// Set when QEMU has exited.
    pub ended: watch::Sender<Option<Ended>>,
    pub stopping: AtomicBool,
    /// Last console lines, kept when the VM directory goes.
    pub console_tail: Mutex<String>,
    /// Clone generations made from this VM.
    pub generations: AtomicU64,
    /// Serialises clone operations of this VM.
    pub clone_lock: tokio::sync::Mutex<()>,
    /// Bounds the API calls a guest may have in flight.
    pub requests: Arc<tokio::sync::Semaphore>,
    /// For a clone whose parent runs on another host: that host.
    pub origin: Option<String>,
    /// Where this VM's memory comes from.
    pub memory: MemSource,
    /// How a clone ended by its own choice (`sf_exit`), for its parent.
    pub exit_state: Mutex<Option<ChildState>>,
    /// Why the daemon stopped this VM on its own (e.g. its memory origin
    /// died): reported as lost, with this reason, not as stopped.
    pub lost_reason: Mutex<Option<String>>,
}

/// Where a VM's RAM comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MemSource {
    /// Its own RAM file (an original VM).
    Own,
    /// A private mapping of a generation on this host.
    Local,
    /// A private mapping of a memtap file: pages fetched on demand from the
    /// origin host's page server. `generation` is the memtap name.
    Remote { generation: String },
}

/// Most API calls one guest may have pending at once.
pub const MAX_PENDING_REQUESTS: usize = 64;

impl Vm {
    pub fn info(&self, host: &str) -> VmInfo {
        VmInfo {
            name: self.name.clone(),
            host: host.to_string(),
            state: self.state.lock().unwrap().clone(),
            ticket: self.ticket.clone(),
            clone_id: self.clone_id,
            parent: self.parent.clone(),
            ip: self.ip.clone(),
            mac: self.mac.clone(),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            accel: self.accel.clone(),
            pid: *self.pid.lock().unwrap(),
        }
    }

    pub fn set_state(&self, s: VmState) {
        *self.state.lock().unwrap() = s;
    }

    pub fn send(&self, msg: HostMsg) {
        let _ = self.agent_tx.send(msg);
    }

    pub fn is_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    pub fn qmp_path(&self) -> PathBuf {
        vm::qmp_path(&self.dir)
    }
}

/// Lifecycle of a ticket.
#[derive(Debug, Clone, PartialEq)]
pub enum TicketState {
    Granted,
    Cloning,
    Active,
    Discarded(&'static str),
}

/// One child of a ticket.
#[derive(Debug, Clone)]
pub struct Child {
    pub vm: String,
    /// Host the clone runs on.
    pub host: String,
    pub state: ChildState,
}

pub struct Ticket {
    pub id: String,
    pub owner: String,
    pub granted: u32,
    pub state: TicketState,
    pub children: BTreeMap<u32, Child>,
    pub generation: Option<PathBuf>,
    pub created: Instant,
    /// Clones granted per host (hidden from the guest), in placement order.
    pub placement: Vec<(String, u32)>,
    /// Name under which the generation is published on the page server.
    pub published: Option<String>,
}

impl Ticket {
    pub fn statuses(&self) -> Vec<ChildStatus> {
        self.children
            .iter()
            .map(|(id, c)| ChildStatus {
                clone_id: *id,
                vm: c.vm.clone(),
                state: c.state.clone(),
            })
            .collect()
    }
    /// Slots placed on the host that granted the ticket.
    pub fn local_slots(&self) -> u32 {
        self.placement
            .first()
            .map(|(_, n)| *n)
            .unwrap_or(self.granted)
    }
    /// Hosts other than the origin with children of this ticket.
    pub fn remote_hosts(&self, me: &str) -> Vec<String> {
        let mut h: Vec<String> = self
            .children
            .values()
            .filter(|c| c.host != me)
            .map(|c| c.host.clone())
            .collect();
        h.sort();
        h.dedup();
        h
    }
    pub fn all_done(&self) -> bool {
        self.children
            .values()
            .all(|c| c.state != ChildState::Running)
    }
    /// Capacity this ticket holds: granted slots until it has clones, then
    /// its running clones (their VMs count themselves).
    pub fn reserved(&self) -> u32 {
        match self.state {
            TicketState::Granted | TicketState::Cloning => self.local_slots(),
            _ => 0,
        }
    }
}

#[derive(Default)]
pub struct State {
    pub vms: BTreeMap<String, Arc<Vm>>,
    pub tickets: HashMap<String, Ticket>,
    pub flocks: BTreeSet<u32>,
    pub next_index: u64,
    pub next_exec: u64,
    pub reports: Vec<CloneReport>,
    /// Names of VMs being created (reserved against duplicates).
    pub creating: std::collections::HashSet<String>,
}

/// Counters the CLI shows (`snowflock daemon status`).
#[derive(Default)]
pub struct Counters {
    pub vms_started: AtomicU64,
    pub vms_lost: AtomicU64,
    pub clone_ops: AtomicU64,
    pub clone_failures: AtomicU64,
    pub clones_started: AtomicU64,
    pub clones_lost: AtomicU64,
    pub api_requests: AtomicU64,
    pub api_errors: AtomicU64,
    pub remote_clones_started: AtomicU64,
    pub peer_auth_failures: AtomicU64,
    pub origin_lost_kills: AtomicU64,
}

/// The daemon.
pub struct Daemon {
    pub counters: Counters,
    pub cfg: Config,
    pub names: NetNames,
    pub state: Mutex<State>,
    pub started: Instant,
    /// Bumped whenever any ticket's children change.
    pub tickets_changed: watch::Sender<u64>,
    pub shutdown: watch::Sender<bool>,
    /// Cluster key (cluster hosts only).
    pub key: Option<Arc<snowflock_proto::auth::ClusterKey>>,
    /// Memory on demand for clones of other hosts' VMs (cluster hosts only).
    pub memtap: Option<dom0_memtap::Memtap>,
    /// Serves this host's generations to other hosts (cluster hosts only).
    pub pages: Option<dom0_memtap::server::PageServer>,
    /// VMs that ended on their own, newest last.
    pub losses: Mutex<std::collections::VecDeque<snowflock_proto::admin::Loss>>,
}

/// Cluster parts a daemon is built with.
#[derive(Default)]
pub struct ClusterParts {
    pub key: Option<Arc<snowflock_proto::auth::ClusterKey>>,
    pub memtap: Option<dom0_memtap::Memtap>,
    pub pages: Option<dom0_memtap::server::PageServer>,
}

/// Unguessable id in hex.
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn api_error(code: ApiErrorCode, message: impl Into<String>) -> ApiResponse {
    ApiResponse::Error {
        code,
        message: message.into(),
    }
}

/// What a new VM is made from.
pub struct NewVm {
    pub name: String,
    pub flock: u32,
    pub clone_id: u32,
    pub ticket: Option<String>,
    pub parent: String,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub accel: String,
    pub image: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// RAM to map: `None` = a fresh shared RAM file in the VM directory.
    pub generation_ram: Option<PathBuf>,
    pub origin: Option<String>,
    pub memory: MemSource,
}

impl Daemon {
    pub fn new(cfg: Config) -> Arc<Daemon> {
        Self::with_cluster(cfg, ClusterParts::default())
    }

    pub fn with_cluster(cfg: Config, parts: ClusterParts) -> Arc<Daemon> {
        let names = NetNames {
            prefix: cfg.net_prefix.clone(),
        };
        Arc::new(Daemon {
            counters: Counters::default(),
            cfg,
            names,
            // Exec ids live on in the guest agent across a clone: a clone
            // on another host must not meet its parent's ids again, so each
            // daemon counts from a random start.
            state: Mutex::new(State {
                next_exec: rand::random::<u64>() >> 20,
                ..Default::default()
            }),
            started: Instant::now(),
            tickets_changed: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            key: parts.key,
            memtap: parts.memtap,
            pages: parts.pages,
            losses: Mutex::new(Default::default()),
        })
    }

    /// Counters by name, for status output.
    pub fn counter_map(&self) -> BTreeMap<String, u64> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("vms_started", get(&c.vms_started)),
            ("vms_lost", get(&c.vms_lost)),
            ("clone_ops", get(&c.clone_ops)),
            ("clone_failures", get(&c.clone_failures)),
            ("clones_started", get(&c.clones_started)),
            ("clones_lost", get(&c.clones_lost)),
            ("api_requests", get(&c.api_requests)),
            ("api_errors", get(&c.api_errors)),
            ("remote_clones_started", get(&c.remote_clones_started)),
            ("peer_auth_failures", get(&c.peer_auth_failures)),
            ("origin_lost_kills", get(&c.origin_lost_kills)),
            (
                "malformed_guest_lines",
                get(&crate::agent_link::MALFORMED_LINES),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn vm(&self, name: &str) -> Result<Arc<Vm>> {
        self.state
            .lock()
            .unwrap()
            .vms
            .get(name)
            .cloned()
            .ok_or_else(|| DaemonError::NoSuchVm(name.into()))
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let vms: Vec<_> = self.state.lock().unwrap().vms.values().cloned().collect();
        vms.iter().map(|v| v.info(&self.cfg.host)).collect()
    }

    /// Memory-on-demand figures of a VM of this host.
    pub fn vm_stats(&self, vm: &Vm) -> snowflock_proto::admin::VmStats {
        let mut s = snowflock_proto::admin::VmStats {
            vm: vm.name.clone(),
            host: self.cfg.host.clone(),
            memory: match vm.memory {
                MemSource::Own => "own",
                MemSource::Local => "local",
                MemSource::Remote { .. } => "remote",
            }
            .into(),
            origin: vm.origin.clone(),
            ..Default::default()
        };
        let pid = *vm.pid.lock().unwrap();
        if let (MemSource::Remote { .. }, Some(m), Some(pid)) = (&vm.memory, &self.memtap, pid) {
            s.fetch = m.pid_stats(pid);
        }
        s
    }

    /// Withdraws a generation from the page server and deletes its files.
    pub fn drop_generation(&self, dir: Option<PathBuf>, published: Option<String>) {
        if let (Some(name), Some(p)) = (published, &self.pages) {
            p.withdraw(&name);
        }
        if let Some(g) = dir {
            let _ = std::fs::remove_dir_all(g);
        }
    }

    pub fn bump_tickets(&self) {
        self.tickets_changed.send_modify(|v| *v += 1);
    }

    /// Free VM slots, counting ungranted capacity held by tickets.
    pub fn free_slots(st: &State, max: u32) -> u32 {
        let used = st.vms.len() as u32 + st.tickets.values().map(|t| t.reserved()).sum::<u32>();
        max.saturating_sub(used)
    }

    /// Picks a free flock number from this host's slice of the cluster's.
    pub fn alloc_flock(&self, st: &mut State) -> Result<u32> {
        let (i, n) = self
            .cfg
            .cluster
            .as_ref()
            .map(|c| c.slot(&self.cfg.host))
            .unwrap_or((0, 1));
        let in_use = |f: &u32| st.flocks.contains(f) || st.vms.values().any(|v| v.flock == *f);
        let f = (0..net::MAX_FLOCKS)
            .filter(|f| f % n == i)
            .find(|f| !in_use(f))
            .ok_or_else(|| {
                DaemonError::NoCapacity(format!(
                    "All {} flock networks of this host are in use",
                    net::MAX_FLOCKS / n
                ))
            })?;
        st.flocks.insert(f);
        Ok(f)
    }

    /// Creates the VM's directory, tap and QEMU process, registers it and
    /// starts its agent link and exit monitor. Returns once QEMU runs.
    pub async fn create_vm(self: &Arc<Self>, new: NewVm) -> Result<Arc<Vm>> {
        let index = {
            let mut st = self.state.lock().unwrap();
            if st.vms.contains_key(&new.name) || !st.creating.insert(new.name.clone()) {
                return Err(DaemonError::VmExists(new.name));
            }
            st.next_index += 1;
            st.next_index
        };
        // The name stays reserved in `creating` until registered or failed.
        let name = new.name.clone();
        let res = self.create_vm_inner(new, index).await;
        self.state.lock().unwrap().creating.remove(&name);
        res
    }

    async fn create_vm_inner(self: &Arc<Self>, new: NewVm, index: u64) -> Result<Arc<Vm>> {
        let dir = self.cfg.state_dir.join("vms").join(&new.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|err| DaemonError::Io {
            what: format!("Cannot create {}", dir.display()),
            err,
        })?;
        let (ram_path, share) = match &new.generation_ram {
            Some(g) => (g.clone(), false),
            None => (dir.join("ram"), true),
        };
        let mac = net::mac(new.flock, new.clone_id);
        let ip = net::ip_cidr(new.flock, new.clone_id);
        let tap = self.names.tap(index);
        let bridge = self.names.bridge(new.flock);
        let setup = (|| -> Result<()> {
            net::ensure_bridge(&bridge)?;
            if let Some(c) = &self.cfg.cluster {
                let peers: Vec<std::net::IpAddr> = c.peers.iter().map(|p| p.addr.ip()).collect();
                net::ensure_overlay(&self.names, new.flock, c.listen.ip(), &peers)?;
            }
            net::create_tap(&tap, &bridge)?;
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = net::delete_link(&tap);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let spec = QemuSpec {
            qemu: self.cfg.qemu.clone(),
            accel: new.accel.clone(),
            vcpus: new.vcpus,
            mem_mib: new.mem_mib,
            ram_path: ram_path.clone(),
            share,
            kernel: new.kernel,
            initrd: new.initrd,
            cmdline: new.cmdline.clone(),
            dir: dir.clone(),
            tap: tap.clone(),
            mac: mac.clone(),
            incoming: new.generation_ram.is_some(),
        };
        let (agent_tx, agent_rx) = mpsc::unbounded_channel();
        let vm = Arc::new(Vm {
            name: new.name.clone(),
            dir: dir.clone(),
            index,
            flock: new.flock,
            clone_id: new.clone_id,
            ticket: new.ticket,
            parent: new.parent,
            mem_mib: new.mem_mib,
            vcpus: new.vcpus,
            accel: new.accel,
            image: new.image,
            cmdline: new.cmdline,
            mac,
            ip,
            tap,
            ram_path,
            pid: Mutex::new(None),
            state: Mutex::new(if new.generation_ram.is_some() {
                VmState::Resuming
            } else {
                VmState::Booting
            }),
            agent_tx,
            agent_up: watch::channel(false).0,
            agent_instance: AtomicU64::new(0),
            execs: Mutex::new(HashMap::new()),
            ready: Mutex::new(None),
            ended: watch::channel(None).0,
            stopping: AtomicBool::new(false),
            console_tail: Mutex::new(String::new()),
            generations: AtomicU64::new(0),
            clone_lock: tokio::sync::Mutex::new(()),
            requests: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_REQUESTS)),
            origin: new.origin,
            memory: new.memory,
            exit_state: Mutex::new(None),
            lost_reason: Mutex::new(None),
        });
        self.state
            .lock()
            .unwrap()
            .vms
            .insert(vm.name.clone(), vm.clone());
        let child = match spec.spawn() {
            Ok(c) => c,
            Err(err) => {
                self.state.lock().unwrap().vms.remove(&vm.name);
                self.release_vm_resources(&vm);
                return Err(DaemonError::Io {
                    what: format!("Cannot start {}", self.cfg.qemu.display()),
                    err,
                });
            }
        };
        *vm.pid.lock().unwrap() = child.id();
        self.counters.vms_started.fetch_add(1, Ordering::Relaxed);
        tracing::info!(vm = %vm.name, pid = ?child.id(), "QEMU started");
        tokio::spawn(agent_link::run(self.clone(), vm.clone(), agent_rx));
        tokio::spawn(bound_console(vm.clone()));
        tokio::spawn(self.clone().monitor(vm.clone(), child));
        Ok(vm)
    }

    /// Waits for QEMU to exit, then cleans up and records why.
    async fn monitor(self: Arc<Self>, vm: Arc<Vm>, mut child: tokio::process::Child) {
        let qemu_pid = *vm.pid.lock().unwrap();
        let status = child.wait().await;
        // A clone whose origin stopped serving pages dies of SIGBUS on the
        // failed read, possibly before the memtap event has named the cause.
        if let (MemSource::Remote { generation }, Some(m)) = (&vm.memory, &self.memtap) {
            let failed = m
                .generation_stats(generation)
                .is_some_and(|s| s.fetch_errors > 0);
            let mut r = vm.lost_reason.lock().unwrap();
            if failed && r.is_none() && !vm.stopping.load(Ordering::SeqCst) {
                *r = Some(format!(
                    "its memory origin {} stopped serving pages (a page fetch failed); QEMU ended: {}",
                    vm.origin.as_deref().unwrap_or("?"),
                    status.as_ref().map(|s| s.to_string()).unwrap_or_default()
                ));
            }
        }
        let lost_reason = vm.lost_reason.lock().unwrap().clone();
        let requested = vm.stopping.load(Ordering::SeqCst) && lost_reason.is_none();
        let reason = match &status {
            _ if lost_reason.is_some() => lost_reason.clone().unwrap_or_default(),
            Ok(s) if requested => format!("stopped ({s})"),
            Ok(s) => format!("QEMU exited unexpectedly ({s})"),
            Err(e) => format!("cannot wait for QEMU: {e}"),
        };
        let log_tail = std::fs::read_to_string(vm.dir.join("qemu.log"))
            .ok()
            .map(|l| l.lines().rev().take(3).collect::<Vec<_>>().join(" | "))
            .unwrap_or_default();
        if requested {
            tracing::info!(vm = %vm.name, "VM stopped");
        } else {
            self.counters.vms_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(vm = %vm.name, %reason, qemu_log = %log_tail, "VM lost");
            let mut l = self.losses.lock().unwrap();
            l.push_back(snowflock_proto::admin::Loss {
                vm: vm.name.clone(),
                reason: reason.clone(),
            });
            if l.len() > 32 {
                l.pop_front();
            }
        }
        *vm.console_tail.lock().unwrap() = console_tail(&vm);
        let ended = if requested {
            Ended::Stopped
        } else {
            Ended::Lost(reason.clone())
        };
        // What the parent's sf_join will say about this child.
        let child_state = match vm.exit_state.lock().unwrap().clone() {
            Some(s) => s,
            None if requested => ChildState::Killed,
            None => ChildState::Lost {
                reason: reason.clone(),
            },
        };
        *vm.pid.lock().unwrap() = None;
        vm.set_state(VmState::Stopping);
        // Fail whatever waited on this VM.
        for (_, tx) in vm.execs.lock().unwrap().drain() {
            deliver(
                tx,
                ExecEvent::Error(format!("VM {} ended: {reason}", vm.name)),
            );
        }
        if let Some(tx) = vm.ready.lock().unwrap().take() {
            let _ = tx.send(Err(format!("clone VM ended before it was ready: {reason}")));
        }
        {
            let mut st = self.state.lock().unwrap();
            st.vms.remove(&vm.name);
            if let Some(t) = vm.ticket.as_ref().and_then(|t| st.tickets.get_mut(t)) {
                if let Some(c) = t.children.get_mut(&vm.clone_id) {
                    if c.state == ChildState::Running {
                        c.state = child_state.clone();
                    }
                }
            }
            if vm.clone_id == 0 {
                st.flocks.remove(&vm.flock);
            }
        }
        if let (Some(origin), Some(ticket)) = (&vm.origin, &vm.ticket) {
            crate::peer::notify_child_ended(
                self.clone(),
                origin.clone(),
                ticket.clone(),
                vm.clone_id,
                child_state,
            );
        }
        if let (MemSource::Remote { generation }, Some(m)) = (&vm.memory, &self.memtap) {
            m.release_generation(generation);
            if let Some(pid) = qemu_pid {
                m.forget_pid(pid);
            }
        }
        let this = self.clone();
        let vm2 = vm.clone();
        let _ = tokio::task::spawn_blocking(move || {
            this.release_vm_resources(&vm2);
            // The flock's links go with its last VM on this host (and the
            // parent's reservation of the number).
            let flock_left = {
                let st = this.state.lock().unwrap();
                st.flocks.contains(&vm2.flock) || st.vms.values().any(|v| v.flock == vm2.flock)
            };
            if !flock_left {
                let _ = net::delete_link(&this.names.vxlan(vm2.flock));
                let _ = net::delete_link(&this.names.bridge(vm2.flock));
            }
        })
        .await;
        vm.ended.send_replace(Some(ended));
        self.bump_tickets();
        if vm.clone_id == 0 && !requested {
            // A parent that died on its own takes its clones with it, as
            // `vm stop` would.
            self.stop_children(&vm.name, "its parent VM ended").await;
            self.cleanup_generations(&vm.name);
        }
    }

    /// Discards a parent's tickets and stops its clones.
    async fn stop_children(self: &Arc<Self>, parent: &str, why: &'static str) {
        let mut remote: Vec<(String, String)> = Vec::new();
        let kids: Vec<Arc<Vm>> = {
            let mut st = self.state.lock().unwrap();
            for t in st.tickets.values_mut().filter(|t| t.owner == parent) {
                if t.children.values().any(|c| c.state == ChildState::Running) {
                    for h in t.remote_hosts(&self.cfg.host) {
                        remote.push((h, t.id.clone()));
                    }
                }
                for c in t.children.values_mut() {
                    if c.state == ChildState::Running {
                        c.state = ChildState::Killed;
                    }
                }
                if !matches!(t.state, TicketState::Discarded(_)) {
                    t.state = TicketState::Discarded(why);
                }
            }
            st.vms
                .values()
                .filter(|v| v.parent == parent && v.clone_id != 0)
                .cloned()
                .collect()
        };
        futures::future::join_all(kids.iter().map(|k| self.stop_one(k))).await;
        self.stop_remote(remote, why).await;
        self.bump_tickets();
    }

    /// Asks other hosts to stop their clones of these tickets.
    pub async fn stop_remote(self: &Arc<Self>, which: Vec<(String, String)>, why: &str) {
        let calls = which.into_iter().map(|(host, ticket)| async move {
            let req = AdminRequest::PeerStopClones { ticket: ticket.clone(), reason: why.to_string() };
            if let Err(e) = crate::peer::call(self, &host, &req, Duration::from_secs(15)).await {
                tracing::warn!(%host, %ticket, error = %crate::admin::chain(&e), "cannot stop clones on another host");
            }
        });
        futures::future::join_all(calls).await;
    }

    fn release_vm_resources(&self, vm: &Vm) {
        if let Err(e) = net::delete_link(&vm.tap) {
            tracing::warn!(vm = %vm.name, error = %e, "cannot delete tap");
        }
        if let Err(e) = std::fs::remove_dir_all(&vm.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = %vm.name, error = %e, "cannot remove VM directory");
            }
        }
    }

    /// Stops a VM: QMP `quit`, then SIGKILL after a grace period. Returns
    /// once QEMU has exited and the VM is cleaned up. Children of a parent
    /// are stopped first.
    pub async fn stop_vm(self: &Arc<Self>, vm: &Arc<Vm>) {
        // Set first: a clone in progress checks it before resuming children.
        vm.stopping.store(true, Ordering::SeqCst);
        if vm.clone_id == 0 {
            self.stop_children(&vm.name, "its parent VM was stopped")
                .await;
        }
        self.stop_one(vm).await;
        if vm.clone_id == 0 {
            // Children a clone in progress spawned meanwhile.
            self.stop_children(&vm.name, "its parent VM was stopped")
                .await;
            self.cleanup_generations(&vm.name);
        }
    }

    async fn stop_one(self: &Arc<Self>, vm: &Arc<Vm>) {
        let mut ended = vm.ended.subscribe();
        let done = ended.borrow().is_some();
        if done {
            return;
        }
        vm.stopping.store(true, Ordering::SeqCst);
        vm.set_state(VmState::Stopping);
        let qmp = vm.qmp_path();
        let _ = tokio::task::spawn_blocking(move || {
            Qmp::connect(&qmp, Duration::from_millis(500)).and_then(|mut q| q.quit())
        })
        .await;
        let mut first = vm.ended.subscribe();
        let timed_out =
            tokio::time::timeout(Duration::from_secs(3), first.wait_for(|e| e.is_some()))
                .await
                .is_err();
        if timed_out {
            if let Some(pid) = *vm.pid.lock().unwrap() {
                tracing::warn!(vm = %vm.name, pid, "QEMU ignored quit; killing");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
            let _ = ended.wait_for(|e| e.is_some()).await;
        }
    }

    /// Removes generation directories of a parent no longer needed.
    pub fn cleanup_generations(&self, parent: &str) {
        let gens = self.cfg.state_dir.join("gens");
        if let Ok(rd) = std::fs::read_dir(&gens) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                let ours = n
                    .strip_prefix(parent)
                    .and_then(|r| r.strip_prefix("-g"))
                    .is_some_and(|g| !g.is_empty() && g.bytes().all(|c| c.is_ascii_digit()));
                if ours {
                    if let Some(p) = &self.pages {
                        p.withdraw(&crate::clone::shared_generation_name(&self.cfg.host, &n));
                    }
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Waits (bounded) until the VM's agent has said hello.
    pub async fn wait_agent(&self, vm: &Vm, timeout: Duration) -> Result<()> {
        let mut up = vm.agent_up.subscribe();
        let mut ended = vm.ended.subscribe();
        tokio::select! {
            r = tokio::time::timeout(timeout, wait_until(&mut up, |u| *u)) => match r {
                Ok(_) => Ok(()),
                Err(_) => Err(DaemonError::Failed(format!(
                    "VM {} did not start its agent within {} s; console ends with:\n{}",
                    vm.name, timeout.as_secs(), console_tail(vm)))),
            },
            _ = crate::daemon::wait_until(&mut ended, |e| e.is_some()) => {
                let why = match vm.ended.borrow().clone() {
                    Some(crate::daemon::Ended::Lost(r)) => r,
                    _ => "stopped".to_string(),
                };
                Err(DaemonError::Failed(format!(
                    "VM {} ended while starting: {why}; console ended with:\n{}", vm.name, vm.console_tail.lock().unwrap())))
            }
        }
    }

    pub fn record_report(&self, r: CloneReport) {
        let mut st = self.state.lock().unwrap();
        st.reports.push(r);
        let n = st.reports.len();
        if n > 256 {
            st.reports.drain(..n - 256);
        }
    }

    /// Stops every VM (used on shutdown).
    pub async fn stop_all(self: &Arc<Self>) {
        let parents: Vec<Arc<Vm>> = self.state.lock().unwrap().vms.values().cloned().collect();
        futures::future::join_all(parents.iter().map(|v| self.stop_vm(v))).await;
    }
}

/// Console bytes kept in memory per VM: the guest decides how much it
/// prints, and the log lives on a tmpfs.
pub const CONSOLE_KEEP: u64 = 1 << 20;

/// Keeps a VM's console log from growing without bound: every few seconds,
/// once more than 4x [`CONSOLE_KEEP`] is allocated, punches out everything
/// but the last [`CONSOLE_KEEP`] bytes. The file keeps its length (QEMU
/// writes at its own offset), so readers use [`read_tail`].
async fn bound_console(vm: Arc<Vm>) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let path = vm::console_path(&vm.dir);
    let mut ended = vm.ended.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = wait_until(&mut ended, |e| e.is_some()) => return,
        }
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) else {
            continue;
        };
        let Ok(m) = f.metadata() else { continue };
        if m.blocks() * 512 <= 4 * CONSOLE_KEEP {
            continue;
        }
        let cut = m.len().saturating_sub(CONSOLE_KEEP) & !4095;
        // SAFETY: fallocate on a descriptor we own; no memory arguments.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                cut as libc::off_t,
            )
        };
        if r != 0 {
            tracing::warn!(vm = %vm.name, error = %std::io::Error::last_os_error(), "cannot trim console log");
            return;
        }
    }
}

/// At most the last `max` bytes of a file (the guest controls its console
/// log's size).
pub fn read_tail(path: &std::path::Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        let _ = f.seek(SeekFrom::Start(len - max));
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    // A trimmed log starts with a hole: skip its zeros.
    let start = buf.iter().position(|&b| b != 0).unwrap_or(buf.len());
    buf.drain(..start);
    buf
}

/// The last lines of a VM's serial console.
pub fn console_tail(vm: &Vm) -> String {
    let log = read_tail(&vm::console_path(&vm.dir), 16 * 1024);
    let text = String::from_utf8_lossy(&log);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `f` holds for the watched value, without holding the value's
/// read guard across an await (which would make the future `!Send`).
pub async fn wait_until<T>(rx: &mut watch::Receiver<T>, f: impl FnMut(&T) -> bool) {
    let _ = rx.wait_for(f).await.map(|_| ());
}
