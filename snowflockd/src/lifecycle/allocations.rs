//! Keeps what the allocator holds in step with the tickets: an allocation
//! lives exactly as long as its ticket needs it. Whenever tickets change,
//! and every few seconds (so expiry is seen too), the allocator is told
//! which tickets are live; it releases the rest, including what an earlier
//! run of the daemon left. An allocation that ended under a live ticket
//! (a Slurm time limit, an administrator's `scancel`) ends that ticket's
//! clones, reported lost with the reason.

use super::Daemon;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often tickets are checked when nothing changes.
const TICK: Duration = Duration::from_secs(5);

/// Runs until the daemon shuts down.
pub async fn keep(d: Arc<Daemon>) {
    let mut changed = d.tickets_changed.subscribe();
    let mut shutdown = d.shutdown.subscribe();
    let lost = d.alloc.lost_signal();
    let lost_signalled = || async {
        match &lost {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    loop {
        let live = d.with(|r| {
            r.purge(Instant::now());
            r.live_tickets()
        });
        d.alloc.keep_only(&live).await;
        for (ticket, why) in d.alloc.lost() {
            end_ticket_clones(&d, &ticket, &why).await;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = lost_signalled() => {}
            _ = tokio::time::sleep(TICK) => {}
            _ = super::daemon::wait_until(&mut shutdown, |s| *s) => break,
        }
    }
    // Shutting down: every ticket ends with the daemon's VMs.
    d.alloc.keep_only(&[]).await;
}

/// Ends the running clones of `ticket`, recorded as lost because `why`.
async fn end_ticket_clones(d: &Arc<Daemon>, ticket: &str, why: &str) {
    let (local, remote) = d.with(|r| {
        let Some(t) = r.tickets.get_mut(ticket) else {
            return (Vec::new(), Vec::new());
        };
        let (vms, remote) = t.lose_running(&d.cfg.host, why);
        let local: Vec<_> = vms.iter().filter_map(|n| r.vms.get(n).cloned()).collect();
        (local, remote)
    });
    if local.is_empty() && remote.is_empty() {
        return;
    }
    tracing::warn!(%ticket, %why, local = local.len(), hosts = ?remote, "ending the clones of a ticket whose allocation ended");
    futures::future::join_all(local.iter().map(|k| d.stop_vm(k))).await;
    d.stop_remote(
        remote
            .into_iter()
            .map(|h| (h, ticket.to_string()))
            .collect(),
        why,
    )
    .await;
    d.bump_tickets();
}
