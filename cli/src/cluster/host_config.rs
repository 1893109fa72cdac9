//! The `host.toml` of each host: the daemon's own configuration format
//! (see docs/deploy.md), built as a [`HostFile`] by [`host_file`] and
//! serialised by [`render_host_toml`].
//!
//! This is the only place the CLI writes `host.toml`. The type is the one
//! `snowflockd` parses, so what is written here is what the daemon reads.

use super::layout::{host_ip, host_name, Layout};
use super::{CONTROL_PORT, PAGE_PORT};
use snowflock_proto::host_config::{AllocatorFile, HostFile, Peer};
use std::net::SocketAddr;

/// Settings written into every host's `host.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub max_vms: u32,
    pub quota_per_vm: u32,
    pub fetch_timeout_ms: u64,
    pub prefetch_pages: u32,
    pub ticket_ttl_s: u64,
    /// Multicast page distribution between the hosts (`mcast`).
    pub mcast: bool,
    /// Bound of memtap's cache of one generation, MiB (`None`: unbounded).
    pub memcache_limit_mib: Option<u64>,
    /// Tickets ask for background completion unless the guest says
    /// otherwise.
    pub independent: bool,
    /// Where memtap writes clones' fault traces (`fault_trace_dir`).
    pub fault_trace_dir: Option<std::path::PathBuf>,
    /// Tickets from the local cluster's Slurm (`None`: static slots).
    pub slurm: Option<SlurmSettings>,
}

/// `cluster up --slurm`: the `[allocator]` every host gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmSettings {
    pub wait_s: u64,
    pub slots_per_node: Option<u32>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_vms: 16,
            quota_per_vm: 32,
            fetch_timeout_ms: 10_000,
            prefetch_pages: 0,
            ticket_ttl_s: 600,
            mcast: true,
            memcache_limit_mib: None,
            independent: false,
            fault_trace_dir: None,
            slurm: None,
        }
    }
}

/// The configuration of host `i` of an `n`-host cluster: the other hosts
/// are its peers.
pub fn host_file(l: &Layout, i: u32, n: u32, s: &Settings) -> HostFile {
    let h = l.host(i);
    let ip = host_ip(i).into();
    HostFile {
        host: Some(h.name),
        socket: Some(h.socket),
        state_dir: Some(h.state_dir),
        // Daemon-to-daemon control channel.
        listen: Some(SocketAddr::new(ip, CONTROL_PORT)),
        // Memory page server.
        page_server: Some(SocketAddr::new(ip, PAGE_PORT)),
        key_file: Some(l.key_file()),
        max_vms: Some(s.max_vms),
        quota_per_vm: Some(s.quota_per_vm),
        fetch_timeout_ms: Some(s.fetch_timeout_ms),
        prefetch_pages: Some(s.prefetch_pages),
        ticket_ttl_s: (s.ticket_ttl_s != 600).then_some(s.ticket_ttl_s),
        mcast: Some(s.mcast),
        memcache_limit_mib: s.memcache_limit_mib,
        independent: s.independent.then_some(true),
        fault_trace_dir: s.fault_trace_dir.clone(),
        allocator: s.slurm.as_ref().map(|sl| AllocatorFile {
            kind: Some("slurm".into()),
            partition: Some(super::slurm::PARTITION.into()),
            wait_s: Some(sl.wait_s),
            slots_per_node: sl.slots_per_node,
            slurm_conf: Some(super::slurm::conf_path(l)),
            ..AllocatorFile::default()
        }),
        peers: (0..n)
            .filter(|j| *j != i)
            .map(|j| Peer {
                name: host_name(j),
                addr: SocketAddr::new(host_ip(j).into(), CONTROL_PORT),
            })
            .collect(),
        ..HostFile::default()
    }
}

