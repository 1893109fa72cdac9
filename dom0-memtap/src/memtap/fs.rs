//! The FUSE callbacks ([`MemtapFs`]): a flat, read-only directory of
//! generation files. Reads of cached and hole pages are answered here, on
//! the FUSE thread; reads that need the network go to the fetch threads
//! (`fetch.rs`). Writes and namespace changes fail with EROFS.
//!
//! May import: `state.rs`, `generation.rs`, `fetch.rs`,
//! [`crate::stats`], the crate root.

use super::fetch::dispatch;
use super::generation::Gen;
use super::state::{Job, Shared};
use crate::stats::ReadOutcome;
use crate::PAGE_SIZE as PS;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::{error, warn};

/// How long the kernel caches a file's attributes (they never change).
const ATTR_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long the kernel caches a name (names are reused after a release).
const ENTRY_TTL: Duration = Duration::from_secs(1);

pub(super) struct MemtapFs {
    pub(super) sh: Arc<Shared>,
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
        self.sh.table.lock().by_ino.get(&ino.0).cloned()
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
        let g = name.to_str().and_then(|n| self.sh.table.lock().visible(n));
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
        let mut t = self.sh.table.lock();
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
        let mut t = self.sh.table.lock();
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
            let t = self.sh.table.lock();
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
        let end = (offset + size as u64).min(g.size);
        let (first, last) = (offset / PS, (end - 1) / PS);
        if let Some(t) = &self.sh.tracer {
            t.record(&g, pid, first, last);
        }
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
