//! SnowFlock API calls arriving from guests (`GuestMsg::Request`).
//!
//! Everything here is driven by untrusted guests: a guest can only act on
//! its own tickets and its own children, and every refusal is a clear
//! [`ApiResponse::Error`]; nothing a guest sends can stop or pause another
//! VM, or leave its own parent paused.

use crate::daemon::{api_error, random_hex, Daemon, Ticket, TicketState, Vm};
use snowflock_proto::api::{ApiErrorCode as E, ApiRequest, ApiResponse, ChildState};
use snowflock_proto::channel::HostMsg;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Unused tickets stop reserving capacity after this long.
pub const TICKET_TTL: Duration = Duration::from_secs(600);
/// Discarded tickets kept for precise error messages.
const KEEP_DISCARDED: usize = 1024;

pub async fn handle(d: Arc<Daemon>, vm: Arc<Vm>, id: u64, req: ApiRequest) {
    let resp = match req.validate() {
        Err(msg) => api_error(E::BadRequest, msg),
        Ok(()) => match req {
            ApiRequest::RequestTicket { n } => request_ticket(&d, &vm, n).await,
            ApiRequest::Clone { ticket } => {
                // The answer to the parent is sent by the clone operation
                // itself once the children are confirmed running.
                crate::clone::clone(d.clone(), vm.clone(), id, ticket).await
            }
            ApiRequest::Exit { status } => exit(&d, &vm, status).await,
            ApiRequest::Join { ticket } => join(&d, &vm, &ticket).await,
            ApiRequest::Kill { ticket } => kill(&d, &vm, &ticket).await,
            ApiRequest::Id => ApiResponse::Identity {
                vm: vm.name.clone(),
                clone_id: vm.clone_id,
                ticket: vm.ticket.clone(),
                ip: Some(vm.ip.clone()),
            },
        },
    };
    d.counters.api_requests.fetch_add(1, Ordering::Relaxed);
    if matches!(resp, ApiResponse::Error { .. }) {
        d.counters.api_errors.fetch_add(1, Ordering::Relaxed);
    }
    if !vm.is_ended() {
        vm.send(HostMsg::Response { id, resp });
    }
}

/// Expires unused tickets and forgets old discarded ones.
pub fn purge(st: &mut crate::daemon::State) {
    let now = Instant::now();
    for t in st.tickets.values_mut() {
        if t.state == TicketState::Granted && now.duration_since(t.created) > TICKET_TTL {
            t.state = TicketState::Discarded("it expired unused");
        }
    }
    let discarded = st
        .tickets
        .values()
        .filter(|t| matches!(t.state, TicketState::Discarded(_)))
        .count();
    if discarded > KEEP_DISCARDED {
        let mut old: Vec<_> = st
            .tickets
            .values()
            .filter(|t| matches!(t.state, TicketState::Discarded(_)))
            .map(|t| (t.created, t.id.clone()))
            .collect();
        old.sort();
        for (_, id) in old.into_iter().take(discarded - KEEP_DISCARDED) {
            st.tickets.remove(&id);
        }
    }
}

/// Spreads `n` clones over hosts by free capacity: each clone goes to the
/// host with the most free slots left; ties go to other hosts than the
/// origin (its CPU runs the parent), then by name. Returns (host, count)
/// with the origin first, hosts without clones left out (but the origin).
pub fn place(origin: &str, free: &[(String, u32)], n: u32) -> Vec<(String, u32)> {
    let mut left: Vec<(String, u32, u32)> = free.iter().map(|(h, f)| (h.clone(), *f, 0)).collect();
    for _ in 0..n {
        let best = left.iter_mut().filter(|(_, f, _)| *f > 0).max_by(|a, b| {
            a.1.cmp(&b.1)
                .then_with(|| (b.0 == origin).cmp(&(a.0 == origin)))
                .then_with(|| b.0.cmp(&a.0))
        });
        match best {
            Some(b) => {
                b.1 -= 1;
                b.2 += 1;
            }
            None => break,
        }
    }
    let mut out: Vec<(String, u32)> = Vec::new();
    out.push((
        origin.to_string(),
        left.iter()
            .find(|l| l.0 == origin)
            .map(|l| l.2)
            .unwrap_or(0),
    ));
    out.extend(
        left.into_iter()
            .filter(|l| l.0 != origin && l.2 > 0)
            .map(|l| (l.0, l.2)),
    );
    out
}

/// Free slots of every other host that answers (quickly).
async fn peer_capacity(d: &Arc<Daemon>) -> Vec<(String, u32)> {
    let req = snowflock_proto::admin::AdminRequest::PeerCapacity;
    let mut out = Vec::new();
    for (p, a) in crate::peer::call_all(d, &req, Duration::from_secs(2)).await {
        match a {
            Ok(snowflock_proto::admin::AdminResponse::Capacity { free, .. }) => out.push((p, free)),
            Ok(other) => tracing::warn!(host = %p, answer = ?other, "unexpected capacity answer"),
            Err(e) => {
                tracing::warn!(host = %p, error = %crate::admin::chain(&e), "host left out of a ticket: no capacity answer")
            }
        }
    }
    out
}

