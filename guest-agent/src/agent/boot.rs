//! `snowflock-agent --boot-identity`: the VM's own identity at boot.
//!
//! In the initramfs image `/etc/init.d/rcS` gives the VM the identity the
//! daemon put on the kernel command line, before init starts the agent. A
//! guest booted by systemd (the Debian image, or a user's own VM with the
//! `snowflock-guest` package) runs no rcS: its unit starts the agent with
//! `--boot-identity`, and the agent does the same, once per boot, before it
//! serves anything:
//!
//! | kernel parameter | what is done |
//! |---|---|
//! | `sf.hostname=H` | `sethostname`, `/etc/hostname` |
//! | `sf.machine_id=HEX32` | `/etc/machine-id` |
//! | `sf.mac=xx:xx:xx:xx:xx:xx` | the interface's MAC (set while it is down) |
//! | `sf.ip=A.B.C.D/N` | the interface's primary IPv4 address |
//! | (always) | the interface (when it exists) and `lo` up; `page_reporting_order` 0 when the kernel has it |
//!
//! The interface is `[network] interface` of `agent.toml` (`eth0` by
//! default). When `sf.mac` or `sf.ip` is given the agent waits up to
//! [`IFACE_WAIT`] for it to appear: udev loads `virtio_net` while the agent
//! starts. `page_reporting_order` 0 is what rcS writes too; a `[balloon]
//! reporting_order` is applied after it and wins.
//!
//! Each step runs only when its parameter is there. A malformed parameter
//! or a failing step is logged and the other steps still run: a VM without
//! its name is easier to repair than one that does not come up. With
//! `SNOWFLOCK_AGENT_DRY_IDENTITY=1` (tests) the steps are checked and
//! logged, not applied.
//!
//! Once per boot: the marker [`MARKER`] in the state directory holds the
//! kernel's boot id. An agent restarted by systemd skips the boot identity,
//! and so does one in a clone, which inherits its parent's boot id and
//! `/run` with its memory: a clone never goes back to its parent's name and
//! address.

use super::identity::{
    check_hostname, check_machine_id, check_unicast_mac, parse_cidr, parse_mac, set_hostname,
    set_machine_id, IdentityError,
};
use super::sys::Netdev;
use super::AgentConfig;
use allocator_hooks::balloon::ORDER_PARAM;
use allocator_hooks::NetworkConfig;
use snowflock_proto::error::chain;
use std::path::Path;
use std::time::{Duration, Instant};

/// Name of the once-per-boot marker in the state directory.
pub const MARKER: &str = "boot-identity";
/// How long to wait for the interface to appear.
pub const IFACE_WAIT: Duration = Duration::from_secs(10);
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
const SYS_CLASS_NET: &str = "/sys/class/net";

/// The `sf.*` identity parameters of a kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootParams {
    pub hostname: Option<String>,
    pub machine_id: Option<String>,
    pub mac: Option<String>,
    pub ip: Option<String>,
}

impl BootParams {
    /// Reads `sf.hostname`, `sf.machine_id`, `sf.mac` and `sf.ip`; the last
    /// of a repeated parameter wins, as in rcS.
    pub fn from_cmdline(cmdline: &str) -> BootParams {
        let mut p = BootParams::default();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let slot = match key {
                "sf.hostname" => &mut p.hostname,
                "sf.machine_id" => &mut p.machine_id,
                "sf.mac" => &mut p.mac,
                "sf.ip" => &mut p.ip,
                _ => continue,
            };
            *slot = Some(value.to_string());
        }
        p
    }
}

/// What the boot identity did (or, dry, would do), step by step.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootReport {
    /// Steps done, in order, such as `hostname vm1` or `eth0 up`.
    pub done: Vec<String>,
    /// Steps that failed or were refused, with why.
    pub failed: Vec<String>,
}

impl BootReport {
    fn record(&mut self, dry: bool, step: String, res: Result<(), String>) {
        match res {
            Ok(()) if dry => {
                tracing::info!("Dry boot identity, not applied: {step}");
                self.done.push(step);
            }
            Ok(()) => {
                tracing::info!("Boot identity: {step}");
                self.done.push(step);
            }
            Err(e) => {
                tracing::warn!("Boot identity: cannot do {step}: {e}");
                self.failed.push(format!("{step}: {e}"));
            }
        }
    }
}

fn unless_dry<E>(dry: bool, f: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
    if dry {
        Ok(())
    } else {
        f()
    }
}

fn text(e: IdentityError) -> String {
    chain(&e).trim_end().to_string()
}

/// The interface named by `[network]` in the agent's config file; the
/// default when the file or the table is missing or wrong (logged).
pub fn interface(cfg: &AgentConfig) -> String {
    match NetworkConfig::try_load(&cfg.config_file) {
        Ok(Some(n)) => n.interface,
        Ok(None) => NetworkConfig::default().interface,
        Err(e) => {
            let n = NetworkConfig::default();
            tracing::warn!("Using interface {}: {}", n.interface, chain(&e).trim_end());
            n.interface
        }
    }
}

