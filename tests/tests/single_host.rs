//! Single-host VM fork, end to end, with real VMs.

use serde_json::Value;
use snowflock_tests::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Compiles the guest-side C test programs.
fn guest_programs(dir: &Path) -> (PathBuf, PathBuf) {
    let capi = dir.join("capi_test");
    let st = Command::new("gcc")
        .arg("-O1")
        .arg("-o")
        .arg(&capi)
        .arg(repo().join("tests/guest/capi_test.c"))
        .arg("-I")
        .arg(repo().join("guest-agent/include"))
        .arg("-L")
        .arg(bin_dir())
        .args(["-lsnowflock", "-Wl,-rpath,/usr/lib"])
        .status()
        .expect("gcc");
    assert!(st.success(), "cannot build capi_test");
    let hostile = dir.join("hostile");
    let st = Command::new("gcc")
        .args(["-O1", "-static", "-o"])
        .arg(&hostile)
        .arg(repo().join("tests/guest/hostile.c"))
        .status()
        .expect("gcc");
    assert!(st.success(), "cannot build hostile");
    (capi, hostile)
}

fn image() -> (TestImage, tempfile::TempDir) {
    let progs = tempfile::tempdir().unwrap();
    let (capi, hostile) = guest_programs(progs.path());
    let img = TestImage::build(&[(&capi, "/bin/capi_test"), (&hostile, "/bin/hostile")]);
    (img, progs)
}

fn vm_gone(h: &Daemon, name: &str, pid: u32) -> bool {
    wait_until(Duration::from_secs(20), || {
        (!h.vms().iter().any(|v| v["name"] == name) && !pid_alive(pid)).then_some(())
    })
    .is_some()
}

