//! The SnowFlock API for Rust programs in the guest.
//!
//! Each call opens a connection to the agent socket, sends one
//! [`ApiRequest`] frame and reads one [`ApiResponse`] frame. The socket is
//! [`snowflock_proto::AGENT_SOCKET`] unless the environment variable
//! [`SOCKET_ENV`] names another path.
//!
//! ```no_run
//! let t = snowflock::client::request_ticket(4)?;
//! match snowflock::client::clone(&t.id)? {
//!     0 => { let children = snowflock::client::join(&t.id)?; println!("{children:?}"); }
//!     k => { println!("I am clone {k}"); snowflock::client::exit(0)?; }
//! }
//! # Ok::<(), snowflock::client::SfError>(())
//! ```

use snowflock_proto::api::{ApiErrorCode, ApiRequest, ApiResponse};
use snowflock_proto::frame::{self, FrameError};
use std::convert::Infallible;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

pub use snowflock_proto::api::{ChildState, ChildStatus};

/// Environment variable that overrides the agent socket path.
pub const SOCKET_ENV: &str = "SNOWFLOCK_AGENT_SOCKET";

/// An allocation for `granted` clones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// `t-` followed by hex digits.
    pub id: String,
    /// Number of clones granted, at most the number requested.
    pub granted: u32,
}

/// Who this VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// VM name on the host.
    pub vm: String,
    /// 0 in the parent (or a VM never cloned), 1..=m in clones.
    pub clone_id: u32,
    /// The ticket this VM was cloned from, if it is a clone.
    pub ticket: Option<String>,
    /// This VM's IP address on its flock network, if known.
    pub ip: Option<String>,
}

/// Errors of the API calls.
#[derive(Debug, thiserror::Error)]
pub enum SfError {
    /// The agent socket could not be connected: the agent is not running.
    #[error("Cannot reach the snowflock agent at {}: {err}", path.display())]
    AgentUnreachable { path: PathBuf, err: std::io::Error },
    /// The agent or the host answered with an API error.
    #[error("{message}")]
    Api { code: ApiErrorCode, message: String },
    /// The connection broke, or the agent answered something unexpected.
    #[error("Protocol error talking to the snowflock agent: {0}")]
    Protocol(String),
}

impl SfError {
    /// The API error code, for [`SfError::Api`].
    pub fn code(&self) -> Option<ApiErrorCode> {
        match self {
            SfError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The agent socket path in use.
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(snowflock_proto::AGENT_SOCKET))
}

/// Sends one request and returns the agent's answer. API errors come back as
/// `Ok(ApiResponse::Error{..})`; only transport failures are `Err`.
pub fn call(req: &ApiRequest) -> Result<ApiResponse, SfError> {
    let path = socket_path();
    let mut s =
        UnixStream::connect(&path).map_err(|err| SfError::AgentUnreachable { path, err })?;
    frame::write_frame(&mut s, req).map_err(protocol)?;
    frame::read_frame(&mut s).map_err(protocol)
}

fn protocol(e: FrameError) -> SfError {
    match e {
        FrameError::Closed => SfError::Protocol("The agent closed the connection".into()),
        other => SfError::Protocol(snowflock_proto::error::chain(&other)),
    }
}

/// Sends `req`, turning `ApiResponse::Error` into [`SfError::Api`].
fn call_ok(req: &ApiRequest) -> Result<ApiResponse, SfError> {
    match call(req)? {
        ApiResponse::Error { code, message } => Err(SfError::Api { code, message }),
        other => Ok(other),
    }
}

fn unexpected(what: &str, got: &ApiResponse) -> SfError {
    let tag = serde_json::to_value(got)
        .ok()
        .and_then(|v| v.get("result").and_then(|r| r.as_str()).map(str::to_string))
        .unwrap_or_else(|| "?".into());
    SfError::Protocol(format!("Expected a {what} answer, got {tag:?}"))
}

/// The children of `ticket` now, without waiting: the ticket's state
/// (`granted`, `cloning`, `active`, `discarded`) and each child.
pub fn status(ticket: &str) -> Result<(String, Vec<ChildStatus>), SfError> {
    match call_ok(&ApiRequest::Status {
        ticket: ticket.into(),
    })? {
        ApiResponse::Status { state, children } => Ok((state, children)),
        other => Err(unexpected("status", &other)),
    }
}

/// How a ticket's clones get their memory ([`request_ticket_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TicketOptions {
    /// `Some(true)`: the clones' hosts fetch the whole memory (and disk)
    /// of the clone point in the background, so the clones stop depending
    /// on this VM's host once it is there; `Some(false)`: they fetch only
    /// what the clones read; `None`: the host's default.
    pub independent: Option<bool>,
}

