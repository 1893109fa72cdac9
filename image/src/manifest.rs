//! `image.json`: the [`Manifest`] of an image, and the constants it records.

use serde::{Deserialize, Serialize};

/// Manifest format this crate writes and the newest it reads. Format 2
/// added the image kind and the file names of kernel, initrd and disk;
/// a format 1 manifest reads as an initramfs image.
pub const FORMAT_VERSION: u32 = 2;
/// Kernel command line the daemon starts from (it appends the `sf.*` params).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";
/// Kernel command line of a Debian disk image: root on the first virtio
/// disk, the NIC named `eth0` (the agent's default interface).
pub const DEBIAN_CMDLINE: &str =
    "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda rw net.ifnames=0";

/// What kind of guest an image is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// Busybox and the snowflock binaries in an initramfs; no disk.
    #[default]
    Initramfs,
    /// A Debian root file system on a disk image, booted by systemd.
    Debian,
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageKind::Initramfs => "initramfs",
            ImageKind::Debian => "debian",
        })
    }
}

fn default_kernel() -> String {
    crate::VMLINUX.to_string()
}

fn default_initrd() -> String {
    crate::INITRAMFS.to_string()
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
    /// Every path in the initramfs (absolute), in archive order; for a
    /// disk image, the packages installed on top of Debian's minimal base.
    pub files: Vec<String>,
    /// Default kernel command line ([`DEFAULT_CMDLINE`]).
    pub cmdline: String,
    /// The kind of guest.
    #[serde(default)]
    pub kind: ImageKind,
    /// File name of the kernel in the image directory (an uncompressed ELF
    /// or a bzImage).
    #[serde(default = "default_kernel")]
    pub kernel: String,
    /// File name of the initrd (the whole root file system for an
    /// initramfs image; Debian's initramfs for a disk image).
    #[serde(default = "default_initrd")]
    pub initrd: String,
    /// File name of the root disk (raw), for a disk image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Digest of everything the image was built from: a build with the
    /// same inputs finds the image up to date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<String>,
}

impl Manifest {
    /// A manifest of the given kind with the default file names.
    pub fn new(kind: ImageKind, kernel_version: String, cmdline: &str) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            kernel_version,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            files: Vec::new(),
            cmdline: cmdline.to_string(),
            kind,
            kernel: default_kernel(),
            initrd: default_initrd(),
            disk: None,
            inputs: None,
        }
    }
}

/// Makes `out` (created if missing) ready for a new build: its old
/// manifest goes first, so it cannot vouch for half-written files.
pub(crate) fn begin_build(out: &std::path::Path) -> Result<(), crate::ImageError> {
    use crate::error::io_err;
    std::fs::create_dir_all(out).map_err(io_err("create", out))?;
    let path = out.join(crate::MANIFEST);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
        _ => Ok(()),
    }
}

impl Manifest {
    /// Writes `out/image.json` (under a temporary name, renamed into
    /// place): the last step of a build.
    pub(crate) fn write_to(&self, out: &std::path::Path) -> Result<(), crate::ImageError> {
        use crate::error::io_err;
        let json = serde_json::to_vec_pretty(self).expect("manifest serialises");
        let (tmp, path) = (out.join(".image.json.tmp"), out.join(crate::MANIFEST));
        std::fs::write(&tmp, json).map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("write", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_1_manifest_reads_as_an_initramfs_image() {
        let m: Manifest = serde_json::from_str(
            r#"{"format":1,"kernel_version":"k","created_unix":1,"files":["/init"],"cmdline":"c"}"#,
        )
        .unwrap();
        assert_eq!(m.kind, ImageKind::Initramfs);
        assert_eq!(
            (m.kernel.as_str(), m.initrd.as_str()),
            ("vmlinux", "initramfs.cpio")
        );
        assert_eq!(m.disk, None);
    }

    #[test]
    fn round_trip() {
        let mut m = Manifest::new(ImageKind::Debian, "6.1".into(), DEBIAN_CMDLINE);
        m.disk = Some("disk.raw".into());
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert!(serde_json::to_string(&m)
            .unwrap()
            .contains(r#""kind":"debian""#));
    }
}
