//! The SnowFlock API as seen by applications inside the guest.
//!
//! Applications (the `sf` CLI, `libsnowflock.so`, the Python module) connect
//! to the agent socket [`crate::AGENT_SOCKET`] and exchange length-prefixed
//! JSON frames ([`crate::frame`]): one [`ApiRequest`], one [`ApiResponse`].
//!
//! ```text
//!  app                 agent                      snowflockd
//!   | ApiRequest -->     |                             |
//!   |                    | channel::GuestMsg::Request->|
//!   |                    |<- channel::HostMsg::Response|  (or BecomeClone in a clone)
//!   |<-- ApiResponse     |                             |
//! ```

use serde::{Deserialize, Serialize};

/// Largest number of clones one ticket may ask for.
pub const MAX_CLONES_PER_TICKET: u32 = 1024;

/// A request from an application to the SnowFlock API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ApiRequest {
    /// `sf_request_ticket(n)`: ask for an allocation of `n` clones.
    RequestTicket {
        n: u32,
        /// Independence: the clones' hosts fetch the whole memory (and
        /// disk) of the clone point in the background, so the clones stop
        /// depending on this VM's host once it is there. `None` (left out
        /// on the wire): the host's default (`independent` in host.toml).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        independent: Option<bool>,
    },
    /// `sf_clone(ticket)`: clone this VM using the allocation in `ticket`.
    Clone { ticket: String },
    /// `sf_exit(status)`: end this clone (children only).
    Exit { status: i32 },
    /// `sf_join(ticket)`: wait until every child of `ticket` has exited.
    Join { ticket: String },
    /// `sf_kill(ticket)`: end every child of `ticket` now.
    Kill { ticket: String },
    /// Who am I: clone ID, ticket and VM name.
    Id,
    /// The children of `ticket` now, without waiting (`sf status`).
    Status { ticket: String },
    /// `sf-exec`: run `command` in the sibling `host` of this VM's flock.
    /// Answered by the agent itself, never by the host; after it the
    /// connection carries [`crate::sibling`] frames.
    SiblingExec {
        host: String,
        command: String,
        cwd: String,
    },
}

/// How one child of a ticket ended (or is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ChildState {
    /// Still running.
    Running,
    /// Called `sf_exit(code)`.
    Exited { code: i32 },
    /// Ended by `sf_kill` (or by stopping the parent).
    Killed,
    /// Died or became unreachable without calling `sf_exit`.
    Lost { reason: String },
}

/// One child's status in a join or kill answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStatus {
    pub clone_id: u32,
    pub vm: String,
    /// The child's address on the flock network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(flatten)]
    pub state: ChildState,
}

/// Error classes an API call can fail with. Stable: tools match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    /// The ticket does not exist (or never did).
    UnknownTicket,
    /// The ticket was already used by a clone call.
    TicketUsed,
    /// The ticket was killed or joined and is gone.
    TicketDiscarded,
    /// The ticket belongs to another VM.
    NotYourTicket,
    /// The call is not allowed for this VM's role (e.g. `sf_exit` in the parent).
    WrongRole,
    /// No capacity or quota left.
    NoCapacity,
    /// The request was malformed.
    BadRequest,
    /// The host daemon is not reachable from the guest.
    HostUnavailable,
    /// The host could not complete the operation.
    Failed,
}

/// The answer to an [`ApiRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ApiResponse {
    /// A ticket for `granted` (<= requested) clones.
    Ticket { ticket: String, granted: u32 },
    /// The clone call returned: 0 in the parent, the clone's ID in each
    /// clone (IDs are unique among the parent's running clones: a second
    /// ticket's clones follow the first's).
    Cloned { clone_id: u32, ticket: String },
    /// `sf_exit` accepted; the VM is being torn down.
    Exiting,
    /// All children of the ticket have ended.
    Joined { children: Vec<ChildStatus> },
    /// The children of the ticket were ended.
    Killed { children: Vec<ChildStatus> },
    /// The ticket's state (`granted`, `cloning`, `active`, `discarded`)
    /// and its children now.
    Status {
        state: String,
        children: Vec<ChildStatus>,
    },
    /// Identity of this VM.
    Identity {
        vm: String,
        clone_id: u32,
        ticket: Option<String>,
        ip: Option<String>,
    },
    /// The call failed.
    Error { code: ApiErrorCode, message: String },
}

