//! The bench's network and processes: the fabric and host namespaces
//! (made with the local cluster's own helpers, under the cluster name
//! [`NAME`], so `snowflock cluster down --name sfmcdist` removes leftovers
//! of a bench that was killed), the processes it runs in them, and what
//! Ctrl-C does.
//!
//! Host 0 of the layout is the origin, hosts 1..=H the clone hosts. The
//! root namespace gets no address and no route into any of them.
//!
//! Every process the bench starts is recorded by pid; on SIGINT, SIGTERM
//! or SIGHUP those get SIGTERM, and the bench unwinds: [`Net`]'s drop
//! removes the namespaces and the bench's directory. The processes' FUSE
//! mounts live in their own mount namespaces (`ip netns exec` makes one),
//! so they go with the processes.

use crate::cluster::{self, HostInfo, Layout};
use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cluster name of the bench's namespaces (`sfmcdist-fab`,
/// `sfmcdist-h0`, ...) and directory (`/dev/shm/snowflock-sfmcdist`).
pub const NAME: &str = "sfmcdist";
/// Most clone hosts: the fabric is a /24, host 0 is the origin.
pub const MAX_HOSTS: u32 = 200;

/// Set by the first SIGINT, SIGTERM or SIGHUP.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Pids of the processes the bench started and has not reaped.
static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn pids() -> Vec<u32> {
    PIDS.lock().map(|p| p.clone()).unwrap_or_default()
}

fn forget(pid: u32) {
    if let Ok(mut p) = PIDS.lock() {
        p.retain(|x| *x != pid);
    }
}

/// Takes SIGINT, SIGTERM and SIGHUP away from every thread started after
/// this call, to one thread that stops the bench's processes (the first
/// time) or kills them and exits at once (the second). Call first thing.
pub fn catch_signals() -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().context("Cannot block signals")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                if INTERRUPTED.swap(true, Ordering::SeqCst) {
                    for p in pids() {
                        crate::sys::kill_now(p);
                    }
                    eprintln!(
                        "bench mcdist: {sig} again: quitting now; `snowflock cluster down --name {NAME}` removes what is left"
                    );
                    std::process::exit(130);
                }
                eprintln!("bench mcdist: {sig}: stopping and cleaning up (again to quit at once)");
                for p in pids() {
                    crate::sys::terminate(p);
                }
            }
        })
        .context("Cannot start the signal thread")?;
    Ok(())
}

/// Fails if the bench was interrupted.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The namespaces of a run: removed, with the bench's directory, on drop.
pub struct Net {
    layout: Layout,
}

impl Net {
    /// The fabric, the origin and `hosts` clone hosts. Refuses to start
    /// over leftovers (or another bench mcdist running).
    pub fn up(hosts: u32) -> Result<Net> {
        let layout = Layout::new(NAME)?;
        let cleanup = format!("`snowflock cluster down --name {NAME}` removes them");
        let left = cluster::existing_netns(&layout);
        if !left.is_empty() {
            bail!(
                "namespaces of an earlier bench mcdist exist ({}; another one may be running): {cleanup}",
                left.join(", ")
            );
        }
        let dir = layout.state_root();
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "{} exists (another bench mcdist may be running): {cleanup}",
                dir.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("Cannot create {}", dir.display())),
        }
        // From here on, drop removes what exists.
        let net = Net { layout };
        let fab = net.layout.fabric_netns();
        // The bridge floods multicast to every port (no IGMP snooping).
        cluster::create_fabric(&fab)?;
        for i in 0..=hosts {
            check_interrupted()?;
            cluster::connect_host(&fab, &net.host(i))?;
            if i > 0 && i % 16 == 0 {
                eprintln!("bench mcdist: {i}/{hosts} host namespaces");
            }
        }
        Ok(net)
    }

    /// Host `i` (0 = the origin).
    pub fn host(&self, i: u32) -> HostInfo {
        self.layout.host(i)
    }

    /// The bench's directory (`/dev/shm/snowflock-sfmcdist`).
    pub fn dir(&self) -> PathBuf {
        self.layout.state_root()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in pids() {
            crate::sys::terminate(p);
        }
        if let Err(e) = cluster::teardown(&self.layout, None, false) {
            eprintln!("bench mcdist: cleanup incomplete: {e:#}");
        }
    }
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let t = lines[lines.len().saturating_sub(n)..].join("\n");
    if t.is_empty() {
        "(empty)".into()
    } else {
        t
    }
}

