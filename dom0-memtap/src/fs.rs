//! Memory on demand: frozen generations of other hosts exposed as files of
//! one FUSE mount per host.
//!
//! A clone's QEMU maps a generation file from the mount with
//! `memory-backend-file,mem-path=<file>,share=off`: a `MAP_PRIVATE` mapping,
//! so guest writes are copy-on-write and guest reads fault pages in through
//! the page cache, which the co-located clones of one generation share. Each
//! page the kernel asks for is resolved, in order, from
//!
//! 1. memtap's local cache (a sparse file per generation plus a present
//!    bitmap),
//! 2. the hole map (zeros, nothing fetched),
//! 3. the origin host's [page server](crate::server), contiguous missing
//!    pages of one read in one request, stored into the cache before the
//!    reply.
//!
//! Reads that need the network are handed to a pool of fetch threads
//! ([`FETCH_THREADS`], growing to [`MAX_FETCH_THREADS`] while all are
//! busy), so that one slow fetch holds up neither the cached and hole reads
//! of other clones nor the fetches from other origins. A fetch retries on fresh
//! connections until [`MemtapConfig::fetch_timeout`]; then the read fails
//! with EIO, the generation is marked lost, [`MemtapEvent::OriginLost`] is
//! sent once, and later misses of that generation fail at once.

use crate::client::{FetchError, OriginClient};
use crate::stats::{Acc, FaultStats, ReadOutcome};
use crate::wire;
use crate::{MemtapError, PAGE_SIZE};
use bitvec::prelude::*;
use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL,
    TimeOrNow, WriteFlags,
};
use snowflock_proto::auth::ClusterKey;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, error, info, warn};

/// Threads that fetch missing pages from origins (more are added while
/// all are busy, up to [`MAX_FETCH_THREADS`]).
pub const FETCH_THREADS: usize = 8;
/// Most fetch threads.
pub const MAX_FETCH_THREADS: usize = 64;
/// Extra fetch threads end after this long without work.
const WORKER_IDLE_EXIT: Duration = Duration::from_secs(10);
/// How long the kernel caches a file's attributes (they never change).
const ATTR_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long the kernel caches a name (names are reused after a release).
const ENTRY_TTL: Duration = Duration::from_secs(1);
/// How long `unmount` waits for the FUSE session to end.
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);
/// Suffix of cache files in the cache directory.
const CACHE_SUFFIX: &str = "memtap-cache";
const PS: u64 = PAGE_SIZE;

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
}

/// Something the daemon must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemtapEvent {
    /// Pages of `generation` could not be fetched within the fetch timeout;
    /// reads of its missing pages now fail with EIO. Sent once per
    /// generation.
    OriginLost {
        generation: String,
        origin: SocketAddr,
        reason: String,
    },
}

fn bit(bits: &[AtomicU64], i: u64) -> bool {
    bits[(i / 64) as usize].load(Ordering::Acquire) >> (i % 64) & 1 == 1
}

