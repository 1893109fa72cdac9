//! The flock key: the secret an agent proves to its siblings before they
//! run a command for it ([`snowflock_proto::sibling`]).
//!
//! The first agent start of a VM makes 32 random bytes and writes them as
//! hex to `flock.key` in the state directory (`/run/snowflock`, a tmpfs,
//! so in guest RAM), mode 0600. Later starts (an agent restarted in the
//! same boot, or in a clone) read the file. A clone is a copy of its
//! parent's RAM, tmpfs included, so the parent and all of its clones hold
//! the same key, and no VM outside the flock does. A fresh boot makes a
//! new key: a VM booted from the same image is not a sibling.

use snowflock_proto::auth::ClusterKey;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Name of the key file in the state directory.
pub const KEY_FILE: &str = "flock.key";

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FlockKeyError {
    #[error("Cannot read the flock key")]
    Load(#[source] snowflock_proto::auth::AuthError),
    #[error("Cannot write the flock key {path}")]
    Write {
        path: String,
        #[source]
        err: std::io::Error,
    },
}

/// Loads `dir/flock.key`, or makes it when it does not exist.
pub fn load_or_create(dir: &Path) -> Result<ClusterKey, FlockKeyError> {
    let path = dir.join(KEY_FILE);
    if path.exists() {
        return ClusterKey::load(&path).map_err(FlockKeyError::Load);
    }
    let key = ClusterKey::generate();
    let write_err = |err| FlockKeyError::Write {
        path: path.display().to_string(),
        err,
    };
    std::fs::create_dir_all(dir).map_err(write_err)?;
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    f.write_all(key.to_hex().as_bytes()).map_err(write_err)?;
    f.sync_all().map_err(write_err)?;
    std::fs::rename(&tmp, &path).map_err(write_err)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_read_back_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sf-flock-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_create(&dir).unwrap();
        let b = load_or_create(&dir).unwrap();
        assert_eq!(a.to_hex(), b.to_hex());
        assert_eq!(a.to_hex().len(), 64);
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.join(KEY_FILE), "zz").unwrap();
        assert!(
            load_or_create(&dir).is_err(),
            "a damaged key is an error, not replaced"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
