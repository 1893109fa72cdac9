//! Memory on demand through a real FUSE mount, served by real page servers
//! (and hostile ones) on 127.0.0.1.

mod common;

use common::{is_mounted, make_generation, with_timeout};
use dom0_memtap::wire::{self, REQUEST_LEN};
use dom0_memtap::{
    freeze_generation, GenerationSpec, Memtap, MemtapConfig, MemtapEvent, PageServer, PAGE_SIZE,
};
use snowflock_proto::auth::{server_blocking, ClusterKey};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fields drop in order: the mount before the server before the files.
struct Fixture {
    memtap: Memtap,
    server: PageServer,
    mount: PathBuf,
    cache: PathBuf,
    key: Arc<ClusterKey>,
    dir: tempfile::TempDir,
}

fn fixture(prefetch: u32, fetch_timeout: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(ClusterKey::generate());
    let server = PageServer::start("127.0.0.1:0".parse().unwrap(), key.clone()).unwrap();
    let mount = dir.path().join("mnt");
    let cache = dir.path().join("cache");
    let mut cfg = MemtapConfig::new(&mount, &cache, key.clone());
    cfg.prefetch_pages = prefetch;
    cfg.fetch_timeout = fetch_timeout;
    let memtap = Memtap::mount(cfg).unwrap();
    let mount = mount.canonicalize().unwrap();
    assert!(is_mounted(&mount));
    Fixture {
        memtap,
        server,
        mount,
        cache,
        key,
        dir,
    }
}

impl Fixture {
    /// Publishes a generation on the origin and adds it to the mount.
    fn generation(&self, name: &str, seed: u8, pages: u64, holes: &[u64]) -> (PathBuf, Vec<u8>) {
        let src = self.dir.path().join(format!("{name}.src"));
        let (bytes, map) = make_generation(&src, seed, pages, holes);
        self.server.publish(name, &src).unwrap();
        let spec = GenerationSpec {
            name: name.into(),
            size: pages * PAGE_SIZE,
            holes: map,
            origin: self.server.local_addr(),
            mcast: false,
            complete: false,
        };
        (self.memtap.add_generation(spec).unwrap(), bytes)
    }

    fn finish(self) {
        let Fixture {
            memtap,
            server,
            mount,
            dir,
            ..
        } = self;
        unmount_in_time(memtap, &mount, "still mounted");
        server.shutdown();
        drop(dir);
    }
}

/// Unmounts, and checks it took under 8 s and the mount is gone.
fn unmount_in_time(memtap: Memtap, mount: &Path, still_there: &str) {
    let t = Instant::now();
    memtap.unmount();
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "unmount took {:?}",
        t.elapsed()
    );
    assert!(!is_mounted(mount), "{still_there}");
}

fn page(bytes: &[u8], p: u64) -> &[u8] {
    &bytes[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize]
}

