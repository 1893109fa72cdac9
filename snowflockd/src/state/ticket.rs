//! Tickets as a state machine. Every transition of a ticket and of its
//! children is a method here; nothing else changes a [`Ticket`].
//!
//! ```text
//!  grant --> Granted --begin_clone--> Cloning --clone_done--> Active
//!               |                        |                       |
//!            expire                 clone_failed           join (all done) / kill
//!               v                        v                       v
//!           Discarded <-------------------------------------------
//! ```
//!
//! A child is `Running` until it ends exactly once: the first of exit,
//! kill, loss is what `sf_join` reports ([`Ticket::child_ended`]).

use snowflock_proto::api::{ApiErrorCode, ChildState, ChildStatus};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Unused tickets stop reserving capacity after this long.
pub const TICKET_TTL: Duration = Duration::from_secs(600);

/// Lifecycle of a ticket.
#[derive(Debug, Clone, PartialEq)]
pub enum TicketState {
    Granted,
    Cloning,
    Active,
    Discarded(&'static str),
}

/// Why a guest's ticket call is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TicketError {
    /// No such ticket (or it was forgotten long ago).
    #[error("Unknown ticket {0}")]
    Unknown(String),
    /// Another VM's ticket.
    #[error("Ticket {0} belongs to another VM")]
    NotYours(String),
    /// Joined, killed, expired or failed.
    #[error("Ticket {id} was discarded: {why}")]
    Discarded { id: String, why: &'static str },
    /// `sf_clone` was already called with it.
    #[error("Ticket {0} was already used by sf_clone")]
    Used(String),
    /// `sf_join` before `sf_clone`.
    #[error("Ticket {0} has not been used by sf_clone")]
    NotCloned(String),
}

impl TicketError {
    /// The guest API error class.
    pub fn code(&self) -> ApiErrorCode {
        match self {
            TicketError::Unknown(_) => ApiErrorCode::UnknownTicket,
            TicketError::NotYours(_) => ApiErrorCode::NotYourTicket,
            TicketError::Discarded { .. } => ApiErrorCode::TicketDiscarded,
            TicketError::Used(_) => ApiErrorCode::TicketUsed,
            TicketError::NotCloned(_) => ApiErrorCode::BadRequest,
        }
    }
}

/// One child of a ticket.
#[derive(Debug, Clone, PartialEq)]
pub struct Child {
    pub vm: String,
    /// Host the clone runs on.
    pub host: String,
    /// Address on the flock network.
    pub ip: String,
    pub state: ChildState,
}

/// What a generation leaves to release when its ticket is done.
#[derive(Debug, Default, PartialEq)]
pub struct Release {
    /// Generation directory on this host.
    pub generation: Option<PathBuf>,
    /// Name published on the page server.
    pub published: Option<String>,
}

/// The next step of `sf_join`.
#[derive(Debug, PartialEq)]
pub enum JoinStep {
    /// Children still run (or the clone is in progress): wait for a change.
    Wait,
    /// Every child has ended: the ticket is discarded.
    Done {
        children: Vec<ChildStatus>,
        release: Release,
    },
}

/// The next step of `sf_kill`.
#[derive(Debug, PartialEq)]
pub enum KillStep {
    /// A clone is in progress: wait until it is done so no child escapes.
    Wait,
    /// Running children were marked killed; stop these VMs (by name) and
    /// ask these other hosts to stop theirs.
    Stop {
        vms: Vec<String>,
        remote_hosts: Vec<String>,
        release: Release,
    },
}

#[derive(Debug)]
pub struct Ticket {
    pub id: String,
    pub owner: String,
    pub granted: u32,
    /// Clone ID of the first child; the others follow. A parent's second
    /// ticket starts after the IDs its live tickets hold, so clones of
    /// both share the flock without colliding (resizing).
    pub first_id: u32,
    pub state: TicketState,
    pub children: BTreeMap<u32, Child>,
    pub generation: Option<PathBuf>,
    pub created: Instant,
    /// Clones granted per host (hidden from the guest), origin first.
    pub placement: Vec<(String, u32)>,
    /// Name under which the generation is published on the page server.
    pub published: Option<String>,
    /// The clones' hosts fetch the whole clone point in the background
    /// (the guest's flag, or the host's default): the descriptor's
    /// `complete`.
    pub independent: bool,
}

impl Ticket {
    /// A new grant of `granted` clones for VM `owner`, numbered from
    /// `first_id`.
    pub fn grant(
        id: String,
        owner: &str,
        first_id: u32,
        granted: u32,
        placement: Vec<(String, u32)>,
    ) -> Ticket {
        Ticket {
            id,
            owner: owner.to_string(),
            granted,
            first_id,
            state: TicketState::Granted,
            children: BTreeMap::new(),
            generation: None,
            created: Instant::now(),
            placement,
            published: None,
            independent: false,
        }
    }

