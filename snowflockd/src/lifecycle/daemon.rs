//! The daemon's context: configuration, the registry (behind its one
//! lock), counters, the seams to the host and the cluster, and the cluster
//! parts (memtap, page server). Behaviour lives in the `impl Daemon`
//! blocks of the lifecycle files and in `ops`.

use crate::alloc::fixed::FixedSlots;
use crate::alloc::Allocator;
use crate::cluster::tcp::TcpPeers;
use crate::cluster::PeerChannel;
use crate::host::config::Config;
use crate::host::net::{HostNet, IpRoute2, NetError, NetNames};
use crate::host::qmp::QmpError;
use crate::host::vmm::{QemuVmm, Vmm, VmmError};
use crate::state::metrics::Counters;
use crate::state::registry::{Registry, RegistryError};
use crate::state::vm::Vm;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use snowflock_proto::admin::{VmInfo, VmStats};
use snowflock_proto::auth::ClusterKey;
use snowflock_proto::channel::HostMsg;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Errors of VM operations, mapped to admin error codes by front ends.
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
    Net(#[from] NetError),
    #[error("Bad disk")]
    Disk(#[from] crate::host::disk::DiskError),
    /// The VMM could not be started.
    #[error("QEMU failed")]
    Vmm(#[from] VmmError),
    /// The VMM could not be driven.
    #[error("QEMU failed")]
    Qmp(#[from] QmpError),
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

impl From<RegistryError> for DaemonError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::VmExists(n) => DaemonError::VmExists(n),
            e @ RegistryError::NoFlock(_) => DaemonError::NoCapacity(e.to_string()),
        }
    }
}

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

/// Starts the task that owns a new VM's guest channel (the guest front
/// end, wired in at start so that lifecycle code never imports it).
pub type GuestLink =
    fn(Arc<Daemon>, Arc<Vm>, mpsc::UnboundedReceiver<HostMsg>) -> BoxFuture<'static, ()>;

/// What a daemon is built from besides its configuration.
pub struct Parts {
    pub vmm: Arc<dyn Vmm>,
    pub net: Arc<dyn HostNet>,
    pub peers: Arc<dyn PeerChannel>,
    /// Grants tickets.
    pub alloc: Arc<dyn Allocator>,
    pub guest_link: GuestLink,
    /// Cluster key (cluster hosts only).
    pub key: Option<Arc<ClusterKey>>,
    /// Memory on demand for clones of other hosts' VMs (cluster hosts only).
    pub memtap: Option<dom0_memtap::Memtap>,
    /// Serves this host's generations to other hosts (cluster hosts only).
    pub pages: Option<dom0_memtap::server::PageServer>,
}

impl Parts {
    /// A stand-alone host on real QEMU and real host networking.
    pub fn host(guest_link: GuestLink) -> Parts {
        let peers: Arc<dyn PeerChannel> = Arc::new(TcpPeers::none());
        Parts {
            vmm: Arc::new(QemuVmm),
            net: Arc::new(IpRoute2),
            alloc: Arc::new(FixedSlots::new(peers.clone())),
            peers,
            guest_link,
            key: None,
            memtap: None,
            pages: None,
        }
    }
}

/// The daemon.
pub struct Daemon {
    pub cfg: Config,
    pub names: NetNames,
    pub counters: Counters,
    registry: Mutex<Registry>,
    pub started: Instant,
    /// Bumped whenever any ticket's children change.
    pub tickets_changed: watch::Sender<u64>,
    pub shutdown: watch::Sender<bool>,
    pub vmm: Arc<dyn Vmm>,
    pub net: Arc<dyn HostNet>,
    /// Held while a flock's bridge and VXLAN port are created, or checked
    /// and removed.
    pub flock_links: Arc<Mutex<()>>,
    pub peers: Arc<dyn PeerChannel>,
    pub alloc: Arc<dyn Allocator>,
    pub guest_link: GuestLink,
    pub key: Option<Arc<ClusterKey>>,
    pub memtap: Option<dom0_memtap::Memtap>,
    pub pages: Option<dom0_memtap::server::PageServer>,
    /// The current QEMU of each original VM (see [`super::handover`]).
    pub vmms: super::handover::Vmms,
}

impl Daemon {
    pub fn new(cfg: Config, parts: Parts) -> Arc<Daemon> {
        let names = NetNames {
            prefix: cfg.net_prefix.clone(),
        };
        // Exec ids live on in the guest agent across a clone: a clone on
        // another host must not meet its parent's ids again, so each daemon
        // counts from a random start.
        let mut registry = Registry::new(rand::random::<u64>() >> 20);
        registry.ticket_ttl = cfg.ticket_ttl;
        Arc::new(Daemon {
            cfg,
            names,
            counters: Counters::default(),
            registry: Mutex::new(registry),
            started: Instant::now(),
            tickets_changed: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            vmm: parts.vmm,
            net: parts.net,
            flock_links: Arc::new(Mutex::new(())),
            peers: parts.peers,
            alloc: parts.alloc,
            guest_link: parts.guest_link,
            key: parts.key,
            memtap: parts.memtap,
            pages: parts.pages,
            vmms: Default::default(),
        })
    }

    /// Runs `f` on the registry under its lock. The lock is never held
    /// across an await, and a panic inside `f` does not poison it.
    pub fn with<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        f(&mut self.registry.lock())
    }

    pub fn vm(&self, name: &str) -> Result<Arc<Vm>> {
        self.with(|r| r.vms.get(name).cloned())
            .ok_or_else(|| DaemonError::NoSuchVm(name.into()))
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let vms: Vec<_> = self.with(|r| r.vms.values().cloned().collect());
        vms.iter()
            .map(|v| VmInfo {
                memory: Some(self.mem_use(v)),
                ..v.info(&self.cfg.host)
            })
            .collect()
    }

    /// Free VM slots here (unused tickets expired first).
    pub fn free_slots(&self) -> u32 {
        self.with(|r| {
            r.purge(Instant::now());
            r.free_slots(self.cfg.max_vms)
        })
    }

    /// This host's slice of the cluster's flock numbers: (index, count).
    pub fn flock_slice(&self) -> (u32, u32) {
        self.cfg
            .cluster
            .as_ref()
            .map(|c| c.slot(&self.cfg.host))
            .unwrap_or((0, 1))
    }

    /// Memory-on-demand figures of a VM of this host.
    ///
    /// The fault figures are the clone's QEMU's own reads, except
    /// `prefetch_wasted_bytes`, `mcast_pages` and `mcast_dropped`, which
    /// no process causes: those are its memory generation's on this host
    /// (shared by the clones of that generation here).
    ///
    /// `completion` and `independent`: for a clone fetching from another
    /// host, how much of its memory generation this host holds, and
    /// whether it holds all of it and every disk layer the clone reads on
    /// demand. An original VM or a clone on its parent's host fetches
    /// nothing: completion 1, and never independent (it runs on the host
    /// its memory belongs to).
    pub fn vm_stats(&self, vm: &Vm) -> VmStats {
        let mut s = VmStats {
            vm: vm.name().to_string(),
            host: self.cfg.host.clone(),
            memory: vm.spec.memory.kind().into(),
            origin: vm.spec.origin.clone(),
            mem: self.mem_use(vm),
            completion: 1.0,
            independent: false,
            ..Default::default()
        };
        let pid = *vm.pid.lock();
        let disk = match &vm.spec.disk {
            Some(crate::state::vm::DiskPlan::Remote { memtap, .. }) => Some(memtap),
            _ => None,
        };
        if let (crate::state::vm::MemSource::Remote { generation, .. }, Some(m)) =
            (&vm.spec.memory, &self.memtap)
        {
            let memory = m.generation_progress(generation);
            s.completion = memory.map_or(0.0, |p| p.fraction());
            s.independent = memory.is_some_and(|p| p.complete())
                && disk
                    .into_iter()
                    .flatten()
                    .all(|layer| m.generation_progress(layer).is_some_and(|p| p.complete()));
        }
        if let (crate::state::vm::MemSource::Remote { generation, .. }, Some(m), Some(pid)) =
            (&vm.spec.memory, &self.memtap, pid)
        {
            s.fetch = match disk {
                // Memory and disk apart: the process reads both through memtap.
                Some(_) => m.pid_generations_stats(pid, std::slice::from_ref(generation)),
                None => m.pid_stats(pid),
            };
            if let Some(names) = disk {
                s.disk = snowflock_proto::admin::DiskStats::from_fault_stats(
                    &m.pid_generations_stats(pid, names),
                );
            }
        }
        // What arrives for the host, not for one process: the generation's
        // figures (after the process's, which would overwrite them).
        if let (crate::state::vm::MemSource::Remote { generation, .. }, Some(m)) =
            (&vm.spec.memory, &self.memtap)
        {
            if let Some(g) = m.generation_stats(generation) {
                s.fetch.prefetch_wasted_bytes = g.prefetch_wasted_bytes;
                s.fetch.mcast_pages = g.mcast_pages;
                s.fetch.mcast_dropped = g.mcast_dropped;
            }
        }
        s
    }

    pub fn bump_tickets(&self) {
        self.tickets_changed.send_modify(|v| *v += 1);
    }

    /// Waits (bounded) until the VM's agent has said hello.
    pub async fn wait_agent(&self, vm: &Vm, timeout: Duration) -> Result<()> {
        let mut up = vm.agent_up.subscribe();
        let mut life = vm.life.subscribe();
        tokio::select! {
            r = tokio::time::timeout(timeout, wait_until(&mut up, |u| *u)) => match r {
                Ok(_) => Ok(()),
                Err(_) => Err(DaemonError::Failed(format!(
                    "VM {} did not start its agent within {} s; console ends with:\n{}",
                    vm.name(), timeout.as_secs(), super::console_tail(vm)))),
            },
            _ = login_without_agent(vm) => Err(DaemonError::Failed(format!(
                "VM {} booted to its login prompt, but no snowflock agent answered within {} s of it: \
                 is the snowflock-guest package installed and snowflock-agent.service enabled \
                 (docs/guest-install.md)? Console ends with:\n{}",
                vm.name(), AGENT_AFTER_LOGIN.as_secs(), super::console_tail(vm)))),
            _ = wait_until(&mut life, |l| l.is_ended()) => {
                let why = match vm.life() {
                    crate::state::vm::Life::Ended(crate::state::vm::Ended::Lost(r)) => r,
                    _ => "stopped".to_string(),
                };
                Err(DaemonError::Failed(format!(
                    "VM {} ended while starting: {why}; console ended with:\n{}", vm.name(), vm.console_tail.lock())))
            }
        }
    }
}

