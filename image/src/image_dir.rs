//! An image directory: its file names, and [`Image::open`], which reads the
//! manifest and checks that the files it names are there.

use crate::error::io_err;
use crate::kernel::{has_elf_magic, is_bzimage};
use crate::{ImageError, ImageKind, Manifest, FORMAT_VERSION};
use serde::Deserialize;
use std::fs;
use std::path::{Path, PathBuf};

/// File names inside an image directory.
pub const VMLINUX: &str = "vmlinux";
/// See [`VMLINUX`].
pub const INITRAMFS: &str = "initramfs.cpio";
/// See [`VMLINUX`].
pub const MANIFEST: &str = "image.json";
/// A disk image's kernel (Debian's bzImage).
pub const VMLINUZ: &str = "vmlinuz";
/// A disk image's initrd (Debian's initramfs).
pub const INITRD: &str = "initrd.img";
/// A disk image's root disk, raw and sparse.
pub const DISK: &str = "disk.raw";

/// An opened, validated image directory.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image directory.
    pub dir: PathBuf,
    /// The kernel (`vmlinux`, or `vmlinuz` for a disk image).
    pub kernel: PathBuf,
    /// The initrd (`initramfs.cpio`, or `initrd.img` for a disk image).
    pub initrd: PathBuf,
    /// The root disk of a disk image.
    pub disk: Option<PathBuf>,
    /// The parsed `image.json`.
    pub manifest: Manifest,
}

/// A file name the manifest gives must stay in the image directory.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

fn check_file(dir: &Path, file: &str) -> Result<PathBuf, ImageError> {
    let p = dir.join(file);
    let incomplete = |empty: bool| {
        let file = file.to_string();
        let dir = dir.to_path_buf();
        if empty {
            ImageError::EmptyFile { dir, file }
        } else {
            ImageError::Incomplete { dir, file }
        }
    };
    match fs::metadata(&p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(incomplete(false)),
        Err(e) => Err(io_err("read", &p)(e)),
        Ok(m) if !m.is_file() => Err(incomplete(false)),
        Ok(m) if m.len() == 0 => Err(incomplete(true)),
        Ok(_) => Ok(p),
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
        let mpath = check_file(dir, MANIFEST)?;
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
        let names = [
            Some(&manifest.kernel),
            Some(&manifest.initrd),
            manifest.disk.as_ref(),
        ];
        if let Some(bad) = names.into_iter().flatten().find(|n| !plain_name(n)) {
            return Err(ImageError::BadFileName {
                path: mpath,
                name: bad.clone(),
            });
        }
        if manifest.kind == ImageKind::Debian && manifest.disk.is_none() {
            return Err(ImageError::Incomplete {
                dir: dir.to_path_buf(),
                file: "the disk (image.json names none)".into(),
            });
        }
        let kernel = check_file(dir, &manifest.kernel)?;
        if !has_elf_magic(&kernel)? && !is_bzimage(&kernel)? {
            return Err(ImageError::NotKernel { path: kernel });
        }
        let initrd = check_file(dir, &manifest.initrd)?;
        let disk = match &manifest.disk {
            Some(d) => Some(check_file(dir, d)?),
            None => None,
        };
        Ok(Image {
            dir: dir.to_path_buf(),
            kernel,
            initrd,
            disk,
            manifest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_CMDLINE;

    fn write_image(dir: &Path) {
        fs::write(dir.join(VMLINUX), b"\x7fELF rest").unwrap();
        fs::write(dir.join(INITRAMFS), b"070701").unwrap();
        let mut m = Manifest::new(ImageKind::Initramfs, "k".into(), DEFAULT_CMDLINE);
        m.files = vec!["/init".into()];
        fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
    }

    #[test]
    fn open_complete_image() {
        let d = tempfile::tempdir().unwrap();
        write_image(d.path());
        let img = Image::open(d.path()).unwrap();
        assert_eq!(img.kernel, d.path().join("vmlinux"));
        assert_eq!(img.initrd, d.path().join("initramfs.cpio"));
        assert_eq!(img.disk, None);
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
        assert!(msg.ends_with("image.json is missing"), "{msg}");
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
        fs::write(d.path().join(VMLINUX), b"MZ\0\0not a kernel").unwrap();
        let e = Image::open(d.path()).unwrap_err();
        assert!(
            matches!(e, ImageError::NotKernel { .. }) && e.to_string().contains("vmlinux"),
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

    #[test]
    fn a_disk_image_names_its_files_inside_its_directory() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Manifest::new(ImageKind::Debian, "k".into(), DEFAULT_CMDLINE);
        (m.kernel, m.initrd, m.disk) = (VMLINUZ.into(), INITRD.into(), Some(DISK.into()));
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        fs::write(d.path().join(VMLINUZ), &bz).unwrap();
        fs::write(d.path().join(INITRD), b"initrd").unwrap();
        fs::write(d.path().join(DISK), b"disk").unwrap();
        fs::write(d.path().join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let img = Image::open(d.path()).unwrap();
        assert_eq!(img.disk, Some(d.path().join(DISK)));
        assert_eq!(img.kernel, d.path().join(VMLINUZ));

        fs::remove_file(d.path().join(DISK)).unwrap();
        let e = Image::open(d.path()).unwrap_err().to_string();
        assert!(e.ends_with("disk.raw is missing"), "{e}");

        m.disk = Some("../../etc/passwd".into());
        fs::write(d.path().join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let e = Image::open(d.path()).unwrap_err();
        assert!(matches!(e, ImageError::BadFileName { .. }), "{e}");

        m.disk = None;
        fs::write(d.path().join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let e = Image::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("names none"), "{e}");
    }
}