fn set_bit(bits: &[AtomicU64], i: u64) {
    bits[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
}

/// Clears a bit; returns whether it was set.
fn take_bit(bits: &[AtomicU64], i: u64) -> bool {
    let m = 1u64 << (i % 64);
    bits[(i / 64) as usize].fetch_and(!m, Ordering::AcqRel) & m != 0
}

struct Gen {
    name: String,
    ino: u64,
    size: u64,
    pages: u64,
    holes: BitVec<u64, Lsb0>,
    origin: SocketAddr,
    client: Arc<OriginClient>,
    cache: File,
    cache_path: PathBuf,
    present: Vec<AtomicU64>,
    prefetched: Vec<AtomicU64>,
    /// Fetches failed past the deadline; misses fail at once.
    lost: AtomicBool,
    /// Stop fetching (lost, or unmounting).
    cancel: AtomicBool,
    stats: Mutex<Acc>,
    created: SystemTime,
}

impl Gen {
    fn hole(&self, p: u64) -> bool {
        self.holes[p as usize]
    }

    fn present(&self, p: u64) -> bool {
        bit(&self.present, p)
    }

    fn attr(&self, uid: u32, gid: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.ino),
            size: self.size,
            blocks: self.size / 512,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: PS as u32,
            flags: 0,
        }
    }

    /// Fills the pages of `[offset, end)` that `skip` does not claim:
    /// cached pages from the cache file, holes as zeros. `buf` starts at
    /// `offset` and is zeroed. Counts cache, hole and prefetch hits.
    fn fill(
        &self,
        buf: &mut [u8],
        offset: u64,
        end: u64,
        skip: impl Fn(u64) -> bool,
        o: &mut ReadOutcome,
    ) -> io::Result<()> {
        let (first, last) = (offset / PS, (end - 1) / PS);
        let mut p = first;
        while p <= last {
            if skip(p) {
                p += 1;
                continue;
            }
            if self.present(p) {
                // A run of cached pages: one pread.
                let a = p;
                while p <= last && !skip(p) && self.present(p) {
                    o.cache_hits += 1;
                    o.prefetch_hits += take_bit(&self.prefetched, p) as u64;
                    p += 1;
                }
                let (lo, hi) = ((a * PS).max(offset), (p * PS).min(end));
                self.cache
                    .read_exact_at(&mut buf[(lo - offset) as usize..(hi - offset) as usize], lo)?;
                continue;
            }
            if self.hole(p) {
                o.zero_pages += 1; // already zero in `buf`
                p += 1;
                continue;
            }
            return Err(io::Error::other(format!(
                "page {p} is neither cached nor a hole"
            )));
        }
        Ok(())
    }
}

impl Drop for Gen {
    fn drop(&mut self) {
        remove_cache_file(&self.cache_path);
    }
}

fn remove_cache_file(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("cannot remove memtap cache file {}: {e}", p.display()),
    }
}

#[derive(Default)]
struct Table {
    /// Generations visible in the mount, with the daemon's refcount.
    by_name: HashMap<String, (Arc<Gen>, usize)>,
    /// Every generation that is visible or still open.
    by_ino: HashMap<u64, Arc<Gen>>,
    /// Open files.
    handles: HashMap<u64, Arc<Gen>>,
    next_ino: u64,
    next_fh: u64,
}

impl Table {
    /// Drops `ino` from `by_ino` if it is neither visible nor open.
    fn collect(&mut self, ino: u64) {
        let visible = self.by_name.values().any(|(g, _)| g.ino == ino);
        let open = self.handles.values().any(|g| g.ino == ino);
        if !visible && !open {
            self.by_ino.remove(&ino);
        }
    }
}

struct Job {
    gen: Arc<Gen>,
    offset: u64,
    end: u64,
    reply: ReplyData,
    t0: Instant,
    pid: u32,
}

struct Shared {
    cache_dir: PathBuf,
    key: Arc<ClusterKey>,
    fetch_timeout: Duration,
    prefetch_pages: u32,
    uid: u32,
    gid: u32,
    table: Mutex<Table>,
    clients: Mutex<HashMap<SocketAddr, Arc<OriginClient>>>,
    jobs: Mutex<Option<Sender<Job>>>,
    queue: Mutex<Receiver<Job>>,
    /// Reads queued or being fetched.
    pending: AtomicUsize,
    /// Fetch threads running.
    threads: AtomicUsize,
    workers: Mutex<Vec<JoinHandle<()>>>,
    events_tx: Mutex<Sender<MemtapEvent>>,
    events_rx: Mutex<Option<Receiver<MemtapEvent>>>,
    pid_stats: Mutex<HashMap<u32, Acc>>,
    tgids: Mutex<HashMap<u32, u32>>,
}

