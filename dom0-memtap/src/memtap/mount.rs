//! The [`Memtap`] handle: mounting, adding and releasing generations,
//! statistics, the event stream, unmounting; with its settings
//! ([`MemtapConfig`]) and errors ([`MemtapError`]).
//!
//! May import: every other file of `memtap`, [`crate::wire`],
//! [`crate::stats`], the crate root.

use super::events::MemtapEvent;
use super::fetch::{spawn_worker, FETCH_THREADS};
use super::fs::MemtapFs;
use super::generation::{clean_cache_dir, remove_cache_file, Gen, CACHE_SUFFIX};
use super::state::{Shared, Table};
use crate::stats::{Acc, FaultStats};
use crate::PAGE_SIZE as PS;
use crate::{sys, wire};
use bitvec::prelude::*;
use fuser::{BackgroundSession, INodeNo, MountOption, SessionACL};
use parking_lot::Mutex;
use snowflock_proto::auth::ClusterKey;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{debug, info, warn};

/// How long `unmount` waits for the FUSE session to end.
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);

/// Errors of the memtap mount and of the generations given to it.
#[derive(Debug, thiserror::Error)]
pub enum MemtapError {
    /// The memtap FUSE filesystem could not be mounted.
    #[error("Cannot mount memtap at {path} (it needs /dev/fuse and fusermount3)")]
    Mount {
        path: String,
        #[source]
        err: io::Error,
    },
    /// The memtap cache directory or a cache file could not be set up.
    #[error("Cannot use memtap cache {path}")]
    Cache {
        path: String,
        #[source]
        err: io::Error,
    },
    /// A generation given to memtap is invalid or conflicts with one present.
    #[error("Invalid memory generation {name:?}: {reason}")]
    Generation { name: String, reason: String },
}

/// Settings of a [`Memtap`] mount.
#[derive(Debug, Clone)]
pub struct MemtapConfig {
    /// Mount point (created if missing).
    pub mount: PathBuf,
    /// Directory of the per-generation cache files (created if missing).
    pub cache_dir: PathBuf,
    /// Cluster key for the origins' page servers.
    pub key: Arc<ClusterKey>,
    /// Total time one fetch may take, reconnects included (default 10 s).
    pub fetch_timeout: Duration,
    /// Pages fetched after a miss, beyond the read, while they are neither
    /// holes nor cached (default 0).
    pub prefetch_pages: u32,
    /// Keep the pages other hosts' clones faulted, which arrive by
    /// multicast, in the cache (default true; false stores only pages a
    /// read of this host waits for).
    pub prefetch_siblings: bool,
    /// Join the groups of generations added with
    /// [`GenerationSpec::mcast`] (default `None`: unicast only).
    pub mcast: Option<crate::mcast::McastConfig>,
    /// Most bytes the cache of one generation holds (default `None`: the
    /// generation's size). At the limit, pages are still answered, from
    /// the origin, but no longer kept; see `docs/memory.md#the-cache-bound`.
    pub cache_limit: Option<u64>,
    /// Rate of background completion, bytes per second (default 64 MiB/s).
    pub completion_rate: u64,
    /// Where to write the fault trace of each clone process when it ends
    /// (default `None`: no traces). See `docs/performance.md#mcdist-at-scale-without-vms`.
    pub trace_dir: Option<PathBuf>,
}

impl MemtapConfig {
    /// A configuration with the default timeout and no prefetch.
    pub fn new(
        mount: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
        key: Arc<ClusterKey>,
    ) -> MemtapConfig {
        MemtapConfig {
            mount: mount.into(),
            cache_dir: cache_dir.into(),
            key,
            fetch_timeout: Duration::from_secs(10),
            prefetch_pages: 0,
            prefetch_siblings: true,
            mcast: None,
            cache_limit: None,
            completion_rate: 64 << 20,
            trace_dir: None,
        }
    }
}

