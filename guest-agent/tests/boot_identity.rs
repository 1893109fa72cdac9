//! `snowflock-agent --boot-identity` run on the host in dry mode
//! (`SNOWFLOCK_AGENT_DRY_IDENTITY=1`): the identity from a fake kernel
//! command line is checked and logged, never applied; page reporting goes
//! to a fake sysfs; readiness goes to a fake systemd notification socket.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("sfa-boot-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent process, killed by pid on drop; its log printed when the test
/// failed.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", log_text(&self.log));
        }
    }
}

fn log_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

const CMDLINE: &str = "console=ttyS0 sf.vm=vm1 sf.hostname=vm1-h sf.ip=10.250.3.2/24 \
     sf.mac=52:54:00:00:00:02 sf.machine_id=0123456789abcdef0123456789abcdef";

fn start(dir: &Path, notify: &Path, n: usize) -> Agent {
    let log = dir.join(format!("agent{n}.log"));
    let logf = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_snowflock-agent"))
        .arg("--boot-identity")
        // Nobody listens there: the agent waits for its channel.
        .env(
            "SNOWFLOCK_AGENT_PORT",
            format!("unix:{}", dir.join("port.sock").display()),
        )
        .env("SNOWFLOCK_AGENT_SOCKET", dir.join("run").join("agent.sock"))
        .env("SNOWFLOCK_AGENT_SIBLING_PORT", "0")
        .env("SNOWFLOCK_AGENT_CONFIG", dir.join("agent.toml"))
        .env("SNOWFLOCK_AGENT_SYSFS", dir.join("sys"))
        .env("SNOWFLOCK_AGENT_DRY_IDENTITY", "1")
        .env("SNOWFLOCK_AGENT_CMDLINE", CMDLINE)
        .env("NOTIFY_SOCKET", notify)
        .env("SNOWFLOCK_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    Agent { child, log }
}

/// The next notification on `rx` (retrying interrupted reads).
fn notification(rx: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    loop {
        match rx.recv(&mut buf) {
            Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("no notification from the agent: {e}"),
        }
    }
}

fn wait_log(agent: &Agent, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !log_text(&agent.log).contains(what) {
        assert!(Instant::now() < deadline, "timed out waiting for {what:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn boot_identity_once_per_boot_then_ready() {
    let dir = TempDir::new("once");
    let order = dir
        .0
        .join("sys/module/page_reporting/parameters/page_reporting_order");
    std::fs::create_dir_all(order.parent().unwrap()).unwrap();
    std::fs::write(&order, "9\n").unwrap();
    std::fs::write(
        dir.0.join("agent.toml"),
        "[network]\ninterface = \"ens3\"\n[balloon]\nreporting_order = 2\n",
    )
    .unwrap();
    let notify = dir.0.join("notify");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(WAIT)).unwrap();

    let a = start(&dir.0, &notify, 1);
    assert_eq!(notification(&rx), "READY=1");
    // READY comes after the boot identity and the API socket.
    let log = log_text(&a.log);
    for step in [
        "Dry boot identity, not applied: hostname vm1-h",
        "Dry boot identity, not applied: machine-id 0123456789abcdef0123456789abcdef",
        "Dry boot identity, not applied: ens3 MAC 52:54:00:00:00:02",
        "Dry boot identity, not applied: ens3 address 10.250.3.2/24",
        "Dry boot identity, not applied: ens3 up",
        "Dry boot identity, not applied: lo up",
        "Dry boot identity, not applied: page_reporting_order 0",
        "API socket listening",
    ] {
        assert!(log.contains(step), "{step:?} missing from the log");
    }
    assert!(dir.0.join("run/boot-identity").is_file());
    // [balloon] reporting_order is applied after the boot identity's 0.
    wait_log(&a, "Free page reporting order is 2");
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "2");
    drop(a);

    // Restarted in the same boot: no second boot identity, still ready.
    let b = start(&dir.0, &notify, 2);
    assert_eq!(notification(&rx), "READY=1");
    let log = log_text(&b.log);
    assert!(log.contains("Boot identity already applied in this boot"));
    assert!(!log.contains("hostname vm1-h"));
}

#[test]
fn unknown_options_are_usage_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_snowflock-agent"))
        .arg("--no-such-option")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_snowflock-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--boot-identity"));
}