/// The `host.toml` of host `i` of an `n`-host cluster.
pub fn render_host_toml(l: &Layout, i: u32, n: u32, s: &Settings) -> String {
    format!(
        "# snowflockd configuration of host {} of the local cluster `{}`\n\
         # (written by `snowflock cluster up`; see docs/deploy.md).\n{}",
        host_name(i),
        l.name,
        host_file(l, i, n, s).to_toml()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn parse(text: &str) -> HostFile {
        HostFile::parse(text, "host.toml").unwrap_or_else(|e| {
            panic!("{}\n{text}", snowflock_proto::error::chain(&e));
        })
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn host_toml_of_a_two_host_cluster() {
        let l = Layout::new("ctest").unwrap();
        let s = Settings {
            max_vms: 16,
            quota_per_vm: 32,
            fetch_timeout_ms: 10000,
            prefetch_pages: 0,
            ..Settings::default()
        };
        let t = render_host_toml(&l, 0, 2, &s);
        assert!(
            t.starts_with("# snowflockd configuration of host h0 of the local cluster `ctest`\n")
        );
        let f = parse(&t);
        assert_eq!(
            f,
            HostFile {
                host: Some("h0".into()),
                socket: Some(PathBuf::from("/run/snowflock/ctest/h0/snowflockd.sock")),
                state_dir: Some(PathBuf::from("/dev/shm/snowflock-ctest/h0")),
                listen: addr("10.249.0.1:7170"),
                page_server: addr("10.249.0.1:7171"),
                key_file: Some(PathBuf::from("/run/snowflock/ctest/key")),
                max_vms: Some(16),
                quota_per_vm: Some(32),
                fetch_timeout_ms: Some(10000),
                prefetch_pages: Some(0),
                mcast: Some(true),
                peers: vec![Peer {
                    name: "h1".into(),
                    addr: "10.249.0.2:7170".parse().unwrap(),
                }],
                ..HostFile::default()
            }
        );
        // What the daemon does not get from the CLI stays its default.
        assert_eq!((f.net_prefix, f.qemu), (None, None));
        for key in ["net_prefix", "qemu", "memcache_limit_mib", "independent"] {
            assert!(!t.contains(key), "{key} in\n{t}");
        }
    }

    #[test]
    fn host_toml_peers_are_the_other_hosts() {
        let l = Layout::new("sfc").unwrap();
        let s = Settings {
            max_vms: 3,
            quota_per_vm: 4,
            fetch_timeout_ms: 500,
            prefetch_pages: 7,
            ticket_ttl_s: 30,
            mcast: false,
            memcache_limit_mib: Some(64),
            independent: true,
            fault_trace_dir: None,
            slurm: Some(SlurmSettings {
                wait_s: 4,
                slots_per_node: Some(1),
            }),
        };
        let t = render_host_toml(&l, 2, 4, &s);
        let f = parse(&t);
        let peers: Vec<(&str, String)> = f
            .peers
            .iter()
            .map(|p| (p.name.as_str(), p.addr.to_string()))
            .collect();
        assert_eq!(
            peers,
            [
                ("h0", "10.249.0.1:7170".to_string()),
                ("h1", "10.249.0.2:7170".to_string()),
                ("h3", "10.249.0.4:7170".to_string()),
            ]
        );
        assert_eq!(t.matches("[[peers]]").count(), 3);
        assert_eq!(f.host.as_deref(), Some("h2"));
        assert_eq!(f.listen, addr("10.249.0.3:7170"));
        assert_eq!(f.max_vms, Some(3));
        assert_eq!(f.quota_per_vm, Some(4));
        assert_eq!(f.fetch_timeout_ms, Some(500));
        assert_eq!(f.prefetch_pages, Some(7));
        assert_eq!(f.mcast, Some(false));
        assert_eq!(f.memcache_limit_mib, Some(64));
        assert_eq!(f.independent, Some(true));
        assert_eq!(f, host_file(&l, 2, 4, &s));
        // A one-host cluster says so explicitly.
        let one = render_host_toml(&l, 0, 1, &s);
        assert!(one.lines().any(|x| x == "peers = []"), "{one}");
        assert!(!one.contains("[[peers]]"));
        assert!(parse(&one).peers.is_empty());
    }

    #[test]
    fn odd_cluster_names_still_parse() {
        // Layout names are restricted, but the writer must not depend on it.
        let mut l = Layout::new("ctest").unwrap();
        l.name = "a\"b\\c".into();
        let t = render_host_toml(&l, 1, 2, &Settings::default());
        let f = parse(&t);
        assert_eq!(f.key_file, Some(l.key_file()));
        assert_eq!(f.socket, Some(l.host(1).socket));
    }
}
