//! Builds a real image from the cached Debian cloud kernel and busybox, boots
//! it under QEMU microvm (TCG) with the daemon's device set, and checks the
//! guest comes up: modules load, eth0 and the agent's virtio port appear, and
//! the (stand-in) agent is started by init.
//!
//! Skipped (with a message) only when the cached kernel is absent
//! (`$SNOWFLOCK_CACHE` or /var/cache/snowflock, `kernel/current/vmlinux`) and
//! `SNOWFLOCK_REQUIRE_VM` is not `1`; with it, a missing kernel fails the test.
//! Missing busybox or QEMU always fail it.
//! `SNOWFLOCK_BOOT_TIMEOUT_S` overrides the 60 s boot timeout.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snowflock_image::{
    build, default_cache_dir, host_tsc_khz, BuildOptions, Image, DEFAULT_CMDLINE,
};

/// Kills and reaps QEMU however the test ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require_vm() -> bool {
    std::env::var("SNOWFLOCK_REQUIRE_VM").is_ok_and(|v| v == "1")
}

/// Checks the tools the test needs once the kernel is there: their absence is a
/// failure, not a skip.
fn check_tools() {
    assert!(
        Path::new("/bin/busybox").is_file(),
        "/bin/busybox is absent (install busybox-static)"
    );
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    assert!(
        qemu.is_ok_and(|s| s.success()),
        "qemu-system-x86_64 is not runnable (install qemu-system-x86)"
    );
}

