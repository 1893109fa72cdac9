//! `sf-exec` between real agents: three `snowflock-agent` processes on
//! loopback addresses (127.0.0.2 and .3 share a flock key, .4 has its
//! own), each with its own state directory, and real `sf-exec` processes.
//! No host daemon is needed: sibling commands never go through the host.
//! The VM tests (`tests/tests/mpi.rs`) do the same across real VMs.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- agent log {} ---\n{}",
                self.dir.display(),
                std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free TCP port on loopback (bound and released; good enough here).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts an agent whose flock address is `ip`/8 with the flock key
/// `key` (64 hex digits), its runner on `ip:port`.
fn agent(tag: &str, ip: &str, key: &str, port: u16) -> Agent {
    let dir = std::env::temp_dir().join(format!("sfx-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("run")).unwrap();
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join("run").join("flock.key"))
            .unwrap();
        f.write_all(key.as_bytes()).unwrap();
    }
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_snowflock-agent"))
        // Nobody listens there: API calls to the host would fail, and
        // sf-exec does not make any.
        .env(
            "SNOWFLOCK_AGENT_PORT",
            format!("unix:{}", dir.join("port.sock").display()),
        )
        .env("SNOWFLOCK_AGENT_SOCKET", dir.join("run").join("agent.sock"))
        .env("SNOWFLOCK_AGENT_CONFIG", dir.join("agent.toml"))
        .env("SNOWFLOCK_AGENT_DRY_IDENTITY", "1")
        .env(
            "SNOWFLOCK_AGENT_CMDLINE",
            format!("sf.vm={tag} sf.ip={ip}/8"),
        )
        .env("SNOWFLOCK_AGENT_SIBLING_PORT", port.to_string())
        .env("SNOWFLOCK_AGENT_SIBLING_LISTEN", ip)
        .env("SNOWFLOCK_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let a = Agent { child, dir };
    wait_for("the agent's runner", || {
        std::net::TcpStream::connect((ip, port)).is_ok() && a.dir.join("run/agent.sock").exists()
    });
    a
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `sf-exec ARGS` as a caller in `from`'s VM.
fn sf_exec(from: &Agent, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sf-exec"));
    c.args(args)
        .env("SNOWFLOCK_AGENT_SOCKET", from.dir.join("run/agent.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn finish(child: Child) -> Output {
    // Read while waiting: a command with much output would block on a
    // full pipe otherwise.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(WAIT) {
        Ok(out) => out,
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("sf-exec did not finish in time");
        }
    }
}

/// Starts `sleep 1000` on 127.0.0.3 through `from`; returns the `sf-exec`
/// process and the remote command's pid, which it wrote to `marker`.
fn remote_sleep(from: &Agent, marker: &Path) -> (Child, i32) {
    let c = sf_exec(
        from,
        &[
            "127.0.0.3",
            &format!("echo $$ > {}; exec sleep 1000", marker.display()),
        ],
    )
    .stdin(Stdio::null())
    .spawn()
    .unwrap();
    wait_for("the remote command", || {
        std::fs::read_to_string(marker).is_ok_and(|s| s.ends_with('\n'))
    });
    let pid = std::fs::read_to_string(marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (c, pid)
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn ended(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_KEY: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

#[test]
fn sf_exec_runs_commands_in_siblings_and_refuses_everything_else() {
    let port = free_port();
    let a = agent("a", "127.0.0.2", KEY, port);
    let b = agent("b", "127.0.0.3", KEY, port);
    let stranger = agent("c", "127.0.0.4", OTHER_KEY, port);

    // stdin in, stdout and stderr out, the exit status back.
    let mut c = sf_exec(
        &a,
        &[
            "127.0.0.3",
            "--",
            "read x; echo out:$x:$(cat); echo err >&2; exit 7",
        ],
    )
    .spawn()
    .unwrap();
    c.stdin.take().unwrap().write_all(b"hello\nrest\n").unwrap();
    let out = finish(c);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out:hello:rest\n");
    assert_eq!(text(&out.stderr), "err\n");

    // The command runs through /bin/sh -c with the words joined, as ssh
    // does, in the caller's directory; `-n` gives it no stdin.
    let out = finish(
        sf_exec(
            &b,
            &["-n", "127.0.0.2", "echo", "$((6*7))", ";", "pwd;", "cat"],
        )
        .current_dir("/tmp")
        .spawn()
        .unwrap(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "42\n/tmp\n");

    // Large output arrives whole and in order.
    let out = finish(
        sf_exec(&a, &["127.0.0.3", "seq 1 200000"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(out.status.success());
    let expect: String = (1..=200000).map(|i| format!("{i}\n")).collect();
    assert!(text(&out.stdout) == expect, "output differs");

    // Signals reach the command's process group.
    let mut c = sf_exec(
        &a,
        &[
            "127.0.0.3",
            "trap 'echo got-term; exit 5' TERM; echo ready; sleep 30 & wait",
        ],
    )
    .stdin(Stdio::null())
    .spawn()
    .unwrap();
    let mut so = c.stdout.take().unwrap();
    let mut first = [0u8; 6];
    so.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut rest = String::new();
    so.read_to_string(&mut rest).unwrap();
    let out = finish(c);
    assert_eq!(rest, "got-term\n");
    assert_eq!(out.status.code(), Some(5));

    // A command killed by a signal reports 128 + N.
    let out = finish(sf_exec(&a, &["127.0.0.3", "kill -9 $$"]).spawn().unwrap());
    assert_eq!(out.status.code(), Some(128 + 9));

    // Refusals: one line, status 255, nothing run.
    for (host, why) in [
        ("10.1.2.3", "is not in this VM's flock network 127.0.0.0/8"),
        ("127.0.0.2", "this VM's own address"),
        ("node7", "is not an IPv4 address"),
        ("127.0.0.4", "did not accept this VM as a sibling"),
        ("127.0.0.9", "cannot reach 127.0.0.9"),
    ] {
        let out = finish(
            sf_exec(&a, &[host, "touch /tmp/sfx-must-not-exist"])
                .spawn()
                .unwrap(),
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(255), "{host}: {err}");
        assert!(err.contains(why), "{host}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(!Path::new("/tmp/sfx-must-not-exist").exists());

    // A flood of connections that never finish the handshake: past the
    // cap the runner closes new ones at once (so its threads are not used
    // up), and serves again once the flood ends.
    let flood: Vec<std::net::TcpStream> = (0..256)
        .map(|_| std::net::TcpStream::connect(("127.0.0.3", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let out = finish(sf_exec(&a, &["127.0.0.3", "true"]).spawn().unwrap());
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    drop(flood);
    wait_for("the runner to serve again", || {
        finish(sf_exec(&a, &["127.0.0.3", "true"]).spawn().unwrap())
            .status
            .success()
    });

    // A stranger with its own key cannot run anything in the flock.
    let out = finish(sf_exec(&stranger, &["127.0.0.3", "true"]).spawn().unwrap());
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("did not accept"),
        "{}",
        text(&out.stderr)
    );

    // Not root: the command runs as the caller, not as the agent.
    if nix::unistd::getuid().is_root() {
        let out = finish(
            sf_exec(&a, &["127.0.0.3", "id -u; id -g"])
                .uid(65534)
                .gid(65534)
                .current_dir("/")
                .spawn()
                .unwrap(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "65534\n65534\n");
    }

    // A caller that dies leaves nothing running on the sibling.
    let (mut c, pid) = remote_sleep(&a, &b.dir.join("pid"));
    c.kill().unwrap();
    c.wait().unwrap();
    wait_for("the abandoned command to be ended", || ended(pid));

    // A sibling that stops answering (its VM frozen or lost) is given up
    // after the timeout, with a clear line.
    let (c, pid) = remote_sleep(&a, &b.dir.join("pid2"));
    let bpid = nix::unistd::Pid::from_raw(b.child.id() as i32);
    nix::sys::signal::kill(bpid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let out = finish(c);
    nix::sys::signal::kill(bpid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("no word from it"),
        "{}",
        text(&out.stderr)
    );
    // Once it runs again, the sibling ends the command its caller gave up.
    wait_for("the given-up command to be ended", || ended(pid));
    drop(stranger);
}
