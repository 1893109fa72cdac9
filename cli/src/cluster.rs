//! `snowflock cluster up|down|status`: a local test cluster on this machine.
//!
//! N "physical hosts" `h0`..`h{N-1}`, each a network namespace `NAME-hI`
//! with its own `snowflockd`, joined by a bridge `fab` in the fabric
//! namespace `NAME-fab`. Every host gets one veth (`hI` on the bridge,
//! `fab0` with `10.249.0.(I+1)/24` in the host). Nothing in the root
//! namespace gets an address or a route into them.
//!
//! Files: `/run/snowflock/NAME/` holds `cluster.json`, the cluster `key` and
//! per host `hI/host.toml`, `hI/snowflockd.sock`, `hI/snowflockd.log`;
//! state directories are `/dev/shm/snowflock-NAME/hI`. `host.toml` is the
//! daemon's own configuration format (see docs/deploy.md): a local cluster
//! is N real host configurations, only the network is simulated.

use crate::client::Client;
use crate::daemon_ctl;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use snowflock_proto::admin::{AdminRequest, AdminResponse, DaemonStatus};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Cluster name when none is given.
pub const DEFAULT_NAME: &str = "sfc";
/// Most hosts of a local cluster.
pub const MAX_HOSTS: u32 = 32;
/// Hosts when `--hosts` is not given.
pub const DEFAULT_HOSTS: u32 = 4;
/// Daemon-to-daemon control channel port.
pub const CONTROL_PORT: u16 = 7170;
/// Memory page server port.
pub const PAGE_PORT: u16 = 7171;
/// MTU of the fabric links: room for VXLAN (50 bytes) around 1500-byte frames.
pub const FABRIC_MTU: u32 = 1600;

const CONFIG_ROOT: &str = "/run/snowflock";
const NETNS_DIR: &str = "/run/netns";
const FABRIC_BRIDGE: &str = "fab";
const HOST_LINK: &str = "fab0";
/// How long `up` waits for every daemon to answer (plus half a second per host).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `down` waits for the daemons to exit after `Shutdown`.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Cluster names: 1-8 of `[a-z0-9]`, so `NAME-h31` and the daemons' link
/// names stay within the kernel's 15 characters.
pub fn valid_name(name: &str) -> bool {
    (1..=8).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn check_name(name: &str) -> Result<()> {
    if !valid_name(name) {
        bail!("invalid cluster name {name:?}: use 1 to 8 characters of a-z and 0-9");
    }
    Ok(())
}

/// Names and paths of a cluster, derived from its name only.
#[derive(Debug, Clone)]
pub struct Layout {
    pub name: String,
}

impl Layout {
    pub fn new(name: &str) -> Result<Layout> {
        check_name(name)?;
        Ok(Layout { name: name.into() })
    }

    pub fn config_dir(&self) -> PathBuf {
        Path::new(CONFIG_ROOT).join(&self.name)
    }

    pub fn cluster_json(&self) -> PathBuf {
        self.config_dir().join("cluster.json")
    }

    pub fn key_file(&self) -> PathBuf {
        self.config_dir().join("key")
    }

    pub fn state_root(&self) -> PathBuf {
        PathBuf::from(format!("/dev/shm/snowflock-{}", self.name))
    }

    pub fn fabric_netns(&self) -> String {
        format!("{}-fab", self.name)
    }

    pub fn host_netns(&self, i: u32) -> String {
        format!("{}-h{i}", self.name)
    }

    /// Whether `ns` is one of this cluster's namespaces (`NAME-fab`, `NAME-h<digits>`).
    pub fn owns_netns(&self, ns: &str) -> bool {
        let Some(rest) = ns
            .strip_prefix(self.name.as_str())
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        rest == "fab"
            || rest
                .strip_prefix('h')
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    }

    /// What `cluster.json` says about host `i`, before its daemon runs.
    pub fn host(&self, i: u32) -> HostInfo {
        let name = host_name(i);
        let dir = self.config_dir().join(&name);
        HostInfo {
            netns: self.host_netns(i),
            ip: host_ip(i).to_string(),
            socket: dir.join("snowflockd.sock"),
            config: dir.join("host.toml"),
            log: dir.join("snowflockd.log"),
            pid: None,
            state_dir: self.state_root().join(&name),
            name,
        }
    }

    pub fn info(&self, hosts: u32) -> ClusterInfo {
        ClusterInfo {
            name: self.name.clone(),
            fabric_netns: self.fabric_netns(),
            key_file: self.key_file(),
            hosts: (0..hosts).map(|i| self.host(i)).collect(),
        }
    }
}

pub fn host_name(i: u32) -> String {
    format!("h{i}")
}

/// Host `i`'s address on the fabric.
pub fn host_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 249, 0, (i + 1) as u8)
}