async fn request_ticket(d: &Arc<Daemon>, vm: &Vm, n: u32) -> ApiResponse {
    if vm.clone_id != 0 {
        return api_error(
            E::WrongRole,
            "Nested cloning is not supported: only an original VM (clone ID 0) can request tickets",
        );
    }
    let remote = if d.cfg.cluster.is_some() {
        peer_capacity(d).await
    } else {
        Vec::new()
    };
    let remote_free: u32 = remote.iter().map(|(_, f)| *f).sum();
    let mut st = d.state.lock().unwrap();
    purge(&mut st);
    let free = Daemon::free_slots(&st, d.cfg.max_vms);
    // One VM may hold at most one ticket's quota of unused slots, so a
    // guest cannot reserve the whole host.
    // Counted over the whole cluster: slots placed on other hosts count too.
    let held: u32 = st
        .tickets
        .values()
        .filter(|t| {
            t.owner == vm.name && matches!(t.state, TicketState::Granted | TicketState::Cloning)
        })
        .map(|t| t.granted)
        .sum();
    let allowed = d.cfg.quota_per_ticket.saturating_sub(held);
    if allowed == 0 {
        return api_error(
            E::NoCapacity,
            format!("This VM already holds {held} unused clone slots; use or let its tickets expire first"),
        );
    }
    let granted = n
        .min(allowed)
        .min(free + remote_free)
        .min(crate::net::MAX_CLONE_ID);
    if granted == 0 {
        return api_error(
            E::NoCapacity,
            format!(
                "No capacity for clones: this host runs {} of {} VMs, other hosts have {remote_free} free slots",
                d.cfg.max_vms - free,
                d.cfg.max_vms
            ),
        );
    }
    let mut free_by_host = vec![(d.cfg.host.clone(), free)];
    free_by_host.extend(remote);
    let placement = place(&d.cfg.host, &free_by_host, granted);
    let id = format!("t-{}", random_hex(8));
    st.tickets.insert(
        id.clone(),
        Ticket {
            id: id.clone(),
            owner: vm.name.clone(),
            granted,
            state: TicketState::Granted,
            children: BTreeMap::new(),
            generation: None,
            created: Instant::now(),
            placement: placement.clone(),
            published: None,
        },
    );
    tracing::info!(vm = %vm.name, ticket = %id, requested = n, granted, ?placement, "ticket granted");
    ApiResponse::Ticket {
        ticket: id,
        granted,
    }
}

/// Looks up a ticket that `vm` owns, with precise errors.
pub fn check_ticket<'a>(
    st: &'a mut crate::daemon::State,
    vm: &Vm,
    ticket: &str,
) -> Result<&'a mut Ticket, ApiResponse> {
    let t = st
        .tickets
        .get_mut(ticket)
        .ok_or_else(|| api_error(E::UnknownTicket, format!("Unknown ticket {ticket}")))?;
    if t.owner != vm.name {
        return Err(api_error(
            E::NotYourTicket,
            format!("Ticket {ticket} belongs to another VM"),
        ));
    }
    if let TicketState::Discarded(why) = t.state {
        return Err(api_error(
            E::TicketDiscarded,
            format!("Ticket {ticket} was discarded: {why}"),
        ));
    }
    Ok(t)
}

async fn exit(d: &Arc<Daemon>, vm: &Arc<Vm>, status: i32) -> ApiResponse {
    if vm.clone_id == 0 {
        return api_error(
            E::WrongRole,
            "sf_exit is for clones; the parent (clone ID 0) uses sf_join or sf_kill",
        );
    }
    {
        *vm.exit_state.lock().unwrap() = Some(ChildState::Exited { code: status });
        let mut st = d.state.lock().unwrap();
        if let Some(c) = vm
            .ticket
            .as_ref()
            .and_then(|t| st.tickets.get_mut(t))
            .and_then(|t| t.children.get_mut(&vm.clone_id))
        {
            if c.state == ChildState::Running {
                c.state = ChildState::Exited { code: status };
            }
        }
    }
    d.bump_tickets();
    tracing::info!(vm = %vm.name, status, "clone called sf_exit");
    let (d2, vm2) = (d.clone(), vm.clone());
    tokio::spawn(async move {
        // Let the answer reach the guest before the VM goes.
        tokio::time::sleep(Duration::from_millis(20)).await;
        d2.stop_vm(&vm2).await;
    });
    ApiResponse::Exiting
}

