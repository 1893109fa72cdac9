//! Handing a running VM over to a new QEMU process: what the parent's
//! restart at a freeze needs from the lifecycle. For each original VM the
//! daemon keeps the command line of its current QEMU, and, for a moment,
//! the process that takes over once the old one is ended on purpose, so
//! that the exit monitor follows the VM instead of ending it.

use crate::host::qemu::QemuSpec;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::HashMap;

/// How a VMM process ended (see [`crate::host::vmm::VmmProcess`]).
pub type Exit = BoxFuture<'static, std::io::Result<std::process::ExitStatus>>;

struct Slot {
    spec: QemuSpec,
    successor: Option<Exit>,
}

/// The current QEMU of every original VM, by VM name.
#[derive(Default)]
pub struct Vmms(Mutex<HashMap<String, Slot>>);

impl Vmms {
    /// Records the command line `vm`'s QEMU was started with.
    pub fn insert(&self, vm: &str, spec: QemuSpec) {
        self.0.lock().insert(
            vm.to_string(),
            Slot {
                spec,
                successor: None,
            },
        );
    }

    /// The command line of `vm`'s current QEMU.
    pub fn spec(&self, vm: &str) -> Option<QemuSpec> {
        self.0.lock().get(vm).map(|s| s.spec.clone())
    }

    /// `vm` now runs in a new QEMU started from `spec`, whose end is
    /// `exit`; the old process is about to be ended.
    pub fn hand_over(&self, vm: &str, spec: QemuSpec, exit: Exit) {
        if let Some(s) = self.0.lock().get_mut(vm) {
            s.spec = spec;
            s.successor = Some(exit);
        }
    }

    /// The process that took `vm` over, if its previous one ended because
    /// of a handover.
    pub fn take_successor(&self, vm: &str) -> Option<Exit> {
        self.0.lock().get_mut(vm).and_then(|s| s.successor.take())
    }

    /// Forgets `vm` (it ended).
    pub fn remove(&self, vm: &str) {
        self.0.lock().remove(vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(share: bool) -> QemuSpec {
        QemuSpec {
            qemu: "qemu".into(),
            accel: "tcg".into(),
            vcpus: 1,
            mem_mib: 128,
            ram_path: "/r".into(),
            share,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: String::new(),
            dir: "/d".into(),
            tap: "t".into(),
            tap_fd: None,
            console: "/d/console.log".into(),
            discard_log: None,
            mac: "m".into(),
            incoming: false,
            disk: None,
        }
    }

    #[tokio::test]
    async fn a_successor_is_taken_once() {
        let v = Vmms::default();
        assert!(v.spec("p").is_none());
        v.insert("p", spec(true));
        assert!(v.spec("p").unwrap().share);
        assert!(v.take_successor("p").is_none());
        v.hand_over(
            "p",
            spec(false),
            Box::pin(async { Err(std::io::Error::other("x")) }),
        );
        assert!(!v.spec("p").unwrap().share);
        assert!(v.take_successor("p").unwrap().await.is_err());
        assert!(v.take_successor("p").is_none());
        v.remove("p");
        assert!(v.spec("p").is_none());
    }
}
