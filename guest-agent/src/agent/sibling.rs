//! The runner: commands a sibling's agent asks this VM to run (`sf-exec`
//! on the far side; the protocol is [`snowflock_proto::sibling`]).
//!
//! One thread accepts on `0.0.0.0:SIBLING_PORT`; each connection gets a
//! thread that:
//!
//! 1. drops peers whose address is outside this VM's flock network;
//! 2. runs the flock-key handshake as the server (a peer without the key
//!    gets nothing run);
//! 3. reads one [`Start`], runs `/bin/sh -c COMMAND` as its uid and gid
//!    (supplementary groups dropped), in its working directory or the
//!    user's home, with a login-like environment (`HOME`, `USER`,
//!    `LOGNAME`, `SHELL`, `PATH`), in a process group of its own;
//! 4. streams stdout and stderr, pings every [`PING_INTERVAL`], forwards
//!    stdin and signals, and sends the exit code last.
//!
//! A connection that drops before the command exited (its caller was
//! killed, or its VM is gone: TCP keepalive notices within ~15 s) gets the
//! command's process group a `SIGHUP`, then a `SIGKILL` [`HANGUP_GRACE`]
//! later, as a dropped ssh session does: nothing is left running for a
//! caller that is gone.

use super::{lock, Agent};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use snowflock_proto::auth::ClusterKey;
use snowflock_proto::frame;
use snowflock_proto::sibling::{
    same_flock, FromRunner, Start, ToRunner, MAX_COMMAND, PING_INTERVAL,
};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Connections served at once (each a command with its threads); more
/// are closed at once, so a flood from a sibling cannot use up the
/// agent's threads.
pub const MAX_SESSIONS: usize = 256;
/// Time allowed for the handshake and the `Start` frame.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Between the `SIGHUP` and the `SIGKILL` of an abandoned command.
pub const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// How long the exit code waits for the output pipes to close.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// `PATH` of the commands run.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Binds the runner's port and serves it on a background thread. Port 0
/// means off.
pub fn spawn(agent: Arc<Agent>, key: ClusterKey) -> std::io::Result<()> {
    let (addr, port) = (agent.cfg.sibling_listen, agent.cfg.sibling_port);
    if port == 0 {
        tracing::info!("Sibling runner off");
        return Ok(());
    }
    let listener = TcpListener::bind((addr, port))?;
    tracing::info!("Sibling runner listening on port {port}");
    let key = Arc::new(key);
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("sibling-accept".into())
        .spawn(move || {
            // One warning per burst of refusals, not one per connection.
            let mut warned = false;
            for conn in listener.incoming() {
                let s = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("Sibling accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
                    // Before the handshake nothing can be said to the
                    // peer in its protocol: the connection is just closed.
                    active.fetch_sub(1, Ordering::SeqCst);
                    if !warned {
                        tracing::warn!(
                            "Sibling connections closed: {MAX_SESSIONS} sessions already run"
                        );
                        warned = true;
                    }
                    drop(s);
                    continue;
                }
                warned = false;
                let (a, k, n) = (agent.clone(), key.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("sibling".into())
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        serve(&a, &k, s);
                        n.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    Ok(())
}

/// Sets TCP keepalive so a vanished peer is noticed in about 15 s.
pub fn keepalive(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::KeepAlive, &true);
    let _ = setsockopt(s, sockopt::TcpKeepIdle, &5);
    let _ = setsockopt(s, sockopt::TcpKeepInterval, &2);
    let _ = setsockopt(s, sockopt::TcpKeepCount, &5);
    let _ = s.set_nodelay(true);
}

/// Why a connection was not served.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("peer {0} is not in this VM's flock")]
    NotInFlock(String),
    #[error("handshake failed")]
    Auth(#[from] snowflock_proto::auth::AuthError),
    #[error("no start request")]
    Frame(#[from] snowflock_proto::frame::FrameError),
    #[error("{0}")]
    Refused(String),
}

fn serve(agent: &Agent, key: &ClusterKey, mut s: TcpStream) {
    let addr = s.peer_addr().map(|a| a.ip());
    let peer = addr.as_ref().map(|a| a.to_string()).unwrap_or_default();
    match addr
        .map_err(|e| RunError::Refused(e.to_string()))
        .and_then(|a| setup(agent, key, &mut s, a))
    {
        Ok(start) => run(start, s, &peer),
        Err(e) => {
            tracing::warn!(
                "Sibling request from {peer} not served: {}",
                snowflock_proto::error::chain(&e)
            );
            if let RunError::Refused(message) = e {
                let _ = frame::write_frame(&mut s, &FromRunner::Refused { message });
            }
        }
    }
}

fn setup(
    agent: &Agent,
    key: &ClusterKey,
    s: &mut TcpStream,
    peer: std::net::IpAddr,
) -> Result<Start, RunError> {
    if !same_flock(peer, agent.ident().ip_cidr().as_deref()) {
        return Err(RunError::NotInFlock(peer.to_string()));
    }
    keepalive(s);
    let _ = s.set_read_timeout(Some(SETUP_TIMEOUT));
    let _ = s.set_write_timeout(Some(SETUP_TIMEOUT));
    snowflock_proto::auth::server_blocking(s, key)?;
    let start: Start = frame::read_frame(s)?;
    if start.command.trim().is_empty() {
        return Err(RunError::Refused("empty command".into()));
    }
    if start.command.len() > MAX_COMMAND || start.command.contains('\0') {
        return Err(RunError::Refused(
            "command too long or with a NUL byte".into(),
        ));
    }
    let _ = s.set_read_timeout(None);
    let _ = s.set_write_timeout(None);
    Ok(start)
}

/// The environment and directory the command starts with.
fn login(start: &Start) -> (Vec<(String, String)>, String) {
    let user = nix::unistd::User::from_uid(start.uid.into()).ok().flatten();
    let (name, home, shell) = match &user {
        Some(u) => (
            u.name.clone(),
            u.dir.display().to_string(),
            u.shell.display().to_string(),
        ),
        None => (
            start.uid.to_string(),
            "/".to_string(),
            "/bin/sh".to_string(),
        ),
    };
    let cwd = [start.cwd.as_str(), home.as_str(), "/"]
        .into_iter()
        .find(|d| d.starts_with('/') && std::path::Path::new(d).is_dir())
        .unwrap_or("/")
        .to_string();
    let env = vec![
        ("HOME".into(), home),
        ("USER".into(), name.clone()),
        ("LOGNAME".into(), name),
        ("SHELL".into(), shell),
        ("PATH".into(), PATH.into()),
    ];
    (env, cwd)
}

type Writer = Arc<Mutex<TcpStream>>;

fn send(w: &Writer, msg: &FromRunner) -> bool {
    frame::write_frame(&mut *lock(w), msg).is_ok()
}

fn run(start: Start, s: TcpStream, peer: &str) {
    let (env, cwd) = login(&start);
    let spawned = s.try_clone().map_err(|e| e.to_string()).and_then(|w| {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(&start.command)
            .env_clear()
            .envs(env)
            .current_dir(&cwd)
            .uid(start.uid)
            .gid(start.gid)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map(|c| (c, w))
            .map_err(|e| format!("cannot start /bin/sh: {e}"))
    });
    let (mut child, w) = match spawned {
        Ok(c) => c,
        Err(message) => {
            tracing::warn!("Sibling command from {peer} not started: {message}");
            let mut s = s;
            let _ = frame::write_frame(&mut s, &FromRunner::Refused { message });
            return;
        }
    };
    let pid = child.id();
    tracing::info!(
        "Sibling command from {peer} started: pid {pid}, uid {}, {:?}",
        start.uid,
        start.command
    );
    let w: Writer = Arc::new(Mutex::new(w));
    let pgid = Pid::from_raw(pid as i32);
    let reaped = Arc::new(AtomicBool::new(false));
    if !send(&w, &FromRunner::Started { pid }) {
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = child.wait();
        return;
    }

    // Output readers, each signalling when its pipe closed.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut readers = 0;
    let pipes: [(bool, Option<Box<dyn Read + Send>>); 2] = [
        (true, child.stdout.take().map(|p| Box::new(p) as _)),
        (false, child.stderr.take().map(|p| Box::new(p) as _)),
    ];
    for (is_out, pipe) in pipes {
        let Some(mut pipe) = pipe else { continue };
        let (w, done) = (w.clone(), done_tx.clone());
        readers += 1;
        thread("sibling-out", move || {
            let mut buf = vec![0u8; snowflock_proto::channel::MAX_CHUNK];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let data = buf[..n].to_vec();
                        let msg = if is_out {
                            FromRunner::Stdout { data }
                        } else {
                            FromRunner::Stderr { data }
                        };
                        if !send(&w, &msg) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
    }
    drop(done_tx);

    // Stdin: a writer thread, so a command that does not read its stdin
    // never stops signals from arriving.
    let (stdin_tx, stdin_rx) = mpsc::channel::<Option<Vec<u8>>>();
    let mut stdin = child.stdin.take();
    thread("sibling-in", move || {
        for d in stdin_rx {
            match (d, stdin.as_mut()) {
                (Some(d), Some(p)) => {
                    if p.write_all(&d).is_err() {
                        stdin = None;
                    }
                }
                (None, _) => stdin = None,
                (Some(_), None) => {}
            }
        }
    });

    // Keepalive frames until the exit code is sent.
    let finished = Arc::new(AtomicBool::new(false));
    {
        let (w, finished) = (w.clone(), finished.clone());
        thread("sibling-ping", move || loop {
            std::thread::sleep(PING_INTERVAL);
            if finished.load(Ordering::SeqCst) || !send(&w, &FromRunner::Ping) {
                return;
            }
        });
    }

    // The waiter sends the exit code after the output.
    {
        let (w, finished, reaped, peer) = (
            w.clone(),
            finished.clone(),
            reaped.clone(),
            peer.to_string(),
        );
        thread("sibling-wait", move || {
            let code = match child.wait() {
                Ok(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
                Err(_) => snowflock_proto::sibling::EXIT_FAILURE,
            };
            reaped.store(true, Ordering::SeqCst);
            let deadline = std::time::Instant::now() + DRAIN_GRACE;
            for _ in 0..readers {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if done_rx.recv_timeout(left).is_err() {
                    break;
                }
            }
            finished.store(true, Ordering::SeqCst);
            tracing::info!("Sibling command {pid} from {peer} exited with {code}");
            send(&w, &FromRunner::Exit { code });
            let _ = lock(&w).shutdown(Shutdown::Write);
        });
    }

    // This thread reads what the caller sends until it hangs up.
    let mut r = s;
    loop {
        match frame::read_frame::<_, ToRunner>(&mut r) {
            Ok(ToRunner::Stdin { data }) => {
                let _ = stdin_tx.send(Some(data));
            }
            Ok(ToRunner::StdinEof) => {
                let _ = stdin_tx.send(None);
            }
            Ok(ToRunner::Signal { signo }) => match Signal::try_from(signo) {
                Ok(sig) if !reaped.load(Ordering::SeqCst) => {
                    tracing::info!("Sibling command {pid}: {sig} from {peer}");
                    let _ = killpg(pgid, sig);
                }
                Ok(_) => {}
                Err(_) => tracing::warn!("Sibling command {pid}: bad signal {signo} ignored"),
            },
            Err(e) => {
                if !finished.load(Ordering::SeqCst) {
                    hang_up(pgid, &reaped, peer, &e);
                }
                return;
            }
        }
    }
}

/// The caller went away before the command ended: SIGHUP, then SIGKILL.
fn hang_up(pgid: Pid, reaped: &AtomicBool, peer: &str, why: &snowflock_proto::frame::FrameError) {
    if reaped.load(Ordering::SeqCst) {
        return;
    }
    tracing::warn!(
        "Sibling command {pgid} from {peer}: the caller is gone ({}); hanging up",
        snowflock_proto::error::chain(why)
    );
    let _ = killpg(pgid, Signal::SIGHUP);
    let _ = killpg(pgid, Signal::SIGCONT);
    std::thread::sleep(HANGUP_GRACE);
    // The group outlives its leader when children keep it: kill it whole.
    let _ = killpg(pgid, Signal::SIGKILL);
}

fn thread(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 * 1024)
        .spawn(f)
    {
        tracing::error!("Cannot start thread {name}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_environment_falls_back_to_home_then_root() {
        let s = Start {
            uid: 0,
            gid: 0,
            command: "true".into(),
            cwd: "/nonexistent-dir-xyz".into(),
        };
        let (env, cwd) = login(&s);
        assert!(
            env.iter().any(|(k, v)| k == "USER" && v == "root"),
            "{env:?}"
        );
        assert!(cwd == "/root" || cwd == "/", "{cwd}");
        let s = Start {
            cwd: "/tmp".into(),
            ..s
        };
        assert_eq!(login(&s).1, "/tmp");
        let s = Start {
            cwd: "relative".into(),
            uid: 4_000_000,
            ..s
        };
        let (env, cwd) = login(&s);
        assert!(env.iter().any(|(k, v)| k == "HOME" && v == "/"), "{env:?}");
        assert_eq!(cwd, "/");
    }
}
