//! Start-up: the daemon's parts wired together, and the main loop.

use crate::frontends;
use crate::host::config;
use crate::lifecycle::daemon::{Daemon, Parts};
use snowflock_proto::error::chain;

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another daemon answers on the socket.
    #[error("A snowflockd is already running on {0}")]
    AlreadyRunning(String),
    /// Another daemon holds the state directory.
    #[error("State directory {0} is in use by another snowflockd")]
    StateInUse(String),
    /// The cluster configuration cannot be used.
    #[error("{0}")]
    Cluster(String),
    /// The socket or state directory cannot be set up.
    #[error("Cannot set up {what}")]
    Setup {
        what: String,
        #[source]
        err: std::io::Error,
    },
}

fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let path = dir.join(".lock");
    let f = std::fs::File::create(&path).map_err(|err| StartError::Setup {
        what: path.display().to_string(),
        err,
    })?;
    if !crate::host::sys::try_lock(&f) {
        return Err(StartError::StateInUse(dir.display().to_string()));
    }
    Ok(f)
}

/// Loads the cluster key, starts the page server, mounts memtap and binds
/// the control listener, for a host configured as part of a cluster.
type Control = (
    tokio::net::TcpListener,
    std::sync::Arc<snowflock_proto::auth::ClusterKey>,
);

async fn parts(cfg: &config::Config) -> Result<(Parts, Option<Control>), StartError> {
    let mut parts = Parts::host(frontends::guest::link);
    let Some(c) = &cfg.cluster else {
        return Ok((parts, None));
    };
    let key = snowflock_proto::auth::ClusterKey::load(&c.key_file)
        .map_err(|e| StartError::Cluster(chain(&e)))?;
    let key = std::sync::Arc::new(key);
    let control = tokio::net::TcpListener::bind(c.listen)
        .await
        .map_err(|err| StartError::Setup {
            what: format!("control listener on {}", c.listen),
            err,
        })?;
    // The same groups, port and interface for sending (page server) and
    // joining (memtap).
    let mcast = c.mcast.map(|m| dom0_memtap::mcast::McastConfig {
        port: m.port,
        iface: c.mcast_iface(),
        max_rate: m.max_rate,
    });
    let server_cfg = dom0_memtap::server::ServerConfig {
        mcast: mcast.clone(),
        ..Default::default()
    };
    let pages = dom0_memtap::server::PageServer::start_with(c.page_server, key.clone(), server_cfg)
        .map_err(|err| StartError::Setup {
            what: format!("page server on {}", c.page_server),
            err,
        })?;
    if let Some(dir) = &c.fault_trace_dir {
        std::fs::create_dir_all(dir).map_err(|err| StartError::Setup {
            what: format!("fault trace directory {}", dir.display()),
            err,
        })?;
    }
    let mut memtap_cfg = dom0_memtap::MemtapConfig::new(
        cfg.state_dir.join("memtap"),
        cfg.memcache_dir(),
        key.clone(),
    );
    memtap_cfg.fetch_timeout = c.fetch_timeout;
    memtap_cfg.prefetch_pages = c.prefetch_pages;
    memtap_cfg.prefetch_siblings = c.prefetch_siblings;
    memtap_cfg.mcast = mcast.clone();
    memtap_cfg.cache_limit = c.memcache_limit;
    memtap_cfg.completion_rate = c.completion_rate;
    memtap_cfg.trace_dir = c.fault_trace_dir.clone();
    let memtap = dom0_memtap::Memtap::mount(memtap_cfg)
        .map_err(|e| StartError::Cluster(format!("cannot mount memtap: {}", chain(&e))))?;
    match &mcast {
        Some(m) => {
            tracing::info!(port = m.port, iface = ?m.iface, max_rate = m.max_rate, "pages multicast to the hosts of each generation")
        }
        None => tracing::info!("multicast off (mcast = false): pages by unicast only"),
    }
    tracing::info!(listen = %c.listen, page_server = %c.page_server, peers = c.peers.len(), "cluster host");
    parts.peers = std::sync::Arc::new(crate::cluster::tcp::TcpPeers::new(c.clone(), key.clone()));
    parts.alloc = match &cfg.allocator {
        config::Allocator::Static => {
            std::sync::Arc::new(crate::alloc::fixed::FixedSlots::new(parts.peers.clone()))
        }
        config::Allocator::Slurm(s) => {
            std::sync::Arc::new(crate::alloc::slurm::SlurmAllocator::new(
                s.clone(),
                &cfg.host,
                cfg.max_vms,
                parts.peers.clone(),
            ))
        }
    };
    tracing::info!(
        allocator = parts.alloc.kind(),
        "tickets granted by this allocator"
    );
    parts.key = Some(key.clone());
    parts.memtap = Some(memtap);
    parts.pages = Some(pages);
    Ok((parts, Some((control, key))))
}

