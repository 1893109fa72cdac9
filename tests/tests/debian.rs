//! A real user VM: the Debian disk image, booted by systemd with the agent
//! installed from its Debian package, and a user's own disk.
//!
//! The image is built once into the cache (see [`TestImage::debian`]);
//! every VM boots it behind a private overlay.

use snowflock_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn sh_in(h: &Daemon, vm: &str, script: &str) -> String {
    h.sh_ok(vm, script).trim().to_string()
}

/// The image boots under TCG with the agent started by systemd; `sf`
/// works from a login shell and from a systemd service; the VM's identity
/// comes from its kernel parameters; its writes stay in its overlay.
#[test]
fn debian_image_boots_with_the_agent_under_systemd() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::debian();
    let disk = img.dir.join("disk.raw");
    let before = std::fs::metadata(&disk).unwrap().modified().unwrap();
    let h = Host::start("h0");
    let vm = h.start_vm("deb", &img, "384M");
    let ip = vm["ip"].as_str().unwrap().to_string();

    assert_eq!(
        sh_in(&h, "deb", "systemctl is-active snowflock-agent"),
        "active"
    );
    assert_eq!(sh_in(&h, "deb", "findmnt -n -o SOURCE /"), "/dev/vda");
    assert_eq!(sh_in(&h, "deb", "hostname"), "deb");
    let id = sh_in(&h, "deb", "su -l root -c 'sf id'");
    assert!(id.contains("clone_id=0") && id.contains("vm=deb"), "{id}");
    let id = sh_in(&h, "deb", "systemd-run --wait --pipe --quiet sf id");
    assert!(id.contains("vm=deb"), "from a service: {id}");
    let addr = sh_in(&h, "deb", "ip -o -4 addr show dev eth0");
    assert!(
        addr.contains(ip.split('/').next().unwrap()),
        "{addr} vs {ip}"
    );
    let py = sh_in(
        &h,
        "deb",
        "python3 -c 'import snowflock; print(snowflock.__name__)'",
    );
    assert_eq!(py, "snowflock");
    assert!(
        sh_in(&h, "deb", "dpkg-query -W -f '${Status}' snowflock-guest").ends_with("installed")
    );

    // The VM writes to its own overlay, never to the image.
    sh_in(
        &h,
        "deb",
        "dd if=/dev/urandom of=/root/blob bs=1M count=8 && sync",
    );
    h.ok(&["vm", "stop", "deb"]);
    let after = std::fs::metadata(&disk).unwrap().modified().unwrap();
    assert_eq!(before, after, "the image's disk was written");
}