/// Drops the kernel's page cache of a file, so the next read reaches FUSE.
fn drop_page_cache(f: &File) {
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

fn is_eio(r: std::io::Result<()>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
}

#[test]
fn reads_back_identical_through_read_and_private_mmap() {
    with_timeout(120, || {
        let fx = fixture(0, Duration::from_secs(10));
        // A guest RAM file frozen the way the daemon does it, holes included.
        let ram = fx.dir.path().join("ram");
        let pages = 64u64;
        let (ram_bytes, _) = make_generation(&ram, 9, pages, &(20..40).collect::<Vec<_>>());
        let gen_file = fx.dir.path().join("gen-a.frozen");
        let frozen = freeze_generation(&ram, &gen_file).unwrap();
        let holes = frozen.hole_pages();
        assert!(holes >= 1, "the RAM file has holes");
        fx.server.publish("gen-a", &gen_file).unwrap();
        let spec = GenerationSpec {
            name: "gen-a".into(),
            size: frozen.size,
            holes: frozen.holes.clone(),
            origin: fx.server.local_addr(),
            mcast: false,
            complete: false,
        };
        let path = fx.memtap.add_generation(spec).unwrap();
        assert_eq!(path, fx.mount.join("gen-a"));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), pages * PAGE_SIZE);

        // read(): byte-identical.
        let got = std::fs::read(&path).unwrap();
        assert!(got == ram_bytes, "read() differs from the source");
        let s = fx.memtap.generation_stats("gen-a").unwrap();
        assert_eq!(s.faults, pages, "{s:?}");
        assert_eq!(s.zero_pages, holes, "{s:?}");
        assert_eq!(s.pages_fetched, pages - holes, "{s:?}");
        assert_eq!(
            s.bytes_fetched,
            (pages - holes) * PAGE_SIZE,
            "only data pages are fetched: {s:?}"
        );
        assert_eq!((s.cache_hits, s.fetch_errors), (0, 0), "{s:?}");
        assert!(
            s.latency_p50_us > 0 && s.latency_p99_us >= s.latency_p50_us,
            "{s:?}"
        );
        assert_eq!(fx.server.stats().pages_served, pages - holes);
        let mine = fx.memtap.pid_stats(std::process::id());
        assert!(
            mine.faults >= pages && mine.pages_fetched >= pages - holes,
            "{mine:?}"
        );

        // A second reader: the page cache answers, nothing is fetched.
        let again = std::fs::read(&path).unwrap();
        assert!(again == ram_bytes);
        assert_eq!(
            fx.memtap.generation_stats("gen-a").unwrap().bytes_fetched,
            s.bytes_fetched
        );

        // Page cache dropped: memtap's own cache answers.
        let f = File::open(&path).unwrap();
        drop_page_cache(&f);
        let again = std::fs::read(&path).unwrap();
        assert!(again == ram_bytes);
        let s2 = fx.memtap.generation_stats("gen-a").unwrap();
        assert_eq!(s2.bytes_fetched, s.bytes_fetched, "{s2:?}");
        assert_eq!(s2.cache_hits, pages - holes, "{s2:?}");
        assert_eq!(s2.zero_pages, 2 * holes, "{s2:?}");

        // mmap(MAP_PRIVATE), writable, as QEMU maps it with share=off
        // (QEMU opens the file read-write).
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // SAFETY: the file is not truncated while mapped.
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&rw) }.unwrap();
        assert!(map[..] == ram_bytes[..], "private mapping differs");
        map[100] ^= 0xff;
        map[(30 * PAGE_SIZE) as usize] = 7; // a hole page
        assert!(map[..] != ram_bytes[..]);
        drop(map);
        assert!(
            std::fs::read(&path).unwrap() == ram_bytes,
            "a private write reached the file"
        );
        let mut origin = Vec::new();
        File::open(&gen_file)
            .unwrap()
            .read_to_end(&mut origin)
            .unwrap();
        assert!(origin == ram_bytes, "the origin's generation changed");

        // Writes through the file itself are refused.
        let e = rw.write_all_at(b"x", 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        let e = rw.set_len(PAGE_SIZE).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        // SAFETY: plain syscall on a valid descriptor.
        let r = unsafe { libc::fallocate(rw.as_raw_fd(), 0, 0, 4096) };
        assert_eq!(
            (r, std::io::Error::last_os_error().raw_os_error()),
            (-1, Some(libc::EOPNOTSUPP))
        );
        drop((rw, f));
        fx.finish();
    });
}

#[test]
fn one_page_fault_is_one_page_read_and_prefetch_fills_the_cache() {
    with_timeout(120, || {
        let fx = fixture(4, Duration::from_secs(10));
        let (path, bytes) = fx.generation("gen-b", 2, 32, &[12]);
        let f = File::open(&path).unwrap();
        // SAFETY: the file is not truncated while mapped.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&f) }.unwrap();
        // One page touched: one 4 KiB FUSE read (no kernel readahead), and
        // memtap prefetches the 4 following pages in the same request.
        assert_eq!(map[(8 * PAGE_SIZE) as usize + 5], page(&bytes, 8)[5]);
        let s = fx.memtap.generation_stats("gen-b").unwrap();
        assert_eq!(s.faults, 1, "{s:?}");
        assert_eq!(s.pages_fetched, 4, "prefetch stops at the hole: {s:?}");
        assert_eq!(fx.server.stats().requests, 1);
        // Pages 9..=11 come from memtap's cache as prefetch hits; 12 is a
        // hole; 13 is fetched with 4 more.
        for p in 9..=13 {
            assert!(
                &map[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize] == page(&bytes, p),
                "page {p}"
            );
        }
        let s = fx.memtap.generation_stats("gen-b").unwrap();
        assert_eq!(s.faults, 6, "{s:?}");
        assert_eq!(
            (s.cache_hits, s.prefetch_hits, s.zero_pages),
            (3, 3, 1),
            "{s:?}"
        );
        assert_eq!(s.pages_fetched, 9, "{s:?}");
        assert_eq!(fx.server.stats().requests, 2);
        // Reads at any offset and size, including the end of the file.
        let mut b = vec![0u8; 10000];
        f.read_exact_at(&mut b, 3 * PAGE_SIZE + 100).unwrap();
        assert!(b[..] == bytes[(3 * PAGE_SIZE + 100) as usize..(3 * PAGE_SIZE + 10100) as usize]);
        let size = 32 * PAGE_SIZE;
        let mut tail = vec![0u8; 100];
        let n = f.read_at(&mut tail, size - 10).unwrap();
        assert_eq!(n, 10);
        assert!(tail[..10] == bytes[(size - 10) as usize..]);
        assert_eq!(f.read_at(&mut tail, size + 5).unwrap(), 0);
        // The directory lists the generation.
        let names: Vec<_> = std::fs::read_dir(&fx.mount)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["gen-b".to_string()]);
        drop((map, f));
        fx.finish();
    });
}

