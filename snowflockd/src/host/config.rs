//! Daemon configuration: defaults, `/etc/snowflock/host.toml`, flags.
//!
//! The file's shape ([`HostFile`], [`Peer`]) is shared with the CLI, which
//! writes it, and lives in [`snowflock_proto::host_config`]; what it means
//! and which values are valid is decided here, in [`Config::apply_file`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use snowflock_proto::host_config::{AllocatorFile, ConfigError, HostFile, Peer, HOST_CONFIG};
use std::collections::BTreeMap;

/// Who grants tickets (`[allocator]` in `host.toml`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Allocator {
    /// This host and its peers, by their free VM slots.
    #[default]
    Static,
    /// One Slurm allocation per ticket.
    Slurm(Slurm),
}

/// `[allocator] kind = "slurm"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Slurm {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time_limit: Option<String>,
    /// How long a ticket request waits for Slurm's grant.
    pub wait: Duration,
    /// Clones per granted node; `None`: the free slots its daemon reports.
    pub slots_per_node: Option<u32>,
    /// `SLURM_CONF` for Slurm's commands.
    pub slurm_conf: Option<PathBuf>,
    /// Slurm node name to snowflock host name, where they differ.
    pub nodes: BTreeMap<String, String>,
}

impl Slurm {
    /// The snowflock host of Slurm node `node`.
    pub fn host_of(&self, node: &str) -> String {
        self.nodes
            .get(node)
            .cloned()
            .unwrap_or_else(|| node.to_string())
    }
}

/// Longest a ticket request may wait for Slurm.
pub const MAX_SLURM_WAIT_S: u64 = 600;

/// Cluster membership of this host; `None` in [`Config::cluster`] for a
/// stand-alone host.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Control channel (daemon to daemon, authenticated).
    pub listen: SocketAddr,
    /// Page server address (memory of frozen generations for other hosts).
    pub page_server: SocketAddr,
    pub key_file: PathBuf,
    pub peers: Vec<Peer>,
    /// Total deadline for fetching one page from an origin host before the
    /// clone waiting for it is stopped.
    pub fetch_timeout: Duration,
    /// Extra pages fetched with a miss.
    pub prefetch_pages: u32,
    /// Multicast page distribution (`mcast`, `mcast_port`,
    /// `mcast_rate_mib`); `None`: unicast only.
    pub mcast: Option<Mcast>,
    /// Most bytes memtap's cache of one generation holds
    /// (`memcache_limit_mib`; `None`: the generation's size).
    pub memcache_limit: Option<u64>,
    /// Tickets ask for background completion unless the guest says
    /// otherwise (`independent`).
    pub independent: bool,
    /// Rate of background completion, bytes per second
    /// (`completion_rate_mib`).
    pub completion_rate: u64,
    /// memtap keeps the pages other hosts' clones faulted
    /// (`prefetch_siblings`).
    pub prefetch_siblings: bool,
    /// Where memtap writes clones' page-fault traces (`fault_trace_dir`).
    pub fault_trace_dir: Option<PathBuf>,
}

/// `mcast = true`: this host's page server multicasts copies of the pages
/// it serves, and its memtap joins the groups of the generations it
/// fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mcast {
    /// UDP port of every group (`mcast_port`).
    pub port: u16,
    /// Highest rate of the page server's multicast, bytes per second
    /// (`mcast_rate_mib`).
    pub max_rate: u64,
}

/// Default `mcast_port`.
pub const MCAST_PORT: u16 = 7404;
/// Default `mcast_rate_mib`.
pub const MCAST_RATE_MIB: u64 = 256;
/// Default `completion_rate_mib`.
pub const COMPLETION_RATE_MIB: u64 = 64;
/// Largest `mcast_rate_mib` and `completion_rate_mib` (1 TiB/s).
pub const MAX_RATE_MIB: u64 = 1 << 20;

