//! A VM's disk as the host sees it, through QEMU's own tool `qemu-img`:
//! checking a disk a user brings (its format, its backing chain) and
//! making the copy-on-write overlay a VM writes to when its base must stay
//! untouched. QEMU's block layer does the rest; no image format is parsed
//! here.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors checking or preparing a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `qemu-img` could not be run.
    #[error("Cannot run qemu-img (install qemu-utils)")]
    Spawn(#[source] std::io::Error),
    /// `qemu-img` refused the file: not an image it can open.
    #[error("{path} is not a usable disk image: {reason}")]
    Unusable { path: PathBuf, reason: String },
    /// A format QEMU reads but snowflock does not take.
    #[error("{path} is a {format} image; snowflock takes raw or qcow2 disks")]
    Format { path: PathBuf, format: String },
    /// A backing file outside the disk's own directory.
    #[error("{path} has backing file {backing}, outside its directory {dir}: refused (copy the chain into one directory)")]
    BackingOutside {
        path: PathBuf,
        backing: String,
        dir: PathBuf,
    },
    /// The overlay could not be created.
    #[error("Cannot create the disk overlay {path}: {reason}")]
    Overlay { path: PathBuf, reason: String },
}

/// Disk formats a VM's disk may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// What `qemu-img info --backing-chain` says of one layer.
#[derive(Debug, Deserialize)]
struct Layer {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

/// A checked disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
}

fn qemu_img(args: &[&str]) -> Result<std::process::Output, DiskError> {
    Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(DiskError::Spawn)
}

/// Checks a disk a user brings: QEMU can open it, it is raw or qcow2, and
/// every backing file lies in the disk's own directory (a qcow2 header can
/// name any host file as its backing: a guest must not read the host's).
pub fn inspect(path: &Path) -> Result<DiskInfo, DiskError> {
    let unusable = |reason: String| DiskError::Unusable {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| unusable(e.to_string()))?;
    if !meta.is_file() {
        return Err(unusable("not a regular file".into()));
    }
    let dir = path
        .parent()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| unusable("its directory cannot be resolved".into()))?;
    // Layer by layer: `qemu-img info` opens one image without its backing,
    // so a backing name is checked before anything opens it.
    let mut layer = path.to_path_buf();
    let mut top: Option<(Format, u64)> = None;
    for _ in 0..MAX_CHAIN {
        let info = info_of(&layer)?;
        let format = match info.format.as_str() {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            other => {
                return Err(DiskError::Format {
                    path: layer,
                    format: other.to_string(),
                })
            }
        };
        if format == Format::Qcow2 {
            check_qcow2(&layer)?;
        }
        top.get_or_insert((format, info.virtual_size));
        let Some(b) = info.full_backing_filename.or(info.backing_filename) else {
            let (format, virtual_size) = top.unwrap_or((format, info.virtual_size));
            return Ok(DiskInfo {
                path: path.to_path_buf(),
                format,
                virtual_size,
            });
        };
        let outside = || DiskError::BackingOutside {
            path: layer.clone(),
            backing: b.clone(),
            dir: dir.clone(),
        };
        // Protocols (`nbd:`, `json:`, URLs) are never taken.
        if b.contains(':') {
            return Err(outside());
        }
        let base = layer.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolved = std::fs::canonicalize(base.join(&b))
            .map_err(|e| unusable(format!("its backing file {b}: {e}")))?;
        if !resolved.starts_with(&dir) {
            return Err(outside());
        }
        layer = resolved;
    }
    Err(unusable(format!(
        "its backing chain is longer than {MAX_CHAIN} layers"
    )))
}

/// Longest backing chain accepted.
const MAX_CHAIN: usize = 16;

/// `qemu-img check` of a qcow2 layer: its tables must lie inside the file
/// and agree (a truncated or corrupt qcow2 passes `info`). Leaked
/// clusters (exit 3) are harmless and accepted.
fn check_qcow2(path: &Path) -> Result<(), DiskError> {
    let p = path.to_string_lossy();
    let out = qemu_img(&["check", "-U", "-q", p.as_ref()])?;
    match out.status.code() {
        Some(0 | 3) => Ok(()),
        code => {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .trim_start_matches("qemu-img: ");
            let what = match code {
                Some(2) => "its qcow2 tables are corrupt",
                _ => "qemu-img check cannot read it",
            };
            Err(DiskError::Unusable {
                path: path.to_path_buf(),
                reason: if first.is_empty() {
                    what.to_string()
                } else {
                    format!("{what}: {first}")
                },
            })
        }
    }
}

