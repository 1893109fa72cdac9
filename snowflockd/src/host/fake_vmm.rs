//! A VMM without VMs, for the daemon's unit tests. Each "VM" is a task
//! that plays the guest agent on the real agent socket (Hello, Ready after
//! `BecomeClone`, exec that echoes its argv), a RAM file of the right size,
//! and a control interface that records what the daemon asked.

use super::qemu::{agent_path, QemuSpec};
use super::qmp::QmpError;
use super::vmm::{Vmm, VmmControl, VmmError, VmmProcess};
use parking_lot::Mutex;
use snowflock_proto::api::{ApiRequest, ApiResponse};
use snowflock_proto::channel::{decode_line, encode_line, GuestMsg, HostMsg, LineReader, Stream};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

/// One fake VM process.
pub struct FakeProc {
    pub name: String,
    pub dir: PathBuf,
    pub pid: u32,
    exit: Mutex<Option<oneshot::Sender<std::process::ExitStatus>>>,
    exited: watch::Sender<bool>,
    inject: mpsc::UnboundedSender<Vec<u8>>,
    responses: tokio::sync::Mutex<mpsc::UnboundedReceiver<(u64, ApiResponse)>>,
    /// Every control call, in order (`stop`, `cont`, `migrate`, ...).
    pub calls: Mutex<Vec<&'static str>>,
    /// `quit` is ignored (a hung VMM).
    pub ignore_quit: AtomicBool,
}

impl FakeProc {
    /// Ends the process with wait status `raw` (a signal number, or an
    /// exit code shifted left by 8).
    fn end(&self, raw: i32) {
        use std::os::unix::process::ExitStatusExt;
        if let Some(tx) = self.exit.lock().take() {
            let _ = tx.send(std::process::ExitStatus::from_raw(raw));
        }
        self.exited.send_replace(true);
    }

    /// The guest's application makes an API call.
    pub fn request(&self, id: u64, req: ApiRequest) {
        self.send(GuestMsg::Request { id, req });
    }

    /// The guest agent sends a message.
    pub fn send(&self, msg: GuestMsg) {
        let _ = self.inject.send(encode_line(&msg));
    }

    /// The guest writes raw bytes on its channel (junk the daemon must
    /// survive).
    pub fn send_raw(&self, bytes: &[u8]) {
        let _ = self.inject.send(bytes.to_vec());
    }

    /// The next answer the daemon sent this guest (bounded wait).
    pub async fn response(&self) -> (u64, ApiResponse) {
        let mut rx = self.responses.lock().await;
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the daemon answered within 10 s")
            .expect("guest still connected")
    }

    /// Makes an API call and waits for its answer.
    pub async fn call(&self, id: u64, req: ApiRequest) -> ApiResponse {
        self.request(id, req);
        let (got, resp) = self.response().await;
        assert_eq!(got, id, "answers come in order in these tests");
        resp
    }

    /// The VMM process dies on its own.
    pub fn crash(&self) {
        self.end(libc::SIGSEGV);
    }

    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }
}

/// The fake VMM: its processes by VM directory.
#[derive(Default)]
pub struct FakeVmm {
    procs: Mutex<HashMap<PathBuf, Arc<FakeProc>>>,
    next_pid: AtomicU32,
    /// Clones (by VM name) whose guest answers `CloneFailed`.
    pub refuse_identity: Mutex<Vec<String>>,
    /// Spawning a VM of this name fails.
    pub fail_spawn: Mutex<Option<String>>,
}

impl FakeVmm {
    /// The process of VM `name` (the latest of that name).
    pub fn proc(&self, name: &str) -> Option<Arc<FakeProc>> {
        self.procs
            .lock()
            .values()
            .filter(|p| p.name == name && !p.has_exited())
            .max_by_key(|p| p.pid)
            .cloned()
    }

    /// Names of VMs whose process runs.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .procs
            .lock()
            .values()
            .filter(|p| !p.has_exited())
            .map(|p| p.name.clone())
            .collect();
        v.sort();
        v
    }

    fn by_dir(&self, dir: &Path) -> Option<Arc<FakeProc>> {
        self.procs.lock().get(dir).cloned()
    }
}

impl Vmm for FakeVmm {
    fn spawn(&self, spec: &QemuSpec) -> Result<VmmProcess, VmmError> {
        let name = spec
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let fail = |err: std::io::Error| VmmError::Spawn {
            binary: "fake".into(),
            err,
        };
        if self.fail_spawn.lock().as_deref() == Some(name.as_str()) {
            return Err(fail(std::io::Error::other("refused by the test")));
        }
        if spec.share {
            let f = std::fs::File::create(&spec.ram_path).map_err(fail)?;
            f.set_len(u64::from(spec.mem_mib) << 20).map_err(fail)?;
        }
        let listener =
            std::os::unix::net::UnixListener::bind(agent_path(&spec.dir)).map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(fail)?;
        let pid = 100_000 + self.next_pid.fetch_add(1, Ordering::Relaxed);
        let (exit_tx, exit_rx) = oneshot::channel();
        let (inject, inject_rx) = mpsc::unbounded_channel();
        let (resp_tx, resp_rx) = mpsc::unbounded_channel();
        let proc = Arc::new(FakeProc {
            name: name.clone(),
            dir: spec.dir.clone(),
            pid,
            exit: Mutex::new(Some(exit_tx)),
            exited: watch::channel(false).0,
            inject,
            responses: tokio::sync::Mutex::new(resp_rx),
            calls: Mutex::new(Vec::new()),
            ignore_quit: AtomicBool::new(false),
        });
        let refuse = self.refuse_identity.lock().contains(&name);
        tokio::spawn(guest(
            listener,
            proc.exited.subscribe(),
            inject_rx,
            resp_tx,
            refuse,
        ));
        self.procs.lock().insert(spec.dir.clone(), proc);
        Ok(VmmProcess {
            pid: Some(pid),
            exit: Box::pin(async move {
                exit_rx
                    .await
                    .map_err(|_| std::io::Error::other("fake VMM dropped"))
            }),
        })
    }

