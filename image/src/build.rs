//! [`build`]: an image directory from [`BuildOptions`], each file written
//! under a temporary name and renamed into place, the manifest last.

use crate::error::io_err;
use crate::kernel::{has_elf_magic, kernel_version};
use crate::tree::build_tree;
use crate::{BuildOptions, ImageError, ImageKind, Manifest, DEFAULT_CMDLINE, INITRAMFS, VMLINUX};
use std::fs;
use std::io::BufWriter;

/// Builds an image into `opts.out_dir`: `vmlinux`, `initramfs.cpio`, then
/// `image.json` (each written to a temporary name and renamed into place).
pub fn build(opts: &BuildOptions) -> Result<Manifest, ImageError> {
    let src_vmlinux = opts.kernel_dir.join(VMLINUX);
    if !src_vmlinux.is_file() {
        return Err(ImageError::MissingKernel { path: src_vmlinux });
    }
    if !has_elf_magic(&src_vmlinux)? {
        return Err(ImageError::NotElf { path: src_vmlinux });
    }
    let kernel_version = kernel_version(&opts.kernel_dir);
    let tree = build_tree(opts)?;

    let out = &opts.out_dir;
    crate::manifest::begin_build(out)?;

    let tmp = out.join(".vmlinux.tmp");
    fs::copy(&src_vmlinux, &tmp).map_err(io_err("copy", &src_vmlinux))?;
    fs::rename(&tmp, out.join(VMLINUX)).map_err(io_err("write", &out.join(VMLINUX)))?;

    let tmp = out.join(".initramfs.cpio.tmp");
    let f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    let w = tree.write(BufWriter::new(f))?;
    let f = w
        .into_inner()
        .map_err(|e| io_err("write", &tmp)(e.into_error()))?;
    f.sync_all().map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, out.join(INITRAMFS)).map_err(io_err("write", &out.join(INITRAMFS)))?;

    let mut manifest = Manifest::new(ImageKind::Initramfs, kernel_version, DEFAULT_CMDLINE);
    manifest.files = tree.paths();
    manifest.write_to(out)?;
    tracing::info!(dir = %out.display(), kernel = %manifest.kernel_version, files = manifest.files.len(), "image built");
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Image;
    use std::path::Path;

    /// A fake kernel tree and a fake busybox (a script printing two applets).
    fn fake_inputs(root: &Path) -> BuildOptions {
        use std::os::unix::fs::PermissionsExt;
        let k = root.join("kernel");
        let m = k.join("root/lib/modules/9.9.9-test");
        fs::create_dir_all(m.join("kernel/drivers")).unwrap();
        std::os::unix::fs::symlink("root/lib/modules/9.9.9-test", k.join("modules")).unwrap();
        fs::write(k.join("vmlinux"), b"\x7fELF kernel").unwrap();
        let mut dep = String::new();
        for name in [
            "virtio_mmio",
            "virtio_console",
            "virtio_net",
            "virtio-rng",
            "virtio_balloon",
            "virtio",
            "virtio_ring",
        ] {
            fs::write(m.join(format!("kernel/drivers/{name}.ko")), name).unwrap();
            let deps = match name {
                "virtio_ring" => "",
                "virtio" => "kernel/drivers/virtio_ring.ko",
                _ => "kernel/drivers/virtio.ko kernel/drivers/virtio_ring.ko",
            };
            dep.push_str(&format!("kernel/drivers/{name}.ko: {deps}\n"));
        }
        fs::write(m.join("modules.dep"), dep).unwrap();
        let bb = root.join("busybox");
        fs::write(
            &bb,
            "#!/bin/sh\necho bin/sh\necho usr/bin/env\necho bin/busybox\n",
        )
        .unwrap();
        fs::set_permissions(&bb, fs::Permissions::from_mode(0o755)).unwrap();
        let mut o = BuildOptions::new(root.join("out"), root.join("bins"));
        o.kernel_dir = k;
        o.busybox = bb;
        o
    }

    #[test]
    fn build_errors_are_specific() {
        let d = tempfile::tempdir().unwrap();
        let mut o = BuildOptions::new(d.path().join("out"), d.path().join("bins"));
        o.kernel_dir = d.path().join("nokernel");
        assert!(matches!(
            build(&o).unwrap_err(),
            ImageError::MissingKernel { .. }
        ));

        let mut o = fake_inputs(d.path());
        let e = build(&o).unwrap_err();
        assert!(matches!(e, ImageError::MissingAgent { .. }), "{e}");
        assert!(e.to_string().contains("snowflock-agent"), "{e}");

        fs::create_dir_all(d.path().join("bins")).unwrap();
        fs::write(d.path().join("bins/snowflock-agent"), "#!/bin/sh\n").unwrap();
        o.extra.push((d.path().join("missing"), "/x".into()));
        let e = build(&o).unwrap_err();
        assert!(
            matches!(e, ImageError::MissingInput { .. }) && e.to_string().contains("missing"),
            "{e}"
        );

        o.extra.clear();
        o.header = Some(d.path().join("nope.h"));
        assert!(build(&o)
            .unwrap_err()
            .to_string()
            .starts_with("Header not found"));

        o.header = None;
        o.busybox = d.path().join("no-busybox");
        assert!(matches!(
            build(&o).unwrap_err(),
            ImageError::MissingBusybox { .. }
        ));
    }

    #[test]
    fn build_fake_image() {
        let d = tempfile::tempdir().unwrap();
        let mut o = fake_inputs(d.path());
        fs::create_dir_all(d.path().join("bins")).unwrap();
        fs::write(d.path().join("bins/snowflock-agent"), "#!/bin/sh\n").unwrap();
        fs::write(d.path().join("bins/sf"), "sf").unwrap();
        fs::create_dir_all(d.path().join("extra/sub")).unwrap();
        fs::write(d.path().join("extra/sub/f.txt"), "hi").unwrap();
        fs::write(d.path().join("inittab"), "custom").unwrap();
        o.extra = vec![
            (d.path().join("extra"), "/opt/extra".into()),
            (d.path().join("inittab"), "/etc/inittab".into()),
        ];
        let m = build(&o).unwrap();
        assert_eq!(m.format, crate::FORMAT_VERSION);
        assert_eq!(m.kernel_version, "9.9.9-test");
        assert_eq!(m.cmdline, DEFAULT_CMDLINE);
        for p in [
            "/init",
            "/sbin/init",
            "/bin/busybox",
            "/bin/sh",
            "/usr/bin/env",
            "/bin/sf",
            "/sbin/snowflock-agent",
            "/etc/inittab",
            "/etc/init.d/rcS",
            "/etc/snowflock/agent.toml",
            "/dev/console",
            "/lib/modules/load-order",
            "/lib/modules/virtio-rng.ko",
            "/opt/extra/sub/f.txt",
        ] {
            assert!(
                m.files.iter().any(|f| f == p),
                "{p} missing from {:?}",
                m.files
            );
        }
        let img = Image::open(&d.path().join("out")).unwrap();
        assert_eq!(img.manifest, m);
        let cpio = fs::read(&img.initrd).unwrap();
        let text = String::from_utf8_lossy(&cpio);
        assert!(
            text.contains("virtio_ring.ko\nvirtio.ko\nvirtio_mmio.ko\n"),
            "load order"
        );
        assert!(
            text.contains("etc/inittab\0")
                && text.contains("custom")
                && !text.contains("::respawn")
        );
        assert_eq!(cpio.len() % 512, 0);
        // Building twice gives the same archive.
        build(&o).unwrap();
        assert_eq!(fs::read(&img.initrd).unwrap(), cpio);
    }
}