/// A disk of the user's own (a renamed copy of the image's disk in another
/// directory) boots with the image's kernel and is written in place;
/// hostile disks are refused before anything boots.
#[test]
fn a_users_own_disk_boots_and_is_written_in_place() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::debian();
    let mine = tempfile::Builder::new()
        .prefix("sf-mydisk")
        .tempdir_in("/var/tmp")
        .unwrap();
    let own = mine.path().join("research-vm.img");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(img.dir.join("disk.raw"))
        .arg(&own)
        .status()
        .unwrap();
    assert!(st.success());
    let h = Host::start("h0");
    let own_s = own.to_str().unwrap();
    h.ok(&[
        "vm",
        "start",
        "mine",
        "--image",
        img.path(),
        "--disk",
        own_s,
        "--mem",
        "384M",
    ]);
    sh_in(&h, "mine", "echo written-in-place > /root/marker && sync");
    // Cloned: the clone sees the disk of the clone instant; the parent's
    // later writes go to a layer beside the disk and are committed into it
    // when the VM stops.
    let t = sh_in(
        &h,
        "mine",
        "T=$(sf ticket 1) || exit 1; ID=$(sf clone $T) || exit 1; [ \"$ID\" = 0 ] && echo $T",
    );
    sh_in(&h, "mine", "echo after-clone > /root/after && sync");
    assert_eq!(
        sh_in(&h, "mine-g1c1", "cat /root/marker"),
        "written-in-place"
    );
    assert_eq!(
        sh_in(
            &h,
            "mine-g1c1",
            "test -e /root/after && echo seen || echo absent"
        ),
        "absent"
    );
    let beside = |d: &Path| {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".snowflock-"))
            .count()
    };
    assert_eq!(
        beside(mine.path()),
        1,
        "the parent's new layer is beside its disk"
    );
    h.sh_ok("mine", &format!("sf kill {t}"));
    h.ok(&["vm", "stop", "mine"]);
    assert_eq!(beside(mine.path()), 0, "merged into the disk and removed");
    let cat = |f: &str| {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat {f}")])
            .arg(&own)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cat("/root/marker"), "written-in-place");
    assert_eq!(cat("/root/after"), "after-clone");
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&own)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // A qcow2 whose backing file lies outside its directory.
    let elsewhere = tempfile::tempdir().unwrap();
    let secret = elsewhere.path().join("host-secret.raw");
    std::fs::write(&secret, vec![0u8; 1 << 20]).unwrap();
    let evil = mine.path().join("evil.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&evil)
        .status()
        .unwrap();
    assert!(st.success());
    // A truncated qcow2.
    let cut = mine.path().join("cut.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&cut)
        .arg("1G")
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..300]).unwrap();
    for (disk, says) in [
        (&evil, "outside its directory"),
        (&cut, "not a usable disk image"),
        (&mine.path().join("none.img"), "not a usable disk image"),
    ] {
        let o = h.run(&[
            "vm",
            "start",
            "bad",
            "--image",
            img.path(),
            "--disk",
            disk.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says),
            "{}: {err}",
            disk.display()
        );
    }
    assert!(h.vms().is_empty(), "nothing was started");
    assert!(Path::new(&own).exists());

    // The same disk without the agent's unit enabled, booted with a kernel
    // and initrd given by hand (no image): it boots to a login prompt and is
    // reported at once, not after the whole boot timeout.
    let kernel = img.dir.join("vmlinuz").display().to_string();
    let initrd = img.dir.join("initrd.img").display().to_string();
    let rm = Command::new("debugfs")
        .args([
            "-w",
            "-R",
            "rm /etc/systemd/system/multi-user.target.wants/snowflock-agent.service",
        ])
        .arg(&own)
        .output()
        .unwrap();
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    let o = h.run(&[
        "vm", "start", "noagent", "--kernel", &kernel, "--initrd", &initrd, "--disk", own_s,
        "--mem", "384M",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a VM without the agent is refused");
    assert!(
        err.contains("no snowflock agent answered") && err.contains("login:"),
        "{err}"
    );
    assert!(h.vms().is_empty(), "the VM without an agent was stopped");
}

/// A raw copy of a running VM's disk view, taken with its root file system
/// frozen (consistent, journal clean), checked with `e2fsck -fn`.
fn fsck_view(h: &Daemon, vm: &str, top: &Path) {
    fsck_view_in(h, vm, top, None)
}

/// [`fsck_view`] run in the mount namespace of process `ns` (a clone
/// host's daemon, whose memtap mount holds the remote clone's layers).
fn fsck_view_in(h: &Daemon, vm: &str, top: &Path, ns: Option<u32>) {
    let out = tempfile::Builder::new()
        .prefix("sf-fsck")
        .tempdir_in("/var/tmp")
        .unwrap();
    let raw = out.path().join("view.raw");
    sh_in(h, vm, "sync && fsfreeze -f /");
    let mut cmd = match ns {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["-m", "-t", &pid.to_string(), "qemu-img"]);
            c
        }
        None => Command::new("qemu-img"),
    };
    let conv = cmd
        .args(["convert", "-U", "-O", "raw"])
        .arg(top)
        .arg(&raw)
        .output()
        .unwrap();
    sh_in(h, vm, "fsfreeze -u /");
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{vm}: e2fsck -fn: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

