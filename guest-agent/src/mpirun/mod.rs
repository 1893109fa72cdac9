//! `sfmpirun -np N PROGRAM...`: an MPI job on a flock made for it.
//!
//! ```text
//!  sfmpirun (parent, clone 0)
//!   1. ticket for ceil(N / vCPUs) - 1 clones      (sf_request_ticket)
//!   2. sf_clone                                    clones: exit quietly; their
//!                                                  agents serve sf-exec
//!   3. wait until every clone answers sf-exec
//!   4. host file: parent + clones, one slot per vCPU
//!   5. the stock launcher (mpiexec.hydra / mpirun.openmpi) with sf-exec
//!      as its rsh                                  ([`launch`])
//!   6. launcher ends -> sf_kill the ticket -> exit with the job's status
//! ```
//!
//! While the job runs, a watcher asks for the ticket's children every
//! second: a clone that is lost (or ends) stops the job with one line that
//! names it. SIGINT, SIGTERM and SIGHUP stop the job the same way. Every
//! path ends with `sf_kill`, so no clone outlives the job.

pub mod args;
pub mod launch;

use crate::client::{self, SfError};
use args::{Args, Mpi};
use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::Pid;
use snowflock_proto::api::ChildState;
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a new clone may take to answer `sf-exec`.
pub const CLONE_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Between asking the launcher to stop and killing it.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the watcher asks for the ticket's children.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// One line for the user; `sfmpirun` exits non-zero after printing it.
#[derive(Debug, thiserror::Error)]
pub enum MpiRunError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Api {
        what: &'static str,
        #[source]
        source: SfError,
    },
}

fn api(what: &'static str) -> impl FnOnce(SfError) -> MpiRunError {
    move |source| MpiRunError::Api { what, source }
}

