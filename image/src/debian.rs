//! [`build_debian`]: a Debian disk image. debootstrap makes a minimal
//! Debian of the host's own release from the host's apt sources, with
//! systemd, udev and Debian's cloud kernel; the snowflock guest package is
//! installed in it with `dpkg -i` (its postinst enables the agent's unit);
//! `mkfs.ext4 -d` turns the tree into a sparse raw ext4 disk. The kernel
//! and Debian's initrd are copied out beside the disk: the daemon boots
//! them directly (QEMU `-kernel`/`-initrd`), root on `/dev/vda`.
//!
//! Two caches make a second build fast: debootstrap's downloaded packages
//! (`<cache>/debs`), and the finished base tree as a tarball keyed by
//! suite, archive and package list (`<cache>/rootfs-<key>.tar`). A build
//! whose every input (that key, the guest package, the extra files, the
//! size) matches the image already in the output directory does nothing.

use crate::apt_sources::{find_source, host_codename, AptSource};
use crate::error::io_err;
use crate::host_tools::{remove_build_dir, run, run_lines};
use crate::{ImageError, ImageKind, Manifest, DEBIAN_CMDLINE, DISK, INITRD, VMLINUZ};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Packages every Debian image has on top of debootstrap's `minbase`.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "iproute2",
    "iputils-ping",
    "procps",
    "kmod",
    "e2fsprogs",
    "python3",
];
/// What an image for MPI jobs adds to [`BASE_PACKAGES`]: both MPIs with
/// their compiler wrappers, gcc for `mpicc`, and `mpich-doc` for the stock
/// example `cpi.c`. The MPI demo, the MPI benchmark and the tests use this
/// one list, so they share one cached base system.
pub const MPI_PACKAGES: &[&str] = &[
    "mpich",
    "libmpich-dev",
    "mpich-doc",
    "openmpi-bin",
    "libopenmpi-dev",
    "gcc",
    "libc6-dev",
];
/// Disk size when none is given.
pub const DEFAULT_DISK_SIZE: u64 = 4 << 30;
/// Smallest disk accepted (the base system alone takes ~500 MiB).
pub const MIN_DISK_SIZE: u64 = 1 << 30;
/// Suite used when the host's `os-release` names none.
const FALLBACK_SUITE: &str = "bookworm";

/// What a Debian image is built from.
#[derive(Debug, Clone)]
pub struct DebianOptions {
    /// Output directory: `vmlinuz`, `initrd.img`, `disk.raw`, `image.json`.
    pub out_dir: PathBuf,
    /// Cache directory for downloaded packages and base trees.
    pub cache_dir: PathBuf,
    /// The `snowflock-guest` package installed into the image.
    pub guest_deb: PathBuf,
    /// Packages wanted besides [`BASE_PACKAGES`].
    pub packages: Vec<String>,
    /// Size of the disk in bytes (sparse: unused space takes no room).
    pub size_bytes: u64,
    /// Extra host files or directories (SRC, absolute DEST), added last.
    pub extra: Vec<(PathBuf, String)>,
    /// The archive; default: the host's apt sources for its own release.
    pub source: Option<AptSource>,
}

impl DebianOptions {
    /// Options with the defaults: cache under
    /// [`default_cache_dir`](crate::default_cache_dir)`/debian`, 4 GiB.
    pub fn new(out_dir: impl Into<PathBuf>, guest_deb: impl Into<PathBuf>) -> Self {
        DebianOptions {
            out_dir: out_dir.into(),
            cache_dir: crate::default_cache_dir().join("debian"),
            guest_deb: guest_deb.into(),
            packages: Vec::new(),
            size_bytes: DEFAULT_DISK_SIZE,
            extra: Vec::new(),
            source: None,
        }
    }
}

/// A Debian package name as policy allows it.
pub fn valid_package_name(p: &str) -> bool {
    let b = p.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(c))
}

