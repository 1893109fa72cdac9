//! [`BuildOptions`]: what an image is built from, and the default cache
//! directory the kernel is looked up in.

use std::path::PathBuf;

/// What to build an image from.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Output directory (created if missing); gets vmlinux, initramfs.cpio, image.json.
    pub out_dir: PathBuf,
    /// Kernel directory with `vmlinux` and `modules/` (e.g. `<cache>/kernel/current`).
    pub kernel_dir: PathBuf,
    /// busybox-static binary (default `/bin/busybox`).
    pub busybox: PathBuf,
    /// Static guest binaries: `snowflock-agent` (required) and [`GUEST_BINS`](crate::GUEST_BINS) (optional).
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

/// `$SNOWFLOCK_CACHE`, or `/var/cache/snowflock`.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("SNOWFLOCK_CACHE") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("/var/cache/snowflock"),
    }
}