/// `sf_request_ticket(n)`: asks for an allocation of `n` clones.
pub fn request_ticket(n: u32) -> Result<Ticket, SfError> {
    request_ticket_with(n, TicketOptions::default())
}

/// [`request_ticket`] with options (`sf ticket --independent N`).
pub fn request_ticket_with(n: u32, opts: TicketOptions) -> Result<Ticket, SfError> {
    let req = ApiRequest::RequestTicket {
        n,
        independent: opts.independent,
    };
    match call_ok(&req)? {
        ApiResponse::Ticket { ticket, granted } => Ok(Ticket {
            id: ticket,
            granted,
        }),
        other => Err(unexpected("ticket", &other)),
    }
}

/// `sf_clone(ticket)`: clones this VM. Returns 0 in the parent and the clone
/// ID (1..=m) in each clone. Runs the in-process pre-clone hook
/// (`malloc_trim(0)`) first.
pub fn clone(ticket: &str) -> Result<u32, SfError> {
    allocator_hooks::malloc_trim();
    match call_ok(&ApiRequest::Clone {
        ticket: ticket.to_string(),
    })? {
        ApiResponse::Cloned { clone_id, .. } => Ok(clone_id),
        other => Err(unexpected("cloned", &other)),
    }
}

/// `sf_exit(status)`: ends this clone. On success the VM is destroyed, so
/// this never returns `Ok`: once the agent accepts, it blocks forever.
pub fn exit(status: i32) -> Result<Infallible, SfError> {
    match call_ok(&ApiRequest::Exit { status })? {
        ApiResponse::Exiting => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        other => Err(unexpected("exiting", &other)),
    }
}

/// `sf_join(ticket)`: waits until every child of `ticket` has ended.
pub fn join(ticket: &str) -> Result<Vec<ChildStatus>, SfError> {
    match call_ok(&ApiRequest::Join {
        ticket: ticket.to_string(),
    })? {
        ApiResponse::Joined { children } => Ok(children),
        other => Err(unexpected("joined", &other)),
    }
}

/// `sf_kill(ticket)`: ends every child of `ticket` now.
pub fn kill(ticket: &str) -> Result<Vec<ChildStatus>, SfError> {
    match call_ok(&ApiRequest::Kill {
        ticket: ticket.to_string(),
    })? {
        ApiResponse::Killed { children } => Ok(children),
        other => Err(unexpected("killed", &other)),
    }
}

/// Who am I: VM name, clone ID, ticket and IP.
pub fn id() -> Result<Identity, SfError> {
    match call_ok(&ApiRequest::Id)? {
        ApiResponse::Identity {
            vm,
            clone_id,
            ticket,
            ip,
        } => Ok(Identity {
            vm,
            clone_id,
            ticket,
            ip,
        }),
        other => Err(unexpected("identity", &other)),
    }
}

/// Formats a child as `ID STATE [CODE|REASON]`, e.g. `1 exited 0`,
/// `2 lost clone QEMU process died`, `3 killed`.
pub fn format_child(c: &ChildStatus) -> String {
    match &c.state {
        ChildState::Running => format!("{} running", c.clone_id),
        ChildState::Exited { code } => format!("{} exited {code}", c.clone_id),
        ChildState::Killed => format!("{} killed", c.clone_id),
        ChildState::Lost { reason } => format!("{} lost {reason}", c.clone_id),
    }
}

