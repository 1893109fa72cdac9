//! A copy of a running QEMU for `bench peers`: its command line adapted
//! for a second process that loads the first one's state by migration
//! (own sockets and console, its own RAM, its own tap), the process itself
//! (killed when dropped), and a QMP connection to drive both: the `qapi`
//! crate's client and typed commands (its schema is newer than QEMU 7.2's;
//! the commands and answers the bench uses are the same in both), with
//! read and write timeouts on the socket.

use anyhow::{bail, Context, Result};
use qapi::qmp;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The files and tap of one copy of the parent.
pub struct CopyPaths {
    pub qmp: PathBuf,
    pub agent: PathBuf,
    pub console: PathBuf,
    /// A tap QEMU creates (and removes when it ends) in its namespace,
    /// attached to nothing: the NIC needs a backend with the parent's
    /// features (a tap's offloads) or its state does not load.
    pub tap: String,
}

impl CopyPaths {
    /// `tag`: a few letters and digits naming the copy.
    pub fn new(dir: &Path, tag: &str) -> CopyPaths {
        CopyPaths {
            qmp: dir.join(format!("{tag}-qmp.sock")),
            agent: dir.join(format!("{tag}-agent.sock")),
            console: dir.join(format!("{tag}-console.log")),
            tap: format!("sfp{tag}").chars().take(15).collect(),
        }
    }
}

/// The parent's QEMU arguments for a copy that loads its state from
/// `incoming`: own QMP, agent socket and console, RAM from
/// `memory-backend-ram` of the same size and id, its own tap behind the
/// NIC, no `-S` or earlier `-incoming`. A disk would be opened twice: refused.
pub fn copy_args(parent: &[String], p: &CopyPaths, incoming: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut it = parent.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("{a} without a value"))
        };
        match a.as_str() {
            "-S" => {}
            "-incoming" => {
                value()?;
            }
            "-netdev" => {
                let v = value()?;
                let id = option(&v, "id").context("a netdev without id")?;
                out.push(a.clone());
                out.push(format!(
                    "tap,id={id},ifname={},script=no,downscript=no",
                    p.tap
                ));
            }
            "-blockdev" | "-drive" => {
                bail!("the parent has a disk; the bench copies disk-less VMs only")
            }
            "-qmp" => {
                value()?;
                out.push(a.clone());
                out.push(format!("unix:{},server=on,wait=off", p.qmp.display()));
            }
            "-object" => {
                let v = value()?;
                out.push(a.clone());
                if v.starts_with("memory-backend-") && option(&v, "id") == Some("mem") {
                    let size = option(&v, "size").context("the RAM backend has no size")?;
                    out.push(format!("memory-backend-ram,id=mem,size={size}"));
                } else {
                    out.push(v);
                }
            }
            "-chardev" => {
                let v = value()?;
                out.push(a.clone());
                out.push(match option(&v, "id") {
                    Some("con") => format!("file,id=con,path={}", p.console.display()),
                    Some("agent") => format!(
                        "socket,id=agent,path={},server=on,wait=off",
                        p.agent.display()
                    ),
                    _ => bail!("unknown chardev {v:?} in the parent's command line"),
                });
            }
            _ => out.push(a.clone()),
        }
    }
    out.extend(["-incoming".into(), incoming.into()]);
    Ok(out)
}

/// The value of `key=` in a QEMU option list `kind,key=value,...`.
fn option<'a>(opts: &'a str, key: &str) -> Option<&'a str> {
    opts.split(',')
        .find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A QEMU this bench started; killed (by its pid) and reaped when dropped.
pub struct QemuCopy {
    child: Child,
    qmp: PathBuf,
    log: PathBuf,
}

impl QemuCopy {
    /// Starts `qemu args`, in network namespace `netns` if given (`ip netns
    /// exec` execs QEMU in place: the child's pid is QEMU's).
    pub fn spawn(
        qemu: &str,
        args: &[String],
        netns: Option<&str>,
        log: &Path,
        qmp: &Path,
    ) -> Result<QemuCopy> {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, qemu]);
                c
            }
            None => Command::new(qemu),
        };
        let out = std::fs::File::create(log)?;
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {qemu}"))?;
        Ok(QemuCopy {
            child,
            qmp: qmp.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    pub fn connect(&mut self) -> Result<Qmp> {
        if let Some(st) = self.child.try_wait()? {
            bail!("the copy's QEMU exited at once ({st})");
        }
        Qmp::connect(&self.qmp, Duration::from_secs(30))
    }

    /// `e` with the last lines QEMU wrote (why it failed, usually).
    pub fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        if tail.is_empty() {
            return e;
        }
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        e.context(format!("the copy's QEMU says: {}", tail.join(" | ")))
    }
}

