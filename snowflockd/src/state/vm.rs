//! A VM as the daemon knows it: its settings ([`VmSpec`], the same for a
//! VM started by a user and for a clone), the names derived from them, its
//! live state, and its lifecycle ([`Life`], one enum).

pub use crate::host::disk::Format;
use parking_lot::Mutex;
use snowflock_proto::admin::{VmInfo, VmState};
use snowflock_proto::api::ChildState;
use snowflock_proto::channel::{HostMsg, Stream};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// Where a VM's RAM comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MemSource {
    /// Its own, fresh RAM file in its directory (an original VM).
    Own,
    /// A private mapping of a generation file on this host.
    Local { ram: PathBuf },
    /// A private mapping of a memtap file: pages fetched on demand from the
    /// origin host's page server. `generation` is the memtap name.
    Remote { generation: String, ram: PathBuf },
}

impl MemSource {
    /// `own`, `local` or `remote`, as `snowflock stats` shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            MemSource::Own => "own",
            MemSource::Local { .. } => "local",
            MemSource::Remote { .. } => "remote",
        }
    }

    /// The generation file a clone maps, `None` for an original VM.
    pub fn generation_ram(&self) -> Option<&PathBuf> {
        match self {
            MemSource::Own => None,
            MemSource::Local { ram } | MemSource::Remote { ram, .. } => Some(ram),
        }
    }
}

/// Everything a VM is made from: what `vm start` and a clone both give.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub flock: u32,
    /// 0 for an original VM, 1..=m for clones.
    pub clone_id: u32,
    /// The ticket a clone was made from.
    pub ticket: Option<String>,
    /// The original VM of this flock (itself for a parent).
    pub parent: String,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub accel: String,
    pub image: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// For a clone whose parent runs on another host: that host.
    pub origin: Option<String>,
    pub memory: MemSource,
    /// The root disk, if the VM has one.
    pub disk: Option<DiskPlan>,
}

/// A VM's root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskPlan {
    /// The user's own disk, written in place.
    Direct { path: PathBuf, format: Format },
    /// A private qcow2 overlay in the VM's directory ([`OVERLAY`]) over a
    /// base that stays read-only (an image's disk, or a frozen layer).
    Overlay { base: PathBuf, format: Format },
    /// A private overlay over another host's frozen layers, read through
    /// memtap: `layers` base first, each the backing of the next, named
    /// `memtap` there (one reference each, released when the VM ends).
    Remote {
        layers: Vec<(PathBuf, Format)>,
        memtap: Vec<String>,
        virtual_size: u64,
    },
}

/// File name of a VM's disk overlay in its directory.
pub const OVERLAY: &str = "disk.qcow2";

impl DiskPlan {
    /// The file QEMU opens and its format, for a VM in `dir`.
    pub fn top(&self, dir: &std::path::Path) -> (PathBuf, Format) {
        match self {
            DiskPlan::Direct { path, format } => (path.clone(), *format),
            DiskPlan::Overlay { .. } | DiskPlan::Remote { .. } => {
                (dir.join(OVERLAY), Format::Qcow2)
            }
        }
    }

    /// The disk as QEMU `-blockdev` options (without the node name). A
    /// remote chain is spelled out: the layers' own headers name files
    /// on the origin host.
    pub fn blockdev(&self, dir: &std::path::Path) -> serde_json::Value {
        let file = |p: &std::path::Path| serde_json::json!({"driver": "file", "filename": p});
        let (top, format) = self.top(dir);
        let mut node = serde_json::json!({"driver": format.as_str(), "file": file(&top)});
        if let DiskPlan::Remote { layers, .. } = self {
            let mut below = serde_json::Value::Null;
            for (path, format) in layers {
                let mut l = serde_json::json!({
                    "driver": format.as_str(),
                    "read-only": true,
                    "file": file(path),
                });
                if *format == Format::Qcow2 {
                    l["backing"] = below;
                }
                below = l;
            }
            node["backing"] = below;
        }
        node
    }
}

impl VmSpec {
    pub fn is_clone(&self) -> bool {
        self.clone_id != 0
    }
}

/// Why a VM is being stopped, or why it ended.
#[derive(Debug, Clone, PartialEq)]
pub enum EndCause {
    /// We stopped it (`vm stop`, `sf_kill`, its parent ended).
    Requested,
    /// A clone called `sf_exit(code)`.
    Exited(i32),
    /// The daemon stopped it on its own, or it died: reported as lost.
    Lost(String),
}

