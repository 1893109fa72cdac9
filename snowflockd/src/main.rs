//! `snowflockd` binary: parses arguments and runs the daemon.

use clap::Parser;
use std::path::PathBuf;

/// snowflock per-host daemon.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Host name used in listings and descriptors.
    #[arg(long)]
    host: Option<String>,
    /// Admin socket.
    #[arg(long, default_value = snowflock_proto::DAEMON_SOCKET)]
    socket: PathBuf,
    /// State directory (a tmpfs: it holds guest RAM).
    #[arg(long, default_value = "/dev/shm/snowflock")]
    state_dir: PathBuf,
    /// Prefix for bridge and tap names (default: derived from the state
    /// directory, so daemons sharing a network namespace never touch each
    /// other's links).
    #[arg(long)]
    net_prefix: Option<String>,
    /// Most VMs on this host.
    #[arg(long, default_value_t = 64)]
    max_vms: u32,
    /// Most clones per ticket.
    #[arg(long, default_value_t = 32)]
    quota: u32,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SNOWFLOCK_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let state_dir = a.state_dir;
    let mut cfg = snowflockd::config::Config {
        socket: a.socket,
        state_dir: state_dir.clone(),
        net_prefix: a.net_prefix.unwrap_or_else(|| snowflockd::config::net_prefix_for(&state_dir)),
        max_vms: a.max_vms,
        quota_per_ticket: a.quota,
        qemu: a.qemu,
        ..Default::default()
    };
    if let Some(h) = a.host {
        cfg.host = h;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("snowflockd: error: cannot start runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(snowflockd::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snowflockd: error: {}", snowflockd::admin::chain(&e));
            std::process::ExitCode::from(1)
        }
    }
}
