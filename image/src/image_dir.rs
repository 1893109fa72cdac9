//! An image directory: its file names, and [`Image::open`], which checks
//! that the three files are there and the manifest is readable.

use crate::error::io_err;
use crate::kernel::has_elf_magic;
use crate::{ImageError, Manifest, FORMAT_VERSION};
use serde::Deserialize;
use std::fs;
use std::path::{Path, PathBuf};

/// File names inside an image directory.
pub const VMLINUX: &str = "vmlinux";
/// See [`VMLINUX`].
pub const INITRAMFS: &str = "initramfs.cpio";
/// See [`VMLINUX`].
pub const MANIFEST: &str = "image.json";

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_CMDLINE;

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
}
