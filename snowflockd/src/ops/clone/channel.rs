//! The parent's guest channel around a freeze. Bytes the daemon writes to
//! a QEMU that is stopped are read by it only later: into guest memory
//! after its device state was saved, or never, if that QEMU is then
//! replaced. So new writes are held (queued by the channel task) from just
//! before the pause until the VM runs again, once the QEMU has read what
//! was written before. For a handover, the channel also connects to the
//! new QEMU before that one runs (a virtio-serial port with nobody
//! connected drops what the guest writes) and takes that connection when
//! the old one ends.

use crate::host::qemu::agent_path;
use crate::state::vm::{ChannelHold, Vm};
use std::path::Path;
use std::time::{Duration, Instant};

/// Holds new writes to `parent`'s guest channel, and returns once the
/// QEMU read what was written before (or after 500 ms). With `next`, the
/// directory of the QEMU the VM is handed to, connects to its agent socket
/// first. Blocking.
pub fn hold(parent: &Vm, next: Option<&Path>) {
    if let Some(next) = next {
        match std::os::unix::net::UnixStream::connect(agent_path(next)) {
            Ok(s) => *parent.next_channel.lock() = Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to the new QEMU's guest channel; it reconnects after the handover")
            }
        }
    }
    let mut held = parent.channel_hold.subscribe();
    parent.channel_hold.send_replace(ChannelHold::Requested);
    let t = Instant::now();
    while *held.borrow_and_update() != ChannelHold::Drained
        && t.elapsed() < Duration::from_millis(500)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Writes go on to the QEMU that ran before (a freeze without handover,
/// or a handover that failed); a connection made for a new QEMU is
/// dropped.
pub fn release(parent: &Vm) {
    parent.next_channel.lock().take();
    parent.channel_hold.send_replace(ChannelHold::Off);
}
