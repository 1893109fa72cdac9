//! What the processes report, and the bench's rows: one per host count
//! and multicast mode, aggregated over the hosts, printed as a table (with
//! the on/off egress ratio per host count) or as JSON.

use super::origin::OriginReport;
use dom0_memtap::FaultStats;
use serde::{Deserialize, Serialize};

/// A line a host process prints on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMsg {
    /// Mounted, generation added, files open: waiting for `go`.
    Ready {
        /// The multicast group joined, if any.
        group: Option<String>,
    },
    /// The replay is over.
    Result(Box<HostResult>),
}

/// One host's replay.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HostResult {
    pub host: u32,
    pub clones: u32,
    /// From the common start to this host's last clone done.
    pub replay_ms: f64,
    /// Reads of all its clones (trace lines times clones).
    pub reads: u64,
    /// Time of a read as a clone saw it (page cache hits included).
    pub read_p50_us: u64,
    pub read_p99_us: u64,
    pub read_errors: u64,
    /// Pages whose bytes were not the generation's.
    pub wrong_pages: u64,
    /// UDP datagrams this host's kernel dropped: socket buffer full, and
    /// every receive error (`/proc/net/snmp`, of the host's namespace).
    pub udp_rcvbuf_errors: u64,
    pub udp_in_errors: u64,
    /// IP datagrams whose fragments could not be put together.
    pub ip_reasm_fails: u64,
    /// memtap's figures of the generation on this host.
    pub memtap: FaultStats,
}

/// The `q` quantile of sorted values (nearest rank); 0 for none.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One row: a host count and a multicast mode.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub hosts: u32,
    /// Clones in all (hosts times clones per host).
    pub clones: u32,
    pub clones_per_host: u32,
    /// `"on"` or `"off"`.
    pub mcast: String,
    /// `"synthetic"` or the trace file.
    pub trace: String,
    /// Distinct pages of the trace: what one host needs at least.
    pub trace_pages: u64,
    /// Bytes the origin's link sent during the replay (headers, multicast
    /// datagrams once each, retransmissions included).
    pub origin_egress_bytes: u64,
    /// `origin_egress_bytes` over the trace's bytes: about `hosts` for
    /// unicast, ideally about 1 with multicast.
    pub egress_per_trace: f64,
    pub origin_tx_packets: u64,
    /// Of the egress: page bytes answered over TCP, and page datagrams
    /// multicast (the page server's `bytes_served` and `mcast_datagrams`).
    pub origin_unicast_bytes: u64,
    pub origin_mcast_datagrams: u64,
    /// Pages the hosts asked for after they had been multicast to them
    /// (the page server's `rerequested`): lost, or late.
    pub origin_rerequested: u64,
    /// Slowest host: from the common start to its last clone done.
    pub replay_ms: f64,
    pub replay_ms_median: f64,
    /// The trace's own length (times the time scale).
    pub trace_ms: f64,
    /// memtap's fault latency per host (time from the FUSE request to the
    /// reply), the median over hosts of each host's p50 and p99.
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    /// The worst host's p99.
    pub latency_p99_max_us: u64,
    /// Reads as the clones saw them, median over hosts.
    pub read_p50_us: f64,
    pub read_p99_us: f64,
    /// Sums over hosts of memtap's figures.
    pub pages_fetched: u64,
    pub mcast_pages: u64,
    pub mcast_dropped: u64,
    pub coalesced: u64,
    pub rerequests: u64,
    pub fetch_errors: u64,
    /// Datagrams the hosts' kernels dropped (receive errors, buffer
    /// overflows among them) and reassemblies that failed.
    pub udp_in_errors: u64,
    pub udp_rcvbuf_errors: u64,
    pub ip_reasm_fails: u64,
    pub read_errors: u64,
    pub wrong_pages: u64,
    /// The page server's counters over the replay (`ServerStats`: its
    /// counters' differences; `mcast_rate`, flow control's rate, at the
    /// end).
    pub origin_server: serde_json::Value,
}

