//! Finding and opening the channel to the host.
//!
//! In a VM the channel is the virtio-serial port whose
//! `/sys/class/virtio-ports/vportNpM/name` is
//! [`snowflock_proto::AGENT_PORT_NAME`], opened as `/dev/vportNpM`. On such a
//! port `read()` returns 0 while no host process is connected: that is not
//! end of file, the agent polls until the host (re)connects. Tests may name
//! a path directly, or `unix:/path` to connect to a Unix socket, where end of
//! file is a disconnect and the agent connects again.

use snowflock_proto::AGENT_PORT_NAME;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Retry interval while the port is missing.
pub const RETRY: Duration = Duration::from_millis(200);

const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// Which channel to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// The virtio-serial port named [`AGENT_PORT_NAME`].
    Virtio,
    /// A character device, FIFO or file to open read/write.
    Path(PathBuf),
    /// A Unix stream socket to connect to (tests).
    Unix(PathBuf),
}

impl PortSpec {
    /// Parses the value of `SNOWFLOCK_AGENT_PORT`.
    pub fn parse(v: Option<&str>) -> PortSpec {
        match v {
            None => PortSpec::Virtio,
            Some(s) => match s.strip_prefix("unix:") {
                Some(p) => PortSpec::Unix(PathBuf::from(p)),
                None => PortSpec::Path(PathBuf::from(s)),
            },
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Virtio => write!(f, "virtio-serial port {AGENT_PORT_NAME}"),
            PortSpec::Path(p) => write!(f, "{}", p.display()),
            PortSpec::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// An open channel.
pub struct OpenPort {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// True when `read() == 0` means the peer is gone for good (sockets);
    /// false when it means "no host connected yet" (virtio-serial).
    pub zero_read_is_eof: bool,
    /// What was opened, for logs.
    pub name: String,
}

/// Opens the channel once.
pub fn try_open(spec: &PortSpec) -> io::Result<OpenPort> {
    match spec {
        PortSpec::Virtio => {
            let dev = find_virtio_port(Path::new(VIRTIO_PORTS))?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("No virtio-serial port named {AGENT_PORT_NAME}"),
                )
            })?;
            open_path(&dev)
        }
        PortSpec::Path(p) => open_path(p),
        PortSpec::Unix(p) => {
            let s = UnixStream::connect(p)?;
            let w = s.try_clone()?;
            Ok(OpenPort {
                reader: Box::new(s),
                writer: Box::new(w),
                zero_read_is_eof: true,
                name: format!("unix:{}", p.display()),
            })
        }
    }
}

fn open_path(p: &Path) -> io::Result<OpenPort> {
    // std opens with O_CLOEXEC, so exec'd processes never inherit the port.
    let f = OpenOptions::new().read(true).write(true).open(p)?;
    let w = f.try_clone()?;
    Ok(OpenPort {
        reader: Box::new(f),
        writer: Box::new(w),
        zero_read_is_eof: false,
        name: p.display().to_string(),
    })
}

/// Opens the channel, retrying every [`RETRY`] until it succeeds.
pub fn open_blocking(spec: &PortSpec) -> OpenPort {
    let mut logged = false;
    loop {
        match try_open(spec) {
            Ok(p) => {
                tracing::info!("Channel open: {}", p.name);
                return p;
            }
            Err(e) => {
                if !logged {
                    tracing::info!("Waiting for the channel {spec}: {e}");
                    logged = true;
                }
                std::thread::sleep(RETRY);
            }
        }
    }
}

/// Returns `/dev/<port>` for the port whose sysfs `name` is
/// [`AGENT_PORT_NAME`], searching `class_dir` (normally
/// `/sys/class/virtio-ports`).
pub fn find_virtio_port(class_dir: &Path) -> io::Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(class_dir)? {
        let entry = entry?;
        let Ok(name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if name.trim_end() == AGENT_PORT_NAME {
            return Ok(Some(Path::new("/dev").join(entry.file_name())));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spec() {
        assert_eq!(PortSpec::parse(None), PortSpec::Virtio);
        assert_eq!(
            PortSpec::parse(Some("/dev/vport0p1")),
            PortSpec::Path("/dev/vport0p1".into())
        );
        assert_eq!(
            PortSpec::parse(Some("unix:/tmp/x.sock")),
            PortSpec::Unix("/tmp/x.sock".into())
        );
    }

    #[test]
    fn finds_named_port_in_sysfs_layout() {
        let dir = std::env::temp_dir().join(format!("sf-port-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (port, name) in [
            ("vport0p0", "org.qemu.guest_agent.0\n"),
            ("vport1p1", "org.snowflock.agent\n"),
        ] {
            std::fs::create_dir_all(dir.join(port)).unwrap();
            std::fs::write(dir.join(port).join("name"), name).unwrap();
        }
        std::fs::create_dir_all(dir.join("vport2p1")).unwrap(); // no name file
        assert_eq!(
            find_virtio_port(&dir).unwrap(),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        std::fs::write(dir.join("vport1p1").join("name"), "other\n").unwrap();
        assert_eq!(find_virtio_port(&dir).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(find_virtio_port(&dir).is_err());
    }
}
