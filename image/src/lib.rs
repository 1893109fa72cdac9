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
//!
//! One job per module: `manifest` (`image.json`), `image_dir` (opening and
//! checking an image), `options` (what to build from), `kernel` (the kernel
//! directory), [`modules`] (kernel modules), `busybox`, `guest_bins` (the
//! snowflock binaries and libraries), `add` (`--add` and other host files),
//! [`rootfs`] (the fixed `/etc` files), `tree` (assembling the initramfs),
//! [`cpio`] (writing it), `build` (the whole image) and `tsc` (the host's TSC
//! rate for the kernel command line).

pub mod cpio;
pub mod modules;
pub mod rootfs;

/// Fixed files of the guest package (unit, agent.toml, maintainer scripts).
pub mod deb_files;

mod add;
pub mod apt_sources;
mod build;
mod busybox;
/// The guest package, `snowflock-guest_<version>_amd64.deb`.
mod deb;
mod debian;
mod debian_root;
mod error;
mod guest_bins;
mod host_tools;
pub use host_tools::mounts_under;
mod image_dir;
mod kernel;
mod manifest;
mod options;
mod tree;
mod tsc;

pub use add::parse_add;
pub use build::build;
pub use deb::{build_guest_deb, deb_file_name, DebOptions, DEB_PACKAGE, DEB_VERSION};
pub use debian::{
    build_debian, valid_package_name, DebianOptions, BASE_PACKAGES, DEFAULT_DISK_SIZE,
    MIN_DISK_SIZE, MPI_PACKAGES,
};
pub use error::ImageError;
pub use guest_bins::{AGENT_BIN, GLIBC_RUNTIME, GUEST_BINS};
pub use image_dir::{Image, DISK, INITRAMFS, INITRD, MANIFEST, VMLINUX, VMLINUZ};
pub use manifest::{ImageKind, Manifest, DEBIAN_CMDLINE, DEFAULT_CMDLINE, FORMAT_VERSION};
pub use options::{default_cache_dir, BuildOptions};
pub use tree::build_tree;
pub use tsc::host_tsc_khz;