async fn join(d: &Arc<Daemon>, vm: &Arc<Vm>, ticket: &str) -> ApiResponse {
    let mut changed = d.tickets_changed.subscribe();
    loop {
        {
            let mut st = d.state.lock().unwrap();
            let t = match check_ticket(&mut st, vm, ticket) {
                Ok(t) => t,
                Err(e) => return e,
            };
            match t.state {
                TicketState::Granted => {
                    return api_error(
                        E::BadRequest,
                        format!("Ticket {ticket} has not been used by sf_clone"),
                    )
                }
                TicketState::Cloning => {}
                _ if t.all_done() => {
                    let children = t.statuses();
                    t.state = TicketState::Discarded("it was joined");
                    let (gen, published) = (t.generation.take(), t.published.take());
                    drop(st);
                    d.drop_generation(gen, published);
                    return ApiResponse::Joined { children };
                }
                _ => {}
            }
        }
        let mut ended = vm.ended.subscribe();
        tokio::select! {
            _ = changed.changed() => {}
            _ = crate::daemon::wait_until(&mut ended, |e| e.is_some()) => return api_error(E::Failed, "VM is stopping"),
        }
    }
}

async fn kill(d: &Arc<Daemon>, vm: &Arc<Vm>, ticket: &str) -> ApiResponse {
    // Wait out a clone in progress so none of its children escape the kill.
    let mut changed = d.tickets_changed.subscribe();
    let kids = loop {
        {
            let mut st = d.state.lock().unwrap();
            let t = match check_ticket(&mut st, vm, ticket) {
                Ok(t) => t,
                Err(e) => return e,
            };
            if t.state != TicketState::Cloning {
                let remote = t.remote_hosts(&d.cfg.host);
                let names: Vec<String> = t
                    .children
                    .values_mut()
                    .filter(|c| c.state == ChildState::Running)
                    .map(|c| {
                        c.state = ChildState::Killed;
                        c.vm.clone()
                    })
                    .collect();
                t.state = TicketState::Discarded("it was killed");
                let (gen, published) = (t.generation.take(), t.published.take());
                let kids = names
                    .into_iter()
                    .filter_map(|n| st.vms.get(&n).cloned())
                    .collect::<Vec<_>>();
                drop(st);
                d.drop_generation(gen, published);
                break (kids, remote);
            }
        }
        let _ = changed.changed().await;
    };
    let (kids, remote) = kids;
    futures::future::join_all(kids.iter().map(|k| d.stop_vm(k))).await;
    d.stop_remote(
        remote
            .into_iter()
            .map(|h| (h, ticket.to_string()))
            .collect(),
        "the parent called sf_kill",
    )
    .await;
    d.bump_tickets();
    let st = d.state.lock().unwrap();
    let children = st
        .tickets
        .get(ticket)
        .map(|t| t.statuses())
        .unwrap_or_default();
    tracing::info!(vm = %vm.name, %ticket, killed = kids.len(), "ticket killed");
    ApiResponse::Killed { children }
}

/// Another host asks to stop its clones of `ticket` here (kill, or the
/// parent ended).
pub async fn stop_ticket_clones(d: &Arc<Daemon>, ticket: &str, reason: &str) {
    let kids: Vec<Arc<Vm>> = d
        .state
        .lock()
        .unwrap()
        .vms
        .values()
        .filter(|v| v.ticket.as_deref() == Some(ticket) && v.origin.is_some())
        .cloned()
        .collect();
    tracing::info!(%ticket, %reason, clones = kids.len(), "stopping clones at the origin's request");
    futures::future::join_all(kids.iter().map(|k| d.stop_vm(k))).await;
}

/// A clone on another host ended: record it for the parent's `sf_join`.
pub fn child_ended(d: &Daemon, ticket: &str, clone_id: u32, state: ChildState) {
    {
        let mut st = d.state.lock().unwrap();
        if let Some(c) = st
            .tickets
            .get_mut(ticket)
            .and_then(|t| t.children.get_mut(&clone_id))
        {
            if c.state == ChildState::Running {
                tracing::info!(%ticket, clone_id, ?state, "remote clone ended");
                if matches!(state, ChildState::Lost { .. }) {
                    d.counters.clones_lost.fetch_add(1, Ordering::Relaxed);
                }
                c.state = state;
            }
        }
    }
    d.bump_tickets();
}

#[cfg(test)]
mod tests {
    use super::place;

    fn f(v: &[(&str, u32)]) -> Vec<(String, u32)> {
        v.iter().map(|(h, n)| (h.to_string(), *n)).collect()
    }

    #[test]
    fn spreads_by_free_capacity_preferring_other_hosts() {
        assert_eq!(
            place("h0", &f(&[("h0", 7), ("h1", 8), ("h2", 8)]), 2),
            f(&[("h0", 0), ("h1", 1), ("h2", 1)])
        );
        assert_eq!(
            place("h0", &f(&[("h0", 8), ("h1", 8), ("h2", 8)]), 3),
            f(&[("h0", 1), ("h1", 1), ("h2", 1)])
        );
        assert_eq!(
            place("h0", &f(&[("h0", 2), ("h1", 9)]), 4),
            f(&[("h0", 0), ("h1", 4)])
        );
        assert_eq!(place("h0", &f(&[("h0", 3)]), 2), f(&[("h0", 2)]));
        // Never more than a host has.
        assert_eq!(
            place("h0", &f(&[("h0", 1), ("h1", 1)]), 5),
            f(&[("h0", 1), ("h1", 1)])
        );
    }
}
