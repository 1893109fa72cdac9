//! The page server's side of mcdist: pages a host asks for go to the
//! generation's multicast group. A member (a host that receives the group)
//! asking for pages gets them there, and over its TCP connection only the
//! answer "coalesced"; it asks again with the unicast flag if they do not
//! arrive, and then gets the data over TCP. Pages answered over TCP (to a
//! host that is not a member, a re-request, or when nothing could be
//! multicast) are multicast too, for the others.
//!
//! * **Lockstep detection.** A member's request for pages that all went to
//!   the group less than [`IN_FLIGHT`] ago is answered
//!   [`Status::Coalesced`](crate::wire::Status::Coalesced): they are on
//!   their way. A member asking for a page multicast longer ago lost it
//!   (counted `rerequested`) and gets it over TCP: a page is multicast at
//!   most once per generation, and what one host lost goes to that host
//!   alone (losses are a receiver's own on a switched network).
//! * **Flow control.** Members report, in each request, how many datagrams
//!   of the generation they accepted. Over each stretch of at least
//!   [`SAMPLE`] datagrams, a member that got less than [`GOOD_DELIVERY`] of
//!   them halves the sending rate; otherwise the rate grows by 1/16 of the
//!   highest rate (AIMD). A token bucket holds the rate; a copy that finds
//!   the bucket empty is not sent (the asker has its pages anyway).
//! * **End game.** While fewer than two hosts are active members of a
//!   generation (asked as members in the last [`ACTIVE`]), nothing is
//!   multicast: the one host left gets its pages by unicast alone. For
//!   the first [`ACTIVE`] after publishing, the hosts the publisher said to
//!   expect ([`PageServer::expect_hosts`](super::PageServer::expect_hosts))
//!   count, so the first host's faults reach the others that have not
//!   asked yet.
//! * **Deaf members.** A member that accepted nothing after [`DEAF_AFTER`]
//!   datagrams no longer counts as one (its group does not reach it).
//!
//! May import: [`crate::mcast`], [`crate::wire`], the crate root.

use crate::mcast::{group_of, seal, McastConfig, McastKey, DATAGRAM_LEN};
use crate::wire::{Request, FLAG_MEMBER, FLAG_UNICAST};
use crate::PAGE_SIZE;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A page multicast less than this long ago is still on its way.
pub(crate) const IN_FLIGHT: Duration = Duration::from_millis(10);
/// Hosts that asked as members this recently count as active.
const ACTIVE: Duration = Duration::from_secs(30);
/// Datagrams per flow-control sample of one member.
const SAMPLE: u64 = 64;
/// Delivery ratio below which a member signals congestion.
const GOOD_DELIVERY: f64 = 0.9;
/// A member that accepted nothing of this many datagrams is deaf.
const DEAF_AFTER: u64 = 256;
/// Lowest sending rate flow control goes down to.
const MIN_RATE: f64 = (1 << 20) as f64;

/// What the connection does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Answer [`Status::Coalesced`](crate::wire::Status::Coalesced).
    Coalesce,
    /// Answer with the data (then [`Sender::multicast`]).
    Serve,
}

/// Counters of the multicast side.
#[derive(Default)]
pub(super) struct McastCounters {
    pub(super) datagrams: AtomicU64,
    pub(super) coalesced: AtomicU64,
    pub(super) rerequested: AtomicU64,
    pub(super) skipped: AtomicU64,
    pub(super) send_errors: AtomicU64,
}

struct Member {
    last: Instant,
    /// The generation's `sent` and the member's report at its first
    /// request, and at the start of its current sample.
    first_sent: u64,
    sample_sent: u64,
    sample_received: u64,
    deaf: bool,
}

/// One published generation's multicast state.
pub(super) struct GenCast {
    group: SocketAddrV4,
    epoch: Instant,
    /// Per page: milliseconds since `epoch` (modulo 2^32, at least 1) of
    /// its last multicast; 0 for never.
    sent_at: Vec<AtomicU32>,
    /// Datagrams sent to the group.
    sent: AtomicU64,
    /// Members by address and memtap id.
    members: Mutex<HashMap<(IpAddr, u32), Member>>,
    /// Logged once: "fewer than two members, unicast only".
    said_end_game: AtomicBool,
    /// Hosts the publisher expects to ask (its clones' hosts): counted as
    /// members for the first [`ACTIVE`], before they have all asked.
    expected: AtomicU32,
}