const STATEFUL: &str = r#"
MARK=var-$$-kept
echo hello-from-parent > /tmp/state.txt
sf-memtest hold --mib 32 --seed 42 --sock /tmp/mt.sock </dev/null >/tmp/mt.log 2>&1 &
i=0; while [ ! -S /tmp/mt.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
sf-memtest ctl --sock /tmp/mt.sock verify >/dev/null || exit 9
T=$(sf ticket 2) || exit 10
ID=$(sf clone $T) || exit 11
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > /tmp/rng-first.txt
echo "$ID" > /tmp/id.txt
{ echo "mark=$MARK"; cat /tmp/state.txt; sf-memtest ctl --sock /tmp/mt.sock verify; } > /tmp/verify.txt 2>&1
echo "written-by-$ID" > /tmp/state.txt
sf-memtest ctl --sock /tmp/mt.sock fill $((100 + ID)) >/dev/null
echo done > /tmp/done.txt
echo "$T"
"#;

// The RNG line is the first /dev/urandom read after `sf clone` returned:
// without a reseed every VM would continue the parent's CRNG stream.
const IDENTITY: &str = "hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; \
    ip -4 -o addr show dev eth0 | awk '{print $4}'; cat /tmp/rng-first.txt; echo; date +%s";

#[test]
fn clone_is_stateful_private_networked_and_distinct() {
    if !vm_prereqs() {
        return;
    }
    let (img, _progs) = image();
    let h = Host::start("h0");
    stateful_private_networked_and_distinct(&h, &img, None);
}

/// The same behaviour with the clones on other hosts of a 3-host cluster:
/// memory on demand, the flock network over VXLAN, exec and list from the
/// parent's host.
#[test]
fn clone_on_other_hosts_is_stateful_private_networked_and_distinct() {
    if !vm_prereqs() {
        return;
    }
    let (img, _progs) = image();
    let c = Cluster::up(3, &[]);
    stateful_private_networked_and_distinct(c.host(0), &img, Some(&["h1", "h2"]));
}

/// `remote`: the hosts the two clones must land on (cluster mode).
fn stateful_private_networked_and_distinct(h: &Daemon, img: &TestImage, remote: Option<&[&str]>) {
    let p = h.start_vm("p", img, "256M");
    assert_eq!(p["clone_id"], 0);
    let parent_ip = p["ip"]
        .as_str()
        .unwrap()
        .trim_end_matches("/24")
        .to_string();

    // The script continues in every VM from the line after `sf clone`.
    let ticket = h.sh_ok("p", STATEFUL).trim().to_string();
    assert!(ticket.starts_with("t-"), "{ticket}");
    let clones = clones_of(&h.vms(), &ticket);
    assert_eq!(clones.len(), 2, "{clones:?}");
    let names: Vec<String> = clones
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    for (i, c) in clones.iter().enumerate() {
        assert_eq!(c["clone_id"], i as u64 + 1);
        assert_eq!(c["state"], "running");
        assert_eq!(c["parent"], "p");
        if let Some(hosts) = remote {
            assert_eq!(c["host"], hosts[i], "clone {i} placement");
        }
    }

    let all: Vec<(String, u64)> = std::iter::once(("p".to_string(), 0))
        .chain(names.iter().cloned().zip([1, 2]))
        .collect();
    let mut marks = HashSet::new();
    let mut idents = Vec::new();
    for (vm, id) in &all {
        let done = wait_until(Duration::from_secs(60), || {
            let (c, o, _) = h.sh(vm, "cat /tmp/done.txt");
            (c == 0 && o.trim() == "done").then_some(())
        });
        assert!(done.is_some(), "{vm} never finished the script");
        let verify = h.sh_ok(vm, "cat /tmp/verify.txt; cat /tmp/id.txt");
        let lines: Vec<&str> = verify.lines().collect();
        assert!(lines[0].starts_with("mark=var-"), "{vm}: {verify}");
        marks.insert(lines[0].to_string());
        assert_eq!(
            lines[1], "hello-from-parent",
            "{vm}: tmpfs file must be inherited"
        );
        assert!(
            lines[2].starts_with("ok 42 "),
            "{vm}: 32 MiB pattern must be inherited: {verify}"
        );
        assert_eq!(
            lines[3],
            id.to_string(),
            "{vm}: sf clone must return the clone id"
        );
        // Writes after the clone are private to each VM.
        assert_eq!(
            h.sh_ok(vm, "cat /tmp/state.txt").trim(),
            format!("written-by-{id}")
        );
        let mem = h.sh_ok(vm, "sf-memtest ctl --sock /tmp/mt.sock verify");
        assert!(mem.starts_with(&format!("ok {} ", 100 + id)), "{vm}: {mem}");
        idents.push(h.sh_ok(vm, IDENTITY));
    }
    assert_eq!(
        marks.len(),
        1,
        "shell variable must be the same in every VM: {marks:?}"
    );

    // Identity: hostname, machine-id, MAC and RNG output all distinct; IP by
    // clone ID; clock corrected.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let fields: Vec<Vec<&str>> = idents.iter().map(|s| s.lines().collect()).collect();
    for f in 0..5 {
        let set: HashSet<&str> = fields.iter().map(|l| l[f]).collect();
        assert_eq!(
            set.len(),
            3,
            "field {f} not distinct across VMs: {idents:?}"
        );
    }
    let subnet = parent_ip.rsplit_once('.').unwrap().0.to_string();
    for (i, l) in fields.iter().enumerate() {
        assert_eq!(l[3], format!("{subnet}.{}/24", i + 1), "IP of clone {i}");
        let t: i64 = l[5].parse().unwrap();
        assert!(
            (t - now).abs() < 30,
            "clock of clone {i} is off: {t} vs {now}"
        );
    }

    // The flock network: everyone reaches everyone.
    for (vm, _) in &all {
        for j in 1..=3 {
            h.sh_ok(vm, &format!("ping -c 1 -W 3 {subnet}.{j} >/dev/null"));
        }
    }
    // A second flock cannot reach the first, even with an address in its subnet.
    let q = h.start_vm("q", img, "128M");
    assert_ne!(q["ip"], p["ip"]);
    let (code, _, _) = h.sh(
        "q",
        &format!("ip addr add {subnet}.200/24 dev eth0 && ping -c 2 -W 2 {parent_ip}"),
    );
    assert_ne!(code, 0, "flocks must be isolated");
    // And q cannot use p's ticket.
    let (code, _, err) = h.sh("q", &format!("sf clone {ticket}"));
    assert_eq!(code, 1);
    assert!(err.contains("belongs to another VM"), "{err}");

    // sf exit ends a clone and its QEMU.
    let c1_pid = clones[0]["pid"].as_u64().unwrap() as u32;
    let _ = h.sh(&names[0], "sf exit 3");
    assert!(
        vm_gone(h, &names[0], c1_pid),
        "clone 1 must be gone after sf exit"
    );
    // sf kill ends the rest at once and reports both.
    let c2_pid = clones[1]["pid"].as_u64().unwrap() as u32;
    let killed = h.sh_ok("p", &format!("sf kill {ticket}"));
    assert!(killed.contains("1 exited 3"), "{killed}");
    assert!(killed.contains("2 killed"), "{killed}");
    assert!(vm_gone(h, &names[1], c2_pid));
    let (code, _, err) = h.sh("p", &format!("sf clone {ticket}"));
    assert_eq!(code, 1);
    assert!(err.contains("discarded"), "{err}");

    // The C API: two clones exit with 41 and 42, the parent joins them.
    let out = h.sh_ok("p", "capi_test");
    assert!(out.contains("granted=2 children=2"), "{out}");
    assert!(
        out.contains("child 1 state 1 code 41") && out.contains("child 2 state 1 code 42"),
        "{out}"
    );
    assert!(out.contains("bogus: "), "{out}");

    let status: Value = serde_json::from_str(&h.ok(&["daemon", "status", "--json"])).unwrap();
    if remote.is_none() {
        assert_eq!(status["counters"]["clones_started"], 4, "{status}");
    }
    assert_eq!(status["counters"]["clone_failures"], 0, "{status}");
    // A `vm exec` client that goes away takes its guest process with it.
    let mut client = h
        .cli()
        .args(["vm", "exec", "p", "--", "sleep", "777"])
        .spawn()
        .unwrap();
    let started = wait_until(Duration::from_secs(20), || {
        h.sh("p", "ps | grep -v grep | grep -q 'sleep 777'")
            .0
            .eq(&0)
            .then_some(())
    });
    assert!(started.is_some());
    client.kill().unwrap();
    client.wait().unwrap();
    let gone = wait_until(Duration::from_secs(20), || {
        h.sh("p", "ps | grep -v grep | grep -q 'sleep 777'")
            .0
            .eq(&1)
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "guest process must end with its exec client"
    );

    // The parent kept running through all of it.
    let pv: Vec<Value> = h.vms().into_iter().filter(|v| v["name"] == "p").collect();
    assert_eq!(pv[0]["state"], "running");
    assert_eq!(h.sh_ok("p", "cat /tmp/state.txt").trim(), "written-by-0");

    // vm exec forwards stdin, both output streams and the exit code.
    let mut c = h
        .cli()
        .args([
            "vm",
            "exec",
            "p",
            "--",
            "sh",
            "-c",
            "cat; echo to-stderr >&2; exit 7",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(b"through stdin\n").unwrap();
    }
    let o = c.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "through stdin\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("to-stderr"));

    // vm stop of a parent takes its clones; other flocks stay.
    let t = h
        .sh_ok("p", "T=$(sf ticket 2); ID=$(sf clone $T) || exit 1; if [ $ID != 0 ]; then sleep 1000; fi; echo $T")
        .trim()
        .to_string();
    assert_eq!(clones_of(&h.vms(), &t).len(), 2);
    h.ok(&["vm", "stop", "p"]);
    let names: Vec<Value> = h.vms().iter().map(|v| v["name"].clone()).collect();
    assert_eq!(names, vec![Value::from("q")]);
}

#[test]
fn join_reports_exits_and_lost_children_and_bad_tickets_harm_nothing() {
    if !vm_prereqs() {
        return;
    }
    let (img, _progs) = image();
    let h = Host::start("h0");
    join_exits_lost_and_bad_tickets(&h, &img);
}

/// The same with the clones on other hosts of a 3-host cluster: their ends
/// reach the parent's join, and a parent that dies takes them along.
#[test]
fn join_on_other_hosts_reports_exits_and_lost_children_and_bad_tickets_harm_nothing() {
    if !vm_prereqs() {
        return;
    }
    let (img, _progs) = image();
    let c = Cluster::up(3, &[]);
    join_exits_lost_and_bad_tickets(c.host(0), &img);
}

fn join_exits_lost_and_bad_tickets(h: &Daemon, img: &TestImage) {
    h.start_vm("p", img, "192M");

    // join waits for every child and reports each status.
    let out = h.sh_ok(
        "p",
        "T=$(sf ticket 2); ID=$(sf clone $T) || exit 1; if [ $ID != 0 ]; then sf exit $((ID + 4)); fi; sf join $T",
    );
    assert!(
        out.contains("1 exited 5") && out.contains("2 exited 6"),
        "{out}"
    );

    // A child that dies is reported lost, not waited for forever.
    let t3 = h
        .sh_ok("p", "T=$(sf ticket 1); ID=$(sf clone $T) || exit 1; if [ $ID != 0 ]; then sleep 1000; fi; echo $T")
        .trim()
        .to_string();
    let c = clones_of(&h.vms(), &t3);
    assert_eq!(c.len(), 1);
    // A used ticket cannot clone again.
    let (code, _, err) = h.sh("p", &format!("sf clone {t3}"));
    assert_eq!(code, 1);
    assert!(err.contains("already used"), "{err}");
    let pid = c[0]["pid"].as_u64().unwrap() as i32;
    // The clone's QEMU, started by this test's daemon.
    snowflock_tests::signal(pid as u32, libc::SIGKILL);
    let out = h.sh_ok("p", &format!("sf join {t3}"));
    assert!(out.contains("1 lost"), "{out}");

    // Unknown and malformed tickets.
    let (code, _, err) = h.sh("p", "sf clone t-0123456789abcdef");
    assert_eq!(code, 1);
    assert!(err.contains("Unknown ticket"), "{err}");
    let (code, _, err) = h.sh("p", "sf clone bogus");
    assert_eq!(code, 1);
    assert!(err.contains("Malformed ticket"), "{err}");
    let (code, _, err) = h.sh("p", "sf exit 0");
    assert_eq!(code, 1, "sf exit in the parent must be refused");
    assert!(err.contains("sf_exit is for clones"), "{err}");

    // A hostile client on the agent socket.
    assert!(h.sh_ok("p", "hostile").contains("hostile-ok"));

    // Garbage on the virtio-serial channel from a guest that killed its
    // agent. Init respawns the agent at once, so the writer kills it again
    // until it wins the port (only one opener at a time).
    h.sh_ok(
        "p",
        r#"cat > /tmp/junk.sh <<'EOF'
for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name)" = org.snowflock.agent ] && dev=/dev/$(basename $p); done
i=0
while [ $i -lt 100 ]; do
  kill -9 $(pidof snowflock-agent) 2>/dev/null
  if printf 'junk\n{"t":"request"}\n\377\376\n' 2>/dev/null > $dev; then touch /tmp/junk-done; exit 0; fi
  i=$((i+1)); sleep 0.05
done
EOF
setsid sh /tmp/junk.sh </dev/null >/dev/null 2>&1 &"#,
    );
    let back = wait_until(Duration::from_secs(60), || {
        let (c, o, _) = h.sh("p", "cat /tmp/junk-done && sf id");
        (c == 0 && o.contains("clone_id=0")).then_some(())
    });
    assert!(
        back.is_some(),
        "junk must be written and the agent must come back"
    );
    let counted = wait_until(Duration::from_secs(20), || {
        let status: Value = serde_json::from_str(&h.ok(&["daemon", "status", "--json"])).ok()?;
        (status["counters"]["malformed_guest_lines"].as_u64()? >= 1).then_some(())
    });
    assert!(
        counted.is_some(),
        "the daemon must have seen and dropped the junk"
    );
    // And cloning still works.
    let out = h.sh_ok("p", "T=$(sf ticket 1); ID=$(sf clone $T) || exit 1; if [ $ID != 0 ]; then sf exit 0; fi; sf join $T");
    assert!(out.contains("1 exited 0"), "{out}");

    // One guest cannot reserve the whole host with unused tickets.
    let (code, out, err) = h.sh("p", "T=$(sf ticket 200) && echo $T && sf ticket 1");
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("granted 32 of 200") && err.contains("unused clone slots"),
        "{err}"
    );
    let big = out.trim();
    h.sh_ok("p", &format!("sf kill {big}"));
    h.sh_ok("p", "sf ticket 1");

    // A parent that dies on its own takes its clones with it.
    let t = h
        .sh_ok("p", "T=$(sf ticket 1); ID=$(sf clone $T) || exit 1; if [ $ID != 0 ]; then sleep 1000; fi; echo $T")
        .trim()
        .to_string();
    assert_eq!(clones_of(&h.vms(), &t).len(), 1);
    let ppid = h.vms().iter().find(|v| v["name"] == "p").unwrap()["pid"]
        .as_u64()
        .unwrap() as i32;
    // The parent's QEMU, started by this test's daemon.
    snowflock_tests::signal(ppid as u32, libc::SIGKILL);
    let empty = wait_until(Duration::from_secs(30), || h.vms().is_empty().then_some(()));
    assert!(
        empty.is_some(),
        "clones must not outlive their parent: {:?}",
        h.vms()
    );
}

#[test]
fn cli_errors_are_clear() {
    if !vm_prereqs() {
        return;
    }
    // No daemon.
    let o = Command::new(bin("snowflock"))
        .args(["--socket", "/tmp/no-such-snowflock.sock", "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("daemon is not running"), "{err}");

    let h = Host::start("h0");
    // Incomplete image directory.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"\x7fELF").unwrap();
    let o = h.run(&["vm", "start", "x", "--image", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("incomplete"), "{err}");
    // Bad names and sizes.
    let o = h.run(&[
        "vm",
        "start",
        "../x",
        "--image",
        dir.path().to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Invalid VM name"));
    let o = h.run(&[
        "vm",
        "start",
        "x",
        "--image",
        "/nonexistent",
        "--mem",
        "lots",
    ]);
    assert_eq!(o.status.code(), Some(2));
    // Unknown VM.
    let o = h.run(&["vm", "exec", "nope", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("No VM named \"nope\""));
    // The daemon survives a malformed admin request.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&h.socket).unwrap();
        s.write_all(&8u32.to_le_bytes()).unwrap();
        s.write_all(b"{garbage").unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(&h.socket).unwrap();
        s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    }
    h.ok(&["daemon", "status"]);
}

#[test]
fn nothing_is_left_behind() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let (netns, state);
    {
        let h = Host::start("h0");
        h.start_vm("p", &img, "128M");
        // A guest flooding its console does not fill the host's memory.
        h.sh_ok(
            "p",
            "dd if=/dev/zero bs=1M count=6 2>/dev/null | tr '\\0' x > /dev/console",
        );
        let log = h.state.join("vms/p/console.log");
        let bounded = wait_until(Duration::from_secs(20), || {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&log).ok()?;
            (m.len() > 6 << 20 && m.blocks() * 512 <= 4 << 20).then_some(())
        });
        assert!(bounded.is_some(), "console log not trimmed");
        let console = h.run(&["vm", "console", "p"]).stdout;
        assert!(
            console.len() <= 2 << 20 && console.windows(64).any(|w| w.iter().all(|&b| b == b'x')),
            "{}",
            console.len()
        );
        h.sh_ok(
            "p",
            "T=$(sf ticket 1); ID=$(sf clone $T); [ $ID = 0 ] && echo parent",
        );
        assert_eq!(h.vms().len(), 2);
        netns = h.netns.clone();
        state = h.state.display().to_string();
        // Dropped here with VMs running.
    }
    assert!(
        processes_with(&state).is_empty(),
        "QEMU processes left behind"
    );
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "namespace left behind"
    );
    assert!(!Path::new(&state).exists(), "state left behind");
}

/// Memory a clone frees is reported to QEMU (free page reporting), which
/// punches it out of the RAM file even for a private mapping. The file is
/// the generation its sibling maps too: the sibling's pages must survive.
#[test]
fn a_clone_freeing_memory_leaves_its_siblings_memory_intact() {
    if !vm_prereqs() {
        return;
    }
    let (img, _progs) = image();
    let h = Host::start("h0");
    h.start_vm("p", &img, "256M");
    let ticket = h
        .sh_ok(
            "p",
            r#"
sf-memtest hold --mib 64 --seed 6 --sock /tmp/free.sock </dev/null >/dev/null 2>&1 &
echo $! > /tmp/free.pid
i=0; while [ ! -S /tmp/free.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
sf-memtest ctl --sock /tmp/free.sock verify >/dev/null || exit 9
T=$(sf ticket 2) || exit 10
ID=$(sf clone $T) || exit 11
echo "$T"
"#,
        )
        .trim()
        .to_string();
    let clones = clones_of(&h.vms(), &ticket);
    assert_eq!(clones.len(), 2, "{clones:?}");
    let (one, two) = (
        clones[0]["name"].as_str().unwrap(),
        clones[1]["name"].as_str().unwrap(),
    );
    // Clone 1 frees the 64 MiB; the guest reports free pages every 2 s.
    h.sh_ok(
        one,
        "P=$(cat /tmp/free.pid); kill $P; while kill -0 $P 2>/dev/null; do sleep 0.1; done; sleep 6",
    );
    // Clone 2 never wrote those pages: they are still the generation's.
    let v = h.sh_ok(two, "sf-memtest ctl --sock /tmp/free.sock verify");
    assert!(
        v.starts_with("ok 6 "),
        "clone 2 lost memory clone 1 freed: {v}"
    );
    let v = h.sh_ok("p", "sf-memtest ctl --sock /tmp/free.sock verify");
    assert!(v.starts_with("ok 6 "), "{v}");
    h.ok(&["vm", "stop", "p"]);
}
