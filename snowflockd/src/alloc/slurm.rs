//! The `slurm` allocator: one Slurm allocation per ticket.
//!
//! A ticket request runs `salloc --nodes=1-M --exclusive --immediate=WAIT`
//! with a holder command ([`slurm_text::HOLDER`]) that reports the job and its nodes and
//! then waits on its standard input. The daemon keeps that pipe: closing
//! it ends the holder, so `salloc` gives the nodes back and the job is
//! recorded as completed. Why `salloc` with a holder rather than `sbatch`
//! or `slurmrestd`: the grant (and its wait, `--immediate`) is one blocking
//! command with Slurm's own messages; nothing runs on the granted nodes;
//! and an allocation cannot outlive its daemon, since the pipe closes when
//! the daemon dies. An allocation whose `salloc` was killed too is found
//! by its job comment and cancelled ([`Allocator::keep_only`]).
//!
//! Clones go only to the granted nodes: `slots_per_node` each, or what
//! each node's snowflock daemon reports free. A granted node whose daemon
//! does not answer still gets its share; those clones fail to start there
//! and are reported lost, the others run.

use super::slurm_text::{self, Report};
use super::{capacity_of, AllocError, Allocator, Offer, Want};
use crate::cluster::PeerChannel;
use crate::host::config::Slurm;
use futures::future::BoxFuture;
use futures::FutureExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// Beyond `wait_s`, how long `salloc` may take before it is stopped (its
/// own wait ends at `wait_s`; an unreachable controller makes it retry
/// for longer).
const GRACE: Duration = Duration::from_secs(2);
/// How long Slurm's other commands (`squeue`, `scancel`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a released `salloc` may take to give the nodes back.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the whole queue is checked for this host's stray allocations
/// once the first check after start-up succeeded.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often held allocations are looked for in Slurm's queue (a revoked
/// one whose `salloc` did not say so is found this way).
const CHECK_HELD_EVERY: Duration = Duration::from_secs(5);
/// How soon a check that failed (Slurm unreachable) is tried again.
const SWEEP_RETRY: Duration = Duration::from_secs(15);
/// How long a granted node's daemon may take to say what it has free.
const CAPACITY_TIMEOUT: Duration = Duration::from_secs(3);

/// One held allocation.
struct Holder {
    job: String,
    /// The holder's standard input; dropping it releases the allocation.
    stdin: Option<ChildStdin>,
    /// Set when `salloc` has exited.
    ended: tokio::sync::watch::Receiver<bool>,
}

#[derive(Default)]
struct Held {
    holders: HashMap<String, Holder>,
    /// Tickets whose `salloc` runs but has not reported yet.
    pending: HashSet<String>,
    lost: Vec<(String, String)>,
    /// When the queue is next checked for stray allocations (`None`: now).
    next_sweep: Option<Instant>,
    /// When the held allocations were last found in the queue.
    held_checked: Option<Instant>,
}

pub struct SlurmAllocator {
    cfg: Slurm,
    /// This host's name.
    me: String,
    /// Slots per node assumed when sizing a request without `slots_per_node`.
    estimate: u32,
    peers: Arc<dyn PeerChannel>,
    held: Arc<Mutex<Held>>,
    /// Told when an allocation ended under a live ticket.
    wake: Arc<tokio::sync::Notify>,
}