/// `qemu-img info` of one layer, without opening its backing file.
fn info_of(path: &Path) -> Result<Layer, DiskError> {
    let p = path.to_string_lossy();
    let out = qemu_img(&["info", "--output=json", "-U", p.as_ref()])?;
    let unusable = |reason: String| DiskError::Unusable {
        path: path.to_path_buf(),
        reason,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim().trim_start_matches("qemu-img: ");
        return Err(unusable(err.to_string()));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| unusable(format!("qemu-img info said something unexpected: {e}")))
}

/// Creates a qcow2 overlay at `path` over `backing`, which from then on
/// is only read. 4 KiB clusters: a guest's 4 KiB write replaces a whole
/// cluster, so nothing is read from the backing to complete it. With
/// `size`, the backing is not opened (it is read on demand from another
/// host: opening it here would fetch its header for nothing).
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: Format,
    size: Option<u64>,
) -> Result<(), DiskError> {
    let fail = |reason: String| DiskError::Overlay {
        path: path.to_path_buf(),
        reason,
    };
    let backing = match size {
        Some(_) => backing.to_path_buf(),
        None => std::fs::canonicalize(backing)
            .map_err(|e| fail(format!("{}: {e}", backing.display())))?,
    };
    let (p, b) = (path.to_string_lossy(), backing.to_string_lossy());
    let size = size.map(|s| s.to_string());
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"];
    if size.is_some() {
        args.push("-u");
    }
    args.extend(["-F", backing_format.as_str(), "-b", b.as_ref(), p.as_ref()]);
    if let Some(s) = &size {
        args.push(s);
    }
    let out = qemu_img(&args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// qemu-img is here; where VM tests are required (`make test`, CI) its
    /// absence fails the test instead of skipping it.
    fn have_qemu_img() -> bool {
        let ok = Command::new("qemu-img").arg("--version").output().is_ok();
        if !ok && std::env::var("SNOWFLOCK_REQUIRE_VM").as_deref() == Ok("1") {
            panic!("qemu-img is missing (scripts/setup.sh installs qemu-utils)");
        }
        ok
    }

    #[test]
    fn raw_and_qcow2_are_taken_and_an_overlay_reads_its_base() {
        if !have_qemu_img() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("base.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let info = inspect(&raw).unwrap();
        assert_eq!((info.format, info.virtual_size), (Format::Raw, 1 << 20));
        let top = d.path().join("top.qcow2");
        create_overlay(&top, &raw, Format::Raw, None).unwrap();
        let info = inspect(&top).unwrap();
        assert_eq!((info.format, info.virtual_size), (Format::Qcow2, 1 << 20));
    }

    #[test]
    fn a_backing_file_outside_the_directory_is_refused() {
        if !have_qemu_img() {
            return;
        }
        let outside = tempfile::tempdir().unwrap();
        let raw = outside.path().join("secret.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("user.qcow2");
        create_overlay(&top, &raw, Format::Raw, None).unwrap();
        let e = inspect(&top).unwrap_err();
        assert!(matches!(e, DiskError::BackingOutside { .. }), "{e}");
        assert!(e.to_string().contains("secret.raw"), "{e}");
    }

    #[test]
    fn truncated_and_foreign_files_are_refused_clearly() {
        if !have_qemu_img() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("t.qcow2");
        let out = qemu_img(&["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "64M"]).unwrap();
        assert!(out.status.success());
        // A qcow2 header whose tables are cut off.
        let bytes = std::fs::read(&top).unwrap();
        std::fs::write(&top, &bytes[..200]).unwrap();
        let e = inspect(&top).unwrap_err();
        assert!(matches!(e, DiskError::Unusable { .. }), "{e}");
        let e = inspect(d.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = inspect(&d.path().join("none")).unwrap_err();
        assert!(matches!(e, DiskError::Unusable { .. }), "{e}");
        let vmdk = d.path().join("x.vmdk");
        let out = qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "1M"]).unwrap();
        if out.status.success() {
            let e = inspect(&vmdk).unwrap_err();
            assert!(matches!(e, DiskError::Format { .. }), "{e}");
        }
    }
}