    fn control(&self, dir: &Path, _timeout: Duration) -> Result<Box<dyn VmmControl>, QmpError> {
        match self.by_dir(dir) {
            Some(p) if !p.has_exited() => Ok(Box::new(FakeControl(p))),
            _ => Err(QmpError::Connect {
                path: dir.display().to_string(),
                err: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        }
    }

    fn kill(&self, pid: u32) {
        let p = self.procs.lock().values().find(|p| p.pid == pid).cloned();
        if let Some(p) = p {
            p.end(libc::SIGKILL);
        }
    }
}

struct FakeControl(Arc<FakeProc>);

impl FakeControl {
    fn log(&self, call: &'static str) -> Result<(), QmpError> {
        self.0.calls.lock().push(call);
        if self.0.has_exited() {
            return Err(QmpError::Command {
                cmd: "fake",
                msg: "VMM gone".into(),
            });
        }
        Ok(())
    }
}

impl VmmControl for FakeControl {
    fn stop(&mut self) -> Result<(), QmpError> {
        self.log("stop")
    }
    fn cont(&mut self) -> Result<(), QmpError> {
        self.log("cont")
    }
    fn quit(&mut self) -> Result<(), QmpError> {
        self.log("quit")?;
        if !self.0.ignore_quit.load(Ordering::Relaxed) {
            self.0.end(0);
        }
        Ok(())
    }
    fn save_devices(&mut self, file: &Path) -> Result<(), QmpError> {
        self.log("save_devices")?;
        std::fs::write(file, b"fake device state").map_err(|e| QmpError::Command {
            cmd: "xen-save-devices-state",
            msg: e.to_string(),
        })
    }
    fn powerdown(&mut self) -> Result<(), QmpError> {
        self.log("powerdown")?;
        if !self.0.ignore_quit.load(Ordering::Relaxed) {
            self.0.end(0);
        }
        Ok(())
    }
    fn snapshot_disk(&mut self, _node: &str, _file: &Path, _new: &str) -> Result<(), QmpError> {
        self.log("snapshot_disk")
    }
    fn merge_disk(&mut self, _top: &str, _base: &str, _t: Duration) -> Result<(), QmpError> {
        self.log("merge_disk")
    }
    fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.log("migrate_incoming")?;
        // Like QEMU: listen on the socket and read one stream.
        let path = uri.strip_prefix("unix:").unwrap_or(uri);
        let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| QmpError::Command {
            cmd: "migrate-incoming",
            msg: e.to_string(),
        })?;
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let _ = std::io::copy(&mut s, &mut std::io::sink());
            }
        });
        Ok(())
    }
    fn wait_incoming(&mut self, _timeout: Duration) -> Result<(), QmpError> {
        self.log("wait_incoming")
    }
}

/// The fake guest agent: one connection at a time on the agent socket.
async fn guest(
    listener: tokio::net::UnixListener,
    mut exited: watch::Receiver<bool>,
    mut inject: mpsc::UnboundedReceiver<Vec<u8>>,
    responses: mpsc::UnboundedSender<(u64, ApiResponse)>,
    refuse_identity: bool,
) {
    let instance = rand::random::<u64>() | 1;
    let mut clone_id = 0;
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => return },
            _ = exited.wait_for(|e| *e) => return,
        };
        let (mut rd, mut wr) = stream.into_split();
        let mut lines = LineReader::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut out: Vec<Vec<u8>> = Vec::new();
            tokio::select! {
                n = rd.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut msgs = Vec::new();
                        lines.feed(&buf[..n], |l| {
                            if let Ok(m) = l.map_err(|_| ()).and_then(|l| decode_line::<HostMsg>(l).map_err(|_| ())) {
                                msgs.push(m);
                            }
                        });
                        for m in msgs {
                            let mut reply = |m: GuestMsg| out.push(encode_line(&m));
                            match m {
                                HostMsg::Hello { version } => reply(GuestMsg::Hello {
                                    version, agent: "fake".into(), clone_id, instance,
                                }),
                                HostMsg::BecomeClone { identity, .. } => {
                                    clone_id = identity.clone_id;
                                    reply(if refuse_identity {
                                        GuestMsg::CloneFailed { clone_id, message: "cannot set the IP".into() }
                                    } else {
                                        GuestMsg::Ready { clone_id }
                                    });
                                }
                                HostMsg::Response { id, resp } => { let _ = responses.send((id, resp)); }
                                HostMsg::ExecStart { exec, argv, .. } => {
                                    reply(GuestMsg::ExecOutput { exec, stream: Stream::Stdout, data: argv.join(" ").into_bytes() });
                                    reply(GuestMsg::ExecExit { exec, code: 0 });
                                }
                                _ => {}
                            }
                        }
                    }
                },
                m = inject.recv() => match m { Some(m) => out.push(m), None => return },
                _ = exited.wait_for(|e| *e) => return,
            }
            for m in out {
                if wr.write_all(&m).await.is_err() {
                    break;
                }
            }
        }
    }
}