/// `cluster.json`: what `cluster down` and `--host` need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub fabric_netns: String,
    pub key_file: PathBuf,
    pub hosts: Vec<HostInfo>,
}

/// One host of `cluster.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The daemon's pid (recorded when started; `down` signals only these).
    pub pid: Option<u32>,
    pub state_dir: PathBuf,
}

impl ClusterInfo {
    pub fn host(&self, name: &str) -> Result<&HostInfo> {
        match self.hosts.iter().find(|h| h.name == name) {
            Some(h) => Ok(h),
            None => {
                let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
                bail!(
                    "no host `{name}` in local cluster `{}` (its hosts: {})",
                    self.name,
                    names.join(", ")
                )
            }
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("Cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("Cannot write {}", path.display()))?;
        Ok(())
    }
}

/// Reads `/run/snowflock/NAME/cluster.json`.
pub fn load(name: &str) -> Result<ClusterInfo> {
    let l = Layout::new(name)?;
    let path = l.cluster_json();
    match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("Malformed {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "no local cluster `{name}`: run `snowflock cluster up{}`",
                name_flag(name)
            )
        }
        Err(e) => Err(e).with_context(|| format!("Cannot read {}", path.display())),
    }
}

fn name_flag(name: &str) -> String {
    if name == DEFAULT_NAME {
        String::new()
    } else {
        format!(" --name {name}")
    }
}

/// A client for host `host` of the local cluster `cluster`.
pub fn host_client(cluster: &str, host: &str) -> Result<Client> {
    let info = load(cluster)?;
    let h = info.host(host)?;
    Ok(client_for(&info, h))
}

fn client_for(info: &ClusterInfo, h: &HostInfo) -> Client {
    Client::with_hint(
        &h.socket,
        format!(
            "host {} of local cluster `{}` is down (see `snowflock cluster status{}`)",
            h.name,
            info.name,
            name_flag(&info.name)
        ),
    )
}

/// Host `h0` of the local cluster `cluster`, if that cluster exists.
pub fn first_host_client(cluster: &str) -> Option<(Client, String)> {
    let info = load(cluster).ok()?;
    let h = info.hosts.first()?;
    Some((client_for(&info, h), h.name.clone()))
}

/// Settings written into every host's `host.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub max_vms: u32,
    pub quota_per_vm: u32,
    pub fetch_timeout_ms: u64,
    pub prefetch_pages: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_vms: 16,
            quota_per_vm: 32,
            fetch_timeout_ms: 10_000,
            prefetch_pages: 0,
        }
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// The `host.toml` of host `i` of an `n`-host cluster.
pub fn render_host_toml(l: &Layout, i: u32, n: u32, s: &Settings) -> String {
    let h = l.host(i);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# snowflockd configuration of host {} of the local cluster `{}`",
        h.name, l.name
    );
    let _ = writeln!(
        t,
        "# (written by `snowflock cluster up`; see docs/deploy.md)."
    );
    let _ = writeln!(t, "host = {}", toml_str(&h.name));
    let _ = writeln!(t, "socket = {}", toml_path(&h.socket));
    let _ = writeln!(t, "state_dir = {}", toml_path(&h.state_dir));
    let _ = writeln!(
        t,
        "listen = \"{}:{CONTROL_PORT}\"        # daemon-to-daemon control channel",
        h.ip
    );
    let _ = writeln!(
        t,
        "page_server = \"{}:{PAGE_PORT}\"   # memory page server",
        h.ip
    );
    let _ = writeln!(t, "key_file = {}", toml_path(&l.key_file()));
    let _ = writeln!(t, "max_vms = {}", s.max_vms);
    let _ = writeln!(t, "quota_per_vm = {}", s.quota_per_vm);
    let _ = writeln!(t, "fetch_timeout_ms = {}", s.fetch_timeout_ms);
    let _ = writeln!(t, "prefetch_pages = {}", s.prefetch_pages);
    if n <= 1 {
        let _ = writeln!(t, "peers = []");
    }
    for j in (0..n).filter(|j| *j != i) {
        let _ = writeln!(
            t,
            "\n[[peers]]\nname = {}\naddr = \"{}:{CONTROL_PORT}\"",
            toml_str(&host_name(j)),
            host_ip(j)
        );
    }
    t
}

