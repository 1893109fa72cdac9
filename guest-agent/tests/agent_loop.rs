//! Runs the real `snowflock-agent` on the host, playing the host daemon over
//! a Unix socket (`SNOWFLOCK_AGENT_PORT=unix:...`), with apps (`sf`, a raw
//! socket client, Python, C) on the API socket in a temp dir. Identity
//! changes are dry (`SNOWFLOCK_AGENT_DRY_IDENTITY=1`): nothing on the host
//! is touched.

use snowflock_proto::api::{ApiErrorCode, ApiRequest, ApiResponse, ChildState, ChildStatus};
use snowflock_proto::channel::{
    decode_line, encode_line, CloneIdentity, GuestMsg, HostMsg, LineReader, Stream,
};
use snowflock_proto::frame;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!("sfa-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent process; killed by PID on drop. Its log is printed when the
/// test failed.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Any other child process (apps) killed on drop.
struct Guard(Option<Child>);

impl Guard {
    fn output(mut self) -> Output {
        let child = self.0.take().unwrap();
        wait_output(child)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_output(mut child: Child) -> Output {
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// The test's side of the channel.
struct Host {
    s: UnixStream,
    lines: LineReader,
    queue: VecDeque<GuestMsg>,
}

impl Host {
    /// Answers the agent's request `id`.
    fn respond(&mut self, id: u64, resp: ApiResponse) {
        self.send(&HostMsg::Response { id, resp });
    }

    fn send(&mut self, m: &HostMsg) {
        self.s.write_all(&encode_line(m)).unwrap();
    }

    fn send_raw(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Next message matching `pred`; others are kept for later calls.
    fn expect(&mut self, what: &str, pred: impl Fn(&GuestMsg) -> bool) -> GuestMsg {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.queue.iter().position(&pred) {
                return self.queue.remove(i).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {:?}",
                self.queue
            );
            let mut buf = [0u8; 65536];
            match self.s.read(&mut buf) {
                Ok(0) => panic!("agent closed the channel while waiting for {what}"),
                Ok(n) => {
                    let q = &mut self.queue;
                    self.lines.feed(&buf[..n], |l| {
                        q.push_back(decode_line(l.unwrap()).expect("agent sent a bad line"))
                    });
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => panic!("channel read failed: {e}"),
            }
        }
    }

    fn request(&mut self) -> (u64, ApiRequest) {
        match self.expect("a request", |m| matches!(m, GuestMsg::Request { .. })) {
            GuestMsg::Request { id, req } => (id, req),
            _ => unreachable!(),
        }
    }

    fn hello(&mut self) -> u32 {
        self.send(&HostMsg::Hello {
            version: snowflock_proto::CHANNEL_VERSION,
        });
        match self.expect("hello", |m| matches!(m, GuestMsg::Hello { .. })) {
            GuestMsg::Hello {
                version,
                agent,
                clone_id,
                ..
            } => {
                assert_eq!(version, snowflock_proto::CHANNEL_VERSION);
                assert_eq!(agent, env!("CARGO_PKG_VERSION"));
                clone_id
            }
            _ => unreachable!(),
        }
    }
}

/// Fields drop in order: the agent dies before its directory goes.
struct Env {
    _agent: Agent,
    listener: UnixListener,
    dir: TempDir,
}

impl Env {
    fn start(tag: &str) -> Env {
        let dir = TempDir::new(tag);
        let port = dir.0.join("port.sock");
        let listener = UnixListener::bind(&port).unwrap();
        let log = dir.0.join("agent.log");
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_snowflock-agent"))
            .env("SNOWFLOCK_AGENT_PORT", format!("unix:{}", port.display()))
            .env("SNOWFLOCK_AGENT_SOCKET", dir.0.join("agent.sock"))
            .env("SNOWFLOCK_AGENT_CONFIG", dir.0.join("agent.toml"))
            .env("SNOWFLOCK_AGENT_DRY_IDENTITY", "1")
            .env("SNOWFLOCK_AGENT_SIBLING_PORT", "0")
            .env(
                "SNOWFLOCK_AGENT_CMDLINE",
                "console=ttyS0 sf.vm=vm1 sf.ip=10.250.0.1/24",
            )
            .env("SNOWFLOCK_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap();
        let env = Env {
            dir,
            listener,
            _agent: Agent { child, log },
        };
        let deadline = Instant::now() + WAIT;
        while !env.sock().exists() {
            assert!(Instant::now() < deadline, "agent socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        env
    }

    fn sock(&self) -> PathBuf {
        self.dir.0.join("agent.sock")
    }

    /// Accepts the agent's channel connection.
    fn host(&self) -> Host {
        self.listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + WAIT;
        let s = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "agent never connected to the port"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut h = Host {
            s,
            lines: LineReader::new(),
            queue: VecDeque::new(),
        };
        // The agent announces itself when it opens the channel.
        h.expect("unsolicited hello", |m| matches!(m, GuestMsg::Hello { .. }));
        h
    }

    /// Starts `sf ARGS` against this agent.
    fn sf(&self, args: &[&str]) -> Guard {
        Guard(Some(
            Command::new(env!("CARGO_BIN_EXE_sf"))
                .args(args)
                .env("SNOWFLOCK_AGENT_SOCKET", self.sock())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    }

    /// Runs `sf ARGS` to completion; the agent answers without the host.
    fn sf_done(&self, args: &[&str]) -> Output {
        self.sf(args).output()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn identity(clone_id: u32, mac: &str) -> CloneIdentity {
    CloneIdentity {
        clone_id,
        ticket: "t-abc".into(),
        vm: format!("vm1-tabc-c{clone_id}"),
        hostname: format!("vm1-c{clone_id}"),
        machine_id: "00112233445566778899aabbccddeeff".into(),
        mac: mac.into(),
        ip_cidr: format!("10.250.0.{}/24", clone_id + 1),
        seed: vec![9; 64],
        unix_time_ns: 1_700_000_000_000_000_000,
    }
}

/// One raw API exchange on an existing connection.
fn raw_call(s: &mut UnixStream, req: &ApiRequest) -> ApiResponse {
    frame::write_frame(s, req).unwrap();
    frame::read_frame(s).unwrap()
}

#[test]
fn api_calls_are_forwarded_and_answered() {
    let env = Env::start("api");
    // Id is local: it works before the host is even connected.
    let out = env.sf_done(&["id"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "clone_id=0 ticket=- vm=vm1 ip=10.250.0.1\n"
    );

    let mut host = env.host();
    assert_eq!(host.hello(), 0);

    // sf ticket 2
    let app = env.sf(&["ticket", "2"]);
    let (id, req) = host.request();
    assert_eq!(
        req,
        ApiRequest::RequestTicket {
            n: 2,
            independent: None
        }
    );
    host.respond(
        id,
        ApiResponse::Ticket {
            ticket: "t-abc".into(),
            granted: 2,
        },
    );
    let out = app.output();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "t-abc\n");
    assert_eq!(text(&out.stderr), "granted 2 of 2\n");

    // In the parent, the host answers the clone with 0.
    let app = env.sf(&["clone", "t-abc"]);
    let (id, req) = host.request();
    assert_eq!(
        req,
        ApiRequest::Clone {
            ticket: "t-abc".into()
        }
    );
    host.respond(
        id,
        ApiResponse::Cloned {
            clone_id: 0,
            ticket: "t-abc".into(),
        },
    );
    let out = app.output();
    assert_eq!(text(&out.stdout), "0\n");

    // join and kill print one line per child.
    let kids = vec![
        ChildStatus {
            clone_id: 1,
            vm: "c1".into(),
            ip: None,
            state: ChildState::Exited { code: 0 },
        },
        ChildStatus {
            clone_id: 2,
            vm: "c2".into(),
            ip: None,
            state: ChildState::Lost {
                reason: "clone QEMU process died".into(),
            },
        },
    ];
    let app = env.sf(&["join", "t-abc"]);
    let (id, req) = host.request();
    assert_eq!(
        req,
        ApiRequest::Join {
            ticket: "t-abc".into()
        }
    );
    host.respond(
        id,
        ApiResponse::Joined {
            children: kids.clone(),
        },
    );
    let out = app.output();
    assert_eq!(
        text(&out.stdout),
        "1 exited 0\n2 lost clone QEMU process died\n"
    );

    let app = env.sf(&["kill", "t-abc"]);
    let (id, _) = host.request();
    let killed = vec![ChildStatus {
        clone_id: 1,
        vm: "c1".into(),
        ip: None,
        state: ChildState::Killed,
    }];
    host.respond(id, ApiResponse::Killed { children: killed });
    assert_eq!(text(&app.output().stdout), "1 killed\n");

    // API errors from the host reach the user verbatim.
    let app = env.sf(&["exit", "3"]);
    let (id, req) = host.request();
    assert_eq!(req, ApiRequest::Exit { status: 3 });
    host.respond(
        id,
        ApiResponse::Error {
            code: ApiErrorCode::WrongRole,
            message: "sf_exit is for clones only".into(),
        },
    );
    let out = app.output();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "sf: error: sf_exit is for clones only\n");

    // An accepted exit blocks forever (the VM is going away).
    let app = env.sf(&["exit"]);
    let (id, _) = host.request();
    host.respond(id, ApiResponse::Exiting);
    std::thread::sleep(Duration::from_millis(300));
    let mut app = app;
    assert!(
        app.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "sf exit returned"
    );
    drop(app);

    // Bad input is rejected by the agent without bothering the host.
    let out = env.sf_done(&["clone", "nonsense"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "sf: error: Malformed ticket \"nonsense\"\n"
    );
    let out = env.sf_done(&["ticket", "0"]);
    assert_eq!(
        text(&out.stderr),
        "sf: error: Clone count must be between 1 and 1024, got 0\n"
    );
    // Usage errors exit 2.
    assert_eq!(env.sf_done(&["frobnicate"]).status.code(), Some(2));

    // Responses for unknown ids are dropped; the channel keeps working.
    host.respond(999_999, ApiResponse::Exiting);
    host.send(&HostMsg::Ping { seq: 1 });
    host.expect("pong", |m| *m == GuestMsg::Pong { seq: 1 });
}

#[test]
fn exec_sessions_stream_output_and_exit_codes() {
    let env = Env::start("exec");
    let mut host = env.host();
    host.hello();

    host.send(&HostMsg::ExecStart {
        exec: 1,
        argv: vec!["/bin/echo".into(), "hi".into()],
        env: vec![],
    });
    host.expect("echo output", |m| {
        *m == GuestMsg::ExecOutput {
            exec: 1,
            stream: Stream::Stdout,
            data: b"hi\n".to_vec(),
        }
    });
    host.expect("echo exit", |m| {
        *m == GuestMsg::ExecExit { exec: 1, code: 0 }
    });

    host.send(&HostMsg::ExecStart {
        exec: 2,
        argv: vec!["/bin/nope".into()],
        env: vec![],
    });
    host.expect("spawn error", |m| {
        *m == GuestMsg::ExecError {
            exec: 2,
            message: "No such file or directory: /bin/nope".into(),
        }
    });

    // stdin, env, stderr and a non-zero code.
    host.send(&HostMsg::ExecStart {
        exec: 3,
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat; echo \"$FOO\" >&2; exit 7".into(),
        ],
        env: vec![("FOO".into(), "bar".into())],
    });
    host.send(&HostMsg::ExecStdin {
        exec: 3,
        data: b"abc\n".to_vec(),
        eof: true,
    });
    let mut out = Vec::new();
    let mut err = Vec::new();
    loop {
        match host.expect("exec 3", |m| {
            matches!(
                m,
                GuestMsg::ExecOutput { exec: 3, .. } | GuestMsg::ExecExit { exec: 3, .. }
            )
        }) {
            GuestMsg::ExecOutput {
                stream: Stream::Stdout,
                data,
                ..
            } => out.extend(data),
            GuestMsg::ExecOutput {
                stream: Stream::Stderr,
                data,
                ..
            } => err.extend(data),
            GuestMsg::ExecExit { code, .. } => {
                assert_eq!(code, 7);
                break;
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(
        (text(&out), text(&err)),
        ("abc\n".to_string(), "bar\n".to_string())
    );

    // Large output comes in chunks of at most MAX_CHUNK bytes, all of it.
    host.send(&HostMsg::ExecStart {
        exec: 4,
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "head -c 200000 /dev/zero".into(),
        ],
        env: vec![],
    });
    let mut total = 0;
    loop {
        match host.expect("exec 4", |m| {
            matches!(
                m,
                GuestMsg::ExecOutput { exec: 4, .. } | GuestMsg::ExecExit { exec: 4, .. }
            )
        }) {
            GuestMsg::ExecOutput { data, .. } => {
                assert!(data.len() <= snowflock_proto::channel::MAX_CHUNK);
                total += data.len();
            }
            GuestMsg::ExecExit { code, .. } => {
                assert_eq!(code, 0);
                break;
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(total, 200_000);

    // ExecKill: SIGKILL gives 128 + 9.
    host.send(&HostMsg::ExecStart {
        exec: 5,
        argv: vec!["/bin/sleep".into(), "100".into()],
        env: vec![],
    });
    std::thread::sleep(Duration::from_millis(200));
    host.send(&HostMsg::ExecKill { exec: 5 });
    host.expect("kill exit", |m| {
        *m == GuestMsg::ExecExit { exec: 5, code: 137 }
    });

    // Exec'd processes inherit neither the port nor the API socket: only
    // 0, 1, 2 and ls's own directory fd are open.
    host.send(&HostMsg::ExecStart {
        exec: 6,
        argv: vec!["/bin/ls".into(), "/proc/self/fd".into()],
        env: vec![],
    });
    let fds = match host.expect("ls output", |m| {
        matches!(m, GuestMsg::ExecOutput { exec: 6, .. })
    }) {
        GuestMsg::ExecOutput { data, .. } => text(&data),
        _ => unreachable!(),
    };
    host.expect("ls exit", |m| *m == GuestMsg::ExecExit { exec: 6, code: 0 });
    assert_eq!(
        fds.split_whitespace().collect::<Vec<_>>(),
        ["0", "1", "2", "3"],
        "{fds}"
    );

    // An exec'd process can use the API (as a script calling `sf` would).
    host.send(&HostMsg::ExecStart {
        exec: 7,
        argv: vec![env!("CARGO_BIN_EXE_sf").into(), "id".into()],
        env: vec![],
    });
    host.expect("sf id via exec", |m| {
        *m == GuestMsg::ExecOutput {
            exec: 7,
            stream: Stream::Stdout,
            data: b"clone_id=0 ticket=- vm=vm1 ip=10.250.0.1\n".to_vec(),
        }
    });
    host.expect("sf id exit", |m| {
        *m == GuestMsg::ExecExit { exec: 7, code: 0 }
    });
}

#[test]
fn malformed_lines_do_not_break_the_channel() {
    let env = Env::start("malformed");
    let mut host = env.host();
    host.hello();
    host.send_raw(b"garbage\n{\"t\":\"nope\"}\n\x00\x01\x02\n{\"t\":\"ping\"}\n");
    // An over-long line is dropped up to its newline.
    host.send_raw(&vec![b'x'; snowflock_proto::channel::MAX_LINE + 100]);
    host.send_raw(b"\n");
    host.send(&HostMsg::Ping { seq: 42 });
    host.expect("pong after garbage", |m| *m == GuestMsg::Pong { seq: 42 });
    let out = env.sf_done(&["id"]);
    assert!(out.status.success());
}

#[test]
fn become_clone_applies_identity_and_answers_the_app() {
    let env = Env::start("clone");
    let mut host = env.host();
    host.hello();

    // A join pending in the parent when it is cloned has no answer in the clone.
    let join = env.sf(&["join", "t-01d"]);
    let (_join_id, _) = host.request();

    let app = env.sf(&["clone", "t-abc"]);
    let (id, req) = host.request();
    assert_eq!(
        req,
        ApiRequest::Clone {
            ticket: "t-abc".into()
        }
    );
    host.send(&HostMsg::BecomeClone {
        request_id: id,
        identity: identity(3, "52:54:00:00:00:03"),
    });
    host.expect("ready", |m| *m == GuestMsg::Ready { clone_id: 3 });
    let out = app.output();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "3\n");
    let out = join.output();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "sf: error: This VM became clone 3 while the call was pending; it has no answer\n"
    );

    let out = env.sf_done(&["id"]);
    assert_eq!(
        text(&out.stdout),
        "clone_id=3 ticket=t-abc vm=vm1-tabc-c3 ip=10.250.0.4\n"
    );
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.dir.0.join("identity.json")).unwrap())
            .unwrap();
    assert_eq!(rec["clone_id"], 3);
    assert_eq!(rec["mac"], "52:54:00:00:00:03");
    // The clone's Hello reports its new clone ID.
    assert_eq!(host.hello(), 3);

    // An identity that fails validation changes nothing and fails the call.
    let app = env.sf(&["clone", "t-abc"]);
    let (id, _) = host.request();
    host.send(&HostMsg::BecomeClone {
        request_id: id,
        identity: identity(4, "01:00:5e:00:00:01"),
    });
    host.expect("clone failed", |m| {
        matches!(m, GuestMsg::CloneFailed { clone_id: 4, .. })
    });
    let out = app.output();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "sf: error: Cannot become clone 4: Malformed or multicast MAC \"01:00:5e:00:00:01\"\n"
    );
    assert!(text(&env.sf_done(&["id"]).stdout).starts_with("clone_id=3 "));

    // With no app waiting (it died), the identity is still applied.
    host.send(&HostMsg::BecomeClone {
        request_id: 12345,
        identity: identity(5, "52:54:00:00:00:05"),
    });
    host.expect("ready 5", |m| *m == GuestMsg::Ready { clone_id: 5 });
    assert!(text(&env.sf_done(&["id"]).stdout).starts_with("clone_id=5 "));
}

#[test]
fn hostile_api_clients_do_not_block_others() {
    let env = Env::start("hostile");
    let mut host = env.host();
    host.hello();

    // Garbage frame: BadRequest, and the connection stays usable.
    let mut bad = UnixStream::connect(env.sock()).unwrap();
    bad.set_read_timeout(Some(WAIT)).unwrap();
    bad.write_all(&[3, 0, 0, 0, b'{', b'{', b'{']).unwrap();
    match frame::read_frame::<_, ApiResponse>(&mut bad).unwrap() {
        ApiResponse::Error {
            code: ApiErrorCode::BadRequest,
            message,
        } => {
            assert!(message.starts_with("Malformed request: "), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        raw_call(&mut bad, &ApiRequest::Id),
        ApiResponse::Identity { clone_id: 0, .. }
    ));
    // Unknown op: BadRequest too.
    let mut unknown = 14u32.to_le_bytes().to_vec();
    unknown.extend_from_slice(br#"{"op":"nope"}x"#);
    bad.write_all(&unknown).unwrap();
    assert!(matches!(
        frame::read_frame::<_, ApiResponse>(&mut bad).unwrap(),
        ApiResponse::Error {
            code: ApiErrorCode::BadRequest,
            ..
        }
    ));

    // Huge length: an error, then the agent closes the connection.
    let mut huge = UnixStream::connect(env.sock()).unwrap();
    huge.set_read_timeout(Some(WAIT)).unwrap();
    huge.write_all(&u32::MAX.to_le_bytes()).unwrap();
    match frame::read_frame::<_, ApiResponse>(&mut huge) {
        Ok(ApiResponse::Error {
            code: ApiErrorCode::BadRequest,
            message,
        }) => {
            assert!(message.contains("exceeds the limit"), "{message}");
            assert!(matches!(
                frame::read_frame::<_, ApiResponse>(&mut huge),
                Err(frame::FrameError::Closed) | Err(frame::FrameError::Io(_))
            ));
        }
        Err(frame::FrameError::Closed) | Err(frame::FrameError::Io(_)) => {}
        other => panic!("{other:?}"),
    }

    // Stalled clients (silent, half a header, half a body) hold only their
    // own threads.
    let _silent = UnixStream::connect(env.sock()).unwrap();
    let mut half = UnixStream::connect(env.sock()).unwrap();
    half.write_all(&[10, 0]).unwrap();
    let mut body = UnixStream::connect(env.sock()).unwrap();
    body.write_all(&[100, 0, 0, 0, b'{']).unwrap();
    // ... and so does an app waiting on the host.
    let _waiting = env.sf(&["join", "t-1"]);
    let (_id, _) = host.request();

    let start = Instant::now();
    let out = env.sf_done(&["id"]);
    assert!(out.status.success());
    assert!(start.elapsed() < Duration::from_secs(5));
    let app = env.sf(&["ticket", "1"]);
    let (id, _) = host.request();
    host.respond(
        id,
        ApiResponse::Ticket {
            ticket: "t-2".into(),
            granted: 1,
        },
    );
    assert_eq!(text(&app.output().stdout), "t-2\n");
}

#[test]
fn host_reconnect_needs_a_new_hello() {
    let env = Env::start("reconnect");
    let mut host = env.host();
    host.hello();
    drop(host);
    // The agent reconnects; calls wait for the new Hello and then go through.
    let mut host = env.host();
    let app = env.sf(&["ticket", "3"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(host.queue.is_empty());
    host.hello();
    let (id, _) = host.request();
    host.respond(
        id,
        ApiResponse::Ticket {
            ticket: "t-3".into(),
            granted: 1,
        },
    );
    let out = app.output();
    assert_eq!(text(&out.stdout), "t-3\n");
    assert_eq!(text(&out.stderr), "granted 1 of 3\n");
}

#[test]
fn a_host_that_said_hello_to_a_previous_agent_is_accepted() {
    let env = Env::start("restart");
    let mut host = env.host();
    // No Hello (the host sent it to the agent that init replaced), but the
    // host talks: that is enough.
    host.send(&HostMsg::Ping { seq: 3 });
    host.expect("pong", |m| *m == GuestMsg::Pong { seq: 3 });
    let start = Instant::now();
    let app = env.sf(&["ticket", "1"]);
    let (id, _) = host.request();
    assert!(start.elapsed() < Duration::from_secs(5));
    host.respond(
        id,
        ApiResponse::Ticket {
            ticket: "t-4".into(),
            granted: 1,
        },
    );
    assert_eq!(text(&app.output().stdout), "t-4\n");
}

#[test]
fn without_a_host_calls_fail_after_ten_seconds() {
    let env = Env::start("nohost");
    // Never accept the channel connection.
    let start = Instant::now();
    let app = env.sf(&["ticket", "1"]);
    let mut child = app;
    let c = child.0.take().unwrap();
    let out = {
        let mut c = c;
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "sf never returned");
            std::thread::sleep(Duration::from_millis(50));
        }
        c.wait_with_output().unwrap()
    };
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "sf: error: The host daemon is not connected\n"
    );
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(15),
        "{took:?}"
    );
}

#[test]
fn sf_reports_a_missing_agent() {
    let dir = TempDir::new("noagent");
    let sock = dir.0.join("agent.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_sf"))
        .arg("id")
        .env("SNOWFLOCK_AGENT_SOCKET", &sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("sf: error: Cannot reach the snowflock agent at {}: No such file or directory (os error 2)\n", sock.display())
    );
}

/// Answers the ticket/clone/join/kill/exit sequence that the Python and C
/// clients below run.
fn serve_client_script(host: &mut Host) {
    let (id, req) = host.request();
    assert_eq!(
        req,
        ApiRequest::RequestTicket {
            n: 2,
            independent: None
        }
    );
    host.respond(
        id,
        ApiResponse::Ticket {
            ticket: "t-c0ffee".into(),
            granted: 2,
        },
    );
    let (id, req) = host.request();
    assert_eq!(
        req,
        ApiRequest::Clone {
            ticket: "t-c0ffee".into()
        }
    );
    host.respond(
        id,
        ApiResponse::Cloned {
            clone_id: 0,
            ticket: "t-c0ffee".into(),
        },
    );
    let (id, req) = host.request();
    assert_eq!(
        req,
        ApiRequest::Status {
            ticket: "t-c0ffee".into()
        }
    );
    host.respond(
        id,
        ApiResponse::Status {
            state: "active".into(),
            children: vec![ChildStatus {
                clone_id: 1,
                vm: "c1".into(),
                ip: Some("10.250.0.2".into()),
                state: ChildState::Running,
            }],
        },
    );
    let (id, req) = host.request();
    assert_eq!(
        req,
        ApiRequest::Join {
            ticket: "t-c0ffee".into()
        }
    );
    let kids = vec![
        ChildStatus {
            clone_id: 1,
            vm: "c1".into(),
            ip: None,
            state: ChildState::Exited { code: 5 },
        },
        ChildStatus {
            clone_id: 2,
            vm: "c2".into(),
            ip: None,
            state: ChildState::Killed,
        },
    ];
    host.respond(id, ApiResponse::Joined { children: kids });
    let (id, _) = host.request();
    host.respond(
        id,
        ApiResponse::Error {
            code: ApiErrorCode::TicketDiscarded,
            message: "Ticket t-c0ffee is gone".into(),
        },
    );
    let (id, _) = host.request();
    host.respond(
        id,
        ApiResponse::Error {
            code: ApiErrorCode::WrongRole,
            message: "Only clones may exit".into(),
        },
    );
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn python_module_against_the_real_agent() {
    if !have("python3") {
        eprintln!("python3 not found; skipped");
        return;
    }
    let env = Env::start("python");
    let mut host = env.host();
    host.hello();
    let pydir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let script = r#"
import snowflock
print(snowflock.id())
t = snowflock.request_ticket(2)
print(t)
print(snowflock.clone(t))
print(snowflock.status(t))
print(snowflock.join(t))
try:
    snowflock.kill(t)
except snowflock.Error as e:
    print(e.code, e)
try:
    snowflock.exit(0)
except snowflock.Error as e:
    print(e.code, e)
"#;
    let app = Guard(Some(
        Command::new("python3")
            .args(["-B", "-c", script])
            .env("PYTHONPATH", &pydir)
            .env("SNOWFLOCK_AGENT_SOCKET", env.sock())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    serve_client_script(&mut host);
    let out = app.output();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "{'vm': 'vm1', 'clone_id': 0, 'ticket': None, 'ip': '10.250.0.1'}\n\
         ('t-c0ffee', 2)\n\
         0\n\
         {'state': 'active', 'children': [{'clone_id': 1, 'vm': 'c1', 'ip': '10.250.0.2', 'state': 'running'}]}\n\
         [{'clone_id': 1, 'vm': 'c1', 'state': 'exited', 'code': 5}, {'clone_id': 2, 'vm': 'c2', 'state': 'killed'}]\n\
         ticket_discarded Ticket t-c0ffee is gone\n\
         wrong_role Only clones may exit\n"
    );
}

#[test]
fn c_abi_against_the_real_agent() {
    if !have("cc") {
        eprintln!("cc not found; skipped");
        return;
    }
    // libsnowflock.so sits next to the binaries cargo built for this test.
    let libdir = Path::new(env!("CARGO_BIN_EXE_sf"))
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        libdir.join("libsnowflock.so").exists(),
        "no libsnowflock.so in {}",
        libdir.display()
    );
    let env = Env::start("capi");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = env.dir.0.join("smoke");
    let st = Command::new("cc")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(manifest.join("include"))
        .arg(manifest.join("tests/c/smoke.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&libdir)
        .arg("-lsnowflock")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let mut host = env.host();
    host.hello();
    let app = Guard(Some(
        Command::new(&exe)
            .env("SNOWFLOCK_AGENT_SOCKET", env.sock())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    serve_client_script(&mut host);
    let out = app.output();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "null: Null ticket pointer\n\
         id: 0\n\
         ticket: t-c0ffee granted 2\n\
         clone: 0\n\
         status: 1 first 1/0\n\
         join: 2 first 1/1/5\n\
         kill: Ticket t-c0ffee is gone\n\
         exit: Only clones may exit\n"
    );
}

/// Waits until `cond` holds, or panics naming `what`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fake sysfs under `root`: virtio0 (console) and virtio3 (balloon, bound
/// to virtio_balloon), `page_reporting_order` at 9.
fn fake_sysfs(root: &Path) {
    let devs = root.join("bus/virtio/devices");
    for (dev, id) in [("virtio0", "0x0003"), ("virtio3", "0x0005")] {
        std::fs::create_dir_all(devs.join(dev)).unwrap();
        std::fs::write(devs.join(dev).join("device"), format!("{id}\n")).unwrap();
    }
    let drv = root.join("bus/virtio/drivers/virtio_balloon");
    std::fs::create_dir_all(&drv).unwrap();
    std::fs::write(drv.join("bind"), "").unwrap();
    std::fs::write(drv.join("unbind"), "").unwrap();
    std::os::unix::fs::symlink(devs.join("virtio3"), drv.join("virtio3")).unwrap();
    let params = root.join("module/page_reporting/parameters");
    std::fs::create_dir_all(&params).unwrap();
    std::fs::write(params.join("page_reporting_order"), "9\n").unwrap();
}

#[test]
fn agent_toml_is_applied_at_start_and_on_sighup() {
    let dir = TempDir::new("hup");
    let sysfs = dir.0.join("sys");
    fake_sysfs(&sysfs);
    let drv = sysfs.join("bus/virtio/drivers/virtio_balloon");
    let order = sysfs.join("module/page_reporting/parameters/page_reporting_order");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let config = dir.0.join("agent.toml");
    std::fs::write(
        &config,
        "[hooks]\ncompact = true\n\n[balloon]\nfree_page_reporting = false\nreporting_order = 3\n",
    )
    .unwrap();
    let log = dir.0.join("agent.log");
    let logf = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_snowflock-agent"))
        .env(
            "SNOWFLOCK_AGENT_PORT",
            format!("unix:{}", dir.0.join("port.sock").display()),
        )
        .env("SNOWFLOCK_AGENT_SOCKET", dir.0.join("agent.sock"))
        .env("SNOWFLOCK_AGENT_CONFIG", &config)
        .env("SNOWFLOCK_AGENT_SYSFS", &sysfs)
        .env("SNOWFLOCK_AGENT_DRY_IDENTITY", "1")
        .env("SNOWFLOCK_AGENT_CMDLINE", "sf.vm=vm1")
        .env("SNOWFLOCK_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    let mut agent = Agent { child, log };
    let pid = agent.child.id();
    let hup = || {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    };
    let alive = |a: &mut Agent| a.child.try_wait().unwrap().is_none();

    // The pid file is next to the API socket.
    let pid_file = dir.0.join("agent.pid");
    wait_for("the pid file", || {
        std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))
    });
    assert_eq!(read(&pid_file).trim(), pid.to_string());

    // At start: order 3, then the balloon device unbound.
    wait_for("the unbind at start", || {
        read(&drv.join("unbind")) == "virtio3"
    });
    assert_eq!(read(&order), "3");
    assert_eq!(read(&drv.join("bind")), "");

    // The kernel would drop the link; the sysadmin turns reporting back on
    // with order 0 and sends SIGHUP.
    std::fs::remove_file(drv.join("virtio3")).unwrap();
    std::fs::write(
        &config,
        "[balloon]\nfree_page_reporting = true\nreporting_order = 0\n",
    )
    .unwrap();
    hup();
    wait_for("the bind after SIGHUP", || {
        read(&drv.join("bind")) == "virtio3"
    });
    wait_for("order 0 after SIGHUP", || read(&order) == "0");
    assert!(alive(&mut agent), "SIGHUP killed the agent");

    // An out-of-range order is logged and nothing changes; the agent lives.
    std::fs::write(drv.join("bind"), "").unwrap();
    std::fs::write(&config, "[balloon]\nreporting_order = 11\n").unwrap();
    hup();
    wait_for("the range error in the log", || {
        std::fs::read_to_string(&agent.log)
            .unwrap()
            .contains("[balloon] reporting_order = 11 is out of range (0 to 10)")
    });
    assert_eq!(read(&drv.join("bind")), "");
    assert_eq!(read(&order), "0");

    // A burst of signals: the agent survives and still serves apps.
    for _ in 0..20 {
        hup();
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(&mut agent), "a burst of SIGHUPs killed the agent");
    let out = Command::new(env!("CARGO_BIN_EXE_sf"))
        .arg("id")
        .env("SNOWFLOCK_AGENT_SOCKET", dir.0.join("agent.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("clone_id=0 "));
    drop(agent);
}

#[test]
fn exec_sessions_start_with_an_empty_signal_mask() {
    // The agent blocks SIGHUP in all its threads; its children must not
    // inherit that.
    let env = Env::start("sigmask");
    let mut host = env.host();
    host.hello();
    host.send(&HostMsg::ExecStart {
        exec: 1,
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "grep SigBlk /proc/self/status".into(),
        ],
        env: vec![],
    });
    host.expect("SigBlk line", |m| {
        *m == GuestMsg::ExecOutput {
            exec: 1,
            stream: Stream::Stdout,
            data: b"SigBlk:\t0000000000000000\n".to_vec(),
        }
    });
    host.expect("exit", |m| *m == GuestMsg::ExecExit { exec: 1, code: 0 });
}