    /// Checks that `vm` may use this ticket.
    pub fn check_owner(&self, vm: &str) -> Result<(), TicketError> {
        if self.owner != vm {
            return Err(TicketError::NotYours(self.id.clone()));
        }
        if let TicketState::Discarded(why) = self.state {
            return Err(TicketError::Discarded {
                id: self.id.clone(),
                why,
            });
        }
        Ok(())
    }

    /// `sf_clone`: Granted -> Cloning.
    pub fn begin_clone(&mut self) -> Result<(), TicketError> {
        if self.state != TicketState::Granted {
            return Err(TicketError::Used(self.id.clone()));
        }
        self.state = TicketState::Cloning;
        Ok(())
    }

    /// The clone's children, all running, once they are about to exist (so
    /// one that exits at once is recorded as exited).
    pub fn set_children(&mut self, children: impl IntoIterator<Item = (u32, Child)>) {
        self.children = children.into_iter().collect();
    }

    /// The clone IDs this ticket numbers its children with.
    pub fn clone_ids(&self) -> std::ops::RangeInclusive<u32> {
        self.first_id..=self.first_id + self.granted.saturating_sub(1)
    }

    /// Whether this ticket still holds its clone IDs: until it is discarded
    /// and every child has ended.
    pub fn holds_ids(&self) -> bool {
        !self.is_discarded() || !self.all_done()
    }

    /// Whether the ticket still needs its hosts: until it is discarded or
    /// every one of its clones has ended.
    pub fn needs_capacity(&self) -> bool {
        match self.state {
            TicketState::Discarded(_) => false,
            TicketState::Active => !self.all_done(),
            TicketState::Granted | TicketState::Cloning => true,
        }
    }

