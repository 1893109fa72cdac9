//! SnowFlock API calls arriving from guests (`GuestMsg::Request`).
//!
//! Everything here is driven by untrusted guests: a guest can only act on
//! its own tickets and its own children, and every refusal is a clear
//! [`ApiResponse::Error`]; nothing a guest sends can stop or pause another
//! VM, or leave its own parent paused.

use crate::lifecycle::daemon::{random_hex, wait_until};
use crate::lifecycle::Daemon;
use crate::state::metrics::bump;
use crate::state::placement::place;
use crate::state::ticket::{JoinStep, KillStep, Ticket, TicketError};
use crate::state::vm::{EndCause, Vm};
use snowflock_proto::admin::AdminResponse;
use snowflock_proto::api::{ApiErrorCode as E, ApiRequest, ApiResponse, ChildState};
use snowflock_proto::channel::HostMsg;
use snowflock_proto::peer::PeerRequest;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

fn ticket_error(e: TicketError) -> ApiResponse {
    ApiResponse::error(e.code(), e.to_string())
}

/// Answers one API call of `vm`'s guest.
pub async fn handle(d: Arc<Daemon>, vm: Arc<Vm>, id: u64, req: ApiRequest) {
    let resp = answer(&d, &vm, id, req).await;
    bump(&d.counters.api_requests);
    if matches!(resp, ApiResponse::Error { .. }) {
        bump(&d.counters.api_errors);
    }
    if !vm.is_ended() {
        vm.send(HostMsg::Response { id, resp });
    }
}

/// The answer to one API call.
pub async fn answer(d: &Arc<Daemon>, vm: &Arc<Vm>, id: u64, req: ApiRequest) -> ApiResponse {
    if let Err(msg) = req.validate() {
        return ApiResponse::error(E::BadRequest, msg);
    }
    match req {
        ApiRequest::RequestTicket { n } => request_ticket(d, vm, n).await,
        ApiRequest::Clone { ticket } => {
            let span = tracing::info_span!("clone", vm = %vm.name(), %ticket);
            super::clone::clone(d.clone(), vm.clone(), id, ticket)
                .instrument(span)
                .await
        }
        ApiRequest::Exit { status } => exit(d, vm, status),
        ApiRequest::Join { ticket } => join(d, vm, &ticket).await,
        ApiRequest::Kill { ticket } => kill(d, vm, &ticket).await,
        ApiRequest::Id => ApiResponse::Identity {
            vm: vm.name().to_string(),
            clone_id: vm.spec.clone_id,
            ticket: vm.spec.ticket.clone(),
            ip: Some(vm.placed.ip.clone()),
        },
    }
}

/// Free slots of every other host that answers (quickly).
async fn peer_capacity(d: &Daemon) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let answers =
        crate::cluster::call_all(&*d.peers, &PeerRequest::Capacity, Duration::from_secs(2)).await;
    for (p, a) in answers {
        match a {
            Ok(AdminResponse::Capacity { free, .. }) => out.push((p, free)),
            Ok(other) => tracing::warn!(host = %p, answer = ?other, "unexpected capacity answer"),
            Err(e) => {
                tracing::warn!(host = %p, error = %snowflock_proto::error::chain(&e), "host left out of a ticket: no capacity answer")
            }
        }
    }
    out
}

