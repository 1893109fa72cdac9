//! snowflock-image: builds and opens guest images.
//!
//! A guest image is a directory with three files:
//!
//! * `vmlinux`: the uncompressed ELF kernel (QEMU microvm boots it via PVH);
//! * `initramfs.cpio`: the whole root filesystem, cpio newc, uncompressed;
//! * `image.json`: the [`Manifest`].
//!
//! The kernel is Debian's cloud kernel, prepared by `scripts/fetch-kernel.sh`
//! into a kernel directory (`vmlinux` + `modules/`); userspace is busybox-static,
//! the snowflock guest binaries and whatever `--add` brings. See `docs/image.md`.

use std::fs;
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub mod cpio;
pub mod modules;
pub mod rootfs;

use cpio::{Node, Source, Tree};

/// Manifest format this crate writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Kernel command line the daemon starts from (it appends the `sf.*` params).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";
/// File names inside an image directory.
pub const VMLINUX: &str = "vmlinux";
/// See [`VMLINUX`].
pub const INITRAMFS: &str = "initramfs.cpio";
/// See [`VMLINUX`].
pub const MANIFEST: &str = "image.json";
/// The guest agent's file name in `guest_bin_dir` (required).
pub const AGENT_BIN: &str = "snowflock-agent";
/// Other guest binaries copied to `/bin` when `guest_bin_dir` has them.
pub const GUEST_BINS: &[&str] = &["sf", "sf-memtest", "sf-swdemo"];
/// glibc runtime files always copied with `libsnowflock.so` when the host has them.
pub const GLIBC_RUNTIME: &[&str] = &[
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/x86_64-linux-gnu/libm.so.6",
    "/lib/x86_64-linux-gnu/libgcc_s.so.1",
];

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Everything that can go wrong building or opening an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file system operation on a host path failed.
    #[error("Cannot {action} {path}: {source}")]
    Io {
        /// What was being done ("read", "write", ...).
        action: &'static str,
        /// The host path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The kernel directory has no `vmlinux`.
    #[error("Kernel not found: {path} is missing (run scripts/fetch-kernel.sh)")]
    MissingKernel {
        /// The expected vmlinux path.
        path: PathBuf,
    },
    /// A kernel file does not start with the ELF magic.
    #[error("{path} is not an uncompressed ELF kernel (no ELF magic)")]
    NotElf {
        /// The offending file.
        path: PathBuf,
    },
    /// The kernel directory has no module tree.
    #[error("Kernel modules not found: {path} is not a directory (run scripts/fetch-kernel.sh)")]
    MissingModules {
        /// The expected `modules/` directory.
        path: PathBuf,
    },
    /// A needed kernel module is neither a module file nor built in.
    #[error("Kernel module {name} not found in {dir}{}", wanted_by.as_ref().map(|w| format!(" (needed by {w})")).unwrap_or_default())]
    MissingModule {
        /// Module name.
        name: String,
        /// The module that depends on it, if any.
        wanted_by: Option<String>,
        /// The module tree searched.
        dir: PathBuf,
    },
    /// Module dependencies form a cycle.
    #[error("Kernel module dependency cycle through {name}")]
    ModuleCycle {
        /// A module on the cycle.
        name: String,
    },
    /// A module file could not be parsed.
    #[error("Bad kernel module {path}: {reason}")]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A compressed module could not be decompressed.
    #[error("Cannot decompress {path}: {reason}")]
    Decompress {
        /// The compressed file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The busybox binary is missing.
    #[error("Busybox not found: {path} is missing (install busybox-static)")]
    MissingBusybox {
        /// The configured busybox path.
        path: PathBuf,
    },
    /// `busybox --list-full` failed.
    #[error("Cannot list busybox applets with {path}: {reason}")]
    Busybox {
        /// The busybox binary.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The guest agent binary is missing from the guest bin directory.
    #[error("Guest agent not found: {path} is missing (build the guest agent first)")]
    MissingAgent {
        /// The expected agent path.
        path: PathBuf,
    },
    /// A file named in the options (library, header, module, `--add` source) is missing.
    #[error("{what} not found: {path} is missing")]
    MissingInput {
        /// What it is ("Header", "--add source", ...).
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A shared library dependency of `libsnowflock.so` cannot be found on the host.
    #[error("Cannot find {name} (needed by {by}) on this host")]
    MissingLibrary {
        /// Library name or path.
        name: String,
        /// The library that needs it.
        by: PathBuf,
    },
    /// An `--add` spec is malformed.
    #[error("Invalid --add {spec:?}: {reason} (expected SRC:DEST with DEST absolute)")]
    InvalidAdd {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A destination path inside the image is not acceptable.
    #[error("Invalid image path {dest:?}: {reason}")]
    InvalidDest {
        /// The destination path.
        dest: String,
        /// What is wrong.
        reason: String,
    },
    /// Two things were put at incompatible places in the image.
    #[error("Conflicting image path {path}: {reason}")]
    PathConflict {
        /// The image path.
        path: String,
        /// What is already there.
        reason: String,
    },
    /// The image directory does not exist (or is not a directory).
    #[error("Image directory {dir} does not exist")]
    NoImageDir {
        /// The directory.
        dir: PathBuf,
    },
    /// One of the image's files is missing.
    #[error("Image directory {dir} is incomplete: {file} is missing")]
    Incomplete {
        /// The image directory.
        dir: PathBuf,
        /// The missing file name.
        file: &'static str,
    },
    /// One of the image's files is empty.
    #[error("Image directory {dir} is incomplete: {file} is empty")]
    EmptyFile {
        /// The image directory.
        dir: PathBuf,
        /// The empty file name.
        file: &'static str,
    },
    /// `image.json` is not a valid manifest.
    #[error("Bad image manifest {path}: {source}")]
    BadManifest {
        /// The manifest path.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// `image.json` has a format version this build cannot read.
    #[error(
        "Unsupported image format {found} in {path} (this build reads format {FORMAT_VERSION})"
    )]
    UnsupportedFormat {
        /// The manifest path.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
}

/// What to build an image from.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Output directory (created if missing); gets vmlinux, initramfs.cpio, image.json.
    pub out_dir: PathBuf,
    /// Kernel directory with `vmlinux` and `modules/` (e.g. `<cache>/kernel/current`).
    pub kernel_dir: PathBuf,
    /// busybox-static binary (default `/bin/busybox`).
    pub busybox: PathBuf,
    /// Static guest binaries: `snowflock-agent` (required) and [`GUEST_BINS`] (optional).
    pub guest_bin_dir: PathBuf,
    /// Directory with `libsnowflock.so`; if it has one, the library and its glibc runtime go in.
    pub lib_dir: Option<PathBuf>,
    /// `snowflock.h` -> `/usr/include/snowflock.h`.
    pub header: Option<PathBuf>,
    /// `snowflock.py` -> `/usr/lib/python3/snowflock.py`.
    pub python_module: Option<PathBuf>,
    /// Extra files or directories (SRC, absolute DEST), added last: they may replace built-in files.
    pub extra: Vec<(PathBuf, String)>,
}

impl BuildOptions {
    /// Options with the defaults: kernel from [`default_cache_dir`]`/kernel/current`,
    /// `/bin/busybox`, nothing optional.
    pub fn new(out_dir: impl Into<PathBuf>, guest_bin_dir: impl Into<PathBuf>) -> Self {
        BuildOptions {
            out_dir: out_dir.into(),
            kernel_dir: default_cache_dir().join("kernel").join("current"),
            busybox: PathBuf::from("/bin/busybox"),
            guest_bin_dir: guest_bin_dir.into(),
            lib_dir: None,
            header: None,
            python_module: None,
            extra: Vec::new(),
        }
    }
}

/// `image.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// Kernel release (`uname -r` in the guest).
    pub kernel_version: String,
    /// Build time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Every path in the initramfs (absolute), in archive order.
    pub files: Vec<String>,
    /// Default kernel command line ([`DEFAULT_CMDLINE`]).
    pub cmdline: String,
}

/// An opened, validated image directory.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image directory.
    pub dir: PathBuf,
    /// `<dir>/vmlinux`.
    pub vmlinux: PathBuf,
    /// `<dir>/initramfs.cpio`.
    pub initramfs: PathBuf,
    /// The parsed `image.json`.
    pub manifest: Manifest,
}

/// `$SNOWFLOCK_CACHE`, or `/var/cache/snowflock`.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("SNOWFLOCK_CACHE") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("/var/cache/snowflock"),
    }
}