impl ApiResponse {
    /// An error answer.
    pub fn error(code: ApiErrorCode, message: impl Into<String>) -> ApiResponse {
        ApiResponse::Error {
            code,
            message: message.into(),
        }
    }
}

/// A request whose fields are out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// `sf_request_ticket(n)` with n out of range.
    #[error("Clone count must be between 1 and {MAX_CLONES_PER_TICKET}, got {0}")]
    CloneCount(u32),
    /// A ticket that is not `t-` and hex digits.
    #[error("Malformed ticket {0:?}")]
    Ticket(String),
    /// An `sf-exec` command line above [`crate::sibling::MAX_COMMAND`].
    #[error("Command of {0} bytes is longer than the limit of {max} bytes", max = crate::sibling::MAX_COMMAND)]
    CommandTooLong(usize),
}

impl ApiRequest {
    /// Checks field values that serde cannot (lengths, ranges).
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        match self {
            ApiRequest::RequestTicket { n, .. } if *n == 0 || *n > MAX_CLONES_PER_TICKET => {
                Err(InvalidRequest::CloneCount(*n))
            }
            ApiRequest::Clone { ticket }
            | ApiRequest::Join { ticket }
            | ApiRequest::Kill { ticket }
            | ApiRequest::Status { ticket }
                if !valid_ticket_syntax(ticket) =>
            {
                Err(InvalidRequest::Ticket(ticket.clone()))
            }
            ApiRequest::SiblingExec { command, .. }
                if command.len() > crate::sibling::MAX_COMMAND =>
            {
                Err(InvalidRequest::CommandTooLong(command.len()))
            }
            _ => Ok(()),
        }
    }
}

/// Tickets are `t-` followed by 1 to 64 hex digits.
pub fn valid_ticket_syntax(t: &str) -> bool {
    t.strip_prefix("t-")
        .is_some_and(|h| !h.is_empty() && h.len() <= 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let r = ApiRequest::RequestTicket {
            n: 3,
            independent: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"request_ticket","n":3}"#
        );
        let r = ApiRequest::RequestTicket {
            n: 3,
            independent: Some(true),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"request_ticket","n":3,"independent":true}"#
        );
        let s = ChildStatus {
            clone_id: 2,
            vm: "a-c2".into(),
            ip: None,
            state: ChildState::Exited { code: 7 },
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"clone_id":2,"vm":"a-c2","state":"exited","code":7}"#
        );
    }

    #[test]
    fn the_independence_flag_is_optional() {
        let parse = |s: &str| serde_json::from_str::<ApiRequest>(s);
        let want = |independent| ApiRequest::RequestTicket { n: 2, independent };
        // Agents and libraries older than the flag send none.
        assert_eq!(
            parse(r#"{"op":"request_ticket","n":2}"#).unwrap(),
            want(None)
        );
        assert_eq!(
            parse(r#"{"op":"request_ticket","n":2,"independent":null}"#).unwrap(),
            want(None)
        );
        assert_eq!(
            parse(r#"{"op":"request_ticket","independent":false,"n":2}"#).unwrap(),
            want(Some(false))
        );
        assert_eq!(
            parse(r#"{"op":"request_ticket","n":2,"independent":true}"#).unwrap(),
            want(Some(true))
        );
        assert!(parse(r#"{"op":"request_ticket","n":2,"independent":1}"#).is_err());
        assert!(parse(r#"{"op":"request_ticket","n":2,"independent":"yes"}"#).is_err());
    }

    #[test]
    fn validation() {
        let ticket = |n| ApiRequest::RequestTicket {
            n,
            independent: Some(false),
        };
        assert!(ticket(0).validate().is_err());
        assert!(ticket(5000).validate().is_err());
        assert!(ticket(1).validate().is_ok());
        assert!(ApiRequest::Clone {
            ticket: "t-12ab".into()
        }
        .validate()
        .is_ok());
        assert!(ApiRequest::Clone {
            ticket: "12ab".into()
        }
        .validate()
        .is_err());
        assert!(ApiRequest::Clone {
            ticket: "t-zz".into()
        }
        .validate()
        .is_err());
    }
}
