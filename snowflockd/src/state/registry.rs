//! The daemon's registry: its VMs, tickets, flock numbers, and the rules
//! that need all of them at once (capacity, quota, flock numbering).
//! Pure data: no I/O, no locks (the daemon holds it under one mutex).

use super::ticket::{Ticket, TicketError, TICKET_TTL};
use super::vm::Vm;
use snowflock_proto::admin::CloneReport;
use snowflock_proto::api::ChildStatus;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// Number of distinct flocks per host.
pub const MAX_FLOCKS: u32 = 256;
/// Discarded tickets kept for precise error messages.
pub const KEEP_DISCARDED: usize = 1024;
/// Clone reports kept for `bench`.
pub const KEEP_REPORTS: usize = 256;

/// Refusals of the registry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    /// A VM of that name exists or is being created.
    #[error("A VM named {0:?} already exists")]
    VmExists(String),
    /// Every flock number of this host's slice is taken.
    #[error("All {0} flock networks of this host are in use")]
    NoFlock(u32),
}

#[derive(Default)]
pub struct Registry {
    pub vms: BTreeMap<String, Arc<Vm>>,
    pub tickets: HashMap<String, Ticket>,
    /// Flock numbers held by parents on this host.
    pub flocks: BTreeSet<u32>,
    pub next_index: u64,
    pub next_exec: u64,
    pub reports: Vec<CloneReport>,
    /// VMs being created (name reserved against duplicates) and their
    /// flocks (in use from the start, so no one tears the flock's links
    /// down under them).
    pub creating: HashMap<String, u32>,
    /// How long an unused ticket keeps its capacity.
    pub ticket_ttl: std::time::Duration,
}

impl Registry {
    /// A registry whose exec ids start at `exec_base`.
    pub fn new(exec_base: u64) -> Registry {
        Registry {
            next_exec: exec_base,
            ticket_ttl: TICKET_TTL,
            ..Default::default()
        }
    }

    /// Reserves `name` for a VM being created in `flock`; returns its
    /// index.
    pub fn reserve(&mut self, name: &str, flock: u32) -> Result<u64, RegistryError> {
        if self.vms.contains_key(name) || self.creating.contains_key(name) {
            return Err(RegistryError::VmExists(name.to_string()));
        }
        self.creating.insert(name.to_string(), flock);
        self.next_index += 1;
        Ok(self.next_index)
    }

    /// A fresh exec session id.
    pub fn exec_id(&mut self) -> u64 {
        self.next_exec += 1;
        self.next_exec
    }

    /// Free VM slots, counting capacity tickets hold.
    pub fn free_slots(&self, max: u32) -> u32 {
        let used = self.vms.len() as u32 + self.tickets.values().map(|t| t.reserved()).sum::<u32>();
        max.saturating_sub(used)
    }

    /// Clone slots `owner` holds unused over the whole cluster.
    pub fn unused_slots_of(&self, owner: &str) -> u32 {
        self.tickets
            .values()
            .filter(|t| t.owner == owner)
            .map(|t| t.unused())
            .sum()
    }

    /// Picks a free flock number from slice `i` of `n` (this host's share
    /// of the cluster's numbers, so no two hosts pick the same).
    pub fn alloc_flock(&mut self, (i, n): (u32, u32)) -> Result<u32, RegistryError> {
        let n = n.max(1);
        let f = (0..MAX_FLOCKS)
            .filter(|f| f % n == i)
            .find(|f| !self.flock_in_use(*f))
            .ok_or(RegistryError::NoFlock(MAX_FLOCKS / n))?;
        self.flocks.insert(f);
        Ok(f)
    }

    /// A parent holds it, or a VM on this host is in it or being created
    /// in it.
    pub fn flock_in_use(&self, f: u32) -> bool {
        self.flocks.contains(&f)
            || self.vms.values().any(|v| v.spec.flock == f)
            || self.creating.values().any(|c| *c == f)
    }

    /// Expires unused tickets and forgets the oldest discarded ones.
    pub fn purge(&mut self, now: Instant) {
        for t in self.tickets.values_mut() {
            t.expire(now, self.ticket_ttl);
        }
        let mut old: Vec<_> = self
            .tickets
            .values()
            .filter(|t| t.is_discarded())
            .map(|t| (t.created, t.id.clone()))
            .collect();
        if old.len() > KEEP_DISCARDED {
            old.sort();
            let n = old.len() - KEEP_DISCARDED;
            for (_, id) in old.into_iter().take(n) {
                self.tickets.remove(&id);
            }
        }
    }

