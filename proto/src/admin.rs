//! Host admin protocol: `snowflock` CLI <-> `snowflockd`.
//!
//! Length-prefixed JSON frames ([`crate::frame`]) over the daemon's Unix
//! socket. Every connection sends one [`AdminRequest`] and reads
//! [`AdminResponse`]s: one for most requests, a stream for `Exec` (the client
//! may then send [`ExecInput`] frames on the same connection).
//!
//! Daemons talk to each other with [`crate::peer::PeerRequest`], a separate
//! type: nothing here is accepted from another host, and nothing there from
//! the CLI.

use serde::{Deserialize, Serialize};

use crate::channel::Stream;

/// Accelerator choice for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// KVM only when the host CPU shows `vmx` or `svm`, else TCG.
    #[default]
    Auto,
    Tcg,
    Kvm,
}

/// Lifecycle state of a VM as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// QEMU started, guest agent not yet connected.
    Booting,
    /// Running and its agent answered.
    Running,
    /// Paused for a clone.
    Cloning,
    /// A clone whose identity is being applied.
    Resuming,
    /// Being torn down.
    Stopping,
}

/// One VM in `vm list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub host: String,
    pub state: VmState,
    /// Ticket this VM was cloned from; `None` for an original VM.
    pub ticket: Option<String>,
    /// 0 for an original VM (a parent), 1..=m for clones.
    pub clone_id: u32,
    /// The original VM this one descends from (itself for a parent).
    pub parent: String,
    pub ip: String,
    pub mac: String,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub accel: String,
    pub pid: Option<u32>,
    /// Host memory the VM takes (absent from older daemons).
    #[serde(default)]
    pub memory: Option<MemUse>,
}

/// Host memory a VM takes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemUse {
    /// Its own copies of guest pages: a clone's writes, or what a parent
    /// wrote since its last clone point (its QEMU's anonymous memory).
    pub private_bytes: u64,
    /// The RAM file an original VM runs on: its whole RAM until its first
    /// clone point, then its last generation, which the clones of that
    /// point share (counted here, not at the clones).
    pub shared_bytes: u64,
    /// Older generations the parent still keeps for running clones
    /// (copies made when clones of an earlier point were still running).
    pub generations_bytes: u64,
}

/// Daemon status for `daemon status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub host: String,
    pub version: String,
    pub pid: u32,
    pub state_dir: String,
    pub vms: usize,
    pub uptime_s: u64,
    pub accel: String,
    /// Named event counters since the daemon started.
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Other hosts of the cluster (empty for a stand-alone host).
    #[serde(default)]
    pub peers: Vec<String>,
    /// The last VMs that ended on their own, with the reason (newest last).
    #[serde(default)]
    pub recent_losses: Vec<Loss>,
    /// Who grants tickets: `static` or `slurm`.
    #[serde(default)]
    pub allocator: String,
    /// What the allocator holds for live tickets (Slurm allocations).
    #[serde(default)]
    pub allocations: Vec<Allocation>,
}

/// One allocation held for a ticket (a Slurm job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub ticket: String,
    pub job: String,
}

/// A VM that ended without being asked to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loss {
    pub vm: String,
    pub reason: String,
}

