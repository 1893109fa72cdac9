//! A real user VM: the Debian disk image, booted by systemd with the agent
//! installed from its Debian package, and a user's own disk.
//!
//! The image is built once into the cache (see [`TestImage::debian`]);
//! every VM boots it behind a private overlay.

use snowflock_tests::*;
use std::path::Path;
use std::process::Command;

fn sh_in(h: &Host, vm: &str, script: &str) -> String {
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
    h.ok(&["vm", "stop", "mine"]);
    let out = Command::new("debugfs")
        .args(["-R", "cat /root/marker"])
        .arg(&own)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "written-in-place"
    );
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
}

/// A raw copy of a running VM's disk view, taken with its root file system
/// frozen (consistent, journal clean), checked with `e2fsck -fn`.
fn fsck_view(h: &Host, vm: &str, top: &Path) {
    let out = tempfile::Builder::new()
        .prefix("sf-fsck")
        .tempdir_in("/var/tmp")
        .unwrap();
    let raw = out.path().join("view.raw");
    sh_in(h, vm, "sync && fsfreeze -f /");
    let conv = Command::new("qemu-img")
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
}