    /// Whether a clone of `owner` from a ticket other than `except` may
    /// still map one of `owner`'s generations: a child still running, or a
    /// generation published to other hosts. If not, `owner`'s next freeze
    /// may write into the file it runs on.
    pub fn generations_in_use(&self, owner: &str, except: &str) -> bool {
        self.tickets
            .values()
            .any(|t| t.owner == owner && t.id != except && (t.published.is_some() || !t.all_done()))
    }

    /// Tickets that still need what their allocator holds for them: not
    /// discarded, and not every clone ended.
    pub fn live_tickets(&self) -> Vec<String> {
        self.tickets
            .values()
            .filter(|t| t.needs_capacity())
            .map(|t| t.id.clone())
            .collect()
    }

    /// The first clone ID free for a new ticket of `owner`: after every ID
    /// its live tickets hold (a ticket holds its IDs until it is discarded
    /// and all its children have ended).
    pub fn next_clone_id(&self, owner: &str) -> u32 {
        self.tickets
            .values()
            .filter(|t| t.owner == owner && t.holds_ids())
            .map(|t| t.clone_ids().end() + 1)
            .max()
            .unwrap_or(1)
    }

    /// The state and children of ticket `id` of `owner`, discarded or not.
    pub fn ticket_status(
        &self,
        owner: &str,
        id: &str,
    ) -> Result<(&'static str, Vec<ChildStatus>), TicketError> {
        let t = self
            .tickets
            .get(id)
            .ok_or_else(|| TicketError::Unknown(id.to_string()))?;
        if t.owner != owner {
            return Err(TicketError::NotYours(id.to_string()));
        }
        Ok((t.state_name(), t.statuses()))
    }

    /// The ticket `id` if VM `owner` may use it.
    pub fn owned_ticket(&mut self, owner: &str, id: &str) -> Result<&mut Ticket, TicketError> {
        let t = self
            .tickets
            .get_mut(id)
            .ok_or_else(|| TicketError::Unknown(id.to_string()))?;
        t.check_owner(owner)?;
        Ok(t)
    }

    /// Records a child's end in its ticket (if the ticket is still known).
    pub fn child_ended(
        &mut self,
        ticket: &str,
        clone_id: u32,
        state: snowflock_proto::api::ChildState,
    ) -> bool {
        self.tickets
            .get_mut(ticket)
            .is_some_and(|t| t.child_ended(clone_id, state))
    }

    /// Clones on this host of `parent` (not the parent itself).
    pub fn clones_of(&self, parent: &str) -> Vec<Arc<Vm>> {
        self.vms
            .values()
            .filter(|v| v.spec.parent == parent && v.spec.is_clone())
            .cloned()
            .collect()
    }

    /// Clones here of another host's ticket.
    pub fn remote_clones_of_ticket(&self, ticket: &str) -> Vec<Arc<Vm>> {
        self.vms
            .values()
            .filter(|v| v.spec.ticket.as_deref() == Some(ticket) && v.spec.origin.is_some())
            .cloned()
            .collect()
    }

    /// VMs whose memory is memtap generation `generation`.
    pub fn vms_of_generation(&self, generation: &str) -> Vec<Arc<Vm>> {
        self.vms
            .values()
            .filter(|v| {
                matches!(&v.spec.memory, super::vm::MemSource::Remote { generation: g, .. } if g == generation)
                    || v.reads_disk_layer(generation)
            })
            .cloned()
            .collect()
    }