/// Runs the daemon until `Shutdown` or SIGTERM/SIGINT; stops every VM before
/// returning.
pub async fn run(cfg: config::Config) -> Result<(), StartError> {
    let setup = |what: String| move |err| StartError::Setup { what, err };
    if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
        return Err(StartError::AlreadyRunning(cfg.socket.display().to_string()));
    }
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir).map_err(setup(dir.display().to_string()))?;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    std::fs::create_dir_all(cfg.state_dir.join("vms"))
        .map_err(setup(cfg.state_dir.display().to_string()))?;
    // One daemon per state directory: a second one would delete the first's
    // live VMs as "leftovers". The lock lives as long as `_lock`.
    let _lock = lock_state_dir(&cfg.state_dir)?;
    // Leftovers of a crashed daemon: its QEMUs died with it (PDEATHSIG).
    let _ = std::fs::remove_dir_all(cfg.state_dir.join("gens"));
    let _ = std::fs::remove_dir_all(cfg.state_dir.join("vms"));
    std::fs::create_dir_all(cfg.state_dir.join("vms"))
        .map_err(setup(cfg.state_dir.display().to_string()))?;
    let listener = tokio::net::UnixListener::bind(&cfg.socket)
        .map_err(setup(cfg.socket.display().to_string()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o600));
    // memtap deletes its own stale cache files from the cache directory.
    let (parts, control) = parts(&cfg).await?;
    let d = Daemon::new(cfg, parts);
    let stale = d.net.remove_stale_links(&d.names);
    if !stale.is_empty() {
        tracing::warn!(links = ?stale, "removed links left by an earlier snowflockd");
    }
    tracing::info!(host = %d.cfg.host, socket = %d.cfg.socket.display(), state = %d.cfg.state_dir.display(), "snowflockd started");
    let server = tokio::spawn(frontends::admin::serve(d.clone(), listener));
    let control = control.map(|(l, key)| tokio::spawn(frontends::peer::serve(d.clone(), l, key)));
    let allocations = tokio::spawn(crate::lifecycle::allocations::keep(d.clone()));
    if let Some(m) = &d.memtap {
        {
            let rx = m.events();
            let d2 = d.clone();
            let handle = tokio::runtime::Handle::current();
            std::thread::Builder::new()
                .name("memtap-events".into())
                .spawn(move || crate::lifecycle::supervise::watch_memtap(d2, rx, handle))
                .map_err(setup("memtap event thread".into()))?;
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(setup("signal handler".into()))?;
    let mut shutdown = d.shutdown.subscribe();
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        _ = crate::lifecycle::daemon::wait_until(&mut shutdown, |s| *s) => {},
    }
    d.stop_all().await;
    d.shutdown.send_replace(true);
    let _ = allocations.await;
    let _ = server.await;
    if let Some(c) = control {
        let _ = c.await;
    }
    let _ = std::fs::remove_file(&d.cfg.socket);
    let _ = std::fs::remove_dir_all(d.cfg.state_dir.join("gens"));
    let _ = std::fs::remove_dir(d.cfg.state_dir.join("vms"));
    let _ = std::fs::remove_file(d.cfg.state_dir.join(".lock"));
    let _ = std::fs::remove_dir(&d.cfg.state_dir);
    tracing::info!("snowflockd stopped");
    Ok(())
}