#[test]
fn generations_are_refcounted_and_released() {
    with_timeout(120, || {
        let fx = fixture(0, Duration::from_secs(10));
        let (path, bytes) = fx.generation("gen-c", 4, 8, &[]);
        assert!(std::fs::read(&path).unwrap() == bytes);
        let spec = GenerationSpec {
            name: "gen-c".into(),
            size: 8 * PAGE_SIZE,
            holes: bitvec::bitvec![u64, bitvec::order::Lsb0; 0; 8],
            origin: fx.server.local_addr(),
            mcast: false,
            complete: false,
        };
        assert_eq!(fx.memtap.add_generation(spec.clone()).unwrap(), path);
        let other = GenerationSpec {
            size: 16 * PAGE_SIZE,
            holes: bitvec::bitvec![u64, bitvec::order::Lsb0; 0; 16],
            ..spec.clone()
        };
        assert!(
            fx.memtap.add_generation(other).is_err(),
            "same name, different generation"
        );
        for bad in ["", "..", "a/b", "x y"] {
            assert!(
                fx.memtap
                    .add_generation(GenerationSpec {
                        name: bad.into(),
                        ..spec.clone()
                    })
                    .is_err(),
                "{bad:?}"
            );
        }
        assert!(fx
            .memtap
            .add_generation(GenerationSpec {
                size: 4097,
                ..spec.clone()
            })
            .is_err());
        let cache_files = || std::fs::read_dir(&fx.cache).unwrap().count();
        assert_eq!(cache_files(), 1);

        // An open file outlives the release.
        let held = File::open(&path).unwrap();
        fx.memtap.release_generation("gen-c");
        assert!(path.exists(), "one reference left");
        fx.memtap.release_generation("gen-c");
        assert!(fx.memtap.generation_stats("gen-c").is_none());
        assert_eq!(cache_files(), 0, "cache file deleted");
        assert!(
            std::fs::read_dir(&fx.mount).unwrap().next().is_none(),
            "listed after release"
        );
        let t = Instant::now();
        while path.exists() {
            // The kernel may cache the name for up to its 1 s entry TTL.
            assert!(t.elapsed() < Duration::from_secs(3), "file still visible");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut b = vec![0u8; PAGE_SIZE as usize];
        drop_page_cache(&held);
        held.read_exact_at(&mut b, 2 * PAGE_SIZE).unwrap();
        assert!(b == page(&bytes, 2));
        drop(held);

        // The name can be used again, for different content.
        let (path2, bytes2) = fx.generation("gen-c", 5, 8, &[1]);
        assert_eq!(path2, path);
        assert!(std::fs::read(&path2).unwrap() == bytes2);
        fx.finish();
    });
}

#[test]
fn a_wrong_cluster_key_gets_no_data() {
    with_timeout(120, || {
        let fx = fixture(0, Duration::from_secs(1));
        // This origin holds a different key than the mount.
        let other = PageServer::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(ClusterKey::generate()),
        )
        .unwrap();
        let src = fx.dir.path().join("src");
        let (_, map) = make_generation(&src, 1, 4, &[]);
        other.publish("gen-k", &src).unwrap();
        let spec = GenerationSpec {
            name: "gen-k".into(),
            size: 4 * PAGE_SIZE,
            holes: map,
            origin: other.local_addr(),
            mcast: false,
            complete: false,
        };
        let events = fx.memtap.events();
        let path = fx.memtap.add_generation(spec).unwrap();
        let f = File::open(&path).unwrap();
        let mut b = vec![0u8; 4096];
        assert!(is_eio(f.read_exact_at(&mut b, 0)));
        assert!(b.iter().all(|&x| x == 0));
        let st = other.stats();
        assert!(st.auth_failures >= 1 && st.pages_served == 0, "{st:?}");
        match events.recv_timeout(Duration::from_secs(5)).unwrap() {
            MemtapEvent::OriginLost {
                generation, reason, ..
            } => {
                assert_eq!(generation, "gen-k");
                assert!(reason.contains("wrong key"), "{reason}");
            }
        }
        drop(f);
        other.shutdown();
        fx.finish();
    });
}

