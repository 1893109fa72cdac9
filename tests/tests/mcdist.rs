//! mcdist with real clones: a local cluster of five namespace hosts, h0 the
//! origin and h1-h4 clone hosts, clones of one parent reading the same
//! memory at once while multicast datagrams are dropped (nftables
//! `numgen random`), replayed out of order, forged and corrupted; a host
//! that misses the whole burst; background completion against a stopped
//! page server.
//!
//! This kernel has no `sch_netem`, so reordering is made by a replayer in
//! h3's namespace: it joins the generation's group, records the datagrams
//! and sends them all again in shuffled order, late.

use serde_json::Value;
use snowflock_tests::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {v}"))
}

/// Loads an nftables script into host `h`'s namespace.
fn nft(h: &ClusterHost, script: &str) {
    let mut c = Command::new("ip")
        .args(["netns", "exec", &h.netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run nft");
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "nft on {}: {script}", h.name);
}

/// Drops `pct` % of the multicast page datagrams reaching `h` (counted).
fn drop_mcast(h: &ClusterHost, pct: u32) {
    let when = if pct >= 100 {
        String::new()
    } else {
        format!("numgen random mod 100 < {pct} ")
    };
    nft(
        h,
        &format!(
            "table inet sfloss {{\n chain in {{\n  type filter hook input priority 0;\n  udp dport 7404 {when}counter drop\n }}\n}}\n"
        ),
    );
}

fn undrop(h: &ClusterHost) {
    nft(h, "delete table inet sfloss");
}

/// Packets the `sfloss` table of `h` dropped.
fn dropped(h: &ClusterHost) -> u64 {
    let o = h.netns_exec(&["nft", "list", "table", "inet", "sfloss"]);
    let t = String::from_utf8_lossy(&o.stdout);
    t.split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {t}"))
}

/// The generations `h`'s memtap holds, from its cache files
/// (`<name>.<inode>.memtap-cache`; the mount itself lives in the daemon's
/// mount namespace).
fn generations(h: &ClusterHost) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(h.state_dir.join("memcache"))
        .map(|d| {
            d.filter_map(|e| {
                let f = e.ok()?.file_name().into_string().ok()?;
                let stem = f.strip_suffix(".memtap-cache")?;
                Some(stem.rsplit_once('.')?.0.to_string())
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Python, run in a host's namespace: the group of a generation (the same
/// FNV-1a hash as `dom0_memtap::mcast::group_of`), sealing datagrams with
/// the cluster key, sending to the group from the host's address.
const PY_COMMON: &str = r#"
import hmac, hashlib, os, random, socket, struct, sys, time
def group_of(name):
    h = 0x811c9dc5
    for b in name.encode():
        h ^= b
        h = (h * 0x01000193) & 0xffffffff
    return socket.inet_ntoa(struct.pack(">I", 0xefc00000 | (h & 0x3ffff)))
def subkey(k):
    return hmac.new(k, b"snowflock subkey:mcdist page datagram v1", hashlib.sha256).digest()
def seal(sk, name, page, data):
    n = name.encode()
    body = b"SFPM" + struct.pack("<HH", 1, len(n)) + n.ljust(64, b"\0") + struct.pack("<QQ", page, 0) + data
    return body + hmac.new(sk, body, hashlib.sha256).digest()
def sender(ip):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ip))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    return s
"#;

/// For `secs`: records the group's datagrams for a second and a half at a
/// time, then sends that batch again in shuffled order (so late, reordered
/// copies mix with the fresh ones); prints how many it sent.
const PY_REPLAY: &str = r#"
name, ip, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
g = group_of(name)
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
r.bind((g, 7404))
r.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(g) + socket.inet_aton(ip))
r.settimeout(0.2)
s = sender(ip)
sent, end = 0, time.time() + secs
while time.time() < end:
    got, batch = [], time.time() + 1.5
    while time.time() < batch:
        try:
            got.append(r.recv(8192))
        except socket.timeout:
            pass
    random.shuffle(got)
    for d in got:
        s.sendto(d, (g, 7404))
    sent += len(got)
print(sent, flush=True)
"#;

/// Sends six bad datagrams for generation `name`: random bytes, another
/// cluster's MAC, corrupted after sealing, truncated, (right key) another
/// generation's name, (right key) a page past the end.
const PY_FORGE: &str = r#"
name, ip, keyfile, pages = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sk = subkey(bytes.fromhex(open(keyfile).read().strip()))
g = (group_of(name), 7404)
s = sender(ip)
page = b"\xee" * 4096
s.sendto(os.urandom(4216), g)
s.sendto(seal(subkey(os.urandom(32)), name, 10, page), g)
d = bytearray(seal(sk, name, 10, page)); d[300] ^= 1; s.sendto(bytes(d), g)
s.sendto(seal(sk, name, 10, page)[:4000], g)
s.sendto(seal(sk, name + "x", 10, page), g)
s.sendto(seal(sk, name, pages + 5, page), g)
print("sent 6", flush=True)
"#;

fn python(h: &ClusterHost, script: &str, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &h.netns, "python3", "-c"])
        .arg(format!("{PY_COMMON}\n{script}"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3")
}

/// Ends a helper this test started (by its pid) when dropped.
struct Reap(Child);

impl Reap {
    /// Waits for the helper to end; its output.
    fn output(mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut o) = self.0.stdout.take() {
            let _ = o.read_to_string(&mut s);
        }
        let _ = self.0.wait();
        s
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `sf-memtest ctl verify` in every clone at once; each must say `ok`.
fn verify_all(h0: &ClusterHost, kids: &[String], seed: u32) {
    std::thread::scope(|s| {
        let runs: Vec<_> = kids
            .iter()
            .map(|k| {
                s.spawn(move || {
                    let (c, o, e) = h0.sh(k, "sf-memtest ctl --sock /tmp/mt.sock verify");
                    (k, c, o, e)
                })
            })
            .collect();
        for r in runs {
            let (k, c, o, e) = r.join().unwrap();
            assert!(
                c == 0 && o.starts_with(&format!("ok {seed} ")),
                "{k}: memory check failed ({c}): {o} {e}"
            );
        }
    });
}

/// Boots `p` on `h0` holding `mib` MiB of pattern `seed`, its
/// `sf-memtest` listening on /tmp/mt.sock (for [`verify_all`]).
fn parent_holding(h0: &ClusterHost, img: &TestImage, mib: u32, seed: u32) {
    h0.start_vm("p", img, "256M");
    h0.sh_ok(
        "p",
        &format!(
            "sf-memtest hold --mib {mib} --seed {seed} --sock /tmp/mt.sock </dev/null >/dev/null 2>&1 &
             i=0; while [ ! -S /tmp/mt.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; [ -S /tmp/mt.sock ]"
        ),
    );
}

/// Clones `p` with a ticket of `sf ticket TICKET_ARGS` (the clones sleep
/// after the clone); the ticket, and the clones' names by host.
fn clone_flock(h0: &ClusterHost, ticket_args: &str) -> (String, Vec<(String, String)>) {
    let t = h0
        .sh_ok(
            "p",
            &format!("T=$(sf ticket {ticket_args}) || exit 1; ID=$(sf clone $T) || exit 2; if [ $ID != 0 ]; then sleep 100000; fi; echo $T"),
        )
        .trim()
        .to_string();
    let mut kids: Vec<(String, String)> = clones_of(&h0.vms(), &t)
        .iter()
        .map(|k| {
            (
                k["host"].as_str().unwrap().to_string(),
                k["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    kids.sort();
    (t, kids)
}

#[test]
fn clones_on_four_hosts_stay_right_under_loss_reordering_and_forgery() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let c = Cluster::up(5, &["--fetch-timeout-ms", "3000"]);
    let h: Vec<&ClusterHost> = (0..5).map(|i| c.host(i)).collect();
    parent_holding(h[0], &img, 96, 7);
    // h1, h2 lose 5 % of the datagrams; h4 loses all of them (it misses
    // the whole burst); h3 gets everything, and the replayed copies.
    drop_mcast(h[1], 5);
    drop_mcast(h[2], 5);
    drop_mcast(h[4], 100);
    let (t, kids) = clone_flock(h[0], "4");
    let hosts: Vec<&str> = kids.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(hosts, ["h1", "h2", "h3", "h4"], "one clone per clone host");
    let names: Vec<String> = kids.iter().map(|(_, n)| n.clone()).collect();
    let gens = generations(h[3]);
    assert_eq!(gens.len(), 1, "{gens:?}");
    let gen = gens[0].clone();
    let replay = Reap(python(h[3], PY_REPLAY, &[&gen, &h[3].ip, "25"]));

    // All four read the parent's 96 MiB at once.
    verify_all(h[0], &names, 7);
    for i in [1, 2] {
        assert!(dropped(h[i]) > 0, "h{i}: no datagram was dropped");
    }
    let s: Vec<Value> = (1..=4).map(|i| h[i].stats(&names[i - 1])).collect();
    for (i, v) in s.iter().enumerate() {
        eprintln!(
            "h{}: fetched {} B, mcast pages {}, coalesced {}, re-requests {}, dropped datagrams {}",
            i + 1,
            n(v, "bytes_fetched"),
            n(v, "mcast_pages"),
            n(v, "coalesced"),
            n(v, "rerequests"),
            n(v, "mcast_dropped")
        );
        assert_eq!(n(v, "fetch_errors"), 0, "{v}");
    }
    assert!(
        n(&s[0], "mcast_pages") + n(&s[1], "mcast_pages") + n(&s[2], "mcast_pages") > 0,
        "no page came by multicast: {s:?}"
    );
    assert!(dropped(h[4]) > 0, "h4 never saw the burst");
    assert_eq!(n(&s[3], "mcast_pages"), 0, "h4 dropped every datagram");

    let out = replay.output();
    let resent: u64 = out.trim().parse().unwrap_or(0);
    eprintln!("replayed {resent} datagrams, shuffled and late");
    assert!(resent > 0, "the replayer saw no datagram");
    undrop(h[4]);

    // Forged and corrupted datagrams, sent from h4: h3 drops all six.
    let before = n(&h[3].stats(&names[2]), "mcast_dropped");
    let key = c.config_dir().join("key");
    let pages = (256u64 << 20) / 4096;
    let mut f = python(
        h[4],
        PY_FORGE,
        &[&gen, &h[4].ip, key.to_str().unwrap(), &pages.to_string()],
    );
    assert!(f.wait().unwrap().success());
    let counted = wait_until(Duration::from_secs(10), || {
        let d = n(&h[3].stats(&names[2]), "mcast_dropped");
        (d >= before + 6).then_some(d)
    });
    assert_eq!(
        counted,
        Some(before + 6),
        "h3 must drop and count exactly the six forged datagrams"
    );
    verify_all(h[0], &names, 7);
    let out = h[0].sh_ok("p", &format!("sf kill {t}"));
    assert!(out.matches("killed").count() == 4, "{out}");
}

#[test]
fn background_completion_frees_clones_from_their_origin() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let c = Cluster::up(5, &["--fetch-timeout-ms", "3000"]);
    let h: Vec<&ClusterHost> = (0..5).map(|i| c.host(i)).collect();
    parent_holding(h[0], &img, 96, 3);
    let page_server = std::fs::read_to_string(c.config_dir().join("h0").join("host.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix("page_server")?.split('"').nth(1)?;
            v.rsplit(':').next()?.parse::<u16>().ok()
        })
        .expect("page_server port in h0's host.toml");
    let stop_pages = |on: bool| {
        if on {
            nft(h[0], &format!("table inet sfstop {{\n chain in {{\n  type filter hook input priority 0;\n  tcp dport {page_server} drop\n }}\n}}\n"));
        } else {
            nft(h[0], "delete table inet sfstop");
        }
    };

    // With completion: every clone host comes to hold the whole
    // generation, then the page server stops answering, and the clones
    // still read all of the parent's memory.
    let (t, kids) = clone_flock(h[0], "--independent 4");
    let names: Vec<String> = kids.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(kids.len(), 4);
    for (host, name) in &kids {
        let hi = c.host_named(host);
        let done = wait_until(Duration::from_secs(180), || {
            let v = hi.stats(name);
            v["independent"].as_bool().unwrap_or(false).then_some(v)
        });
        let v = done.unwrap_or_else(|| {
            panic!(
                "{name} on {host} never became independent: {}",
                hi.stats(name)
            )
        });
        assert!(
            (v["completion"].as_f64().unwrap() - 1.0).abs() < 1e-9,
            "{v}"
        );
    }
    stop_pages(true);
    verify_all(h[0], &names, 3);
    for (host, name) in &kids {
        let hi = c.host_named(host);
        assert_eq!(n(&hi.stats(name), "fetch_errors"), 0);
    }
    stop_pages(false);
    h[0].sh_ok("p", &format!("sf kill {t}"));

    // Without completion the same stop is an origin loss, as before.
    let (_t2, kids) = clone_flock(h[0], "1");
    let (host, name) = &kids[0];
    let hi = c.host_named(host);
    stop_pages(true);
    let _ = hi.sh(
        name,
        "sf-memtest ctl --sock /tmp/mt.sock verify >/dev/null 2>&1 &",
    );
    let lost = wait_for_loss(hi, name, Duration::from_secs(60));
    assert!(
        lost["reason"].as_str().unwrap().contains("memory origin"),
        "{lost}"
    );
    stop_pages(false);
}

/// With `--mcast off` nothing is multicast and clones work as before.
#[test]
fn with_multicast_off_the_cluster_is_unicast_only() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let c = Cluster::up(3, &["--mcast", "off"]);
    let h0 = c.host(0);
    parent_holding(h0, &img, 32, 4);
    let (_t, kids) = clone_flock(h0, "2");
    let names: Vec<String> = kids.iter().map(|(_, n)| n.clone()).collect();
    verify_all(h0, &names, 4);
    for (host, name) in &kids {
        let hi = c.host_named(host);
        let v = hi.stats(name);
        for k in ["mcast_pages", "mcast_dropped", "coalesced", "rerequests"] {
            assert_eq!(n(&v, k), 0, "{k} with multicast off: {v}");
        }
        assert!(n(&v, "bytes_fetched") > 0, "{v}");
    }
    let toml = std::fs::read_to_string(c.config_dir().join("h0").join("host.toml")).unwrap();
    assert!(toml.contains("mcast = false"), "{toml}");
}