/// Why a VM's QEMU ended, as waiters see it.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// We stopped it (stop, exit, kill).
    Stopped,
    /// It went away on its own.
    Lost(String),
}

/// The lifecycle of a VM. Only moves forward: Running -> Stopping -> Ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Life {
    /// QEMU runs (booting, resuming or running: see [`VmState`]).
    Running,
    /// The daemon is ending it, for this cause.
    Stopping(EndCause),
    /// QEMU has exited and the VM is cleaned up.
    Ended(Ended),
}

impl Life {
    pub fn is_ended(&self) -> bool {
        matches!(self, Life::Ended(_))
    }

    /// The cause a stop takes when one is already recorded: an exit stays
    /// an exit, a loss beats a plain request.
    fn with_cause(&self, cause: EndCause) -> Option<Life> {
        match (self, &cause) {
            (Life::Running, _) => Some(Life::Stopping(cause)),
            (Life::Stopping(EndCause::Requested), EndCause::Exited(_) | EndCause::Lost(_)) => {
                Some(Life::Stopping(cause))
            }
            _ => None,
        }
    }
}

/// What the end of a QEMU process means, decided from the lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The daemon asked for it (not a loss).
    pub requested: bool,
    /// Human-readable reason.
    pub reason: String,
    /// What the parent's `sf_join` says about this VM.
    pub child_state: ChildState,
    pub ended: Ended,
}

/// Decides what a QEMU exit means. `status` is how QEMU ended (or why it
/// could not be waited for); `fetch_failed` names a memory origin that
/// stopped serving pages, which explains an otherwise unexpected death.
pub fn outcome(
    life: &Life,
    status: &std::io::Result<std::process::ExitStatus>,
    fetch_failed: Option<String>,
) -> Outcome {
    let cause = match life {
        Life::Stopping(c) => Some(c.clone()),
        Life::Running => fetch_failed.map(|why| {
            EndCause::Lost(format!(
                "{why}; QEMU ended: {}",
                status.as_ref().map(|s| s.to_string()).unwrap_or_default()
            ))
        }),
        Life::Ended(_) => Some(EndCause::Requested),
    };
    let reason = match (&cause, status) {
        (Some(EndCause::Lost(r)), _) => r.clone(),
        (Some(_), Ok(s)) => format!("stopped ({s})"),
        (None, Ok(s)) => format!("QEMU exited unexpectedly ({s})"),
        (_, Err(e)) => format!("cannot wait for QEMU: {e}"),
    };
    let requested = matches!(cause, Some(EndCause::Requested | EndCause::Exited(_)));
    let child_state = match &cause {
        Some(EndCause::Exited(code)) => ChildState::Exited { code: *code },
        Some(EndCause::Requested) => ChildState::Killed,
        _ => ChildState::Lost {
            reason: reason.clone(),
        },
    };
    Outcome {
        requested,
        ended: if requested {
            Ended::Stopped
        } else {
            Ended::Lost(reason.clone())
        },
        reason,
        child_state,
    }
}

/// Why a clone never reported `Ready`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotReady {
    /// Its guest could not apply the identity (the guest's own words).
    #[error("{0}")]
    Refused(String),
    /// Its VM ended first.
    #[error("clone VM ended before it was ready: {0}")]
    Ended(String),
}

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

/// Most API calls one guest may have pending at once.
pub const MAX_PENDING_REQUESTS: usize = 64;

/// Hands a session its final event. Never blocks the caller: a full queue
/// is waited on in a task of its own.
pub fn deliver(tx: mpsc::Sender<ExecEvent>, ev: ExecEvent) {
    if let Err(mpsc::error::TrySendError::Full(ev)) = tx.try_send(ev) {
        tokio::spawn(async move {
            let _ = tx.send(ev).await;
        });
    }
}

/// Names a VM gets on this host, derived from its spec and its index.
#[derive(Debug, Clone)]
pub struct Placed {
    pub index: u64,
    pub dir: PathBuf,
    pub mac: String,
    pub ip: String,
    pub tap: String,
    pub ram_path: PathBuf,
}