/// A generation to serve from the mount.
#[derive(Debug, Clone)]
pub struct GenerationSpec {
    /// Name, also the file name in the mount (`[A-Za-z0-9._-]`, <= 64 bytes).
    pub name: String,
    /// Size in bytes, a multiple of 4 KiB.
    pub size: u64,
    /// One bit per page; set = reads as zeros, never fetched.
    pub holes: BitVec<u64, Lsb0>,
    /// The origin host's page server.
    pub origin: SocketAddr,
    /// The origin multicasts this generation's pages to its group
    /// ([`crate::mcast::group_of`]): join it, if the mount has
    /// [`MemtapConfig::mcast`].
    pub mcast: bool,
    /// Fetch the whole generation in the background (background
    /// completion), so that this host's clones stop depending on the
    /// origin once it is held.
    pub complete: bool,
}

/// How much of a generation a host holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Data pages (not holes) in this host's cache.
    pub held: u64,
    /// Data pages of the generation.
    pub total: u64,
}

impl Progress {
    /// `held / total`, 1 for a generation of holes only.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.held as f64 / self.total as f64
        }
    }

    /// Every data page is held: reads never need the origin.
    pub fn complete(&self) -> bool {
        self.held >= self.total
    }
}

/// One FUSE mount serving generations; see the module docs.
pub struct Memtap {
    sh: Arc<Shared>,
    session: Option<BackgroundSession>,
    mount: PathBuf,
}

impl std::fmt::Debug for Memtap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memtap")
            .field("mount", &self.mount)
            .finish_non_exhaustive()
    }
}

/// Lazily unmounts a dead FUSE mount left by a crashed daemon
/// ("Transport endpoint is not connected").
fn clear_stale_mount(path: &Path) {
    if let Err(e) = std::fs::metadata(path) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            warn!("{}: stale FUSE mount, detaching it", path.display());
            if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
                let _ = sys::umount_detach(&c);
            }
        }
    }
}

/// Lazily unmounts `path` (root: umount2; otherwise `fusermount3 -u -z`).
fn detach_mount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    let Err(e) = sys::umount_detach(&c) else {
        return;
    };
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => {} // not mounted (any more)
        Some(libc::EPERM) => {
            let r = std::process::Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            if !r.is_ok_and(|s| s.success()) {
                warn!("memtap: `fusermount3 -u -z {}` failed", path.display());
            }
        }
        _ => warn!("memtap: cannot unmount {}: {e}", path.display()),
    }
}

