//! The kernel directory (`vmlinux` + `modules/`, prepared by
//! `scripts/fetch-kernel.sh`): the ELF check and the kernel release.
//! Kernel modules themselves are in [`crate::modules`].

use crate::error::io_err;
use crate::ImageError;
use std::fs;
use std::io::Read;
use std::path::Path;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Whether `path` starts with the ELF magic (an uncompressed kernel).
pub(crate) fn has_elf_magic(path: &Path) -> Result<bool, ImageError> {
    let mut f = fs::File::open(path).map_err(io_err("read", path))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == ELF_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Whether `path` is a bzImage (the x86 boot protocol's `HdrS` magic at
/// offset 0x202), as distributions ship kernels.
pub(crate) fn is_bzimage(path: &Path) -> Result<bool, ImageError> {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::File::open(path).map_err(io_err("read", path))?;
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(0x202))
        .map_err(io_err("read", path))?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"HdrS"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// The kernel release of a kernel directory: the name `modules/` resolves to
/// (`lib/modules/<kver>`), else the resolved directory's own name.
pub(crate) fn kernel_version(kernel_dir: &Path) -> String {
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