/// A new cluster key: 32 random bytes as 64 hex digits and a newline.
fn new_key() -> Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("Cannot read /dev/urandom")?;
    let mut s: String = b.iter().map(|x| format!("{x:02x}")).collect();
    s.push('\n');
    Ok(s)
}

fn write_key(path: &Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("Cannot create {}", path.display()))?;
    f.write_all(new_key()?.as_bytes())
        .with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(())
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("Cannot run `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Network namespaces of this cluster that exist now (hosts first, fabric last).
fn existing_netns(l: &Layout) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| l.owns_netns(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|n| (n.ends_with("-fab"), n.len(), n.clone()));
    v
}

/// Options of `cluster up`.
pub struct UpOpts {
    pub name: String,
    /// `None`: any size will do for an existing cluster; a new one gets [`DEFAULT_HOSTS`].
    pub hosts: Option<u32>,
    pub settings: Settings,
}

/// What `up` did.
pub struct Up {
    pub info: ClusterInfo,
    /// False when the cluster was already up.
    pub started: bool,
}

/// Probes every host's daemon; `None` for hosts that do not answer.
fn probe_all(info: &ClusterInfo) -> Vec<Option<DaemonStatus>> {
    info.hosts
        .iter()
        .map(
            |h| match Client::new(&h.socket).call_timeout(&AdminRequest::Status, PROBE_TIMEOUT) {
                Ok(AdminResponse::Status(s)) => Some(s),
                _ => None,
            },
        )
        .collect()
}

/// `snowflock cluster up`.
pub fn up(o: &UpOpts) -> Result<Up> {
    let l = Layout::new(&o.name)?;
    if let Some(n) = o.hosts {
        if !(1..=MAX_HOSTS).contains(&n) {
            bail!("--hosts must be 1 to {MAX_HOSTS}, got {n}");
        }
    }
    if o.settings.max_vms == 0 || o.settings.quota_per_vm == 0 {
        bail!("--max-vms and --quota-per-vm must be at least 1");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`snowflock cluster up` must run as root (it creates network namespaces)");
    }
    let redo = format!(
        "run `snowflock cluster down{}` first, then `cluster up` again",
        name_flag(&l.name)
    );
    if !l.config_dir().exists() {
        let leftovers: Vec<String> = existing_netns(&l)
            .into_iter()
            .chain(
                l.state_root()
                    .exists()
                    .then(|| l.state_root().display().to_string()),
            )
            .collect();
        if !leftovers.is_empty() {
            bail!(
                "leftovers of a local cluster `{}` exist ({}): {redo}",
                l.name,
                leftovers.join(", ")
            );
        }
    }
    std::fs::create_dir_all(CONFIG_ROOT).with_context(|| format!("Cannot create {CONFIG_ROOT}"))?;
    // Creating the config directory claims the name: a second `up` finds it.
    match std::fs::create_dir(l.config_dir()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return existing(&l, o.hosts, &redo)
        }
        Err(e) => {
            return Err(e).with_context(|| format!("Cannot create {}", l.config_dir().display()))
        }
    }
    let n = o.hosts.unwrap_or(DEFAULT_HOSTS);
    let mut info = l.info(n);
    match build(&l, &mut info, &o.settings) {
        Ok(()) => Ok(Up {
            info,
            started: true,
        }),
        Err(e) => {
            eprintln!(
                "cluster `{}`: start failed; removing what was created",
                l.name
            );
            if let Err(e2) = teardown(&l, Some(info), false) {
                eprintln!("cluster `{}`: cleanup incomplete: {e2:#}", l.name);
            }
            Err(e)
        }
    }
}

