//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bitvec::prelude::*;
use dom0_memtap::PAGE_SIZE;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on its own thread and fails the test if it takes longer than
/// `secs` (the thread is left behind; the process exits at the end of the
/// run, and memtap mounts are auto-unmounted then).
pub fn with_timeout<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => t.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: re-raise its panic.
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test timed out after {secs} s"),
    }
}

/// The content of page `p` of test generation `seed`: distinct per page.
pub fn page_content(seed: u8, p: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE_SIZE as usize];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u64)
            .wrapping_mul(31)
            .wrapping_add(p * 7 + seed as u64 + 1) as u8
            | 1;
    }
    v
}

/// Writes a sparse generation file of `pages` pages where the pages in
/// `holes` are never written (they read as zeros). Returns the expected
/// bytes and the hole map.
pub fn make_generation(
    path: &Path,
    seed: u8,
    pages: u64,
    holes: &[u64],
) -> (Vec<u8>, BitVec<u64, Lsb0>) {
    let f = File::create(path).unwrap();
    f.set_len(pages * PAGE_SIZE).unwrap();
    let mut all = vec![0u8; (pages * PAGE_SIZE) as usize];
    let mut map = bitvec![u64, Lsb0; 0; pages as usize];
    for p in 0..pages {
        if holes.contains(&p) {
            map.set(p as usize, true);
            continue;
        }
        let c = page_content(seed, p);
        f.write_all_at(&c, p * PAGE_SIZE).unwrap();
        all[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize].copy_from_slice(&c);
    }
    (all, map)
}

/// Whether `path` is a mount point of this process's mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(p))
}
