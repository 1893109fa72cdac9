//! SnowFlock API calls arriving from guests (`GuestMsg::Request`).
//!
//! Everything here is driven by untrusted guests: a guest can only act on
//! its own tickets and its own children, and every refusal is a clear
//! [`ApiResponse::Error`]; nothing a guest sends can stop or pause another
//! VM, or leave its own parent paused.

use crate::alloc::AllocError;
use crate::lifecycle::daemon::{random_hex, wait_until};
use crate::lifecycle::Daemon;
use crate::state::metrics::bump;
use crate::state::placement::place;
use crate::state::ticket::{JoinStep, KillStep, Ticket, TicketError};
use crate::state::vm::{EndCause, Vm};
use snowflock_proto::api::{ApiErrorCode as E, ApiRequest, ApiResponse, ChildState};
use snowflock_proto::channel::HostMsg;
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
    if let Err(e) = req.validate() {
        return ApiResponse::error(E::BadRequest, e.to_string());
    }
    match req {
        ApiRequest::RequestTicket { n, independent } => request_ticket(d, vm, n, independent).await,
        ApiRequest::Clone { ticket } => {
            let span = tracing::info_span!("clone", vm = %vm.name(), %ticket);
            super::clone::clone(d.clone(), vm.clone(), id, ticket)
                .instrument(span)
                .await
        }
        ApiRequest::Exit { status } => exit(d, vm, status),
        ApiRequest::Join { ticket } => join(d, vm, &ticket).await,
        ApiRequest::Kill { ticket } => kill(d, vm, &ticket).await,
        ApiRequest::Status { ticket } => match d.with(|r| r.ticket_status(vm.name(), &ticket)) {
            Ok((state, children)) => ApiResponse::Status {
                state: state.to_string(),
                children,
            },
            Err(e) => ticket_error(e),
        },
        ApiRequest::SiblingExec { .. } => ApiResponse::error(
            E::BadRequest,
            "sf-exec is answered by the guest's own agent, not by the host",
        ),
        ApiRequest::Id => ApiResponse::Identity {
            vm: vm.name().to_string(),
            clone_id: vm.spec.clone_id,
            ticket: vm.spec.ticket.clone(),
            ip: Some(vm.placed.ip.clone()),
        },
    }
}

/// Why a ticket request is refused before the allocator is asked.
fn ticket_limits(
    d: &Daemon,
    r: &mut crate::state::registry::Registry,
    vm: &Vm,
    n: u32,
) -> Result<(u32, u32), ApiResponse> {
    // One VM may hold at most one ticket's quota of unused slots (over the
    // whole cluster), so a guest cannot reserve every host.
    let held = r.unused_slots_of(vm.name());
    let allowed = d.cfg.quota_per_ticket.saturating_sub(held);
    if allowed == 0 {
        return Err(ApiResponse::error(
            E::NoCapacity,
            format!("This VM already holds {held} unused clone slots; use or let its tickets expire first"),
        ));
    }
    let first_id = r.next_clone_id(vm.name());
    let ids_left = (crate::host::net::MAX_CLONE_ID + 1).saturating_sub(first_id);
    if ids_left == 0 {
        return Err(ApiResponse::error(
            E::NoCapacity,
            format!(
                "This VM's flock has no clone IDs left: its live tickets hold IDs 1 to {}; join or kill one first",
                first_id - 1
            ),
        ));
    }
    Ok((n.min(allowed).min(ids_left), first_id))
}

