//! Clones on other hosts: a local cluster of network-namespace hosts, each
//! with its own snowflockd, memory fetched on demand through memtap from
//! the origin's page server, and the flock network spanning hosts.

use serde_json::Value;
use snowflock_tests::*;
use std::time::Duration;

fn wait_socket(h: &ClusterHost, vm: &str, sock: &str) {
    h.sh_ok(vm, &format!("i=0; while [ ! -S {sock} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ -S {sock} ]"));
}

/// Runs `sf clone` once in `vm` (the clone then waits); its ticket.
fn clone_one(h: &ClusterHost, vm: &str) -> String {
    h.sh_ok(vm, "T=$(sf ticket 1); ID=$(sf clone $T) || exit 1; if [ $ID != 0 ]; then sleep 100000; fi; echo $T")
        .trim()
        .to_string()
}

/// What clone `name` on `h` fetches while it fills 100 MiB of fresh
/// memory, and its stats afterwards. What the fill itself runs
/// (sf-memtest, the exec path) is warmed up first, so the figure is what
/// the fresh memory cost.
fn fresh_fill_fetched(h: &ClusterHost, name: &str) -> (u64, Value) {
    h.sh_ok(name, "sf-memtest hold --mib 1 --seed 1 --sock /tmp/w.sock </dev/null >/dev/null 2>&1 & echo $! > /tmp/w.pid");
    wait_socket(h, name, "/tmp/w.sock");
    h.sh_ok(
        name,
        "sf-memtest ctl --sock /tmp/w.sock verify && kill $(cat /tmp/w.pid)",
    );
    let before = h.stats(name)["bytes_fetched"].as_u64().unwrap();
    h.sh_ok(
        name,
        "sf-memtest hold --mib 100 --seed 9 --sock /tmp/fill.sock </dev/null >/dev/null 2>&1 &",
    );
    wait_socket(h, name, "/tmp/fill.sock");
    h.sh_ok(name, "sf-memtest ctl --sock /tmp/fill.sock verify");
    let after = h.stats(name);
    (after["bytes_fetched"].as_u64().unwrap() - before, after)
}