    pub fn record_report(&mut self, r: CloneReport) {
        self.reports.push(r);
        let n = self.reports.len();
        if n > KEEP_REPORTS {
            self.reports.drain(..n - KEEP_REPORTS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ticket::tests::ticket;
    use crate::state::vm::tests::vm;
    use proptest::prelude::*;

    fn with_vms(names: &[(&str, u32)]) -> Registry {
        let mut r = Registry::new(0);
        for (n, id) in names {
            r.vms.insert(n.to_string(), Arc::new(vm(n, *id)));
        }
        r
    }

    #[test]
    fn a_lost_generation_names_the_vms_that_read_it_as_memory_or_disk() {
        use crate::state::vm::{tests::spec, DiskPlan, Format, MemSource, Placed, Vm};
        let mut r = Registry::new(0);
        let mk = |name: &str, mem: &str, disk: &[&str]| {
            let mut s = spec(name, 1);
            s.memory = MemSource::Remote {
                generation: mem.into(),
                ram: "/m/ram".into(),
            };
            s.disk = (!disk.is_empty()).then(|| DiskPlan::Remote {
                layers: disk
                    .iter()
                    .map(|d| (format!("/m/{d}").into(), Format::Qcow2))
                    .collect(),
                memtap: disk.iter().map(|d| d.to_string()).collect(),
                virtual_size: 1 << 30,
            });
            let placed = Placed {
                index: 1,
                ram_path: "/m/ram".into(),
                mac: String::new(),
                ip: String::new(),
                tap: String::new(),
                dir: "/x".into(),
            };
            Arc::new(Vm::new(s, placed).0)
        };
        r.vms
            .insert("a".into(), mk("a", "h0.p-g1", &["h0.p-d0", "h0.p-d1"]));
        r.vms.insert(
            "b".into(),
            mk("b", "h0.p-g2", &["h0.p-d0", "h0.p-d1", "h0.p-d2"]),
        );
        r.vms.insert("c".into(), mk("c", "h0.q-g1", &[]));
        let names = |g: &str| {
            let mut v: Vec<String> = r
                .vms_of_generation(g)
                .iter()
                .map(|v| v.name().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names("h0.p-d0"), ["a", "b"]);
        assert_eq!(names("h0.p-d2"), ["b"]);
        assert_eq!(names("h0.p-g1"), ["a"]);
        assert_eq!(names("h0.q-g1"), ["c"]);
        assert!(names("h0.p-d9").is_empty());
    }

    #[test]
    fn names_are_reserved_once() {
        let mut r = with_vms(&[("a", 0)]);
        assert_eq!(r.reserve("a", 0), Err(RegistryError::VmExists("a".into())));
        assert_eq!(r.reserve("b", 7), Ok(1));
        assert_eq!(r.reserve("b", 7), Err(RegistryError::VmExists("b".into())));
        assert_eq!(r.reserve("c", 0), Ok(2));
        assert!(r.flock_in_use(7), "a VM being created holds its flock");
        r.creating.remove("b");
        assert!(!r.flock_in_use(7));
    }

    #[test]
    fn capacity_counts_vms_and_unused_tickets() {
        let mut r = with_vms(&[("a", 0), ("b", 0)]);
        assert_eq!(r.free_slots(8), 6);
        let mut t = ticket(3);
        t.owner = "a".into();
        r.tickets.insert(t.id.clone(), t);
        assert_eq!(r.free_slots(8), 3);
        assert_eq!(r.free_slots(4), 0, "never negative");
        assert_eq!(r.unused_slots_of("a"), 3);
        assert_eq!(r.unused_slots_of("b"), 0);
    }

    #[test]
    fn quota_counts_slots_placed_on_other_hosts() {
        let mut r = Registry::new(0);
        let mut t = Ticket::grant(
            "t-9".into(),
            "a",
            1,
            5,
            vec![("h0".into(), 1), ("h1".into(), 4)],
        );
        r.tickets
            .insert("t-8".into(), Ticket::grant("t-8".into(), "a", 6, 1, vec![]));
        t.begin_clone().unwrap();
        r.tickets.insert(t.id.clone(), t);
        assert_eq!(r.unused_slots_of("a"), 6);
        assert_eq!(
            r.free_slots(10),
            10 - 1 - 1,
            "only the local slots hold this host"
        );
    }

    #[test]
    fn a_second_ticket_numbers_its_clones_after_the_live_ones() {
        let mut r = Registry::new(0);
        assert_eq!(r.next_clone_id("a"), 1);
        let mut t = Ticket::grant("t-1".into(), "a", 1, 3, vec![("h0".into(), 3)]);
        t.begin_clone().unwrap();
        t.set_running((1..=3).map(|i| (i, format!("c{i}"), "h0".to_string())));
        t.clone_done("/g".into());
        r.tickets.insert(t.id.clone(), t);
        assert_eq!(r.next_clone_id("a"), 4);
        assert_eq!(r.next_clone_id("b"), 1, "other parents have their own IDs");
        r.tickets.insert(
            "t-2".into(),
            Ticket::grant("t-2".into(), "a", 4, 2, vec![("h0".into(), 2)]),
        );
        assert_eq!(r.next_clone_id("a"), 6, "a granted ticket holds its IDs");
        // The first ticket is killed: its IDs stay held while the second's
        // are live, and the highest live ID decides.
        r.tickets.get_mut("t-1").unwrap().kill("h0").unwrap();
        assert_eq!(r.next_clone_id("a"), 6);
        r.tickets.get_mut("t-2").unwrap().kill("h0").unwrap();
        assert_eq!(r.next_clone_id("a"), 1, "all ended: IDs are free again");
        let (state, kids) = r.ticket_status("a", "t-1").unwrap();
        assert_eq!((state, kids.len()), ("discarded", 3));
        assert_eq!(
            r.ticket_status("b", "t-1").unwrap_err(),
            TicketError::NotYours("t-1".into())
        );
    }

    #[test]
    fn generations_are_in_use_while_a_clone_runs_or_another_host_reads() {
        let mut r = Registry::new(0);
        assert!(!r.generations_in_use("a", "t-2"));
        let mut t = Ticket::grant("t-1".into(), "a", 1, 2, vec![("h0".into(), 2)]);
        t.begin_clone().unwrap();
        t.set_running((1..=2).map(|i| (i, format!("c{i}"), "h0".to_string())));
        t.clone_done("/g".into());
        r.tickets.insert(t.id.clone(), t);
        assert!(r.generations_in_use("a", "t-2"));
        assert!(!r.generations_in_use("a", "t-1"), "the ticket being cloned");
        assert!(!r.generations_in_use("b", "t-2"), "another parent's");
        r.tickets.get_mut("t-1").unwrap().kill("h0").unwrap();
        assert!(!r.generations_in_use("a", "t-2"), "every clone ended");
        r.tickets.get_mut("t-1").unwrap().published = Some("h0.a-g1".into());
        assert!(r.generations_in_use("a", "t-2"), "published to other hosts");
    }

    #[test]
    fn flock_numbers_partition_the_cluster() {
        let mut h0 = Registry::new(0);
        let mut h1 = Registry::new(0);
        let a: Vec<u32> = (0..5).map(|_| h0.alloc_flock((0, 3)).unwrap()).collect();
        let b: Vec<u32> = (0..5).map(|_| h1.alloc_flock((1, 3)).unwrap()).collect();
        assert_eq!(a, vec![0, 3, 6, 9, 12]);
        assert_eq!(b, vec![1, 4, 7, 10, 13]);
        h0.flocks.remove(&3);
        assert_eq!(h0.alloc_flock((0, 3)), Ok(3), "freed numbers come back");
    }

    #[test]
    fn flocks_run_out_with_a_clear_error() {
        let mut r = Registry::new(0);
        for _ in 0..MAX_FLOCKS / 4 {
            r.alloc_flock((2, 4)).unwrap();
        }
        let e = r.alloc_flock((2, 4)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "All 64 flock networks of this host are in use"
        );
    }

    #[test]
    fn owned_ticket_checks_existence_then_owner() {
        let mut r = Registry::new(0);
        r.tickets.insert("t-1".into(), ticket(1));
        assert_eq!(
            r.owned_ticket("p", "t-2").unwrap_err(),
            TicketError::Unknown("t-2".into())
        );
        assert_eq!(
            r.owned_ticket("q", "t-1").unwrap_err(),
            TicketError::NotYours("t-1".into())
        );
        assert!(r.owned_ticket("p", "t-1").is_ok());
    }

    #[test]
    fn purge_expires_and_bounds_discarded_tickets() {
        let mut r = Registry::new(0);
        for i in 0..KEEP_DISCARDED + 10 {
            let mut t = ticket(1);
            t.id = format!("t-{i}");
            t.clone_failed();
            r.tickets.insert(t.id.clone(), t);
        }
        let fresh = ticket(2);
        let now = fresh.created;
        r.tickets.insert(
            "fresh".into(),
            Ticket {
                id: "fresh".into(),
                ..fresh
            },
        );
        r.purge(now);
        assert_eq!(r.tickets.len(), KEEP_DISCARDED + 1);
        assert!(!r.tickets["fresh"].is_discarded());
        r.purge(now + TICKET_TTL * 2);
        assert!(r.tickets.get("fresh").is_none_or(|t| t.is_discarded()));
    }

    #[test]
    fn reports_are_bounded() {
        let mut r = Registry::new(0);
        for i in 0..KEEP_REPORTS + 5 {
            r.record_report(CloneReport {
                parent: format!("p{i}"),
                ticket: String::new(),
                clones: 1,
                parent_pause_ms: 0.0,
                descriptor_bytes: 0,
                device_state_bytes: 0,
                frozen_bytes: 0,
                paused_copy_bytes: 0,
                guest_ram_bytes: 0,
                all_ready_ms: 0.0,
                timeline: vec![],
            });
        }
        assert_eq!(r.reports.len(), KEEP_REPORTS);
        assert_eq!(
            r.reports.last().unwrap().parent,
            format!("p{}", KEEP_REPORTS + 4)
        );
    }

    proptest! {
        /// Hosts of one cluster never pick the same flock number.
        #[test]
        fn hosts_never_share_a_flock(n in 1u32..8, picks in 1usize..40) {
            let mut seen = std::collections::HashSet::new();
            for i in 0..n {
                let mut r = Registry::new(0);
                for _ in 0..picks {
                    match r.alloc_flock((i, n)) {
                        Ok(f) => { prop_assert!(f < MAX_FLOCKS); prop_assert!(seen.insert(f)); }
                        Err(RegistryError::NoFlock(_)) => break,
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
            }
        }
    }
}