/// A VM known to the daemon: settings, derived names, live state.
pub struct Vm {
    pub spec: VmSpec,
    pub placed: Placed,
    pub pid: Mutex<Option<u32>>,
    /// What `vm list` shows.
    pub state: Mutex<VmState>,
    pub life: watch::Sender<Life>,
    /// Messages to the guest agent.
    pub agent_tx: mpsc::UnboundedSender<HostMsg>,
    /// Set once the agent answered Hello on the current connection.
    pub agent_up: watch::Sender<bool>,
    /// Writes to the guest channel held back for a handover (see
    /// [`ChannelHold`]).
    pub channel_hold: watch::Sender<ChannelHold>,
    /// A connection to the agent socket of the QEMU the VM is being handed
    /// to, made before that QEMU runs (so that nothing the guest writes is
    /// dropped for want of a listener); the channel takes it when the old
    /// connection ends.
    pub next_channel: Mutex<Option<std::os::unix::net::UnixStream>>,
    /// Instance id of the guest agent process last heard from (0 = none).
    pub agent_instance: AtomicU64,
    /// Open `vm exec` sessions.
    pub execs: Mutex<HashMap<u64, mpsc::Sender<ExecEvent>>>,
    /// Waiter for a clone's `Ready` / `CloneFailed` (the guest's message).
    pub ready: Mutex<Option<oneshot::Sender<Result<(), NotReady>>>>,
    /// Last console lines, kept when the VM directory goes.
    pub console_tail: Mutex<String>,
    /// Clone generations made from this VM.
    pub generations: AtomicU64,
    /// Serialises clone operations of this VM.
    pub clone_lock: tokio::sync::Mutex<()>,
    /// Serialises this VM's ticket requests, so a guest never has more
    /// than one question to the allocator (a Slurm `salloc`) at a time.
    pub ticket_lock: tokio::sync::Mutex<()>,
    /// Bounds the API calls a guest may have in flight.
    pub requests: Arc<tokio::sync::Semaphore>,
    /// The disk's layers as the VMM has them, if the VM has a disk.
    pub disk_layers: Mutex<Option<DiskLayers>>,
}

/// A VM's disk chain: the layer it writes to and the frozen ones below,
/// which clones read (see `docs/disk.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayers {
    /// QEMU node name of the top layer.
    pub top_node: String,
    /// File of the top layer.
    pub top: PathBuf,
    /// The read-only base under the VM's first overlay (an image's disk).
    pub base: Option<(PathBuf, Format)>,
    /// Format of the first layer (node `disk0`): qcow2 for an overlay, the
    /// user's disk's own for a disk of their own.
    pub first_format: Format,
    /// Where layers made by freezes go: the VM's directory, or beside a
    /// disk of the user's own (so that a crash of the daemon, which clears
    /// its state directory, leaves them next to the disk for `qemu-img
    /// commit`).
    pub layer_dir: PathBuf,
    /// Layers frozen by clone calls, oldest first (each the backing of the
    /// next; the last is the top's backing).
    pub frozen: Vec<PathBuf>,
    /// Merges so far: part of the layers' published names, so a name
    /// never stands for two contents.
    pub epoch: u32,
}

impl DiskLayers {
    /// The chain of a VM just started on `plan` in `dir`.
    pub fn of(plan: &DiskPlan, dir: &std::path::Path) -> DiskLayers {
        let (top, first_format) = plan.top(dir);
        let layer_dir = match plan {
            DiskPlan::Direct { path, .. } => path
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_else(|| dir.to_path_buf()),
            _ => dir.to_path_buf(),
        };
        DiskLayers {
            top_node: crate::host::qemu::DISK_NODE.to_string(),
            top,
            base: match plan {
                DiskPlan::Overlay { base, format } => Some((base.clone(), *format)),
                _ => None,
            },
            first_format,
            layer_dir,
            frozen: Vec::new(),
            epoch: 0,
        }
    }

    /// After a merge into the first layer (node [`DISK_NODE`]): it is the
    /// top again; returns the files no longer used.
    ///
    /// [`DISK_NODE`]: crate::host::qemu::DISK_NODE
    pub fn merged(&mut self) -> Vec<PathBuf> {
        if self.frozen.is_empty() {
            return Vec::new();
        }
        let mut gone: Vec<PathBuf> = self.frozen.drain(1..).collect();
        let first = self.frozen.pop().expect("one frozen layer left");
        gone.push(std::mem::replace(&mut self.top, first));
        self.top_node = crate::host::qemu::DISK_NODE.to_string();
        self.epoch += 1;
        gone
    }

    /// The layer file and node name of the next freeze (generation `g`)
    /// of VM `vm`.
    pub fn next(&self, vm: &str, g: u64) -> (PathBuf, String) {
        let file = if self.base.is_some() {
            format!("disk-g{g}.qcow2")
        } else {
            let disk = self.frozen.first().unwrap_or(&self.top);
            let name = disk
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{name}.snowflock-{vm}-g{g}.qcow2")
        };
        (self.layer_dir.join(file), format!("disk0-g{g}"))
    }