impl GenCast {
    pub(super) fn new(generation: &str, port: u16, pages: u64) -> GenCast {
        GenCast {
            group: SocketAddrV4::new(group_of(generation), port),
            epoch: Instant::now(),
            sent_at: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            sent: AtomicU64::new(0),
            members: Mutex::new(HashMap::new()),
            said_end_game: AtomicBool::new(false),
            expected: AtomicU32::new(0),
        }
    }

    /// The publisher expects `hosts` hosts to ask for this generation.
    pub(super) fn expect(&self, hosts: u32) {
        self.expected.store(hosts, Ordering::Relaxed);
    }

    /// Datagrams sent so far (echoed in replies).
    pub(super) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn stamp(&self, now: Instant) -> u32 {
        // 0 means "never sent": a wrapped stamp skips it.
        (now.duration_since(self.epoch).as_millis() as u32).max(1)
    }

    /// Whether page `p` went to the group less than [`IN_FLIGHT`] ago, and
    /// whether it ever did.
    fn in_flight(&self, p: u64, now: u32) -> (bool, bool) {
        let at = self.sent_at[p as usize].load(Ordering::Relaxed);
        let limit = IN_FLIGHT.as_millis() as u32;
        // Stamps are milliseconds modulo 2^32 (they wrap after 49 days of
        // a generation's life): the difference wraps with them.
        (at != 0 && now.wrapping_sub(at) < limit, at != 0)
    }

    fn active_members(&self, now: Instant) -> usize {
        let asked = self
            .members
            .lock()
            .values()
            .filter(|m| !m.deaf && now.duration_since(m.last) < ACTIVE)
            .count();
        // At the start not every host has asked yet; the first one's pages
        // are the others' too.
        let expected = if now.duration_since(self.epoch) < ACTIVE {
            self.expected.load(Ordering::Relaxed) as usize
        } else {
            0
        };
        asked.max(expected)
    }
}

/// Rate of multicast sending: a token bucket whose rate flow control moves.
struct Pace {
    rate: f64,
    tokens: f64,
    last: Instant,
}

/// The multicast sender of a page server.
pub(super) struct Sender {
    sock: UdpSocket,
    key: McastKey,
    pub(super) port: u16,
    max_rate: f64,
    pace: Mutex<Pace>,
    pub(super) counters: McastCounters,
}

impl Sender {
    pub(super) fn new(cfg: &McastConfig, key: McastKey) -> std::io::Result<Sender> {
        let sock = crate::mcast::sender(cfg.iface)?;
        let max_rate = (cfg.max_rate as f64).max(MIN_RATE);
        info!(port = cfg.port, iface = ?cfg.iface, max_rate_mib = max_rate / (1 << 20) as f64, "page server multicasts page copies (mcdist)");
        Ok(Sender {
            sock,
            key,
            port: cfg.port,
            max_rate,
            pace: Mutex::new(Pace {
                rate: max_rate / 4.0,
                tokens: DATAGRAM_LEN as f64 * 64.0,
                last: Instant::now(),
            }),
            counters: McastCounters::default(),
        })
    }

    /// Current sending rate, bytes per second.
    pub(super) fn rate(&self) -> u64 {
        self.pace.lock().rate as u64
    }

    fn congested(&self) {
        let mut p = self.pace.lock();
        p.rate = (p.rate / 2.0).max(MIN_RATE);
    }

    fn grow(&self) {
        let mut p = self.pace.lock();
        p.rate = (p.rate + self.max_rate / 16.0).min(self.max_rate);
    }

    /// Takes the tokens of one datagram; false if the bucket is empty.
    fn take(&self) -> bool {
        let mut p = self.pace.lock();
        let now = Instant::now();
        let burst = (p.rate / 50.0).max(DATAGRAM_LEN as f64 * 16.0); // 20 ms worth
        p.tokens = (p.tokens + p.rate * now.duration_since(p.last).as_secs_f64()).min(burst);
        p.last = now;
        if p.tokens >= DATAGRAM_LEN as f64 {
            p.tokens -= DATAGRAM_LEN as f64;
            true
        } else {
            false
        }
    }

