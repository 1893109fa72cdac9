//! `snowflock-agent`: the guest half of snowflock.
//!
//! ```text
//!  apps (sf, libsnowflock, python)          snowflockd (host)
//!        |  API socket, frames                    |  virtio-serial port, JSON lines
//!        v                                        v
//!   [api] one thread per connection  <---->  [host] reader thread + shared writer
//!        |   Id: answered locally                 |  Hello/Ping: answered at once
//!        |   SiblingExec: [relay] to a sibling    |
//!        |   others: Request{id} -> pending map <-|  Response{id}
//!        |                                        |  BecomeClone -> [identity] thread
//!        |                                        |  Exec* -> [exec] threads per process
//! ```
//!
//! Threads and blocking I/O only: a slow or hostile app blocks only its own
//! connection thread; the channel reader never blocks on an app.
//!
//! Options: `--boot-identity` makes the agent give the VM its identity
//! from the kernel command line once per boot ([`boot`]), for guests
//! booted by systemd where no rcS does it (the `snowflock-guest` package's
//! unit passes it). Under systemd the agent tells systemd when it is ready
//! ([`service`]).
//!
//! Environment (all optional):
//!
//! | variable | meaning |
//! |---|---|
//! | `SNOWFLOCK_AGENT_PORT` | the channel: a device/file path, or `unix:/path` to connect to a Unix socket (tests). Default: the virtio-serial port named [`snowflock_proto::AGENT_PORT_NAME`]. |
//! | `SNOWFLOCK_AGENT_SOCKET` | API socket path (default [`snowflock_proto::AGENT_SOCKET`]). `identity.json` is written next to it. |
//! | `SNOWFLOCK_AGENT_CONFIG` | config file (default `/etc/snowflock/agent.toml`); see [`settings`]. |
//! | `SNOWFLOCK_AGENT_SIBLING_PORT` | TCP port of the sibling runner ([`sibling`], `sf-exec`); default [`snowflock_proto::sibling::SIBLING_PORT`], `0` turns it off. |
//! | `SNOWFLOCK_AGENT_SIBLING_LISTEN` | **test only**: the address the sibling runner listens on (default all). |
//! | `SNOWFLOCK_LOG` | log filter (default `info`). |
//! | `SNOWFLOCK_AGENT_DRY_IDENTITY=1` | **test only**: log the identity changes of `BecomeClone` and `--boot-identity` instead of touching the RNG, clock, hostname, `/etc` and network. |
//! | `SNOWFLOCK_AGENT_CMDLINE` | **test only**: text used instead of `/proc/cmdline`. |
//! | `SNOWFLOCK_AGENT_SYSFS` | **test only**: sysfs root the `[balloon]` settings are applied under (default `/sys`). With `SNOWFLOCK_AGENT_DRY_IDENTITY=1` and no `SNOWFLOCK_AGENT_SYSFS`, they are logged, not applied. |
//!
//! The agent writes its pid to `agent.pid` next to the API socket
//! (`/run/snowflock/agent.pid`) and reloads `agent.toml` on `SIGHUP`
//! ([`settings`]).

pub mod api;
pub mod boot;
pub mod exec;
pub mod flock_key;
pub mod host;
pub mod identity;
pub mod port;
pub mod relay;
pub mod service;
pub mod settings;
pub mod sibling;
mod sys;

use snowflock_proto::api::ApiResponse;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long an API call waits for the host's `Hello` before failing.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Agent version reported in `GuestMsg::Hello`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `snowflock-agent` command line.
#[derive(Debug, clap::Parser)]
#[command(name = "snowflock-agent", version, about = "snowflock guest agent")]
pub struct Args {
    /// Once per boot, give the VM the identity on the kernel command line
    /// (sf.hostname, sf.machine_id, sf.mac, sf.ip), as the initramfs' rcS
    /// does: for guests booted by systemd.
    #[arg(long)]
    pub boot_identity: bool,
}

/// Where the agent reads its settings from; see the module doc.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub port: port::PortSpec,
    pub socket: PathBuf,
    pub config_file: PathBuf,
    pub dry_identity: bool,
    pub cmdline: String,
    /// Where `[balloon]` is applied: `/sys`, a fake tree (tests), or
    /// nowhere (dry test mode).
    pub sysfs: Option<PathBuf>,
    /// TCP port of the sibling runner (`sf-exec`); 0 turns it off.
    pub sibling_port: u16,
    /// Address the runner listens on: all (the flock address changes when
    /// a VM becomes a clone), or one loopback address in tests.
    pub sibling_listen: std::net::IpAddr,
}