/// Entry point of the `sfmpirun` binary.
pub fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let code = match args::parse(&argv)
        .map_err(MpiRunError::Usage)
        .and_then(|a| run(&a))
    {
        Ok(code) => code,
        Err(MpiRunError::Usage(u)) => {
            eprintln!("sfmpirun: {u}");
            2
        }
        Err(e) => {
            eprintln!(
                "sfmpirun: {}",
                snowflock_proto::error::chain(&e)
                    .trim_end()
                    .replace('\n', ": ")
            );
            1
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// Phases and their times, on stderr with `-v`.
struct Progress {
    on: bool,
    t0: Instant,
}

impl Progress {
    fn say(&self, what: &str) {
        if self.on {
            eprintln!(
                "sfmpirun: [{:7.3} s] {what}",
                self.t0.elapsed().as_secs_f64()
            );
        }
    }
}

/// What ended the wait for the job.
enum Event {
    Exited(std::process::ExitStatus),
    Signal(Signal),
    CloneGone(String),
}

/// Runs the job; returns the exit status.
pub fn run(a: &Args) -> Result<i32, MpiRunError> {
    let p = Progress {
        on: a.verbose,
        t0: Instant::now(),
    };
    // Blocked before any thread starts: only the signal thread takes them.
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        sigs.add(s);
    }
    let _ = sigs.thread_block();
    // Processes the launcher leaves behind (its sf-exec children run in
    // process groups of their own) become ours, so none outlives the job.
    let _ = nix::sys::prctl::set_child_subreaper(true);

    let mpi = match a.mpi {
        Some(m) => m,
        None => match mpi_of_program(&a.program[0]) {
            Some(m) => m,
            None => detect_mpi()?,
        },
    };
    let exe = match mpi {
        Mpi::Mpich => "mpiexec.hydra",
        Mpi::OpenMpi => "mpirun.openmpi",
    };
    if which(exe).is_none() {
        return Err(MpiRunError::Setup(format!(
            "{exe} is not installed: install the {} package in this VM",
            match mpi {
                Mpi::Mpich => "mpich",
                Mpi::OpenMpi => "openmpi-bin",
            }
        )));
    }
    let me = client::id().map_err(api("cannot ask the snowflock agent who this VM is"))?;
    if me.clone_id != 0 {
        return Err(MpiRunError::Setup(format!(
            "this VM is clone {}; run sfmpirun in the original VM (clone 0)",
            me.clone_id
        )));
    }
    let ip = me.ip.clone().ok_or_else(|| {
        MpiRunError::Setup("this VM has no flock address, so it cannot have clones".into())
    })?;
    let (iface, cidr) = interface_of(&ip).ok_or_else(|| {
        MpiRunError::Setup(format!("no network interface holds this VM's address {ip}"))
    })?;
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let want = a.np.div_ceil(vcpus) - 1;
    p.say(&format!(
        "{} ranks, {vcpus} per VM: {want} clone{} wanted ({})",
        a.np,
        if want == 1 { "" } else { "s" },
        mpi.name()
    ));

    let mut ticket = None;
    let mut guard = TicketGuard(None);
    let mut hosts = vec![ip.clone()];
    let mut slots = vcpus;
    if let Some(t) = &a.ticket {
        // Clones that already run (a second job on the same flock, or the
        // benchmark's baseline): used as they are and left running.
        let (state, children) = client::status(t).map_err(api("cannot list the clones"))?;
        for c in &children {
            if let (ChildState::Running, Some(ip)) = (&c.state, &c.ip) {
                hosts.push(ip.clone());
            }
        }
        if state != "active" || hosts.len() == 1 {
            return Err(MpiRunError::Setup(format!(
                "ticket {t} has no running clones (it is {state})"
            )));
        }
        slots = a.np.div_ceil(hosts.len() as u32).max(vcpus);
        ticket = Some(t.clone());
        p.say(&format!("{} running clones of {t}", hosts.len() - 1));
    } else if want > 0 {
        let t = client::request_ticket(want).map_err(api("cannot get clones"))?;
        p.say(&format!("ticket {} grants {} of {want}", t.id, t.granted));
        if t.granted < want {
            if !a.oversubscribe {
                let _ = client::kill(&t.id);
                return Err(MpiRunError::Setup(format!(
                    "{} ranks at {vcpus} per VM need {want} clones, but the ticket granted {}; \
                     rerun with --oversubscribe to run {} ranks per VM on {} VMs",
                    a.np,
                    t.granted,
                    a.np.div_ceil(t.granted + 1),
                    t.granted + 1
                )));
            }
            slots = a.np.div_ceil(t.granted + 1);
            eprintln!(
                "sfmpirun: the ticket granted {} of {want} clones: running {slots} ranks per VM on {} VMs",
                t.granted,
                t.granted + 1
            );
        }
        let id = client::clone(&t.id).map_err(api("cannot clone this VM"))?;
        if id != 0 {
            // A clone: its agent serves the launcher from now on.
            std::process::exit(0);
        }
        p.say("cloned");
        ticket = Some(t.id.clone());
        guard.0 = Some(t.id.clone());
        let (_, children) = client::status(&t.id).map_err(api("cannot list the clones"))?;
        for c in &children {
            match (&c.state, &c.ip) {
                (ChildState::Running, Some(ip)) => hosts.push(ip.clone()),
                (state, _) => {
                    return Err(MpiRunError::Setup(format!(
                        "clone {} did not start: {state:?}",
                        c.clone_id
                    )))
                }
            }
        }
        wait_for_answers(&hosts[1..])?;
        p.say(&format!("{} clones answer", hosts.len() - 1));
    }

    let dir = std::env::temp_dir().join(format!("sfmpirun-{}", std::process::id()));
    let _dir = DirGuard(dir.clone());
    std::fs::create_dir_all(&dir)
        .map_err(|e| MpiRunError::Setup(format!("cannot create {}: {e}", dir.display())))?;
    let flock = launch::Flock {
        hosts,
        slots,
        cidr,
        iface,
    };
    let hostfile = dir.join("hosts");
    std::fs::write(&hostfile, launch::hostfile(mpi, &flock))
        .map_err(|e| MpiRunError::Setup(format!("cannot write the host file: {e}")))?;
    let sf_exec = sf_exec_path();
    let shim = if mpi == Mpi::Mpich { mpi_shim() } else { None };
    let l = launch::command(
        &launch::Job {
            mpi,
            sf_exec: &sf_exec,
            hostfile: &hostfile,
            np: a.np,
            as_root: nix::unistd::getuid().is_root(),
            mpi_shim: shim.as_deref(),
            program: &a.program,
        },
        &flock,
    );
    let mut cmd = Command::new(&l.program);
    cmd.args(&l.args)
        .envs(l.env.iter().cloned())
        .process_group(0);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if l.env_remove_prefixes.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(k.as_ref());
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| MpiRunError::Setup(format!("cannot start {:?}: {e}", l.program)))?;
    let pgid = Pid::from_raw(child.id() as i32);
    p.say(&format!(
        "{} started on {} VMs",
        l.program.to_string_lossy(),
        flock.hosts.len()
    ));

    let (tx, rx) = mpsc::channel();
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            if let Ok(st) = child.wait() {
                let _ = tx.send(Event::Exited(st));
            }
        });
    }
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            while let Ok(sig) = sigs.wait() {
                let _ = tx.send(Event::Signal(sig));
            }
        });
    }
    if let Some(t) = ticket.clone() {
        std::thread::spawn(move || watch(&t, &tx));
    }
    let code = match rx.recv() {
        Ok(Event::Exited(st)) => {
            let code = status_code(st);
            p.say(&format!("job ended with status {code}"));
            code
        }
        Ok(Event::Signal(sig)) => {
            eprintln!("sfmpirun: stopped by {sig}; ending the job and its clones");
            stop(pgid, sig, &rx);
            128 + sig as i32
        }
        Ok(Event::CloneGone(why)) => {
            eprintln!("sfmpirun: {why}; ending the job");
            stop(pgid, Signal::SIGTERM, &rx);
            1
        }
        Err(_) => 1,
    };
    kill_leftovers(pgid);
    drop(guard);
    p.say("clones ended");
    Ok(code)
}

