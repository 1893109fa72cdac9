//! Initramfs assembly: the whole root filesystem as a [`Tree`], from the
//! skeleton, busybox, `/etc` ([`crate::rootfs`]), kernel modules, guest
//! binaries and libraries, optional files and `--add`, in that order.

use crate::add::{add_path, input_file};
use crate::busybox::busybox_applets;
use crate::cpio::{Node, Source, Tree};
use crate::error::io_err;
use crate::guest_bins::{ldd, stripped, AGENT_BIN, GLIBC_RUNTIME, GUEST_BINS};
use crate::{modules, rootfs, BuildOptions, ImageError};
use std::fs;
use std::path::Path;

/// Assembles the root filesystem tree for `opts` (without writing anything).
pub fn build_tree(opts: &BuildOptions) -> Result<Tree, ImageError> {
    let mut t = Tree::new();

    // Skeleton.
    for d in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/usr/lib",
        "/lib",
        "/lib/modules",
        "/etc/init.d",
        "/etc/snowflock",
    ] {
        t.insert(d, Node::Dir(0o755))?;
    }
    for d in ["/proc", "/sys", "/dev", "/run", "/var", "/mnt"] {
        t.insert(d, Node::Dir(0o755))?;
    }
    t.insert("/root", Node::Dir(0o700))?;
    t.insert("/tmp", Node::Dir(0o1777))?;
    t.insert("/var/tmp", Node::Dir(0o1777))?;
    t.insert("/var/run", Node::Symlink("/run".into()))?;
    // The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
    t.insert("/dev/console", Node::CharDev(0o600, 5, 1))?;
    t.insert("/dev/null", Node::CharDev(0o666, 1, 3))?;

    // Busybox and its applets.
    if !opts.busybox.is_file() {
        return Err(ImageError::MissingBusybox {
            path: opts.busybox.clone(),
        });
    }
    let busybox = fs::canonicalize(&opts.busybox).map_err(io_err("read", &opts.busybox))?;
    t.insert(
        "/bin/busybox",
        Node::File(0o755, Source::Path(busybox.clone())),
    )?;
    for applet in busybox_applets(&busybox)? {
        if applet != "/bin/busybox" {
            t.insert(&applet, Node::Symlink("/bin/busybox".into()))?;
        }
    }
    for link in ["/bin/sh", "/sbin/init", "/init"] {
        t.insert(link, Node::Symlink("/bin/busybox".into()))?;
    }

    // Init and /etc.
    t.insert(
        "/etc/inittab",
        Node::File(0o644, Source::Bytes(rootfs::INITTAB.into())),
    )?;
    t.insert(
        "/etc/init.d/rcS",
        Node::File(0o755, Source::Bytes(rootfs::RCS.into())),
    )?;
    t.insert(
        "/etc/passwd",
        Node::File(0o644, Source::Bytes(rootfs::PASSWD.into())),
    )?;
    t.insert(
        "/etc/group",
        Node::File(0o644, Source::Bytes(rootfs::GROUP.into())),
    )?;
    t.insert(
        "/etc/hosts",
        Node::File(0o644, Source::Bytes(rootfs::HOSTS.into())),
    )?;
    t.insert(
        "/etc/snowflock/agent.toml",
        Node::File(0o644, Source::Bytes(rootfs::AGENT_TOML.into())),
    )?;

    // Kernel modules.
    let mods = modules::resolve(&opts.kernel_dir.join("modules"), modules::GUEST_MODULES)?;
    let mut order = String::new();
    for m in mods {
        order.push_str(&m.file_name);
        order.push('\n');
        t.insert(
            &format!("/lib/modules/{}", m.file_name),
            Node::File(0o644, Source::Bytes(m.data)),
        )?;
    }
    t.insert(
        "/lib/modules/load-order",
        Node::File(0o644, Source::Bytes(order.into_bytes())),
    )?;

    // Guest binaries.
    let agent = opts.guest_bin_dir.join(AGENT_BIN);
    if !agent.is_file() {
        return Err(ImageError::MissingAgent { path: agent });
    }
    t.insert("/sbin/snowflock-agent", Node::File(0o755, stripped(agent)))?;
    for bin in GUEST_BINS {
        let p = opts.guest_bin_dir.join(bin);
        if p.is_file() {
            t.insert(&format!("/bin/{bin}"), Node::File(0o755, stripped(p)))?;
        }
    }

    // libsnowflock.so and the glibc runtime it needs.
    if let Some(dir) = &opts.lib_dir {
        let lib = dir.join("libsnowflock.so");
        if lib.is_file() {
            t.insert(
                "/usr/lib/libsnowflock.so",
                Node::File(0o755, stripped(lib.clone())),
            )?;
            let mut runtime = ldd(&lib)?;
            runtime.extend(GLIBC_RUNTIME.iter().map(|s| s.to_string()));
            for p in runtime {
                let host = Path::new(&p);
                if t.contains(&p) {
                    continue;
                }
                match fs::canonicalize(host) {
                    Ok(real) if real.is_file() => {
                        t.insert(&p, Node::File(0o755, Source::Path(real)))?
                    }
                    _ if p.contains("libc.so.6") || p.ends_with("/lib64/ld-linux-x86-64.so.2") => {
                        return Err(ImageError::MissingLibrary { name: p, by: lib })
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(h) = &opts.header {
        input_file("Header", h)?;
        t.insert(
            "/usr/include/snowflock.h",
            Node::File(0o644, Source::Path(h.clone())),
        )?;
    }
    if let Some(py) = &opts.python_module {
        input_file("Python module", py)?;
        t.insert(
            "/usr/lib/python3/snowflock.py",
            Node::File(0o644, Source::Path(py.clone())),
        )?;
    }

    // --add, last, so it can replace anything above.
    for (src, dest) in &opts.extra {
        add_path(&mut t, src, dest)?;
    }
    Ok(t)
}