/// Formats an identity as `clone_id=K ticket=T vm=NAME ip=IP`, with `-` for
/// a missing ticket or IP.
pub fn format_identity(i: &Identity) -> String {
    format!(
        "clone_id={} ticket={} vm={} ip={}",
        i.clone_id,
        i.ticket.as_deref().unwrap_or("-"),
        i.vm,
        i.ip.as_deref().unwrap_or("-")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Serves `answers` in order, one per connection, returning the requests.
    fn fake_agent(
        path: &std::path::Path,
        answers: Vec<ApiResponse>,
    ) -> std::thread::JoinHandle<Vec<ApiRequest>> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for a in answers {
                let (mut s, _) = l.accept().unwrap();
                seen.push(frame::read_frame(&mut s).unwrap());
                frame::write_frame(&mut s, &a).unwrap();
            }
            seen
        })
    }

    #[test]
    fn calls_against_a_fake_agent() {
        let dir = std::env::temp_dir().join(format!("sf-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let child = ChildStatus {
            clone_id: 1,
            vm: "v-c1".into(),
            ip: None,
            state: ChildState::Exited { code: 3 },
        };
        let h = fake_agent(
            &sock,
            vec![
                ApiResponse::Ticket {
                    ticket: "t-ab".into(),
                    granted: 2,
                },
                ApiResponse::Cloned {
                    clone_id: 0,
                    ticket: "t-ab".into(),
                },
                ApiResponse::Joined {
                    children: vec![child.clone()],
                },
                ApiResponse::Error {
                    code: ApiErrorCode::UnknownTicket,
                    message: "No ticket t-cd".into(),
                },
                ApiResponse::Exiting,
                ApiResponse::Ticket {
                    ticket: "t-cd".into(),
                    granted: 1,
                },
            ],
        );
        // SOCKET_ENV is process-wide; this is the only test in this binary
        // that sets it.
        std::env::set_var(SOCKET_ENV, &sock);
        assert_eq!(
            request_ticket(3).unwrap(),
            Ticket {
                id: "t-ab".into(),
                granted: 2
            }
        );
        assert_eq!(clone("t-ab").unwrap(), 0);
        assert_eq!(join("t-ab").unwrap(), vec![child]);
        let e = kill("t-cd").unwrap_err();
        assert_eq!(e.code(), Some(ApiErrorCode::UnknownTicket));
        assert_eq!(e.to_string(), "No ticket t-cd");
        // An unexpected answer is a protocol error.
        let e = id().unwrap_err();
        assert!(matches!(e, SfError::Protocol(_)), "{e}");
        let opts = TicketOptions {
            independent: Some(true),
        };
        assert_eq!(request_ticket_with(1, opts).unwrap().granted, 1);
        let seen = h.join().unwrap();
        assert_eq!(
            seen[0],
            ApiRequest::RequestTicket {
                n: 3,
                independent: None
            }
        );
        assert_eq!(
            seen[1],
            ApiRequest::Clone {
                ticket: "t-ab".into()
            }
        );
        assert_eq!(seen[4], ApiRequest::Id);
        assert_eq!(
            seen[5],
            ApiRequest::RequestTicket {
                n: 1,
                independent: Some(true)
            }
        );

        // Nobody listening: the agent is not running.
        std::fs::remove_file(&sock).unwrap();
        let e = id().unwrap_err();
        assert!(matches!(e, SfError::AgentUnreachable { .. }));
        assert!(
            e.to_string().starts_with(&format!(
                "Cannot reach the snowflock agent at {}: ",
                sock.display()
            )),
            "{e}"
        );
        std::env::remove_var(SOCKET_ENV);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn formatting() {
        let c = |state| ChildStatus {
            clone_id: 2,
            vm: "v".into(),
            ip: None,
            state,
        };
        assert_eq!(
            format_child(&c(ChildState::Exited { code: 0 })),
            "2 exited 0"
        );
        assert_eq!(format_child(&c(ChildState::Killed)), "2 killed");
        assert_eq!(format_child(&c(ChildState::Running)), "2 running");
        assert_eq!(
            format_child(&c(ChildState::Lost {
                reason: "clone QEMU process died".into()
            })),
            "2 lost clone QEMU process died"
        );
        let i = Identity {
            vm: "vm1".into(),
            clone_id: 0,
            ticket: None,
            ip: Some("10.0.0.1".into()),
        };
        assert_eq!(
            format_identity(&i),
            "clone_id=0 ticket=- vm=vm1 ip=10.0.0.1"
        );
    }
}