/// Ends the ticket's clones when dropped, whatever path the job took.
struct TicketGuard(Option<String>);

impl Drop for TicketGuard {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            if let Err(e) = client::kill(&t) {
                eprintln!("sfmpirun: warning: could not end the clones of {t}: {e}");
            }
        }
    }
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asks the launcher's group to stop with `sig`, then kills it after
/// [`STOP_GRACE`].
fn stop(pgid: Pid, sig: Signal, rx: &mpsc::Receiver<Event>) {
    let _ = killpg(pgid, sig);
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Exited(_)) => break,
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    let _ = killpg(pgid, Signal::SIGKILL);
}

fn status_code(st: std::process::ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// SIGKILLs the processes still parented to this one, and reaps them:
/// what the launcher left behind (as subreaper, this process inherits
/// them). Rounds until none is left, since killing one (a proxy) hands
/// its own children (ranks) to this process. `launcher` is reaped by its
/// waiter thread, not here.
fn kill_leftovers(launcher: Pid) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let me = std::process::id().to_string();
    for _ in 0..50 {
        let mut alive = 0;
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces.
            let mut f = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace())
                .into_iter()
                .flatten();
            let (state, ppid) = (f.next(), f.next());
            if ppid != Some(me.as_str()) || pid == launcher.as_raw() {
                continue;
            }
            let pid = Pid::from_raw(pid);
            if state != Some("Z") {
                alive += 1;
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            }
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
        if alive == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reports the first child of `ticket` that is no longer running.
fn watch(ticket: &str, tx: &mpsc::Sender<Event>) {
    loop {
        std::thread::sleep(WATCH_INTERVAL);
        let Ok((_, children)) = client::status(ticket) else {
            continue;
        };
        let gone = children.iter().find_map(|c| {
            let who = format!(
                "clone {} ({})",
                c.clone_id,
                c.ip.as_deref().unwrap_or(&c.vm)
            );
            match &c.state {
                ChildState::Running => None,
                ChildState::Lost { reason } => Some(format!("{who} was lost: {reason}")),
                ChildState::Exited { code } => Some(format!("{who} exited with {code}")),
                ChildState::Killed => Some(format!("{who} was killed")),
            }
        });
        if let Some(why) = gone {
            let _ = tx.send(Event::CloneGone(why));
            return;
        }
    }
}

/// Waits until `sf-exec HOST true` works for every host.
fn wait_for_answers(hosts: &[String]) -> Result<(), MpiRunError> {
    let sf_exec = sf_exec_path();
    let handles: Vec<_> = hosts
        .iter()
        .map(|h| {
            let (h, sf_exec) = (h.clone(), sf_exec.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + CLONE_ANSWER_TIMEOUT;
                let mut last = String::new();
                while Instant::now() < deadline {
                    match Command::new(&sf_exec).args(["-n", &h, "true"]).output() {
                        Ok(o) if o.status.success() => return Ok(()),
                        Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
                        Err(e) => last = format!("cannot run {}: {e}", sf_exec.display()),
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(format!(
                    "clone {h} did not answer within {} s: {last}",
                    CLONE_ANSWER_TIMEOUT.as_secs()
                ))
            })
        })
        .collect();
    for h in handles {
        h.join()
            .unwrap_or_else(|_| Err("a waiting thread failed".into()))
            .map_err(MpiRunError::Setup)?;
    }
    Ok(())
}

/// Where the guest package puts the MPICH shim (`mpi-shim/`).
pub const MPI_SHIM: &str = "/usr/lib/x86_64-linux-gnu/snowflock/libsnowflock_mpi_shim.so";

/// The MPICH shim, if installed (`SNOWFLOCK_MPI_SHIM` overrides the path;
/// empty turns it off).
fn mpi_shim() -> Option<PathBuf> {
    let p = std::env::var_os("SNOWFLOCK_MPI_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(MPI_SHIM));
    if p.as_os_str().is_empty() {
        return None;
    }
    if !p.is_file() {
        eprintln!(
            "sfmpirun: warning: {} is missing: MPICH jobs may hang in MPI_Finalize (reinstall snowflock-guest)",
            p.display()
        );
        return None;
    }
    Some(p)
}

/// `sf-exec` next to this program, else from `PATH`.
fn sf_exec_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("sf-exec")))
        .filter(|p| p.exists())
        .or_else(|| which("sf-exec"))
        .unwrap_or_else(|| PathBuf::from("sf-exec"))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The MPI a program is linked with, from `ldd`: a program built with
/// `mpicc.mpich` needs MPICH's launcher whatever `mpiexec` points to.
fn mpi_of_program(program: &std::ffi::OsStr) -> Option<Mpi> {
    let path = if program.to_string_lossy().contains('/') {
        PathBuf::from(program)
    } else {
        which(&program.to_string_lossy())?
    };
    let out = Command::new("ldd").arg(&path).output().ok()?;
    launch::mpi_of_libraries(&String::from_utf8_lossy(&out.stdout))
}

/// The MPI `mpiexec` points to.
fn detect_mpi() -> Result<Mpi, MpiRunError> {
    let out = Command::new("mpiexec")
        .arg("--version")
        .output()
        .map_err(|e| {
            MpiRunError::Setup(format!(
                "cannot run mpiexec ({e}): install mpich or openmpi-bin in this VM, or say --mpi"
            ))
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    launch::detect(&text).ok_or_else(|| {
        MpiRunError::Setup("mpiexec is neither MPICH's nor Open MPI's; say --mpi".into())
    })
}

/// The interface holding `ip`, and `ip/prefix`.
fn interface_of(ip: &str) -> Option<(String, String)> {
    let want: std::net::Ipv4Addr = ip.parse().ok()?;
    for ifa in nix::ifaddrs::getifaddrs().ok()? {
        let addr = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in().map(|s| s.ip()));
        if addr != Some(want) {
            continue;
        }
        let prefix = ifa
            .netmask
            .as_ref()
            .and_then(|m| m.as_sockaddr_in().map(|s| u32::from(s.ip()).count_ones()))
            .unwrap_or(24);
        return Some((ifa.interface_name, format!("{ip}/{prefix}")));
    }
    None
}