/// Page-fault figures of memory on demand: of one process (a clone's QEMU)
/// or one generation. memtap (`dom0-memtap`) keeps them; the daemon reports
/// them in [`VmStats`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FaultStats {
    /// Pages read through FUSE (a read of n pages counts n): first touches
    /// of a page on this host; pages already in the shared page cache cost
    /// none.
    pub faults: u64,
    /// Bytes received from origins' page servers (prefetch included).
    pub bytes_fetched: u64,
    /// Pages received from origins' page servers (prefetch included).
    pub pages_fetched: u64,
    /// Pages answered with zeros from the hole map, never fetched.
    pub zero_pages: u64,
    /// Pages answered from memtap's local cache.
    pub cache_hits: u64,
    /// Cache hits on pages that came in as prefetch (first hit only).
    pub prefetch_hits: u64,
    /// FUSE reads answered with EIO because pages could not be fetched
    /// (the kernel retries a failed page read once, so one failed access
    /// usually counts 2).
    pub fetch_errors: u64,
    /// Median time from FUSE request to reply, per faulted page.
    pub latency_p50_us: u64,
    /// 99th percentile of the same.
    pub latency_p99_us: u64,
    /// Bytes stored speculatively (prefetched neighbours, pages other
    /// hosts' clones faulted, background completion) and not read (yet):
    /// per generation, zero in per-process figures.
    #[serde(default)]
    pub prefetch_wasted_bytes: u64,
    /// Pages stored from multicast datagrams (mcdist).
    #[serde(default)]
    pub mcast_pages: u64,
    /// Multicast datagrams refused: wrong length, MAC, generation or
    /// offset.
    #[serde(default)]
    pub mcast_dropped: u64,
    /// Requests the origin answered "on its way by multicast" (lockstep:
    /// another host asked for the same pages just before).
    #[serde(default)]
    pub coalesced: u64,
    /// Of those, the ones whose pages did not arrive in time and were asked
    /// for again by unicast.
    #[serde(default)]
    pub rerequests: u64,
}

/// Memory-on-demand figures of one VM (`snowflock stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct VmStats {
    pub vm: String,
    pub host: String,
    /// Where the VM's memory comes from: `own` (an original VM), `local`
    /// (a clone mapping a generation on its own host: nothing is fetched)
    /// or `remote` (fetched on demand from `origin`).
    pub memory: String,
    pub origin: Option<String>,
    /// All zero unless `memory` is `remote`. Flattened: the JSON keys are
    /// `faults`, `bytes_fetched`, ... beside `vm`. The VM's own reads,
    /// except `prefetch_wasted_bytes`, `mcast_pages` and `mcast_dropped`:
    /// those of its memory generation on its host.
    #[serde(flatten)]
    pub fetch: FaultStats,
    /// Fraction (0..=1) of the memory generation's data pages this host
    /// holds (`remote` clones; 1 for the others, which fetch nothing).
    #[serde(default)]
    pub completion: f64,
    /// This host holds the whole generation, and every disk layer the
    /// clone reads on demand: the clone no longer needs its origin's page
    /// server (background completion, `sf ticket --independent`). Always
    /// false for `own` and `local` VMs: they fetch nothing, but run on the
    /// host their memory belongs to.
    #[serde(default)]
    pub independent: bool,
    /// The disk read on demand from another host (all zero otherwise).
    /// Flattened: `disk_bytes_fetched`, ... beside `vm`.
    #[serde(flatten, default)]
    pub disk: DiskStats,
    /// Host memory the VM takes. Flattened: `private_bytes`,
    /// `shared_bytes`, `generations_bytes` beside `vm`.
    #[serde(flatten, default)]
    pub mem: MemUse,
}

/// Disk-on-demand figures of one clone: what its QEMU read from the frozen
/// disk's layers through memtap (blocks of 4 KiB).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DiskStats {
    /// Blocks read through memtap (first reads on this host; blocks in the
    /// host's page cache cost none).
    #[serde(default)]
    pub disk_blocks_read: u64,
    #[serde(default)]
    pub disk_bytes_fetched: u64,
    #[serde(default)]
    pub disk_blocks_fetched: u64,
    /// Blocks the frozen disk holds as holes: zeros, never fetched.
    #[serde(default)]
    pub disk_zero_blocks: u64,
    /// Blocks found in memtap's cache on this host's disk.
    #[serde(default)]
    pub disk_cache_hits: u64,
    #[serde(default)]
    pub disk_fetch_errors: u64,
    #[serde(default)]
    pub disk_read_p50_us: u64,
    #[serde(default)]
    pub disk_read_p99_us: u64,
}

impl DiskStats {
    /// The disk figures of memtap statistics over a clone's disk layers.
    pub fn from_fault_stats(f: &FaultStats) -> DiskStats {
        DiskStats {
            disk_blocks_read: f.faults,
            disk_bytes_fetched: f.bytes_fetched,
            disk_blocks_fetched: f.pages_fetched,
            disk_zero_blocks: f.zero_pages,
            disk_cache_hits: f.cache_hits,
            disk_fetch_errors: f.fetch_errors,
            disk_read_p50_us: f.latency_p50_us,
            disk_read_p99_us: f.latency_p99_us,
        }
    }
}

