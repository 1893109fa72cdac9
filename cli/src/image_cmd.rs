//! `snowflock image build` and `snowflock image deb`.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Where the built tree keeps things, relative to the `snowflock` binary
/// (`target/release/snowflock`): guest binaries are the static build in
/// `target/x86_64-unknown-linux-gnu/release`, the repo root is two up.
pub fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
}

pub fn default_guest_bin_dir() -> PathBuf {
    let d = exe_dir();
    let profile = d.file_name().map(|s| s.to_os_string()).unwrap_or_default();
    d.parent()
        .map(|t| t.join("x86_64-unknown-linux-gnu").join(profile))
        .unwrap_or_default()
}

fn repo_file(rel: &str) -> Option<PathBuf> {
    let p = exe_dir().join("../..").join(rel);
    p.exists().then(|| std::fs::canonicalize(&p).unwrap_or(p))
}

pub fn default_out() -> PathBuf {
    snowflock_image::default_cache_dir().join("image")
}

pub struct BuildArgs {
    pub out: Option<PathBuf>,
    pub add: Vec<String>,
    pub kernel_dir: Option<PathBuf>,
    pub guest_bin_dir: Option<PathBuf>,
}

pub fn build(a: BuildArgs) -> Result<PathBuf> {
    let out = a.out.unwrap_or_else(default_out);
    let mut o = snowflock_image::BuildOptions::new(
        &out,
        a.guest_bin_dir.unwrap_or_else(default_guest_bin_dir),
    );
    if let Some(k) = a.kernel_dir {
        o.kernel_dir = k;
    }
    o.lib_dir = Some(exe_dir()).filter(|d| d.join("libsnowflock.so").exists());
    o.header = repo_file("guest-agent/include/snowflock.h");
    o.python_module = repo_file("guest-agent/python/snowflock.py");
    for spec in &a.add {
        o.extra.push(snowflock_image::parse_add(spec)?);
    }
    eprintln!("Building guest image in {} ...", out.display());
    let m = snowflock_image::build(&o).context("Image build failed")?;
    eprintln!(
        "Image ready: {} (kernel {}, {} files)",
        out.display(),
        m.kernel_version,
        m.files.len()
    );
    Ok(out)
}

/// `snowflock image deb`: builds the guest package alone into `out` (the
/// current directory by default) and returns its path. Guest binaries are
/// found as for `image build`; `libsnowflock.so` next to this binary (the
/// host build, linked against glibc) or else in the guest bin directory.
pub fn deb(out: Option<PathBuf>, guest_bin_dir: Option<PathBuf>) -> Result<PathBuf> {
    let bins = guest_bin_dir.unwrap_or_else(default_guest_bin_dir);
    let mut o = snowflock_image::DebOptions::new(out.unwrap_or_else(|| PathBuf::from(".")), &bins);
    o.lib_dir = [exe_dir(), bins]
        .into_iter()
        .find(|d| d.join("libsnowflock.so").is_file());
    o.header = repo_file("guest-agent/include/snowflock.h");
    o.python_module = repo_file("guest-agent/python/snowflock.py");
    eprintln!(
        "Building {} ...",
        snowflock_image::deb_file_name(&o.version)
    );
    let p = snowflock_image::build_guest_deb(&o).context("Package build failed")?;
    Ok(std::fs::canonicalize(&p).unwrap_or(p))
}
