//! How much host memory a VM's RAM takes: its QEMU's private copies of
//! guest pages (from `/proc/PID/smaps`) and the RAM file it maps.

use snowflock_proto::admin::MemUse;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Private (anonymous) bytes of the mappings of the file `path` (which
/// may have been unlinked since: `(deleted)`) or of inode `ino` in
/// `smaps` (the text of `/proc/PID/smaps`).
pub fn private_bytes(smaps: &str, ino: Option<u64>, path: &str) -> u64 {
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut f = line.split_ascii_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range perms offset dev inode [path].
            let inode = f.nth(3).and_then(|i| i.parse::<u64>().ok());
            let name = f.next().unwrap_or("");
            inside = (ino.is_some() && inode == ino) || (!path.is_empty() && name == path);
        } else if inside && first == "Anonymous:" {
            kib += f.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    kib * 1024
}

/// Bytes of `file` that hold memory (tmpfs: its allocated blocks).
pub fn file_bytes(file: &Path) -> u64 {
    std::fs::metadata(file)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// The memory of the VM whose QEMU is `pid`, mapping `ram` (`shared` set
/// for the file when the VM holds it: an original VM's RAM or frozen
/// generation).
pub fn of_vm(pid: Option<u32>, ram: &Path, holds_file: bool) -> MemUse {
    let ino = std::fs::metadata(ram).map(|m| m.ino()).ok();
    let private = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/smaps")).ok())
        .map(|s| private_bytes(&s, ino, &ram.to_string_lossy()))
        .unwrap_or(0);
    MemUse {
        private_bytes: private,
        shared_bytes: if holds_file { file_bytes(ram) } else { 0 },
        generations_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_bytes_of_one_file() {
        let smaps = "\
7f00-7f10 rw-p 00000000 00:1a 42                 /dev/shm/x/ram
Size:              64 kB
Anonymous:         12 kB
7f20-7f30 rw-p 00000000 00:1a 43                 /other
Anonymous:        100 kB
7f40-7f50 rw-p 00000000 00:1a 42                 /dev/shm/x/ram (deleted)
Anonymous:          4 kB
";
        assert_eq!(private_bytes(smaps, Some(42), ""), 16 * 1024);
        assert_eq!(private_bytes(smaps, None, "/dev/shm/x/ram"), 16 * 1024);
        assert_eq!(private_bytes(smaps, Some(7), "/nope"), 0);
    }

    #[test]
    fn this_process_maps_nothing_of_a_fresh_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram");
        std::fs::write(&p, vec![1u8; 8192]).unwrap();
        let u = of_vm(Some(std::process::id()), &p, true);
        assert_eq!(u.private_bytes, 0);
        assert!(u.shared_bytes >= 8192);
        assert_eq!(of_vm(None, &p, false).shared_bytes, 0);
    }
}
