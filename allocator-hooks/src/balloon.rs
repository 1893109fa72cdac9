//! Applying the `[balloon]` table: free page reporting on or off, and its
//! order, through sysfs.
//!
//! * **On**: the `virtio_balloon` driver is bound to the virtio device whose
//!   `/sys/bus/virtio/devices/virtioN/device` reads `0x0005` (bound by
//!   writing `virtioN` to `/sys/bus/virtio/drivers/virtio_balloon/bind` if
//!   it is not). With QEMU's `free-page-reporting=on` the driver reports
//!   free blocks, QEMU punches holes for them in the RAM file, and clones
//!   never fetch those pages.
//! * **Off**: every device found in the driver's directory is written to
//!   its `unbind`. Nothing is reported any more (and the balloon cannot be
//!   inflated either); pages already reported stay holes until reused.
//! * **Order**: `/sys/module/page_reporting/parameters/page_reporting_order`.
//!   Free blocks of `2^order` pages and larger are reported; the kernel
//!   default is the pageblock order (9: 2 MiB blocks only), 0 reports every
//!   free page. Takes effect at the next reporting pass.
//!
//! Every path is relative to a sysfs root so tests can use a fake tree.

use crate::config::{BalloonConfig, MAX_REPORTING_ORDER};
use std::fmt;
use std::io::Write;
use std::path::Path;

/// The real sysfs root.
pub const SYSFS: &str = "/sys";
/// The balloon driver's directory, relative to the sysfs root.
pub const DRIVER_DIR: &str = "bus/virtio/drivers/virtio_balloon";
/// The virtio devices, relative to the sysfs root.
pub const DEVICES_DIR: &str = "bus/virtio/devices";
/// The reporting order parameter, relative to the sysfs root.
pub const ORDER_PARAM: &str = "module/page_reporting/parameters/page_reporting_order";
/// `VIRTIO_ID_BALLOON` as sysfs prints a virtio device's `device` file.
pub const VIRTIO_ID_BALLOON: &str = "0x0005";

/// One thing [`apply_balloon`] did or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BalloonStep {
    /// `page_reporting_order` was written.
    OrderSet(u32),
    /// The driver was bound to this device: reporting is on.
    Bound(String),
    /// The driver was already bound to this device: reporting is on.
    AlreadyBound(String),
    /// The driver was unbound from this device: reporting is off.
    Unbound(String),
    /// No device was bound to the driver: reporting is off.
    AlreadyOff,
}

impl fmt::Display for BalloonStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BalloonStep::OrderSet(o) => write!(f, "page_reporting_order set to {o}"),
            BalloonStep::Bound(d) => write!(f, "virtio_balloon bound to {d}: reporting on"),
            BalloonStep::AlreadyBound(d) => {
                write!(f, "virtio_balloon already bound to {d}: reporting on")
            }
            BalloonStep::Unbound(d) => {
                write!(f, "virtio_balloon unbound from {d}: reporting off")
            }
            BalloonStep::AlreadyOff => f.write_str("virtio_balloon not bound: reporting off"),
        }
    }
}

/// What [`apply_balloon`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonReport {
    /// What was done or found, in order.
    pub steps: Vec<BalloonStep>,
    /// What failed, with the reason.
    pub failed: Vec<String>,
    /// `page_reporting_order` as read back at the end, if readable.
    pub order: Option<u32>,
}