impl Cluster {
    /// This host's position among all hosts sorted by name, and their count.
    /// Flock numbers are partitioned by it so hosts never pick the same one.
    pub fn slot(&self, me: &str) -> (u32, u32) {
        let mut names: Vec<&str> = self.peers.iter().map(|p| p.name.as_str()).collect();
        names.push(me);
        names.sort_unstable();
        let i = names.iter().position(|n| *n == me).unwrap_or(0);
        (i as u32, names.len() as u32)
    }

    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// The local address whose interface sends and joins multicast: the
    /// page server's address if it is a specified IPv4 address, else the
    /// control channel's if it is IPv4; `None` lets the kernel choose by
    /// its routes.
    pub fn mcast_iface(&self) -> Option<Ipv4Addr> {
        let v4 = |ip: IpAddr| match ip {
            IpAddr::V4(a) if !a.is_unspecified() => Some(a),
            _ => None,
        };
        v4(self.page_server.ip()).or_else(|| v4(self.listen.ip()))
    }
}

/// Settings of one `snowflockd`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Host name reported in `vm list` and descriptors.
    pub host: String,
    /// Admin socket path.
    pub socket: PathBuf,
    /// Where VM directories, RAM files and generations live. Should be a
    /// tmpfs (RAM files are guest memory).
    pub state_dir: PathBuf,
    /// Where memtap caches what it fetched (`None`: `<state_dir>/memcache`,
    /// see [`Config::memcache_dir`]).
    pub memcache_dir: Option<PathBuf>,
    /// Prefix of bridge and tap names (keep it short: names max 15 chars).
    pub net_prefix: String,
    /// Most VMs (parents and clones) this host runs at once.
    pub max_vms: u32,
    /// Most clones one VM may hold tickets for at once (the per-VM quota).
    pub quota_per_ticket: u32,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Seconds to wait for a booting VM's agent.
    pub boot_timeout_s: u64,
    /// Seconds to wait for a clone to report `Ready`.
    pub clone_timeout_s: u64,
    /// Multi-host settings.
    pub cluster: Option<Cluster>,
    /// How long an unused ticket keeps its capacity.
    pub ticket_ttl: Duration,
    /// Who grants tickets.
    pub allocator: Allocator,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: hostname(),
            socket: PathBuf::from(snowflock_proto::DAEMON_SOCKET),
            state_dir: PathBuf::from("/dev/shm/snowflock"),
            memcache_dir: None,
            net_prefix: "sf".into(),
            max_vms: 64,
            quota_per_ticket: 32,
            qemu: PathBuf::from("qemu-system-x86_64"),
            boot_timeout_s: 180,
            clone_timeout_s: 120,
            cluster: None,
            ticket_ttl: Duration::from_secs(600),
            allocator: Allocator::Static,
        }
    }
}

fn valid_host_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && n.as_bytes()[0].is_ascii_lowercase()
}

impl Config {
    /// Where memtap caches fetched memory pages and disk blocks.
    pub fn memcache_dir(&self) -> PathBuf {
        self.memcache_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("memcache"))
    }

    /// Applies `file` (read from `path`, for messages) over these
    /// settings, checking what only makes sense together.
    pub fn apply_file(&mut self, file: HostFile, path: &str) -> Result<(), ConfigError> {
        apply(file, self, path)
    }
}

fn apply(file: HostFile, cfg: &mut Config, path: &str) -> Result<(), ConfigError> {
    let whole = file.clone();
    let bad = |msg: String| ConfigError::Invalid {
        path: path.into(),
        msg,
    };
    if let Some(h) = file.host {
        if !valid_host_name(&h) {
            return Err(bad(format!(
                "host {h:?}: use 1-32 of a-z, 0-9 and '-', starting with a letter"
            )));
        }
        cfg.host = h;
    }
    if let Some(s) = file.socket {
        cfg.socket = s;
    }
    if let Some(s) = file.state_dir {
        cfg.net_prefix = net_prefix_for(&s);
        cfg.state_dir = s;
    }
    if let Some(m) = file.memcache_dir {
        cfg.memcache_dir = Some(m);
    }
    if let Some(p) = file.net_prefix {
        cfg.net_prefix = p;
    }
    if let Some(q) = file.qemu {
        cfg.qemu = q;
    }
    if let Some(m) = file.max_vms {
        if m == 0 || m > 1024 {
            return Err(bad(format!("max_vms must be 1 to 1024, got {m}")));
        }
        cfg.max_vms = m;
    }
    if let Some(q) = file.quota_per_vm {
        if q == 0 || q > 255 {
            return Err(bad(format!("quota_per_vm must be 1 to 255, got {q}")));
        }
        cfg.quota_per_ticket = q;
    }
    if let Some(t) = file.ticket_ttl_s {
        if !(5..=86_400).contains(&t) {
            return Err(bad(format!("ticket_ttl_s must be 5 to 86400, got {t}")));
        }
        cfg.ticket_ttl = Duration::from_secs(t);
    }
    let allocator = whole.allocator.clone();
    let clusterish = whole.listen.is_some() || whole.key_file.is_some() || !whole.peers.is_empty();
    if clusterish {
        apply_cluster(whole, cfg, path)?;
    }
    if let Some(a) = allocator {
        cfg.allocator = allocator_of(a, cfg).map_err(bad)?;
    }
    Ok(())
}

