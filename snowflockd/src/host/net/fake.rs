//! A host network in memory, for tests: links are names in a set.

use super::{HostNet, NetError, NetNames};
use parking_lot::Mutex;
use std::collections::BTreeSet;

#[derive(Default)]
pub struct FakeNet {
    pub links: Mutex<BTreeSet<String>>,
    /// Creating this tap fails (to test error paths).
    pub fail_tap: Mutex<Option<String>>,
}

impl FakeNet {
    pub fn has(&self, name: &str) -> bool {
        self.links.lock().contains(name)
    }
}

impl HostNet for FakeNet {
    fn ensure_bridge(&self, name: &str) -> Result<(), NetError> {
        if self.has(name) {
            return Ok(());
        }
        // Like `ip link add`: takes a while, and fails if someone else
        // created the link meanwhile.
        std::thread::sleep(std::time::Duration::from_millis(20));
        if !self.links.lock().insert(name.to_string()) {
            return Err(NetError::Ip {
                cmd: format!("fake ip link add {name} type bridge"),
                stderr: "RTNETLINK answers: File exists".into(),
            });
        }
        Ok(())
    }
    fn ensure_overlay(
        &self,
        names: &NetNames,
        flock: u32,
        _local: std::net::IpAddr,
        _peers: &[std::net::IpAddr],
    ) -> Result<(), NetError> {
        self.links.lock().insert(names.vxlan(flock));
        Ok(())
    }
    fn create_tap(&self, tap: &str, bridge: &str) -> Result<(), NetError> {
        if self.fail_tap.lock().as_deref() == Some(tap) || !self.has(bridge) {
            return Err(NetError::Ip {
                cmd: format!("fake tap {tap}"),
                stderr: "refused".into(),
            });
        }
        self.links.lock().insert(tap.to_string());
        Ok(())
    }
    fn delete_link(&self, name: &str) -> Result<(), NetError> {
        self.links.lock().remove(name);
        Ok(())
    }
    fn remove_stale_links(&self, names: &NetNames) -> Vec<String> {
        let mut l = self.links.lock();
        let gone: Vec<String> = l
            .iter()
            .filter(|n| n.starts_with(&names.prefix))
            .cloned()
            .collect();
        for n in &gone {
            l.remove(n);
        }
        gone
    }
}
