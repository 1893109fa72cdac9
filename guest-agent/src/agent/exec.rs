//! `snowflock vm exec`: processes the host runs in the guest.
//!
//! ```text
//!  agent                                   snowflockd
//!    |<-------- ExecStart{exec, argv, env} ----|
//!    |--- ExecOutput{exec, stream, data} ----->|   chunks of <= MAX_CHUNK bytes
//!    |<-------- ExecStdin{exec, data, eof} ----|
//!    |<-------- ExecKill{exec} ----------------|   SIGKILL to its process group
//!    |--- ExecExit{exec, code} --------------->|   or ExecError if it never started
//! ```
//!
//! Each process gets its own process group, a stdin writer thread, two
//! output reader threads and a waiter. `ExecExit` follows the last output,
//! except when a background descendant keeps the pipes open: then it goes
//! out [`DRAIN_GRACE`] after the process exited, and later output still
//! streams. The agent's port and API socket are close-on-exec, so exec'd
//! processes never inherit them. A VM clone keeps every session running and
//! streaming in the clone too; the host ignores what it no longer expects.

use super::{lock, Agent};
use snowflock_proto::channel::{GuestMsg, Stream, MAX_CHUNK};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How long `ExecExit` waits for the output pipes to close after the
/// process itself exited.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

enum StdinCmd {
    Data(Vec<u8>),
    Eof,
}

struct Session {
    pid: i32,
    /// Set once the process was reaped; its pid may be reused after that.
    reaped: bool,
    stdin: mpsc::Sender<StdinCmd>,
}

/// Running exec sessions by id.
#[derive(Default)]
pub struct Execs {
    map: Mutex<HashMap<u64, Session>>,
}

impl Execs {
    /// Queues stdin data (and optionally end of file) for `exec`.
    pub fn stdin(&self, exec: u64, data: Vec<u8>, eof: bool) {
        let map = lock(&self.map);
        let Some(s) = map.get(&exec) else {
            tracing::debug!("Stdin for unknown exec {exec} dropped");
            return;
        };
        if !data.is_empty() {
            let _ = s.stdin.send(StdinCmd::Data(data));
        }
        if eof {
            let _ = s.stdin.send(StdinCmd::Eof);
        }
    }

    /// SIGKILLs the process group of `exec`.
    pub fn kill(&self, exec: u64) {
        use nix::sys::signal::{kill, killpg, Signal};
        use nix::unistd::Pid;
        let map = lock(&self.map);
        match map.get(&exec) {
            Some(s) if !s.reaped => {
                let pid = Pid::from_raw(s.pid);
                let _ = killpg(pid, Signal::SIGKILL);
                // In case it left its group (setsid).
                let _ = kill(pid, Signal::SIGKILL);
            }
            _ => tracing::debug!("Kill for unknown or finished exec {exec} ignored"),
        }
    }

    /// Number of sessions not yet reported as exited.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// True when no session runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Describes an OS error without Rust's " (os error N)" suffix.
fn describe(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// Starts `argv` for the host as session `exec`.
pub fn start(agent: &Arc<Agent>, exec: u64, argv: Vec<String>, env: Vec<(String, String)>) {
    let fail = |message: String| {
        tracing::warn!("Exec {exec} not started: {message}");
        agent
            .chan
            .send_or_log(&GuestMsg::ExecError { exec, message });
    };
    let Some(prog) = argv.first() else {
        return fail("Empty command".into());
    };
    if lock(&agent.execs.map).contains_key(&exec) {
        return fail(format!("Exec {exec} is already running"));
    }
    let spawned = Command::new(prog)
        .args(&argv[1..])
        .env_remove(super::service::NOTIFY_ENV)
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return fail(format!("{}: {prog}", describe(&e))),
    };
    let pid = child.id() as i32;
    tracing::info!("Exec {exec} started: pid {pid}, {argv:?}");
    let (stdin_tx, stdin_rx) = mpsc::channel();
    lock(&agent.execs.map).insert(
        exec,
        Session {
            pid,
            reaped: false,
            stdin: stdin_tx,
        },
    );

    let mut stdin = child.stdin.take();
    spawn(&format!("exec{exec}-in"), move || {
        for cmd in stdin_rx {
            match cmd {
                StdinCmd::Data(d) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&d).is_err() {
                            stdin = None; // EPIPE: the process closed its stdin.
                        }
                    }
                }
                StdinCmd::Eof => stdin = None,
            }
        }
    });

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut readers = 0;
    let outputs: [(Stream, Option<Box<dyn Read + Send>>); 2] = [
        (
            Stream::Stdout,
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ),
        (
            Stream::Stderr,
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ),
    ];
    for (stream, pipe) in outputs {
        let Some(mut pipe) = pipe else { continue };
        let a = agent.clone();
        let done = done_tx.clone();
        if spawn(&format!("exec{exec}-out"), move || {
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => a.chan.send_or_log(&GuestMsg::ExecOutput {
                        exec,
                        stream,
                        data: buf[..n].to_vec(),
                    }),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        }) {
            readers += 1;
        }
    }
    drop(done_tx);

    let a = agent.clone();
    let waiter = spawn(&format!("exec{exec}-wait"), move || {
        let code = match child.wait() {
            Ok(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
            Err(e) => {
                tracing::warn!("Waiting for exec {exec} failed: {e}");
                -1
            }
        };
        if let Some(s) = lock(&a.execs.map).get_mut(&exec) {
            s.reaped = true;
        }
        let deadline = Instant::now() + DRAIN_GRACE;
        for _ in 0..readers {
            let left = deadline.saturating_duration_since(Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                tracing::info!(
                    "Exec {exec}: output still open after exit (a background process holds it)"
                );
                break;
            }
        }
        lock(&a.execs.map).remove(&exec);
        tracing::info!("Exec {exec} exited with code {code}");
        a.chan.send_or_log(&GuestMsg::ExecExit { exec, code });
    });
    if !waiter {
        // Without a waiter nobody would reap or report it: stop it now.
        agent.execs.kill(exec);
        lock(&agent.execs.map).remove(&exec);
        fail("Cannot start a thread for the process".into());
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> bool {
    match std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 * 1024)
        .spawn(f)
    {
        Ok(_) => true,
        Err(e) => {
            tracing::error!("Cannot start thread {name}: {e}");
            false
        }
    }
}