/// The `[allocator]` table, checked against the cluster it serves.
fn allocator_of(a: AllocatorFile, cfg: &Config) -> Result<Allocator, String> {
    let slurm_only = a.partition.is_some()
        || a.account.is_some()
        || a.qos.is_some()
        || a.time_limit.is_some()
        || a.wait_s.is_some()
        || a.slots_per_node.is_some()
        || a.slurm_conf.is_some()
        || !a.nodes.is_empty();
    match a.kind.as_deref().unwrap_or("static") {
        "static" if slurm_only => Err(
            "[allocator]: partition, account, qos, time_limit, wait_s, slots_per_node, slurm_conf and nodes are for kind = \"slurm\""
                .into(),
        ),
        "static" => Ok(Allocator::Static),
        "slurm" if cfg.cluster.is_none() => Err(
            "[allocator] kind = \"slurm\" needs this host in a cluster (listen, key_file, peers)"
                .into(),
        ),
        "slurm" => {
            let wait_s = a.wait_s.unwrap_or(30);
            if !(1..=MAX_SLURM_WAIT_S).contains(&wait_s) {
                return Err(format!(
                    "[allocator] wait_s must be 1 to {MAX_SLURM_WAIT_S}, got {wait_s}"
                ));
            }
            if a.slots_per_node == Some(0) || a.slots_per_node.is_some_and(|s| s > 1024) {
                return Err("[allocator] slots_per_node must be 1 to 1024".into());
            }
            let known = |h: &str| {
                h == cfg.host
                    || cfg
                        .cluster
                        .as_ref()
                        .is_some_and(|c| c.peer(h).is_some())
            };
            for (node, host) in &a.nodes {
                if !known(host) {
                    return Err(format!(
                        "[allocator.nodes] maps Slurm node {node:?} to {host:?}, which is neither this host nor one of its peers"
                    ));
                }
            }
            // Slurm's words go to its commands as single arguments; refuse
            // what would read as an option.
            for (key, v) in [
                ("partition", &a.partition),
                ("account", &a.account),
                ("qos", &a.qos),
                ("time_limit", &a.time_limit),
            ] {
                if let Some(v) = v {
                    if v.is_empty() || v.starts_with('-') || v.chars().any(char::is_whitespace) {
                        return Err(format!("[allocator] {key} {v:?} is not a Slurm name"));
                    }
                }
            }
            Ok(Allocator::Slurm(Slurm {
                partition: a.partition,
                account: a.account,
                qos: a.qos,
                time_limit: a.time_limit,
                wait: Duration::from_secs(wait_s),
                slots_per_node: a.slots_per_node,
                slurm_conf: a.slurm_conf,
                nodes: a.nodes,
            }))
        }
        other => Err(format!(
            "[allocator] kind must be \"static\" or \"slurm\", got {other:?}"
        )),
    }
}

