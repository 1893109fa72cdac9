//! QMP access to a QEMU process, through the `qapi` crate.
//!
//! The client is synchronous; async callers run it under
//! `tokio::task::spawn_blocking`. Each [`Qmp`] owns one connection; the
//! daemon opens one per operation sequence (a clone, a stop), so there is no
//! shared connection state to race on.

use qapi::qmp;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Errors talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The QMP socket could not be reached.
    #[error("Cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        err: std::io::Error,
    },
    /// QEMU answered a command with an error, or the connection broke.
    #[error("QMP command {cmd} failed: {msg}")]
    Command { cmd: &'static str, msg: String },
    /// A migration ended in a state other than `completed`.
    #[error("Migration {0}")]
    Migration(String),
    /// A bounded wait ran out.
    #[error("Timed out waiting for {0}")]
    Timeout(&'static str),
}

/// One QMP connection.
pub struct Qmp {
    inner: qapi::Qmp<qapi::Stream<std::io::BufReader<UnixStream>, UnixStream>>,
}

impl Qmp {
    /// Connects and negotiates capabilities, retrying until `timeout` while
    /// the socket does not exist yet (QEMU still starting).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(err) if start.elapsed() >= timeout => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        err,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let reader = stream.try_clone().map_err(|err| QmpError::Connect {
            path: path.display().to_string(),
            err,
        })?;
        let mut inner = qapi::Qmp::new(qapi::Stream::new(std::io::BufReader::new(reader), stream));
        // read_capabilities panics on EOF inside qapi; contain it.
        let hs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.handshake()));
        match hs {
            Ok(Ok(_)) => Ok(Qmp { inner }),
            Ok(Err(e)) => Err(QmpError::Command {
                cmd: "qmp_capabilities",
                msg: e.to_string(),
            }),
            Err(_) => Err(QmpError::Command {
                cmd: "qmp_capabilities",
                msg: "connection closed".into(),
            }),
        }
    }

    fn exec<C: qapi::Command>(&mut self, cmd: &C) -> Result<C::Ok, QmpError> {
        self.inner.execute(cmd).map_err(|e| QmpError::Command {
            cmd: C::NAME,
            msg: e.to_string(),
        })
    }

    /// Pauses the vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.exec(&qmp::stop {}).map(drop)
    }

    /// Resumes the vCPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.exec(&qmp::cont {}).map(drop)
    }

    /// Presses the guest's power button (ACPI): a guest with systemd shuts
    /// down cleanly and QEMU exits.
    pub fn powerdown(&mut self) -> Result<(), QmpError> {
        self.exec(&qmp::system_powerdown {}).map(drop)
    }

    /// Asks QEMU to exit.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        self.exec(&qmp::quit {}).map(drop)
    }

    /// Saves the device state (no RAM, no disk contents) to `file`
    /// (`xen-save-devices-state`, which any accelerator has). The VM must
    /// be stopped; its block devices are then inactive until `cont`, so a
    /// VMM resuming from the file could take them over. The stream has no
    /// configuration section: the loading QEMU needs
    /// `migration.send-configuration=off`, which every VM gets.
    pub fn save_devices(&mut self, file: &Path) -> Result<(), QmpError> {
        self.exec(&qmp::xen_save_devices_state {
            filename: file.display().to_string(),
            live: Some(true),
        })
        .map(drop)
    }

    /// Puts the existing qcow2 `file` (whose backing is the node's file) on
    /// top of node `node` as node `new_node`: from now on the VM writes
    /// there, and the old top is never written again. QEMU drains and
    /// flushes the node first.
    pub fn snapshot_disk(
        &mut self,
        node: &str,
        file: &Path,
        new_node: &str,
    ) -> Result<(), QmpError> {
        self.exec(&qmp::blockdev_snapshot_sync(qmp::BlockdevSnapshotSync {
            device: None,
            node_name: Some(node.into()),
            snapshot_file: file.display().to_string(),
            snapshot_node_name: Some(new_node.into()),
            format: Some("qcow2".into()),
            mode: Some(qmp::NewImageMode::existing),
        }))
        .map(drop)
    }

    /// Active commit: merges every layer above node `base_node` (the active
    /// one `top_node` included) into it, which becomes the VM's top layer
    /// again. Returns once the job has completed.
    // The schema's deprecated `base`/`top` fields must be named to be left
    // unset.
    #[allow(deprecated)]
    pub fn merge_disk(
        &mut self,
        top_node: &str,
        base_node: &str,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        const JOB: &str = "sf-merge";
        let fail = |msg: String| QmpError::Command {
            cmd: "block-commit",
            msg,
        };
        self.exec(&qmp::block_commit {
            job_id: Some(JOB.into()),
            device: top_node.into(),
            base_node: Some(base_node.into()),
            auto_dismiss: Some(true),
            auto_finalize: None,
            backing_file: None,
            backing_mask_protocol: None,
            base: None,
            filter_node_name: None,
            on_error: None,
            speed: None,
            top: None,
            top_node: None,
        })?;
        let deadline = std::time::Instant::now() + timeout;
        let mut completed = false;
        loop {
            let jobs = self.exec(&qmp::query_block_jobs {})?;
            let job = jobs.iter().find_map(|j| match j {
                qmp::BlockJobInfo::commit(b) if b.device == JOB => Some(b.clone()),
                _ => None,
            });
            match job {
                None if completed => return Ok(()),
                None => return Err(fail("the merge job ended before it was ready".into())),
                Some(b) => {
                    if let Some(e) = b.error {
                        return Err(fail(e));
                    }
                    if b.ready && !completed {
                        self.exec(&qmp::block_job_complete { device: JOB.into() })?;
                        completed = true;
                    }
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(fail(format!("the merge did not finish within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts an incoming migration from `uri` (QEMU was started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.exec(&qmp::migrate_incoming {
            uri: Some(uri.into()),
            channels: None,
            exit_on_error: None,
        })
        .map(drop)
    }

    /// Current status of the run state (`running`, `paused`, `inmigrate`, ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        self.exec(&qmp::query_status {})
            .map(|s| format!("{:?}", s.status))
    }

    /// Waits until the incoming side has loaded the state (run state leaves
    /// `inmigrate`).
    pub fn wait_incoming(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let start = Instant::now();
        loop {
            let st = self.exec(&qmp::query_status {})?;
            match st.status {
                qmp::RunState::inmigrate => {}
                qmp::RunState::paused | qmp::RunState::prelaunch | qmp::RunState::running => {
                    return Ok(())
                }
                other => {
                    return Err(QmpError::Migration(format!(
                        "incoming ended in state {other:?}"
                    )))
                }
            }
            if start.elapsed() > timeout {
                return Err(QmpError::Timeout("incoming migration"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
