//! `snowflockd` binary: parses arguments and runs the daemon.

use clap::Parser;
use std::path::PathBuf;

/// snowflock per-host daemon.
///
/// Settings come from the host configuration file (`--config`, default
/// `/etc/snowflock/host.toml` when it exists; see docs/deploy.md), and flags
/// given here override it.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Host configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Host name used in listings and descriptors.
    #[arg(long)]
    host: Option<String>,
    /// Admin socket [default: /run/snowflock/snowflockd.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// State directory, a tmpfs: it holds guest RAM [default: /dev/shm/snowflock].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Prefix for bridge and tap names (default: derived from the state
    /// directory, so daemons sharing a network namespace never touch each
    /// other's links).
    #[arg(long)]
    net_prefix: Option<String>,
    /// Most VMs on this host [default: 64].
    #[arg(long)]
    max_vms: Option<u32>,
    /// Most clones one VM may hold tickets for [default: 32].
    #[arg(long)]
    quota: Option<u32>,
    /// QEMU binary [default: qemu-system-x86_64].
    #[arg(long)]
    qemu: Option<PathBuf>,
}

fn config(
    a: Args,
) -> Result<snowflockd::host::config::Config, snowflockd::host::config::ConfigError> {
    use snowflockd::host::config::{net_prefix_for, Config, HostFile, HOST_CONFIG};
    let mut cfg = Config::default();
    cfg.net_prefix = net_prefix_for(&cfg.state_dir);
    let file = a.config.clone().or_else(|| {
        let p = PathBuf::from(HOST_CONFIG);
        p.exists().then_some(p)
    });
    if let Some(path) = file {
        let shown = path.display().to_string();
        HostFile::load(&path).and_then(|f| cfg.apply_file(f, &shown))?;
    }
    if let Some(s) = a.state_dir {
        cfg.net_prefix = net_prefix_for(&s);
        cfg.state_dir = s;
    }
    if let Some(p) = a.net_prefix {
        cfg.net_prefix = p;
    }
    if let Some(h) = a.host {
        cfg.host = h;
    }
    if let Some(s) = a.socket {
        cfg.socket = s;
    }
    if let Some(m) = a.max_vms {
        cfg.max_vms = m;
    }
    if let Some(q) = a.quota {
        cfg.quota_per_ticket = q;
    }
    if let Some(q) = a.qemu {
        cfg.qemu = q;
    }
    Ok(cfg)
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SNOWFLOCK_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = match config(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("snowflockd: error: {}", snowflock_proto::error::chain(&e));
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("snowflockd: error: cannot start runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(snowflockd::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snowflockd: error: {}", snowflock_proto::error::chain(&e));
            std::process::ExitCode::from(1)
        }
    }
}