/// How a hostile page server misbehaves after authenticating.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Header OK, half the data, then close.
    ShortClose,
    /// Header OK, half the data, then nothing more.
    ShortStall,
    /// Data for pages that were not asked for.
    WrongPages,
    /// An undefined status.
    BadStatus,
    /// Bytes that are no reply header at all.
    Garbage,
    /// Reads the request, never answers.
    Stall,
    /// Closes the connection after the request.
    Close,
    /// Authenticates with another key.
    WrongKey,
}

struct Hostile {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sleep_until_stopped(stop: &AtomicBool, max: Duration) {
    let t = Instant::now();
    while !stop.load(Ordering::SeqCst) && t.elapsed() < max {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hostile_conn(mut s: TcpStream, mode: Mode, key: &ClusterKey, stop: &AtomicBool) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let k = if mode == Mode::WrongKey {
        ClusterKey::generate()
    } else {
        key.clone()
    };
    if server_blocking(&mut s, &k).is_err() {
        return;
    }
    let mut req = [0u8; REQUEST_LEN];
    if s.read_exact(&mut req).is_err() {
        return;
    }
    let r = wire::decode_request(&req).unwrap();
    let data = vec![0xEEu8; wire::data_len(r.count)];
    let ok = wire::encode_reply(wire::Status::Ok, r.first, r.count);
    let _ = match mode {
        Mode::ShortClose => s
            .write_all(&ok)
            .and_then(|_| s.write_all(&data[..data.len() / 2])),
        Mode::ShortStall => {
            let _ = s
                .write_all(&ok)
                .and_then(|_| s.write_all(&data[..data.len() / 2]));
            sleep_until_stopped(stop, Duration::from_secs(30));
            Ok(())
        }
        Mode::WrongPages => s
            .write_all(&wire::encode_reply(wire::Status::Ok, r.first + 1, r.count))
            .and_then(|_| s.write_all(&data)),
        Mode::BadStatus => {
            let mut h = ok;
            h[4] = 77;
            s.write_all(&h)
        }
        Mode::Garbage => s.write_all(&[0xAB; 4096 + 24]),
        Mode::Stall => {
            sleep_until_stopped(stop, Duration::from_secs(30));
            Ok(())
        }
        Mode::Close | Mode::WrongKey => Ok(()),
    };
}

fn hostile(mode: Mode, key: Arc<ClusterKey>) -> Hostile {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !st.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let (k, st) = (key.clone(), st.clone());
                    conns.push(std::thread::spawn(move || hostile_conn(s, mode, &k, &st)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    });
    Hostile {
        addr,
        stop,
        thread: Some(thread),
    }
}

fn add_hostile(fx: &Fixture, name: &str, origin: SocketAddr) -> PathBuf {
    let spec = GenerationSpec {
        name: name.into(),
        size: 8 * PAGE_SIZE,
        holes: bitvec::bitvec![u64, bitvec::order::Lsb0; 0; 8],
        origin,
        mcast: false,
        complete: false,
    };
    fx.memtap.add_generation(spec).unwrap()
}

#[test]
fn hostile_page_servers_cause_eio_and_origin_lost_but_never_bad_data() {
    with_timeout(180, || {
        let timeout = Duration::from_secs(1);
        let fx = fixture(0, timeout);
        let events = fx.memtap.events();
        let (good_path, good_bytes) = fx.generation("good", 7, 16, &[3]);
        let modes = [
            Mode::ShortClose,
            Mode::ShortStall,
            Mode::WrongPages,
            Mode::BadStatus,
            Mode::Garbage,
            Mode::Stall,
            Mode::Close,
            Mode::WrongKey,
        ];
        let servers: Vec<Hostile> = modes.iter().map(|&m| hostile(m, fx.key.clone())).collect();
        let paths: Vec<PathBuf> = modes
            .iter()
            .zip(&servers)
            .map(|(m, h)| add_hostile(&fx, &format!("bad-{m:?}"), h.addr))
            .collect();

        // All hostile reads at once, while the good generation keeps working.
        let readers: Vec<_> = paths
            .iter()
            .map(|p| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let f = File::open(&p).unwrap();
                    let mut b = vec![0u8; 4096];
                    let t = Instant::now();
                    let r = f.read_exact_at(&mut b, 2 * PAGE_SIZE);
                    (r, t.elapsed(), b)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        assert!(std::fs::read(&good_path).unwrap() == good_bytes);
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "good reads waited for bad ones: {:?}",
            t.elapsed()
        );
        for (m, r) in modes.iter().zip(readers) {
            let (r, took, b) = r.join().unwrap();
            assert!(is_eio(r), "{m:?}: not EIO");
            assert!(
                took >= timeout / 2 && took < timeout + Duration::from_secs(3),
                "{m:?}: took {took:?}"
            );
            assert!(
                b.iter().all(|&x| x == 0),
                "{m:?}: hostile bytes reached the reader"
            );
        }
        let mut lost: Vec<String> = Vec::new();
        while lost.len() < modes.len() {
            match events
                .recv_timeout(Duration::from_secs(5))
                .expect("an OriginLost per generation")
            {
                MemtapEvent::OriginLost {
                    generation, reason, ..
                } => {
                    assert!(!reason.is_empty());
                    assert!(!lost.contains(&generation), "{generation} lost twice");
                    lost.push(generation);
                }
            }
        }
        // Lost generations fail fast now, and no second event comes.
        for (m, p) in modes.iter().zip(&paths) {
            let f = File::open(p).unwrap();
            let mut b = vec![0u8; 4096];
            let t = Instant::now();
            assert!(is_eio(f.read_exact_at(&mut b, 5 * PAGE_SIZE)), "{m:?}");
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "{m:?}: {:?}",
                t.elapsed()
            );
            let s = fx.memtap.generation_stats(&format!("bad-{m:?}")).unwrap();
            // The kernel retries a failed page read once: 2 to 4 FUSE reads.
            assert!((2..=4).contains(&s.fetch_errors), "{m:?}: {s:?}");
            assert_eq!((s.pages_fetched, s.cache_hits), (0, 0), "{m:?}: {s:?}");
        }
        assert!(events.recv_timeout(Duration::from_millis(200)).is_err());
        // The good generation is still served, also from the network.
        let (p2, b2) = fx.generation("good-2", 8, 4, &[]);
        assert!(std::fs::read(&p2).unwrap() == b2);
        drop(servers);
        fx.finish();
    });
}

#[test]
fn unmount_does_not_hang_on_an_open_file() {
    with_timeout(120, || {
        let fx = fixture(0, Duration::from_secs(10));
        let (path, bytes) = fx.generation("gen-open", 6, 4, &[]);
        let f = File::open(&path).unwrap();
        let mut b = vec![0u8; PAGE_SIZE as usize];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b == page(&bytes, 0));
        let Fixture {
            memtap,
            server,
            mount,
            dir,
            ..
        } = fx;
        unmount_in_time(memtap, &mount, "not detached");
        // The open file still reads what the page cache holds.
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b == page(&bytes, 0));
        drop(f);
        server.shutdown();
        drop(dir);
    });
}

