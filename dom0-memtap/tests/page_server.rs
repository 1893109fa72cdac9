//! The page server over real TCP on 127.0.0.1.

mod common;

use common::{make_generation, with_timeout};
use dom0_memtap::client::{FetchError, OriginClient};
use dom0_memtap::wire::{self, Status, REPLY_LEN, REQUEST_LEN};
use dom0_memtap::{PageServer, ServerConfig, PAGE_SIZE};
use snowflock_proto::auth::{client_blocking, AuthError, ClusterKey};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGES: u64 = 40;

struct Fixture {
    server: PageServer,
    key: Arc<ClusterKey>,
    expect: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn fixture(cfg: ServerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gen");
    let (expect, _) = make_generation(&path, 3, PAGES, &[5, 6, 30]);
    let key = Arc::new(ClusterKey::generate());
    let server = PageServer::start_with("127.0.0.1:0".parse().unwrap(), key.clone(), cfg).unwrap();
    server.publish("gen-1", &path).unwrap();
    Fixture {
        server,
        key,
        expect,
        _dir: dir,
    }
}

fn quick() -> ServerConfig {
    ServerConfig {
        request_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        handshake_timeout: Duration::from_millis(600),
        ..ServerConfig::default()
    }
}

/// An authenticated raw connection.
fn raw(addr: SocketAddr, key: &ClusterKey) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client_blocking(&mut s, key).unwrap();
    s
}

fn reply(s: &mut TcpStream) -> wire::Reply {
    let mut h = [0u8; REPLY_LEN];
    s.read_exact(&mut h).unwrap();
    wire::decode_reply(&h).expect("a reply header")
}

/// Whether the server closed `s` (EOF within 5 s).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn fetch(f: &Fixture, first: u64, count: u32) -> Result<Vec<u8>, FetchError> {
    let c = OriginClient::new(f.server.local_addr(), f.key.clone());
    let mut buf = vec![0u8; (count as u64 * PAGE_SIZE) as usize];
    c.fetch(
        "gen-1",
        first,
        count,
        &mut buf,
        Instant::now() + Duration::from_secs(5),
        &AtomicBool::new(false),
    )?;
    Ok(buf)
}

fn check_good(f: &Fixture) {
    let got = fetch(f, 3, 10).unwrap();
    assert!(
        got == f.expect[(3 * PAGE_SIZE) as usize..(13 * PAGE_SIZE) as usize],
        "wrong bytes"
    );
}

#[test]
fn serves_the_published_bytes() {
    with_timeout(60, || {
        let f = fixture(ServerConfig::default());
        let all = fetch(&f, 0, PAGES as u32).unwrap();
        assert!(all == f.expect);
        check_good(&f);
        let one = fetch(&f, PAGES - 1, 1).unwrap();
        assert!(one == f.expect[((PAGES - 1) * PAGE_SIZE) as usize..]);
        // Many requests on one connection.
        let mut s = raw(f.server.local_addr(), &f.key);
        for p in 0..PAGES {
            s.write_all(&wire::encode_request("gen-1", p, 1)).unwrap();
            let r = reply(&mut s);
            assert_eq!((r.status, r.first, r.count), (Status::Ok, p, 1));
            let mut page = vec![0u8; PAGE_SIZE as usize];
            s.read_exact(&mut page).unwrap();
            assert!(page == f.expect[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize]);
        }
        let st = f.server.stats();
        assert_eq!(st.pages_served, 2 * PAGES + 10 + 1);
        assert_eq!(st.bytes_served, st.pages_served * PAGE_SIZE);
        assert_eq!((st.auth_failures, st.malformed_requests), (0, 0));
        assert!(st.requests >= PAGES + 3);
        f.server.shutdown();
    });
}