/// Each clone lands on another host, its memory comes on demand from h0,
/// writes stay private, the flock network spans the hosts, and everything
/// is reachable from any host.
#[test]
fn clones_on_other_hosts_fetch_memory_on_demand() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let c = Cluster::up(3, &[]);
    let (h0, h1, h2) = (c.host(0), c.host(1), c.host(2));
    let p = h0.start_vm("p", &img, "256M");
    assert_eq!(p["host"], "h0");
    let ticket = h0
        .sh_ok(
            "p",
            r#"echo from-parent > /tmp/state.txt
sf-memtest hold --mib 32 --seed 7 --sock /tmp/mt.sock </dev/null >/dev/null 2>&1 &
i=0; while [ ! -S /tmp/mt.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
T=$(sf ticket 2) || exit 10
ID=$(sf clone $T) || exit 11
{ cat /tmp/state.txt; sf-memtest ctl --sock /tmp/mt.sock verify; echo $ID; } > /tmp/verify.tmp 2>&1
echo "written-by-$ID" > /tmp/state.txt
mv /tmp/verify.tmp /tmp/verify.txt
echo $T"#,
        )
        .trim()
        .to_string();
    // vm list from any host shows the whole cluster, with hosts.
    for h in [h0, h1, h2] {
        let vms = h.vms();
        assert!(
            vms.iter().any(|v| v["name"] == "p" && v["host"] == "h0"),
            "{vms:?}"
        );
        let kids = clones_of(&vms, &ticket);
        assert_eq!(kids.len(), 2, "{vms:?}");
        let hosts: Vec<&str> = kids.iter().map(|k| k["host"].as_str().unwrap()).collect();
        assert_eq!(
            hosts,
            ["h1", "h2"],
            "clones are spread over the other hosts"
        );
    }
    let kids = clones_of(&h0.vms(), &ticket);
    let names: Vec<String> = kids
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_string())
        .collect();
    let subnet = p["ip"]
        .as_str()
        .unwrap()
        .trim_end_matches(".1/24")
        .to_string();
    for (i, name) in names.iter().enumerate() {
        // exec from h0 reaches a VM on another host.
        let v = wait_until(Duration::from_secs(60), || {
            let (c, o, _) = h0.sh(name, "cat /tmp/verify.txt");
            (c == 0).then_some(o)
        })
        .unwrap_or_else(|| panic!("{name} never finished its script"));
        let l: Vec<&str> = v.lines().collect();
        assert_eq!(l[0], "from-parent", "{name}: {v}");
        assert!(
            l[1].starts_with("ok 7 "),
            "{name}: memory must arrive intact: {v}"
        );
        assert_eq!(l[2], (i + 1).to_string());
        assert_eq!(
            h2.sh_ok(name, "cat /tmp/state.txt").trim(),
            format!("written-by-{}", i + 1)
        );
        let ip = h1.sh_ok(name, "ip -4 -o addr show dev eth0 | awk '{print $4}'");
        assert_eq!(ip.trim(), format!("{subnet}.{}/24", i + 2));
        // The flock network spans hosts: each clone reaches the parent and its sibling.
        for j in 1..=3 {
            h0.sh_ok(name, &format!("ping -c 1 -W 3 {subnet}.{j} >/dev/null"));
        }
        // Memory came from h0 on demand.
        let s = h0.stats(name);
        assert_eq!(s["memory"], "remote", "{s}");
        assert_eq!(s["origin"], "h0", "{s}");
        for k in [
            "faults",
            "bytes_fetched",
            "zero_pages",
            "latency_p50_us",
            "latency_p99_us",
        ] {
            assert!(s[k].is_u64(), "{k} missing: {s}");
        }
        assert!(
            s["faults"].as_u64().unwrap() > 0 && got_pages_from_origin(&s),
            "{s}"
        );
        assert!(
            s["zero_pages"].as_u64().unwrap() > 0,
            "holes must be answered locally: {s}"
        );
        assert!(
            s["latency_p50_us"].as_u64().unwrap() <= s["latency_p99_us"].as_u64().unwrap(),
            "{s}"
        );
    }
    assert_eq!(h0.sh_ok("p", "cat /tmp/state.txt").trim(), "written-by-0");
    // vm console from another host.
    let con = h1.ok(&["vm", "console", "p"]);
    assert!(!con.is_empty());
    // sf exit on another host is reported to the parent's join.
    h0.sh_ok(&names[0], "(sleep 0.2; sf exit 4) >/dev/null 2>&1 &");
    h0.sh_ok(&names[1], "(sleep 0.2; sf exit 5) >/dev/null 2>&1 &");
    let out = h0.sh_ok("p", &format!("sf join {ticket}"));
    assert!(
        out.contains("1 exited 4") && out.contains("2 exited 5"),
        "{out}"
    );
    let gone = wait_until(Duration::from_secs(20), || {
        clones_of(&h0.vms(), &ticket).is_empty().then_some(())
    });
    assert!(gone.is_some(), "clones must be gone after exit");

    // sf kill reaches other hosts; vm stop from another host stops the parent.
    let t = h0
        .sh_ok("p", "T=$(sf ticket 2); ID=$(sf clone $T) || exit 1; if [ $ID != 0 ]; then sleep 1000; fi; echo $T")
        .trim()
        .to_string();
    assert_eq!(clones_of(&h0.vms(), &t).len(), 2);
    let out = h0.sh_ok("p", &format!("sf kill {t}"));
    assert!(
        out.contains("1 killed") && out.contains("2 killed"),
        "{out}"
    );
    let gone = wait_until(Duration::from_secs(20), || {
        clones_of(&h0.vms(), &t).is_empty().then_some(())
    });
    assert!(gone.is_some());
    h2.ok(&["vm", "stop", "p"]);
    assert!(h0.vms().is_empty());
}

