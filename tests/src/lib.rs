//! Test infrastructure for snowflock integration tests.
//!
//! Tests drive the real `snowflock` CLI against real `snowflockd` daemons,
//! each in a network namespace the test creates, booting real guests under
//! QEMU. Every resource has a guard whose `Drop` removes it, so a failing
//! test cleans up too.

use serde_json::Value;
use std::ffi::OsString;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Directory of the built binaries (`target/release` when run by `make test`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SNOWFLOCK_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test exe path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// The static guest binaries (`target/x86_64-unknown-linux-gnu/release`).
pub fn guest_bin_dir() -> PathBuf {
    let d = bin_dir();
    let profile = d.file_name().map(|s| s.to_os_string()).unwrap_or_default();
    d.parent()
        .map(|t| t.join("x86_64-unknown-linux-gnu").join(profile))
        .unwrap_or_default()
}

pub fn kernel_dir() -> PathBuf {
    let cache = std::env::var("SNOWFLOCK_CACHE").unwrap_or_else(|_| "/var/cache/snowflock".into());
    PathBuf::from(cache).join("kernel/current")
}

/// Whether VM tests can run here. With `SNOWFLOCK_REQUIRE_VM=1` (as in
/// `make test` and CI) a missing prerequisite fails the test instead.
pub fn vm_prereqs() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    if !kernel_dir().join("vmlinux").exists() {
        missing.push(format!(
            "{} (run scripts/fetch-kernel.sh)",
            kernel_dir().join("vmlinux").display()
        ));
    }
    for b in ["snowflock", "snowflockd"] {
        if !bin(b).exists() {
            missing.push(format!("{} (run make build)", bin(b).display()));
        }
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push("qemu-system-x86_64".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("VM test prerequisites missing: {}", missing.join(", "));
    if std::env::var("SNOWFLOCK_REQUIRE_VM").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// A guest image: built for this test binary and removed on drop, or the
/// shared Debian test image (kept in the cache, see [`TestImage::debian`]).
pub struct TestImage {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestImage {
    /// Builds the image with `snowflock image build`, adding `extra` files.
    pub fn build(extra: &[(&Path, &str)]) -> TestImage {
        let dir = tempfile::Builder::new()
            .prefix("sf-img")
            .tempdir()
            .expect("tempdir");
        let mut cmd = Command::new(bin("snowflock"));
        cmd.args(["image", "build", "--out"]).arg(dir.path());
        for (src, dest) in extra {
            cmd.arg("--add").arg(format!("{}:{dest}", src.display()));
        }
        let out = cmd.output().expect("run snowflock image build");
        assert!(
            out.status.success(),
            "image build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestImage {
            dir: dir.path().to_path_buf(),
            _tmp: Some(dir),
        }
    }

    /// The Debian disk image the tests share, with the test tools
    /// (`sf-memtest`, `sf-swdemo`) in `/usr/local/bin`: built once into
    /// `<cache>/test-images/debian`; later calls find it up to date (the
    /// build compares its inputs) in a second or two. VMs boot it behind
    /// private overlays, so it is never written. Besides the base set it
    /// holds both MPIs and a compiler ([`snowflock_image::MPI_PACKAGES`]): one image serves
    /// the Debian and the MPI tests.
    pub fn debian() -> TestImage {
        let cache = std::env::var_os("SNOWFLOCK_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/snowflock"));
        let dir = cache.join("test-images").join("debian");
        let mut cmd = Command::new(bin("snowflock"));
        cmd.args(["image", "build", "--kind", "debian", "--out"])
            .arg(&dir)
            .args(["--packages", &snowflock_image::MPI_PACKAGES.join(",")]);
        let guest = guest_bin_dir();
        for tool in ["sf-memtest", "sf-swdemo"] {
            let p = guest.join(tool);
            if p.exists() {
                cmd.arg("--add")
                    .arg(format!("{}:/usr/local/bin/{tool}", p.display()));
            }
        }
        let out = cmd
            .output()
            .expect("run snowflock image build --kind debian");
        assert!(
            out.status.success(),
            "Debian image build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestImage { dir, _tmp: None }
    }

    pub fn path(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The global arguments that aim `snowflock` at one daemon, and the helpers
/// built on them. [`Host`] and [`ClusterHost`] reach these through `Deref`,
/// so `host.ok(..)` works the same on both.
pub struct Daemon {
    args: Vec<OsString>,
}

impl Daemon {
    fn new<I: IntoIterator<Item = S>, S: Into<OsString>>(args: I) -> Daemon {
        Daemon {
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// A `snowflock` command aimed at this daemon.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin("snowflock"));
        c.args(&self.args).stdin(Stdio::null());
        c
    }

    /// Runs the CLI with `args`; returns the output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().expect("run snowflock")
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "snowflock {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn start_vm(&self, name: &str, image: &TestImage, mem: &str) -> Value {
        let out = self.ok(&[
            "vm",
            "start",
            name,
            "--image",
            image.path(),
            "--mem",
            mem,
            "--json",
        ]);
        serde_json::from_str(&out).expect("vm start --json")
    }

    /// `vm exec NAME -- sh -c SCRIPT` -> (exit code, stdout, stderr).
    pub fn sh(&self, vm: &str, script: &str) -> (i32, String, String) {
        let o = self.run(&["vm", "exec", vm, "--", "sh", "-c", script]);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Like [`Daemon::sh`] but asserts exit code 0 and returns stdout.
    pub fn sh_ok(&self, vm: &str, script: &str) -> String {
        let (code, out, err) = self.sh(vm, script);
        assert_eq!(code, 0, "in {vm}: `{script}` failed: {out}{err}");
        out
    }

    /// `snowflock stats VM --json`.
    pub fn stats(&self, vm: &str) -> Value {
        serde_json::from_str(&self.ok(&["stats", vm, "--json"])).expect("stats --json")
    }

    pub fn vms(&self) -> Vec<Value> {
        let out = self.ok(&["vm", "list", "--json"]);
        serde_json::from_str::<Value>(&out)
            .expect("vm list --json")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// A "physical host": a network namespace with its own snowflockd.
pub struct Host {
    pub name: String,
    pub netns: String,
    pub socket: PathBuf,
    pub state: PathBuf,
    daemon: Daemon,
    _tmp: tempfile::TempDir,
}

impl Deref for Host {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl Host {
    pub fn start(name: &str) -> Host {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let netns = format!("sft{}x{n}", std::process::id() % 100000);
        let tmp = tempfile::Builder::new()
            .prefix("sfh")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let state = PathBuf::from(format!("/dev/shm/sft-{}-{n}", std::process::id()));
        let socket = tmp.path().join("d.sock");
        let daemon = Daemon::new([OsString::from("--socket"), socket.clone().into_os_string()]);
        let h = Host {
            name: name.into(),
            netns,
            socket,
            state,
            daemon,
            _tmp: tmp,
        };
        let out = h
            .cli()
            .args([
                "daemon",
                "start",
                "--netns",
                &h.netns,
                "--host",
                name,
                "--state-dir",
            ])
            .arg(&h.state)
            .output()
            .expect("run snowflock daemon start");
        assert!(
            out.status.success(),
            "daemon start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        h
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        let b = std::fs::read(self.socket.with_extension("json")).ok()?;
        let v: Value = serde_json::from_slice(&b).ok()?;
        v["pid"].as_u64().map(|p| p as u32)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let pid = self.daemon_pid();
        let _ = self.cli().args(["daemon", "stop"]).output();
        if let Some(pid) = pid {
            if pid_alive(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
        if Path::new("/run/netns").join(&self.netns).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A local cluster (`snowflock cluster up`): hosts `h0`..`h{N-1}`, each a
/// network namespace with its own snowflockd, on one fabric bridge. Drop
/// runs `snowflock cluster down` and then removes by hand whatever is left.
pub struct Cluster {
    pub name: String,
    pub hosts: Vec<ClusterHost>,
    /// Daemon pids from cluster.json (the last resort of `Drop` kills these).
    pids: Vec<u32>,
    /// Daemons a test restarted by hand ([`Cluster::restart_daemon`]).
    restarted: std::sync::Mutex<Vec<std::process::Child>>,
}

/// One host of a [`Cluster`]; the [`Daemon`] helpers pass
/// `--cluster NAME --host hI`.
pub struct ClusterHost {
    /// `h0`, `h1`, ...
    pub name: String,
    pub cluster: String,
    /// Its network namespace (`ip netns exec` into it to look at links).
    pub netns: String,
    /// Its address on the fabric, `10.249.0.(i+1)`.
    pub ip: String,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    daemon: Daemon,
}

impl Deref for ClusterHost {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl ClusterHost {
    /// The daemon's pid as recorded in cluster.json.
    pub fn daemon_pid(&self) -> Option<u32> {
        let v = cluster_json(&self.cluster)?;
        let h = v["hosts"]
            .as_array()?
            .iter()
            .find(|h| h["name"] == self.name.as_str())?;
        h["pid"].as_u64().map(|p| p as u32)
    }

    /// Runs `argv` inside this host's network namespace.
    pub fn netns_exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(argv)
            .output()
            .expect("run ip netns exec")
    }

    /// The end of this host's daemon log (for assertion messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

fn cluster_json(name: &str) -> Option<Value> {
    let b = std::fs::read(Path::new("/run/snowflock").join(name).join("cluster.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

impl Cluster {
    /// `snowflock cluster up --hosts n --name <unique> <extra_args>`; panics
    /// (after cleaning up) unless it succeeds.
    pub fn up(n: usize, extra_args: &[&str]) -> Cluster {
        static CLUSTER_SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = CLUSTER_SEQ.fetch_add(1, Ordering::SeqCst);
        // `t` + 4 digits of the pid + a sequence number: unique per test, and
        // at most 8 characters (the CLI's limit on cluster names).
        let name = format!("t{:04}{seq}", std::process::id() % 10000);
        assert!(name.len() <= 8, "too many clusters in one test binary");
        // The guard exists before the command runs, so a failure cleans up too.
        let mut c = Cluster {
            name,
            hosts: Vec::new(),
            pids: Vec::new(),
            restarted: Default::default(),
        };
        let out = Command::new(bin("snowflock"))
            .args([
                "cluster",
                "up",
                "--hosts",
                &n.to_string(),
                "--name",
                &c.name,
            ])
            .args(extra_args)
            .stdin(Stdio::null())
            .output()
            .expect("run snowflock cluster up");
        assert!(
            out.status.success(),
            "cluster up failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v = cluster_json(&c.name).expect("cluster.json after cluster up");
        for h in v["hosts"].as_array().expect("hosts") {
            let s = |k: &str| h[k].as_str().unwrap_or_default().to_string();
            c.pids.extend(h["pid"].as_u64().map(|p| p as u32));
            c.hosts.push(ClusterHost {
                daemon: Daemon::new(["--cluster", c.name.as_str(), "--host", &s("name")]),
                name: s("name"),
                cluster: c.name.clone(),
                netns: s("netns"),
                ip: s("ip"),
                socket: PathBuf::from(s("socket")),
                state_dir: PathBuf::from(s("state_dir")),
                log: PathBuf::from(s("log")),
            });
        }
        assert_eq!(
            c.hosts.len(),
            n,
            "cluster.json lists {} hosts",
            c.hosts.len()
        );
        c
    }

    pub fn host(&self, i: usize) -> &ClusterHost {
        &self.hosts[i]
    }

    /// The host called `name` (`h0`, `h1`, ...).
    pub fn host_named(&self, name: &str) -> &ClusterHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the cluster"))
    }

    /// Network namespace of host `i` (`NAME-hI`).
    pub fn netns(&self, i: usize) -> String {
        format!("{}-h{i}", self.name)
    }

    /// The namespace holding the fabric bridge `fab` (`NAME-fab`).
    pub fn fabric_netns(&self) -> String {
        format!("{}-fab", self.name)
    }

    /// `/run/snowflock/NAME`: cluster.json, key, hI/{host.toml,snowflockd.sock,snowflockd.log}.
    pub fn config_dir(&self) -> PathBuf {
        Path::new("/run/snowflock").join(&self.name)
    }

    /// `/dev/shm/snowflock-NAME`: the hosts' state directories.
    pub fn state_root(&self) -> PathBuf {
        PathBuf::from(format!("/dev/shm/snowflock-{}", self.name))
    }

    /// A `snowflock` command with `--cluster NAME` (for `cluster status` and such).
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin("snowflock"));
        c.args(["--cluster", &self.name]).stdin(Stdio::null());
        c
    }

    /// `snowflock cluster status --json`.
    pub fn status(&self) -> Value {
        let o = self
            .cli()
            .args(["cluster", "status", "--json"])
            .output()
            .expect("run snowflock cluster status");
        assert!(
            o.status.success(),
            "cluster status failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("cluster status --json")
    }

    /// Starts host `i`'s daemon again (after a test killed it), in its
    /// namespace with its own `host.toml`; waits until it answers. `Drop`
    /// stops it like the others.
    pub fn restart_daemon(&self, i: usize) -> u32 {
        let h = &self.hosts[i];
        let config = self.config_dir().join(&h.name).join("host.toml");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&h.log)
            .expect("open daemon log");
        let child = Command::new("ip")
            .args(["netns", "exec", &h.netns])
            .arg(bin("snowflockd"))
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start snowflockd");
        let pid = child.id();
        self.restarted.lock().unwrap().push(child);
        let up = wait_until(Duration::from_secs(30), || {
            h.run(&["daemon", "status"]).status.success().then_some(())
        });
        assert!(
            up.is_some(),
            "{}'s daemon did not come back:\n{}",
            h.name,
            h.log_tail()
        );
        pid
    }

    /// This cluster's namespaces that exist now.
    pub fn existing_netns(&self) -> Vec<String> {
        let prefix = format!("{}-", self.name);
        let mut v: Vec<String> = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| {
                n.strip_prefix(&prefix).is_some_and(|r| {
                    r == "fab"
                        || r.strip_prefix('h')
                            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                })
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut pids = self.pids.clone();
        let mut restarted =
            std::mem::take(&mut *self.restarted.lock().unwrap_or_else(|e| e.into_inner()));
        pids.extend(restarted.iter().map(|c| c.id()));
        if let Some(v) = cluster_json(&self.name) {
            pids.extend(
                v["hosts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|h| h["pid"].as_u64().map(|p| p as u32)),
            );
            // The cluster's Slurm daemons (`--slurm`), which carry its
            // directory in their environment.
            pids.extend(
                v["slurm"]["procs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["pid"].as_u64().map(|p| p as u32)),
            );
        }
        match self
            .cli()
            .args(["cluster", "down", "--name", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cluster down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot run cluster down {}: {e}", self.name),
        }
        // Last resort, for a CLI that failed or crashed.
        for pid in pids {
            let mut cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmd.extend(std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default());
            if pid_alive(pid)
                && String::from_utf8_lossy(&cmd).contains(&format!("/run/snowflock/{}/", self.name))
            {
                // A daemon pid this cluster recorded, still running its config.
                signal(pid, libc::SIGKILL);
            }
        }
        for child in &mut restarted {
            let _ = child.wait();
        }
        for ns in self.existing_netns() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = std::fs::remove_dir_all(self.state_root());
        let _ = std::fs::remove_dir_all(self.config_dir());
    }
}

/// Whether a remote clone's `stats --json` show pages from its origin:
/// fetched over TCP, or multicast copies of pages a clone on another host
/// faulted first (with multicast on, a clone may have fetched nothing
/// itself).
pub fn got_pages_from_origin(s: &Value) -> bool {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    n("bytes_fetched") > 0 || n("mcast_pages") > 0
}

/// The clones of `ticket` in a VM list, by clone ID.
pub fn clones_of(vms: &[Value], ticket: &str) -> Vec<Value> {
    let mut v: Vec<Value> = vms
        .iter()
        .filter(|v| v["ticket"] == ticket)
        .cloned()
        .collect();
    v.sort_by_key(|v| v["clone_id"].as_u64());
    v
}

/// Waits (bounded) until `h` lists `vm` among the VMs that ended on their
/// own; returns that entry (with the reason).
pub fn wait_for_loss(h: &Daemon, vm: &str, timeout: Duration) -> Value {
    wait_until(timeout, || {
        let st: Value = serde_json::from_str(&h.ok(&["daemon", "status", "--json"])).ok()?;
        st["recent_losses"]
            .as_array()?
            .iter()
            .find(|l| l["vm"] == vm)
            .cloned()
    })
    .unwrap_or_else(|| panic!("{vm} must be stopped within {timeout:?}"))
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a process exists.
pub fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Sends `sig` to a process this test started (or its daemon started).
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

/// Processes whose command line mentions `needle` (to check for leftovers).
pub fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(needle) {
                    out.push(pid);
                }
            }
        }
    }
    out
}
