//! The fixed changes a Debian image's tree gets after debootstrap and the
//! guest package: what the disk is mounted as, a neutral identity the agent
//! replaces at boot (`sf.*` kernel parameters), console login, and the
//! user's `--add` files.

use crate::error::io_err;
use crate::host_tools::run;
use crate::ImageError;
use std::fs;
use std::path::Path;
use std::process::Command;

/// `/etc/fstab`: the root disk, with `discard` so blocks the guest frees
/// become holes (a clone fetches nothing for them).
pub const FSTAB: &str = "/dev/vda / ext4 rw,discard,errors=remount-ro 0 1\n";
/// `/etc/hosts`.
pub const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n";

/// Units of the base system that would only cost boot time or write to
/// the disk behind the user's back in a short-lived VM.
const MASKED: &[&str] = &["e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer"];

fn write(root: &Path, path: &str, text: &str) -> Result<(), ImageError> {
    let p = root.join(path.trim_start_matches('/'));
    if let Some(dir) = p.parent() {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    fs::write(&p, text).map_err(io_err("write", &p))
}

/// Applies the fixed configuration to the tree at `root`.
pub(crate) fn configure(root: &Path) -> Result<(), ImageError> {
    write(root, "/etc/fstab", FSTAB)?;
    write(root, "/etc/hostname", "snowflock\n")?;
    write(root, "/etc/hosts", HOSTS)?;
    // Empty: systemd treats the machine as new; the agent writes the VM's
    // own ID from `sf.machine_id`.
    write(root, "/etc/machine-id", "")?;
    // Root logs in on the serial console without a password: the console
    // is reachable only through the host's daemon, and the image runs no
    // network login service.
    let mut c = Command::new("chroot");
    c.arg(root).args(["passwd", "-d", "root"]);
    run("Unlocking root's console login", c)?;
    // The image's own systemctl (the host may have none): offline, it
    // only writes the mask links.
    let mut c = Command::new("chroot");
    c.arg(root).args(["systemctl", "mask"]).args(MASKED);
    run("Masking units", c)?;
    Ok(())
}

/// Copies a host file or directory (recursively, keeping modes) to `dest`
/// in the tree.
pub(crate) fn add(root: &Path, src: &Path, dest: &str) -> Result<(), ImageError> {
    let rel = crate::cpio::normalize(dest)?;
    let target = root.join(rel.trim_start_matches('/'));
    if let Some(dir) = target.parent() {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let mut c = Command::new("cp");
    c.args(["-a", "--no-target-directory"])
        .arg(src)
        .arg(&target);
    run(&format!("Adding {} at {dest}", src.display()), c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_copies_files_and_directories_inside_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir(&root).unwrap();
        let src = d.path().join("data");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/f"), b"x").unwrap();
        add(&root, &src, "/opt/data").unwrap();
        assert_eq!(fs::read(root.join("opt/data/sub/f")).unwrap(), b"x");
        add(&root, &src.join("sub/f"), "/usr/local/bin/f").unwrap();
        assert!(root.join("usr/local/bin/f").is_file());
        assert!(add(&root, &src, "/../../escape").is_err());
        assert!(!d.path().join("escape").exists());
    }
}