struct Proc {
    name: String,
    /// Said all it had to say: its end of output is no failure.
    done: bool,
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

/// Processes started in namespaces, whose stdout lines come in on one
/// channel. Dropping the group ends them (end of stdin, then SIGKILL).
pub struct Group {
    procs: Vec<Proc>,
    tx: Sender<(usize, Option<String>)>,
    rx: Receiver<(usize, Option<String>)>,
}

impl Group {
    pub fn new() -> Group {
        let (tx, rx) = mpsc::channel();
        Group {
            procs: Vec::new(),
            tx,
            rx,
        }
    }

    /// Starts `snowflock ARGS` in `netns`, stderr to `log`; returns its
    /// number in the group.
    pub fn spawn(&mut self, name: &str, netns: &str, args: &[String], log: &Path) -> Result<usize> {
        check_interrupted()?;
        let exe = std::env::current_exe().context("Cannot find the snowflock binary")?;
        let logf = std::fs::File::create(log)
            .with_context(|| format!("Cannot create {}", log.display()))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&exe)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("Cannot start {name} in {netns}"))?;
        if let Ok(mut p) = PIDS.lock() {
            p.push(child.id());
        }
        let idx = self.procs.len();
        let stdout = child.stdout.take().expect("piped");
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name(format!("out-{name}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((idx, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((idx, None));
            })?;
        self.procs.push(Proc {
            name: name.into(),
            done: false,
            stdin: child.stdin.take(),
            child,
            log: log.into(),
        });
        Ok(idx)
    }

    /// Writes a line to process `i`'s stdin.
    pub fn send(&mut self, i: usize, line: &str) -> Result<()> {
        let p = &mut self.procs[i];
        let w = p.stdin.as_mut().context("stdin closed")?;
        writeln!(w, "{line}")
            .and_then(|()| w.flush())
            .with_context(|| format!("{} does not listen any more: {}", p.name, tail(&p.log, 20)))
    }

    /// Process `i` has printed its last line.
    pub fn done(&mut self, i: usize) {
        self.procs[i].done = true;
    }

    /// The next line any process printed, before `deadline`; fails when
    /// a process not [`done`](Self::done) ends (with the end of its log),
    /// at the deadline, or when the bench is interrupted.
    pub fn next(&mut self, deadline: Instant) -> Result<(usize, String)> {
        match self.next_until(deadline)? {
            Some(l) => Ok(l),
            None => bail!("timed out waiting for the bench's processes"),
        }
    }

    /// [`next`](Self::next), but `None` at `deadline`.
    pub fn next_until(&mut self, deadline: Instant) -> Result<Option<(usize, String)>> {
        loop {
            check_interrupted()?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            match self.rx.recv_timeout(wait) {
                Ok((i, Some(line))) => return Ok(Some((i, line))),
                Ok((i, None)) if self.procs[i].done => {}
                Ok((i, None)) => {
                    check_interrupted()?;
                    let p = &mut self.procs[i];
                    // How it ended, if it did within a second.
                    let mut status = "still running".to_string();
                    for _ in 0..50 {
                        if let Ok(Some(st)) = p.child.try_wait() {
                            status = st.to_string();
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    bail!(
                        "{} closed its output ({status}); the end of its log {}:\n{}",
                        p.name,
                        p.log.display(),
                        tail(&p.log, 20)
                    )
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("no process left"),
            }
        }
    }

    /// Closes every stdin and waits for the processes to exit, at most
    /// `timeout` in all; those still running then are killed.
    pub fn finish(mut self, timeout: Duration) -> Result<()> {
        for p in &mut self.procs {
            p.stdin = None;
        }
        let end = Instant::now() + timeout;
        let mut failed = Vec::new();
        for p in &mut self.procs {
            loop {
                match p.child.try_wait()? {
                    Some(st) => {
                        forget(p.child.id());
                        if !st.success() {
                            failed.push(format!("{} ({st}): {}", p.name, tail(&p.log, 10)));
                        }
                        break;
                    }
                    None if Instant::now() >= end => {
                        failed.push(format!("{} did not exit in time", p.name));
                        break;
                    }
                    None => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        check_interrupted()?;
        if !failed.is_empty() {
            bail!("{}", failed.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stdin = None;
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = p.child.kill();
            }
            let _ = p.child.wait();
            forget(p.child.id());
        }
    }
}