impl BalloonReport {
    /// True when nothing failed.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Applies `cfg` under `sysfs_root` (normally [`SYSFS`]): the order first,
/// then the driver binding. Failures are reported, never fatal.
pub fn apply_balloon(cfg: &BalloonConfig, sysfs_root: &Path) -> BalloonReport {
    let mut r = BalloonReport::default();
    let order_path = sysfs_root.join(ORDER_PARAM);
    if let Some(order) = cfg.reporting_order {
        if order > MAX_REPORTING_ORDER {
            r.failed.push(format!(
                "reporting_order {order} is out of range (0 to {MAX_REPORTING_ORDER})"
            ));
        } else {
            match write_attr(&order_path, &order.to_string()) {
                Ok(()) => r.steps.push(BalloonStep::OrderSet(order)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => r.failed.push(format!(
                    "Cannot set the reporting order: the kernel has no free page reporting ({} is missing)",
                    order_path.display()
                )),
                Err(e) => r.failed.push(format!(
                    "Cannot write {order} to {}: {e}",
                    order_path.display()
                )),
            }
        }
    }
    let driver = sysfs_root.join(DRIVER_DIR);
    if cfg.free_page_reporting {
        bind_all(sysfs_root, &driver, &mut r);
    } else {
        unbind_all(&driver, &mut r);
    }
    r.order = std::fs::read_to_string(&order_path)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    r
}

fn bind_all(sysfs_root: &Path, driver: &Path, r: &mut BalloonReport) {
    let devices = match balloon_devices(&sysfs_root.join(DEVICES_DIR)) {
        Ok(d) => d,
        Err(e) => {
            r.failed.push(format!(
                "Cannot list {}: {e}",
                sysfs_root.join(DEVICES_DIR).display()
            ));
            return;
        }
    };
    if devices.is_empty() {
        r.failed.push(
            "No virtio balloon device: free page reporting needs QEMU's \
             -device virtio-balloon-...,free-page-reporting=on"
                .into(),
        );
        return;
    }
    for dev in devices {
        if driver.join(&dev).symlink_metadata().is_ok() {
            r.steps.push(BalloonStep::AlreadyBound(dev));
            continue;
        }
        let dev_dir = sysfs_root.join(DEVICES_DIR).join(&dev);
        if let Ok(other) = std::fs::read_link(dev_dir.join("driver")) {
            let name = other
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            r.failed.push(format!(
                "{dev} is bound to another driver ({name}); not rebinding it"
            ));
            continue;
        }
        if !driver.is_dir() {
            r.failed.push(format!(
                "Cannot bind {dev}: the virtio_balloon driver is not loaded \
                 (no {}; modprobe virtio_balloon)",
                driver.display()
            ));
            continue;
        }
        let bind = driver.join("bind");
        match write_attr(&bind, &dev) {
            Ok(()) => r.steps.push(BalloonStep::Bound(dev)),
            Err(e) => r
                .failed
                .push(format!("Cannot write {dev} to {}: {e}", bind.display())),
        }
    }
}

fn unbind_all(driver: &Path, r: &mut BalloonReport) {
    let bound = match bound_devices(driver) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            r.failed
                .push(format!("Cannot list {}: {e}", driver.display()));
            return;
        }
    };
    if bound.is_empty() {
        r.steps.push(BalloonStep::AlreadyOff);
        return;
    }
    let unbind = driver.join("unbind");
    for dev in bound {
        match write_attr(&unbind, &dev) {
            Ok(()) => r.steps.push(BalloonStep::Unbound(dev)),
            Err(e) => r
                .failed
                .push(format!("Cannot write {dev} to {}: {e}", unbind.display())),
        }
    }
}

/// `virtioN` names, sorted by N.
fn sort_virtio(mut v: Vec<String>) -> Vec<String> {
    v.sort_by_key(|n| virtio_index(n));
    v
}

fn virtio_index(name: &str) -> Option<u64> {
    name.strip_prefix("virtio")?.parse().ok()
}

/// The virtio devices under `devices_dir` whose `device` is the balloon's.
/// A missing directory (no virtio bus) is an empty list.
pub fn balloon_devices(devices_dir: &Path) -> std::io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(devices_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if virtio_index(&name).is_none() {
            continue;
        }
        let id = std::fs::read_to_string(devices_dir.join(&name).join("device"));
        if id.is_ok_and(|id| id.trim() == VIRTIO_ID_BALLOON) {
            found.push(name);
        }
    }
    Ok(sort_virtio(found))
}

/// The devices bound to the driver: its `virtioN` entries.
pub fn bound_devices(driver_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(driver_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if virtio_index(&name).is_some() {
            found.push(name);
        }
    }
    Ok(sort_virtio(found))
}

