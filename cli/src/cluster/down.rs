//! `snowflock cluster down`: removes a local cluster, idempotently, also
//! when it is half-built or its daemons crashed: daemons, leftover mounts,
//! namespaces, then directories.

use super::layout::{load, ClusterInfo, HostInfo, Layout};
use super::{daemon, fabric};
use anyhow::{bail, Result};
use snowflock_image::mounts_under;

/// `snowflock cluster down`: idempotent, also for half-built or crashed clusters.
pub fn down(name: &str) -> Result<()> {
    let l = Layout::new(name)?;
    let info = load(name).ok();
    teardown(&l, info, true)
}

/// Hosts to stop when `cluster.json` is missing: `hI` directories in the config dir.
fn hosts_from_dirs(l: &Layout) -> Vec<HostInfo> {
    let mut v: Vec<HostInfo> = std::fs::read_dir(l.config_dir())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| n.strip_prefix('h').and_then(|d| d.parse::<u32>().ok()))
                .filter(|i| *i < 256)
                .map(|i| l.host(i))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|h| (h.name.len(), h.name.clone()));
    v
}

/// Removes everything of cluster `l` that exists; `info` is its
/// `cluster.json`, if readable. `verbose` says what is removed on stderr.
pub(crate) fn teardown(l: &Layout, info: Option<ClusterInfo>, verbose: bool) -> Result<()> {
    let say = |msg: String| {
        if verbose {
            eprintln!("{msg}");
        }
    };
    let mut errors: Vec<String> = Vec::new();
    let mut removed = 0usize;
    let hosts = match &info {
        Some(i) => i.hosts.clone(),
        None => hosts_from_dirs(l),
    };

    // 1. and 2.: the daemons (they release their Slurm allocations).
    removed += daemon::stop_all(&hosts, &say, &mut errors);
    // The cluster's Slurm, while its namespaces still exist.
    if let Some(s) = info.as_ref().and_then(|i| i.slurm.as_ref()) {
        removed += super::slurm::stop(s, &say, &mut errors);
    }
    // 3. Mounts the daemons left behind (visible in this mount namespace).
    let roots = [l.state_root(), l.config_dir()];
    for m in mounts_under(
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        &roots,
    ) {
        match crate::sys::unmount_detached(&m) {
            Ok(()) => {
                say(format!("unmounted {}", m.display()));
                removed += 1;
            }
            Err(e) => errors.push(format!("cannot unmount {}: {e}", m.display())),
        }
    }
    // 4. Namespaces (a host's veth goes with its namespace), hosts first.
    for ns in &fabric::existing_netns(l) {
        match fabric::delete_netns(ns) {
            Ok(()) => {
                say(format!("removed network namespace {ns}"));
                removed += 1;
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    // 5. Directories.
    for dir in [l.state_root(), l.config_dir()] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                say(format!("removed {}", dir.display()));
                removed += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("cannot remove {}: {e}", dir.display())),
        }
    }
    // Anything still running from this cluster is worth a word (not a kill:
    // only recorded daemon pids are ours to signal).
    let needles: Vec<String> = roots.iter().map(|r| format!("{}/", r.display())).collect();
    for (pid, cmd) in daemon::processes_mentioning(&needles) {
        say(format!(
            "warning: pid {pid} still runs and mentions this cluster: {cmd}"
        ));
    }
    if !errors.is_empty() {
        bail!(
            "cluster `{}` only partly removed:\n  {}",
            l.name,
            errors.join("\n  ")
        );
    }
    if removed == 0 {
        say(format!("no local cluster `{}`: nothing to remove", l.name));
    } else {
        say(format!("local cluster `{}` removed", l.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn mountinfo_filter() {
        let mi = "\
22 1 0:21 / /dev/shm rw - tmpfs tmpfs rw
90 22 0:50 / /dev/shm/snowflock-sfc/h0/fuse rw - fuse fuse rw
91 22 0:51 / /dev/shm/snowflock-sfc/h1/a\\040b rw - fuse fuse rw
92 22 0:52 / /dev/shm/snowflock-sfc rw - tmpfs tmpfs rw
93 22 0:53 / /dev/shm/snowflock-sfcx/h0 rw - tmpfs tmpfs rw
";
        let roots = [
            PathBuf::from("/dev/shm/snowflock-sfc"),
            PathBuf::from("/run/snowflock/sfc"),
        ];
        let m = mounts_under(mi, &roots);
        assert_eq!(
            m,
            [
                PathBuf::from("/dev/shm/snowflock-sfc/h0/fuse"),
                PathBuf::from("/dev/shm/snowflock-sfc/h1/a b"),
                PathBuf::from("/dev/shm/snowflock-sfc"),
            ]
        );
    }
}