/// `up` for a name whose config directory exists.
fn existing(l: &Layout, hosts: Option<u32>, redo: &str) -> Result<Up> {
    let info = match load(&l.name) {
        Ok(i) => i,
        Err(_) => bail!(
            "local cluster `{}` is half-built ({} has no cluster.json; another `cluster up` may be running): {redo}",
            l.name,
            l.config_dir().display()
        ),
    };
    let down: Vec<&str> = info
        .hosts
        .iter()
        .zip(probe_all(&info))
        .filter(|(_, s)| s.is_none())
        .map(|(h, _)| h.name.as_str())
        .collect();
    if !down.is_empty() || info.hosts.is_empty() {
        bail!(
            "local cluster `{}` exists but is broken (daemons not answering: {}): {redo}",
            l.name,
            down.join(", ")
        );
    }
    if let Some(n) = hosts {
        if n as usize != info.hosts.len() {
            bail!(
                "local cluster `{}` is already up with {} hosts, not {n}: {redo}",
                l.name,
                info.hosts.len()
            );
        }
    }
    eprintln!(
        "local cluster `{}` is already up ({} hosts, all answering)",
        l.name,
        info.hosts.len()
    );
    Ok(Up {
        info,
        started: false,
    })
}

/// Creates namespaces, links, files and daemons; `info` gets the pids.
fn build(l: &Layout, info: &mut ClusterInfo, s: &Settings) -> Result<()> {
    let n = info.hosts.len() as u32;
    let dir = l.config_dir();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    write_key(&l.key_file())?;
    std::fs::create_dir_all(l.state_root())
        .with_context(|| format!("Cannot create {}", l.state_root().display()))?;
    info.save(&l.cluster_json())?;

    let fab = l.fabric_netns();
    let mtu = FABRIC_MTU.to_string();
    ip(&["netns", "add", &fab])?;
    ip(&["-n", &fab, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        &fab,
        "link",
        "add",
        FABRIC_BRIDGE,
        "mtu",
        &mtu,
        "type",
        "bridge",
    ])?;
    ip(&["-n", &fab, "link", "set", FABRIC_BRIDGE, "up"])?;
    for (i, h) in info.hosts.iter().enumerate() {
        let i = i as u32;
        let hn = &h.name;
        ip(&["netns", "add", &h.netns])?;
        ip(&[
            "-n", &fab, "link", "add", hn, "mtu", &mtu, "type", "veth", "peer", "name", HOST_LINK,
            "mtu", &mtu, "netns", &h.netns,
        ])?;
        ip(&["-n", &fab, "link", "set", hn, "master", FABRIC_BRIDGE, "up"])?;
        ip(&["-n", &h.netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &h.netns,
            "addr",
            "add",
            &format!("{}/24", h.ip),
            "dev",
            HOST_LINK,
        ])?;
        ip(&["-n", &h.netns, "link", "set", HOST_LINK, "up"])?;
        let hdir = h.config.parent().expect("host dir");
        std::fs::create_dir_all(hdir)
            .with_context(|| format!("Cannot create {}", hdir.display()))?;
        std::fs::create_dir_all(&h.state_dir)
            .with_context(|| format!("Cannot create {}", h.state_dir.display()))?;
        std::fs::write(&h.config, render_host_toml(l, i, n, s))
            .with_context(|| format!("Cannot write {}", h.config.display()))?;
    }
    eprintln!(
        "cluster `{}`: fabric {fab} with {n} host namespace(s) ready; starting daemons",
        l.name
    );

    let mut children = Vec::new();
    for idx in 0..info.hosts.len() {
        let child = spawn_daemon(&info.hosts[idx])?;
        info.hosts[idx].pid = Some(child.id());
        children.push(child);
        info.save(&l.cluster_json())?;
    }
    wait_ready(info, &mut children)
}