/// The package list, base first, sorted and without repeats.
fn package_list(extra: &[String]) -> Result<Vec<String>, ImageError> {
    if let Some(bad) = extra.iter().find(|p| !valid_package_name(p)) {
        return Err(ImageError::InvalidOption(format!(
            "{bad:?} is not a Debian package name"
        )));
    }
    let mut all: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
    all.extend(extra.iter().cloned());
    all.sort();
    all.dedup();
    Ok(all)
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds a file or a directory tree (names, modes, contents) to `h`.
fn hash_path(h: &mut Sha256, p: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(p).map_err(io_err("read", p))?;
    h.update(format!("{:o}\0", meta.permissions().mode()));
    if meta.is_dir() {
        let mut names: Vec<_> = fs::read_dir(p)
            .map_err(io_err("read", p))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            h.update(n.as_encoded_bytes());
            h.update(b"\0");
            hash_path(h, &p.join(n))?;
        }
    } else if meta.file_type().is_symlink() {
        h.update(
            fs::read_link(p)
                .map_err(io_err("read", p))?
                .as_os_str()
                .as_encoded_bytes(),
        );
    } else {
        h.update(fs::read(p).map_err(io_err("read", p))?);
    }
    Ok(())
}

/// The base tree's cache key: suite, archive and packages.
fn rootfs_key(src: &AptSource, packages: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "rootfs-v1\0{}\0{}\0{}",
        src.suite,
        src.uri,
        packages.join(",")
    ));
    hex(h.finalize())[..16].to_string()
}

/// Everything else the image is made of, on top of the base tree.
fn inputs_key(rootfs: &str, opts: &DebianOptions) -> Result<String, ImageError> {
    let mut h = Sha256::new();
    h.update(format!("image-v1\0{rootfs}\0{}\0", opts.size_bytes));
    hash_path(&mut h, &opts.guest_deb)?;
    for (src, dest) in &opts.extra {
        h.update(format!("\0{dest}\0"));
        hash_path(&mut h, src)?;
    }
    Ok(hex(h.finalize())[..32].to_string())
}

