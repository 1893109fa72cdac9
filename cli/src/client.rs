//! Blocking admin-socket client.

use snowflock_proto::admin::{AdminRequest, AdminResponse};
use snowflock_proto::frame::{read_frame, write_frame, FrameError};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Errors reaching the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("The snowflock daemon is not running (no answer on {path}); start it with `snowflock daemon start`")]
    NotRunning { path: String, #[source] err: std::io::Error },
    /// The connection broke or carried garbage.
    #[error("Lost the connection to the daemon")]
    Frame(#[from] FrameError),
    /// The daemon answered with an error.
    #[error("{message}")]
    Daemon { code: snowflock_proto::admin::AdminErrorCode, message: String },
    /// The daemon answered something unexpected.
    #[error("Unexpected answer from the daemon: {0}")]
    Unexpected(String),
}

pub struct Client {
    pub socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client { socket: socket.to_path_buf() }
    }

    pub fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket)
            .map_err(|err| ClientError::NotRunning { path: self.socket.display().to_string(), err })
    }

    /// One request, one answer; daemon errors become `ClientError::Daemon`.
    pub fn call(&self, req: &AdminRequest) -> Result<AdminResponse, ClientError> {
        let mut s = self.connect()?;
        write_frame(&mut s, req)?;
        match read_frame(&mut s)? {
            AdminResponse::Error { code, message } => Err(ClientError::Daemon { code, message }),
            r => Ok(r),
        }
    }
}