    /// Records a request of `peer` for `g` and decides how to answer it.
    pub(super) fn on_request(&self, g: &GenCast, peer: IpAddr, r: &Request) -> Decision {
        let now = Instant::now();
        if r.flags & FLAG_MEMBER == 0 {
            return Decision::Serve;
        }
        let sent = g.sent();
        let mut sample = None;
        {
            let mut members = g.members.lock();
            let m = members.entry((peer, r.host)).or_insert(Member {
                last: now,
                first_sent: sent,
                sample_sent: sent,
                sample_received: r.mcast_received,
                deaf: false,
            });
            m.last = now;
            let was_deaf = m.deaf;
            m.deaf = r.mcast_received == 0 && sent.saturating_sub(m.first_sent) >= DEAF_AFTER;
            if m.deaf && !was_deaf {
                warn!(%peer, group = %g.group, "mcdist: a member received none of {} page datagrams; it no longer counts as a member", sent - m.first_sent);
            }
            let ds = sent.saturating_sub(m.sample_sent);
            if ds >= SAMPLE && !m.deaf {
                let dr = r.mcast_received.saturating_sub(m.sample_received);
                sample = Some(dr as f64 / ds as f64);
                m.sample_sent = sent;
                m.sample_received = r.mcast_received;
            }
        }
        match sample {
            Some(ratio) if ratio < GOOD_DELIVERY => self.congested(),
            Some(_) => self.grow(),
            None => {}
        }
        let stamp = g.stamp(now);
        let mut all_in_flight = true;
        let mut lost = 0;
        for p in r.first..r.first + r.count as u64 {
            let (flying, ever) = g.in_flight(p, stamp);
            all_in_flight &= flying;
            lost += (ever && !flying) as u64;
        }
        if lost > 0 {
            self.counters.rerequested.fetch_add(lost, Ordering::Relaxed);
        }
        if all_in_flight && r.flags & FLAG_UNICAST == 0 {
            self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
            return Decision::Coalesce;
        }
        Decision::Serve
    }

