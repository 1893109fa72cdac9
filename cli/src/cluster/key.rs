//! The cluster key: a shared secret the daemons of one cluster
//! authenticate each other with, in `/run/snowflock/NAME/key` (mode 0600).

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A new cluster key: 32 random bytes as 64 hex digits and a newline.
fn new_key() -> Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("Cannot read /dev/urandom")?;
    let mut s: String = b.iter().map(|x| format!("{x:02x}")).collect();
    s.push('\n');
    Ok(s)
}

/// Creates the key file `path` (mode 0600, never overwriting) with a new key.
pub(super) fn write_key(path: &Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("Cannot create {}", path.display()))?;
    f.write_all(new_key()?.as_bytes())
        .with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_64_hex_digits() {
        let a = new_key().unwrap();
        let b = new_key().unwrap();
        assert_eq!(a.len(), 65);
        assert!(a.ends_with('\n'));
        assert!(a
            .trim_end()
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }
}