impl Row {
    /// Datagrams lost on the way into the hosts.
    pub fn lost(&self) -> u64 {
        self.udp_in_errors + self.ip_reasm_fails
    }
}

/// The numeric fields of `after` minus those of `before` (counters);
/// rates (`*_rate`, gauges such as `mcast_rate`) and other fields as in
/// `after`.
pub fn value_delta(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let (Value::Object(b), Value::Object(a)) = (before, after) else {
        return after.clone();
    };
    let mut out = serde_json::Map::new();
    for (k, v) in a {
        let d = match (v.as_u64(), b.get(k).and_then(Value::as_u64)) {
            (Some(x), Some(y)) if !k.ends_with("_rate") => Value::from(x.saturating_sub(y)),
            _ => v.clone(),
        };
        out.insert(k.clone(), d);
    }
    Value::Object(out)
}

/// What a run was: the figures that are not measured.
pub struct RunInfo<'a> {
    pub hosts: u32,
    pub clones_per_host: u32,
    pub mcast: bool,
    pub trace: &'a str,
    pub trace_pages: u64,
    pub trace_ms: f64,
}

/// One row from the hosts' results and the origin's reports before and
/// after the replay.
pub fn aggregate(
    info: &RunInfo,
    results: &[HostResult],
    before: &OriginReport,
    after: &OriginReport,
) -> Row {
    let med =
        |f: &dyn Fn(&HostResult) -> f64| crate::bench::median(results.iter().map(f).collect());
    let sum = |f: &dyn Fn(&HostResult) -> u64| results.iter().map(f).sum::<u64>();
    let egress = after.tx_bytes.saturating_sub(before.tx_bytes);
    let server = value_delta(&before.server, &after.server);
    let counter = |k: &str| {
        server
            .get(k)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let trace_bytes = info.trace_pages * dom0_memtap::PAGE_SIZE;
    Row {
        hosts: info.hosts,
        clones: info.hosts * info.clones_per_host,
        clones_per_host: info.clones_per_host,
        mcast: if info.mcast { "on" } else { "off" }.into(),
        trace: info.trace.into(),
        trace_pages: info.trace_pages,
        origin_egress_bytes: egress,
        egress_per_trace: if trace_bytes == 0 {
            f64::NAN
        } else {
            egress as f64 / trace_bytes as f64
        },
        origin_tx_packets: after.tx_packets.saturating_sub(before.tx_packets),
        origin_unicast_bytes: counter("bytes_served"),
        origin_mcast_datagrams: counter("mcast_datagrams"),
        origin_rerequested: counter("rerequested"),
        replay_ms: results.iter().map(|r| r.replay_ms).fold(f64::NAN, f64::max),
        replay_ms_median: med(&|r| r.replay_ms),
        trace_ms: info.trace_ms,
        latency_p50_us: med(&|r| r.memtap.latency_p50_us as f64),
        latency_p99_us: med(&|r| r.memtap.latency_p99_us as f64),
        latency_p99_max_us: results
            .iter()
            .map(|r| r.memtap.latency_p99_us)
            .max()
            .unwrap_or(0),
        read_p50_us: med(&|r| r.read_p50_us as f64),
        read_p99_us: med(&|r| r.read_p99_us as f64),
        pages_fetched: sum(&|r| r.memtap.pages_fetched),
        mcast_pages: sum(&|r| r.memtap.mcast_pages),
        mcast_dropped: sum(&|r| r.memtap.mcast_dropped),
        coalesced: sum(&|r| r.memtap.coalesced),
        rerequests: sum(&|r| r.memtap.rerequests),
        fetch_errors: sum(&|r| r.memtap.fetch_errors),
        udp_in_errors: sum(&|r| r.udp_in_errors),
        udp_rcvbuf_errors: sum(&|r| r.udp_rcvbuf_errors),
        ip_reasm_fails: sum(&|r| r.ip_reasm_fails),
        read_errors: sum(&|r| r.read_errors),
        wrong_pages: sum(&|r| r.wrong_pages),
        origin_server: server,
    }
}

/// Per host count (and clones per host) measured both ways: multicast
/// egress over unicast egress.
pub fn egress_ratios(rows: &[Row]) -> Vec<(u32, u32, f64)> {
    let mut out = Vec::new();
    for on in rows.iter().filter(|r| r.mcast == "on") {
        let off = rows.iter().find(|r| {
            r.mcast == "off" && r.hosts == on.hosts && r.clones_per_host == on.clones_per_host
        });
        if let Some(off) = off {
            let ratio = if off.origin_egress_bytes == 0 {
                f64::NAN
            } else {
                on.origin_egress_bytes as f64 / off.origin_egress_bytes as f64
            };
            out.push((on.hosts, on.clones_per_host, ratio));
        }
    }
    out
}

/// The table of `rows`, then the ratios.
pub fn table(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:>5} {:>6} {:>5} {:>10} {:>7} {:>8} {:>8} {:>9} {:>7} {:>7} {:>7} {:>9} {:>9} {:>6} {:>7} {:>5} {:>5}\n",
        "hosts",
        "clones",
        "mcast",
        "egress_MiB",
        "x_trace",
        "tcp_MiB",
        "mc_dgram",
        "replay_ms",
        "p50_us",
        "p99_us",
        "rd99_us",
        "mcast_pg",
        "coalesced",
        "rereq",
        "o_rereq",
        "lost",
        "wrong"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>5} {:>6} {:>5} {:>10.1} {:>7.2} {:>8.1} {:>8} {:>9.0} {:>7.0} {:>7.0} {:>7.0} {:>9} {:>9} {:>6} {:>7} {:>5} {:>5}",
            r.hosts,
            r.clones,
            r.mcast,
            r.origin_egress_bytes as f64 / 1048576.0,
            r.egress_per_trace,
            r.origin_unicast_bytes as f64 / 1048576.0,
            r.origin_mcast_datagrams,
            r.replay_ms,
            r.latency_p50_us,
            r.latency_p99_us,
            r.read_p99_us,
            r.mcast_pages,
            r.coalesced,
            r.rerequests,
            r.origin_rerequested,
            r.lost(),
            r.wrong_pages + r.read_errors
        );
    }
    for (hosts, k, ratio) in egress_ratios(rows) {
        let _ = writeln!(
            s,
            "{hosts} host(s), {k} clone(s) each: origin egress with multicast / without = {ratio:.3}"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(tx: u64, served: u64) -> OriginReport {
        OriginReport {
            addr: "10.249.0.1:7171".parse().unwrap(),
            tx_bytes: tx,
            tx_packets: tx / 1000,
            rx_bytes: 0,
            server: serde_json::json!({
                "bytes_served": served,
                "mcast_datagrams": served / 10,
                "mcast_rate": 1000 - served,
                "connections": 3,
                "name": "x"
            }),
        }
    }

    fn host(i: u32, replay: f64, p50: u64, p99: u64) -> HostResult {
        HostResult {
            host: i,
            clones: 2,
            replay_ms: replay,
            reads: 10,
            read_p50_us: p50 + 1,
            read_p99_us: p99 + 1,
            udp_in_errors: 1,
            ip_reasm_fails: 2,
            memtap: FaultStats {
                latency_p50_us: p50,
                latency_p99_us: p99,
                pages_fetched: 100,
                mcast_pages: 10,
                rerequests: 1,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.99), 7);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
    }

    #[test]
    fn aggregates_over_hosts() {
        let info = RunInfo {
            hosts: 3,
            clones_per_host: 2,
            mcast: true,
            trace: "synthetic",
            trace_pages: 256,
            trace_ms: 500.0,
        };
        let hs = [
            host(1, 900.0, 100, 4000),
            host(2, 1200.0, 300, 1000),
            host(3, 1000.0, 200, 2000),
        ];
        let r = aggregate(
            &info,
            &hs,
            &origin(1000, 5),
            &origin(1000 + 2 * 1048576, 105),
        );
        assert_eq!(r.clones, 6);
        assert_eq!(r.mcast, "on");
        assert_eq!(r.origin_egress_bytes, 2 * 1048576);
        assert_eq!(r.egress_per_trace, 2.0);
        assert_eq!(r.origin_tx_packets, 2097);
        assert_eq!(r.replay_ms, 1200.0);
        assert_eq!(r.replay_ms_median, 1000.0);
        assert_eq!(r.latency_p50_us, 200.0);
        assert_eq!(r.latency_p99_us, 2000.0);
        assert_eq!(r.latency_p99_max_us, 4000);
        assert_eq!(r.read_p99_us, 2001.0);
        assert_eq!(r.pages_fetched, 300);
        assert_eq!(r.mcast_pages, 30);
        assert_eq!(r.rerequests, 3);
        assert_eq!(r.lost(), 9);
        assert_eq!(r.origin_server["bytes_served"], 100);
        assert_eq!(r.origin_unicast_bytes, 100);
        assert_eq!(r.origin_mcast_datagrams, 10);
        assert_eq!(r.origin_rerequested, 0);
        assert_eq!(r.origin_server["connections"], 0);
        assert_eq!(r.origin_server["name"], "x");
        // A rate is a gauge: the value at the end.
        assert_eq!(r.origin_server["mcast_rate"], 895);
        // Even host counts: the median is the mean of the middle two.
        let r = aggregate(&info, &hs[..2], &origin(0, 0), &origin(0, 0));
        assert_eq!(r.latency_p50_us, 200.0);
        assert!(r.egress_per_trace == 0.0);
    }

    #[test]
    fn ratios_pair_on_with_off() {
        let info = |hosts, mcast| RunInfo {
            hosts,
            clones_per_host: 1,
            mcast,
            trace: "t",
            trace_pages: 1,
            trace_ms: 1.0,
        };
        let hs = [host(1, 1.0, 1, 1)];
        let rows = vec![
            aggregate(&info(4, true), &hs, &origin(0, 0), &origin(100, 0)),
            aggregate(&info(4, false), &hs, &origin(0, 0), &origin(400, 0)),
            aggregate(&info(8, true), &hs, &origin(0, 0), &origin(100, 0)),
        ];
        assert_eq!(egress_ratios(&rows), [(4, 1, 0.25)]);
        let t = table(&rows);
        assert!(t.contains("multicast / without = 0.250"), "{t}");
        assert_eq!(t.lines().count(), 1 + 3 + 1);
    }

    #[test]
    fn json_row_shape() {
        let info = RunInfo {
            hosts: 2,
            clones_per_host: 1,
            mcast: false,
            trace: "synthetic",
            trace_pages: 10,
            trace_ms: 1.0,
        };
        let r = aggregate(&info, &[host(1, 5.0, 1, 2)], &origin(0, 0), &origin(10, 0));
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "hosts",
            "clones",
            "mcast",
            "origin_egress_bytes",
            "replay_ms",
            "latency_p50_us",
            "latency_p99_us",
            "pages_fetched",
            "mcast_pages",
            "rerequests",
            "coalesced",
            "wrong_pages",
        ] {
            assert!(v.get(k).is_some(), "{k} missing");
        }
        assert_eq!(v["mcast"], "off");
        assert_eq!(v["hosts"], 2);
        assert_eq!(v["origin_egress_bytes"], 10);
        // Host messages round-trip as one JSON line each.
        for m in [
            HostMsg::Ready { group: None },
            HostMsg::Result(Box::new(host(1, 1.0, 2, 3))),
        ] {
            let line = serde_json::to_string(&m).unwrap();
            assert!(!line.contains('\n'));
            let back: HostMsg = serde_json::from_str(&line).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), line);
        }
    }
}