impl Shared {
    fn account(&self, g: &Gen, pid: u32, o: &ReadOutcome) {
        g.stats.lock().unwrap().add(o);
        self.pid_stats
            .lock()
            .unwrap()
            .entry(pid)
            .or_default()
            .add(o);
    }

    /// The process (thread group) of a FUSE request's thread.
    fn tgid(&self, tid: u32) -> u32 {
        if let Some(&t) = self.tgids.lock().unwrap().get(&tid) {
            return t;
        }
        let t = std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(tid);
        let mut m = self.tgids.lock().unwrap();
        if m.len() >= 16384 {
            m.clear();
        }
        m.insert(tid, t);
        t
    }

    fn client(&self, origin: SocketAddr) -> Arc<OriginClient> {
        self.clients
            .lock()
            .unwrap()
            .entry(origin)
            .or_insert_with(|| Arc::new(OriginClient::new(origin, self.key.clone())))
            .clone()
    }

    fn emit(&self, ev: MemtapEvent) {
        let _ = self.events_tx.lock().unwrap().send(ev);
    }
}

struct MemtapFs {
    sh: Arc<Shared>,
}

fn dir_attr(uid: u32, gid: u32, t: SystemTime) -> FileAttr {
    FileAttr {
        ino: INodeNo::ROOT,
        size: 0,
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid,
        gid,
        rdev: 0,
        blksize: PS as u32,
        flags: 0,
    }
}

impl MemtapFs {
    fn by_ino(&self, ino: INodeNo) -> Option<Arc<Gen>> {
        self.sh.table.lock().unwrap().by_ino.get(&ino.0).cloned()
    }
}

