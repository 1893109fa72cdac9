//! One QEMU process: its command line, its files, and how it is started.
//! [`super::vmm::QemuVmm`] drives it through the [`super::vmm::Vmm`] seam.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Everything that decides a QEMU command line. Parent and clones of one
/// flock use the same shape; only RAM sharing and `incoming` differ, which
/// is what lets a clone load the parent's device state.
#[derive(Debug, Clone)]
pub struct QemuSpec {
    pub qemu: PathBuf,
    pub accel: String,
    pub vcpus: u32,
    pub mem_mib: u32,
    pub ram_path: PathBuf,
    /// `share=on` for an original VM (its RAM file is the live memory);
    /// `share=off` for a clone (private copy-on-write view of a generation).
    pub share: bool,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub dir: PathBuf,
    pub tap: String,
    /// The tap, already open (a VM handed to a new QEMU shares the old
    /// one's): passed as descriptor 3 instead of opening `tap` by name.
    pub tap_fd: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// The serial console's file (appended to, so a VM handed to a new
    /// QEMU keeps one console).
    pub console: PathBuf,
    /// Where the shim logs the free pages it kept QEMU from punching out
    /// of a private RAM file (a parent handed to a new QEMU; see
    /// `qemu-shim`).
    pub discard_log: Option<PathBuf>,
    pub mac: String,
    /// Start paused, waiting for `migrate-incoming`.
    pub incoming: bool,
    /// The root disk (`/dev/vda`), if any: its `-blockdev` options
    /// without node name (driver, file, backing chain).
    pub disk: Option<serde_json::Value>,
}

/// QEMU node name of a VM's root disk (its top layer).
pub const DISK_NODE: &str = "disk0";

/// Files of a VM inside its directory.
pub fn qmp_path(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}
pub fn agent_path(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}
pub fn console_path(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

impl QemuSpec {
    /// The QEMU arguments.
    pub fn args(&self) -> Vec<String> {
        let d = |p: PathBuf| p.display().to_string();
        let cpu = if self.accel == "kvm" { "host" } else { "max" };
        let mut a: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            // A guest reboot or panic ends the VM instead of looping.
            "-no-reboot".into(),
            "-accel".into(),
            self.accel.clone(),
            "-cpu".into(),
            cpu.into(),
            "-M".into(),
            "microvm,acpi=on,memory-backend=mem".into(),
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            format!("{}M", self.mem_mib),
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
                self.mem_mib,
                self.ram_path.display(),
                if self.share { "on" } else { "off" }
            ),
            "-kernel".into(),
            d(self.kernel.clone()),
            "-initrd".into(),
            d(self.initrd.clone()),
            "-append".into(),
            self.cmdline.clone(),
            "-chardev".into(),
            format!("file,id=con,path={},append=on", self.console.display()),
            "-serial".into(),
            "chardev:con".into(),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent_path(&self.dir).display()
            ),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                snowflock_proto::AGENT_PORT_NAME
            ),
            "-netdev".into(),
            match &self.tap_fd {
                Some(_) => "tap,id=net0,fd=3".to_string(),
                None => format!("tap,id=net0,ifname={},script=no,downscript=no", self.tap),
            },
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", self.mac),
            "-device".into(),
            "virtio-rng-device".into(),
            "-device".into(),
            "virtio-balloon-device,free-page-reporting=on".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path(&self.dir).display()),
            // Device state is saved without RAM (`xen-save-devices-state`),
            // a stream with no configuration section; a VM loading it must
            // not ask for one.
            "-global".into(),
            "migration.send-configuration=off".into(),
        ];
        if let Some(disk) = &self.disk {
            // Discards from the guest (fstab `discard`) punch holes: freed
            // blocks cost a clone nothing.
            let mut node = disk.clone();
            // A chain spelled out for a handed-over VM names its top.
            if node.get("node-name").is_none() {
                node["node-name"] = DISK_NODE.into();
            }
            let top = node["node-name"].as_str().unwrap_or(DISK_NODE).to_string();
            node["discard"] = "unmap".into();
            node["file"]["discard"] = "unmap".into();
            a.extend([
                "-blockdev".into(),
                node.to_string(),
                "-device".into(),
                format!("virtio-blk-device,drive={top},id=vda"),
            ]);
        }
        if self.incoming {
            a.extend(["-S".into(), "-incoming".into(), "defer".into()]);
        }
        a
    }

    /// Starts QEMU. Its stderr goes to `qemu.log` in the VM directory. QEMU
    /// gets SIGKILL if the daemon thread that started it dies, so a crashed
    /// daemon leaves no guests behind.
    pub fn spawn(&self) -> std::io::Result<tokio::process::Child> {
        let log = std::fs::File::create(self.dir.join("qemu.log"))?;
        let mut cmd = tokio::process::Command::new(&self.qemu);
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(false);
        // A clone's RAM is a private mapping of a generation file, which on
        // another host is memtap (FUSE). QEMU advises MADV_HUGEPAGE on guest
        // RAM, and for a VM_HUGEPAGE file mapping the kernel reads a whole
        // 2 MiB window around every fault, readahead settings
        // notwithstanding: measured, a resumed clone fetched 64 MiB to touch
        // 27. The shim (crate `qemu-shim`) drops exactly that advice.
        if !self.share {
            match qemu_shim() {
                Some(shim) => {
                    cmd.env("LD_PRELOAD", shim);
                    // QEMU 7.2 punches free pages the guest reports out of
                    // the RAM file even when it maps it privately; the
                    // file is the generation others map too. The shim
                    // skips hole punches on this file (see qemu-shim).
                    use std::os::unix::fs::MetadataExt;
                    let m = std::fs::metadata(&self.ram_path)?;
                    cmd.env(RAM_FILE_ENV, format!("{}:{}", m.dev(), m.ino()));
                    if let Some(log) = &self.discard_log {
                        cmd.env(DISCARD_LOG_ENV, log);
                    }
                }
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!(
                            "{QEMU_SHIM} is neither next to snowflockd nor in /usr/local/lib/snowflock; \
                             a clone without it would punch the pages its guest frees out of the memory its siblings share"
                        ),
                    ))
                }
            }
        }
        super::sys::die_with_parent(&mut cmd);
        if let Some(fd) = &self.tap_fd {
            use std::os::fd::AsRawFd;
            super::sys::pass_fd_as_3(&mut cmd, fd.as_raw_fd());
        }
        cmd.spawn()
    }
}

/// Names the shared RAM file to the shim (`qemu-shim`'s `RAM_FILE_ENV`;
/// the shim is a `cdylib` and cannot be linked here).
const RAM_FILE_ENV: &str = "SNOWFLOCK_RAM_FILE";
/// `qemu-shim`'s `DISCARD_LOG_ENV`.
const DISCARD_LOG_ENV: &str = "SNOWFLOCK_DISCARD_LOG";

/// File name of the clone QEMU shim (see `qemu-shim/`).
pub const QEMU_SHIM: &str = "libsnowflock_qemu_shim.so";

/// The shim next to the daemon's binary, else in `/usr/local/lib/snowflock`.
fn qemu_shim() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(QEMU_SHIM)));
    beside
        .into_iter()
        .chain(std::iter::once(
            PathBuf::from("/usr/local/lib/snowflock").join(QEMU_SHIM),
        ))
        .find(|p| p.exists())
}