/// The host's TSC frequency in kHz, measured once (about 120 ms) and cached;
/// `None` off x86_64 or when the measurement makes no sense.
///
/// Under TCG the guest's TSC ticks at the host's rate, but the guest kernel
/// calibrates it against the emulated PIT, which fails when the host is busy
/// ("tsc: Unable to calibrate against PIT"); the boot then hangs. Passing
/// `tsc_early_khz=<this>` on the kernel command line skips that calibration,
/// so the daemon appends it to [`Manifest::cmdline`] (see docs/image.md).
pub fn host_tsc_khz() -> Option<u64> {
    static CACHE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *CACHE.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    use std::time::{Duration, Instant};
    #[allow(unused_unsafe)]
    fn rdtsc() -> u64 {
        // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    // A (tsc, instant) pair: the clock read bracketed by two TSC reads, the
    // tightest bracket of a few tries (a preemption widens it).
    fn sample() -> Option<(u64, Instant)> {
        let mut best: Option<(u64, u64, Instant)> = None;
        for _ in 0..20 {
            let a = rdtsc();
            let t = Instant::now();
            let b = rdtsc();
            if b >= a && best.is_none_or(|(w, _, _)| b - a < w) {
                best = Some((b - a, a + (b - a) / 2, t));
            }
        }
        best.map(|(_, tsc, t)| (tsc, t))
    }
    let mut khz = Vec::new();
    for _ in 0..3 {
        let (c0, t0) = sample()?;
        std::thread::sleep(Duration::from_millis(40));
        let (c1, t1) = sample()?;
        let ns = t1.duration_since(t0).as_nanos();
        if ns == 0 || c1 <= c0 {
            return None;
        }
        khz.push(((c1 - c0) as u128 * 1_000_000 / ns) as u64);
    }
    khz.sort_unstable();
    Some(khz[1]).filter(|k| (100_000..=20_000_000).contains(k))
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

/// Parses `SRC:DEST`. The split is at the last `:` (DEST must be absolute and
/// below `/`, without `.`/`..`); SRC must be non-empty. Existence of SRC is
/// checked by [`build`].
pub fn parse_add(spec: &str) -> Result<(PathBuf, String), ImageError> {
    let bad = |reason: &str| ImageError::InvalidAdd {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (src, dest) = spec
        .rsplit_once(':')
        .ok_or_else(|| bad("no ':' separator"))?;
    if src.is_empty() {
        return Err(bad("SRC is empty"));
    }
    if dest.is_empty() {
        return Err(bad("DEST is empty"));
    }
    cpio::normalize(dest).map_err(|e| match e {
        ImageError::InvalidDest { reason, .. } => bad(&format!("DEST {reason}")),
        other => other,
    })?;
    Ok((PathBuf::from(src), dest.to_string()))
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn has_elf_magic(path: &Path) -> Result<bool, ImageError> {
    let mut f = fs::File::open(path).map_err(io_err("read", path))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == ELF_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn perm_of(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

impl Image {
    /// Opens and validates an image directory.
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        if !dir.is_dir() {
            return Err(ImageError::NoImageDir {
                dir: dir.to_path_buf(),
            });
        }
        for file in [VMLINUX, INITRAMFS, MANIFEST] {
            let p = dir.join(file);
            match fs::metadata(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ImageError::Incomplete {
                        dir: dir.to_path_buf(),
                        file,
                    })
                }
                Err(e) => return Err(io_err("read", &p)(e)),
                Ok(m) if !m.is_file() => {
                    return Err(ImageError::Incomplete {
                        dir: dir.to_path_buf(),
                        file,
                    })
                }
                Ok(m) if m.len() == 0 => {
                    return Err(ImageError::EmptyFile {
                        dir: dir.to_path_buf(),
                        file,
                    })
                }
                Ok(_) => {}
            }
        }
        let vmlinux = dir.join(VMLINUX);
        if !has_elf_magic(&vmlinux)? {
            return Err(ImageError::NotElf { path: vmlinux });
        }
        let mpath = dir.join(MANIFEST);
        let text = fs::read(&mpath).map_err(io_err("read", &mpath))?;
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        // Check the version first, so a newer manifest is reported as such
        // rather than as a parse error.
        let v: Version =
            serde_json::from_slice(&text).map_err(|source| ImageError::BadManifest {
                path: mpath.clone(),
                source,
            })?;
        if v.format == 0 || v.format > FORMAT_VERSION {
            return Err(ImageError::UnsupportedFormat {
                path: mpath,
                found: v.format,
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|source| ImageError::BadManifest {
                path: mpath.clone(),
                source,
            })?;
        Ok(Image {
            dir: dir.to_path_buf(),
            vmlinux,
            initramfs: dir.join(INITRAMFS),
            manifest,
        })
    }
}

/// The kernel release of a kernel directory: the name `modules/` resolves to
/// (`lib/modules/<kver>`), else the resolved directory's own name.
fn kernel_version(kernel_dir: &Path) -> String {
    let name_of = |p: &Path| {
        fs::canonicalize(p)
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    name_of(&kernel_dir.join("modules"))
        .filter(|n| n != "modules")
        .or_else(|| name_of(kernel_dir))
        .unwrap_or_else(|| "unknown".to_string())
}

fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let fail = |reason: String| ImageError::Busybox {
        path: busybox.to_path_buf(),
        reason,
    };
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!("exit status {}", out.status)));
    }
    let text = String::from_utf8(out.stdout).map_err(|_| fail("output is not UTF-8".into()))?;
    let list: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("..") && !l.starts_with('/'))
        .map(|l| format!("/{l}"))
        .collect();
    if list.is_empty() {
        return Err(fail("it lists no applets".into()));
    }
    Ok(list)
}

/// Shared objects `lib` needs, as absolute host paths, from `ldd`.
fn ldd(lib: &Path) -> Result<Vec<String>, ImageError> {
    let out = match Command::new("ldd").arg(lib).output() {
        Ok(o) if o.status.success() => o,
        // No ldd (or it refuses): fall back to the known runtime.
        _ => return Ok(Vec::new()),
    };
    let mut paths = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        if let Some((name, rest)) = line.split_once("=>") {
            let target = rest.split_whitespace().next().unwrap_or("");
            if target == "not" || target.is_empty() {
                return Err(ImageError::MissingLibrary {
                    name: name.trim().to_string(),
                    by: lib.to_path_buf(),
                });
            }
            if target.starts_with('/') {
                paths.push(target.to_string());
            }
        } else if let Some(p) = line
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            paths.push(p.to_string());
        }
    }
    Ok(paths)
}