    /// Format of the top layer.
    pub fn top_format(&self) -> Format {
        if self.frozen.is_empty() {
            self.first_format
        } else {
            Format::Qcow2
        }
    }

    /// Format of frozen layer `i`.
    pub fn frozen_format(&self, i: usize) -> Format {
        if i == 0 {
            self.first_format
        } else {
            Format::Qcow2
        }
    }

    /// After a freeze: the old top is frozen, the new layer is the top.
    /// The whole chain as QEMU `-blockdev` options, every layer spelled
    /// out, the top named `top_node` and the first layer [`DISK_NODE`]
    /// (the names the layer merge uses): how a VM handed to a new QEMU
    /// opens its disk.
    ///
    /// [`DISK_NODE`]: crate::host::qemu::DISK_NODE
    pub fn blockdev(&self) -> serde_json::Value {
        let file = |p: &std::path::Path| serde_json::json!({"driver": "file", "filename": p});
        let mut layers: Vec<(PathBuf, Format)> = self
            .frozen
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), self.frozen_format(i)))
            .collect();
        layers.push((self.top.clone(), self.top_format()));
        let mut below = match &self.base {
            Some((p, f)) => {
                serde_json::json!({"driver": f.as_str(), "read-only": true, "file": file(p)})
            }
            None => serde_json::Value::Null,
        };
        let last = layers.len() - 1;
        for (i, (p, f)) in layers.into_iter().enumerate() {
            let mut l = serde_json::json!({"driver": f.as_str(), "file": file(&p)});
            // A first layer of the user's own keeps the backing its header
            // names, if any.
            if f == Format::Qcow2 && !below.is_null() {
                l["backing"] = below;
            }
            if i == 0 {
                l["node-name"] = crate::host::qemu::DISK_NODE.into();
            }
            if i == last {
                l["node-name"] = self.top_node.clone().into();
            }
            below = l;
        }
        below
    }

    pub fn frozen_into(&mut self, file: PathBuf, node: String) -> PathBuf {
        let old = std::mem::replace(&mut self.top, file);
        self.top_node = node;
        self.frozen.push(old.clone());
        old
    }
}

/// Writes to a VM's guest channel around a handover to a new QEMU: bytes
/// the old QEMU has not read when it stops would be lost with it (or land
/// in guest memory after its device state was saved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelHold {
    /// Messages are written as they come.
    Off,
    /// Asked by the handover: queue new messages, then say `Drained`.
    Requested,
    /// Messages are queued, and the old QEMU read everything written
    /// before (or a bounded wait ran out).
    Drained,
}

