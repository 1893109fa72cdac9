//! Blocking admin-socket client.

use snowflock_proto::admin::{AdminRequest, AdminResponse};
use snowflock_proto::frame::{read_frame, write_frame, FrameError};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `NotRunning` tells the user to do by default.
pub const START_HINT: &str = "start it with `snowflock daemon start`";

/// Errors reaching the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("The snowflock daemon is not running (no answer on {path}); {hint}")]
    NotRunning {
        path: String,
        hint: String,
        #[source]
        err: std::io::Error,
    },
    /// The connection broke or carried garbage.
    #[error("Lost the connection to the daemon")]
    Frame(#[from] FrameError),
    /// The daemon answered with an error.
    #[error("{message}")]
    Daemon {
        code: snowflock_proto::admin::AdminErrorCode,
        message: String,
    },
    /// The daemon answered something unexpected.
    #[error("Unexpected answer from the daemon: {0}")]
    Unexpected(String),
}

pub struct Client {
    pub socket: PathBuf,
    /// Appended to the "not running" error: how to get a daemon there.
    pub hint: String,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
            hint: START_HINT.into(),
        }
    }

    /// A client whose "not running" error says `hint` instead of the default.
    pub fn with_hint(socket: &Path, hint: impl Into<String>) -> Client {
        Client {
            socket: socket.to_path_buf(),
            hint: hint.into(),
        }
    }

    pub fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket).map_err(|err| ClientError::NotRunning {
            path: self.socket.display().to_string(),
            hint: self.hint.clone(),
            err,
        })
    }

    /// One request, one answer; daemon errors become `ClientError::Daemon`.
    pub fn call(&self, req: &AdminRequest) -> Result<AdminResponse, ClientError> {
        self.call_with(req, None)
    }

    /// Like [`Client::call`], but gives up when a read or write stalls for
    /// `timeout` (for probes, so a hung daemon cannot hang the CLI).
    pub fn call_timeout(
        &self,
        req: &AdminRequest,
        timeout: Duration,
    ) -> Result<AdminResponse, ClientError> {
        self.call_with(req, Some(timeout))
    }

    fn call_with(
        &self,
        req: &AdminRequest,
        timeout: Option<Duration>,
    ) -> Result<AdminResponse, ClientError> {
        let mut s = self.connect()?;
        if timeout.is_some() {
            s.set_read_timeout(timeout).map_err(FrameError::from)?;
            s.set_write_timeout(timeout).map_err(FrameError::from)?;
        }
        write_frame(&mut s, req)?;
        match read_frame(&mut s)? {
            AdminResponse::Error { code, message } => Err(ClientError::Daemon { code, message }),
            r => Ok(r),
        }
    }
}
