//! Running as a systemd service (`Type=notify`): telling systemd the agent
//! is ready.
//!
//! The `snowflock-agent.service` unit of the `snowflock-guest` package is
//! `Type=notify`: systemd counts the agent as started, and orders the units
//! after it (`network.target`, logins), only once it sent `READY=1`, which
//! it does after the boot identity is applied and the API socket listens.
//! Outside systemd (`NOTIFY_SOCKET` unset, as under busybox init) nothing
//! is sent.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// The variable systemd passes the notification socket in.
pub const NOTIFY_ENV: &str = "NOTIFY_SOCKET";

/// Sends `state` (such as `READY=1`) to the socket named by `socket`, a
/// path or, with a leading `@`, an abstract name.
pub fn notify_to(socket: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), Path::new(socket))?;
        }
    }
    Ok(())
}

/// Tells systemd the agent is ready, when it runs under systemd; logs the
/// outcome.
pub fn notify_ready() {
    let Some(socket) = std::env::var_os(NOTIFY_ENV).filter(|s| !s.is_empty()) else {
        return;
    };
    match notify_to(&socket, "READY=1") {
        Ok(()) => tracing::info!("Told systemd the agent is ready"),
        Err(e) => tracing::warn!(
            "Cannot notify systemd at {}: {e}",
            Path::new(&socket).display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("sf-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("sf-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(std::ffi::OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        assert!(notify_to(dir.join("none").as_os_str(), "READY=1").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