fn qemu_command(img: &Image, tmp: &Path, append: &str) -> Command {
    let p = |name: &str| tmp.join(name).display().to_string();
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-accel",
        "tcg",
        "-cpu",
        "max",
    ])
    .args([
        "-M",
        "microvm,acpi=on,memory-backend=mem",
        "-smp",
        "1",
        "-m",
        "256M",
    ])
    .arg("-object")
    .arg(format!(
        "memory-backend-file,id=mem,size=256M,mem-path={},share=on",
        p("ram")
    ))
    .arg("-kernel")
    .arg(&img.kernel)
    .arg("-initrd")
    .arg(&img.initrd)
    .arg("-append")
    .arg(append)
    .arg("-chardev")
    .arg(format!("file,id=con,path={}", p("console.log")))
    .args(["-serial", "chardev:con"])
    .args(["-device", "virtio-serial-device", "-chardev"])
    .arg(format!(
        "socket,id=agent,path={},server=on,wait=off",
        p("agent.sock")
    ))
    .args([
        "-device",
        "virtserialport,chardev=agent,name=org.snowflock.agent",
    ])
    .args([
        "-netdev",
        "user,id=n0,restrict=on",
        "-device",
        "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
    ])
    .args([
        "-device",
        "virtio-rng-device",
        "-device",
        "virtio-balloon-device,free-page-reporting=on",
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", p("qmp.sock")))
    .stdin(Stdio::null());
    c
}

#[test]
fn image_boots_under_qemu_microvm() {
    let kernel_dir = default_cache_dir().join("kernel").join("current");
    let vmlinux = kernel_dir.join("vmlinux");
    if !vmlinux.is_file() {
        let why = format!(
            "{} is absent (run scripts/fetch-kernel.sh)",
            vmlinux.display()
        );
        if require_vm() {
            panic!("SNOWFLOCK_REQUIRE_VM=1 but {why}");
        }
        eprintln!("SKIP image_boots_under_qemu_microvm: {why}");
        return;
    }
    check_tools();

    let tmp = tempfile::tempdir().expect("tempdir");
    let tmp = tmp.path();
    let bins = tmp.join("bins");
    fs::create_dir_all(&bins).unwrap();
    let agent = bins.join("snowflock-agent");
    fs::write(
        &agent,
        "#!/bin/sh\necho \"agent-started host=$(hostname)\" > /dev/console\nexec sleep 1000\n",
    )
    .unwrap();
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755)).unwrap();
    let note = tmp.join("note.txt");
    fs::write(&note, "added by --add\n").unwrap();

    let mut opts = BuildOptions::new(tmp.join("img"), &bins);
    opts.kernel_dir = kernel_dir;
    opts.extra = vec![(note, "/etc/snowflock/note.txt".into())];
    let t0 = Instant::now();
    let manifest = build(&opts).expect("image build");
    eprintln!(
        "image built in {:?}: kernel {}, {} paths",
        t0.elapsed(),
        manifest.kernel_version,
        manifest.files.len()
    );
    let modules: Vec<&String> = manifest
        .files
        .iter()
        .filter(|f| f.ends_with(".ko"))
        .collect();
    eprintln!("modules: {modules:?}");
    for m in [
        "virtio_mmio.ko",
        "virtio_console.ko",
        "virtio_net.ko",
        "virtio_balloon.ko",
    ] {
        assert!(
            manifest.files.contains(&format!("/lib/modules/{m}")),
            "{m} not in image"
        );
    }
    assert!(manifest
        .files
        .iter()
        .any(|f| f == "/etc/snowflock/note.txt"));

    let img = Image::open(&opts.out_dir).expect("image opens");
    // tsc_early_khz: without it a busy host makes the guest's TSC calibration
    // fail and the boot hang (see host_tsc_khz).
    let tsc = host_tsc_khz()
        .map(|k| format!(" tsc_early_khz={k}"))
        .unwrap_or_default();
    let append =
        format!("{DEFAULT_CMDLINE}{tsc} sf.vm=t1 sf.hostname=t1 sf.ip=10.250.0.1/24 sf.mac=52:54:00:12:34:56");
    eprintln!("kernel command line: {append}");
    let qemu_log = fs::File::create(tmp.join("qemu.log")).unwrap();
    let mut cmd = qemu_command(&img, tmp, &append);
    cmd.stdout(qemu_log.try_clone().unwrap()).stderr(qemu_log);
    // If the test process dies without unwinding, QEMU dies with it.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut qemu = Qemu(cmd.spawn().expect("spawn qemu-system-x86_64"));

    let timeout = Duration::from_secs(
        std::env::var("SNOWFLOCK_BOOT_TIMEOUT_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let console_path: PathBuf = tmp.join("console.log");
    let read_console = || fs::read_to_string(&console_path).unwrap_or_default();
    let mut ready_at = None;
    let outcome = loop {
        let con = read_console();
        if ready_at.is_none() && con.contains("snowflock: guest ready") {
            ready_at = Some(start.elapsed());
        }
        if ready_at.is_some() && con.contains("agent-started") {
            break Ok(());
        }
        if let Ok(Some(status)) = qemu.0.try_wait() {
            break Err(format!("QEMU exited early with {status}"));
        }
        if start.elapsed() > timeout {
            break Err(format!(
                "no 'guest ready' + 'agent-started' within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let total = start.elapsed();
    drop(qemu);
    let console = read_console();
    let qemu_out = fs::read_to_string(tmp.join("qemu.log")).unwrap_or_default();
    if let Err(why) = outcome {
        panic!("{why}\n--- qemu output ---\n{qemu_out}\n--- console.log ---\n{console}");
    }
    eprintln!(
        "boot: 'guest ready' after {:?}, agent started after {total:?}\n--- console.log ---\n{console}",
        ready_at.unwrap()
    );
    assert!(
        !console.contains("failed to load"),
        "a module failed to load:\n{console}"
    );
    assert!(
        !console.contains("snowflock: cannot"),
        "rcS reported a failure:\n{console}"
    );
    assert!(
        console.contains("snowflock: eth0 up ip=10.250.0.1/24 mac=52:54:00:12:34:56"),
        "{console}"
    );
    assert!(
        console.contains("snowflock: port org.snowflock.agent at /dev/vport"),
        "{console}"
    );
    assert!(
        console.contains("snowflock: vm=t1 hostname=t1"),
        "{console}"
    );
    assert!(console.contains("agent-started host=t1"), "{console}");
}