impl Drop for QemuCopy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `done` every 10 ms until it says so, up to `deadline`.
pub fn wait_for(
    q: &mut Qmp,
    what: &'static str,
    deadline: Duration,
    mut done: impl FnMut(&mut Qmp) -> Result<bool>,
) -> Result<()> {
    let t0 = Instant::now();
    while !done(q)? {
        if t0.elapsed() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Longest one QMP command may take to be written or answered (QEMU
/// answers at once; a migration is polled, not waited for in one command):
/// no call can hang on a QEMU that stopped answering.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// A QMP connection, through the `qapi` crate's typed commands.
pub struct Qmp {
    inner: qapi::Qmp<qapi::Stream<BufReader<UnixStream>, UnixStream>>,
}

impl Qmp {
    /// Connects, retrying while the socket does not answer yet (QEMU
    /// starting), and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, wait: Duration) -> Result<Qmp> {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > wait => {
                    return Err(e).with_context(|| format!("cannot connect to {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        s.set_read_timeout(Some(QMP_TIMEOUT))?;
        s.set_write_timeout(Some(QMP_TIMEOUT))?;
        let mut r = BufReader::new(s.try_clone()?);
        // qapi panics on a socket closed before the greeting: an error here.
        let greeting = r
            .fill_buf()
            .with_context(|| format!("no QMP greeting on {}", path.display()))?;
        if greeting.is_empty() {
            bail!("{} closed before its QMP greeting", path.display());
        }
        let mut inner = qapi::Qmp::new(qapi::Stream::new(r, s));
        inner
            .handshake()
            .with_context(|| format!("QMP handshake on {}", path.display()))?;
        Ok(Qmp { inner })
    }

    /// Runs `cmd`; its answer (events in between are skipped).
    pub fn execute<C: qapi::Command>(&mut self, cmd: &C) -> Result<C::Ok> {
        self.inner
            .execute(cmd)
            .with_context(|| format!("QMP {}", C::NAME))
    }

    /// The run state (`query-status`).
    pub fn status(&mut self) -> Result<qmp::RunState> {
        Ok(self.execute(&qmp::query_status {})?.status)
    }

    /// The outgoing migration's state (`query-migrate`).
    pub fn migration(&mut self) -> Result<qmp::MigrationInfo> {
        self.execute(&qmp::query_migrate {})
    }

    /// Starts migrating to `uri`; returns at once.
    pub fn migrate(&mut self, uri: &str) -> Result<()> {
        self.execute(&migrate_cmd(uri)).map(drop)
    }

    /// Loads the state from `uri` (QEMU started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<()> {
        self.execute(&incoming_cmd(uri)).map(drop)
    }

    /// The migration bandwidth cap, bytes/s (`query-migrate-parameters`).
    pub fn max_bandwidth(&mut self) -> Result<Option<u64>> {
        Ok(self
            .execute(&qmp::query_migrate_parameters {})?
            .max_bandwidth)
    }

    /// Sets the migration bandwidth cap, bytes/s, and no other parameter.
    pub fn set_max_bandwidth(&mut self, bytes_per_s: u64) -> Result<()> {
        self.execute(&bandwidth_cmd(bytes_per_s)).map(drop)
    }
}

fn migrate_cmd(uri: &str) -> qmp::migrate {
    qmp::migrate {
        uri: Some(uri.into()),
        channels: None,
        detach: None,
        resume: None,
    }
}

fn incoming_cmd(uri: &str) -> qmp::migrate_incoming {
    qmp::migrate_incoming {
        uri: Some(uri.into()),
        channels: None,
        exit_on_error: None,
    }
}

fn bandwidth_cmd(bytes_per_s: u64) -> qmp::migrate_set_parameters {
    qmp::migrate_set_parameters(qmp::MigrateSetParameters {
        max_bandwidth: Some(bytes_per_s),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent_args() -> Vec<String> {
        [
            "-nodefaults",
            "-M",
            "microvm,acpi=on,memory-backend=mem",
            "-m",
            "1024M",
            "-object",
            "memory-backend-file,id=mem,size=1024M,mem-path=/dev/shm/x/ram,share=off",
            "-chardev",
            "file,id=con,path=/s/console.log,append=on",
            "-chardev",
            "socket,id=agent,path=/s/agent.sock,server=on,wait=off",
            "-netdev",
            "tap,id=net0,fd=3",
            "-device",
            "virtio-net-device,netdev=net0,mac=52:54:00:00:00:01",
            "-qmp",
            "unix:/s/qmp.sock,server=on,wait=off",
            "-S",
            "-incoming",
            "defer",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn copies_get_their_own_files_ram_and_tap() {
        let p = parent_args();
        let paths = CopyPaths::new(Path::new("/w"), "r0");
        let c = copy_args(&p, &paths, "tcp:10.0.0.2:7199").unwrap();
        let want: Vec<String> = [
            "-nodefaults",
            "-M",
            "microvm,acpi=on,memory-backend=mem",
            "-m",
            "1024M",
            "-object",
            "memory-backend-ram,id=mem,size=1024M",
            "-chardev",
            "file,id=con,path=/w/r0-console.log",
            "-chardev",
            "socket,id=agent,path=/w/r0-agent.sock,server=on,wait=off",
            "-netdev",
            "tap,id=net0,ifname=sfpr0,script=no,downscript=no",
            "-device",
            "virtio-net-device,netdev=net0,mac=52:54:00:00:00:01",
            "-qmp",
            "unix:/w/r0-qmp.sock,server=on,wait=off",
            "-incoming",
            "tcp:10.0.0.2:7199",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(c, want);
        let mut disk = p.clone();
        disk.extend(["-blockdev".into(), "{}".into()]);
        assert!(copy_args(&disk, &paths, "defer").is_err());
        assert!(copy_args(&["-qmp".to_string()], &paths, "defer").is_err());
    }

    /// The typed commands send what the bench sends to QEMU 7.2.
    #[test]
    fn commands_on_the_wire() {
        use qapi::Command;
        use serde_json::{json, to_value};
        fn check<C: Command>(c: &C, name: &str, args: serde_json::Value) {
            assert_eq!((C::NAME, to_value(c).unwrap()), (name, args));
        }
        check(
            &migrate_cmd("tcp:10.0.0.2:7199"),
            "migrate",
            json!({ "uri": "tcp:10.0.0.2:7199" }),
        );
        check(
            &incoming_cmd("exec:cat /f"),
            "migrate-incoming",
            json!({ "uri": "exec:cat /f" }),
        );
        check(
            &bandwidth_cmd(64 << 30),
            "migrate-set-parameters",
            json!({ "max-bandwidth": 64u64 << 30 }),
        );
        check(&qmp::migrate_cancel {}, "migrate_cancel", json!({}));
    }

    /// QEMU 7.2's answers (captured from 7.2.22, a 0 downtime made 7)
    /// parse with qapi's newer schema: fields it dropped are ignored, the
    /// ones it added are optional.
    #[test]
    fn qemu_7_2_answers_parse() {
        use serde_json::from_str;
        let st: qmp::StatusInfo =
            from_str(r#"{"status": "prelaunch", "singlestep": false, "running": false}"#).unwrap();
        assert_eq!(st.status, qmp::RunState::prelaunch);
        let idle: qmp::MigrationInfo = from_str("{}").unwrap();
        assert_eq!(idle.status, None);
        let done: qmp::MigrationInfo = from_str(
            r#"{"status": "completed", "setup-time": 0, "downtime": 7, "total-time": 2,
            "ram": {"total": 0, "postcopy-requests": 0, "dirty-sync-count": 2,
            "multifd-bytes": 0, "pages-per-second": 0, "downtime-bytes": 0,
            "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, "mbps": 2.988,
            "transferred": 0, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 0,
            "duplicate": 0, "dirty-pages-rate": 0, "skipped": 0, "normal-bytes": 0,
            "normal": 0}}"#,
        )
        .unwrap();
        assert_eq!(
            (done.status, done.downtime, done.total_time),
            (Some(qmp::MigrationStatus::completed), Some(7), Some(2))
        );
        let params: qmp::MigrationParameters = from_str(
            r#"{"cpu-throttle-tailslow": false, "xbzrle-cache-size": 67108864,
            "cpu-throttle-initial": 20, "announce-max": 550, "decompress-threads": 2,
            "compress-threads": 8, "compress-level": 1, "multifd-channels": 2,
            "multifd-zstd-level": 1, "announce-initial": 50, "block-incremental": false,
            "compress-wait-thread": true, "downtime-limit": 300, "tls-authz": "",
            "multifd-compression": "none", "announce-rounds": 5, "announce-step": 100,
            "tls-creds": "", "multifd-zlib-level": 1, "max-cpu-throttle": 99,
            "max-postcopy-bandwidth": 0, "tls-hostname": "",
            "throttle-trigger-threshold": 50, "max-bandwidth": 134217728,
            "x-checkpoint-delay": 20000, "cpu-throttle-increment": 10}"#,
        )
        .unwrap();
        assert_eq!(params.max_bandwidth, Some(128 << 20));
    }
}