    /// The state's name in the guest API's `Status` answer.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            TicketState::Granted => "granted",
            TicketState::Cloning => "cloning",
            TicketState::Active => "active",
            TicketState::Discarded(_) => "discarded",
        }
    }

    #[cfg(test)]
    pub(crate) fn set_running(
        &mut self,
        children: impl IntoIterator<Item = (u32, String, String)>,
    ) {
        self.set_children(children.into_iter().map(|(id, vm, host)| {
            (
                id,
                Child {
                    vm,
                    host,
                    ip: String::new(),
                    state: ChildState::Running,
                },
            )
        }));
    }

    /// The clone succeeded: Cloning -> Active, holding `generation`.
    pub fn clone_done(&mut self, generation: PathBuf) {
        self.generation = Some(generation);
        if self.state == TicketState::Cloning {
            self.state = TicketState::Active;
        }
    }

    /// The clone failed: the ticket is discarded.
    pub fn clone_failed(&mut self) {
        self.state = TicketState::Discarded("the clone failed");
    }

    /// A child ended (exit, kill, loss). Only the first end counts: returns
    /// whether this one was recorded.
    pub fn child_ended(&mut self, clone_id: u32, state: ChildState) -> bool {
        match self.children.get_mut(&clone_id) {
            Some(c) if c.state == ChildState::Running => {
                c.state = state;
                true
            }
            _ => false,
        }
    }

    /// `sf_join`.
    pub fn join(&mut self) -> Result<JoinStep, TicketError> {
        match self.state {
            TicketState::Granted => Err(TicketError::NotCloned(self.id.clone())),
            TicketState::Discarded(why) => Err(TicketError::Discarded {
                id: self.id.clone(),
                why,
            }),
            TicketState::Cloning => Ok(JoinStep::Wait),
            TicketState::Active if self.all_done() => {
                self.state = TicketState::Discarded("it was joined");
                Ok(JoinStep::Done {
                    children: self.statuses(),
                    release: self.release(),
                })
            }
            TicketState::Active => Ok(JoinStep::Wait),
        }
    }

    /// `sf_kill`.
    pub fn kill(&mut self, me: &str) -> Result<KillStep, TicketError> {
        match self.state {
            TicketState::Cloning => Ok(KillStep::Wait),
            TicketState::Discarded(why) => Err(TicketError::Discarded {
                id: self.id.clone(),
                why,
            }),
            TicketState::Granted | TicketState::Active => {
                let remote_hosts = self.remote_hosts(me);
                let vms = self.kill_running();
                self.state = TicketState::Discarded("it was killed");
                Ok(KillStep::Stop {
                    vms,
                    remote_hosts,
                    release: self.release(),
                })
            }
        }
    }

    /// The owner ended or was stopped: running children are killed and the
    /// ticket discarded. Returns the other hosts that ran children.
    pub fn discard_for_owner(&mut self, me: &str, why: &'static str) -> Vec<String> {
        let remote = if self
            .children
            .values()
            .any(|c| c.state == ChildState::Running)
        {
            self.remote_hosts(me)
        } else {
            Vec::new()
        };
        self.kill_running();
        if !matches!(self.state, TicketState::Discarded(_)) {
            self.state = TicketState::Discarded(why);
        }
        remote
    }

    /// Unused for longer than `ttl` at `now`: discarded.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> bool {
        if self.state == TicketState::Granted && now.duration_since(self.created) > ttl {
            self.state = TicketState::Discarded("it expired unused");
            return true;
        }
        false
    }

    /// The hosts the ticket was placed on were taken back (a Slurm
    /// allocation revoked): running children are lost because `why`.
    /// Returns their VMs and the other hosts they ran on.
    pub fn lose_running(&mut self, me: &str, why: &str) -> (Vec<String>, Vec<String>) {
        let mut hosts: Vec<String> = self
            .children
            .values()
            .filter(|c| c.state == ChildState::Running && c.host != me)
            .map(|c| c.host.clone())
            .collect();
        hosts.sort();
        hosts.dedup();
        let vms = self.end_running(ChildState::Lost {
            reason: why.to_string(),
        });
        (vms, hosts)
    }

    fn kill_running(&mut self) -> Vec<String> {
        self.end_running(ChildState::Killed)
    }

    /// Ends every running child with `state`; returns their VMs.
    fn end_running(&mut self, state: ChildState) -> Vec<String> {
        self.children
            .values_mut()
            .filter(|c| c.state == ChildState::Running)
            .map(|c| {
                c.state = state.clone();
                c.vm.clone()
            })
            .collect()
    }

    fn release(&mut self) -> Release {
        Release {
            generation: self.generation.take(),
            published: self.published.take(),
        }
    }

    pub fn statuses(&self) -> Vec<ChildStatus> {
        self.children
            .iter()
            .map(|(id, c)| ChildStatus {
                clone_id: *id,
                vm: c.vm.clone(),
                ip: (!c.ip.is_empty()).then(|| c.ip.clone()),
                state: c.state.clone(),
            })
            .collect()
    }

    /// Slots placed on the host that granted the ticket.
    pub fn local_slots(&self) -> u32 {
        self.placement
            .first()
            .map(|(_, n)| *n)
            .unwrap_or(self.granted)
    }

    /// Hosts other than `me` with children of this ticket.
    pub fn remote_hosts(&self, me: &str) -> Vec<String> {
        let mut h: Vec<String> = self
            .children
            .values()
            .filter(|c| c.host != me)
            .map(|c| c.host.clone())
            .collect();
        h.sort();
        h.dedup();
        h
    }

    pub fn all_done(&self) -> bool {
        self.children
            .values()
            .all(|c| c.state != ChildState::Running)
    }

    pub fn is_discarded(&self) -> bool {
        matches!(self.state, TicketState::Discarded(_))
    }

    /// Capacity this ticket holds on this host: granted slots until it has
    /// clones, then nothing (its running clones count themselves).
    pub fn reserved(&self) -> u32 {
        match self.state {
            TicketState::Granted | TicketState::Cloning => self.local_slots(),
            _ => 0,
        }
    }

    /// Slots it holds unused anywhere in the cluster (the per-VM quota).
    pub fn unused(&self) -> u32 {
        match self.state {
            TicketState::Granted | TicketState::Cloning => self.granted,
            _ => 0,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn ticket(n: u32) -> Ticket {
        Ticket::grant("t-1".into(), "p", 1, n, vec![("h0".into(), n)])
    }

    fn cloned(hosts: &[&str]) -> Ticket {
        let mut t = ticket(hosts.len() as u32);
        t.begin_clone().unwrap();
        t.set_running(
            hosts
                .iter()
                .enumerate()
                .map(|(i, h)| (i as u32 + 1, format!("p-g1c{}", i + 1), h.to_string())),
        );
        t.clone_done("/gens/p-g1".into());
        t
    }

    #[test]
    fn grant_then_clone_then_active() {
        let mut t = ticket(2);
        assert_eq!(t.state, TicketState::Granted);
        assert_eq!(t.reserved(), 2);
        assert_eq!(t.unused(), 2);
        t.begin_clone().unwrap();
        assert_eq!(t.state, TicketState::Cloning);
        assert_eq!(t.reserved(), 2, "slots stay reserved while cloning");
        t.clone_done("/g".into());
        assert_eq!(t.state, TicketState::Active);
        assert_eq!(t.reserved(), 0);
        assert_eq!(t.unused(), 0);
    }

    #[test]
    fn a_ticket_clones_once() {
        let mut t = ticket(1);
        t.begin_clone().unwrap();
        assert_eq!(t.begin_clone(), Err(TicketError::Used("t-1".into())));
        t.clone_done("/g".into());
        let e = t.begin_clone().unwrap_err();
        assert_eq!(e.code(), ApiErrorCode::TicketUsed);
        assert_eq!(e.to_string(), "Ticket t-1 was already used by sf_clone");
    }

    #[test]
    fn wrong_owner_and_discarded_tickets_are_refused() {
        let mut t = ticket(1);
        assert_eq!(
            t.check_owner("other"),
            Err(TicketError::NotYours("t-1".into()))
        );
        assert_eq!(
            t.check_owner("other").unwrap_err().code(),
            ApiErrorCode::NotYourTicket
        );
        assert!(t.check_owner("p").is_ok());
        t.clone_failed();
        let e = t.check_owner("p").unwrap_err();
        assert_eq!(e.code(), ApiErrorCode::TicketDiscarded);
        assert_eq!(e.to_string(), "Ticket t-1 was discarded: the clone failed");
    }

    #[test]
    fn expiry_only_takes_unused_tickets() {
        let mut t = ticket(1);
        let later = t.created + TICKET_TTL + Duration::from_secs(1);
        assert!(!t.expire(t.created, TICKET_TTL));
        assert!(t.expire(later, TICKET_TTL));
        assert_eq!(t.state, TicketState::Discarded("it expired unused"));
        assert_eq!(t.reserved(), 0);
        let mut used = cloned(&["h0"]);
        assert!(!used.expire(later + TICKET_TTL, TICKET_TTL));
    }

    #[test]
    fn a_child_ends_once_first_end_wins() {
        let mut t = cloned(&["h0", "h0"]);
        assert!(t.child_ended(1, ChildState::Exited { code: 3 }));
        assert!(!t.child_ended(1, ChildState::Killed));
        assert!(!t.child_ended(9, ChildState::Killed), "unknown child");
        assert_eq!(t.children[&1].state, ChildState::Exited { code: 3 });
        assert!(t.child_ended(2, ChildState::Lost { reason: "x".into() }));
        assert!(t.all_done());
    }

    #[test]
    fn a_ticket_needs_its_hosts_until_discarded_or_every_clone_ended() {
        let mut t = ticket(2);
        assert!(t.needs_capacity(), "granted, unused");
        t.begin_clone().unwrap();
        assert!(t.needs_capacity(), "cloning");
        t.set_running([(1, "a".into(), "h0".into()), (2, "b".into(), "h1".into())]);
        t.clone_done("/g".into());
        t.child_ended(1, ChildState::Exited { code: 0 });
        assert!(t.needs_capacity(), "one clone still runs");
        t.child_ended(2, ChildState::Exited { code: 0 });
        assert!(!t.needs_capacity(), "the last clone's exit, before sf_join");
        let mut t = ticket(1);
        t.expire(t.created + TICKET_TTL * 2, TICKET_TTL);
        assert!(!t.needs_capacity(), "expired");
    }

    #[test]
    fn losing_the_hosts_loses_only_running_children() {
        let mut t = cloned(&["h0", "h1", "h2"]);
        t.child_ended(3, ChildState::Exited { code: 0 });
        let (vms, hosts) = t.lose_running("h0", "revoked");
        assert_eq!(vms.len(), 2);
        assert_eq!(hosts, ["h1"], "h2's child had already ended");
        assert_eq!(
            t.children[&1].state,
            ChildState::Lost {
                reason: "revoked".into()
            }
        );
        assert_eq!(t.children[&3].state, ChildState::Exited { code: 0 });
        assert!(t.all_done());
        assert_eq!(t.lose_running("h0", "again"), (vec![], vec![]));
    }

    #[test]
    fn join_waits_for_every_child_then_discards() {
        let mut t = ticket(1);
        assert_eq!(t.join(), Err(TicketError::NotCloned("t-1".into())));
        t.begin_clone().unwrap();
        assert_eq!(t.join(), Ok(JoinStep::Wait), "clone in progress");
        t.set_running([(1, "p-g1c1".into(), "h0".into())]);
        t.clone_done("/g".into());
        assert_eq!(t.join(), Ok(JoinStep::Wait));
        t.child_ended(1, ChildState::Exited { code: 0 });
        match t.join().unwrap() {
            JoinStep::Done { children, release } => {
                assert_eq!(children.len(), 1);
                assert_eq!(children[0].state, ChildState::Exited { code: 0 });
                assert_eq!(release.generation, Some(PathBuf::from("/g")));
            }
            JoinStep::Wait => panic!("should be done"),
        }
        assert_eq!(t.join().unwrap_err().code(), ApiErrorCode::TicketDiscarded);
    }

    #[test]
    fn kill_marks_running_children_and_names_remote_hosts() {
        let mut t = cloned(&["h0", "h1", "h2"]);
        t.child_ended(1, ChildState::Exited { code: 0 });
        match t.kill("h0").unwrap() {
            KillStep::Stop {
                vms,
                remote_hosts,
                release,
            } => {
                assert_eq!(vms, vec!["p-g1c2".to_string(), "p-g1c3".to_string()]);
                assert_eq!(remote_hosts, vec!["h1".to_string(), "h2".to_string()]);
                assert!(release.generation.is_some());
            }
            KillStep::Wait => panic!(),
        }
        assert_eq!(t.children[&1].state, ChildState::Exited { code: 0 });
        assert_eq!(t.children[&2].state, ChildState::Killed);
        assert!(t.is_discarded());
        assert!(t.kill("h0").is_err(), "a killed ticket is gone");
    }

    #[test]
    fn kill_waits_for_a_clone_in_progress() {
        let mut t = ticket(1);
        t.begin_clone().unwrap();
        assert_eq!(t.kill("h0"), Ok(KillStep::Wait));
        let mut unused = ticket(1);
        assert!(matches!(unused.kill("h0"), Ok(KillStep::Stop { vms, .. }) if vms.is_empty()));
    }

    #[test]
    fn owner_end_kills_children_and_keeps_first_reason() {
        let mut t = cloned(&["h0", "h1"]);
        assert_eq!(
            t.discard_for_owner("h0", "its parent VM ended"),
            vec!["h1".to_string()]
        );
        assert_eq!(t.state, TicketState::Discarded("its parent VM ended"));
        assert!(t.children.values().all(|c| c.state == ChildState::Killed));
        assert!(t.discard_for_owner("h0", "again").is_empty());
        assert_eq!(t.state, TicketState::Discarded("its parent VM ended"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Clone,
        Done,
        Fail,
        End(u32, u8),
        Join,
        Kill,
        Expire,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Clone),
            Just(Op::Done),
            Just(Op::Fail),
            (1u32..5, 0u8..3).prop_map(|(i, s)| Op::End(i, s)),
            Just(Op::Join),
            Just(Op::Kill),
            Just(Op::Expire),
        ]
    }

    proptest! {
        /// Whatever guests and hosts do, in any order: a discarded ticket
        /// stays discarded, an ended child never runs again, and a ticket
        /// holds capacity only before its clone is done.
        #[test]
        fn ticket_invariants(ops in proptest::collection::vec(op(), 0..40)) {
            let mut t = ticket(4);
            let later = t.created + TICKET_TTL * 2;
            for o in ops {
                let was_discarded = t.is_discarded();
                let ended_before: Vec<u32> = t.children.iter()
                    .filter(|(_, c)| c.state != ChildState::Running).map(|(i, _)| *i).collect();
                match o {
                    Op::Clone => if t.begin_clone().is_ok() {
                        t.set_running((1..=4).map(|i| (i, format!("c{i}"), "h0".to_string())));
                    },
                    Op::Done => if t.state == TicketState::Cloning { t.clone_done("/g".into()) },
                    Op::Fail => if t.state == TicketState::Cloning { t.clone_failed() },
                    Op::End(i, s) => { t.child_ended(i, match s {
                        0 => ChildState::Exited { code: 1 },
                        1 => ChildState::Killed,
                        _ => ChildState::Lost { reason: "x".into() },
                    }); }
                    Op::Join => { let _ = t.join(); }
                    Op::Kill => { let _ = t.kill("h0"); }
                    Op::Expire => { t.expire(later, TICKET_TTL); }
                }
                if was_discarded { prop_assert!(t.is_discarded()); }
                for i in ended_before {
                    prop_assert_ne!(&t.children[&i].state, &ChildState::Running);
                }
                if matches!(t.state, TicketState::Active | TicketState::Discarded(_)) {
                    prop_assert_eq!(t.reserved(), 0);
                }
                if t.state == TicketState::Granted { prop_assert!(t.children.is_empty()); }
            }
        }
    }
}