impl Vm {
    /// A VM in its first state, with the receiving end of its agent queue.
    pub fn new(spec: VmSpec, placed: Placed) -> (Vm, mpsc::UnboundedReceiver<HostMsg>) {
        let (agent_tx, agent_rx) = mpsc::unbounded_channel();
        let state = if spec.memory.generation_ram().is_some() {
            VmState::Resuming
        } else {
            VmState::Booting
        };
        let vm = Vm {
            spec,
            placed,
            pid: Mutex::new(None),
            state: Mutex::new(state),
            life: watch::channel(Life::Running).0,
            agent_tx,
            agent_up: watch::channel(false).0,
            channel_hold: watch::channel(ChannelHold::Off).0,
            next_channel: Mutex::new(None),
            agent_instance: AtomicU64::new(0),
            execs: Mutex::new(HashMap::new()),
            ready: Mutex::new(None),
            console_tail: Mutex::new(String::new()),
            generations: AtomicU64::new(0),
            clone_lock: tokio::sync::Mutex::new(()),
            ticket_lock: tokio::sync::Mutex::new(()),
            requests: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_REQUESTS)),
            disk_layers: Mutex::new(None),
        };
        *vm.disk_layers.lock() = vm
            .spec
            .disk
            .as_ref()
            .map(|d| DiskLayers::of(d, &vm.placed.dir));
        (vm, agent_rx)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether the VM reads memtap generation `name` as a disk layer.
    pub fn reads_disk_layer(&self, name: &str) -> bool {
        matches!(&self.spec.disk, Some(DiskPlan::Remote { memtap, .. }) if memtap.iter().any(|n| n == name))
    }

    pub fn info(&self, host: &str) -> VmInfo {
        VmInfo {
            name: self.spec.name.clone(),
            host: host.to_string(),
            state: self.state.lock().clone(),
            ticket: self.spec.ticket.clone(),
            clone_id: self.spec.clone_id,
            parent: self.spec.parent.clone(),
            ip: self.placed.ip.clone(),
            mac: self.placed.mac.clone(),
            mem_mib: self.spec.mem_mib,
            vcpus: self.spec.vcpus,
            accel: self.spec.accel.clone(),
            pid: *self.pid.lock(),
            memory: None,
        }
    }

    pub fn set_state(&self, s: VmState) {
        *self.state.lock() = s;
    }

    /// Marks a booting VM running once its agent spoke.
    pub fn agent_ready(&self) {
        let mut st = self.state.lock();
        if *st == VmState::Booting {
            *st = VmState::Running;
        }
    }

    pub fn send(&self, msg: HostMsg) {
        let _ = self.agent_tx.send(msg);
    }

    pub fn life(&self) -> Life {
        self.life.borrow().clone()
    }

    pub fn is_ended(&self) -> bool {
        self.life.borrow().is_ended()
    }

    /// Still running: neither being stopped nor ended.
    pub fn is_running(&self) -> bool {
        *self.life.borrow() == Life::Running
    }

    /// Records why the VM is being stopped (see [`Life`] for which cause
    /// wins). Returns false once it has ended.
    pub fn begin_stop(&self, cause: EndCause) -> bool {
        let mut alive = true;
        self.life.send_if_modified(|l| {
            alive = !l.is_ended();
            match l.with_cause(cause) {
                Some(n) => {
                    *l = n;
                    true
                }
                None => false,
            }
        });
        alive
    }

    /// The VM's QEMU has exited and it is cleaned up.
    pub fn finish(&self, ended: Ended) {
        self.life.send_replace(Life::Ended(ended));
    }

    /// Sessions and waiters of a VM that ended: each gets told why.
    pub fn fail_waiters(&self, reason: &str) {
        for (_, tx) in self.execs.lock().drain() {
            deliver(
                tx,
                ExecEvent::Error(format!("VM {} ended: {reason}", self.spec.name)),
            );
        }
        if let Some(tx) = self.ready.lock().take() {
            let _ = tx.send(Err(NotReady::Ended(reason.to_string())));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn spec(name: &str, clone_id: u32) -> VmSpec {
        VmSpec {
            name: name.into(),
            flock: 0,
            clone_id,
            ticket: None,
            parent: name.into(),
            mem_mib: 128,
            vcpus: 1,
            accel: "tcg".into(),
            image: "/img".into(),
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initramfs".into(),
            cmdline: String::new(),
            origin: None,
            memory: MemSource::Own,
            disk: None,
        }
    }

    #[test]
    fn a_disk_chain_grows_with_freezes_and_merges_back_to_its_first_layer() {
        let plan = DiskPlan::Overlay {
            base: "/img/disk.raw".into(),
            format: Format::Raw,
        };
        let dir = std::path::Path::new("/vms/p");
        let mut l = DiskLayers::of(&plan, dir);
        assert_eq!(
            (l.top.as_path(), l.top_node.as_str()),
            (dir.join(OVERLAY).as_path(), "disk0")
        );
        assert!(l.merged().is_empty(), "nothing to merge");
        for g in 1..=3 {
            let (file, node) = l.next("p", g);
            let frozen = l.frozen_into(file.clone(), node.clone());
            assert_eq!(l.top, file);
            assert_eq!(l.frozen.last(), Some(&frozen));
        }
        assert_eq!(l.frozen.len(), 3);
        assert_eq!(l.frozen[0], dir.join(OVERLAY));
        let gone = l.merged();
        assert_eq!(gone.len(), 3, "{gone:?}");
        assert!(!gone.contains(&dir.join(OVERLAY)));
        assert_eq!(
            (l.top.clone(), l.top_node.as_str(), l.epoch),
            (dir.join(OVERLAY), "disk0", 1)
        );
        assert!(l.frozen.is_empty());
    }

    #[test]
    fn a_disk_chain_spelled_out_names_its_top_and_first_layer() {
        let plan = DiskPlan::Overlay {
            base: "/img/disk.raw".into(),
            format: Format::Raw,
        };
        let dir = std::path::Path::new("/vms/p");
        let mut l = DiskLayers::of(&plan, dir);
        let b = l.blockdev();
        assert_eq!(b["node-name"], "disk0");
        assert_eq!(b["file"]["filename"], "/vms/p/disk.qcow2");
        assert_eq!(b["backing"]["driver"], "raw");
        assert_eq!(b["backing"]["read-only"], true);
        let (file, node) = l.next("p", 1);
        l.frozen_into(file, node);
        let (file, node) = l.next("p", 2);
        l.frozen_into(file.clone(), node);
        let b = l.blockdev();
        assert_eq!(b["node-name"], "disk0-g2");
        assert_eq!(b["file"]["filename"], file.to_str().unwrap());
        assert!(
            b["backing"].get("node-name").is_none(),
            "middle layers unnamed"
        );
        assert_eq!(b["backing"]["backing"]["node-name"], "disk0");
        assert_eq!(b["backing"]["backing"]["backing"]["driver"], "raw");
        // A raw disk of the user's own has no backing.
        let own = DiskLayers::of(
            &DiskPlan::Direct {
                path: "/data/d.raw".into(),
                format: Format::Raw,
            },
            dir,
        );
        let b = own.blockdev();
        assert_eq!(
            (b["driver"].as_str(), b.get("backing")),
            (Some("raw"), None)
        );
    }

    pub fn vm(name: &str, clone_id: u32) -> Vm {
        let placed = Placed {
            index: 1,
            dir: "/nonexistent".into(),
            mac: String::new(),
            ip: String::new(),
            tap: String::new(),
            ram_path: "/nonexistent/ram".into(),
        };
        Vm::new(spec(name, clone_id), placed).0
    }

    #[test]
    fn an_exit_stays_an_exit_and_a_loss_beats_a_request() {
        let v = vm("a-g1c1", 1);
        assert!(v.begin_stop(EndCause::Exited(3)));
        v.begin_stop(EndCause::Requested);
        v.begin_stop(EndCause::Lost("x".into()));
        assert_eq!(v.life(), Life::Stopping(EndCause::Exited(3)));
        let w = vm("b-g1c1", 1);
        w.begin_stop(EndCause::Requested);
        w.begin_stop(EndCause::Lost("origin gone".into()));
        assert_eq!(
            w.life(),
            Life::Stopping(EndCause::Lost("origin gone".into()))
        );
        w.finish(Ended::Lost("origin gone".into()));
        assert!(
            !w.begin_stop(EndCause::Requested),
            "an ended VM stays ended"
        );
        assert!(w.is_ended());
    }

    #[test]
    fn outcome_of_each_way_to_end() {
        use std::os::unix::process::ExitStatusExt;
        let ok = || Ok(std::process::ExitStatus::from_raw(9));
        let o = outcome(&Life::Stopping(EndCause::Requested), &ok(), None);
        assert!(o.requested);
        assert_eq!(o.child_state, ChildState::Killed);
        assert_eq!(o.ended, Ended::Stopped);
        let o = outcome(&Life::Stopping(EndCause::Exited(7)), &ok(), None);
        assert_eq!(o.child_state, ChildState::Exited { code: 7 });
        assert!(o.requested);
        let o = outcome(&Life::Running, &ok(), None);
        assert!(!o.requested);
        assert_eq!(o.reason, "QEMU exited unexpectedly (signal: 9 (SIGKILL))");
        assert!(matches!(o.child_state, ChildState::Lost { .. }));
        let o = outcome(
            &Life::Running,
            &ok(),
            Some("its memory origin h0 stopped".into()),
        );
        assert_eq!(
            o.reason,
            "its memory origin h0 stopped; QEMU ended: signal: 9 (SIGKILL)"
        );
        let o = outcome(&Life::Stopping(EndCause::Lost("gone".into())), &ok(), None);
        assert_eq!(o.reason, "gone");
        assert_eq!(o.ended, Ended::Lost("gone".into()));
    }

    #[test]
    fn waiters_hear_why_the_vm_ended() {
        let v = vm("a", 0);
        let (tx, mut rx) = mpsc::channel(4);
        v.execs.lock().insert(1, tx);
        let (rtx, rrx) = oneshot::channel();
        *v.ready.lock() = Some(rtx);
        v.fail_waiters("QEMU exited unexpectedly");
        match rx.try_recv() {
            Ok(ExecEvent::Error(m)) => assert!(m.contains("VM a ended: QEMU exited"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            rrx.blocking_recv().unwrap(),
            Err(NotReady::Ended(_))
        ));
    }
}
