//! `snowflock image build --kind debian`: the guest package first, then
//! the Debian disk image with it installed, progress on stderr.

use crate::image_cmd::{default_guest_bin_dir, exe_dir};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

/// What `image build --kind debian` was given.
pub struct DebianArgs {
    pub out: PathBuf,
    pub add: Vec<String>,
    pub packages: Vec<String>,
    pub size_bytes: u64,
    pub guest_bin_dir: Option<PathBuf>,
}

/// Parses a disk size: `4G`, `512M`, `2048` (MiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult): (&str, u64) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1 << 20),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("invalid size {s:?} (use e.g. 4G or 512M)"))
}

pub fn build(a: DebianArgs) -> Result<PathBuf> {
    let t0 = Instant::now();
    let guest = a.guest_bin_dir.unwrap_or_else(default_guest_bin_dir);
    let cache = snowflock_image::default_cache_dir().join("debian");
    let mut d = snowflock_image::DebOptions::new(cache.join("deb"), &guest);
    d.lib_dir = Some(exe_dir()).filter(|d| d.join("libsnowflock.so").exists());
    eprintln!(
        "[{:>5.1}s] building the guest package",
        t0.elapsed().as_secs_f64()
    );
    let deb = snowflock_image::build_guest_deb(&d).context("Guest package build failed")?;
    let mut o = snowflock_image::DebianOptions::new(&a.out, &deb);
    o.cache_dir = cache;
    o.packages = a.packages;
    o.size_bytes = a.size_bytes;
    for spec in &a.add {
        o.extra.push(snowflock_image::parse_add(spec)?);
    }
    eprintln!(
        "[{:>5.1}s] building the Debian image in {}",
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    let m = snowflock_image::build_debian(&o, &mut |line| {
        eprintln!("[{:>5.1}s] {line}", t0.elapsed().as_secs_f64())
    })
    .context("Debian image build failed")?;
    eprintln!(
        "Image ready: {} (Debian, kernel {}, {} packages, {:.0} s); guest package {}",
        a.out.display(),
        m.kernel_version,
        m.files.len(),
        t0.elapsed().as_secs_f64(),
        deb.display()
    );
    Ok(a.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2048"), Ok(2048 << 20));
        for bad in ["", "G", "-1G", "0", "4X", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
