//! The VMM seam: start a VM process, control it (stop, cont, migrate,
//! quit), end it. [`QemuVmm`] is QEMU over QMP; tests use
//! [`super::fake_vmm::FakeVmm`], which runs no guest.

use super::qemu::QemuSpec;
use super::qmp::{Qmp, QmpError};
use futures::future::BoxFuture;
use std::path::Path;
use std::time::Duration;

/// Errors starting a VMM process.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The process could not be started.
    #[error("Cannot start {binary}")]
    Spawn {
        binary: String,
        #[source]
        err: std::io::Error,
    },
}

/// A started VMM process.
pub struct VmmProcess {
    pub pid: Option<u32>,
    /// Resolves when the process has exited: how it ended, or why it could
    /// not be waited for.
    pub exit: BoxFuture<'static, std::io::Result<std::process::ExitStatus>>,
}

/// Control of one running VMM (blocking; async callers use
/// `spawn_blocking`).
pub trait VmmControl: Send {
    /// Pauses the vCPUs.
    fn stop(&mut self) -> Result<(), QmpError>;
    /// Resumes the vCPUs.
    fn cont(&mut self) -> Result<(), QmpError>;
    /// Asks the VMM to exit.
    fn quit(&mut self) -> Result<(), QmpError>;
    /// Asks the guest to shut down (ACPI power button).
    fn powerdown(&mut self) -> Result<(), QmpError>;
    /// Saves the device state (no RAM) of the stopped VM to `file`.
    fn save_devices(&mut self, file: &Path) -> Result<(), QmpError>;
    /// Freezes the disk node `node`: the prepared overlay `file` becomes
    /// the VM's top layer, named `new_node`.
    fn snapshot_disk(&mut self, node: &str, file: &Path, new_node: &str) -> Result<(), QmpError>;
    /// Merges the layers above `base_node` into it (the top included).
    fn merge_disk(
        &mut self,
        top_node: &str,
        base_node: &str,
        timeout: Duration,
    ) -> Result<(), QmpError>;
    /// Starts loading device state from `uri` (a VM started `incoming`).
    fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError>;
    /// Waits until the device state is loaded.
    fn wait_incoming(&mut self, timeout: Duration) -> Result<(), QmpError>;
}

/// Starts and controls VMs.
pub trait Vmm: Send + Sync + 'static {
    /// Starts a VM process.
    fn spawn(&self, spec: &QemuSpec) -> Result<VmmProcess, VmmError>;
    /// Connects to the control socket of the VM in `dir` (blocking, retried
    /// until `timeout` while the VMM starts).
    fn control(&self, dir: &Path, timeout: Duration) -> Result<Box<dyn VmmControl>, QmpError>;
    /// Kills a VMM that ignored `quit`.
    fn kill(&self, pid: u32);
    /// Whether a running VM can be handed to a new process of this VMM (a
    /// parent's restart at a freeze); else freezes copy its memory.
    fn hands_over(&self) -> bool {
        false
    }
}

/// QEMU processes, controlled over QMP.
pub struct QemuVmm;

impl Vmm for QemuVmm {
    fn spawn(&self, spec: &QemuSpec) -> Result<VmmProcess, VmmError> {
        let mut child = spec.spawn().map_err(|err| VmmError::Spawn {
            binary: spec.qemu.display().to_string(),
            err,
        })?;
        let pid = child.id();
        Ok(VmmProcess {
            pid,
            exit: Box::pin(async move { child.wait().await }),
        })
    }

    fn control(&self, dir: &Path, timeout: Duration) -> Result<Box<dyn VmmControl>, QmpError> {
        Ok(Box::new(Qmp::connect(
            &super::qemu::qmp_path(dir),
            timeout,
        )?))
    }

    fn kill(&self, pid: u32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        );
    }

    fn hands_over(&self) -> bool {
        true
    }
}

impl VmmControl for Qmp {
    fn stop(&mut self) -> Result<(), QmpError> {
        Qmp::stop(self)
    }
    fn cont(&mut self) -> Result<(), QmpError> {
        Qmp::cont(self)
    }
    fn quit(&mut self) -> Result<(), QmpError> {
        Qmp::quit(self)
    }
    fn powerdown(&mut self) -> Result<(), QmpError> {
        Qmp::powerdown(self)
    }
    fn save_devices(&mut self, file: &Path) -> Result<(), QmpError> {
        Qmp::save_devices(self, file)
    }
    fn snapshot_disk(&mut self, node: &str, file: &Path, new_node: &str) -> Result<(), QmpError> {
        Qmp::snapshot_disk(self, node, file, new_node)
    }
    fn merge_disk(
        &mut self,
        top_node: &str,
        base_node: &str,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        Qmp::merge_disk(self, top_node, base_node, timeout)
    }
    fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        Qmp::migrate_incoming(self, uri)
    }
    fn wait_incoming(&mut self, timeout: Duration) -> Result<(), QmpError> {
        Qmp::wait_incoming(self, timeout)
    }
}
