//! `snowflock daemon start|stop|status`.

use crate::client::{Client, ClientError};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use snowflock_proto::admin::{AdminRequest, AdminResponse};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Written next to the socket so `stop` can finish what `start` began.
#[derive(Serialize, Deserialize)]
struct RunInfo {
    pid: u32,
    netns: Option<String>,
    created_netns: bool,
    log: String,
}

fn info_path(socket: &Path) -> PathBuf {
    socket.with_extension("json")
}

/// Options of `daemon start`.
pub struct StartOpts {
    pub netns: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub host: Option<String>,
    pub max_vms: Option<u32>,
    pub log: Option<PathBuf>,
}

/// Finds a sibling binary of this executable, else relies on PATH.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

pub fn start(client: &Client, o: StartOpts) -> Result<()> {
    if client.call(&AdminRequest::Status).is_ok() {
        eprintln!(
            "snowflockd is already running on {}",
            client.socket.display()
        );
        return Ok(());
    }
    let mut created_netns = false;
    if let Some(ns) = &o.netns {
        if !netns_exists(ns) {
            let st = Command::new("ip")
                .args(["netns", "add", ns])
                .status()
                .context("Cannot run `ip`")?;
            if !st.success() {
                bail!("Cannot create network namespace {ns}");
            }
            created_netns = true;
        }
    }
    let log = o.log.unwrap_or_else(|| client.socket.with_extension("log"));
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    let logf =
        std::fs::File::create(&log).with_context(|| format!("Cannot create {}", log.display()))?;
    let daemon = sibling_binary("snowflockd");
    let mut cmd = match &o.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&daemon);
            c
        }
        None => Command::new(&daemon),
    };
    cmd.arg("--socket").arg(&client.socket);
    if let Some(s) = &o.state_dir {
        cmd.arg("--state-dir").arg(s);
    }
    if let Some(h) = &o.host {
        cmd.arg("--host").arg(h);
    }
    if let Some(m) = o.max_vms {
        cmd.arg("--max-vms").arg(m.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    crate::sys::detach(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            if created_netns {
                remove_netns(o.netns.as_deref().unwrap_or_default());
            }
            return Err(e).with_context(|| format!("Cannot start {}", daemon.display()));
        }
    };
    let info = RunInfo {
        pid: child.id(),
        netns: o.netns.clone(),
        created_netns,
        log: log.display().to_string(),
    };
    std::fs::write(info_path(&client.socket), serde_json::to_vec(&info)?)?;
    let start = Instant::now();
    loop {
        if client.call(&AdminRequest::Status).is_ok() {
            eprintln!(
                "snowflockd started (pid {}, socket {}, log {})",
                child.id(),
                client.socket.display(),
                log.display()
            );
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            cleanup_after_exit(&client.socket);
            bail!(
                "snowflockd exited ({st}) during start:\n{}",
                tail.trim_end()
            );
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            cleanup_after_exit(&client.socket);
            bail!(
                "snowflockd did not answer within 15 s; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn remove_netns(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

fn cleanup_after_exit(socket: &Path) {
    if let Ok(b) = std::fs::read(info_path(socket)) {
        if let Ok(info) = serde_json::from_slice::<RunInfo>(&b) {
            if info.created_netns {
                if let Some(ns) = info.netns {
                    remove_netns(&ns);
                }
            }
        }
    }
    let _ = std::fs::remove_file(info_path(socket));
}

pub fn stop(client: &Client) -> Result<()> {
    let info: Option<RunInfo> = std::fs::read(info_path(&client.socket))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match client.call(&AdminRequest::Shutdown) {
        Ok(_) => {}
        Err(ClientError::NotRunning { .. }) => {
            cleanup_after_exit(&client.socket);
            eprintln!("snowflockd is not running");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    if let Some(info) = &info {
        let start = Instant::now();
        while crate::sys::exists(info.pid) && start.elapsed() < Duration::from_secs(30) {
            // Reap it if we happen to be its parent (same CLI process).
            crate::sys::reap(info.pid);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    cleanup_after_exit(&client.socket);
    eprintln!("snowflockd stopped");
    Ok(())
}

pub fn status(client: &Client, json: bool) -> Result<()> {
    match client.call(&AdminRequest::Status)? {
        AdminResponse::Status(s) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "snowflockd {} on host {}: pid {}, {} VMs, up {} s, accel {}, state {}",
                    s.version, s.host, s.pid, s.vms, s.uptime_s, s.accel, s.state_dir
                );
                if !s.allocator.is_empty() {
                    println!(
                        "tickets granted by the {} allocator; {} allocation(s) held",
                        s.allocator,
                        s.allocations.len()
                    );
                    for a in &s.allocations {
                        println!("  ticket {} = Slurm job {}", a.ticket, a.job);
                    }
                }
                for (k, v) in &s.counters {
                    println!("  {k:<24} {v}");
                }
            }
            Ok(())
        }
        other => bail!("Unexpected answer: {other:?}"),
    }
}