fn apply_cluster(file: HostFile, cfg: &mut Config, path: &str) -> Result<(), ConfigError> {
    let bad = |msg: String| ConfigError::Invalid {
        path: path.into(),
        msg,
    };
    let listen = file
        .listen
        .ok_or_else(|| bad("`listen` is required with peers or key_file".into()))?;
    let key_file = file
        .key_file
        .ok_or_else(|| bad("`key_file` is required with listen or peers".into()))?;
    if listen.ip().is_unspecified() {
        return Err(bad(
            "`listen` must be this host's address on the cluster network, not 0.0.0.0".into(),
        ));
    }
    let page_server = file
        .page_server
        .unwrap_or_else(|| SocketAddr::new(listen.ip(), listen.port().wrapping_add(1)));
    let mut seen = std::collections::HashSet::new();
    seen.insert(cfg.host.clone());
    for p in &file.peers {
        if !valid_host_name(&p.name) {
            return Err(bad(format!(
                "peer name {:?} is not a valid host name",
                p.name
            )));
        }
        if !seen.insert(p.name.clone()) {
            return Err(bad(format!(
                "host {:?} appears twice (peers must not include this host)",
                p.name
            )));
        }
    }
    if file.peers.len() > 63 {
        return Err(bad("at most 64 hosts per cluster".into()));
    }
    let fetch_ms = file.fetch_timeout_ms.unwrap_or(10_000);
    if !(100..=600_000).contains(&fetch_ms) {
        return Err(bad(format!(
            "fetch_timeout_ms must be 100 to 600000, got {fetch_ms}"
        )));
    }
    let prefetch = file.prefetch_pages.unwrap_or(0);
    if prefetch > 255 {
        return Err(bad(format!(
            "prefetch_pages must be 0 to 255, got {prefetch}"
        )));
    }
    let mib = |key: &str, v: u64, max: u64| {
        if v == 0 || v > max {
            return Err(bad(format!("{key} must be 1 to {max}, got {v}")));
        }
        Ok(v << 20)
    };
    let mcast_port = file.mcast_port.unwrap_or(MCAST_PORT);
    if mcast_port == 0 {
        return Err(bad("mcast_port must be 1 to 65535, got 0".into()));
    }
    let mcast_rate = mib(
        "mcast_rate_mib",
        file.mcast_rate_mib.unwrap_or(MCAST_RATE_MIB),
        MAX_RATE_MIB,
    )?;
    let completion_rate = mib(
        "completion_rate_mib",
        file.completion_rate_mib.unwrap_or(COMPLETION_RATE_MIB),
        MAX_RATE_MIB,
    )?;
    let memcache_limit = file
        .memcache_limit_mib
        .map(|m| mib("memcache_limit_mib", m, u64::MAX >> 20))
        .transpose()?;
    if file
        .fault_trace_dir
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        return Err(bad("fault_trace_dir must not be empty".into()));
    }
    cfg.cluster = Some(Cluster {
        listen,
        page_server,
        key_file,
        peers: file.peers,
        fetch_timeout: Duration::from_millis(fetch_ms),
        prefetch_pages: prefetch,
        mcast: file.mcast.unwrap_or(true).then_some(Mcast {
            port: mcast_port,
            max_rate: mcast_rate,
        }),
        memcache_limit,
        independent: file.independent.unwrap_or(false),
        completion_rate,
        prefetch_siblings: file.prefetch_siblings.unwrap_or(true),
        fault_trace_dir: file.fault_trace_dir,
    });
    Ok(())
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A short link-name prefix unique to a state directory: `s` and 4 hex
/// digits. One daemon owns a state directory (it holds its lock), so links
/// with this prefix are that daemon's, and a restarted daemon may remove
/// them as leftovers.
pub fn net_prefix_for(state_dir: &Path) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x01000193);
    }
    format!("s{:04x}", (h ^ (h >> 16)) & 0xffff)
}

/// Resolves `auto` to `kvm` only when the CPU has hardware virtualization
/// (`vmx` or `svm` in /proc/cpuinfo) and /dev/kvm exists. Some hosts expose
/// a /dev/kvm that is not hardware-backed (PVM); there TCG is the right
/// choice, which the CPU flags tell apart.
pub fn host_has_hw_virt() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && std::path::Path::new("/dev/kvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memtap_cache_follows_the_state_dir_unless_set() {
        let mut c = Config::default();
        c.apply_file(
            HostFile {
                state_dir: Some("/dev/shm/x".into()),
                ..Default::default()
            },
            "t",
        )
        .unwrap();
        assert_eq!(c.memcache_dir(), Path::new("/dev/shm/x/memcache"));
        c.apply_file(
            HostFile {
                memcache_dir: Some("/var/cache/sf".into()),
                ..Default::default()
            },
            "t",
        )
        .unwrap();
        assert_eq!(c.memcache_dir(), Path::new("/var/cache/sf"));
    }

    #[test]
    fn prefixes_are_short_and_differ_by_state_dir() {
        let a = net_prefix_for(Path::new("/dev/shm/snowflock"));
        let b = net_prefix_for(Path::new("/dev/shm/snowflock-demo"));
        assert_eq!(a.len(), 5);
        assert!(a.starts_with('s'));
        assert_ne!(a, b);
        assert_eq!(a, net_prefix_for(Path::new("/dev/shm/snowflock")));
    }

    const FULL: &str = r#"