/// Builds the image; `progress` gets one line per step (and debootstrap's
/// own, thinned out).
pub fn build_debian(
    opts: &DebianOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, ImageError> {
    if opts.size_bytes < MIN_DISK_SIZE {
        return Err(ImageError::InvalidOption(format!(
            "disk size {} MiB is too small: a Debian image needs at least {} MiB",
            opts.size_bytes >> 20,
            MIN_DISK_SIZE >> 20
        )));
    }
    if !opts.guest_deb.is_file() {
        return Err(ImageError::MissingInput {
            what: "Guest package",
            path: opts.guest_deb.clone(),
        });
    }
    for (src, _) in &opts.extra {
        if fs::symlink_metadata(src).is_err() {
            return Err(ImageError::MissingInput {
                what: "--add source",
                path: src.clone(),
            });
        }
    }
    let packages = package_list(&opts.packages)?;
    let source = match &opts.source {
        Some(s) => s.clone(),
        None => {
            let suite = fs::read_to_string("/etc/os-release")
                .ok()
                .and_then(|t| host_codename(&t))
                .unwrap_or_else(|| FALLBACK_SUITE.to_string());
            find_source(Path::new("/etc/apt"), &suite)?
        }
    };
    let key = rootfs_key(&source, &packages);
    let inputs = inputs_key(&key, opts)?;
    let out = &opts.out_dir;
    if let Ok(img) = crate::Image::open(out) {
        if img.manifest.inputs.as_deref() == Some(inputs.as_str()) {
            progress(&format!("{} is up to date", out.display()));
            return Ok(img.manifest);
        }
    }
    crate::manifest::begin_build(out)?;
    let tar = base_tree(opts, &source, &packages, &key, progress)?;
    let staging = out.join(".staging");
    let res = (|| {
        remove_build_dir(&staging)?;
        fs::create_dir_all(&staging).map_err(io_err("create", &staging))?;
        progress("unpacking the base system");
        let mut c = Command::new("tar");
        c.args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
            .arg(&tar)
            .arg("-C")
            .arg(&staging);
        run("Unpacking the base system", c)?;
        progress("installing the snowflock guest package");
        install_guest_package(&staging, &opts.guest_deb)?;
        crate::debian_root::configure(&staging)?;
        for (src, dest) in &opts.extra {
            crate::debian_root::add(&staging, src, dest)?;
        }
        let kernel_version = copy_boot_files(&staging, out)?;
        progress(&format!(
            "writing the {} MiB ext4 disk (sparse)",
            opts.size_bytes >> 20
        ));
        let tmp = out.join(".disk.raw.tmp");
        let _ = fs::remove_file(&tmp);
        let mut c = Command::new("mkfs.ext4");
        c.args([
            "-q",
            "-F",
            "-L",
            "snowflock-root",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(&staging)
        .arg(&tmp)
        .arg(format!("{}k", opts.size_bytes / 1024));
        run("Making the disk (a larger --size may help)", c)?;
        fs::rename(&tmp, out.join(DISK)).map_err(io_err("write", &out.join(DISK)))?;
        Ok(kernel_version)
    })();
    let cleaned = remove_build_dir(&staging);
    let kernel_version = res?;
    cleaned?;
    let mut m = Manifest::new(ImageKind::Debian, kernel_version, DEBIAN_CMDLINE);
    (m.kernel, m.initrd, m.disk) = (VMLINUZ.into(), INITRD.into(), Some(DISK.into()));
    m.files = packages;
    m.inputs = Some(inputs);
    m.write_to(out)?;
    tracing::info!(dir = %out.display(), kernel = %m.kernel_version, "Debian image built");
    Ok(m)
}

/// The cached base tree for `key`, made with debootstrap if missing.
fn base_tree(
    opts: &DebianOptions,
    src: &AptSource,
    packages: &[String],
    key: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let cache = &opts.cache_dir;
    let tar = cache.join(format!("rootfs-{key}.tar"));
    if tar.is_file() {
        progress(&format!("base system cached ({})", tar.display()));
        return Ok(tar);
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).map_err(io_err("create", &debs))?;
    let target = cache.join(format!(".bootstrap-{key}"));
    progress(&format!(
        "debootstrap {} from {} with {} packages (a few minutes the first time)",
        src.suite,
        src.uri,
        packages.len()
    ));
    let res = (|| {
        remove_build_dir(&target)?;
        let mut c = Command::new("debootstrap");
        c.arg("--variant=minbase")
            .arg(format!("--cache-dir={}", debs.display()))
            .arg(format!("--include={}", BASE_PACKAGES.join(",")))
            .arg(&src.suite)
            .arg(&target)
            .arg(&src.uri);
        let mut last_step = String::new();
        let mut n = 0u32;
        run_lines("debootstrap", c, &mut |l| {
            let Some(rest) = l.strip_prefix("I: ") else {
                return;
            };
            n += 1;
            let step = rest.split_whitespace().next().unwrap_or("").to_string();
            if step != last_step || n.is_multiple_of(50) {
                progress(&format!("debootstrap: {rest}"));
                last_step = step;
            }
        })?;
        let extra: Vec<&String> = packages
            .iter()
            .filter(|p| !BASE_PACKAGES.contains(&p.as_str()))
            .collect();
        if !extra.is_empty() {
            apt_install(&target, &debs, &extra, progress)?;
        }
        progress("saving the base system in the cache");
        let tmp = cache.join(format!(".rootfs-{key}.tar.tmp"));
        let mut c = Command::new("tar");
        c.args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf"])
            .arg(&tmp)
            .arg("-C")
            .arg(&target)
            .arg(".");
        run("Archiving the base system", c)?;
        fs::rename(&tmp, &tar).map_err(io_err("write", &tar))
    })();
    let cleaned = remove_build_dir(&target);
    res?;
    cleaned?;
    Ok(tar)
}

/// Installs `extra` in the tree with the tree's own apt, which resolves
/// dependencies the way a sysadmin's `apt-get install` does (debootstrap's
/// `--include` does not: it fails on packages such as `libopenmpi-dev`).
/// The sources are the ones debootstrap wrote (the host's archive); the
/// downloaded packages go to the same cache as debootstrap's.
fn apt_install(
    root: &Path,
    debs: &Path,
    extra: &[&String],
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let archives = root.join("var/cache/apt/archives");
    fs::create_dir_all(archives.join("partial")).map_err(io_err("create", &archives))?;
    fs::create_dir_all(debs.join("partial")).map_err(io_err("create", debs))?;
    let mut c = Command::new("mount");
    c.arg("--bind").arg(debs).arg(&archives);
    run("Mounting the package cache", c)?;
    let mut c = Command::new("mount");
    c.args(["-t", "proc", "proc"]).arg(root.join("proc"));
    run("Mounting /proc", c)?;
    let chroot = |args: &[&str]| {
        let mut c = Command::new("chroot");
        c.arg(root)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C");
        c
    };
    progress(&format!("apt-get install of {} more packages", extra.len()));
    let res = run("apt-get update", chroot(&["apt-get", "-q", "update"])).and_then(|_| {
        let mut args = vec!["apt-get", "-q", "-y", "--no-install-recommends", "install"];
        args.extend(extra.iter().map(|p| p.as_str()));
        let mut n = 0u32;
        run_lines("apt-get install", chroot(&args), &mut |l| {
            n += 1;
            if l.starts_with("Setting up") && n.is_multiple_of(10) || l.starts_with("Need to get") {
                progress(&format!("apt: {l}"));
            }
        })
    });
    for m in [root.join("proc"), archives] {
        let mut c = Command::new("umount");
        c.arg(&m);
        let _ = run("Unmounting a build mount", c);
    }
    res
}

/// `dpkg -i` of the guest package inside the tree; its postinst enables
/// the agent's unit (checked).
fn install_guest_package(root: &Path, deb: &Path) -> Result<(), ImageError> {
    let inside = Path::new("/tmp/snowflock-guest.deb");
    let host_copy = root.join("tmp/snowflock-guest.deb");
    fs::copy(deb, &host_copy).map_err(io_err("copy", deb))?;
    let mut c = Command::new("chroot");
    c.arg(root).args(["dpkg", "-i"]).arg(inside);
    c.env("DEBIAN_FRONTEND", "noninteractive");
    let res = run("Installing the guest package", c);
    let _ = fs::remove_file(&host_copy);
    res?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants/snowflock-agent.service");
    if fs::symlink_metadata(&wants).is_err() {
        return Err(ImageError::Tool {
            what: "Installing the guest package".into(),
            cmd: format!("dpkg -i {}", deb.display()),
            status: "left snowflock-agent.service disabled".into(),
            tail: String::new(),
        });
    }
    Ok(())
}

/// Copies the tree's kernel and initrd out as `vmlinuz` and `initrd.img`;
/// returns the kernel release.
fn copy_boot_files(root: &Path, out: &Path) -> Result<String, ImageError> {
    let boot = root.join("boot");
    let mut kernels: Vec<String> = fs::read_dir(&boot)
        .map_err(io_err("read", &boot))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    kernels.sort();
    let Some(kver) = kernels.pop() else {
        return Err(ImageError::MissingKernel {
            path: boot.join("vmlinuz-*"),
        });
    };
    for (from, to) in [
        (format!("vmlinuz-{kver}"), VMLINUZ),
        (format!("initrd.img-{kver}"), INITRD),
    ] {
        let src = boot.join(&from);
        if !src.is_file() {
            return Err(ImageError::MissingKernel { path: src });
        }
        let tmp = out.join(format!(".{to}.tmp"));
        fs::copy(&src, &tmp).map_err(io_err("copy", &src))?;
        fs::rename(&tmp, out.join(to)).map_err(io_err("write", &out.join(to)))?;
    }
    Ok(kver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_are_checked_and_the_list_is_stable() {
        assert!(valid_package_name("python3-numpy"));
        assert!(valid_package_name("g++"));
        for bad in ["", "a", "Foo", "a b", "-x", "x;rm", "pkg/evil"] {
            assert!(!valid_package_name(bad), "{bad:?}");
            assert!(package_list(&[bad.to_string()]).is_err());
        }
        let a = package_list(&["zsh".into(), "udev".into()]).unwrap();
        let b = package_list(&["udev".into(), "zsh".into(), "zsh".into()]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), BASE_PACKAGES.len() + 1);
    }

    #[test]
    fn keys_change_with_their_inputs() {
        let s = AptSource {
            uri: "http://a/debian".into(),
            suite: "bookworm".into(),
        };
        let p = package_list(&[]).unwrap();
        let k = rootfs_key(&s, &p);
        assert_eq!(k, rootfs_key(&s, &p));
        assert_ne!(k, rootfs_key(&s, &package_list(&["zsh".into()]).unwrap()));
        let d = tempfile::tempdir().unwrap();
        let deb = d.path().join("g.deb");
        fs::write(&deb, b"one").unwrap();
        let mut o = DebianOptions::new(d.path().join("out"), &deb);
        let a = inputs_key(&k, &o).unwrap();
        fs::write(&deb, b"two").unwrap();
        let b = inputs_key(&k, &o).unwrap();
        assert_ne!(a, b);
        o.size_bytes *= 2;
        assert_ne!(b, inputs_key(&k, &o).unwrap());
    }

    #[test]
    fn bad_options_are_refused_before_any_work() {
        let d = tempfile::tempdir().unwrap();
        let mut o = DebianOptions::new(d.path().join("out"), d.path().join("missing.deb"));
        let e = build_debian(&o, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("missing.deb"), "{e}");
        o.size_bytes = 100 << 20;
        let e = build_debian(&o, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        assert!(!d.path().join("out").exists());
    }
}
