//! Counters the CLI shows (`snowflock daemon status`), and the last VMs
//! that ended on their own.

use parking_lot::Mutex;
use snowflock_proto::admin::Loss;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

/// Losses kept for `daemon status`.
pub const KEEP_LOSSES: usize = 32;

#[derive(Default)]
pub struct Counters {
    pub vms_started: AtomicU64,
    pub vms_lost: AtomicU64,
    pub clone_ops: AtomicU64,
    pub clone_failures: AtomicU64,
    pub clones_started: AtomicU64,
    pub clones_lost: AtomicU64,
    pub api_requests: AtomicU64,
    pub api_errors: AtomicU64,
    pub remote_clones_started: AtomicU64,
    pub peer_auth_failures: AtomicU64,
    pub origin_lost_kills: AtomicU64,
    pub malformed_guest_lines: AtomicU64,
    /// VMs that ended on their own, newest last.
    pub losses: Mutex<VecDeque<Loss>>,
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed)
}

impl Counters {
    /// Counters by name, for status output.
    pub fn map(&self) -> BTreeMap<String, u64> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("vms_started", get(&self.vms_started)),
            ("vms_lost", get(&self.vms_lost)),
            ("clone_ops", get(&self.clone_ops)),
            ("clone_failures", get(&self.clone_failures)),
            ("clones_started", get(&self.clones_started)),
            ("clones_lost", get(&self.clones_lost)),
            ("api_requests", get(&self.api_requests)),
            ("api_errors", get(&self.api_errors)),
            ("remote_clones_started", get(&self.remote_clones_started)),
            ("peer_auth_failures", get(&self.peer_auth_failures)),
            ("origin_lost_kills", get(&self.origin_lost_kills)),
            ("malformed_guest_lines", get(&self.malformed_guest_lines)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Records a VM that ended without being asked to.
    pub fn lost(&self, vm: &str, reason: &str) {
        bump(&self.vms_lost);
        let mut l = self.losses.lock();
        l.push_back(Loss {
            vm: vm.to_string(),
            reason: reason.to_string(),
        });
        while l.len() > KEEP_LOSSES {
            l.pop_front();
        }
    }

    pub fn recent_losses(&self) -> Vec<Loss> {
        self.losses.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_counted_and_bounded() {
        let c = Counters::default();
        for i in 0..KEEP_LOSSES + 3 {
            c.lost(&format!("vm{i}"), "gone");
        }
        assert_eq!(c.map()["vms_lost"], KEEP_LOSSES as u64 + 3);
        let l = c.recent_losses();
        assert_eq!(l.len(), KEEP_LOSSES);
        assert_eq!(l[0].vm, "vm3");
    }
}