#[test]
fn a_layered_generation_is_served_as_base_plus_layer() {
    with_timeout(60, || {
        let mut f = fixture(ServerConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let base = f._dir.path().join("gen");
        // The layer: pages 4-5 changed (page 5 was a hole in the base),
        // page 7 freed (a zero page: a hole in the top, set in the map).
        let top = std::fs::File::create(dir.path().join(dom0_memtap::TOP)).unwrap();
        top.set_len(PAGES * PAGE_SIZE).unwrap();
        use std::os::unix::fs::FileExt;
        top.write_all_at(&vec![0xab; 2 * PAGE_SIZE as usize], 4 * PAGE_SIZE)
            .unwrap();
        let mut map = bitvec::bitvec![u64, bitvec::order::Lsb0; 0; PAGES as usize];
        map[4..6].fill(true);
        map.set(7, true);
        dom0_memtap::save_map(&dir.path().join(dom0_memtap::TOP_MAP), &map).unwrap();
        let layer = dom0_memtap::Layer::open(dir.path(), PAGES as usize)
            .unwrap()
            .unwrap();
        f.server
            .publish_layered("gen-1", &base, Some(layer))
            .unwrap();
        let page = PAGE_SIZE as usize;
        f.expect[4 * page..6 * page].fill(0xab);
        f.expect[7 * page..8 * page].fill(0);
        assert!(fetch(&f, 0, PAGES as u32).unwrap() == f.expect);
        assert!(fetch(&f, 5, 3).unwrap() == f.expect[5 * page..8 * page]);
        check_good(&f);
        f.server.shutdown();
    });
}

#[test]
fn a_wrong_key_gets_nothing() {
    with_timeout(60, || {
        let f = fixture(ServerConfig::default());
        let other = ClusterKey::generate();
        let mut s = TcpStream::connect(f.server.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let e = client_blocking(&mut s, &other).unwrap_err();
        assert!(matches!(e, AuthError::Rejected), "{e:?}");
        // Requests after a failed handshake are not answered.
        let _ = s.write_all(&wire::encode_request("gen-1", 0, 1));
        assert!(closed(&mut s));
        // The page client retries until its deadline, then fails.
        let c = OriginClient::new(f.server.local_addr(), Arc::new(other));
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let t = Instant::now();
        let e = c
            .fetch(
                "gen-1",
                0,
                1,
                &mut buf,
                Instant::now() + Duration::from_millis(500),
                &AtomicBool::new(false),
            )
            .unwrap_err();
        assert!(
            matches!(e, FetchError::Timeout { .. }) && e.to_string().contains("wrong key"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(buf.iter().all(|&b| b == 0));
        assert!(
            f.server.stats().auth_failures >= 2,
            "{:?}",
            f.server.stats()
        );
        assert_eq!(f.server.stats().pages_served, 0);
        // Garbage instead of a handshake response.
        let mut s = TcpStream::connect(f.server.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 40];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&[0x55; 64]).unwrap();
        let mut confirm = [0u8; 33];
        s.read_exact(&mut confirm).unwrap();
        assert_eq!(confirm, [0u8; 33], "a rejection");
        assert!(closed(&mut s));
        check_good(&f);
    });
}

#[test]
fn bad_requests_get_an_error_or_a_close_and_others_are_still_served() {
    with_timeout(60, || {
        let f = fixture(quick());
        let addr = f.server.local_addr();
        let k = f.key.clone();
        // Malformed: an error reply, then the connection is closed.
        let mut garbage = [0u8; REQUEST_LEN];
        for (i, b) in garbage.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        let mut bad_magic = wire::encode_request("gen-1", 0, 1);
        bad_magic[0] = b'X';
        let mut bad_version = wire::encode_request("gen-1", 0, 1);
        bad_version[4] = 9;
        let mut padded = wire::encode_request("gen-1", 0, 1);
        padded[8 + 20] = b'z';
        let mut slash = wire::encode_request("gen-1", 0, 1);
        slash[8..8 + 5].copy_from_slice(b"gen/1");
        let mut dots = wire::encode_request("gen-1", 0, 1);
        dots[8..8 + 5].copy_from_slice(b"../..");
        let mut long_name = wire::encode_request("gen-1", 0, 1);
        long_name[6] = 65;
        let malformed: Vec<(&str, [u8; REQUEST_LEN])> = vec![
            ("garbage", garbage),
            ("bad magic", bad_magic),
            ("bad version", bad_version),
            ("count 0", wire::encode_request("gen-1", 0, 0)),
            ("count 257", wire::encode_request("gen-1", 0, 257)),
            ("huge count", wire::encode_request("gen-1", 0, u32::MAX)),
            ("name with /", slash),
            ("name with ..", dots),
            ("name too long", long_name),
            ("junk after the name", padded),
        ];
        for (i, (what, req)) in malformed.iter().enumerate() {
            let mut s = raw(addr, &k);
            s.write_all(req).unwrap();
            let r = reply(&mut s);
            assert_eq!(r.status, Status::Malformed, "{what}");
            assert!(closed(&mut s), "{what}: connection left open");
            assert_eq!(f.server.stats().malformed_requests, i as u64 + 1, "{what}");
            check_good(&f);
        }
        // Well-formed but unanswerable: an error reply, the connection stays.
        let mut s = raw(addr, &k);
        for (what, req, status) in [
            (
                "unknown generation",
                wire::encode_request("gen-2", 0, 1),
                Status::UnknownGeneration,
            ),
            (
                "past the end",
                wire::encode_request("gen-1", PAGES, 1),
                Status::OutOfRange,
            ),
            (
                "straddling the end",
                wire::encode_request("gen-1", PAGES - 1, 2),
                Status::OutOfRange,
            ),
            (
                "overflowing",
                wire::encode_request("gen-1", u64::MAX, 1),
                Status::OutOfRange,
            ),
        ] {
            s.write_all(&req).unwrap();
            assert_eq!(reply(&mut s).status, status, "{what}");
        }
        s.write_all(&wire::encode_request("gen-1", 1, 1)).unwrap();
        assert_eq!(reply(&mut s).status, Status::Ok);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        s.read_exact(&mut page).unwrap();
        assert!(page == f.expect[PAGE_SIZE as usize..2 * PAGE_SIZE as usize]);
        drop(s);

        // Half a header, then a stall: closed after the request timeout.
        let mut s = raw(addr, &k);
        s.write_all(&wire::encode_request("gen-1", 0, 1)[..40])
            .unwrap();
        let t = Instant::now();
        assert!(closed(&mut s));
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        check_good(&f);

        // An idle connection: closed after the idle timeout.
        let mut s = raw(addr, &k);
        let t = Instant::now();
        assert!(closed(&mut s));
        assert!(t.elapsed() >= Duration::from_millis(400) && t.elapsed() < Duration::from_secs(3));

        // No handshake at all.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 40];
        s.read_exact(&mut hello).unwrap();
        assert!(closed(&mut s));
        check_good(&f);
    });
}

#[test]
fn withdrawn_generations_are_refused() {
    with_timeout(60, || {
        let f = fixture(ServerConfig::default());
        check_good(&f);
        f.server.withdraw("gen-1");
        let e = fetch(&f, 0, 1).unwrap_err();
        assert!(matches!(e, FetchError::UnknownGeneration { .. }), "{e}");
        let mut s = raw(f.server.local_addr(), &f.key);
        s.write_all(&wire::encode_request("gen-1", 0, 1)).unwrap();
        assert_eq!(reply(&mut s).status, Status::UnknownGeneration);
        // Paths are never served, only published names.
        assert!(f
            .server
            .publish("../etc", std::path::Path::new("/etc/hostname"))
            .is_err());
        assert!(f
            .server
            .publish("x/y", std::path::Path::new("/etc/hostname"))
            .is_err());
    });
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    with_timeout(60, || {
        let f = fixture(ServerConfig {
            max_connections: 2,
            ..ServerConfig::default()
        });
        let addr = f.server.local_addr();
        let a = raw(addr, &f.key);
        let b = raw(addr, &f.key);
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let e = client_blocking(&mut c, &f.key).unwrap_err();
        assert!(matches!(e, AuthError::ClosedByServer), "{e:?}");
        assert_eq!(f.server.stats().refused_connections, 1);
        drop((a, b));
        // Slots free up once those connections are gone.
        let t = Instant::now();
        loop {
            if fetch(&f, 0, 1).is_ok() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10));
        }
    });
}

#[test]
fn shutdown_closes_connections_promptly() {
    with_timeout(60, || {
        let f = fixture(ServerConfig::default());
        let mut s = raw(f.server.local_addr(), &f.key);
        let addr = f.server.local_addr();
        let t = Instant::now();
        f.server.shutdown();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(closed(&mut s));
        assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
    });
}
