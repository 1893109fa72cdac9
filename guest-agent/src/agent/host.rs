//! The channel to the host daemon: one reader thread, a shared writer.
//!
//! ```text
//!  agent                                   snowflockd
//!    |------------------ Hello --------------->|   unsolicited, when the agent opens the port
//!    |<----------------- Hello ----------------|   on every (re)connect
//!    |------------------ Hello --------------->|   then API calls may flow
//!    |-- Request{id, ApiRequest} ------------->|   id registered in `pending` first
//!    |<------------- Response{id, ApiResponse}-|   -> the waiting API thread
//!    |<---- BecomeClone{request_id, identity} -|   -> identity thread
//!    |------------ Ready{clone_id} ----------->|
//! ```
//!
//! The reader never blocks on an application or a process: work that can
//! take time (identity changes, exec I/O) runs on its own threads.
//!
//! API calls wait (up to [`HELLO_TIMEOUT`]) until the host is known to be
//! there: it sent `Hello`, or, when init restarted the agent while the host
//! stayed connected (its `Hello` went to the old process), it sent anything
//! else (a `Ping`, an `ExecStart`).

use super::{lock, Agent, HELLO_TIMEOUT};
use snowflock_proto::api::{ApiErrorCode, ApiRequest, ApiResponse};
use snowflock_proto::channel::{
    decode_line, encode_line, GuestMsg, HostMsg, LineError, LineReader,
};
use snowflock_proto::CHANNEL_VERSION;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Poll interval while no host is connected to a virtio-serial port.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Minimum interval between two logs about malformed lines.
const MALFORMED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The write side of the channel and the handshake state.
pub struct Channel {
    writer: Mutex<Option<Box<dyn Write + Send>>>,
    hello: Mutex<bool>,
    hello_cv: Condvar,
    /// Lines that failed to decode, since start.
    pub malformed: AtomicU64,
    malformed_logged: Mutex<Option<Instant>>,
}

impl Default for Channel {
    fn default() -> Self {
        Self::new()
    }
}

impl Channel {
    pub fn new() -> Channel {
        Channel {
            writer: Mutex::new(None),
            hello: Mutex::new(false),
            hello_cv: Condvar::new(),
            malformed: AtomicU64::new(0),
            malformed_logged: Mutex::new(None),
        }
    }

    /// Sends one message. Blocks while a virtio-serial host is away (the
    /// kernel holds the write); fails when a socket channel is down.
    pub fn send(&self, msg: &GuestMsg) -> io::Result<()> {
        let line = encode_line(msg);
        let mut w = lock(&self.writer);
        let w = w
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "Channel is not open"))?;
        w.write_all(&line)?;
        w.flush()
    }

    /// Sends, logging instead of failing.
    pub fn send_or_log(&self, msg: &GuestMsg) {
        if let Err(e) = self.send(msg) {
            tracing::warn!("Cannot send to the host: {e}");
        }
    }

    fn set_writer(&self, w: Option<Box<dyn Write + Send>>) {
        *lock(&self.writer) = w;
    }

    fn set_hello(&self, v: bool) {
        *lock(&self.hello) = v;
        if v {
            self.hello_cv.notify_all();
        }
    }

    /// True once the host is known to be connected.
    pub fn hello_seen(&self) -> bool {
        *lock(&self.hello)
    }

    /// Waits up to `timeout` for the host's `Hello`; true if it came.
    pub fn wait_hello(&self, timeout: Duration) -> bool {
        let g = lock(&self.hello);
        let (g, _) = self
            .hello_cv
            .wait_timeout_while(g, timeout, |seen| !*seen)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    fn note_malformed(&self, e: &LineError) {
        let n = self.malformed.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = lock(&self.malformed_logged);
        let now = Instant::now();
        if !matches!(*last, Some(t) if now.duration_since(t) < MALFORMED_LOG_INTERVAL) {
            *last = Some(now);
            tracing::warn!(
                "Dropped a malformed channel message ({n} so far): {}",
                snowflock_proto::error::chain(e)
            );
        }
    }
}

