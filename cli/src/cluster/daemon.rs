//! One `snowflockd` per host: starting it in its namespace, waiting until it
//! answers, probing it, and stopping it (politely, then by its recorded pid).

use super::layout::{ClusterInfo, HostInfo};
use crate::client::Client;
use crate::daemon_ctl;
use anyhow::{Context, Result};
use snowflock_proto::admin::{AdminRequest, AdminResponse, DaemonStatus};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `up` waits for every daemon to answer (plus half a second per host).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `down` waits for the daemons to exit after `Shutdown`.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes every host's daemon; `None` for hosts that do not answer.
pub(super) fn probe_all(info: &ClusterInfo) -> Vec<Option<DaemonStatus>> {
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

/// Starts host `h`'s daemon in its namespace, in a session of its own
/// (it outlives this CLI), logging to its log file.
pub(super) fn spawn(h: &HostInfo) -> Result<Child> {
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
    crate::sys::detach(&mut cmd);
    cmd.spawn()
        .with_context(|| format!("Cannot start {} for {}", daemon.display(), h.name))
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until every daemon answers `Status` under its own host name;
/// fails with the end of its log when one exits or stays silent.
pub(super) fn wait_ready(info: &ClusterInfo, children: &mut [Child]) -> Result<()> {
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
    crate::sys::reap(pid);
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

/// Live processes whose command line contains one of `needles`, but this one.
pub(super) fn processes_mentioning(needles: &[String]) -> Vec<(u32, String)> {
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

/// Stops the daemons of `hosts`: asks each to shut down (all at once: each
/// stops its VMs before it answers), waits (bounded) for the recorded pids
/// of those that took it, then kills what is left of them; a daemon that
/// did not take it (not answering, or still starting) is killed right away.
/// Says what it does through `say`, adds what it could not do to `errors`
/// and returns how many daemons it stopped.
pub(super) fn stop_all(
    hosts: &[HostInfo],
    say: &dyn Fn(String),
    errors: &mut Vec<String>,
) -> usize {
    let mut removed = 0usize;
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
            // A pid recorded in cluster.json whose command line is still that daemon's.
            crate::sys::kill_now(*pid);
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
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_state() {
        assert_eq!(parse_stat_state("12 (snow flockd) S 1 2 3"), Some('S'));
        assert_eq!(parse_stat_state("12 (a) b) Z 1"), Some('Z'));
        assert_eq!(parse_stat_state("garbage"), None);
    }
}