/// Adds `src` (file, symlink or directory, recursively) at `dest`.
fn add_path(tree: &mut Tree, src: &Path, dest: &str) -> Result<(), ImageError> {
    let meta = fs::symlink_metadata(src).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ImageError::MissingInput {
                what: "--add source",
                path: src.to_path_buf(),
            }
        } else {
            io_err("read", src)(e)
        }
    })?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src).map_err(io_err("read", src))?;
        tree.insert(dest, Node::Symlink(target.to_string_lossy().into_owned()))
    } else if ft.is_dir() {
        use std::os::unix::fs::PermissionsExt;
        tree.insert(dest, Node::Dir(meta.permissions().mode() & 0o7777))?;
        let mut entries: Vec<_> = fs::read_dir(src)
            .map_err(io_err("list", src))?
            .collect::<Result<_, _>>()
            .map_err(io_err("list", src))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_str().ok_or_else(|| ImageError::InvalidDest {
                dest: format!("{dest}/{}", name.to_string_lossy()),
                reason: "file name is not UTF-8".into(),
            })?;
            add_path(
                tree,
                &e.path(),
                &format!("{}/{name}", dest.trim_end_matches('/')),
            )?;
        }
        Ok(())
    } else if ft.is_file() {
        tree.insert(
            dest,
            Node::File(perm_of(&meta), Source::Path(src.to_path_buf())),
        )
    } else {
        Err(ImageError::InvalidDest {
            dest: dest.to_string(),
            reason: format!("{} is not a file, directory or symlink", src.display()),
        })
    }
}