async fn request_ticket(d: &Arc<Daemon>, vm: &Vm, n: u32) -> ApiResponse {
    if vm.spec.is_clone() {
        return ApiResponse::error(
            E::WrongRole,
            "Nested cloning is not supported: only an original VM (clone ID 0) can request tickets",
        );
    }
    let remote = peer_capacity(d).await;
    let remote_free: u32 = remote.iter().map(|(_, f)| *f).sum();
    let me = &d.cfg.host;
    let granted = d.with(|r| {
        r.purge(Instant::now());
        let free = r.free_slots(d.cfg.max_vms);
        // One VM may hold at most one ticket's quota of unused slots (over
        // the whole cluster), so a guest cannot reserve every host.
        let held = r.unused_slots_of(vm.name());
        let allowed = d.cfg.quota_per_ticket.saturating_sub(held);
        if allowed == 0 {
            return Err(ApiResponse::error(
                E::NoCapacity,
                format!("This VM already holds {held} unused clone slots; use or let its tickets expire first"),
            ));
        }
        let granted = n
            .min(allowed)
            .min(free + remote_free)
            .min(crate::host::net::MAX_CLONE_ID);
        if granted == 0 {
            return Err(ApiResponse::error(
                E::NoCapacity,
                format!(
                    "No capacity for clones: this host runs {} of {} VMs, other hosts have {remote_free} free slots",
                    d.cfg.max_vms - free,
                    d.cfg.max_vms
                ),
            ));
        }
        let mut free_by_host = vec![(me.clone(), free)];
        free_by_host.extend(remote);
        let placement = place(me, &free_by_host, granted);
        let id = format!("t-{}", random_hex(8));
        tracing::info!(vm = %vm.name(), ticket = %id, requested = n, granted, ?placement, "ticket granted");
        r.tickets
            .insert(id.clone(), Ticket::grant(id.clone(), vm.name(), granted, placement));
        Ok((id, granted))
    });
    match granted {
        Ok((ticket, granted)) => ApiResponse::Ticket { ticket, granted },
        Err(e) => e,
    }
}

fn exit(d: &Arc<Daemon>, vm: &Arc<Vm>, status: i32) -> ApiResponse {
    if !vm.spec.is_clone() {
        return ApiResponse::error(
            E::WrongRole,
            "sf_exit is for clones; the parent (clone ID 0) uses sf_join or sf_kill",
        );
    }
    vm.begin_stop(EndCause::Exited(status));
    if let Some(t) = &vm.spec.ticket {
        d.with(|r| r.child_ended(t, vm.spec.clone_id, ChildState::Exited { code: status }));
    }
    d.bump_tickets();
    tracing::info!(vm = %vm.name(), status, "clone called sf_exit");
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
        let step = d.with(|r| r.owned_ticket(vm.name(), ticket).and_then(|t| t.join()));
        match step {
            Err(e) => return ticket_error(e),
            Ok(JoinStep::Done { children, release }) => {
                d.drop_generation(release);
                return ApiResponse::Joined { children };
            }
            Ok(JoinStep::Wait) => {}
        }
        let mut life = vm.life.subscribe();
        tokio::select! {
            _ = changed.changed() => {}
            _ = wait_until(&mut life, |l| l.is_ended()) => return ApiResponse::error(E::Failed, "VM is stopping"),
        }
    }
}

async fn kill(d: &Arc<Daemon>, vm: &Arc<Vm>, ticket: &str) -> ApiResponse {
    // Wait out a clone in progress so none of its children escape the kill.
    let mut changed = d.tickets_changed.subscribe();
    let (kids, remote) = loop {
        let step = d.with(|r| {
            let step = r
                .owned_ticket(vm.name(), ticket)
                .and_then(|t| t.kill(&d.cfg.host))?;
            Ok(match step {
                KillStep::Wait => None,
                KillStep::Stop {
                    vms,
                    remote_hosts,
                    release,
                } => {
                    let kids: Vec<Arc<Vm>> =
                        vms.iter().filter_map(|n| r.vms.get(n).cloned()).collect();
                    Some((kids, remote_hosts, release))
                }
            })
        });
        match step {
            Err(e) => return ticket_error(e),
            Ok(Some((kids, remote, release))) => {
                d.drop_generation(release);
                break (kids, remote);
            }
            Ok(None) => {
                let _ = changed.changed().await;
            }
        }
    };
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
    let children = d.with(|r| {
        r.tickets
            .get(ticket)
            .map(|t| t.statuses())
            .unwrap_or_default()
    });
    tracing::info!(vm = %vm.name(), %ticket, killed = kids.len(), "ticket killed");
    ApiResponse::Killed { children }
}

/// A clone on another host ended: record it for the parent's `sf_join`.
pub fn child_ended(d: &Daemon, ticket: &str, clone_id: u32, state: ChildState) {
    let lost = matches!(state, ChildState::Lost { .. });
    let shown = format!("{state:?}");
    if d.with(|r| r.child_ended(ticket, clone_id, state)) {
        tracing::info!(%ticket, clone_id, state = %shown, "remote clone ended");
        if lost {
            bump(&d.counters.clones_lost);
        }
    }
    d.bump_tickets();
}
