//! `cluster up --slurm`: a real Slurm for the local cluster, so tickets can
//! come from Slurm as they would on a Slurm-scheduled cluster.
//!
//! Host `h0` is the head node: `munged` (with the cluster's own key and
//! socket), a private MariaDB and `slurmdbd` (so `sacct` has the bill),
//! and `slurmctld`. Every host namespace runs one `slurmd` named after the
//! host, at the host's address. Everything lives under
//! `/run/snowflock/NAME/slurm/` (the database under the state root), and
//! every process's pid is recorded in `cluster.json` so that `cluster
//! down` stops exactly these.

use super::layout::{host_ip, Layout, SlurmInfo, SlurmProc};
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Slurm partition of a local cluster.
pub const PARTITION: &str = "snowflock";
/// How long each Slurm daemon may take to answer once started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a Slurm daemon may take to exit when stopped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Paths of the local cluster's Slurm.
struct Paths {
    dir: PathBuf,
    db: PathBuf,
}

impl Paths {
    fn new(l: &Layout) -> Paths {
        Paths {
            dir: l.config_dir().join("slurm"),
            db: l.state_root().join("slurmdb"),
        }
    }
    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }
    fn munge_dir(&self) -> PathBuf {
        self.dir.join("munge")
    }
    fn munge_socket(&self) -> PathBuf {
        self.munge_dir().join("munge.sock")
    }
    fn mysql_socket(&self) -> PathBuf {
        self.dir.join("mysql.sock")
    }
    fn log(&self, what: &str) -> PathBuf {
        self.dir.join("log").join(format!("{what}.log"))
    }
}

/// `SLURM_CONF` of cluster `l`'s Slurm.
pub fn conf_path(l: &Layout) -> PathBuf {
    Paths::new(l).conf()
}

/// `slurm.conf` of an `n`-host cluster whose nodes have `cpus` CPUs.
fn slurm_conf(l: &Layout, p: &Paths, n: u32, cpus: usize) -> String {
    let d = p.dir.display();
    let munge = p.munge_socket();
    let munge = munge.display();
    let head = host_ip(0);
    let mut s = format!(
        "# Slurm of the local snowflock cluster `{name}` (written by `snowflock cluster up --slurm`).\n\
         ClusterName=sf{name}\n\
         SlurmctldHost=h0({head})\n\
         SlurmUser=root\n\
         SlurmdUser=root\n\
         AuthType=auth/munge\n\
         AuthInfo=socket={munge}\n\
         CredType=cred/munge\n\
         StateSaveLocation={d}/state\n\
         SlurmdSpoolDir={d}/slurmd.%n\n\
         SlurmctldPidFile={d}/run/slurmctld.pid\n\
         SlurmdPidFile={d}/run/slurmd.%n.pid\n\
         SlurmctldLogFile={d}/log/slurmctld.log\n\
         SlurmdLogFile={d}/log/slurmd.%n.log\n\
         # cgroup v1 with IgnoreSystemd (cgroup.conf): these hosts mix v1 controllers with a v2 tree.\n\
         ProctrackType=proctrack/linuxproc\n\
         TaskPlugin=task/none\n\
         JobAcctGatherType=jobacct_gather/none\n\
         AccountingStorageType=accounting_storage/slurmdbd\n\
         AccountingStorageHost={head}\n\
         AccountingStoragePass={munge}\n\
         SelectType=select/cons_tres\n\
         SelectTypeParameters=CR_Core\n\
         ReturnToService=2\n\
         MpiDefault=none\n\
         MailProg=/bin/true\n",
        name = l.name,
    );
    for i in 0..n {
        s.push_str(&format!(
            "NodeName=h{i} NodeAddr={} CPUs={cpus} State=UNKNOWN\n",
            host_ip(i)
        ));
    }
    s.push_str(&format!(
        "PartitionName={PARTITION} Default=YES MaxTime=INFINITE State=UP Nodes=ALL\n"
    ));
    s
}

