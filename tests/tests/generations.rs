//! Successive clone points from one parent, with real VMs. At each freeze
//! the parent is handed to a new QEMU on a private mapping of its frozen
//! RAM (docs/design.md#parent-pause), so this is
//! where that handover has to be invisible: to the clones of every point,
//! and to the parent.

use serde_json::Value;
use snowflock_tests::*;
use std::time::Duration;

/// Runs in the parent; from each `sf clone` on it also runs in the new
/// clone, which records what it sees and stops there. A writer process
/// runs through every freeze; between points the parent refills the held
/// buffer with the next seed.
const POINTS: &str = r#"
sf-memtest hold --mib 32 --seed 1 --sock /tmp/mt.sock </dev/null >/dev/null 2>&1 &
sf-memtest scribble --mib 16 --sock /tmp/sc.sock </dev/null >/dev/null 2>&1 &
i=0; while { [ ! -S /tmp/mt.sock ] || [ ! -S /tmp/sc.sock ]; } && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo console-mark-before > /dev/console
for P in 1 2 3; do
  T=$(sf ticket 1) || exit 10
  ID=$(sf clone $T) || exit 11
  if [ "$ID" != 0 ]; then
    { echo "point=$P id=$ID"; sf-memtest ctl --sock /tmp/mt.sock verify; } > /tmp/point.txt 2>&1
    exit 0
  fi
  echo "$T" >> /tmp/tickets.txt
  sf-memtest ctl --sock /tmp/mt.sock fill $((P + 1)) >/dev/null || exit 12
done
echo console-mark-after > /dev/console
cat /tmp/tickets.txt
"#;

/// One more point once no clone runs (the freeze then writes into the
/// file the parent runs on).
const ONE_MORE: &str = r#"
T=$(sf ticket 1) || exit 10
ID=$(sf clone $T) || exit 11
if [ "$ID" != 0 ]; then
  { echo "point=4 id=$ID"; sf-memtest ctl --sock /tmp/mt.sock verify; } > /tmp/point.txt 2>&1
  exit 0
fi
echo "$T"
"#;

fn pid_of(h: &Host, vm: &str) -> u64 {
    h.vms()
        .iter()
        .find(|v| v["name"] == vm)
        .and_then(|v| v["pid"].as_u64())
        .unwrap_or_else(|| panic!("{vm} not listed"))
}

