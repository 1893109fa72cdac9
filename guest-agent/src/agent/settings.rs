//! The sysadmin's `agent.toml` in the running agent, and the pid file.
//!
//! * At start the agent writes its pid to `<state dir>/agent.pid`
//!   (`/run/snowflock/agent.pid`), loads `agent.toml` and applies its
//!   `[balloon]` table (free page reporting on or off, reporting order).
//! * On `SIGHUP` it loads the file again and re-applies `[balloon]`. The
//!   signal is blocked in every agent thread from the first line of `main`
//!   and taken with `sigwait` by the `settings` thread: no signal handler,
//!   no `EINTR` in the threads doing blocking I/O, and a `SIGHUP` sent
//!   before the thread runs stays pending, not lost. (Processes the agent
//!   starts get an empty signal mask: `std::process::Command` resets it.)
//! * The pre-clone hooks read the `[hooks]` table afresh at every clone
//!   ([`hooks_for_clone`]), so hook changes need no signal.
//! * `[network] interface` is the interface a clone's MAC and IP go to;
//!   it is read at start and on `SIGHUP` like `[balloon]`. (The boot
//!   identity, [`super::boot`], reads it once before this thread starts.)
//!
//! Each table is parsed on its own. A table with a mistake is logged and
//! the previous good one is kept (for `[balloon]`: nothing is changed); a
//! missing file means the defaults.

use super::{lock, Agent};
use allocator_hooks::{BalloonConfig, Config, HookConfig};
use nix::sys::signal::{SigSet, Signal};
use snowflock_proto::error::chain;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Name of the pid file in the state directory.
pub const PID_FILE: &str = "agent.pid";

fn sighup_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGHUP);
    set
}

/// Blocks `SIGHUP` in the calling thread and so in every thread it starts
/// afterwards. Must run before the agent starts any thread.
pub fn block_sighup() {
    if let Err(e) = sighup_set().thread_block() {
        // Without the mask SIGHUP would kill the agent: say so loudly.
        eprintln!("snowflock-agent: cannot block SIGHUP: {e}");
    }
}

/// Writes this process's pid to `dir/agent.pid` (atomically: a reader never
/// sees a partial file). Returns the path.
pub fn write_pid_file(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(PID_FILE);
    let tmp = dir.join(format!("{PID_FILE}.tmp"));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Loads and applies the settings now, then again on every `SIGHUP`, on a
/// thread of its own.
pub fn spawn(agent: Arc<Agent>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("settings".into())
        .spawn(move || {
            reload(&agent, "start");
            let set = sighup_set();
            loop {
                match set.wait() {
                    Ok(Signal::SIGHUP) => reload(&agent, "SIGHUP"),
                    Ok(other) => tracing::debug!("Ignoring {other}"),
                    Err(e) => {
                        tracing::error!("sigwait failed: {e}; SIGHUP reloads are off");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

/// Loads `agent.toml`, keeps each good table as the current settings and
/// applies `[balloon]`. `why` is for the log.
pub fn reload(agent: &Agent, why: &str) {
    let path = &agent.cfg.config_file;
    let tables = match Config::load_tables(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(
                "Settings not loaded ({why}), keeping the previous ones: {}",
                chain(&e).trim_end()
            );
            return;
        }
    };
    if !tables.found {
        tracing::info!(
            "{} does not exist ({why}): default settings",
            path.display()
        );
    }
    let balloon = {
        let mut cur = lock(&agent.settings);
        match tables.hooks {
            Ok(h) => cur.hooks = h,
            Err(e) => tracing::warn!(
                "[hooks] not loaded ({why}), keeping {:?}: {}",
                cur.hooks,
                chain(&e).trim_end()
            ),
        }
        match tables.network {
            Ok(n) => cur.network = n,
            Err(e) => tracing::warn!(
                "[network] not loaded ({why}), keeping interface {}: {}",
                cur.network.interface,
                chain(&e).trim_end()
            ),
        }
        match tables.balloon {
            Ok(b) => {
                cur.balloon = b;
                Some(b)
            }
            Err(e) => {
                tracing::warn!(
                    "[balloon] not applied ({why}), free page reporting left as it is: {}",
                    chain(&e).trim_end()
                );
                None
            }
        }
    };
    tracing::info!("Settings loaded ({why}): {:?}", agent.settings());
    if let Some(b) = balloon {
        apply_balloon(agent, &b);
    }
}

/// Applies a `[balloon]` table under the agent's sysfs root and logs the
/// outcome; never fails.
fn apply_balloon(agent: &Agent, b: &BalloonConfig) {
    let Some(root) = &agent.cfg.sysfs else {
        tracing::info!("Test mode: [balloon] {b:?} not applied (SNOWFLOCK_AGENT_SYSFS is not set)");
        return;
    };
    let report = allocator_hooks::apply_balloon(b, root);
    for step in &report.steps {
        tracing::info!("Free page reporting: {step}");
    }
    for f in &report.failed {
        tracing::warn!("Free page reporting: {f}");
    }
    match report.order {
        Some(o) => tracing::info!("Free page reporting order is {o}"),
        None => tracing::debug!("page_reporting_order is not readable"),
    }
}

/// The hooks for a clone starting now: `[hooks]` read from the file at this
/// moment (defaults if it is missing); if it cannot be read or parsed, the
/// last good table.
pub fn hooks_for_clone(agent: &Agent) -> HookConfig {
    match HookConfig::try_load(&agent.cfg.config_file) {
        Ok(Some(h)) => h,
        Ok(None) => HookConfig::default(),
        Err(e) => {
            let h = agent.settings().hooks;
            tracing::warn!(
                "Using the last good [hooks] {h:?}: {}",
                chain(&e).trim_end()
            );
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_is_written_whole() {
        let dir = std::env::temp_dir().join(format!("sf-pid-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = write_pid_file(&dir.join("sub")).unwrap();
        assert_eq!(p, dir.join("sub").join(PID_FILE));
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{}\n", std::process::id())
        );
        assert!(!dir.join("sub").join("agent.pid.tmp").exists());
        // Overwrites a stale file.
        std::fs::write(&p, "1\n").unwrap();
        write_pid_file(&dir.join("sub")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap().trim(),
            std::process::id().to_string()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