/// Runs the boot identity on interface `dev`, unless it already ran in
/// this boot (then `None`). Never fails: every problem is logged.
pub fn run(cfg: &AgentConfig, dev: &str) -> Option<BootReport> {
    let dir = cfg.state_dir();
    let marker = dir.join(MARKER);
    let boot_id = std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == boot_id) {
        tracing::info!(
            "Boot identity already applied in this boot ({} exists): skipped",
            marker.display()
        );
        return None;
    }
    let params = BootParams::from_cmdline(&cfg.cmdline);
    tracing::info!("Boot identity from the kernel command line: {params:?}, interface {dev}");
    let report = apply(&params, dev, cfg.dry_identity, cfg.sysfs.as_deref());
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&marker, format!("{boot_id}\n")));
    if let Err(e) = written {
        tracing::warn!(
            "Cannot write {} ({e}): a restarted agent will apply the boot identity again",
            marker.display()
        );
    }
    tracing::info!(
        "Boot identity: {} steps done, {} failed",
        report.done.len(),
        report.failed.len()
    );
    Some(report)
}

/// Applies `p` to the system: network interface `dev`, page reporting
/// under `sysfs` (`None`: only logged). `dry` checks and logs each step
/// without applying it.
pub fn apply(p: &BootParams, dev: &str, dry: bool, sysfs: Option<&Path>) -> BootReport {
    let mut r = BootReport::default();
    if let Some(h) = &p.hostname {
        let res = check_hostname(h).and_then(|()| unless_dry(dry, || set_hostname(h)));
        r.record(dry, format!("hostname {h}"), res.map_err(text));
    }
    if let Some(m) = &p.machine_id {
        let res = check_machine_id(m).and_then(|()| unless_dry(dry, || set_machine_id(m)));
        r.record(dry, format!("machine-id {m}"), res.map_err(text));
    }
    network(&mut r, p, dev, dry);
    page_reporting(&mut r, dry, sysfs);
    r
}