/// Clones on the parent's host see the disk exactly as the parent saw it
/// at the clone: files written before it, synced or only in the page
/// cache, never what the parent wrote after. Their writes stay private;
/// a clone stopped in the middle of heavy writes harms no one; every disk
/// view stays consistent.
#[test]
fn clones_see_the_disk_as_it_was_at_the_clone() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::debian();
    let h = Host::start("h0");
    h.start_vm("p", &img, "384M");
    let t = sh_in(
        &h,
        "p",
        "dd if=/dev/urandom of=/root/data bs=1M count=16 status=none && sha256sum /root/data > /root/data.sum && \
         echo synced > /root/synced && sync && echo unsynced > /root/unsynced && \
         T=$(sf ticket 2) || exit 1; ID=$(sf clone $T) || exit 1; \
         if [ \"$ID\" = 0 ]; then echo after > /root/after; sync; echo $T; fi",
    );
    assert!(t.starts_with("t-"), "{t}");
    let kids = ["p-g1c1", "p-g1c2"];
    for (i, k) in kids.iter().enumerate() {
        assert_eq!(
            sh_in(&h, k, "cat /root/synced /root/unsynced"),
            "synced\nunsynced"
        );
        assert_eq!(
            sh_in(&h, k, "test -e /root/after && echo seen || echo absent"),
            "absent"
        );
        sh_in(&h, k, &format!("echo {i} > /root/mine && sync"));
    }
    assert_eq!(sh_in(&h, "p", "cat /root/after"), "after");
    assert_eq!(
        sh_in(&h, "p", "test -e /root/mine && echo seen || echo absent"),
        "absent"
    );
    assert_eq!(
        sh_in(&h, "p-g1c1", "cat /root/mine"),
        "0",
        "a sibling's write leaked"
    );
    // Clone 2 dies in the middle of heavy writes.
    sh_in(
        &h,
        "p-g1c2",
        "nohup dd if=/dev/urandom of=/root/big bs=1M count=400 conv=fsync >/dev/null 2>&1 & sleep 2; echo started",
    );
    h.ok(&["vm", "stop", "p-g1c2"]);
    for vm in ["p", "p-g1c1"] {
        assert_eq!(
            sh_in(&h, vm, "sha256sum -c --quiet /root/data.sum && echo intact"),
            "intact",
            "{vm}"
        );
    }
    let vms = h.state.join("vms");
    fsck_view(&h, "p-g1c1", &vms.join("p-g1c1/disk.qcow2"));
    fsck_view(&h, "p", &vms.join("p/disk-g1.qcow2"));
    h.sh_ok("p", &format!("sf kill {t}"));
    let names: Vec<String> = h
        .vms()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["p"], "the clones are gone");

    // With no clone left, the next clone call first merges the frozen
    // layer back: the chain does not grow with every clone call. The new
    // clone sees what the parent wrote since.
    let files = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("disk"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(files(&vms.join("p")), ["disk-g1.qcow2", "disk.qcow2"]);
    let t2 = sh_in(
        &h,
        "p",
        "T=$(sf ticket 1) || exit 1; ID=$(sf clone $T) || exit 1; [ \"$ID\" = 0 ] && echo $T",
    );
    assert_eq!(
        files(&vms.join("p")),
        ["disk-g2.qcow2", "disk.qcow2"],
        "merged, then frozen again"
    );
    assert_eq!(sh_in(&h, "p-g2c1", "cat /root/after"), "after");
    for vm in ["p", "p-g2c1"] {
        assert_eq!(
            sh_in(&h, vm, "sha256sum -c --quiet /root/data.sum && echo intact"),
            "intact",
            "{vm}"
        );
    }
    fsck_view(&h, "p", &vms.join("p/disk-g2.qcow2"));

    // A third point while p-g2c1 runs: the parent stays in its QEMU (its
    // memory a layer over the file p-g2c1 maps, its disk frozen by a
    // snapshot there), and each clone sees its own point.
    let t3 = sh_in(
        &h,
        "p",
        "echo third > /root/third && \
         T=$(sf ticket 1) || exit 1; ID=$(sf clone $T) || exit 1; [ \"$ID\" = 0 ] && echo $T",
    );
    assert!(h.state.join("gens/p-g3/top").exists(), "a layer");
    let kid3 = clones_of(&h.vms(), &t3);
    assert_eq!(kid3.len(), 1);
    let k3 = kid3[0]["name"].as_str().unwrap().to_string();
    assert_eq!(
        sh_in(&h, &k3, "cat /root/after /root/third"),
        "after\nthird"
    );
    assert_eq!(
        sh_in(
            &h,
            "p-g2c1",
            "test -e /root/third && echo seen || echo absent"
        ),
        "absent"
    );
    sh_in(&h, "p", "echo fourth > /root/fourth && sync");
    for vm in ["p", k3.as_str()] {
        assert_eq!(
            sh_in(&h, vm, "sha256sum -c --quiet /root/data.sum && echo intact"),
            "intact",
            "{vm}"
        );
    }
    assert_eq!(
        sh_in(&h, &k3, "test -e /root/fourth && echo seen || echo absent"),
        "absent"
    );
    h.sh_ok("p", &format!("sf kill {t2}"));
    h.sh_ok("p", &format!("sf kill {t3}"));
}