async fn request_ticket(
    d: &Arc<Daemon>,
    vm: &Vm,
    n: u32,
    independent: Option<bool>,
) -> ApiResponse {
    if vm.spec.is_clone() {
        return ApiResponse::error(
            E::WrongRole,
            "Nested cloning is not supported: only an original VM (clone ID 0) can request tickets",
        );
    }
    let _one_at_a_time = vm.ticket_lock.lock().await;
    let most = match d.with(|r| {
        r.purge(Instant::now());
        ticket_limits(d, r, vm, n)
    }) {
        Ok((most, _)) => most,
        Err(e) => return e,
    };
    let id = format!("t-{}", random_hex(8));
    let want = crate::alloc::Want {
        ticket: &id,
        vm: vm.name(),
        most,
    };
    let offer = match d.alloc.offer(want).await {
        Ok(o) => o,
        Err(e) => {
            let code = match e {
                AllocError::NoCapacity(_) => E::NoCapacity,
                AllocError::Unavailable(_) => E::HostUnavailable,
                AllocError::Refused(_) | AllocError::Spawn { .. } => E::Failed,
            };
            tracing::warn!(vm = %vm.name(), ticket = %id, requested = n, allocator = d.alloc.kind(), error = %snowflock_proto::error::chain(&e), "ticket refused");
            return ApiResponse::error(code, snowflock_proto::error::chain(&e));
        }
    };
    let me = &d.cfg.host;
    // The guest's word, else this host's default (host.toml `independent`).
    let independent =
        independent.unwrap_or_else(|| d.cfg.cluster.as_ref().is_some_and(|c| c.independent));
    // Quota, clone IDs and this host's slots again: they may have changed
    // while the allocator was asked.
    let granted = d.with(|r| {
        r.purge(Instant::now());
        let (most, first_id) = ticket_limits(d, r, vm, n)?;
        let free = r.free_slots(d.cfg.max_vms).min(offer.here);
        let others: u32 = offer.hosts.iter().map(|(_, f)| *f).sum();
        let granted = most.min(free.saturating_add(others));
        if granted == 0 {
            return Err(ApiResponse::error(
                E::NoCapacity,
                match d.alloc.kind() {
                    "static" => format!(
                        "No capacity for clones: this host runs {} of {} VMs, other hosts have {others} free slots",
                        d.cfg.max_vms - r.free_slots(d.cfg.max_vms),
                        d.cfg.max_vms
                    ),
                    kind => format!(
                        "No capacity for clones: the {kind} allocator granted hosts {:?} with no free VM slots",
                        offer.hosts.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>()
                    ),
                },
            ));
        }
        let mut free_by_host = vec![(me.clone(), free)];
        free_by_host.extend(offer.hosts.iter().cloned());
        let placement = place(me, &free_by_host, granted);
        tracing::info!(vm = %vm.name(), ticket = %id, requested = n, granted, first_id, ?placement, independent, allocator = d.alloc.kind(), "ticket granted");
        let mut t = Ticket::grant(id.clone(), vm.name(), first_id, granted, placement);
        t.independent = independent;
        r.tickets.insert(id.clone(), t);
        Ok(granted)
    });
    match granted {
        Ok(granted) => {
            d.bump_tickets();
            ApiResponse::Ticket {
                ticket: id,
                granted,
            }
        }
        Err(e) => {
            d.alloc.release(&id).await;
            e
        }
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
                d.drop_generation(release).await;
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
                d.drop_generation(release).await;
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
    if d.with(|r| r.child_ended(ticket, clone_id, state.clone())) {
        tracing::info!(%ticket, clone_id, ?state, "remote clone ended");
        if matches!(state, ChildState::Lost { .. }) {
            bump(&d.counters.clones_lost);
        }
    }
    d.bump_tickets();
}

#[cfg(test)]
mod tests {
    use crate::testing::Harness;
    use snowflock_proto::admin::{AdminResponse, CloneStart};
    use snowflock_proto::api::{ApiErrorCode as E, ApiRequest as R, ApiResponse, ChildState};
    use snowflock_proto::peer::PeerRequest;

    /// A ticket request for `n` clones, leaving independence to the host.
    fn ticket_of(n: u32) -> R {
        R::RequestTicket {
            n,
            independent: None,
        }
    }

    /// `h1` answers with `free` slots and starts every clone it is asked to.
    fn h1_starts_clones(h: &Harness, free: u32) {
        h.peer("h1", move |req| match req {
            PeerRequest::Capacity => AdminResponse::Capacity {
                host: "h1".into(),
                free,
            },
            PeerRequest::StartClones { clone_ids, .. } => AdminResponse::ClonesStarted {
                results: clone_ids
                    .iter()
                    .map(|id| CloneStart {
                        clone_id: *id,
                        vm: format!("p-g1c{id}"),
                        error: None,
                    })
                    .collect(),
            },
            _ => AdminResponse::Ok,
        });
    }

    fn code(r: &ApiResponse) -> Option<E> {
        match r {
            ApiResponse::Error { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The children's states in a join or kill answer.
    fn children(r: ApiResponse) -> Vec<snowflock_proto::api::ChildStatus> {
        match r {
            ApiResponse::Joined { children } | ApiResponse::Killed { children } => children,
            other => panic!("not a join or kill answer: {other:?}"),
        }
    }

    fn message(r: &ApiResponse) -> String {
        match r {
            ApiResponse::Error { message, .. } => message.clone(),
            other => panic!("not an error: {other:?}"),
        }
    }

    fn with_fake_alloc() -> (Harness, std::sync::Arc<crate::alloc::fake::FakeAlloc>) {
        let a = std::sync::Arc::new(crate::alloc::fake::FakeAlloc::default());
        (Harness::build_with(|_| {}, false, Some(a.clone())), a)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allocator_refusals_reach_the_guest_with_their_class() {
        use crate::alloc::AllocError;
        let (h, a) = with_fake_alloc();
        let (_, p) = h.start("p").await;
        a.answer(Err(AllocError::NoCapacity(
            "Slurm granted no node within 4 s".into(),
        )));
        a.answer(Err(AllocError::Unavailable(
            "Slurm's controller cannot be reached".into(),
        )));
        a.answer(Err(AllocError::Refused(
            "Invalid partition name specified".into(),
        )));
        let r = p.call(1, ticket_of(9)).await;
        assert_eq!(code(&r), Some(E::NoCapacity));
        assert!(message(&r).contains("within 4 s"), "{r:?}");
        let r = p.call(2, ticket_of(1)).await;
        assert_eq!(code(&r), Some(E::HostUnavailable));
        let r = p.call(3, ticket_of(1)).await;
        assert_eq!(code(&r), Some(E::Failed));
        assert!(message(&r).contains("Invalid partition"), "{r:?}");
        // The allocator is asked for no more than the quota (4) allows.
        assert_eq!(*a.asked.lock(), [4, 1, 1]);
        assert!(h.d.with(|r| r.tickets.is_empty()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clones_go_only_where_the_allocator_offers() {
        use crate::alloc::Offer;
        let (h, a) = with_fake_alloc();
        let (_, p) = h.start("p").await;
        // Slurm granted h1 and h2, one slot each, not this host.
        a.answer(Ok(Offer {
            hosts: vec![("h1".into(), 1), ("h2".into(), 1)],
            here: 0,
        }));
        let r = p.call(1, ticket_of(3)).await;
        let ApiResponse::Ticket { ticket, granted } = r else {
            panic!("{r:?}");
        };
        assert_eq!(granted, 2);
        let placement = h.d.with(|r| r.tickets[&ticket].placement.clone());
        assert_eq!(
            placement,
            [("h0".to_string(), 0), ("h1".into(), 1), ("h2".into(), 1)]
        );
        // This host granted, but its slots bound it: 8 VMs, 1 runs, 2 held.
        a.answer(Ok(Offer {
            hosts: vec![],
            here: u32::MAX,
        }));
        let r = p.call(2, ticket_of(2)).await;
        assert!(matches!(r, ApiResponse::Ticket { granted: 2, .. }), "{r:?}");
        assert!(a.released.lock().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_offer_with_no_free_slot_is_released() {
        use crate::alloc::Offer;
        let (h, a) = with_fake_alloc();
        let (_, p) = h.start("p").await;
        a.answer(Ok(Offer {
            hosts: vec![("h1".into(), 0)],
            here: 0,
        }));
        let r = p.call(1, ticket_of(2)).await;
        assert_eq!(code(&r), Some(E::NoCapacity));
        assert!(
            message(&r).contains("granted hosts [\"h1\"] with no free VM slots"),
            "{r:?}"
        );
        assert_eq!(
            a.released.lock().len(),
            1,
            "what was taken for it is given back"
        );
        assert!(h.d.with(|r| r.tickets.is_empty()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tickets_are_bounded_by_quota_and_capacity() {
        let h = Harness::new();
        let (_, p) = h.start("p").await;
        // Quota 4 per VM.
        let r = p.call(1, ticket_of(10)).await;
        assert!(matches!(r, ApiResponse::Ticket { granted: 4, .. }), "{r:?}");
        let r = p.call(2, ticket_of(1)).await;
        assert_eq!(code(&r), Some(E::NoCapacity));
        assert!(
            message(&r).contains("already holds 4 unused clone slots"),
            "{r:?}"
        );
        // Capacity: 8 VMs, 1 running, 4 reserved by the ticket.
        let (_, q) = h.start("q").await;
        let r = q.call(1, ticket_of(4)).await;
        assert!(matches!(r, ApiResponse::Ticket { granted: 2, .. }), "{r:?}");
        let r = q.call(2, ticket_of(1)).await;
        assert_eq!(code(&r), Some(E::NoCapacity));
        assert!(message(&r).contains("No capacity for clones"), "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clone_resumes_children_and_join_reports_their_exits() {
        let h = Harness::new();
        let (parent, p) = h.start("p").await;
        let ticket = h.ticket_and_clone(&p, 2).await;
        for c in ["p-g1c1", "p-g1c2"] {
            let calls = h.proc(c).calls.lock().clone();
            assert_eq!(calls, ["migrate_incoming", "wait_incoming", "cont"]);
            let vm = h.d.vm(c).unwrap();
            assert_eq!(vm.spec.parent, "p");
            assert_eq!(vm.spec.ticket.as_deref(), Some(ticket.as_str()));
            assert_eq!(vm.spec.flock, parent.spec.flock);
        }
        let pc = h.proc("p").calls.lock().clone();
        assert!(pc.starts_with(&["stop", "save_devices", "cont"]), "{pc:?}");
        let report = h.d.with(|r| r.reports.last().cloned()).unwrap();
        assert_eq!(report.clones, 2);
        assert!(report.timeline.iter().any(|(n, _)| n == "clone2_ready"));
        // Identity answers.
        let c1 = h.proc("p-g1c1");
        match c1.call(7, R::Id).await {
            ApiResponse::Identity { clone_id, ip, .. } => {
                assert_eq!(clone_id, 1);
                assert_eq!(
                    ip.as_deref(),
                    Some(crate::host::net::ip_cidr(parent.spec.flock, 1).as_str())
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c1.call(8, R::Exit { status: 3 }).await,
            ApiResponse::Exiting
        );
        let joined = tokio::spawn({
            let (p, t) = (p.clone(), ticket.clone());
            async move { p.call(3, R::Join { ticket: t }).await }
        });
        h.until("clone 1 ended", || h.d.vm("p-g1c1").is_err()).await;
        assert!(!joined.is_finished(), "join waits for clone 2");
        h.proc("p-g1c2").call(9, R::Exit { status: 4 }).await;
        let children = children(joined.await.unwrap());
        assert_eq!(children[0].state, ChildState::Exited { code: 3 });
        assert_eq!(children[1].state, ChildState::Exited { code: 4 });
        // A joined ticket is gone; its generation too.
        let r = p
            .call(
                4,
                R::Join {
                    ticket: ticket.clone(),
                },
            )
            .await;
        assert_eq!(code(&r), Some(E::TicketDiscarded));
        assert!(!h.d.cfg.state_dir.join("gens/p-g1").exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_ends_running_children_and_keeps_exits() {
        let h = Harness::new();
        let (_, p) = h.start("p").await;
        let ticket = h.ticket_and_clone(&p, 2).await;
        h.proc("p-g1c1").call(5, R::Exit { status: 3 }).await;
        h.until("clone 1 ended", || h.d.vm("p-g1c1").is_err()).await;
        let children = children(
            p.call(
                3,
                R::Kill {
                    ticket: ticket.clone(),
                },
            )
            .await,
        );
        assert_eq!(children[0].state, ChildState::Exited { code: 3 });
        assert_eq!(children[1].state, ChildState::Killed);
        assert!(h.d.vm("p-g1c2").is_err(), "killed clone is gone");
        assert_eq!(h.vmm.running(), ["p"]);
        let r = p.call(4, R::Clone { ticket }).await;
        assert_eq!(code(&r), Some(E::TicketDiscarded));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_guest_error_path_is_a_clear_refusal() {
        let h = Harness::new();
        let (_, p) = h.start("p").await;
        let (_, q) = h.start("q").await;
        let r = p
            .call(
                1,
                R::Join {
                    ticket: "t-0123456789abcdef".into(),
                },
            )
            .await;
        assert_eq!(code(&r), Some(E::UnknownTicket));
        let r = p
            .call(
                2,
                R::Clone {
                    ticket: "no such\nticket".into(),
                },
            )
            .await;
        assert_eq!(code(&r), Some(E::BadRequest));
        let r = p.call(3, R::Exit { status: 0 }).await;
        assert_eq!(code(&r), Some(E::WrongRole));
        assert!(message(&r).contains("sf_exit is for clones"));
        let t = match p.call(4, ticket_of(1)).await {
            ApiResponse::Ticket { ticket, .. } => ticket,
            other => panic!("{other:?}"),
        };
        let r = q.call(1, R::Clone { ticket: t.clone() }).await;
        assert_eq!(code(&r), Some(E::NotYourTicket));
        let r = q.call(2, R::Kill { ticket: t.clone() }).await;
        assert_eq!(code(&r), Some(E::NotYourTicket));
        let r = p.call(5, R::Join { ticket: t.clone() }).await;
        assert_eq!(code(&r), Some(E::BadRequest));
        assert!(message(&r).contains("has not been used by sf_clone"));
        assert!(matches!(
            p.call(6, R::Clone { ticket: t.clone() }).await,
            ApiResponse::Cloned { .. }
        ));
        let r = p.call(7, R::Clone { ticket: t.clone() }).await;
        assert_eq!(code(&r), Some(E::TicketUsed));
        // A clone cannot clone or ask for tickets.
        let c = h.proc("p-g1c1");
        let r = c.call(1, ticket_of(1)).await;
        assert_eq!(code(&r), Some(E::WrongRole));
        let r = c.call(2, R::Clone { ticket: t.clone() }).await;
        assert_eq!(code(&r), Some(E::WrongRole));
        assert!(message(&r).contains("Nested cloning is not supported"));
        let r = p.call(8, ticket_of(0)).await;
        assert_eq!(code(&r), Some(E::BadRequest));
        // None of it harmed anyone.
        assert_eq!(h.vmm.running(), ["p", "p-g1c1", "q"]);
        let counters = h.d.counters.map();
        assert!(counters["api_errors"] >= 9, "{counters:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clone_that_cannot_take_its_identity_is_lost_not_fatal() {
        let h = Harness::new();
        h.vmm.refuse_identity.lock().push("p-g1c1".into());
        let (_, p) = h.start("p").await;
        let ticket = h.ticket_and_clone(&p, 2).await;
        h.until("the failed clone is gone", || h.d.vm("p-g1c1").is_err())
            .await;
        h.proc("p-g1c2").call(1, R::Exit { status: 0 }).await;
        let children = children(p.call(3, R::Join { ticket }).await);
        match &children[0].state {
            ChildState::Lost { reason } => {
                assert!(reason.contains("cannot set the IP"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(children[1].state, ChildState::Exited { code: 0 });
        assert_eq!(h.d.counters.map()["clones_lost"], 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clones_are_placed_on_other_hosts_and_their_ends_come_back() {
        let h = Harness::cluster();
        h1_starts_clones(&h, 7);
        // h2 is down: left out of the ticket.
        h.peers.set("h2", None);
        let (_, p) = h.start("p").await;
        let ticket = h.ticket_and_clone(&p, 2).await;
        // h0 runs the parent: 7 free slots each; a tie goes to the other
        // host first, then h0 has the most.
        let placement = h.d.with(|r| r.tickets[&ticket].placement.clone());
        assert_eq!(
            placement,
            vec![("h0".to_string(), 1), ("h1".to_string(), 1)]
        );
        assert!(h.d.vm("p-g1c2").is_err() && h.d.vm("p-g1c1").is_ok());
        let sent = h.peers.sent.lock().clone();
        assert!(sent.iter().any(|(host, r)| host == "h1"
            && matches!(r, PeerRequest::StartClones { clone_ids, .. } if clone_ids == &[2])));
        // The remote clone ends: h1 reports it to us.
        let resp = crate::frontends::peer::answer(
            &h.d,
            PeerRequest::ChildEnded {
                ticket: ticket.clone(),
                clone_id: 2,
                state: ChildState::Lost {
                    reason: "QEMU died".into(),
                },
            },
        )
        .await;
        assert_eq!(resp, AdminResponse::Ok);
        let children = children(
            p.call(
                3,
                R::Kill {
                    ticket: ticket.clone(),
                },
            )
            .await,
        );
        assert_eq!(children[0].state, ChildState::Killed);
        assert!(matches!(children[1].state, ChildState::Lost { .. }));
        assert_eq!(h.d.counters.map()["clones_lost"], 1);
    }

    /// Host `h0` of a cluster with `h1`, multicast on port 7500, tickets
    /// independent by default or not.
    fn mcast_cluster(independent: bool) -> Harness {
        use crate::host::config::{Cluster, Mcast, Peer};
        let h = Harness::build(
            |c| {
                c.cluster = Some(Cluster {
                    listen: "127.0.0.1:7170".parse().unwrap(),
                    page_server: "127.0.0.1:7171".parse().unwrap(),
                    key_file: "/nonexistent".into(),
                    peers: vec![Peer {
                        name: "h1".into(),
                        addr: "127.0.0.2:7170".parse().unwrap(),
                    }],
                    fetch_timeout: std::time::Duration::from_secs(10),
                    prefetch_pages: 0,
                    mcast: Some(Mcast {
                        port: 7500,
                        max_rate: 1 << 20,
                    }),
                    memcache_limit: None,
                    independent,
                    completion_rate: 1 << 20,
                    prefetch_siblings: true,
                    fault_trace_dir: None,
                })
            },
            true,
        );
        h1_starts_clones(&h, 8);
        h
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tickets_independence_is_the_guests_word_or_the_hosts_default() {
        for default in [false, true] {
            let h = mcast_cluster(default);
            let (_, p) = h.start("p").await;
            for (i, asked) in [None, Some(false), Some(true)].into_iter().enumerate() {
                let r = p
                    .call(
                        i as u64 + 1,
                        R::RequestTicket {
                            n: 1,
                            independent: asked,
                        },
                    )
                    .await;
                let ApiResponse::Ticket { ticket, .. } = r else {
                    panic!("{r:?}");
                };
                let got = h.d.with(|r| r.tickets[&ticket].independent);
                assert_eq!(
                    got,
                    asked.unwrap_or(default),
                    "{asked:?}, default {default}"
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn descriptors_carry_the_tickets_independence_and_the_multicast_port() {
        for asked in [Some(true), None] {
            let h = mcast_cluster(false);
            let (_, p) = h.start("p").await;
            h.ticket_and_clone_with(&p, 2, asked).await;
            let sent = h.peers.sent.lock().clone();
            let desc = sent
                .iter()
                .find_map(|(host, r)| match r {
                    PeerRequest::StartClones { descriptor, .. } if host == "h1" => {
                        Some(snowflock_descriptor::Descriptor::decode(descriptor).unwrap())
                    }
                    _ => None,
                })
                .expect("clones started on h1");
            assert_eq!(desc.meta.mcast_port, Some(7500));
            assert_eq!(desc.meta.complete, asked == Some(true));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_that_cannot_start_its_clones_makes_them_lost() {
        let h = Harness::cluster();
        h.peer("h1", |req| match req {
            PeerRequest::Capacity => AdminResponse::Capacity {
                host: "h1".into(),
                free: 8,
            },
            _ => AdminResponse::Error {
                code: snowflock_proto::admin::AdminErrorCode::Unavailable,
                message: "full".into(),
            },
        });
        let (_, p) = h.start("p").await;
        let ticket = h.ticket_and_clone(&p, 2).await;
        let st = h.d.with(|r| r.tickets[&ticket].children[&2].state.clone());
        match st {
            ChildState::Lost { reason } => assert_eq!(reason, "on h1: refused: full"),
            other => panic!("{other:?}"),
        }
        // Killing the ticket asks h1 to stop its clones.
        p.call(
            3,
            R::Kill {
                ticket: ticket.clone(),
            },
        )
        .await;
        let sent = h.peers.sent.lock().clone();
        assert!(
            sent.iter()
                .any(|(host, r)| host == "h1" && matches!(r, PeerRequest::StopClones { .. })),
            "{sent:?}"
        );
    }
}
