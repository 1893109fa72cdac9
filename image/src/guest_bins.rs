//! What goes into the image from the host besides busybox and the kernel:
//! the snowflock guest binaries, `libsnowflock.so` with the glibc runtime it
//! needs (found with `ldd`), all stripped of debug information.

use crate::cpio::Source;
use crate::ImageError;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest agent's file name in `guest_bin_dir` (required).
pub const AGENT_BIN: &str = "snowflock-agent";
/// Other guest binaries copied to `/bin` when `guest_bin_dir` has them.
pub const GUEST_BINS: &[&str] = &["sf", "sf-exec", "sf-memtest", "sf-swdemo"];
/// glibc runtime files always copied with `libsnowflock.so` when the host has them.
pub const GLIBC_RUNTIME: &[&str] = &[
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/x86_64-linux-gnu/libm.so.6",
    "/lib/x86_64-linux-gnu/libgcc_s.so.1",
];

/// Shared objects `lib` needs, as absolute host paths, from `ldd`.
pub(crate) fn ldd(lib: &Path) -> Result<Vec<String>, ImageError> {
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

/// The contents of `path` without debug information, when `strip` is
/// available: release builds keep debuginfo for host backtraces, but in the
/// initramfs it would be unpacked into guest RAM (~25 MB per binary).
/// Falls back to the file as is.
pub(crate) fn stripped(path: PathBuf) -> Source {
    let tmp = tempfile_path();
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

/// A fresh path in the temp directory for one `strip` output.
fn tempfile_path() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "snowflock-strip-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}