/// A parent that keeps writing while it is cloned: no clone ever sees a
/// page written after the clone point (the self-checking writer in every
/// VM would find a word it did not write).
#[test]
fn parent_writing_during_clone_never_leaks_into_clones() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let c = Cluster::up(3, &[]);
    let h0 = c.host(0);
    h0.start_vm("p", &img, "256M");
    h0.sh_ok(
        "p",
        "sf-memtest scribble --mib 48 --sock /tmp/sc.sock </dev/null >/tmp/sc.log 2>&1 &",
    );
    wait_socket(h0, "p", "/tmp/sc.sock");
    let t = h0
        .sh_ok("p", "sleep 1; T=$(sf ticket 2); ID=$(sf clone $T) || exit 1; sf-memtest ctl --sock /tmp/sc.sock status > /tmp/at-clone.txt; echo $T")
        .trim()
        .to_string();
    let kids = clones_of(&h0.vms(), &t);
    assert_eq!(kids.len(), 2);
    let mut all = vec!["p".to_string()];
    all.extend(kids.iter().map(|k| k["name"].as_str().unwrap().to_string()));
    for vm in &all {
        let at = h0.sh_ok(vm, "cat /tmp/at-clone.txt");
        let passes = |s: &str| -> u64 {
            s.split_whitespace()
                .find_map(|w| w.strip_prefix("passes="))
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        };
        let p0 = passes(&at);
        // Two whole passes over the buffer after the clone, all checked.
        let done = wait_until(Duration::from_secs(120), || {
            let (_, o, _) = h0.sh(vm, "sf-memtest ctl --sock /tmp/sc.sock status");
            assert!(!o.starts_with("mismatch"), "{vm}: {o}");
            (passes(&o) >= p0 + 2).then_some(o)
        });
        let out = done.unwrap_or_else(|| panic!("{vm}: writer made no progress"));
        assert!(out.starts_with("ok "), "{vm}: {out}");
    }
    h0.sh_ok("p", &format!("sf kill {t}"));
}

/// Clones that land together on a host where their flock has no link yet
/// all start: one creates the flock's bridge and VXLAN port, none trips
/// over it, and the links go with the last of them.
#[test]
fn clones_sharing_a_new_host_all_start() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let c = Cluster::up(2, &[]);
    let (h0, h1) = (c.host(0), c.host(1));
    h0.start_vm("p", &img, "256M");
    let t = h0
        .sh_ok(
            "p",
            "T=$(sf ticket 3) || exit 1; ID=$(sf clone $T) || exit 1; echo $T",
        )
        .trim()
        .to_string();
    let kids = clones_of(&h0.vms(), &t);
    assert_eq!(kids.len(), 3, "every clone runs: {kids:?}");
    let on_h1: Vec<&str> = kids
        .iter()
        .filter(|k| k["host"] == "h1")
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert!(on_h1.len() >= 2, "two clones share h1: {kids:?}");
    for k in &kids {
        let name = k["name"].as_str().unwrap();
        assert_eq!(k["state"], "running", "{k}");
        assert_eq!(h0.sh_ok(name, "echo alive").trim(), "alive", "{name}");
    }
    let killed = h0.sh_ok("p", &format!("sf kill {t}"));
    assert_eq!(killed.matches("killed").count(), 3, "{killed}");
    // h1 ran no VM of the flock before and runs none now: its links go
    // with the last clone there.
    // Link names are `s<4 hex digits>` + `b|x|t` + a number.
    let ours = |name: &str| {
        let b = name.as_bytes();
        b.len() > 6
            && b[0] == b's'
            && b[1..5].iter().all(u8::is_ascii_hexdigit)
            && matches!(b[5], b'b' | b'x' | b't')
            && b[6..].iter().all(u8::is_ascii_digit)
    };
    let left = || -> Vec<String> {
        let out = h1.netns_exec(&["ip", "-o", "link"]).stdout;
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| ours(n))
            .collect()
    };
    let gone = wait_until(Duration::from_secs(20), || left().is_empty().then_some(()));
    assert!(
        gone.is_some(),
        "links left on h1: {:?}\n{}",
        left(),
        h1.log_tail()
    );
}