impl Memtap {
    /// Creates the mount point and the cache directory and mounts.
    ///
    /// Needs `/dev/fuse` and `fusermount3` (the mount uses `auto_unmount`,
    /// so it goes away when this process dies). The mount is not read-only
    /// (QEMU opens RAM files `O_RDWR` even with `share=off`), but writes
    /// fail with EROFS.
    pub fn mount(cfg: MemtapConfig) -> Result<Memtap, MemtapError> {
        let merr = |err| MemtapError::Mount {
            path: cfg.mount.display().to_string(),
            err,
        };
        let cerr = |err| MemtapError::Cache {
            path: cfg.cache_dir.display().to_string(),
            err,
        };
        clear_stale_mount(&cfg.mount);
        std::fs::create_dir_all(&cfg.mount).map_err(merr)?;
        // fuser mounts on the canonical path; unmount and file paths use it too.
        let mount = cfg.mount.canonicalize().map_err(merr)?;
        std::fs::create_dir_all(&cfg.cache_dir).map_err(cerr)?;
        std::fs::set_permissions(&cfg.cache_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(cerr)?;
        clean_cache_dir(&cfg.cache_dir).map_err(cerr)?;
        let tracer = match &cfg.trace_dir {
            Some(d) => Some(
                super::trace::Tracer::new(d).map_err(|err| MemtapError::Cache {
                    path: d.display().to_string(),
                    err,
                })?,
            ),
            None => None,
        };

        let (jtx, jrx) = mpsc::channel();
        let (etx, erx) = mpsc::channel();
        let (uid, gid) = sys::effective_ids();
        let sh = Arc::new(Shared {
            cache_dir: cfg.cache_dir.clone(),
            key: cfg.key.clone(),
            fetch_timeout: cfg.fetch_timeout,
            prefetch_pages: cfg.prefetch_pages,
            uid,
            gid,
            table: Mutex::new(Table {
                next_ino: 1,
                ..Default::default()
            }),
            clients: Mutex::new(HashMap::new()),
            jobs: Mutex::new(Some(jtx)),
            queue: Mutex::new(jrx),
            pending: AtomicUsize::new(0),
            threads: AtomicUsize::new(0),
            workers: Mutex::new(Vec::new()),
            events_tx: Mutex::new(etx),
            events_rx: Mutex::new(Some(erx)),
            pid_stats: Mutex::new(HashMap::new()),
            pid_gen_stats: Mutex::new(HashMap::new()),
            tgids: Mutex::new(HashMap::new()),
            mcast: cfg.mcast.clone(),
            mcast_key: crate::mcast::McastKey::new(&cfg.key),
            prefetch_siblings: cfg.prefetch_siblings,
            cache_limit_pages: cfg.cache_limit.map_or(u64::MAX, |b| (b / PS).max(1)),
            completion_rate: cfg.completion_rate,
            host_id: rand::random::<u32>() | 1,
            tracer,
        });
        let mut m = Memtap {
            sh: sh.clone(),
            session: None,
            mount: mount.clone(),
        };
        for _ in 0..FETCH_THREADS {
            spawn_worker(&sh).map_err(merr)?;
        }
        let mut fcfg = fuser::Config::default();
        fcfg.mount_options = vec![
            MountOption::FSName("snowflock-memtap".into()),
            MountOption::Subtype("snowflock-memtap".into()),
            MountOption::AutoUnmount,
            MountOption::DefaultPermissions,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoAtime,
        ];
        // auto_unmount needs allow_other; fuser then lets only root and
        // this user in, and default_permissions checks the 0600 modes.
        fcfg.acl = SessionACL::RootAndOwner;
        let session = fuser::spawn_mount(MemtapFs { sh }, &mount, &fcfg).map_err(merr)?;
        m.session = Some(session);
        info!(mount = %mount.display(), cache = %cfg.cache_dir.display(), "memtap mounted");
        Ok(m)
    }

    /// The mount point.
    pub fn mount_point(&self) -> &Path {
        &self.mount
    }

    /// Makes a generation appear as `<mount>/<name>` and returns that path.
    /// Adding a name again (same size and origin) takes another reference.
    pub fn add_generation(&self, g: GenerationSpec) -> Result<PathBuf, MemtapError> {
        let bad = |reason: String| MemtapError::Generation {
            name: g.name.clone(),
            reason,
        };
        if !wire::valid_generation_name(&g.name) {
            return Err(bad(
                "names are 1-64 characters of [A-Za-z0-9._-], not `.` or `..`".into(),
            ));
        }
        if g.size == 0 || !g.size.is_multiple_of(PS) {
            return Err(bad(format!(
                "size {} is not a positive multiple of 4 KiB",
                g.size
            )));
        }
        let pages = g.size / PS;
        if g.holes.len() as u64 != pages {
            return Err(bad(format!(
                "hole map has {} bits for {pages} pages",
                g.holes.len()
            )));
        }
        let path = self.mount.join(&g.name);
        let mut t = self.sh.table.lock();
        if let Some((have, refs)) = t.by_name.get_mut(&g.name) {
            if have.size != g.size || have.origin != g.origin || have.holes != g.holes {
                return Err(bad(format!(
                    "already present with size {} from {}, a different generation",
                    have.size, have.origin
                )));
            }
            *refs += 1;
            return Ok(path);
        }
        t.next_ino += 1;
        let ino = t.next_ino;
        let cache_path = self
            .sh
            .cache_dir
            .join(format!("{}.{ino}.{CACHE_SUFFIX}", g.name));
        let cerr = |err| MemtapError::Cache {
            path: cache_path.display().to_string(),
            err,
        };
        let cache = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&cache_path)
            .map_err(cerr)?;
        cache.set_len(g.size).map_err(cerr)?;
        let words = pages.div_ceil(64) as usize;
        let zeros = || (0..words).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        // The generation's multicast group, if the origin multicasts and
        // this host takes part. A group that cannot be joined is a
        // warning: pages still come by unicast.
        let group = crate::mcast::group_of(&g.name);
        let sock = match (&self.sh.mcast, g.mcast) {
            (Some(m), true) => {
                match crate::mcast::receiver(group, m.port, m.iface, super::mcast_rx::POLL) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        warn!(generation = g.name, %group, "mcdist: cannot join the generation's multicast group ({e}); unicast only");
                        None
                    }
                }
            }
            _ => None,
        };
        let rx = sock.as_ref().and_then(|s| {
            let port = s.local_addr().ok()?.port();
            Some(super::generation::Rx {
                member: AtomicBool::new(true),
                received: AtomicU64::new(0),
                baseline: AtomicU64::new(u64::MAX),
                group: std::net::SocketAddrV4::new(group, port),
                probe: s.try_clone().ok(),
            })
        });
        let gen = Arc::new(Gen {
            name: g.name.clone(),
            ino,
            size: g.size,
            pages,
            holes: g.holes,
            origin: g.origin,
            client: self.sh.client(g.origin),
            cache,
            cache_path,
            present: zeros(),
            prefetched: zeros(),
            wanted: zeros(),
            lost: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            stats: Mutex::new(Acc::default()),
            created: SystemTime::now(),
            limit: self.sh.cache_limit_pages,
            host_id: self.sh.host_id,
            held: AtomicU64::new(0),
            said_full: AtomicBool::new(false),
            rx,
            arrived: parking_lot::Condvar::new(),
            arrived_lock: Mutex::new(()),
        });
        if let Some(s) = sock {
            if let Err(e) = super::mcast_rx::spawn(&self.sh, &gen, s) {
                warn!(
                    generation = g.name,
                    "mcdist: cannot start the receiving thread ({e}); unicast only"
                );
                if let Some(rx) = &gen.rx {
                    rx.member.store(false, Ordering::Relaxed);
                }
            }
        }
        if g.complete {
            if let Err(e) = super::complete::spawn(&self.sh, &gen) {
                warn!(
                    generation = g.name,
                    "memtap: cannot start background completion: {e}"
                );
            }
        }
        t.by_ino.insert(ino, gen.clone());
        t.by_name.insert(g.name.clone(), (gen, 1));
        debug!(generation = g.name, origin = %g.origin, size = g.size, "memtap: generation added");
        Ok(path)
    }

    /// Drops a reference; at zero the file disappears (processes that have
    /// it open or mapped keep reading it) and its cache file is deleted.
    pub fn release_generation(&self, name: &str) {
        let mut t = self.sh.table.lock();
        let Some((g, refs)) = t.by_name.get_mut(name) else {
            return;
        };
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        let g = g.clone();
        t.by_name.remove(name);
        t.collect(g.ino);
        drop(t);
        // Open handles keep reading through the unlinked file.
        remove_cache_file(&g.cache_path);
        if let Some(s) = &self.session {
            if let Err(e) = s.notifier().inval_entry(INodeNo::ROOT, OsStr::new(name)) {
                debug!(generation = name, "memtap: cannot invalidate the name: {e}");
            }
        }
        debug!(generation = name, "memtap: generation released");
    }

    /// Statistics of one process (a QEMU, i.e. one clone); zeros if it
    /// never read.
    pub fn pid_stats(&self, pid: u32) -> FaultStats {
        self.sh
            .pid_stats
            .lock()
            .get(&pid)
            .map(Acc::snapshot)
            .unwrap_or_default()
    }

    /// Statistics of one process's reads of the named generations
    /// (those present in the mount), merged.
    pub fn pid_generations_stats(&self, pid: u32, names: &[String]) -> FaultStats {
        let inos: Vec<u64> = {
            let t = self.sh.table.lock();
            names
                .iter()
                .filter_map(|n| t.by_name.get(n).map(|(g, _)| g.ino))
                .collect()
        };
        let m = self.sh.pid_gen_stats.lock();
        let mut acc = crate::stats::Acc::default();
        for ino in inos {
            if let Some(a) = m.get(&(pid, ino)) {
                acc.merge(a);
            }
        }
        acc.snapshot()
    }

    /// Forgets a process's statistics (call when a clone ends).
    pub fn forget_pid(&self, pid: u32) {
        if let Some(t) = &self.sh.tracer {
            t.finish(pid);
        }
        self.sh.pid_stats.lock().remove(&pid);
        self.sh.pid_gen_stats.lock().retain(|(p, _), _| *p != pid);
        self.sh.tgids.lock().retain(|_, t| *t != pid);
    }

    /// Statistics of a generation that is present in the mount.
    pub fn generation_stats(&self, name: &str) -> Option<FaultStats> {
        let g = self.sh.table.lock().visible(name)?;
        let mut s = g.stats.lock().snapshot();
        s.prefetch_wasted_bytes = g.wasted_bytes();
        Some(s)
    }

    /// How much of a generation present in the mount this host holds
    /// (background completion's progress).
    pub fn generation_progress(&self, name: &str) -> Option<Progress> {
        let g = self.sh.table.lock().visible(name)?;
        let total = g.pages - g.holes.count_ones() as u64;
        let held = (0..g.pages).filter(|&p| !g.hole(p) && g.present(p)).count() as u64;
        Some(Progress { held, total })
    }

    /// The event stream. The first call returns the receiver that has
    /// buffered every event since the mount; a later call starts a new
    /// stream and the earlier receiver gets nothing more.
    pub fn events(&self) -> Receiver<MemtapEvent> {
        if let Some(rx) = self.sh.events_rx.lock().take() {
            return rx;
        }
        let (tx, rx) = mpsc::channel();
        *self.sh.events_tx.lock() = tx;
        rx
    }

    /// Unmounts (also done on drop). Pending fetches fail with EIO. If a
    /// process still has a file open, the kernel detaches the mount and it
    /// keeps serving that process until it closes the file.
    pub fn unmount(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        {
            let t = self.sh.table.lock();
            for g in t.by_ino.values() {
                g.cancel.store(true, Ordering::Release);
            }
        }
        *self.sh.jobs.lock() = None;
        let workers: Vec<_> = self.sh.workers.lock().drain(..).collect();
        for w in workers {
            let _ = w.join();
        }
        let Some(session) = self.session.take() else {
            return;
        };
        // fuser's own unmount only drops fusermount3's auto_unmount socket,
        // and fusermount3 (3.14) then unmounts only a dead filesystem: so
        // unmount here. The session ends when the kernel closes the
        // connection, which waits for the last open file; do not wait for
        // that forever.
        detach_mount(&self.mount);
        let (tx, rx) = mpsc::channel();
        let mount = self.mount.clone();
        let r = std::thread::Builder::new()
            .name("memtap-umount".into())
            .spawn(move || {
                let _ = tx.send(session.umount_and_join());
            });
        match r {
            Ok(_) => match rx.recv_timeout(UNMOUNT_WAIT) {
                Ok(Ok(())) => info!(mount = %mount.display(), "memtap unmounted"),
                Ok(Err(e)) => warn!(mount = %mount.display(), "memtap unmount: {e}"),
                Err(_) => warn!(
                    mount = %mount.display(),
                    "memtap unmount: files still open after {UNMOUNT_WAIT:?}; the mount is detached and ends when they close"
                ),
            },
            Err(e) => warn!("memtap unmount: cannot spawn a thread: {e}"),
        }
        let t = self.sh.table.lock();
        for g in t.by_ino.values() {
            remove_cache_file(&g.cache_path);
        }
    }
}

impl Drop for Memtap {
    fn drop(&mut self) {
        self.stop();
    }
}