fn passes(s: &str) -> u64 {
    s.split_whitespace()
        .find_map(|w| w.strip_prefix("passes="))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// The writer in `vm` completes a whole pass after now, and never found a
/// word it did not write.
fn writer_consistent(h: &Host, vm: &str) {
    let (_, first, _) = h.sh(vm, "sf-memtest ctl --sock /tmp/sc.sock status");
    let p0 = passes(&first);
    let done = wait_until(Duration::from_secs(120), || {
        let (_, o, _) = h.sh(vm, "sf-memtest ctl --sock /tmp/sc.sock status");
        assert!(!o.starts_with("mismatch"), "{vm}: {o}");
        (passes(&o) > p0).then_some(o)
    });
    let out = done.unwrap_or_else(|| panic!("{vm}: the writer made no progress"));
    assert!(out.starts_with("ok "), "{vm}: {out}");
}

/// What the clone `vm` recorded at its point, once it has (its script
/// goes on after `sf clone` returned in the parent).
fn point_seen(h: &Host, vm: &str) -> String {
    wait_until(Duration::from_secs(60), || {
        let (_, o, _) = h.sh(vm, "cat /tmp/point.txt 2>/dev/null");
        (o.lines().count() >= 2).then_some(o)
    })
    .unwrap_or_else(|| panic!("{vm} recorded nothing"))
}

fn generations_left(h: &Host) -> Vec<String> {
    std::fs::read_dir(h.state.join("gens"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn three_clone_points_each_see_their_own_memory_and_coexist() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let h = Host::start("h0");
    let p = h.start_vm("p", &img, "256M");
    let ip = p["ip"].clone();
    let pid0 = pid_of(&h, "p");

    let out = h.sh_ok("p", POINTS);
    let tickets: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(tickets.len(), 3, "{out}");
    // The new QEMU outlives the daemon thread that started it (threads of
    // the blocking pool end after 10 s idle; a QEMU started from one would
    // get SIGKILL with it).
    std::thread::sleep(Duration::from_secs(12));

    // The parent runs in a new QEMU, with its identity, address, console
    // and exec sessions (this very call).
    let after = h.vms();
    let pv: &Value = after.iter().find(|v| v["name"] == "p").unwrap();
    assert_ne!(
        pv["pid"].as_u64().unwrap(),
        pid0,
        "the parent was not handed over"
    );
    assert_eq!(pv["ip"], ip);
    assert_eq!(pv["state"], "running");
    assert_eq!(h.sh_ok("p", "hostname").trim(), "p");
    let console = h.ok(&["vm", "console", "p"]);
    assert!(
        console.contains("console-mark-before") && console.contains("console-mark-after"),
        "one console across the handovers: {console}"
    );
    // Its memory: the last fill, and a writer that never saw a torn word.
    assert!(h
        .sh_ok("p", "sf-memtest ctl --sock /tmp/mt.sock verify")
        .starts_with("ok 4 "));

    // Every clone of every point runs at once and saw its own point.
    let mut clones = Vec::new();
    for (i, t) in tickets.iter().enumerate() {
        let kids = clones_of(&h.vms(), t);
        assert_eq!(kids.len(), 1, "point {}: {kids:?}", i + 1);
        assert_eq!(kids[0]["state"], "running");
        let name = kids[0]["name"].as_str().unwrap().to_string();
        let seen = point_seen(&h, &name);
        let point = i + 1;
        assert!(
            seen.contains(&format!("point={point} ")) && seen.contains(&format!("ok {point} ")),
            "clone of point {point} saw: {seen}"
        );
        clones.push(name);
    }
    for vm in std::iter::once("p").chain(clones.iter().map(String::as_str)) {
        writer_consistent(&h, vm);
    }
    // Generations share what did not change: every point's memory is the
    // file the parent runs on, and points 2 and 3 (taken while clones of
    // earlier points ran) add a layer of what differs.
    use std::os::unix::fs::MetadataExt;
    let ino = |p: std::path::PathBuf| std::fs::metadata(&p).map(|m| m.ino()).ok();
    let own = ino(h.state.join("vms").join("p").join("ram"));
    assert!(own.is_some());
    for g in 1..=3 {
        let dir = h.state.join("gens").join(format!("p-g{g}"));
        assert_eq!(ino(dir.join("ram")), own, "point {g}'s base");
        assert_eq!(dir.join("top").exists(), g > 1, "point {g}'s layer");
    }
    // The memory they hold: the parent's last generation (shared with its
    // clone), the two older ones kept for the clones of points 1 and 2, and
    // each clone's own writes.
    let m = &h.stats("p");
    assert!(m["shared_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["generations_bytes"].as_u64().unwrap() > 0, "{m}");
    let listed = h.vms();
    let c1 = listed
        .iter()
        .find(|v| v["name"] == clones[0].as_str())
        .unwrap();
    assert!(c1["memory"]["private_bytes"].as_u64().unwrap() > 0, "{c1}");
    assert_eq!(
        c1["memory"]["shared_bytes"], 0,
        "counted at the parent: {c1}"
    );

    // Join and kill release each point's generation.
    h.sh_ok("p", &format!("sf kill {}", tickets[0]));
    // The clone ends itself (its exec session may end with it).
    let _ = h.sh(&clones[1], "sf exit 0");
    h.sh_ok("p", &format!("sf join {}", tickets[1]));
    h.sh_ok("p", &format!("sf kill {}", tickets[2]));
    let released = wait_until(Duration::from_secs(30), || {
        generations_left(&h).is_empty().then_some(())
    });
    assert!(
        released.is_some(),
        "generations left after join and kill: {:?}",
        generations_left(&h)
    );
    assert_eq!(&h.stats("p")["generations_bytes"], 0);

    // With no clone left, a fourth point still sees its own memory.
    let t4 = h.sh_ok("p", ONE_MORE).trim().to_string();
    let kids = clones_of(&h.vms(), &t4);
    assert_eq!(kids.len(), 1);
    let seen = point_seen(&h, kids[0]["name"].as_str().unwrap());
    assert!(seen.contains("ok 4 "), "clone of point 4 saw: {seen}");
    writer_consistent(&h, "p");

    // The parent's stop takes the last clone, every QEMU (the handed-over
    // ones too) and every file with it.
    h.ok(&["vm", "stop", "p"]);
    let gone = wait_until(Duration::from_secs(30), || {
        (generations_left(&h).is_empty()
            && h.vms().is_empty()
            && processes_with(&format!("mem-path={}", h.state.display())).is_empty())
        .then_some(())
    });
    assert!(
        gone.is_some(),
        "left after the parent's stop: generations {:?}, VMs {:?}",
        generations_left(&h),
        h.vms()
    );
}
