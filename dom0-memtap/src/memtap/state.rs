//! State shared by the FUSE callbacks, the fetch threads and the
//! [`Memtap`](super::Memtap) handle ([`Shared`]): the table of generations
//! and open files, the fetch queue, origin clients, the event channel and
//! per-process statistics.
//!
//! May import: `client.rs`, `events.rs`, `generation.rs`,
//! [`crate::stats`].

use super::client::OriginClient;
use super::events::MemtapEvent;
use super::generation::Gen;
use crate::stats::{Acc, ReadOutcome};
use fuser::ReplyData;
use parking_lot::Mutex;
use snowflock_proto::auth::ClusterKey;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Names, inodes and open files of the mount.
#[derive(Default)]
pub(super) struct Table {
    /// Generations visible in the mount, with the daemon's refcount.
    pub(super) by_name: HashMap<String, (Arc<Gen>, usize)>,
    /// Every generation that is visible or still open.
    pub(super) by_ino: HashMap<u64, Arc<Gen>>,
    /// Open files.
    pub(super) handles: HashMap<u64, Arc<Gen>>,
    pub(super) next_ino: u64,
    pub(super) next_fh: u64,
}

impl Table {
    /// The generation visible in the mount under `name`.
    pub(super) fn visible(&self, name: &str) -> Option<Arc<Gen>> {
        self.by_name.get(name).map(|(g, _)| g.clone())
    }

    /// Drops `ino` from `by_ino` if it is neither visible nor open.
    pub(super) fn collect(&mut self, ino: u64) {
        let visible = self.by_name.values().any(|(g, _)| g.ino == ino);
        let open = self.handles.values().any(|g| g.ino == ino);
        if !visible && !open {
            self.by_ino.remove(&ino);
        }
    }
}

/// A read that needs the network, queued for a fetch thread.
pub(super) struct Job {
    pub(super) gen: Arc<Gen>,
    pub(super) offset: u64,
    pub(super) end: u64,
    pub(super) reply: ReplyData,
    pub(super) t0: Instant,
    pub(super) pid: u32,
}

/// Everything the FUSE callbacks, the fetch threads and the handle share.
pub(super) struct Shared {
    pub(super) cache_dir: PathBuf,
    pub(super) key: Arc<ClusterKey>,
    pub(super) fetch_timeout: Duration,
    pub(super) prefetch_pages: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) table: Mutex<Table>,
    pub(super) clients: Mutex<HashMap<SocketAddr, Arc<OriginClient>>>,
    pub(super) jobs: Mutex<Option<Sender<Job>>>,
    pub(super) queue: Mutex<Receiver<Job>>,
    /// Reads queued or being fetched.
    pub(super) pending: AtomicUsize,
    /// Fetch threads running.
    pub(super) threads: AtomicUsize,
    pub(super) workers: Mutex<Vec<JoinHandle<()>>>,
    pub(super) events_tx: Mutex<Sender<MemtapEvent>>,
    pub(super) events_rx: Mutex<Option<Receiver<MemtapEvent>>>,
    pub(super) pid_stats: Mutex<HashMap<u32, Acc>>,
    /// The same per process and generation (inode): a clone's memory and
    /// its disk layers apart.
    pub(super) pid_gen_stats: Mutex<HashMap<(u32, u64), Acc>>,
    pub(super) tgids: Mutex<HashMap<u32, u32>>,
    /// Multicast settings, when this host joins generations' groups.
    pub(super) mcast: Option<crate::mcast::McastConfig>,
    pub(super) mcast_key: crate::mcast::McastKey,
    pub(super) prefetch_siblings: bool,
    /// Most pages one generation's cache holds.
    pub(super) cache_limit_pages: u64,
    /// Background completion rate, bytes per second.
    pub(super) completion_rate: u64,
    /// Random id of this mount in requests (mcdist members).
    pub(super) host_id: u32,
    pub(super) tracer: Option<super::trace::Tracer>,
}

impl Shared {
    pub(super) fn account(&self, g: &Gen, pid: u32, o: &ReadOutcome) {
        g.stats.lock().add(o);
        self.pid_stats.lock().entry(pid).or_default().add(o);
        self.pid_gen_stats
            .lock()
            .entry((pid, g.ino))
            .or_default()
            .add(o);
    }

    /// The process (thread group) of a FUSE request's thread.
    pub(super) fn tgid(&self, tid: u32) -> u32 {
        if let Some(&t) = self.tgids.lock().get(&tid) {
            return t;
        }
        let t = std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(tid);
        let mut m = self.tgids.lock();
        if m.len() >= 16384 {
            m.clear();
        }
        m.insert(tid, t);
        t
    }

    pub(super) fn client(&self, origin: SocketAddr) -> Arc<OriginClient> {
        self.clients
            .lock()
            .entry(origin)
            .or_insert_with(|| Arc::new(OriginClient::new(origin, self.key.clone())))
            .clone()
    }

    pub(super) fn emit(&self, ev: MemtapEvent) {
        let _ = self.events_tx.lock().send(ev);
    }
}