impl AgentConfig {
    /// Reads the environment (and `/proc/cmdline`).
    pub fn from_env() -> AgentConfig {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let dry_identity = var("SNOWFLOCK_AGENT_DRY_IDENTITY").is_some_and(|v| v != "0");
        let sysfs = match var("SNOWFLOCK_AGENT_SYSFS") {
            Some(p) => Some(PathBuf::from(p)),
            None if dry_identity => None,
            None => Some(PathBuf::from(allocator_hooks::SYSFS)),
        };
        AgentConfig {
            port: port::PortSpec::parse(var("SNOWFLOCK_AGENT_PORT").as_deref()),
            socket: var(crate::client::SOCKET_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(snowflock_proto::AGENT_SOCKET)),
            config_file: var("SNOWFLOCK_AGENT_CONFIG")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(allocator_hooks::DEFAULT_CONFIG_PATH)),
            dry_identity,
            cmdline: var("SNOWFLOCK_AGENT_CMDLINE")
                .unwrap_or_else(|| std::fs::read_to_string("/proc/cmdline").unwrap_or_default()),
            sysfs,
            sibling_port: var("SNOWFLOCK_AGENT_SIBLING_PORT")
                .and_then(|p| p.parse().ok())
                .unwrap_or(snowflock_proto::sibling::SIBLING_PORT),
            sibling_listen: var("SNOWFLOCK_AGENT_SIBLING_LISTEN")
                .and_then(|a| a.parse().ok())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
        }
    }

    /// Directory for runtime state (`identity.json`, `agent.pid`): the API
    /// socket's.
    pub fn state_dir(&self) -> PathBuf {
        self.socket
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/snowflock"))
    }
}

/// State shared by every agent thread.
pub struct Agent {
    pub cfg: AgentConfig,
    pub chan: host::Channel,
    /// API calls sent to the host and not answered yet, by request id.
    pending: Mutex<HashMap<u64, mpsc::Sender<ApiResponse>>>,
    next_id: AtomicU64,
    pub identity: Mutex<identity::State>,
    pub execs: exec::Execs,
    /// Serialises `BecomeClone` handling.
    clone_lock: Mutex<()>,
    /// The last good `agent.toml` tables ([`settings`]).
    settings: Mutex<allocator_hooks::Config>,
    /// The secret shared by this VM's flock ([`flock_key`]), if it could
    /// be had; without it `sf-exec` is refused both ways.
    pub flock_key: Option<snowflock_proto::auth::ClusterKey>,
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Agent {
        let ident = identity::State::initial(&cfg);
        let flock_key = match flock_key::load_or_create(&cfg.state_dir()) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!(
                    "sf-exec is off: {}",
                    snowflock_proto::error::chain(&e).trim_end()
                );
                None
            }
        };
        Agent {
            flock_key,
            cfg,
            chan: host::Channel::new(),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            identity: Mutex::new(ident),
            execs: exec::Execs::default(),
            clone_lock: Mutex::new(()),
            settings: Mutex::new(allocator_hooks::Config::default()),
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, mpsc::Sender<ApiResponse>>> {
        lock(&self.pending)
    }

    /// Answers the pending request `id`, if an app still waits for it.
    pub(crate) fn answer(&self, id: u64, resp: ApiResponse) -> bool {
        match self.pending().remove(&id) {
            Some(tx) => tx.send(resp).is_ok(),
            None => false,
        }
    }

    /// Current identity snapshot.
    pub fn ident(&self) -> identity::State {
        lock(&self.identity).clone()
    }

    /// The settings last loaded from `agent.toml`.
    pub fn settings(&self) -> allocator_hooks::Config {
        lock(&self.settings).clone()
    }
}

/// Locks `m`, ignoring poisoning: agent state stays usable after a thread
/// panicked (none should).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Entry point of the `snowflock-agent` binary. Only returns on a fatal
/// start-up error.
pub fn main() -> std::process::ExitCode {
    // First, before any thread exists: every thread inherits the mask.
    settings::block_sighup();
    sys::cloexec_inherited_fds();
    let args = <Args as clap::Parser>::parse();
    init_logging();
    let cfg = AgentConfig::from_env();
    if cfg.dry_identity {
        tracing::warn!("SNOWFLOCK_AGENT_DRY_IDENTITY is set: clone identities will be logged, not applied (test mode)");
    }
    if args.boot_identity {
        boot::run(&cfg, &boot::interface(&cfg));
    }
    let agent = Arc::new(Agent::new(cfg));
    let id = agent.ident();
    tracing::info!(
        "snowflock-agent {AGENT_VERSION} starting: vm={} clone_id={} channel={} socket={}",
        id.vm,
        id.clone_id,
        agent.cfg.port,
        agent.cfg.socket.display()
    );
    if let Err(e) = api::spawn(agent.clone()) {
        tracing::error!("Cannot start the API server: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match settings::write_pid_file(&agent.cfg.state_dir()) {
        Ok(p) => tracing::info!("Pid {} written to {}", std::process::id(), p.display()),
        Err(e) => tracing::warn!("Cannot write the pid file: {e}"),
    }
    if let Some(key) = agent.flock_key.clone() {
        if let Err(e) = sibling::spawn(agent.clone(), key) {
            tracing::error!("Cannot start the sibling runner (sf-exec to this VM will fail): {e}");
        }
    }
    if let Err(e) = settings::spawn(agent.clone()) {
        tracing::error!("Cannot start the settings thread: {e}");
    }
    service::notify_ready();
    host::run(agent)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("SNOWFLOCK_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(filter)
        .try_init();
}