host = "h1"
socket = "/run/x/h1.sock"
state_dir = "/dev/shm/x/h1"
listen = "10.249.0.2:7170"
key_file = "/run/x/key"
max_vms = 8
quota_per_vm = 4
fetch_timeout_ms = 2000
prefetch_pages = 3
[[peers]]
name = "h0"
addr = "10.249.0.1:7170"
[[peers]]
name = "h2"
addr = "10.249.0.3:7170"
"#;

    #[test]
    fn full_file() {
        let mut cfg = Config::default();
        HostFile::parse(FULL, "t")
            .and_then(|f| cfg.apply_file(f, "t"))
            .unwrap();
        assert_eq!(cfg.host, "h1");
        assert_eq!(cfg.max_vms, 8);
        assert_eq!(cfg.quota_per_ticket, 4);
        assert_eq!(cfg.net_prefix, net_prefix_for(Path::new("/dev/shm/x/h1")));
        let c = cfg.cluster.unwrap();
        assert_eq!(c.page_server, "10.249.0.2:7171".parse().unwrap());
        assert_eq!(c.fetch_timeout, Duration::from_secs(2));
        assert_eq!(c.prefetch_pages, 3);
        // What the file leaves out: multicast on, no cache bound.
        assert_eq!(
            c.mcast,
            Some(Mcast {
                port: 7404,
                max_rate: 256 << 20
            })
        );
        assert_eq!(c.mcast_iface(), Some(Ipv4Addr::new(10, 249, 0, 2)));
        assert_eq!(c.memcache_limit, None);
        assert!(!c.independent);
        assert_eq!(c.completion_rate, 64 << 20);
        assert!(c.prefetch_siblings);
        assert_eq!(c.fault_trace_dir, None);
        assert_eq!(c.slot("h1"), (1, 3));
        assert_eq!(
            c.peer("h2").unwrap().addr,
            "10.249.0.3:7170".parse().unwrap()
        );
    }

    fn cluster_of(extra: &str) -> Result<Cluster, String> {
        let mut cfg = Config::default();
        let base = "host = \"h0\"\nlisten = \"10.0.0.1:7170\"\nkey_file = \"/k\"\n";
        HostFile::parse(&format!("{base}{extra}"), "t")
            .and_then(|f| cfg.apply_file(f, "t"))
            .map(|()| cfg.cluster.expect("a cluster"))
            .map_err(|e| snowflock_proto::error::chain(&e))
    }

    #[test]
    fn mcdist_settings() {
        let c = cluster_of(
            "mcast_port = 7500\nmcast_rate_mib = 100\nmemcache_limit_mib = 512\nindependent = true\ncompletion_rate_mib = 8\nprefetch_siblings = false\nfault_trace_dir = \"/var/tmp/tr\"\n",
        )
        .unwrap();
        assert_eq!(
            c.mcast,
            Some(Mcast {
                port: 7500,
                max_rate: 100 << 20
            })
        );
        assert_eq!(c.memcache_limit, Some(512 << 20));
        assert!(c.independent);
        assert_eq!(c.completion_rate, 8 << 20);
        assert!(!c.prefetch_siblings);
        assert_eq!(c.fault_trace_dir, Some(PathBuf::from("/var/tmp/tr")));
        // Off: unicast only, whatever the port and rate say.
        let c = cluster_of("mcast = false\nmcast_port = 7500\n").unwrap();
        assert_eq!(c.mcast, None);
        for (extra, want) in [
            ("mcast_port = 0\n", "mcast_port must be 1 to 65535, got 0"),
            (
                "mcast_rate_mib = 0\n",
                "mcast_rate_mib must be 1 to 1048576, got 0",
            ),
            ("mcast_rate_mib = 1048577\n", "mcast_rate_mib must be 1 to"),
            (
                "completion_rate_mib = 0\n",
                "completion_rate_mib must be 1 to",
            ),
            (
                "memcache_limit_mib = 0\n",
                "memcache_limit_mib must be 1 to",
            ),
            (
                "fault_trace_dir = \"\"\n",
                "fault_trace_dir must not be empty",
            ),
            ("mcast = 1\n", "Malformed"),
        ] {
            let e = cluster_of(extra).unwrap_err();
            assert!(e.contains(want), "{extra:?}: {e}");
            assert!(e.starts_with("t: ") || e.starts_with("Malformed t"), "{e}");
        }
    }

    #[test]
    fn the_multicast_interface_is_the_cluster_address() {
        let mut c = cluster_of("page_server = \"0.0.0.0:7171\"\n").unwrap();
        assert_eq!(c.mcast_iface(), Some(Ipv4Addr::new(10, 0, 0, 1)));
        c.page_server = "10.0.0.9:7171".parse().unwrap();
        assert_eq!(c.mcast_iface(), Some(Ipv4Addr::new(10, 0, 0, 9)));
        c.page_server = "[fd00::1]:7171".parse().unwrap();
        assert_eq!(c.mcast_iface(), Some(Ipv4Addr::new(10, 0, 0, 1)));
        c.listen = "[fd00::1]:7170".parse().unwrap();
        assert_eq!(c.mcast_iface(), None);
    }

    #[test]
    fn standalone_file_has_no_cluster() {
        let mut cfg = Config::default();
        HostFile::parse("host = \"solo\"\nmax_vms = 3\n", "t")
            .and_then(|f| cfg.apply_file(f, "t"))
            .unwrap();
        assert!(cfg.cluster.is_none());
        assert_eq!(cfg.max_vms, 3);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let cases = [
            ("host = 3", "Malformed"),
            ("hots = \"a\"", "Malformed"),
            ("host = \"H 1\"", "host"),
            ("max_vms = 0", "max_vms"),
            ("listen = \"10.0.0.1:1\"", "key_file"),
            ("key_file = \"/k\"", "listen"),
            ("listen = \"0.0.0.0:1\"\nkey_file = \"/k\"", "0.0.0.0"),
            ("listen = \"nonsense\"", "Malformed"),
            ("host = \"a\"\nlisten = \"10.0.0.1:1\"\nkey_file = \"/k\"\n[[peers]]\nname = \"a\"\naddr = \"10.0.0.2:1\"", "twice"),
            ("listen = \"10.0.0.1:1\"\nkey_file = \"/k\"\nfetch_timeout_ms = 1", "fetch_timeout_ms"),
        ];
        for (text, want) in cases {
            let mut cfg = Config::default();
            let e = HostFile::parse(text, "t")
                .and_then(|f| cfg.apply_file(f, "t"))
                .unwrap_err();
            let msg = snowflock_proto::error::chain(&e);
            assert!(msg.contains(want), "{text:?}: {msg}");
        }
    }

    fn allocator(text: &str) -> Result<Allocator, String> {
        let mut cfg = Config::default();
        let base = "host = \"h0\"\nlisten = \"10.0.0.1:7170\"\nkey_file = \"/k\"\n[[peers]]\nname = \"h1\"\naddr = \"10.0.0.2:7170\"\n";
        HostFile::parse(&format!("{base}{text}"), "t")
            .and_then(|f| cfg.apply_file(f, "t"))
            .map(|()| cfg.allocator)
            .map_err(|e| snowflock_proto::error::chain(&e))
    }

    #[test]
    fn the_allocator_table() {
        assert_eq!(allocator(""), Ok(Allocator::Static));
        assert_eq!(
            allocator("[allocator]\nkind = \"static\"\n"),
            Ok(Allocator::Static)
        );
        let Ok(Allocator::Slurm(s)) = allocator(
            "[allocator]\nkind = \"slurm\"\npartition = \"vms\"\nwait_s = 5\nslots_per_node = 2\n[allocator.nodes]\nnode1 = \"h1\"\n",
        ) else {
            panic!("not slurm");
        };
        assert_eq!(s.partition.as_deref(), Some("vms"));
        assert_eq!(s.wait, Duration::from_secs(5));
        assert_eq!(s.slots_per_node, Some(2));
        assert_eq!(s.host_of("node1"), "h1");
        assert_eq!(s.host_of("h0"), "h0");
        let Ok(Allocator::Slurm(s)) = allocator("[allocator]\nkind = \"slurm\"\n") else {
            panic!("not slurm");
        };
        assert_eq!(s.wait, Duration::from_secs(30));
        assert_eq!(s.slots_per_node, None);
        for (text, want) in [
            ("[allocator]\nkind = \"pbs\"\n", "kind must be"),
            ("[allocator]\npartition = \"x\"\n", "for kind = \"slurm\""),
            ("[allocator]\nkind = \"slurm\"\nwait_s = 0\n", "wait_s"),
            ("[allocator]\nkind = \"slurm\"\nwait_s = 100000\n", "wait_s"),
            (
                "[allocator]\nkind = \"slurm\"\nslots_per_node = 0\n",
                "slots_per_node",
            ),
            (
                "[allocator]\nkind = \"slurm\"\npartition = \"-x\"\n",
                "not a Slurm name",
            ),
            (
                "[allocator]\nkind = \"slurm\"\n[allocator.nodes]\nn = \"h9\"\n",
                "neither this host",
            ),
            ("[allocator]\nkind = \"slurm\"\nbogus = 1\n", "Malformed"),
            ("ticket_ttl_s = 1\n", "ticket_ttl_s"),
        ] {
            let e = allocator(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // Slurm places clones on other hosts: it needs a cluster.
        let mut cfg = Config::default();
        let e = HostFile::parse("[allocator]\nkind = \"slurm\"\n", "t")
            .and_then(|f| cfg.apply_file(f, "t"))
            .unwrap_err();
        assert!(snowflock_proto::error::chain(&e).contains("needs this host in a cluster"));
    }

    /// What `snowflock cluster up` writes for host `i` of the 3-host cluster
    /// `ctest` with default settings (cli/src/cluster/host_config.rs; the
    /// CLI is a binary crate, so the values are repeated here).
    fn cli_host_file(i: u32, n: u32) -> HostFile {
        let ip = |j: u32| format!("10.249.0.{}", j + 1);
        HostFile {
            host: Some(format!("h{i}")),
            socket: Some(format!("/run/snowflock/ctest/h{i}/snowflockd.sock").into()),
            state_dir: Some(format!("/dev/shm/snowflock-ctest/h{i}").into()),
            listen: Some(format!("{}:7170", ip(i)).parse().unwrap()),
            page_server: Some(format!("{}:7171", ip(i)).parse().unwrap()),
            key_file: Some("/run/snowflock/ctest/key".into()),
            max_vms: Some(16),
            quota_per_vm: Some(32),
            fetch_timeout_ms: Some(10_000),
            prefetch_pages: Some(0),
            mcast: Some(true),
            peers: (0..n)
                .filter(|j| *j != i)
                .map(|j| Peer {
                    name: format!("h{j}"),
                    addr: format!("{}:7170", ip(j)).parse().unwrap(),
                })
                .collect(),
            ..HostFile::default()
        }
    }

    #[test]
    fn the_clis_files_for_three_hosts_are_accepted() {
        let mut clusters = Vec::new();
        for i in 0..3 {
            let text = cli_host_file(i, 3).to_toml();
            let mut cfg = Config::default();
            HostFile::parse(&text, "t")
                .and_then(|f| cfg.apply_file(f, "t"))
                .unwrap_or_else(|e| panic!("{}\n{text}", snowflock_proto::error::chain(&e)));
            assert_eq!(cfg.host, format!("h{i}"));
            assert_eq!(cfg.max_vms, 16);
            assert_eq!(cfg.quota_per_ticket, 32);
            assert_eq!(
                cfg.state_dir,
                PathBuf::from(format!("/dev/shm/snowflock-ctest/h{i}"))
            );
            let c = cfg.cluster.unwrap();
            assert_eq!(c.slot(&cfg.host), (i, 3));
            assert_eq!(c.peers.len(), 2);
            assert!(c.peer(&cfg.host).is_none());
            assert_eq!(c.key_file, PathBuf::from("/run/snowflock/ctest/key"));
            assert_eq!(c.fetch_timeout, Duration::from_secs(10));
            assert_eq!(c.page_server.port(), c.listen.port() + 1);
            assert_eq!(c.mcast.map(|m| m.port), Some(MCAST_PORT));
            assert_eq!(
                c.mcast_iface(),
                Some(Ipv4Addr::new(10, 249, 0, i as u8 + 1))
            );
            clusters.push(c);
        }
        // Each host's peers are the others, at their own listen addresses.
        for c in &clusters {
            for p in &c.peers {
                let j: usize = p.name[1..].parse().unwrap();
                assert_eq!(p.addr, clusters[j].listen);
            }
        }
    }
}
