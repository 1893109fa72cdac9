//! mcdist without VMs: a real page server multicasting over loopback to
//! two real memtap mounts ("hosts") joined to the generation's group, in
//! this process. The VM tests on namespaces (tests/mcdist.rs at the
//! workspace root) cover real clones, loss and reordering.

mod common;

use common::{make_generation, with_timeout};
use dom0_memtap::mcast::{self, McastConfig, McastKey, DATAGRAM_LEN};
use dom0_memtap::{GenerationSpec, Memtap, MemtapConfig, PageServer, ServerConfig, PAGE_SIZE};
use snowflock_proto::auth::ClusterKey;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A port of this test process: test binaries may run side by side.
fn port() -> u16 {
    30000 + (std::process::id() % 20000) as u16
}

fn mcast_cfg() -> McastConfig {
    McastConfig {
        port: port(),
        iface: Some(LO),
        max_rate: 512 << 20,
    }
}

struct Host {
    memtap: Memtap,
    file: PathBuf,
}

/// Fields drop in order: hosts (mounts) before the server before files.
struct Flock {
    hosts: Vec<Host>,
    server: PageServer,
    bytes: Vec<u8>,
    key: Arc<ClusterKey>,
    name: String,
    _dir: tempfile::TempDir,
}

/// A generation of `pages` pages published by a multicasting page server
/// and added to `hosts` memtap mounts, each joined to its group.
fn flock(
    name: &str,
    pages: u64,
    hosts: usize,
    tune: impl Fn(usize, &mut MemtapConfig),
    complete: &[bool],
) -> Flock {
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(ClusterKey::generate());
    let server = PageServer::start_with(
        "127.0.0.1:0".parse().unwrap(),
        key.clone(),
        ServerConfig {
            mcast: Some(mcast_cfg()),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let src = dir.path().join("gen");
    let (bytes, holes) = make_generation(&src, 3, pages, &[5, 6]);
    server.publish(name, &src).unwrap();
    let hosts = (0..hosts)
        .map(|i| {
            let mut cfg = MemtapConfig::new(
                dir.path().join(format!("mnt{i}")),
                dir.path().join(format!("cache{i}")),
                key.clone(),
            );
            cfg.mcast = Some(mcast_cfg());
            tune(i, &mut cfg);
            let memtap = Memtap::mount(cfg).unwrap();
            let file = memtap
                .add_generation(GenerationSpec {
                    name: name.into(),
                    size: pages * PAGE_SIZE,
                    holes: holes.clone(),
                    origin: server.local_addr(),
                    mcast: true,
                    complete: complete.get(i).copied().unwrap_or(false),
                })
                .unwrap();
            Host { memtap, file }
        })
        .collect();
    Flock {
        hosts,
        server,
        bytes,
        key,
        name: name.into(),
        _dir: dir,
    }
}

impl Flock {
    /// Reads page `p` through host `h`'s mount and checks it.
    fn read(&self, h: usize, p: u64) {
        let f = File::open(&self.hosts[h].file).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        f.read_exact_at(&mut buf, p * PAGE_SIZE).unwrap();
        let want = &self.bytes[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize];
        assert!(buf == want, "host {h} page {p}: wrong content");
    }

    fn stats(&self, h: usize) -> dom0_memtap::FaultStats {
        self.hosts[h].memtap.generation_stats(&self.name).unwrap()
    }
}

/// Waits until `f` holds, at most `secs`.
fn eventually(secs: u64, what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pages_one_host_fetches_reach_the_other_by_multicast() {
    with_timeout(120, || {
        let f = flock("mc-a", 256, 2, |_, _| {}, &[]);
        // Both hosts ask once, so the origin knows two members.
        f.read(0, 0);
        f.read(1, 1);
        for p in 10..200 {
            f.read(0, p);
        }
        eventually(10, "host 1 received host 0's pages", || {
            f.stats(1).mcast_pages >= 150
        });
        let before = f.stats(1).pages_fetched;
        for p in 10..200 {
            f.read(1, p);
        }
        let s1 = f.stats(1);
        assert!(
            s1.pages_fetched - before < 40,
            "host 1 fetched {} of 190 pages itself",
            s1.pages_fetched - before
        );
        assert!(s1.prefetch_hits >= 150, "{s1:?}");
        assert_eq!(s1.mcast_dropped, 0);
        let srv = f.server.stats();
        assert!(srv.mcast_datagrams >= 150, "{srv:?}");
    });
}

#[test]
fn forged_and_corrupted_datagrams_are_dropped_and_counted() {
    with_timeout(120, || {
        let f = flock("mc-b", 64, 1, |_, _| {}, &[]);
        f.read(0, 0);
        let group = (mcast::group_of("mc-b"), port());
        let tx = mcast::sender(Some(LO)).unwrap();
        let key = McastKey::new(&f.key);
        let evil = [0xEEu8; PAGE_SIZE as usize];
        let mut d = [0u8; DATAGRAM_LEN];
        // A wrong MAC (another cluster's key).
        let other = McastKey::new(&ClusterKey::generate());
        mcast::seal(&other, "mc-b", 9, 0, &evil, &mut d);
        tx.send_to(&d, group).unwrap();
        // Corrupted after sealing.
        mcast::seal(&key, "mc-b", 9, 0, &evil, &mut d);
        d[200] ^= 0x40;
        tx.send_to(&d, group).unwrap();
        // Truncated.
        mcast::seal(&key, "mc-b", 9, 0, &evil, &mut d);
        tx.send_to(&d[..DATAGRAM_LEN - 7], group).unwrap();
        // Right key, another generation's name.
        mcast::seal(&key, "mc-other", 9, 0, &evil, &mut d);
        tx.send_to(&d, group).unwrap();
        // Right key, an offset past the end, and a hole.
        mcast::seal(&key, "mc-b", 64, 0, &evil, &mut d);
        tx.send_to(&d, group).unwrap();
        mcast::seal(&key, "mc-b", 5, 0, &evil, &mut d);
        tx.send_to(&d, group).unwrap();
        eventually(10, "six datagrams dropped", || {
            f.stats(0).mcast_dropped == 6
        });
        assert_eq!(f.stats(0).mcast_pages, 0);
        // The page the forgeries named reads right, and so does the hole.
        f.read(0, 9);
        f.read(0, 5);
    });
}

#[test]
fn background_completion_makes_hosts_independent_of_the_origin() {
    with_timeout(120, || {
        let mut f = flock(
            "mc-c",
            512,
            2,
            |_, c| c.completion_rate = 2 << 20,
            &[true, false],
        );
        f.read(1, 0); // host 1 is a member too
        eventually(30, "host 0 holds the whole generation", || {
            f.hosts[0]
                .memtap
                .generation_progress("mc-c")
                .unwrap()
                .complete()
        });
        let p1 = f.hosts[1].memtap.generation_progress("mc-c").unwrap();
        assert!(p1.held > 100, "host 1 got little of host 0's sweep: {p1:?}");
        // The origin goes away: host 0 reads everything from its cache.
        f.server.withdraw("mc-c");
        for p in 0..512 {
            f.read(0, p);
        }
        assert_eq!(f.stats(0).fetch_errors, 0);
        let h1 = f.hosts.pop().unwrap();
        drop(h1);
    });
}

#[test]
fn the_cache_bound_holds_and_pages_stay_right() {
    with_timeout(120, || {
        let f = flock(
            "mc-d",
            128,
            2,
            |i, c| {
                if i == 1 {
                    c.cache_limit = Some(16 * PAGE_SIZE);
                }
            },
            &[],
        );
        f.read(0, 0);
        for p in 0..128 {
            f.read(1, p);
        }
        // Host 0's fetches multicast to host 1 too; none may pass its bound.
        for p in 0..128 {
            f.read(0, p);
        }
        let held = f.hosts[1].memtap.generation_progress("mc-d").unwrap().held;
        assert!(held <= 16, "held {held} pages past a bound of 16");
        // Pages beyond the bound are read again from the origin, and right.
        for p in (0..128).rev() {
            let file = File::open(&f.hosts[1].file).unwrap();
            // Past the kernel's page cache: each read reaches memtap.
            drop_page_cache(&file).unwrap();
            f.read(1, p);
        }
        let cache: u64 = std::fs::read_dir(
            f.hosts[1]
                .memtap
                .mount_point()
                .parent()
                .unwrap()
                .join("cache1"),
        )
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum();
        assert!(
            cache <= 16 * PAGE_SIZE + 64 * 1024,
            "cache file takes {cache} bytes"
        );
    });
}

fn drop_page_cache(f: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

#[test]
fn hosts_reading_in_lockstep_all_read_right_and_one_of_them_deaf_too() {
    with_timeout(120, || {
        // Host 2 listens on another port: the group never reaches it, so
        // every page the origin coalesces for it is lost and asked again.
        let f = Arc::new(flock(
            "mc-e",
            1024,
            3,
            |i, c| {
                if i == 2 {
                    c.mcast.as_mut().unwrap().port = port() + 1;
                }
            },
            &[],
        ));
        let readers: Vec<_> = (0..3)
            .map(|h| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for p in 0..1024 {
                        f.read(h, p);
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        let s2 = f.stats(2);
        assert_eq!(s2.mcast_pages, 0);
        assert_eq!(s2.coalesced, s2.rerequests, "{s2:?}");
        let total: u64 = (0..3).map(|h| f.stats(h).pages_fetched).sum();
        eprintln!(
            "lockstep: fetched {total} pages for 3 x 1022, coalesced {:?}, server {:?}",
            (0..3).map(|h| f.stats(h).coalesced).collect::<Vec<_>>(),
            f.server.stats()
        );
    });
}
