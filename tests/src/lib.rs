//! Test infrastructure for snowflock integration tests.
//!
//! Tests drive the real `snowflock` CLI against real `snowflockd` daemons,
//! each in a network namespace the test creates, booting real guests under
//! QEMU. Every resource has a guard whose `Drop` removes it, so a failing
//! test cleans up too.

use serde_json::Value;
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
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

pub fn kernel_dir() -> PathBuf {
    let cache = std::env::var("SNOWFLOCK_CACHE").unwrap_or_else(|_| "/var/cache/snowflock".into());
    PathBuf::from(cache).join("kernel/current")
}

/// Whether VM tests can run here. With `SNOWFLOCK_REQUIRE_VM=1` (as in
/// `make test` and CI) a missing prerequisite fails the test instead.
pub fn vm_prereqs() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    if !kernel_dir().join("vmlinux").exists() {
        missing.push(format!("{} (run scripts/fetch-kernel.sh)", kernel_dir().join("vmlinux").display()));
    }
    for b in ["snowflock", "snowflockd"] {
        if !bin(b).exists() {
            missing.push(format!("{} (run make build)", bin(b).display()));
        }
    }
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
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

/// A guest image built for this test binary, removed on drop.
pub struct TestImage {
    pub dir: tempfile::TempDir,
}

impl TestImage {
    /// Builds the image with `snowflock image build`, adding `extra` files.
    pub fn build(extra: &[(&Path, &str)]) -> TestImage {
        let dir = tempfile::Builder::new().prefix("sf-img").tempdir().expect("tempdir");
        let mut cmd = Command::new(bin("snowflock"));
        cmd.args(["image", "build", "--out"]).arg(dir.path());
        for (src, dest) in extra {
            cmd.arg("--add").arg(format!("{}:{dest}", src.display()));
        }
        let out = cmd.output().expect("run snowflock image build");
        assert!(out.status.success(), "image build failed: {}", String::from_utf8_lossy(&out.stderr));
        TestImage { dir }
    }

    pub fn path(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 path")
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A "physical host": a network namespace with its own snowflockd.
pub struct Host {
    pub name: String,
    pub netns: String,
    pub socket: PathBuf,
    pub state: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Host {
    pub fn start(name: &str) -> Host {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let netns = format!("sft{}x{n}", std::process::id() % 100000);
        let tmp = tempfile::Builder::new().prefix("sfh").tempdir_in("/tmp").expect("tempdir");
        let state = PathBuf::from(format!("/dev/shm/sft-{}-{n}", std::process::id()));
        let h = Host { name: name.into(), netns, socket: tmp.path().join("d.sock"), state, _tmp: tmp };
        let out = h
            .cli()
            .args(["daemon", "start", "--netns", &h.netns, "--host", name, "--state-dir"])
            .arg(&h.state)
            .output()
            .expect("run snowflock daemon start");
        assert!(out.status.success(), "daemon start failed: {}", String::from_utf8_lossy(&out.stderr));
        h
    }

    /// A `snowflock` command aimed at this host's daemon.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin("snowflock"));
        c.arg("--socket").arg(&self.socket).stdin(Stdio::null());
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
        let out = self.ok(&["vm", "start", name, "--image", image.path(), "--mem", mem, "--json"]);
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

    /// Like [`Host::sh`] but asserts exit code 0 and returns stdout.
    pub fn sh_ok(&self, vm: &str, script: &str) -> String {
        let (code, out, err) = self.sh(vm, script);
        assert_eq!(code, 0, "in {vm}: `{script}` failed: {out}{err}");
        out
    }

    pub fn vms(&self) -> Vec<Value> {
        let out = self.ok(&["vm", "list", "--json"]);
        serde_json::from_str::<Value>(&out).expect("vm list --json").as_array().cloned().unwrap_or_default()
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
            // SAFETY: signalling a pid we started.
            if unsafe { libc::kill(pid as i32, 0) } == 0 {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if Path::new("/run/netns").join(&self.netns).exists() {
            let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
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
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Processes whose command line mentions `needle` (to check for leftovers).
pub fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(needle) {
                    out.push(pid);
                }
            }
        }
    }
    out
}