/// A measurement, not a check: `cargo test --release -p dom0-memtap --test
/// memtap measure -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_fault_latency() {
    with_timeout(300, || {
        let fx = fixture(0, Duration::from_secs(10));
        let pages = 8192;
        let (path, bytes) = fx.generation("gen-m", 1, pages, &[]);
        let f = File::open(&path).unwrap();
        // SAFETY: the file is not truncated while mapped.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&f) }.unwrap();
        let t = Instant::now();
        let mut sum = 0u64;
        for p in 0..pages {
            sum += map[(p * PAGE_SIZE) as usize] as u64;
        }
        let el = t.elapsed();
        assert_eq!(
            sum,
            (0..pages)
                .map(|p| bytes[(p * PAGE_SIZE) as usize] as u64)
                .sum::<u64>()
        );
        let s = fx.memtap.generation_stats("gen-m").unwrap();
        eprintln!(
            "{pages} faults in {el:?} ({:?}/fault): {s:?}",
            el / pages as u32
        );
        drop(map);
        drop_page_cache(&f);
        // SAFETY: as above.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&f) }.unwrap();
        let t = Instant::now();
        let mut again = 0u64;
        for p in 0..pages {
            again += map[(p * PAGE_SIZE) as usize] as u64;
        }
        let el = t.elapsed();
        assert_eq!(again, sum);
        let s2 = fx.memtap.generation_stats("gen-m").unwrap();
        eprintln!(
            "cached: {pages} faults in {el:?} ({:?}/fault): {s2:?}",
            el / pages as u32
        );
        drop((map, f));
        fx.finish();
    });
}