fn disk_fetched(c: &Cluster, host: usize, vm: &str) -> u64 {
    c.host(host).stats(vm)["disk_bytes_fetched"]
        .as_u64()
        .expect("disk_bytes_fetched")
}

/// Clones on other hosts read the parent's disk on demand: the instant of
/// the clone, a small fraction of the image for a few files, a 200 MiB
/// file for at most 1.05 times its blocks, and nothing more for a second
/// clone on the same host; their writes stay private.
#[test]
fn clones_on_other_hosts_read_the_disk_on_demand() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::debian();
    let c = Cluster::up(3, &[]);
    let h0 = c.host(0);
    h0.start_vm("p", &img, "384M");
    let sum = sh_in(
        h0,
        "p",
        "head -c 200M /dev/urandom > /root/big && sync && sha256sum /root/big | cut -d' ' -f1",
    );
    let t = sh_in(
        h0,
        "p",
        "echo synced > /root/synced && sync && echo unsynced > /root/unsynced && \
         T=$(sf ticket 4) || exit 1; ID=$(sf clone $T) || exit 1; \
         if [ \"$ID\" = 0 ]; then echo after > /root/after; sync; echo $T; fi",
    );
    let kids = clones_of(&h0.vms(), &t);
    assert_eq!(kids.len(), 4, "{kids:?}");
    // A host other than the origin with two clones.
    let (host, pair) = (1..3)
        .map(|i| {
            let on: Vec<String> = kids
                .iter()
                .filter(|k| k["host"] == format!("h{i}").as_str())
                .map(|k| k["name"].as_str().unwrap().to_string())
                .collect();
            (i, on)
        })
        .find(|(_, on)| on.len() >= 2)
        .expect("a host with two clones");
    let (a, b) = (&pair[0], &pair[1]);
    let hx = c.host(host);

    let before = disk_fetched(&c, host, a);
    assert_eq!(
        sh_in(hx, a, "cat /root/synced /root/unsynced"),
        "synced\nunsynced"
    );
    assert_eq!(
        sh_in(hx, a, "test -e /root/after && echo seen || echo absent"),
        "absent"
    );
    sh_in(
        hx,
        a,
        "cat /etc/os-release /etc/passwd > /dev/null; ls -l /usr/bin > /dev/null",
    );
    let few = disk_fetched(&c, host, a);
    // What the image's disk holds (its allocated blocks).
    let used = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(img.dir.join("disk.raw"))
            .unwrap()
            .blocks()
            * 512
    };
    eprintln!(
        "clone {a}: {} KiB fetched reading a few files; the image holds {} MiB",
        few / 1024,
        used >> 20
    );
    assert!(few < used / 10, "fetched {few} of {used} for a few files");

    // The 200 MiB file, read from the disk (not the page cache it inherited).
    sh_in(hx, a, "sync; echo 3 > /proc/sys/vm/drop_caches");
    let s0 = disk_fetched(&c, host, a);
    assert_eq!(sh_in(hx, a, "sha256sum /root/big | cut -d' ' -f1"), sum);
    let big = disk_fetched(&c, host, a) - s0;
    eprintln!(
        "clone {a}: read 200 MiB, fetched {:.1} MiB ({:.3}x)",
        big as f64 / 1048576.0,
        big as f64 / (200u64 << 20) as f64
    );
    assert!(big as f64 <= 1.05 * (200u64 << 20) as f64, "fetched {big}");
    assert!(big >= 150 << 20, "the read went to the disk: fetched {big}");
    // A second clone on the same host fetches nothing more for it.
    sh_in(hx, b, "sync; echo 3 > /proc/sys/vm/drop_caches");
    let b0 = disk_fetched(&c, host, b);
    assert_eq!(sh_in(hx, b, "sha256sum /root/big | cut -d' ' -f1"), sum);
    let again = disk_fetched(&c, host, b) - b0;
    eprintln!("clone {b} on the same host: fetched {again} bytes more");
    assert!(again < 1 << 20, "second clone fetched {again}");
    assert!(few >= before, "{few} {before}");

    // Private writes.
    sh_in(hx, a, "echo mine > /root/mine && sync");
    assert_eq!(
        sh_in(hx, b, "test -e /root/mine && echo seen || echo absent"),
        "absent"
    );
    assert_eq!(
        sh_in(h0, "p", "test -e /root/mine && echo seen || echo absent"),
        "absent"
    );
    // The remote clone's disk view (its overlay over memtap's layers, read
    // in its host daemon's mount namespace) and the parent's are clean.
    let state = c.state_root();
    fsck_view_in(
        hx,
        a,
        &state.join(format!("h{host}/vms/{a}/disk.qcow2")),
        hx.daemon_pid(),
    );
    fsck_view(h0, "p", &state.join("h0/vms/p/disk-g1.qcow2"));

    // The origin's page service stops answering while a clone on the other
    // host reads the file from disk: the clone is stopped with the reason
    // within the fetch deadline, the parent hears it was lost.
    let other = 3 - host;
    let victim = kids
        .iter()
        .find(|k| k["host"] == format!("h{other}").as_str())
        .expect("a clone on the other host")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let hy = c.host(other);
    // Its tools in its page cache first, so what it misses is mostly disk.
    sh_in(
        hy,
        &victim,
        "sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum /dev/null >/dev/null",
    );
    let origin = h0.daemon_pid().expect("h0 daemon pid");
    // A daemon this test's cluster started.
    snowflock_tests::signal(origin, libc::SIGSTOP);
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            snowflock_tests::signal(self.0, libc::SIGCONT);
        }
    }
    let cont = Cont(origin);
    let _ = hy.sh(&victim, "sha256sum /root/big >/dev/null 2>&1 &");
    let lost = wait_for_loss(hy, &victim, Duration::from_secs(60));
    let reason = lost["reason"].as_str().unwrap().to_string();
    eprintln!("{victim} stopped: {reason}");
    // Memory and disk come from the same page service: whichever miss came
    // first names it.
    assert!(
        (reason.contains("disk origin") || reason.contains("memory origin"))
            && reason.contains("stopped serving"),
        "{reason}"
    );
    drop(cont);
    let id = kids.iter().find(|k| k["name"] == victim.as_str()).unwrap()["clone_id"]
        .as_u64()
        .unwrap();
    let out = h0.sh_ok("p", &format!("sf kill {t}"));
    assert!(
        out.contains(&format!("{id} lost")),
        "the parent hears clone {id} was lost: {out}"
    );
}