/// Reads the channel forever, reopening it when it fails.
pub fn run(agent: Arc<Agent>) -> ! {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let port = super::port::open_blocking(&agent.cfg.port);
        let mut reader = port.reader;
        agent.chan.set_writer(Some(port.writer));
        // Unsolicited Hello: if this agent restarted while the host stayed
        // connected, the host's Hello went to the old agent; this tells the
        // host a new agent is listening. (On virtio-serial the write waits
        // until a host is connected; nothing can be read before that.)
        agent.chan.send_or_log(&hello(&agent));
        let mut lines = LineReader::new();
        let mut host_present = false;
        loop {
            match reader.read(&mut buf) {
                Ok(0) if port.zero_read_is_eof => {
                    tracing::info!("Host closed the channel {}", port.name);
                    break;
                }
                Ok(0) => {
                    // virtio-serial: no host connected. Not end of file.
                    if host_present {
                        tracing::info!("Host disconnected from {}", port.name);
                        host_present = false;
                        agent.chan.set_hello(false);
                        lines.reset();
                    }
                    std::thread::sleep(IDLE_POLL);
                }
                Ok(n) => {
                    host_present = true;
                    lines.feed(&buf[..n], |line| {
                        match line.and_then(decode_line::<HostMsg>) {
                            Ok(msg) => dispatch(&agent, msg),
                            Err(e) => agent.chan.note_malformed(&e),
                        }
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("Reading {} failed: {e}; reopening", port.name);
                    std::thread::sleep(super::port::RETRY);
                    break;
                }
            }
        }
        agent.chan.set_hello(false);
        if port.zero_read_is_eof {
            agent.chan.set_writer(None);
        }
    }
}

fn hello(agent: &Agent) -> GuestMsg {
    GuestMsg::Hello {
        version: CHANNEL_VERSION,
        agent: super::AGENT_VERSION.to_string(),
        clone_id: agent.ident().clone_id,
        instance: *INSTANCE,
    }
}

/// Random id of this agent process, so the host can tell a restarted agent
/// (whose exec sessions and pending calls are gone) from a reply.
static INSTANCE: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    u64::from_le_bytes(b).max(1)
});

/// Handles one message from the host. Never blocks on apps or processes.
fn dispatch(agent: &Arc<Agent>, msg: HostMsg) {
    if !matches!(msg, HostMsg::Hello { .. }) && !agent.chan.hello_seen() {
        // The host said Hello to a previous agent process (this one was
        // restarted by init) and is talking to us: it is connected.
        tracing::info!(
            "Host is talking without a Hello (agent restarted?); treating it as connected"
        );
        agent.chan.set_hello(true);
    }
    match msg {
        HostMsg::Hello { version } => {
            if version != CHANNEL_VERSION && version + 1 != CHANNEL_VERSION {
                tracing::warn!(
                    "Host speaks channel version {version}; this agent speaks {CHANNEL_VERSION}"
                );
            }
            // Our Hello goes out before any Request, so the host sees the
            // handshake first.
            agent.chan.send_or_log(&hello(agent));
            tracing::info!("Host connected (channel version {version})");
            agent.chan.set_hello(true);
        }
        HostMsg::Ping { seq } => agent.chan.send_or_log(&GuestMsg::Pong { seq }),
        HostMsg::Response { id, resp } => match agent.pending().remove(&id) {
            Some(tx) => {
                let _ = tx.send(resp);
            }
            None => tracing::warn!("Response for unknown request {id} dropped"),
        },
        HostMsg::BecomeClone {
            request_id,
            identity,
        } => {
            // Requests pending now were sent to the parent's host; in the
            // clone nobody will answer them.
            let orphans: Vec<u64> = agent
                .pending()
                .keys()
                .copied()
                .filter(|&k| k != request_id)
                .collect();
            let a = agent.clone();
            if let Err(e) = std::thread::Builder::new()
                .name("become-clone".into())
                .spawn(move || super::identity::become_clone(&a, request_id, identity, orphans))
            {
                tracing::error!("Cannot start the identity thread: {e}");
            }
        }
        HostMsg::ExecStart { exec, argv, env } => super::exec::start(agent, exec, argv, env),
        HostMsg::ExecStdin { exec, data, eof } => agent.execs.stdin(exec, data, eof),
        HostMsg::ExecKill { exec } => agent.execs.kill(exec),
    }
}

/// Answers an API request that goes to the host: waits for the handshake,
/// runs the pre-clone hooks for `Clone`, sends it and waits (without limit)
/// for the answer.
pub fn forward(agent: &Agent, req: ApiRequest) -> ApiResponse {
    if !agent.chan.wait_hello(HELLO_TIMEOUT) {
        return ApiResponse::Error {
            code: ApiErrorCode::HostUnavailable,
            message: "The host daemon is not connected".into(),
        };
    }
    if matches!(req, ApiRequest::Clone { .. }) {
        let cfg = super::settings::hooks_for_clone(agent);
        let report = allocator_hooks::run_agent_hooks(&cfg);
        for (hook, err) in &report.failed {
            tracing::warn!("Pre-clone hook {hook} failed: {err}");
        }
        tracing::info!("Pre-clone hooks ran: {:?}", report.ran);
    }
    let id = agent.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    agent.pending().insert(id, tx);
    if let Err(e) = agent.chan.send(&GuestMsg::Request { id, req }) {
        agent.pending().remove(&id);
        return ApiResponse::Error {
            code: ApiErrorCode::HostUnavailable,
            message: format!("Cannot send the request to the host: {e}"),
        };
    }
    rx.recv().unwrap_or_else(|_| ApiResponse::Error {
        code: ApiErrorCode::Failed,
        message: "The request was dropped by the agent".into(),
    })
}