impl SlurmAllocator {
    pub fn new(cfg: Slurm, me: &str, estimate: u32, peers: Arc<dyn PeerChannel>) -> SlurmAllocator {
        SlurmAllocator {
            cfg,
            me: me.to_string(),
            estimate: estimate.max(1),
            peers,
            held: Arc::new(Mutex::new(Held::default())),
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        if let Some(conf) = &self.cfg.slurm_conf {
            c.env("SLURM_CONF", conf);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Runs one of Slurm's short commands; its output, or why not.
    async fn run(&self, program: &str, args: &[&str]) -> Result<String, AllocError> {
        let out = tokio::time::timeout(COMMAND_TIMEOUT, self.command(program).args(args).output())
            .await
            .map_err(|_| {
                AllocError::Unavailable(format!(
                    "{program} did not answer within {} s",
                    COMMAND_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|err| AllocError::Spawn {
                what: program.to_string(),
                err,
            })?;
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(AllocError::Unavailable(format!("{program} failed: {said}")));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What `scontrol ping` says when the controller is down.
    async fn ping(&self) -> Option<String> {
        let out = tokio::time::timeout(
            Duration::from_secs(3),
            self.command("scontrol").arg("ping").output(),
        )
        .await
        .ok()?
        .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or("").trim().to_string();
        (!out.status.success() || first.contains("DOWN")).then_some(first)
    }

    async fn cancel(&self, job: &str) {
        match self.run("scancel", &[job]).await {
            Ok(_) => tracing::info!(job, "Slurm allocation cancelled"),
            Err(e) => {
                tracing::warn!(job, error = %snowflock_proto::error::chain(&e), "cannot cancel a Slurm allocation")
            }
        }
    }

    /// Asks Slurm; on a grant, the holder is kept and the nodes returned.
    async fn allocate(&self, want: Want<'_>) -> Result<Vec<String>, AllocError> {
        let per_node = self.cfg.slots_per_node.unwrap_or(self.estimate);
        let max_nodes = want.most.div_ceil(per_node);
        let args = slurm_text::salloc_args(&self.cfg, &self.me, want.ticket, want.vm, max_nodes);
        let mut cmd = self.command("salloc");
        cmd.args(&args)
            .stdin(Stdio::piped())
            .kill_on_drop(false)
            // Its own process group: a terminal's signals to the daemon do
            // not reach it; the daemon ends it through the pipe.
            .process_group(0);
        self.held.lock().pending.insert(want.ticket.to_string());
        let child = cmd.spawn().map_err(|err| AllocError::Spawn {
            what: "salloc (is Slurm's client installed?)".into(),
            err,
        });
        let res = match child {
            Ok(child) => self.await_grant(want.ticket, child).await,
            Err(e) => Err(e),
        };
        self.held.lock().pending.remove(want.ticket);
        res
    }

    async fn await_grant(&self, ticket: &str, mut child: Child) -> Result<Vec<String>, AllocError> {
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let said = Arc::new(Mutex::new(Vec::<String>::new()));
        // salloc says when Slurm takes the allocation back (scancel, time
        // limit), but then waits for its command: the holder must be ended.
        let revoked = Arc::new(tokio::sync::Notify::new());
        let (said2, revoked2) = (said.clone(), revoked.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                tracing::debug!(line = %l, "salloc");
                if l.contains("has been revoked") {
                    revoked2.notify_one();
                }
                let mut s = said2.lock();
                if s.len() < 64 {
                    s.push(l);
                }
            }
        });
        let mut report = Report::default();
        let mut out = BufReader::new(stdout).lines();
        let deadline = self.cfg.wait + GRACE;
        let read = tokio::time::timeout(deadline, async {
            while !report.done {
                match out.next_line().await {
                    Ok(Some(l)) => report.line(&l),
                    _ => break,
                }
            }
        })
        .await;
        let job_seen = || {
            report.job.clone().or_else(|| {
                said.lock()
                    .iter()
                    .find_map(|l| slurm_text::job_in_message(l))
            })
        };
        if report.done && !report.nodes.is_empty() {
            let job = report.job.clone().expect("done has a job");
            let (tx, rx) = tokio::sync::watch::channel(false);
            self.held.lock().holders.insert(
                ticket.to_string(),
                Holder {
                    job: job.clone(),
                    stdin,
                    ended: rx,
                },
            );
            // Keep reading so the holder never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
            self.watch(ticket.to_string(), job.clone(), child, tx, said, revoked);
            tracing::info!(ticket, job, nodes = ?report.nodes, "Slurm allocation granted");
            return Ok(report.nodes);
        }
        // No grant: make sure nothing stays queued or held.
        drop(stdin);
        stop(pid, &mut child).await;
        if let Some(job) = job_seen() {
            self.cancel(&job).await;
        }
        // Let the stderr reader take salloc's last words.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let lines = said.lock().clone();
        if read.is_err() {
            return Err(match job_seen() {
                Some(job) => AllocError::NoCapacity(format!(
                    "Slurm granted no node within {} s (job {job} was queued and is cancelled)",
                    self.cfg.wait.as_secs()
                )),
                None => AllocError::Unavailable(match self.ping().await {
                    Some(down) => format!("Slurm's controller cannot be reached: {down}"),
                    None => format!(
                        "salloc did not answer within {} s (it said: {})",
                        deadline.as_secs(),
                        lines.last().map(String::as_str).unwrap_or("nothing")
                    ),
                }),
            });
        }
        if report.done {
            return Err(AllocError::Refused(
                "Slurm granted an allocation without nodes".into(),
            ));
        }
        Err(slurm_text::failure(&lines, self.cfg.wait.as_secs()))
    }

    /// Waits for a granted `salloc` to end; an end the daemon did not ask
    /// for (Slurm revoked it: time limit, `scancel`; or salloc died) is
    /// reported through [`Allocator::lost`].
    fn watch(
        &self,
        ticket: String,
        job: String,
        mut child: Child,
        ended: tokio::sync::watch::Sender<bool>,
        said: Arc<Mutex<Vec<String>>>,
        revoked: Arc<tokio::sync::Notify>,
    ) {
        let (held, wake) = (self.held.clone(), self.wake.clone());
        let pid = child.id();
        tokio::spawn(async move {
            let how = tokio::select! {
                status = child.wait() => status
                    .map(|s| format!("salloc {s}"))
                    .unwrap_or_else(|e| e.to_string()),
                _ = revoked.notified() => "Slurm revoked it".to_string(),
            };
            // Taking the holder out drops its pipe: the holder ends, and
            // salloc with it.
            let unasked = held.lock().holders.remove(&ticket).is_some();
            if unasked {
                let last = said.lock().last().cloned().unwrap_or_default();
                let why = format!(
                    "its Slurm allocation {job} ended ({how}{}{})",
                    if last.is_empty() { "" } else { ": " },
                    last.trim().trim_start_matches("salloc: ")
                );
                tracing::warn!(%ticket, %job, %why, "Slurm allocation ended under a live ticket");
                held.lock().lost.push((ticket, why));
                wake.notify_one();
            }
            // A salloc whose allocation was revoked can stay behind,
            // spinning, after its command ended: it is stopped.
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                tracing::warn!(%job, "salloc did not exit after its allocation ended; stopping it");
                stop(pid, &mut child).await;
            }
            ended.send_replace(true);
        });
    }

    /// Places clones on the granted nodes.
    async fn offer_on(&self, nodes: &[String]) -> Offer {
        let hosts: Vec<String> = nodes.iter().map(|n| self.cfg.host_of(n)).collect();
        let here = if hosts.contains(&self.me) {
            self.cfg.slots_per_node.unwrap_or(u32::MAX)
        } else {
            0
        };
        let others: Vec<String> = hosts.into_iter().filter(|h| *h != self.me).collect();
        let free = capacity_of(&*self.peers, &others, CAPACITY_TIMEOUT).await;
        let hosts = free
            .into_iter()
            .map(|(h, f)| {
                let slots = match (self.cfg.slots_per_node, f) {
                    (Some(s), Some(f)) => s.min(f),
                    (None, Some(f)) => f,
                    // Its daemon does not answer: its share is reported
                    // lost when the clone starts there.
                    (Some(s), None) => s,
                    (None, None) => 1,
                };
                (h, slots)
            })
            .collect();
        Offer { hosts, here }
    }

    /// Reads this host's allocations from Slurm's queue: a held allocation
    /// that is gone was revoked (reported through [`Allocator::lost`], in
    /// case `salloc` did not say so), and one that no ticket holds (left by
    /// an earlier run of the daemon, or by a `salloc` that was killed) is
    /// cancelled. Held allocations are checked every [`CHECK_HELD_EVERY`],
    /// strays every [`SWEEP_EVERY`].
    async fn check_queue(&self) {
        let (sweep_due, held) = {
            let h = self.held.lock();
            let now = Instant::now();
            let held: Vec<(String, String)> = h
                .holders
                .iter()
                .map(|(t, x)| (t.clone(), x.job.clone()))
                .collect();
            let held_due =
                !held.is_empty() && h.held_checked.is_none_or(|t| now >= t + CHECK_HELD_EVERY);
            let sweep_due = h.next_sweep.is_none_or(|t| now >= t);
            if !held_due && !sweep_due {
                return;
            }
            (sweep_due, held)
        };
        let uid = nix::unistd::getuid().to_string();
        let listing = match self
            .run("squeue", &["-h", "-u", &uid, "-o", "%i|%j|%k"])
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %snowflock_proto::error::chain(&e), "cannot read Slurm's queue; will retry");
                let mut h = self.held.lock();
                h.next_sweep = Some(Instant::now() + SWEEP_RETRY);
                h.held_checked = Some(Instant::now() + SWEEP_RETRY);
                return;
            }
        };
        let listed = slurm_text::ours(&listing, &self.me);
        let stray: Vec<slurm_text::Listed> = {
            let mut h = self.held.lock();
            h.held_checked = Some(Instant::now());
            // Only what was held before the queue was read can be missing.
            for (ticket, job) in held {
                if listed.iter().any(|l| l.job == job) {
                    continue;
                }
                if h.holders.get(&ticket).is_some_and(|x| x.job == job) {
                    // Dropping the holder's pipe ends it, and salloc.
                    h.holders.remove(&ticket);
                    let why = format!("its Slurm allocation {job} ended (it left Slurm's queue)");
                    tracing::warn!(%ticket, %job, %why, "Slurm allocation ended under a live ticket");
                    h.lost.push((ticket, why));
                    self.wake.notify_one();
                }
            }
            if !sweep_due {
                return;
            }
            h.next_sweep = Some(Instant::now() + SWEEP_EVERY);
            listed
                .into_iter()
                .filter(|l| {
                    !h.pending.contains(&l.ticket)
                        && h.holders.get(&l.ticket).is_none_or(|x| x.job != l.job)
                })
                .collect()
        };
        for l in stray {
            tracing::warn!(job = %l.job, ticket = %l.ticket, "releasing a Slurm allocation no live ticket holds");
            self.cancel(&l.job).await;
        }
    }
}

/// Stops a `salloc` that has not granted anything: SIGTERM first (it then
/// withdraws its request), SIGKILL if it lingers.
async fn stop(pid: Option<u32>, child: &mut Child) {
    if let Some(pid) = pid {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

impl Allocator for SlurmAllocator {
    fn kind(&self) -> &'static str {
        "slurm"
    }

    fn offer<'a>(&'a self, want: Want<'a>) -> BoxFuture<'a, Result<Offer, AllocError>> {
        async move {
            let nodes = self.allocate(want).await?;
            Ok(self.offer_on(&nodes).await)
        }
        .boxed()
    }

    fn release<'a>(&'a self, ticket: &'a str) -> BoxFuture<'a, ()> {
        async move {
            let Some(mut h) = self.held.lock().holders.remove(ticket) else {
                return;
            };
            // The holder reads EOF and exits 0; salloc gives the nodes back.
            h.stdin.take();
            let mut ended = h.ended.clone();
            let done = tokio::time::timeout(
                RELEASE_TIMEOUT,
                ended.wait_for(|e| *e),
            )
            .await
            .is_ok();
            if done {
                tracing::info!(ticket, job = %h.job, "Slurm allocation released");
            } else {
                // The watcher stops a salloc that lingers; make sure Slurm
                // lets the nodes go too.
                tracing::warn!(ticket, job = %h.job, "salloc did not end when released; cancelling the job");
                self.cancel(&h.job).await;
            }
        }
        .boxed()
    }

    fn keep_only<'a>(&'a self, live: &'a [String]) -> BoxFuture<'a, ()> {
        async move {
            let gone: Vec<String> = self
                .held
                .lock()
                .holders
                .keys()
                .filter(|t| !live.contains(t))
                .cloned()
                .collect();
            for t in gone {
                self.release(&t).await;
            }
            self.check_queue().await;
        }
        .boxed()
    }

    fn held(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .held
            .lock()
            .holders
            .iter()
            .map(|(t, h)| (t.clone(), h.job.clone()))
            .collect();
        v.sort();
        v
    }

    fn lost(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.held.lock().lost)
    }

    fn lost_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.wake.clone())
    }
}