fn network(r: &mut BootReport, p: &BootParams, dev: &str, dry: bool) {
    let mac = p
        .mac
        .as_ref()
        .and_then(|m| match check_unicast_mac(m).and_then(|()| parse_mac(m)) {
            Ok(b) => Some((m, b)),
            Err(e) => {
                r.record(dry, format!("{dev} MAC {m}"), Err(text(e)));
                None
            }
        });
    let ip = p.ip.as_ref().and_then(|c| match parse_cidr(c) {
        Ok(a) => Some((c, a)),
        Err(e) => {
            r.record(dry, format!("{dev} address {c}"), Err(text(e)));
            None
        }
    });
    let present = dry || wait_for(dev, p.mac.is_some() || p.ip.is_some());
    if present {
        let nd = if dry {
            Ok(None)
        } else {
            Netdev::open(dev).map(Some)
        };
        match nd {
            Ok(nd) => {
                let io = |f: &dyn Fn(&Netdev) -> std::io::Result<()>| match &nd {
                    Some(n) => f(n).map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                if let Some((m, b)) = mac {
                    let res = io(&|n| n.set_up(false).and_then(|()| n.set_mac(b)));
                    r.record(dry, format!("{dev} MAC {m}"), res);
                }
                if let Some((c, (a, prefix))) = ip {
                    r.record(
                        dry,
                        format!("{dev} address {c}"),
                        io(&|n| n.set_ipv4(a, prefix)),
                    );
                }
                r.record(dry, format!("{dev} up"), io(&|n| n.set_up(true)));
            }
            Err(e) => r.record(dry, format!("{dev} up"), Err(e.to_string())),
        }
    } else if p.mac.is_none() && p.ip.is_none() {
        tracing::debug!("No interface {dev}: left alone");
    } else {
        r.record(
            dry,
            format!("{dev} up"),
            Err(format!(
                "no interface {dev} after {} s (name the NIC in [network] interface of agent.toml, or boot with net.ifnames=0)",
                IFACE_WAIT.as_secs()
            )),
        );
    }
    let lo = unless_dry(dry, || Netdev::open("lo").and_then(|n| n.set_up(true)));
    r.record(dry, "lo up".into(), lo.map_err(|e| e.to_string()));
}

/// True when `dev` exists, waiting up to [`IFACE_WAIT`] for it when
/// `wait`.
fn wait_for(dev: &str, wait: bool) -> bool {
    let path = Path::new(SYS_CLASS_NET).join(dev);
    let deadline = Instant::now() + if wait { IFACE_WAIT } else { Duration::ZERO };
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn page_reporting(r: &mut BootReport, dry: bool, sysfs: Option<&Path>) {
    let step = "page_reporting_order 0".to_string();
    let Some(root) = sysfs else {
        // Dry without a fake sysfs: nothing to look at.
        return r.record(true, step, Ok(()));
    };
    let path = root.join(ORDER_PARAM);
    if !path.exists() {
        tracing::debug!(
            "{} does not exist: page reporting order left alone",
            path.display()
        );
        return;
    }
    let res =
        std::fs::write(&path, "0").map_err(|e| format!("cannot write {}: {e}", path.display()));
    r.record(dry, step, res);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("sf-boot-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CMDLINE: &str = "console=ttyS0 sf.vm=vm1 sf.hostname=vm1-h sf.ip=10.250.3.2/24 \
         sf.mac=52:54:00:00:00:02 sf.machine_id=0123456789abcdef0123456789abcdef quiet";

    #[test]
    fn parses_the_identity_parameters() {
        assert_eq!(
            BootParams::from_cmdline(CMDLINE),
            BootParams {
                hostname: Some("vm1-h".into()),
                machine_id: Some("0123456789abcdef0123456789abcdef".into()),
                mac: Some("52:54:00:00:00:02".into()),
                ip: Some("10.250.3.2/24".into()),
            }
        );
        assert_eq!(
            BootParams::from_cmdline("quiet sf.vm=x\n"),
            BootParams::default()
        );
        let p = BootParams::from_cmdline("sf.hostname=a sf.hostname=b sf.ipx=1 sf.ip");
        assert_eq!(p.hostname.as_deref(), Some("b"));
        assert_eq!(p.ip, None);
    }

    #[test]
    fn dry_run_checks_every_step_and_logs_it() {
        let r = apply(&BootParams::from_cmdline(CMDLINE), "ens3", true, None);
        assert_eq!(
            r.done,
            [
                "hostname vm1-h",
                "machine-id 0123456789abcdef0123456789abcdef",
                "ens3 MAC 52:54:00:00:00:02",
                "ens3 address 10.250.3.2/24",
                "ens3 up",
                "lo up",
                "page_reporting_order 0"
            ]
        );
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        // Nothing given: only the links and page reporting.
        let r = apply(&BootParams::default(), "eth0", true, None);
        assert_eq!(r.done, ["eth0 up", "lo up", "page_reporting_order 0"]);
    }

    #[test]
    fn malformed_parameters_fail_alone() {
        let p = BootParams::from_cmdline(
            "sf.hostname=-bad sf.machine_id=XYZ sf.mac=01:00:5e:00:00:01 sf.ip=10.0.0.1 sf.vm=v",
        );
        let r = apply(&p, "eth0", true, None);
        assert_eq!(r.done, ["eth0 up", "lo up", "page_reporting_order 0"]);
        assert_eq!(r.failed.len(), 4, "{:?}", r.failed);
        assert!(r.failed[0].starts_with("hostname -bad: Malformed hostname"));
        assert!(r.failed[1].starts_with("machine-id XYZ: Malformed machine id"));
        assert!(r.failed[2].starts_with("eth0 MAC 01:00:5e:00:00:01: Malformed or multicast"));
        assert!(r.failed[3].starts_with("eth0 address 10.0.0.1: Malformed address"));
    }

    #[test]
    fn page_reporting_order_is_written_when_the_kernel_has_it() {
        let d = TempDir::new("sysfs");
        // No parameter file: nothing done, nothing failed.
        let r = apply(&BootParams::default(), "eth0", true, Some(&d.0));
        assert!(!r.done.iter().any(|s| s.starts_with("page_reporting")));
        assert!(r.failed.is_empty());
        let param = d.0.join(ORDER_PARAM);
        std::fs::create_dir_all(param.parent().unwrap()).unwrap();
        std::fs::write(&param, "9\n").unwrap();
        let r = apply(&BootParams::default(), "eth0", true, Some(&d.0));
        assert!(r.done.iter().any(|s| s == "page_reporting_order 0"));
        assert_eq!(std::fs::read_to_string(&param).unwrap(), "0");
    }

    #[test]
    fn runs_once_per_boot() {
        let d = TempDir::new("marker");
        let cfg = AgentConfig {
            port: super::super::port::PortSpec::Virtio,
            socket: d.0.join("state").join("agent.sock"),
            config_file: d.0.join("agent.toml"),
            dry_identity: true,
            cmdline: CMDLINE.into(),
            sysfs: None,
            sibling_port: 0,
            sibling_listen: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        assert_eq!(interface(&cfg), "eth0");
        std::fs::write(&cfg.config_file, "[network]\ninterface = \"ens3\"\n").unwrap();
        assert_eq!(interface(&cfg), "ens3");
        std::fs::write(&cfg.config_file, "[network]\ninterface = \"a/b\"\n").unwrap();
        assert_eq!(interface(&cfg), "eth0");

        let r = run(&cfg, "eth0").expect("first run applies");
        assert!(r.done.contains(&"hostname vm1-h".to_string()));
        let marker = d.0.join("state").join(MARKER);
        assert!(marker.is_file());
        assert!(run(&cfg, "eth0").is_none(), "second run in the same boot");
        // A marker from another boot does not count.
        std::fs::write(&marker, "another-boot\n").unwrap();
        assert!(run(&cfg, "eth0").is_some());
    }
}
