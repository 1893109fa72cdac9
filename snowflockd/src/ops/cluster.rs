//! Cluster-wide views: every host's VMs, and which host runs a VM.

use crate::lifecycle::Daemon;
use snowflock_proto::admin::{AdminResponse, VmInfo};
use snowflock_proto::error::chain;
use snowflock_proto::peer::PeerRequest;
use std::time::Duration;

/// Every host's VMs: this host's, then each peer's. Hosts that do not
/// answer are listed with the reason.
pub async fn cluster_list(d: &Daemon) -> (Vec<VmInfo>, Vec<String>) {
    let mut vms = d.list();
    let mut unreachable = Vec::new();
    let answers =
        crate::cluster::call_all(&*d.peers, &PeerRequest::VmListLocal, Duration::from_secs(3))
            .await;
    for (p, a) in answers {
        match a {
            Ok(AdminResponse::VmList { vms: v, .. }) => vms.extend(v),
            Ok(other) => unreachable.push(format!("{p}: unexpected answer {other:?}")),
            Err(e) => unreachable.push(format!("{p}: {}", chain(&e))),
        }
    }
    (vms, unreachable)
}

/// The other host that runs VM `name`, if one answers for it.
pub async fn locate(d: &Daemon, name: &str) -> Option<String> {
    let (vms, _) = cluster_list(d).await;
    vms.into_iter()
        .find(|v| v.name == name && v.host != d.cfg.host)
        .map(|v| v.host)
}
