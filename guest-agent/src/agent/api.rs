//! The API socket: applications' calls, one thread per connection.
//!
//! A connection carries any number of requests, one at a time: frame in,
//! frame out ([`snowflock_proto::frame`]). A frame that does not parse or
//! validate gets `Error{BadRequest}` and the connection goes on; a frame
//! longer than [`MAX_FRAME`] gets `Error{BadRequest}` and the connection is
//! closed, since the stream cannot be resynchronised. A client that stalls
//! holds only its own thread, and only for [`IDLE_TIMEOUT`]; at most
//! [`MAX_CONNECTIONS`] connections are served at once.

use super::{host, Agent};
use snowflock_proto::api::{ApiErrorCode, ApiRequest, ApiResponse};
use snowflock_proto::frame::{self, MAX_FRAME};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; more are refused with an error frame.
pub const MAX_CONNECTIONS: usize = 128;
/// A connection that sends nothing (or stalls mid-frame) this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Writing an answer to a client that does not read gives up after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const THREAD_STACK: usize = 512 * 1024;

/// Binds the API socket and serves it on a background thread.
pub fn spawn(agent: Arc<Agent>) -> io::Result<()> {
    let listener = bind(&agent.cfg.socket)?;
    tracing::info!("API socket listening on {}", agent.cfg.socket.display());
    std::thread::Builder::new()
        .name("api-accept".into())
        .spawn(move || accept_loop(agent, listener))?;
    Ok(())
}

/// Binds `path`: creates its directory, removes a stale socket, mode 0666.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    // std sets SOCK_CLOEXEC on the listener and on accepted sockets.
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

fn accept_loop(agent: Arc<Agent>, listener: UnixListener) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut error_logged = false;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => {
                error_logged = false;
                s
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                if !error_logged {
                    tracing::warn!("API accept failed: {e}");
                    error_logged = true;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            refuse(stream, "Too many connections to the snowflock agent");
            continue;
        }
        let a = agent.clone();
        let counter = active.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                serve_connection(&a, stream);
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("Cannot start a connection thread: {e}");
        }
    }
}

fn refuse(mut s: UnixStream, message: &str) {
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = frame::write_frame(
        &mut s,
        &ApiResponse::Error {
            code: ApiErrorCode::Failed,
            message: message.into(),
        },
    );
}

/// Why reading a request frame stopped.
enum ReadError {
    Closed,
    TooLarge(usize),
    Io(io::Error),
}

/// Reads one frame payload. Memory grows with the bytes actually received,
/// not with the announced length.
fn read_payload(s: &mut UnixStream) -> Result<Vec<u8>, ReadError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match s.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ReadError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    s.take(len as u64)
        .read_to_end(&mut buf)
        .map_err(ReadError::Io)?;
    if buf.len() < len {
        return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(buf)
}

fn bad_request(message: String) -> ApiResponse {
    ApiResponse::Error {
        code: ApiErrorCode::BadRequest,
        message,
    }
}

fn serve_connection(agent: &Agent, mut s: UnixStream) {
    let _ = s.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    loop {
        let resp = match read_payload(&mut s) {
            Ok(payload) => match serde_json::from_slice::<ApiRequest>(&payload) {
                Ok(req) => match req.validate() {
                    // The connection becomes the command's stream.
                    Ok(()) => match req {
                        ApiRequest::SiblingExec { host, command, cwd } => {
                            return super::relay::run(agent, s, host, command, cwd)
                        }
                        req => handle(agent, req),
                    },
                    Err(e) => bad_request(e.to_string()),
                },
                Err(e) => bad_request(format!("Malformed request: {e}")),
            },
            Err(ReadError::Closed) => return,
            Err(ReadError::TooLarge(n)) => {
                let _ = frame::write_frame(
                    &mut s,
                    &bad_request(format!(
                        "Frame of {n} bytes exceeds the limit of {MAX_FRAME} bytes"
                    )),
                );
                return;
            }
            Err(ReadError::Io(e)) => {
                tracing::debug!("API connection dropped: {e}");
                return;
            }
        };
        if let Err(e) = frame::write_frame(&mut s, &resp) {
            tracing::debug!(
                "Cannot answer an API client: {}",
                snowflock_proto::error::chain(&e)
            );
            return;
        }
    }
}

/// Answers one valid request.
pub fn handle(agent: &Agent, req: ApiRequest) -> ApiResponse {
    match req {
        ApiRequest::Id => {
            let i = agent.ident();
            ApiResponse::Identity {
                vm: i.vm,
                clone_id: i.clone_id,
                ticket: i.ticket,
                ip: i.ip,
            }
        }
        other => host::forward(agent, other),
    }
}