/// How long the agent may take to answer once a guest shows a login
/// prompt (systemd starts the agent's unit well before getty).
pub const AGENT_AFTER_LOGIN: Duration = Duration::from_secs(20);

/// Resolves once the guest's console has shown a login prompt and
/// [`AGENT_AFTER_LOGIN`] has passed since: a booted guest without the
/// agent, reported at once instead of after the whole boot timeout.
async fn login_without_agent(vm: &Vm) {
    let console = crate::host::qemu::console_path(&vm.placed.dir);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let c = console.clone();
        let seen = tokio::task::spawn_blocking(move || {
            let tail = crate::host::console::read_tail(&c, 4096);
            String::from_utf8_lossy(&tail).contains(" login: ")
        })
        .await
        .unwrap_or(false);
        if seen {
            break;
        }
    }
    tokio::time::sleep(AGENT_AFTER_LOGIN).await;
}

/// Runs blocking work (processes, file trees) on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(DaemonError::Failed(format!("host task failed: {e}"))))
}

/// Unguessable id in hex.
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Waits until `f` holds for the watched value, without holding the value's
/// read guard across an await (which would make the future `!Send`).
pub async fn wait_until<T>(rx: &mut watch::Receiver<T>, f: impl FnMut(&T) -> bool) {
    let _ = rx.wait_for(f).await.map(|_| ());
}