    /// Sends the pages `data` (pages `first..`) to the group, unless they
    /// went there a moment ago, fewer than two hosts are active members, or
    /// the rate allows no more. Returns whether every page is now on its
    /// way (sent now or a moment ago), so that a member asking for them can
    /// be answered "coalesced" instead of with the data.
    pub(super) fn multicast(
        &self,
        name: &str,
        g: &GenCast,
        first: u64,
        data: &[u8],
        buf: &mut [u8; DATAGRAM_LEN],
    ) -> bool {
        let now = Instant::now();
        if g.active_members(now) < 2 {
            if !g.said_end_game.swap(true, Ordering::Relaxed) {
                info!(
                    generation = name,
                    "mcdist: fewer than two hosts ask for this generation; unicast only until more do"
                );
            }
            return false;
        }
        g.said_end_game.store(false, Ordering::Relaxed);
        let stamp = g.stamp(now);
        let mut all = true;
        for (i, page) in data.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let p = first + i as u64;
            match g.in_flight(p, stamp) {
                (true, _) => continue,
                // Multicast before: whoever asks again lost it (losses are
                // a receiver's own on a switched network), so it goes to
                // that host alone, over TCP.
                (false, true) => {
                    all = false;
                    continue;
                }
                (false, false) => {}
            }
            // Claim the page: of connections asking for it at once, one
            // sends it, the others find it in flight.
            let slot = &g.sent_at[p as usize];
            if slot
                .compare_exchange(0, stamp, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            if !self.take() {
                slot.store(0, Ordering::Release);
                let left = (data.len() / PAGE_SIZE as usize - i) as u64;
                self.counters.skipped.fetch_add(left, Ordering::Relaxed);
                return false;
            }
            let seq = g.sent.fetch_add(1, Ordering::Relaxed);
            seal(&self.key, name, p, seq, page, buf);
            match self.sock.send_to(buf, g.group) {
                Ok(_) => {
                    self.counters.datagrams.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    slot.store(0, Ordering::Release);
                    if self.counters.send_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        warn!(generation = name, group = %g.group, "mcdist: cannot send to the group: {e}");
                    }
                    return false;
                }
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snowflock_proto::auth::ClusterKey;
    use std::net::Ipv4Addr;

    fn sender() -> Sender {
        let cfg = McastConfig::new(Some(Ipv4Addr::LOCALHOST));
        let key = McastKey::new(&ClusterKey::from_bytes(&[1; 32]).unwrap());
        Sender::new(&cfg, key).unwrap()
    }

    fn req(first: u64, count: u32, flags: u32, received: u64) -> Request {
        Request {
            name: "g".into(),
            first,
            count,
            flags,
            mcast_received: received,
            host: 0,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn in_flight_holds_across_the_stamps_wrapping() {
        let g = GenCast::new("g", 7404, 4);
        g.sent_at[1].store(u32::MAX - 3, Ordering::Relaxed);
        assert_eq!(g.in_flight(1, 2), (true, true));
        assert_eq!(g.in_flight(1, 20), (false, true));
        assert_eq!(g.in_flight(2, 2), (false, false));
    }

    #[test]
    fn coalesces_only_members_asking_for_pages_in_flight() {
        let s = sender();
        let g = GenCast::new("g", 7404, 64);
        let stamp = g.stamp(Instant::now());
        g.sent_at[3].store(stamp, Ordering::Relaxed);
        g.sent_at[4].store(stamp, Ordering::Relaxed);
        assert_eq!(
            s.on_request(&g, ip(1), &req(3, 2, FLAG_MEMBER, 0)),
            Decision::Coalesce
        );
        // Not all in flight, not a member, or a re-request: served.
        assert_eq!(
            s.on_request(&g, ip(1), &req(3, 3, FLAG_MEMBER, 0)),
            Decision::Serve
        );
        assert_eq!(s.on_request(&g, ip(2), &req(3, 2, 0, 0)), Decision::Serve);
        assert_eq!(
            s.on_request(&g, ip(1), &req(3, 2, FLAG_MEMBER | FLAG_UNICAST, 0)),
            Decision::Serve
        );
        // Sent long ago: lost by this member, served and counted.
        g.sent_at[9].store(1, Ordering::Relaxed);
        std::thread::sleep(IN_FLIGHT * 2);
        assert_eq!(
            s.on_request(&g, ip(1), &req(9, 1, FLAG_MEMBER, 0)),
            Decision::Serve
        );
        assert_eq!(s.counters.rerequested.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn flow_control_halves_on_loss_and_grows_on_delivery() {
        let s = sender();
        let g = GenCast::new("g", 7404, 8);
        let r0 = s.rate();
        s.on_request(&g, ip(1), &req(0, 1, FLAG_MEMBER, 0));
        g.sent.store(SAMPLE, Ordering::Relaxed);
        // Got half of them: congestion.
        s.on_request(&g, ip(1), &req(0, 1, FLAG_MEMBER, SAMPLE / 2));
        assert_eq!(s.rate(), r0 / 2);
        g.sent.store(2 * SAMPLE, Ordering::Relaxed);
        s.on_request(&g, ip(1), &req(0, 1, FLAG_MEMBER, SAMPLE / 2 + SAMPLE));
        assert!(s.rate() > r0 / 2);
    }

    #[test]
    fn expected_hosts_count_before_they_ask() {
        let s = sender();
        let g = GenCast::new("g", 7404, 8);
        s.on_request(&g, ip(1), &req(0, 1, FLAG_MEMBER, 0));
        assert_eq!(g.active_members(Instant::now()), 1);
        g.expect(4);
        assert_eq!(g.active_members(Instant::now()), 4);
    }

    #[test]
    fn deaf_members_and_the_end_game() {
        let s = sender();
        let g = GenCast::new("g", 7404, 8);
        s.on_request(&g, ip(1), &req(0, 1, FLAG_MEMBER, 0));
        assert_eq!(g.active_members(Instant::now()), 1);
        s.on_request(&g, ip(2), &req(0, 1, FLAG_MEMBER, 0));
        assert_eq!(g.active_members(Instant::now()), 2);
        g.sent.store(DEAF_AFTER, Ordering::Relaxed);
        s.on_request(&g, ip(2), &req(0, 1, FLAG_MEMBER, 0));
        assert_eq!(g.active_members(Instant::now()), 1);
        // With one member left nothing is multicast.
        let mut buf = [0u8; DATAGRAM_LEN];
        assert!(!s.multicast("g", &g, 0, &[0u8; 4096], &mut buf));
        assert_eq!(s.counters.datagrams.load(Ordering::Relaxed), 0);
    }
}