/// Writes a sysfs attribute. The file must exist: it is never created, so a
/// missing attribute is an error, not a new file. (`truncate` is for fake
/// trees; sysfs ignores it.)
fn write_attr(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;
    use std::os::unix::fs::symlink;

    /// A fake sysfs: virtio0 (console), virtio3 (balloon), the driver
    /// directory with bind/unbind, and the order parameter at 9.
    fn fake_sysfs(bound: bool) -> TempDir {
        let t = TempDir::new("sysfs");
        let root = t.path();
        let devs = root.join(DEVICES_DIR);
        for (dev, id) in [("virtio0", "0x0003"), ("virtio3", "0x0005")] {
            std::fs::create_dir_all(devs.join(dev)).unwrap();
            std::fs::write(devs.join(dev).join("device"), format!("{id}\n")).unwrap();
        }
        let drv = root.join(DRIVER_DIR);
        std::fs::create_dir_all(&drv).unwrap();
        for f in ["bind", "unbind", "uevent"] {
            std::fs::write(drv.join(f), "").unwrap();
        }
        if bound {
            bind_link(root);
        }
        let param = root.join(ORDER_PARAM);
        std::fs::create_dir_all(param.parent().unwrap()).unwrap();
        std::fs::write(&param, "9\n").unwrap();
        t
    }

    fn bind_link(root: &Path) {
        let dev = root.join(DEVICES_DIR).join("virtio3");
        symlink(&dev, root.join(DRIVER_DIR).join("virtio3")).unwrap();
        symlink(root.join(DRIVER_DIR), dev.join("driver")).unwrap();
    }

    fn unbind_link(root: &Path) {
        std::fs::remove_file(root.join(DRIVER_DIR).join("virtio3")).unwrap();
        std::fs::remove_file(root.join(DEVICES_DIR).join("virtio3/driver")).unwrap();
    }

    fn read(root: &Path, rel: &str) -> String {
        std::fs::read_to_string(root.join(rel)).unwrap()
    }

    fn cfg(on: bool, order: Option<u32>) -> BalloonConfig {
        BalloonConfig {
            free_page_reporting: on,
            reporting_order: order,
        }
    }

    #[test]
    fn finds_the_balloon_device() {
        let t = fake_sysfs(true);
        let devs = t.path().join(DEVICES_DIR);
        assert_eq!(balloon_devices(&devs).unwrap(), vec!["virtio3"]);
        assert_eq!(
            bound_devices(&t.path().join(DRIVER_DIR)).unwrap(),
            vec!["virtio3"]
        );
        assert!(balloon_devices(&t.path().join("nothing"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn defaults_change_nothing_when_bound() {
        let t = fake_sysfs(true);
        let r = apply_balloon(&BalloonConfig::default(), t.path());
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.steps, vec![BalloonStep::AlreadyBound("virtio3".into())]);
        assert_eq!(r.order, Some(9));
        assert_eq!(read(t.path(), &format!("{DRIVER_DIR}/bind")), "");
        assert_eq!(read(t.path(), ORDER_PARAM), "9\n");
    }

    #[test]
    fn off_unbinds_and_sets_the_order() {
        let t = fake_sysfs(true);
        let r = apply_balloon(&cfg(false, Some(0)), t.path());
        assert!(r.ok(), "{r:?}");
        assert_eq!(
            r.steps,
            vec![
                BalloonStep::OrderSet(0),
                BalloonStep::Unbound("virtio3".into())
            ]
        );
        assert_eq!(r.order, Some(0));
        assert_eq!(read(t.path(), &format!("{DRIVER_DIR}/unbind")), "virtio3");
        assert_eq!(read(t.path(), &format!("{DRIVER_DIR}/bind")), "");
        // Once unbound (the kernel removes the links), off is a no-op.
        unbind_link(t.path());
        let r = apply_balloon(&cfg(false, None), t.path());
        assert!(r.ok() && r.steps == vec![BalloonStep::AlreadyOff], "{r:?}");
    }

    #[test]
    fn on_binds_an_unbound_device() {
        let t = fake_sysfs(false);
        let r = apply_balloon(&cfg(true, Some(3)), t.path());
        assert!(r.ok(), "{r:?}");
        assert_eq!(
            r.steps,
            vec![
                BalloonStep::OrderSet(3),
                BalloonStep::Bound("virtio3".into())
            ]
        );
        assert_eq!(read(t.path(), &format!("{DRIVER_DIR}/bind")), "virtio3");
        assert_eq!(read(t.path(), ORDER_PARAM), "3");
        assert_eq!(r.order, Some(3));
    }

    #[test]
    fn failures_are_reported_not_fatal() {
        // No balloon device at all.
        let t = TempDir::new("empty-sysfs");
        let r = apply_balloon(&cfg(true, Some(0)), t.path());
        assert_eq!(r.steps, vec![]);
        assert_eq!(r.failed.len(), 2, "{r:?}");
        assert!(r.failed[0].contains("no free page reporting"), "{r:?}");
        assert!(r.failed[1].contains("No virtio balloon device"), "{r:?}");
        assert_eq!(r.order, None);
        // Off without the driver loaded: already off, and no file appears.
        let r = apply_balloon(&cfg(false, None), t.path());
        assert!(r.ok() && r.steps == vec![BalloonStep::AlreadyOff], "{r:?}");
        assert!(!t.path().join(DRIVER_DIR).exists());

        // The device is there but the driver is not loaded.
        let t = fake_sysfs(false);
        std::fs::remove_dir_all(t.path().join(DRIVER_DIR)).unwrap();
        let r = apply_balloon(&cfg(true, None), t.path());
        assert_eq!(r.failed.len(), 1, "{r:?}");
        assert!(r.failed[0].contains("modprobe virtio_balloon"), "{r:?}");

        // The device is bound to some other driver.
        let t = fake_sysfs(false);
        let other = t.path().join("bus/virtio/drivers/other");
        std::fs::create_dir_all(&other).unwrap();
        symlink(&other, t.path().join(DEVICES_DIR).join("virtio3/driver")).unwrap();
        let r = apply_balloon(&cfg(true, None), t.path());
        assert_eq!(
            r.failed,
            vec!["virtio3 is bound to another driver (other); not rebinding it"]
        );
        assert_eq!(read(t.path(), &format!("{DRIVER_DIR}/bind")), "");

        // bind is missing (the write must not create it); out-of-range order.
        let t = fake_sysfs(false);
        std::fs::remove_file(t.path().join(DRIVER_DIR).join("bind")).unwrap();
        let r = apply_balloon(&cfg(true, Some(11)), t.path());
        assert_eq!(r.failed.len(), 2, "{r:?}");
        assert!(r.failed[0].contains("out of range"), "{r:?}");
        assert!(r.failed[1].starts_with("Cannot write virtio3 to "), "{r:?}");
        assert!(!t.path().join(DRIVER_DIR).join("bind").exists());
        assert_eq!(r.order, Some(9));
    }
}