/// Avoidance heuristics: memory the parent freed before the clone is not
/// fetched when a clone fills fresh memory; with free page reporting
/// switched off the same run fetches far more.
#[test]
fn avoidance_heuristics_cut_fetches() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let c = Cluster::up(2, &[]);
    let (h0, h1) = (c.host(0), c.host(1));
    let mut deltas = Vec::new();
    for (vm, reporting) in [("on", true), ("off", false)] {
        h0.start_vm(vm, &img, "384M");
        // The sysadmin's choice, applied by the agent on SIGHUP.
        h0.sh_ok(
            vm,
            &format!(
                "mkdir -p /etc/snowflock && printf '[balloon]\\nfree_page_reporting = {reporting}\\nreporting_order = 0\\n' > /etc/snowflock/agent.toml \
                 && kill -HUP $(cat /run/snowflock/agent.pid) && sleep 1"
            ),
        );
        // The parent fills 120 MiB and frees it, then clones.
        h0.sh_ok(vm, "sf-memtest hold --mib 120 --seed 3 --sock /tmp/big.sock </dev/null >/dev/null 2>&1 & echo $! > /tmp/big.pid");
        wait_socket(h0, vm, "/tmp/big.sock");
        // The guest kernel reports free pages at a limited rate (a share of
        // each free list every 2 s): with reporting on, wait until the freed
        // memory has become holes in the parent's RAM file (seen from the
        // host); with it off, give it the same chance to (not) happen.
        let ram = h0.state_dir.join("vms").join(vm).join("ram");
        let allocated = || {
            std::fs::metadata(&ram)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0)
        };
        let full = allocated();
        h0.sh_ok(vm, "kill $(cat /tmp/big.pid)");
        if reporting {
            let shrunk = wait_until(Duration::from_secs(90), || {
                (allocated() + (100 << 20) < full).then_some(())
            });
            assert!(
                shrunk.is_some(),
                "free page reporting must punch the freed memory out of the RAM file"
            );
            // Then until reporting has caught up with the rest of free memory.
            let mut last = allocated();
            let _ = wait_until(Duration::from_secs(60), || {
                std::thread::sleep(Duration::from_secs(3));
                let now = allocated();
                let stable = now + (1 << 20) >= last;
                last = now;
                stable.then_some(())
            });
        } else {
            std::thread::sleep(Duration::from_secs(10));
            assert!(
                allocated() + (50 << 20) > full,
                "with reporting off the freed memory stays"
            );
        }
        let t = clone_one(h0, vm);
        let kid = clones_of(&h1.vms(), &t);
        assert_eq!(kid.len(), 1);
        assert_eq!(kid[0]["host"], "h1");
        let name = kid[0]["name"].as_str().unwrap().to_string();
        let (delta, after) = fresh_fill_fetched(h1, &name);
        eprintln!(
            "avoidance {vm}: filling 100 MiB in the clone fetched {} KiB ({:.1} %); stats {after}",
            delta / 1024,
            delta as f64 / (100u64 << 20) as f64 * 100.0
        );
        deltas.push(delta);
        h0.sh_ok(vm, &format!("sf kill {t}"));
        h0.ok(&["vm", "stop", vm]);
    }
    assert!(
        deltas[0] < (100u64 << 20) / 20,
        "with the heuristics on, under 5 % of 100 MiB: {deltas:?}"
    );
    assert!(
        deltas[1] > 2 * deltas[0] && deltas[1] > (20u64 << 20),
        "switching them off must fetch more: {deltas:?}"
    );
}

/// The one clone of `ticket` (as its origin h0 lists it): (host index, name).
fn only_clone(c: &Cluster, ticket: &str) -> (usize, String) {
    let found = clones_of(&c.host(0).vms(), ticket);
    assert_eq!(found.len(), 1, "clones of {ticket}: {found:?}");
    let host = found[0]["host"].as_str().unwrap_or_default();
    let i = host.trim_start_matches('h').parse().expect("a host hN");
    (i, found[0]["name"].as_str().unwrap_or_default().to_string())
}