/// Outcome of starting one clone on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneStart {
    pub clone_id: u32,
    pub vm: String,
    /// `None` when the clone runs and reported ready.
    pub error: Option<String>,
}

/// Figures of one clone operation, kept by the daemon for `bench`/`clones`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneReport {
    pub parent: String,
    pub ticket: String,
    pub clones: u32,
    /// Time the parent VM was paused (stop to cont).
    pub parent_pause_ms: f64,
    /// Size of the encoded VM descriptor.
    pub descriptor_bytes: u64,
    /// Device-state part of the descriptor.
    pub device_state_bytes: u64,
    /// Bytes of guest RAM copied into the frozen generation (holes skipped).
    pub frozen_bytes: u64,
    /// Bytes of it copied while the parent was paused (changed since the precopy).
    #[serde(default)]
    pub paused_copy_bytes: u64,
    pub guest_ram_bytes: u64,
    /// From the daemon receiving the clone request to every clone's `Ready`.
    pub all_ready_ms: f64,
    /// Named phases in order, milliseconds since the request arrived.
    pub timeline: Vec<(String, f64)>,
}

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    /// Boots a VM: kernel, initrd and command line from `image` (a
    /// directory; empty when `kernel` and `initrd` are given), its disk
    /// from `disk` (the user's own, written in place) or else the image's
    /// (behind a private overlay).
    VmStart {
        name: String,
        image: String,
        mem_mib: u32,
        vcpus: u32,
        accel: Accel,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kernel: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<String>,
    },
    VmList,
    VmStop {
        name: String,
    },
    /// Returns the serial console log.
    VmConsole {
        name: String,
    },
    /// Runs `argv` in the guest; answered by a stream of `ExecOutput` and a
    /// final `ExecExit`. The client sends [`ExecInput`] frames for stdin.
    Exec {
        name: String,
        argv: Vec<String>,
    },
    /// The clone reports recorded so far (newest last).
    CloneReports,
    /// Stops every VM and exits.
    Shutdown,
    /// Memory-on-demand figures of a VM.
    Stats {
        name: String,
    },
}

/// Stdin for an exec session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecInput {
    #[serde(with = "crate::b64")]
    pub data: Vec<u8>,
    pub eof: bool,
}

/// Stable error classes for admin answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminErrorCode {
    NotFound,
    AlreadyExists,
    BadRequest,
    BadImage,
    Unavailable,
    Failed,
}

/// An answer from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    Ok,
    Status(DaemonStatus),
    Vm(VmInfo),
    VmList {
        vms: Vec<VmInfo>,
        /// Hosts that did not answer, with the reason.
        #[serde(default)]
        unreachable: Vec<String>,
    },
    Stats(VmStats),
    Capacity {
        host: String,
        free: u32,
    },
    ClonesStarted {
        results: Vec<CloneStart>,
    },
    Console {
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    ExecOutput {
        stream: Stream,
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    ExecExit {
        code: i32,
    },
    CloneReports {
        reports: Vec<CloneReport>,
    },
    Error {
        code: AdminErrorCode,
        message: String,
    },
}

/// VM names: 1-48 chars of `[a-z0-9-]`, starting with a letter.
pub fn valid_vm_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 48
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_vm_name("vm1"));
        assert!(valid_vm_name("a-b-3"));
        assert!(!valid_vm_name(""));
        assert!(!valid_vm_name("1vm"));
        assert!(!valid_vm_name("../etc"));
        assert!(!valid_vm_name(&"a".repeat(49)));
    }

    #[test]
    fn stats_keys_are_flat() {
        let mut s = VmStats {
            vm: "c".into(),
            ..Default::default()
        };
        s.fetch.latency_p50_us = 7;
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["latency_p50_us"], 7);
        assert_eq!(v["faults"], 0);
        assert!(v.get("fetch").is_none(), "{v}");
        assert_eq!(serde_json::from_value::<VmStats>(v).unwrap(), s);
    }

    #[test]
    fn request_shape() {
        let r = AdminRequest::VmStop { name: "x".into() };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"vm_stop","name":"x"}"#
        );
    }
}