fn spawn_daemon(h: &HostInfo) -> Result<Child> {
    let logf = std::fs::File::create(&h.log)
        .with_context(|| format!("Cannot create {}", h.log.display()))?;
    let daemon = daemon_ctl::sibling_binary("snowflockd");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &h.netns])
        .arg(&daemon)
        .arg("--config")
        .arg(&h.config);
    // Plain text in the log file (its tail ends up in error messages).
    cmd.env("NO_COLOR", "1");
    cmd.stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    // SAFETY: setsid is async-signal-safe; the daemon outlives this CLI.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("Cannot start {} for {}", daemon.display(), h.name))
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn wait_ready(info: &ClusterInfo, children: &mut [Child]) -> Result<()> {
    let fail = |h: &HostInfo, what: String| -> anyhow::Error {
        let tail = log_tail(&h.log, 30);
        let tail = if tail.is_empty() {
            "(empty)".to_string()
        } else {
            tail
        };
        anyhow::anyhow!(
            "{}'s daemon {what}; the end of its log {}:\n{tail}",
            h.name,
            h.log.display()
        )
    };
    let timeout = START_TIMEOUT + Duration::from_millis(500) * info.hosts.len() as u32;
    let start = Instant::now();
    let mut ready = vec![false; info.hosts.len()];
    loop {
        for (i, h) in info.hosts.iter().enumerate() {
            if ready[i] {
                continue;
            }
            if let Some(st) = children[i].try_wait()? {
                return Err(fail(h, format!("exited ({st}) during start")));
            }
            if let Ok(AdminResponse::Status(s)) =
                Client::new(&h.socket).call_timeout(&AdminRequest::Status, PROBE_TIMEOUT)
            {
                if s.host != h.name {
                    return Err(fail(
                        h,
                        format!(
                            "calls itself `{}`, not `{}` (does this snowflockd read --config?)",
                            s.host, h.name
                        ),
                    ));
                }
                ready[i] = true;
                eprintln!(
                    "{} up (pid {}, {} in netns {})",
                    h.name, s.pid, h.ip, h.netns
                );
            }
        }
        if ready.iter().all(|r| *r) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            let i = ready.iter().position(|r| !r).unwrap_or(0);
            return Err(fail(
                &info.hosts[i],
                format!("did not answer within {} s", timeout.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The state letter of `/proc/PID/stat`, if the process exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_state(&stat)
}

fn parse_stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether `pid` runs (zombies do not; our own children get reaped).
fn alive(pid: u32) -> bool {
    // SAFETY: WNOHANG on one pid; harmless when it is not our child.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
    !matches!(proc_state(pid), None | Some('Z' | 'X'))
}

/// Whether `pid` is still the daemon of `h` (and not a recycled pid).
fn is_our_daemon(pid: u32, h: &HostInfo) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = h.config.as_os_str().as_encoded_bytes();
    alive(pid) && cmd.split(|b| *b == 0).any(|arg| arg == needle)
}

/// Mount points under any of `roots` in a mountinfo text, deepest first.
fn mounts_under(mountinfo: &str, roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| roots.iter().any(|r| m.starts_with(r)))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v.dedup();
    v
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `snowflock cluster down`: idempotent, also for half-built or crashed clusters.
pub fn down(name: &str) -> Result<()> {
    let l = Layout::new(name)?;
    let info = load(name).ok();
    teardown(&l, info, true)
}

/// Hosts to stop when `cluster.json` is missing: `hI` directories in the config dir.
fn hosts_from_dirs(l: &Layout) -> Vec<HostInfo> {
    let mut v: Vec<HostInfo> = std::fs::read_dir(l.config_dir())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| n.strip_prefix('h').and_then(|d| d.parse::<u32>().ok()))
                .filter(|i| *i < 256)
                .map(|i| l.host(i))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|h| (h.name.len(), h.name.clone()));
    v
}

fn teardown(l: &Layout, info: Option<ClusterInfo>, verbose: bool) -> Result<()> {
    let say = |msg: String| {
        if verbose {
            eprintln!("{msg}");
        }
    };
    let mut errors: Vec<String> = Vec::new();
    let mut removed = 0usize;
    let hosts = match &info {
        Some(i) => i.hosts.clone(),
        None => hosts_from_dirs(l),
    };

    // 1. Ask every daemon to stop its VMs and exit.
    // All at once: each daemon stops its VMs before it answers.
    let start = Instant::now();
    let asked: Vec<bool> = std::thread::scope(|sc| {
        let calls: Vec<_> = hosts
            .iter()
            .map(|h| {
                sc.spawn(move || {
                    Client::new(&h.socket)
                        .call_timeout(&AdminRequest::Shutdown, STOP_TIMEOUT)
                        .is_ok()
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().unwrap_or(false))
            .collect()
    });
    for (h, ok) in hosts.iter().zip(&asked) {
        if *ok {
            say(format!("{}: daemon shutting down", h.name));
            removed += 1;
        }
    }
    // 2. Wait (bounded) for the recorded pids of the daemons that took the
    // shutdown, then kill what is left of them; one that did not take it
    // (not answering, or still starting) is killed right away.
    let pids: Vec<(u32, &HostInfo, bool)> = hosts
        .iter()
        .zip(asked)
        .filter_map(|(h, ok)| h.pid.map(|p| (p, h, ok)))
        .filter(|(p, h, _)| is_our_daemon(*p, h))
        .collect();
    while pids.iter().any(|(p, _, ok)| *ok && alive(*p)) && start.elapsed() < STOP_TIMEOUT {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (pid, h, ok) in &pids {
        if is_our_daemon(*pid, h) {
            let why = if *ok {
                format!("still running after {} s", STOP_TIMEOUT.as_secs())
            } else {
                "not answering".into()
            };
            say(format!("{}: daemon pid {pid} {why}; killing it", h.name));
            // SAFETY: a pid recorded in cluster.json whose command line is still that daemon's.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            removed += 1;
        }
    }
    let start = Instant::now();
    while pids.iter().any(|(p, _, _)| alive(*p)) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (pid, h, _) in &pids {
        if alive(*pid) {
            errors.push(format!("{}'s daemon (pid {pid}) does not exit", h.name));
        }
    }
    // 3. Mounts the daemons left behind (visible in this mount namespace).
    let roots = [l.state_root(), l.config_dir()];
    for m in mounts_under(
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        &roots,
    ) {
        let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a valid C string; MNT_DETACH only detaches.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            say(format!("unmounted {}", m.display()));
            removed += 1;
        } else {
            errors.push(format!(
                "cannot unmount {}: {}",
                m.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    // 4. Namespaces (a host's veth goes with its namespace), hosts first.
    for ns in &existing_netns(l) {
        match ip(&["netns", "del", ns]) {
            Ok(()) => {
                say(format!("removed network namespace {ns}"));
                removed += 1;
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    // 5. Directories.
    for dir in [l.state_root(), l.config_dir()] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                say(format!("removed {}", dir.display()));
                removed += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("cannot remove {}: {e}", dir.display())),
        }
    }
    // Anything still running from this cluster is worth a word (not a kill:
    // only recorded daemon pids are ours to signal).
    let needles: Vec<String> = roots.iter().map(|r| format!("{}/", r.display())).collect();
    for (pid, cmd) in processes_mentioning(&needles) {
        say(format!(
            "warning: pid {pid} still runs and mentions this cluster: {cmd}"
        ));
    }
    if !errors.is_empty() {
        bail!(
            "cluster `{}` only partly removed:\n  {}",
            l.name,
            errors.join("\n  ")
        );
    }
    if removed == 0 {
        say(format!("no local cluster `{}`: nothing to remove", l.name));
    } else {
        say(format!("local cluster `{}` removed", l.name));
    }
    Ok(())
}

fn processes_mentioning(needles: &[String]) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || matches!(proc_state(pid), None | Some('Z' | 'X')) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if needles.iter().any(|n| cmd.contains(n.as_str())) {
            out.push((pid, cmd.trim_end().to_string()));
        }
    }
    out
}

/// Status of one host for `cluster status --json`.
#[derive(Serialize)]
struct HostStatus<'a> {
    #[serde(flatten)]
    host: &'a HostInfo,
    /// The daemon's answer; `null` when it is down.
    status: Option<DaemonStatus>,
}

/// `snowflock cluster status`.
pub fn status(name: &str, json: bool) -> Result<()> {
    let info = load(name)?;
    let st = probe_all(&info);
    if json {
        let hosts: Vec<HostStatus> = info
            .hosts
            .iter()
            .zip(st)
            .map(|(host, status)| HostStatus { host, status })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "name": info.name, "hosts": hosts })
            )?
        );
        return Ok(());
    }
    println!(
        "local cluster `{}` ({} hosts, fabric {})",
        info.name,
        info.hosts.len(),
        info.fabric_netns
    );
    println!(
        "{:<5} {:<14} {:<12} {:>8} {:<6} {:>4} {:>9}",
        "HOST", "NETNS", "IP", "PID", "STATE", "VMS", "UPTIME_S"
    );
    for (h, s) in info.hosts.iter().zip(st) {
        match s {
            Some(s) => println!(
                "{:<5} {:<14} {:<12} {:>8} {:<6} {:>4} {:>9}",
                h.name, h.netns, h.ip, s.pid, "up", s.vms, s.uptime_s
            ),
            None => println!(
                "{:<5} {:<14} {:<12} {:>8} {:<6} {:>4} {:>9}",
                h.name,
                h.netns,
                h.ip,
                h.pid.map_or("-".into(), |p| p.to_string()),
                "down",
                "-",
                "-"
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["sfc", "a", "12345678", "t0012x", "sfdemo"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "123456789", "Sfc", "s-c", "s_c", "s c", "é", "../x"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(Layout::new("a/b").is_err());
        // The longest names fit the kernel's 15-character interface names.
        let l = Layout::new("abcdefgh").unwrap();
        assert!(l.host_netns(MAX_HOSTS - 1).len() <= 15);
        assert!(l.fabric_netns().len() <= 15);
    }

    #[test]
    fn netns_ownership() {
        let l = Layout::new("sfc").unwrap();
        for yes in ["sfc-h0", "sfc-h12", "sfc-fab"] {
            assert!(l.owns_netns(yes), "{yes}");
        }
        for no in [
            "sfc-h", "sfc-hx", "sfc-h1a", "sfcx-h0", "sf-h0", "sfc-fabx", "sfc", "other-h0",
            "sfc-h0-x",
        ] {
            assert!(!l.owns_netns(no), "{no}");
        }
    }

    #[test]
    fn layout_paths_and_addresses() {
        let l = Layout::new("sfc").unwrap();
        let h = l.host(2);
        assert_eq!(h.name, "h2");
        assert_eq!(h.netns, "sfc-h2");
        assert_eq!(h.ip, "10.249.0.3");
        assert_eq!(h.socket, Path::new("/run/snowflock/sfc/h2/snowflockd.sock"));
        assert_eq!(h.config, Path::new("/run/snowflock/sfc/h2/host.toml"));
        assert_eq!(h.log, Path::new("/run/snowflock/sfc/h2/snowflockd.log"));
        assert_eq!(h.state_dir, Path::new("/dev/shm/snowflock-sfc/h2"));
        assert_eq!(l.key_file(), Path::new("/run/snowflock/sfc/key"));
        assert_eq!(l.fabric_netns(), "sfc-fab");
        assert_eq!(host_ip(MAX_HOSTS - 1), Ipv4Addr::new(10, 249, 0, 32));
    }

    #[test]
    fn host_toml_of_a_two_host_cluster() {
        let l = Layout::new("ctest").unwrap();
        let s = Settings {
            max_vms: 16,
            quota_per_vm: 32,
            fetch_timeout_ms: 10000,
            prefetch_pages: 0,
        };
        let t = render_host_toml(&l, 0, 2, &s);
        let body: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "host = \"h0\"",
                "socket = \"/run/snowflock/ctest/h0/snowflockd.sock\"",
                "state_dir = \"/dev/shm/snowflock-ctest/h0\"",
                "listen = \"10.249.0.1:7170\"        # daemon-to-daemon control channel",
                "page_server = \"10.249.0.1:7171\"   # memory page server",
                "key_file = \"/run/snowflock/ctest/key\"",
                "max_vms = 16",
                "quota_per_vm = 32",
                "fetch_timeout_ms = 10000",
                "prefetch_pages = 0",
                "",
                "[[peers]]",
                "name = \"h1\"",
                "addr = \"10.249.0.2:7170\"",
            ]
        );
    }

    #[test]
    fn host_toml_peers_are_the_other_hosts() {
        let l = Layout::new("sfc").unwrap();
        let s = Settings {
            max_vms: 3,
            quota_per_vm: 4,
            fetch_timeout_ms: 500,
            prefetch_pages: 7,
        };
        let t = render_host_toml(&l, 2, 4, &s);
        let peers: Vec<&str> = t.lines().filter(|x| x.starts_with("name = ")).collect();
        assert_eq!(peers, ["name = \"h0\"", "name = \"h1\"", "name = \"h3\""]);
        let addrs: Vec<&str> = t.lines().filter(|x| x.starts_with("addr = ")).collect();
        assert_eq!(
            addrs,
            [
                "addr = \"10.249.0.1:7170\"",
                "addr = \"10.249.0.2:7170\"",
                "addr = \"10.249.0.4:7170\""
            ]
        );
        assert_eq!(t.matches("[[peers]]").count(), 3);
        for line in [
            "host = \"h2\"",
            "max_vms = 3",
            "quota_per_vm = 4",
            "fetch_timeout_ms = 500",
            "prefetch_pages = 7",
        ] {
            assert!(t.lines().any(|x| x == line), "{line} missing in\n{t}");
        }
        // Scalars come before the first table, or TOML would put them in it.
        assert!(t.find("prefetch_pages").unwrap() < t.find("[[peers]]").unwrap());
        // A one-host cluster says so explicitly.
        let one = render_host_toml(&l, 0, 1, &s);
        assert!(one.lines().any(|x| x == "peers = []"));
        assert!(!one.contains("[[peers]]"));
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }

    #[test]
    fn cluster_json_round_trip() {
        let l = Layout::new("rt").unwrap();
        let mut info = l.info(3);
        info.hosts[1].pid = Some(4242);
        let text = serde_json::to_string_pretty(&info).unwrap();
        let back: ClusterInfo = serde_json::from_str(&text).unwrap();
        assert_eq!(back, info);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], "rt");
        assert_eq!(v["hosts"][1]["pid"], 4242);
        assert_eq!(v["hosts"][0]["pid"], serde_json::Value::Null);
        for k in [
            "name",
            "netns",
            "ip",
            "socket",
            "config",
            "log",
            "pid",
            "state_dir",
        ] {
            assert!(v["hosts"][2].get(k).is_some(), "hosts[].{k} missing");
        }
        assert_eq!(
            v["hosts"][2]["socket"],
            "/run/snowflock/rt/h2/snowflockd.sock"
        );
        assert!(back.host("h2").is_ok());
        let e = back.host("h7").unwrap_err().to_string();
        assert!(e.contains("h0, h1, h2"), "{e}");
    }

    #[test]
    fn keys_are_64_hex_digits() {
        let a = new_key().unwrap();
        let b = new_key().unwrap();
        assert_eq!(a.len(), 65);
        assert!(a.ends_with('\n'));
        assert!(a
            .trim_end()
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn mountinfo_filter() {
        let mi = "\
22 1 0:21 / /dev/shm rw - tmpfs tmpfs rw
90 22 0:50 / /dev/shm/snowflock-sfc/h0/fuse rw - fuse fuse rw
91 22 0:51 / /dev/shm/snowflock-sfc/h1/a\\040b rw - fuse fuse rw
92 22 0:52 / /dev/shm/snowflock-sfc rw - tmpfs tmpfs rw
93 22 0:53 / /dev/shm/snowflock-sfcx/h0 rw - tmpfs tmpfs rw
";
        let roots = [
            PathBuf::from("/dev/shm/snowflock-sfc"),
            PathBuf::from("/run/snowflock/sfc"),
        ];
        let m = mounts_under(mi, &roots);
        assert_eq!(
            m,
            [
                PathBuf::from("/dev/shm/snowflock-sfc/h0/fuse"),
                PathBuf::from("/dev/shm/snowflock-sfc/h1/a b"),
                PathBuf::from("/dev/shm/snowflock-sfc"),
            ]
        );
    }

    #[test]
    fn stat_state() {
        assert_eq!(parse_stat_state("12 (snow flockd) S 1 2 3"), Some('S'));
        assert_eq!(parse_stat_state("12 (a) b) Z 1"), Some('Z'));
        assert_eq!(parse_stat_state("garbage"), None);
    }
}