/// A clone point taken while a clone of the previous one still runs is a
/// layer over the previous one (the file it maps cannot change), served
/// to other hosts as such: each clone sees its own point's memory. Memory
/// the parent frees after a clone point (when it already runs in a new
/// QEMU on a private mapping of its frozen RAM) is still never fetched by
/// the next point's clones: the free pages it reports are logged and
/// become zero pages of the layer.
#[test]
fn avoidance_holds_after_a_clone_point() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let c = Cluster::up(2, &[]);
    let (h0, h1) = (c.host(0), c.host(1));
    let vm = "p";
    h0.start_vm(vm, &img, "384M");
    h0.sh_ok(
        vm,
        "sf-memtest hold --mib 8 --seed 2 --sock /tmp/mt.sock </dev/null >/dev/null 2>&1 &",
    );
    wait_socket(h0, vm, "/tmp/mt.sock");
    // A first clone point: the parent is handed to a new QEMU. Its clone
    // keeps running; the parent then writes a new pattern.
    let t1 = clone_one(h0, vm);
    h0.sh_ok(vm, "sf-memtest ctl --sock /tmp/mt.sock fill 5");
    // Then it fills 120 MiB and frees it.
    h0.sh_ok(vm, "sf-memtest hold --mib 120 --seed 3 --sock /tmp/big.sock </dev/null >/dev/null 2>&1 & echo $! > /tmp/big.pid");
    wait_socket(h0, vm, "/tmp/big.sock");
    h0.sh_ok(vm, "kill $(cat /tmp/big.pid)");
    // The reports QEMU could not punch (the file is the generation) are
    // logged, 16 bytes (offset, length) each.
    let dir = h0.state_dir.join("vms").join(vm);
    let logged = || -> u64 {
        std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("discards-"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .map(|b| {
                b.chunks_exact(16)
                    .map(|r| u64::from_le_bytes(r[8..].try_into().unwrap()))
                    .sum::<u64>()
            })
            .sum()
    };
    let reported = wait_until(Duration::from_secs(90), || {
        (logged() > (100 << 20)).then_some(())
    });
    assert!(
        reported.is_some(),
        "free pages reported: {} KiB",
        logged() / 1024
    );
    // Then until reporting has caught up with the rest of free memory.
    let mut last = logged();
    let _ = wait_until(Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_secs(3));
        let now = logged();
        let stable = now <= last + (1 << 20);
        last = now;
        stable.then_some(())
    });
    let t = clone_one(h0, vm);
    let (i2, name) = only_clone(&c, &t);
    assert_eq!(i2, 1, "the second point's clone is on h1");
    let gen2 = h0.state_dir.join("gens").join("p-g2");
    assert!(
        gen2.join("top").exists(),
        "the second point is a layer over the first"
    );
    // Each point's clone sees its own point's memory.
    let (i1, first) = only_clone(&c, &t1);
    for (h, name, seed) in [(c.host(i1), &first, 2), (h1, &name, 5)] {
        let out = h.sh_ok(name, "sf-memtest ctl --sock /tmp/mt.sock verify");
        assert!(out.starts_with(&format!("ok {seed} ")), "{name}: {out}");
    }
    let (delta, _) = fresh_fill_fetched(h1, &name);
    eprintln!(
        "avoidance after a clone point: filling 100 MiB fetched {} KiB ({})",
        delta / 1024,
        h0.log_tail()
            .lines()
            .filter(|l| l.contains("changes since"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        delta < (100u64 << 20) / 20,
        "under 5 % of 100 MiB: {} KiB",
        delta / 1024
    );
    h0.sh_ok(vm, &format!("sf kill {t}"));
    h0.sh_ok(vm, &format!("sf kill {t1}"));
}

/// The origin-failure setup: a 3-host cluster with a 2 s fetch timeout,
/// parent `p` on h0 holding 64 MiB, cloned twice (the clones wait).
struct Origin {
    // Declared first: the cluster goes before the image it booted.
    c: Cluster,
    _img: TestImage,
    ticket: String,
    kids: Vec<Value>,
    /// The clone placed on h1.
    on_h1: String,
}

impl Origin {
    fn up() -> Origin {
        let img = TestImage::build(&[]);
        let c = Cluster::up(3, &["--fetch-timeout-ms", "2000"]);
        let h0 = c.host(0);
        h0.start_vm("p", &img, "256M");
        let ticket = h0
            .sh_ok(
                "p",
                "sf-memtest hold --mib 64 --seed 5 --sock /tmp/mt.sock </dev/null >/dev/null 2>&1 &
                 i=0; while [ ! -S /tmp/mt.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
                 T=$(sf ticket 2); ID=$(sf clone $T) || exit 1; if [ $ID != 0 ]; then sleep 100000; fi; echo $T",
            )
            .trim()
            .to_string();
        let kids = clones_of(&h0.vms(), &ticket);
        let on_h1 = kids
            .iter()
            .find(|k| k["host"] == "h1")
            .expect("a clone on h1")["name"]
            .as_str()
            .unwrap()
            .to_string();
        Origin {
            c,
            _img: img,
            ticket,
            kids,
            on_h1,
        }
    }
}

/// The origin's page server stops answering: a clone blocked on a missing
/// page is stopped within the fetch timeout with a clear reason, the parent
/// hears it was lost, and nothing hangs.
#[test]
fn origin_failure_stops_blocked_clones_with_a_reason() {
    if !vm_prereqs() {
        return;
    }
    let o = Origin::up();
    let (h0, h1, t, kids) = (o.c.host(0), o.c.host(1), &o.ticket, &o.kids);
    let blocked = &o.on_h1;
    let origin = h0.daemon_pid().expect("h0 daemon pid");
    // Freeze the origin daemon (its page server with it).
    // A daemon this test's cluster started.
    snowflock_tests::signal(origin, libc::SIGSTOP);
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            // As above.
            snowflock_tests::signal(self.0, libc::SIGCONT);
        }
    }
    let cont = Cont(origin);
    // The clone reads 64 MiB it has not touched yet, and blocks on a page.
    // (The exec itself may be cut short: the guest freezes on the page.)
    let _ = h1.sh(
        blocked,
        "sf-memtest ctl --sock /tmp/mt.sock verify >/dev/null 2>&1 &",
    );
    let lost = wait_for_loss(h1, blocked, Duration::from_secs(30));
    let reason = lost["reason"].as_str().unwrap();
    assert!(reason.contains("memory origin"), "{reason}");
    drop(cont);
    // h1 reports the loss to h0 once h0 answers again.
    let told = wait_until(Duration::from_secs(30), || {
        let st: Value = serde_json::from_str(&h0.ok(&["daemon", "status", "--json"])).ok()?;
        (st["counters"]["clones_lost"].as_u64()? >= 1).then_some(())
    });
    assert!(told.is_some(), "the origin must hear about the lost clone");
    // The other clone may have needed a page from the frozen origin too
    // (then it is lost as well); if it survived, it exits. The parent's
    // join reports both.
    let other = kids.iter().find(|k| k["name"] != blocked.as_str()).unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let _ = h0.sh(&other, "(sleep 0.2; sf exit 0) >/dev/null 2>&1 &");
    let out = h0.sh_ok("p", &format!("sf join {t}"));
    let lost_id = kids.iter().find(|k| k["name"] == blocked.as_str()).unwrap()["clone_id"]
        .as_u64()
        .unwrap();
    assert!(
        out.contains(&format!("{lost_id} lost")),
        "the parent must hear the clone was lost: {out}"
    );
    assert!(out.contains("memory origin"), "{out}");
    let other_id = 3 - lost_id;
    assert!(
        out.contains(&format!("{other_id} exited 0")) || out.contains(&format!("{other_id} lost")),
        "{out}"
    );
    // Nothing of the clones is left on their hosts.
    let gone = wait_until(Duration::from_secs(20), || {
        clones_of(&h0.vms(), t).is_empty().then_some(())
    });
    assert!(gone.is_some(), "{:?}", h0.vms());
}

/// The origin's daemon dies (SIGKILL): its parent VM goes with it, and a
/// clone on another host that then needs a page is stopped with the reason
/// within the fetch timeout; the other hosts keep working.
#[test]
fn origin_daemon_death_stops_clones_that_need_its_memory() {
    if !vm_prereqs() {
        return;
    }
    let o = Origin::up();
    let (h0, h1, on_h1) = (o.c.host(0), o.c.host(1), &o.on_h1);
    let pid = h0.daemon_pid().expect("h0 daemon pid");
    // A daemon this test's cluster started.
    snowflock_tests::signal(pid, libc::SIGKILL);
    let _ = h1.sh(
        on_h1,
        "sf-memtest ctl --sock /tmp/mt.sock verify >/dev/null 2>&1 &",
    );
    let lost = wait_for_loss(h1, on_h1, Duration::from_secs(30));
    assert!(
        lost["reason"].as_str().unwrap().contains("memory origin"),
        "{lost}"
    );
    // h1 still works, and lists what it can reach.
    let vms = h1.run(&["vm", "list", "--json"]);
    assert!(vms.status.success());
    assert!(
        String::from_utf8_lossy(&vms.stderr).contains("h0"),
        "the dead host is named as unreachable"
    );
}