/// A required input file: must exist and be a regular file (symlinks followed).
fn input_file(what: &'static str, path: &Path) -> Result<fs::Metadata, ImageError> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(m),
        Ok(_) => Err(ImageError::MissingInput {
            what,
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ImageError::MissingInput {
            what,
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Assembles the root filesystem tree for `opts` (without writing anything).
/// The contents of `path` without debug information, when `strip` is
/// available: release builds keep debuginfo for host backtraces, but in the
/// initramfs it would be unpacked into guest RAM (~25 MB per binary).
/// Falls back to the file as is.
fn stripped(path: PathBuf) -> Source {
    let Ok(tmp) = tempfile_path() else {
        return Source::Path(path);
    };
    let ok = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let data = if ok { fs::read(&tmp).ok() } else { None };
    let _ = fs::remove_file(&tmp);
    match data {
        Some(d) => Source::Bytes(d),
        None => Source::Path(path),
    }
}

fn tempfile_path() -> std::io::Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "snowflock-strip-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(p)
}

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
    fs::create_dir_all(out).map_err(io_err("create", out))?;
    // An old manifest must not vouch for half-written files.
    let manifest_path = out.join(MANIFEST);
    match fs::remove_file(&manifest_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("remove", &manifest_path)(e))
        }
        _ => {}
    }

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

    let manifest = Manifest {
        format: FORMAT_VERSION,
        kernel_version,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        files: tree.paths(),
        cmdline: DEFAULT_CMDLINE.to_string(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    let tmp = out.join(".image.json.tmp");
    fs::write(&tmp, json).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &manifest_path).map_err(io_err("write", &manifest_path))?;
    tracing::info!(dir = %out.display(), kernel = %manifest.kernel_version, files = manifest.files.len(), "image built");
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn tsc_khz_is_plausible_and_cached() {
        let k = host_tsc_khz().expect("x86_64 host has a TSC");
        assert!((100_000..=20_000_000).contains(&k), "{k}");
        assert_eq!(host_tsc_khz(), Some(k));
    }

    #[test]
    fn parse_add_ok() {
        assert_eq!(
            parse_add("a/b:/opt/b").unwrap(),
            (PathBuf::from("a/b"), "/opt/b".to_string())
        );
        // the last ':' splits, so SRC may contain ':'
        assert_eq!(
            parse_add("x:y:/z").unwrap(),
            (PathBuf::from("x:y"), "/z".to_string())
        );
    }

    #[test]
    fn parse_add_errors() {
        for (spec, needle) in [
            ("nocolon", "no ':'"),
            (":/x", "SRC is empty"),
            ("a:", "DEST is empty"),
            ("a:rel/x", "absolute"),
            ("a:/", "below /"),
            ("a:/x/../y", "'..'"),
        ] {
            let e = parse_add(spec).unwrap_err();
            assert!(matches!(e, ImageError::InvalidAdd { .. }), "{spec}: {e:?}");
            let msg = e.to_string();
            assert!(msg.contains(needle), "{spec}: {msg}");
            assert!(msg.starts_with("Invalid --add"), "{msg}");
        }
    }

    fn write_image(dir: &Path) {
        fs::write(dir.join(VMLINUX), b"\x7fELF rest").unwrap();
        fs::write(dir.join(INITRAMFS), b"070701").unwrap();
        let m = Manifest {
            format: 1,
            kernel_version: "k".into(),
            created_unix: 1,
            files: vec!["/init".into()],
            cmdline: DEFAULT_CMDLINE.into(),
        };
        fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
    }

    #[test]
    fn open_complete_image() {
        let d = tempfile::tempdir().unwrap();
        write_image(d.path());
        let img = Image::open(d.path()).unwrap();
        assert_eq!(img.vmlinux, d.path().join("vmlinux"));
        assert_eq!(img.initramfs, d.path().join("initramfs.cpio"));
        assert_eq!(img.manifest.kernel_version, "k");
    }

    #[test]
    fn open_reports_each_missing_file() {
        for file in [VMLINUX, INITRAMFS, MANIFEST] {
            let d = tempfile::tempdir().unwrap();
            write_image(d.path());
            fs::remove_file(d.path().join(file)).unwrap();
            let msg = Image::open(d.path()).unwrap_err().to_string();
            assert_eq!(
                msg,
                format!(
                    "Image directory {} is incomplete: {file} is missing",
                    d.path().display()
                )
            );
        }
        let d = tempfile::tempdir().unwrap();
        let msg = Image::open(d.path()).unwrap_err().to_string();
        assert!(msg.ends_with("vmlinux is missing"), "{msg}");
    }

    #[test]
    fn open_reports_bad_files() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope");
        assert_eq!(
            Image::open(&missing).unwrap_err().to_string(),
            format!("Image directory {} does not exist", missing.display())
        );

        write_image(d.path());
        fs::write(d.path().join(INITRAMFS), b"").unwrap();
        assert!(Image::open(d.path())
            .unwrap_err()
            .to_string()
            .ends_with("initramfs.cpio is empty"));

        write_image(d.path());
        fs::write(d.path().join(VMLINUX), b"MZ\0\0bzImage").unwrap();
        let e = Image::open(d.path()).unwrap_err();
        assert!(
            matches!(e, ImageError::NotElf { .. }) && e.to_string().contains("vmlinux"),
            "{e}"
        );

        write_image(d.path());
        fs::write(d.path().join(MANIFEST), b"{not json").unwrap();
        let e = Image::open(d.path()).unwrap_err();
        assert!(
            matches!(e, ImageError::BadManifest { .. }) && e.to_string().contains("image.json"),
            "{e}"
        );

        fs::write(d.path().join(MANIFEST), br#"{"format": 99}"#).unwrap();
        let e = Image::open(d.path()).unwrap_err();
        assert!(
            matches!(e, ImageError::UnsupportedFormat { found: 99, .. }),
            "{e}"
        );
        assert!(e.to_string().starts_with("Unsupported image format 99"));

        fs::write(d.path().join(MANIFEST), br#"{"format": 1}"#).unwrap();
        assert!(matches!(
            Image::open(d.path()).unwrap_err(),
            ImageError::BadManifest { .. }
        ));
    }

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
        assert_eq!(m.format, FORMAT_VERSION);
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
        let cpio = fs::read(&img.initramfs).unwrap();
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
        assert_eq!(fs::read(&img.initramfs).unwrap(), cpio);
    }
}
