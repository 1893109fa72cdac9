//! [`ImageError`]: everything that can go wrong building or opening an image.

use crate::FORMAT_VERSION;
use std::path::{Path, PathBuf};

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
    /// An image's kernel is neither an ELF kernel nor a bzImage.
    #[error("{path} is not a kernel (neither an uncompressed ELF kernel nor a bzImage)")]
    NotKernel {
        /// The offending file.
        path: PathBuf,
    },
    /// The manifest names a file outside the image directory.
    #[error(
        "Bad image manifest {path}: file name {name:?} is not a plain name in the image directory"
    )]
    BadFileName {
        /// The manifest path.
        path: PathBuf,
        /// The name it gives.
        name: String,
    },
    /// A build option is not acceptable.
    #[error("Invalid option: {0}")]
    InvalidOption(String),
    /// No Debian archive for the suite in the host's apt configuration.
    #[error("No enabled `deb` source of suite {suite} with component main (http or https) in the apt configuration under {dir}")]
    NoAptSource {
        /// The suite wanted.
        suite: String,
        /// The apt configuration directory.
        dir: PathBuf,
    },
    /// A host tool the build needs failed or is missing.
    #[error("{what} failed: `{cmd}` {status}{}", if tail.is_empty() { String::new() } else { format!(":\n{tail}") })]
    Tool {
        /// What was being done.
        what: String,
        /// The command line.
        cmd: String,
        /// How it ended ("exited with 1", "could not be started: ...").
        status: String,
        /// The end of its output.
        tail: String,
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
    /// A program the build runs is not installed.
    #[error("{tool} not found (install {package})")]
    MissingTool {
        /// The program.
        tool: String,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// A guest package version dpkg would refuse.
    #[error("Invalid package version {version:?}: it must start with a digit and hold only letters, digits and . + ~ - (no epoch)")]
    BadPackageVersion {
        /// The version given.
        version: String,
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
        file: String,
    },
    /// One of the image's files is empty.
    #[error("Image directory {dir} is incomplete: {file} is empty")]
    EmptyFile {
        /// The image directory.
        dir: PathBuf,
        /// The empty file name.
        file: String,
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

/// Maps an I/O error on `path` to [`ImageError::Io`].
pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