/// The behaviours the initramfs image's tests check, once on the Debian
/// image (they are slow under TCG): a clone on another host resumes with
/// the parent's memory intact (fetched on demand, holes answered locally)
/// and its own identity, reaches the parent and its sibling over the flock
/// network, keeps its writes private, and its exit status reaches the
/// parent's `sf join`.
#[test]
fn initramfs_behaviours_hold_on_the_debian_image() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::debian();
    let c = Cluster::up(2, &[]);
    let (h0, h1) = (c.host(0), c.host(1));
    let p = h0.start_vm("p", &img, "384M");
    let t = sh_in(
        h0,
        "p",
        r#"echo from-parent > /tmp/state.txt
sf-memtest hold --mib 32 --seed 7 --sock /run/mt.sock </dev/null >/dev/null 2>&1 &
i=0; while [ ! -S /run/mt.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
T=$(sf ticket 2) || exit 10
ID=$(sf clone $T) || exit 11
{ cat /tmp/state.txt; sf-memtest ctl --sock /run/mt.sock verify; echo $ID; } > /tmp/verify.tmp 2>&1
echo "written-by-$ID" > /tmp/state.txt
mv /tmp/verify.tmp /tmp/verify.txt
echo $T"#,
    );
    let kids = clones_of(&h0.vms(), &t);
    assert_eq!(kids.len(), 2, "{kids:?}");
    let subnet = p["ip"]
        .as_str()
        .unwrap()
        .trim_end_matches(".1/24")
        .to_string();
    for k in &kids {
        let (name, id) = (k["name"].as_str().unwrap(), k["clone_id"].as_u64().unwrap());
        let v = wait_until(Duration::from_secs(60), || {
            let (c, o, _) = h0.sh(name, "cat /tmp/verify.txt");
            (c == 0).then_some(o)
        })
        .unwrap_or_else(|| panic!("{name} never finished its script"));
        let l: Vec<&str> = v.lines().collect();
        assert_eq!(l[0], "from-parent", "{name}: {v}");
        assert!(l[1].starts_with("ok 7 "), "{name}: memory intact: {v}");
        assert_eq!(l[2], id.to_string());
        assert_eq!(
            sh_in(h1, name, "cat /tmp/state.txt"),
            format!("written-by-{id}")
        );
        assert_eq!(sh_in(h1, name, "hostname"), name);
        let sf_id = sh_in(h1, name, "sf id");
        assert!(sf_id.contains(&format!("clone_id={id} ")), "{sf_id}");
        let ip = sh_in(h1, name, "ip -4 -o addr show dev eth0 | awk '{print $4}'");
        assert_eq!(ip, format!("{subnet}.{}/24", id + 1));
        for j in 1..=3 {
            h0.sh_ok(name, &format!("ping -c 1 -W 3 {subnet}.{j} >/dev/null"));
        }
        let s = h0.stats(name);
        assert_eq!(
            (s["memory"].as_str(), s["origin"].as_str()),
            (Some("remote"), Some("h0")),
            "{s}"
        );
        assert!(
            got_pages_from_origin(&s) && s["zero_pages"].as_u64().unwrap() > 0,
            "{s}"
        );
    }
    assert_eq!(sh_in(h0, "p", "cat /tmp/state.txt"), "written-by-0");
    let ids: Vec<u64> = kids
        .iter()
        .map(|k| k["clone_id"].as_u64().unwrap())
        .collect();
    for (k, code) in kids.iter().zip([3, 0]) {
        let _ = h0.sh(
            k["name"].as_str().unwrap(),
            &format!("(sleep 0.3; sf exit {code}) >/dev/null 2>&1 &"),
        );
    }
    let out = h0.sh_ok("p", &format!("sf join {t}"));
    assert!(out.contains(&format!("{} exited 3", ids[0])), "{out}");
    assert!(out.contains(&format!("{} exited 0", ids[1])), "{out}");
    let gone = wait_until(Duration::from_secs(30), || {
        clones_of(&h0.vms(), &t).is_empty().then_some(())
    });
    assert!(gone.is_some(), "the clones are gone after sf_exit");
}