impl Filesystem for MemtapFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // No readahead (max_readahead / 4096 = 0 pages): one guest page
        // fault costs one 4 KiB read, never a fetch of its neighbours.
        // Prefetch is memtap's own decision (`prefetch_pages`).
        // FUSE sizes page-cache folios (and so the reads a fault causes) by
        // max_pages = max(max_write, max_readahead) / 4096: with the
        // default max_write a guest fault on a large-folio kernel (6.x)
        // reads 1 MiB. Writes are refused anyway, so keep it at one page.
        if let Err(v) = config.set_max_write(4096) {
            warn!("memtap: kernel refused max_write 4096, using {v}");
        }
        if let Err(v) = config.set_max_readahead(1) {
            warn!("memtap: kernel refused max_readahead 1, using {v}");
            let _ = config.set_max_readahead(v);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let g = name.to_str().and_then(|n| {
            self.sh
                .table
                .lock()
                .unwrap()
                .by_name
                .get(n)
                .map(|(g, _)| g.clone())
        });
        match g {
            Some(g) => reply.entry_with_ttls(
                &ATTR_TTL,
                &ENTRY_TTL,
                &g.attr(self.sh.uid, self.sh.gid),
                Generation(0),
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(
                &ATTR_TTL,
                &dir_attr(self.sh.uid, self.sh.gid, SystemTime::UNIX_EPOCH),
            );
        }
        match self.by_ino(ino) {
            Some(g) => reply.attr(&ATTR_TTL, &g.attr(self.sh.uid, self.sh.gid)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino == INodeNo::ROOT {
            return reply.attr(
                &ATTR_TTL,
                &dir_attr(self.sh.uid, self.sh.gid, SystemTime::UNIX_EPOCH),
            );
        }
        match self.by_ino(ino) {
            Some(g) if size.is_some_and(|s| s != g.size) => reply.error(Errno::EROFS),
            // Generations are immutable: other changes are accepted and
            // ignored (QEMU may touch a RAM file's attributes).
            Some(g) => reply.attr(&ATTR_TTL, &g.attr(self.sh.uid, self.sh.gid)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut t = self.sh.table.lock().unwrap();
        let Some(g) = t.by_ino.get(&ino.0).cloned() else {
            return reply.error(Errno::ENOENT);
        };
        match t.by_name.get(&g.name) {
            Some((v, _)) if v.ino == g.ino => {}
            _ => return reply.error(Errno::ENOENT), // released
        }
        t.next_fh += 1;
        let fh = t.next_fh;
        t.handles.insert(fh, g);
        drop(t);
        // KEEP_CACHE: a second QEMU opening the file must not drop the
        // page cache the first one filled.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut t = self.sh.table.lock().unwrap();
        if let Some(g) = t.handles.remove(&fh.0) {
            t.collect(g.ino);
        }
        reply.ok();
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let t0 = Instant::now();
        let g = {
            let t = self.sh.table.lock().unwrap();
            t.handles
                .get(&fh.0)
                .or_else(|| t.by_ino.get(&ino.0))
                .cloned()
        };
        let Some(g) = g else {
            return reply.error(Errno::EBADF);
        };
        if offset >= g.size || size == 0 {
            return reply.data(&[]);
        }
        let pid = self.sh.tgid(req.pid());
        tracing::trace!(offset, size, pid, tid = req.pid(), "memtap read");
        let end = (offset + size as u64).min(g.size);
        let (first, last) = (offset / PS, (end - 1) / PS);
        let mut o = ReadOutcome {
            pages: last - first + 1,
            ..Default::default()
        };
        if (first..=last).all(|p| g.present(p) || g.hole(p)) {
            let mut buf = vec![0u8; (end - offset) as usize];
            let r = g.fill(&mut buf, offset, end, |_| false, &mut o);
            o.latency_us = t0.elapsed().as_micros() as u64;
            // Statistics first: a reader that checks them after its read
            // must see the read counted.
            self.sh.account(&g, pid, &o);
            match r {
                Ok(()) => reply.data(&buf),
                Err(e) => {
                    error!(generation = g.name, "memtap cache read failed: {e}");
                    reply.error(Errno::EIO);
                }
            }
            return;
        }
        if g.lost.load(Ordering::Acquire) {
            o.fetch_error = true;
            o.latency_us = t0.elapsed().as_micros() as u64;
            self.sh.account(&g, pid, &o);
            return reply.error(Errno::EIO);
        }
        let job = Job {
            gen: g,
            offset,
            end,
            reply,
            t0,
            pid,
        };
        dispatch(&self.sh, job);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // ENOSYS: the kernel stops sending FLUSH (nothing to flush).
        reply.error(Errno::ENOSYS);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // ENOSYS: the kernel stops sending FSYNC and reports success.
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (1, FileType::Directory, ".".into()),
            (1, FileType::Directory, "..".into()),
        ];
        let mut gens: Vec<(u64, String)> = self
            .sh
            .table
            .lock()
            .unwrap()
            .by_name
            .values()
            .map(|(g, _)| (g.ino, g.name.clone()))
            .collect();
        gens.sort_by(|a, b| a.1.cmp(&b.1));
        entries.extend(gens.into_iter().map(|(i, n)| (i, FileType::RegularFile, n)));
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// Queues a read that needs the network, adding a fetch thread when all
/// are busy (a stalled origin must not starve the others).
fn dispatch(sh: &Arc<Shared>, job: Job) {
    let jobs = sh.jobs.lock().unwrap();
    let Some(tx) = &*jobs else {
        return job.reply.error(Errno::EIO); // unmounting
    };
    let pending = sh.pending.fetch_add(1, Ordering::SeqCst) + 1;
    if let Err(mpsc::SendError(job)) = tx.send(job) {
        sh.pending.fetch_sub(1, Ordering::SeqCst);
        return job.reply.error(Errno::EIO);
    }
    if pending > sh.threads.load(Ordering::SeqCst)
        && sh.threads.load(Ordering::SeqCst) < MAX_FETCH_THREADS
    {
        if let Err(e) = spawn_worker(sh) {
            warn!("memtap cannot add a fetch thread: {e}");
        }
    }
}

fn spawn_worker(sh: &Arc<Shared>) -> io::Result<()> {
    let n = sh.threads.fetch_add(1, Ordering::SeqCst);
    let s = sh.clone();
    match std::thread::Builder::new()
        .name(format!("memtap-fetch-{n}"))
        .spawn(move || worker(s))
    {
        Ok(t) => {
            let mut w = sh.workers.lock().unwrap();
            w.retain(|t| !t.is_finished());
            w.push(t);
            Ok(())
        }
        Err(e) => {
            sh.threads.fetch_sub(1, Ordering::SeqCst);
            Err(e)
        }
    }
}

/// Runs fetch jobs until the queue closes; threads beyond
/// [`FETCH_THREADS`] end after a while without work.
fn worker(sh: Arc<Shared>) {
    let mut scratch = vec![0u8; wire::data_len(wire::MAX_PAGES)];
    loop {
        let job = match sh.queue.lock().unwrap().recv_timeout(WORKER_IDLE_EXIT) {
            Ok(j) => j,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let shrink = sh
                    .threads
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                        (t > FETCH_THREADS).then(|| t - 1)
                    });
                if shrink.is_ok() {
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        serve_miss(&sh, job, &mut scratch);
        sh.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers a read that misses pages: fetches them, stores them into the
/// cache, replies.
fn serve_miss(sh: &Shared, job: Job, scratch: &mut [u8]) {
    let Job {
        gen: g,
        offset,
        end,
        reply,
        t0,
        pid,
    } = job;
    let (first, last) = (offset / PS, (end - 1) / PS);
    let mut o = ReadOutcome {
        pages: last - first + 1,
        ..Default::default()
    };
    // Runs [a, b) of missing pages; another worker may have fetched some
    // since the read was queued.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in first..=last {
        if g.present(p) || g.hole(p) {
            continue;
        }
        match runs.last_mut() {
            Some((_, b)) if *b == p => *b += 1,
            _ => runs.push((p, p + 1)),
        }
    }
    // Prefetch: extend the last run past the read.
    let mut prefetch_from = u64::MAX;
    if let Some((_, b)) = runs.last_mut() {
        if *b == last + 1 {
            let limit = (*b + sh.prefetch_pages as u64).min(g.pages);
            let start = *b;
            while *b < limit && !g.hole(*b) && !g.present(*b) {
                *b += 1;
            }
            if *b > start {
                prefetch_from = start;
            }
        }
    }
    let mut buf = vec![0u8; (end - offset) as usize];
    let deadline = Instant::now() + sh.fetch_timeout;
    let mut failure: Option<FetchError> = None;
    'runs: for &(a, b) in &runs {
        let mut p = a;
        while p < b {
            let n = (b - p).min(wire::MAX_PAGES as u64) as u32;
            let data = &mut scratch[..wire::data_len(n)];
            if let Err(e) = g.client.fetch(&g.name, p, n, data, deadline, &g.cancel) {
                failure = Some(e);
                break 'runs;
            }
            o.pages_fetched += n as u64;
            // Copy what the read asked for.
            let (lo, hi) = ((p * PS).max(offset), ((p + n as u64) * PS).min(end));
            if lo < hi {
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&data[(lo - p * PS) as usize..(hi - p * PS) as usize]);
            }
            // Store, then mark present: readers only read marked pages.
            match g.cache.write_all_at(data, p * PS) {
                Ok(()) => {
                    for q in p..p + n as u64 {
                        if q >= prefetch_from {
                            set_bit(&g.prefetched, q);
                        }
                        set_bit(&g.present, q);
                    }
                }
                Err(e) => warn!(
                    generation = g.name,
                    "memtap cannot write its cache file: {e}"
                ),
            }
            p += n as u64;
        }
    }
    if let Some(e) = failure {
        o.fetch_error = true;
        o.latency_us = t0.elapsed().as_micros() as u64;
        sh.account(&g, pid, &o);
        reply.error(Errno::EIO);
        if matches!(e, FetchError::Cancelled { .. }) && !g.lost.load(Ordering::Acquire) {
            return; // unmounting
        }
        if !g.lost.swap(true, Ordering::AcqRel) {
            g.cancel.store(true, Ordering::Release);
            error!(generation = g.name, origin = %g.origin, "memtap: origin lost: {e}");
            sh.emit(MemtapEvent::OriginLost {
                generation: g.name.clone(),
                origin: g.origin,
                reason: e.to_string(),
            });
        }
        return;
    }
    let fetched = |p: u64| runs.iter().any(|&(a, b)| (a..b).contains(&p));
    let r = g.fill(&mut buf, offset, end, fetched, &mut o);
    o.latency_us = t0.elapsed().as_micros() as u64;
    o.fetch_error = r.is_err();
    sh.account(&g, pid, &o);
    match r {
        Ok(()) => reply.data(&buf),
        Err(e) => {
            error!(generation = g.name, "memtap cache read failed: {e}");
            reply.error(Errno::EIO);
        }
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
                // SAFETY: valid C string; umount2 has no other arguments.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// Lazily unmounts `path` (root: umount2; otherwise `fusermount3 -u -z`).
fn detach_mount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: valid C string; umount2 has no other arguments.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return;
    }
    let e = io::Error::last_os_error();
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

/// Removes cache files of an earlier run.
fn clean_cache_dir(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == CACHE_SUFFIX) {
            remove_cache_file(&p);
        }
    }
    Ok(())
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

        let (jtx, jrx) = mpsc::channel();
        let (etx, erx) = mpsc::channel();
        // SAFETY: plain getters.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
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
            tgids: Mutex::new(HashMap::new()),
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
        let mut t = self.sh.table.lock().unwrap();
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
            lost: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            stats: Mutex::new(Acc::default()),
            created: SystemTime::now(),
        });
        t.by_ino.insert(ino, gen.clone());
        t.by_name.insert(g.name.clone(), (gen, 1));
        debug!(generation = g.name, origin = %g.origin, size = g.size, "memtap: generation added");
        Ok(path)
    }

    /// Drops a reference; at zero the file disappears (processes that have
    /// it open or mapped keep reading it) and its cache file is deleted.
    pub fn release_generation(&self, name: &str) {
        let mut t = self.sh.table.lock().unwrap();
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
            .unwrap()
            .get(&pid)
            .map(Acc::snapshot)
            .unwrap_or_default()
    }

    /// Forgets a process's statistics (call when a clone ends).
    pub fn forget_pid(&self, pid: u32) {
        self.sh.pid_stats.lock().unwrap().remove(&pid);
        self.sh.tgids.lock().unwrap().retain(|_, t| *t != pid);
    }

    /// Statistics of a generation that is present in the mount.
    pub fn generation_stats(&self, name: &str) -> Option<FaultStats> {
        let g = self
            .sh
            .table
            .lock()
            .unwrap()
            .by_name
            .get(name)
            .map(|(g, _)| g.clone())?;
        let s = g.stats.lock().unwrap().snapshot();
        Some(s)
    }

    /// The event stream. The first call returns the receiver that has
    /// buffered every event since the mount; a later call starts a new
    /// stream and the earlier receiver gets nothing more.
    pub fn events(&self) -> Receiver<MemtapEvent> {
        if let Some(rx) = self.sh.events_rx.lock().unwrap().take() {
            return rx;
        }
        let (tx, rx) = mpsc::channel();
        *self.sh.events_tx.lock().unwrap() = tx;
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
            let t = self.sh.table.lock().unwrap();
            for g in t.by_ino.values() {
                g.cancel.store(true, Ordering::Release);
            }
        }
        *self.sh.jobs.lock().unwrap() = None;
        let workers: Vec<_> = self.sh.workers.lock().unwrap().drain(..).collect();
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
        let t = self.sh.table.lock().unwrap();
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