fn slurmdbd_conf(p: &Paths) -> String {
    let d = p.dir.display();
    format!(
        "AuthType=auth/munge\n\
         AuthInfo=socket={munge}\n\
         DbdHost=localhost\n\
         DbdAddr={head}\n\
         SlurmUser=root\n\
         PidFile={d}/run/slurmdbd.pid\n\
         LogFile={d}/log/slurmdbd.log\n\
         StorageType=accounting_storage/mysql\n\
         StorageHost=localhost\n\
         StorageUser=root\n\
         StorageLoc=slurm_acct_db\n",
        munge = p.munge_socket().display(),
        head = host_ip(0),
    )
}

const CGROUP_CONF: &str = "CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n";

/// Writes the files and starts every Slurm daemon of an `n`-host cluster;
/// `record` is told each started process at once (so a failure later is
/// still cleaned up).
pub fn start(
    l: &Layout,
    n: u32,
    record: &mut dyn FnMut(SlurmProc) -> Result<()>,
) -> Result<PathBuf> {
    for tool in [
        "munged",
        "mariadbd",
        "mariadb-install-db",
        "slurmdbd",
        "slurmctld",
        "slurmd",
        "salloc",
        "sacctmgr",
    ] {
        if !on_path(tool) {
            bail!("`cluster up --slurm` needs {tool}: install Debian's slurmctld, slurmd, slurm-client, slurmdbd, munge and mariadb-server (`make setup` does)");
        }
    }
    let p = Paths::new(l);
    for sub in ["state", "run", "log", "munge"] {
        std::fs::create_dir_all(p.dir.join(sub))
            .with_context(|| format!("Cannot create {}", p.dir.join(sub).display()))?;
    }
    for i in 0..n {
        std::fs::create_dir_all(p.dir.join(format!("slurmd.h{i}")))?;
    }
    // munged checks that its socket directory is reachable by all.
    std::fs::set_permissions(p.munge_dir(), std::fs::Permissions::from_mode(0o755))?;
    let key = p.munge_dir().join("munge.key");
    let mut bytes = [0u8; 1024];
    rand_fill(&mut bytes)?;
    std::fs::write(&key, bytes)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400))?;
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    std::fs::write(p.conf(), slurm_conf(l, &p, n, cpus))?;
    std::fs::write(p.dir.join("cgroup.conf"), CGROUP_CONF)?;
    let dbd = p.dir.join("slurmdbd.conf");
    std::fs::write(&dbd, slurmdbd_conf(&p))?;
    std::fs::set_permissions(&dbd, std::fs::Permissions::from_mode(0o600))?;
    let head = l.host_netns(0);

    let md = p.munge_dir();
    let munged = spawn(
        &p,
        "munged",
        None,
        &[
            "munged".into(),
            "--foreground".into(),
            format!("--key-file={}", key.display()),
            format!("--socket={}", p.munge_socket().display()),
            format!("--pid-file={}", md.join("munged.pid").display()),
            format!("--log-file={}", p.log("munged").display()),
            format!("--seed-file={}", md.join("munged.seed").display()),
        ],
    )?;
    record(SlurmProc {
        what: "munged".into(),
        pid: munged,
    })?;
    wait_for("munged", START_TIMEOUT, || Ok(p.munge_socket().exists()))?;

    // MariaDB for slurmdbd: its own data directory and socket, on the head
    // node's loopback.
    if !p.db.join("mysql").exists() {
        let out = Command::new("mariadb-install-db")
            .arg(format!("--datadir={}", p.db.display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .output()
            .context("Cannot run mariadb-install-db")?;
        if !out.status.success() {
            bail!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let db = spawn(
        &p,
        "mariadbd",
        Some(&head),
        &[
            "mariadbd".into(),
            "--no-defaults".into(),
            format!("--datadir={}", p.db.display()),
            format!("--socket={}", p.mysql_socket().display()),
            "--port=3306".into(),
            "--bind-address=127.0.0.1".into(),
            "--user=root".into(),
            format!("--pid-file={}", p.dir.join("run/mariadbd.pid").display()),
            "--skip-log-bin".into(),
        ],
    )?;
    record(SlurmProc {
        what: "mariadbd".into(),
        pid: db,
    })?;
    wait_for("mariadbd", START_TIMEOUT, || Ok(p.mysql_socket().exists()))?;

    let dbd_pid = spawn(
        &p,
        "slurmdbd",
        Some(&head),
        &["slurmdbd".into(), "-D".into()],
    )?;
    record(SlurmProc {
        what: "slurmdbd".into(),
        pid: dbd_pid,
    })?;
    wait_for("slurmdbd", START_TIMEOUT, || {
        Ok(tool(&p, &head, &["sacctmgr", "-n", "-P", "show", "cluster"]).is_ok())
    })?;

    // slurmctld checks that it runs on the host SlurmctldHost names.
    let ctld = spawn(
        &p,
        "slurmctld",
        Some(&head),
        &[
            "unshare".into(),
            "--uts".into(),
            "/bin/sh".into(),
            "-c".into(),
            "hostname h0 && exec slurmctld -D".into(),
        ],
    )?;
    record(SlurmProc {
        what: "slurmctld".into(),
        pid: ctld,
    })?;
    wait_for("slurmctld", START_TIMEOUT, || {
        Ok(tool(&p, &head, &["scontrol", "ping"]).is_ok())
    })?;
    for i in 0..n {
        let name = format!("h{i}");
        let pid = spawn(
            &p,
            &format!("slurmd.{name}"),
            Some(&l.host_netns(i)),
            &["slurmd".into(), "-D".into(), "-N".into(), name.clone()],
        )?;
        record(SlurmProc {
            what: format!("slurmd {name}"),
            pid,
        })?;
    }
    wait_for("every slurmd to register", START_TIMEOUT, || {
        let out = tool(&p, &head, &["sinfo", "-h", "-N", "-o", "%N %t"])?;
        let states: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once(' ')).collect();
        for (node, st) in &states {
            if st.starts_with("drain") || st.starts_with("down") {
                let _ = tool(
                    &p,
                    &head,
                    &[
                        "scontrol",
                        "update",
                        &format!("nodename={node}"),
                        "state=resume",
                    ],
                );
            }
        }
        Ok(states.len() == n as usize && states.iter().all(|(_, s)| *s == "idle"))
    })?;
    Ok(p.conf())
}

/// `sacct`'s record of `ticket`'s allocation on local cluster `name`,
/// once Slurm has recorded its end (waits up to 20 s for that).
/// `slurmctld` hands job records to `slurmdbd` asynchronously, so right
/// after the release `sacct` may not list the job at all yet: wait until
/// it does, in a final state.
pub fn bill(name: &str, ticket: &str) -> Result<String> {
    let l = Layout::new(name)?;
    let p = Paths::new(&l);
    let name = format!("snowflock-{ticket}");
    let job = format!("--name={name}");
    let argv = [
        "sacct",
        "-X",
        &job,
        "-o",
        "JobID,JobName%30,State,NNodes,NodeList,Elapsed",
    ];
    let start = Instant::now();
    loop {
        let out = tool(&p, &l.host_netns(0), &argv)?;
        if recorded_ended(&out, &name) || start.elapsed() > Duration::from_secs(20) {
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Whether `sacct`'s output lists job `name` in a state it has ended in.
fn recorded_ended(out: &str, name: &str) -> bool {
    out.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(name))
        .any(|l| {
            let state = l.split_whitespace().nth(2).unwrap_or("");
            !state.is_empty() && !matches!(state, "RUNNING" | "PENDING" | "REQUEUED" | "RESIZING")
        })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file()
}

fn rand_fill(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("Cannot read /dev/urandom")
}

/// Starts one daemon (in `netns`, if given) in a session of its own, with
/// `SLURM_CONF` set and its output in its log file; returns its pid.
fn spawn(p: &Paths, what: &str, netns: Option<&str>, argv: &[String]) -> Result<u32> {
    let log = p.log(&format!("{what}.out"));
    let logf =
        std::fs::File::create(&log).with_context(|| format!("Cannot create {}", log.display()))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(argv);
            c
        }
        None => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    cmd.env("SLURM_CONF", p.conf())
        .env("MYSQL_UNIX_PORT", p.mysql_socket())
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    crate::sys::detach(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("Cannot start {what}"))?;
    Ok(child.id())
}

/// Runs one of Slurm's tools on the head node; its output, or its error.
fn tool(p: &Paths, head: &str, argv: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", head])
        .args(argv)
        .env("SLURM_CONF", p.conf())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("Cannot run {}", argv[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            argv[0],
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!(" (last: {e:#})"),
        }
        if start.elapsed() > timeout {
            bail!(
                "Slurm: {what} did not come up within {} s{last}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `pid` is still one of this Slurm's daemons (not a recycled pid):
/// alive, and its command line or environment names this Slurm's directory.
fn is_ours(pid: u32, dir: &Path) -> bool {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mentions = |file: &str| {
        std::fs::read(format!("/proc/{pid}/{file}"))
            .map(|b| b.windows(needle.len()).any(|w| w == needle))
            .unwrap_or(false)
    };
    crate::sys::reap(pid);
    crate::sys::exists(pid) && (mentions("cmdline") || mentions("environ"))
}

/// Stops the recorded Slurm daemons, last started first: SIGTERM, then
/// SIGKILL after [`STOP_TIMEOUT`]. Returns how many it stopped.
pub fn stop(s: &SlurmInfo, say: &dyn Fn(String), errors: &mut Vec<String>) -> usize {
    let mut stopped = 0;
    for p in s.procs.iter().rev() {
        if !is_ours(p.pid, &s.dir) {
            continue;
        }
        crate::sys::terminate(p.pid);
        let start = Instant::now();
        while is_ours(p.pid, &s.dir) && start.elapsed() < STOP_TIMEOUT {
            std::thread::sleep(Duration::from_millis(50));
        }
        if is_ours(p.pid, &s.dir) {
            say(format!(
                "{} (pid {}) did not stop; killing it",
                p.what, p.pid
            ));
            crate::sys::kill_now(p.pid);
            std::thread::sleep(Duration::from_millis(200));
            crate::sys::reap(p.pid);
        }
        if crate::sys::exists(p.pid) && is_ours(p.pid, &s.dir) {
            errors.push(format!("{} (pid {}) does not exit", p.what, p.pid));
        } else {
            say(format!("stopped {} (pid {})", p.what, p.pid));
            stopped += 1;
        }
    }
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_conf_names_every_host_at_its_address() {
        let l = Layout::new("ctest").unwrap();
        let p = Paths::new(&l);
        let c = slurm_conf(&l, &p, 3, 2);
        for want in [
            "ClusterName=sfctest\n",
            "SlurmctldHost=h0(10.249.0.1)\n",
            "AuthInfo=socket=/run/snowflock/ctest/slurm/munge/munge.sock\n",
            "AccountingStoragePass=/run/snowflock/ctest/slurm/munge/munge.sock\n",
            "SlurmdSpoolDir=/run/snowflock/ctest/slurm/slurmd.%n\n",
            "NodeName=h0 NodeAddr=10.249.0.1 CPUs=2 State=UNKNOWN\n",
            "NodeName=h2 NodeAddr=10.249.0.3 CPUs=2 State=UNKNOWN\n",
            "PartitionName=snowflock Default=YES",
        ] {
            assert!(c.contains(want), "{want} not in\n{c}");
        }
        assert!(!c.contains("NodeName=h3"));
        let d = slurmdbd_conf(&p);
        assert!(d.contains("DbdAddr=10.249.0.1\n"), "{d}");
        assert!(d.contains("AuthInfo=socket=/run/snowflock/ctest/slurm/munge/munge.sock\n"));
        assert_eq!(p.db, Path::new("/dev/shm/snowflock-ctest/slurmdb"));
    }

    #[test]
    fn the_bill_waits_for_the_job_to_be_recorded_as_ended() {
        let head = "JobID JobName State NNodes NodeList Elapsed\n------------ ---- ---\n";
        assert!(!recorded_ended(head, "snowflock-t1"));
        let running = format!("{head}7 snowflock-t1 RUNNING 2 h[1-2] 00:00:03\n");
        assert!(!recorded_ended(&running, "snowflock-t1"));
        let other = format!("{head}6 snowflock-t0 COMPLETED 2 h[1-2] 00:00:03\n");
        assert!(!recorded_ended(&other, "snowflock-t1"));
        let done = format!("{head}7 snowflock-t1 COMPLETED 2 h[1-2] 00:00:03\n");
        assert!(recorded_ended(&done, "snowflock-t1"));
    }
}
