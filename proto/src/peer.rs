//! Host-to-host control protocol: `snowflockd` <-> `snowflockd`.
//!
//! Length-prefixed JSON frames ([`crate::frame`]) over TCP, after the
//! cluster-key handshake of [`crate::auth`]. Every connection sends one
//! [`PeerRequest`] and reads [`AdminResponse`]s: one for most requests, a
//! relayed stream for a forwarded `Exec`.
//!
//! ```text
//!  origin daemon                         clone host daemon
//!   | handshake (auth) <-------------------> |
//!   | PeerRequest::StartClones ------------> |  start clones from the descriptor
//!   | <------------- AdminResponse::ClonesStarted
//!   ...
//!   | <------------- PeerRequest::ChildEnded (new connection, other way)
//! ```
//!
//! The admin socket ([`crate::admin::AdminRequest`]) and this channel are
//! separate types, so a CLI cannot send a peer-only request and a peer
//! cannot send a CLI-only one (start a VM, shut a daemon down). The JSON
//! tags are those the daemons always used on this channel.

use serde::{Deserialize, Serialize};

/// A request from another daemon of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PeerRequest {
    /// This host's VMs only.
    VmListLocal,
    /// Free VM slots here.
    #[serde(rename = "peer_capacity")]
    Capacity,
    /// Start these clones from an encoded descriptor; memory comes on
    /// demand from `page_server`. Answered once every clone is ready or
    /// failed.
    #[serde(rename = "peer_start_clones")]
    StartClones {
        #[serde(with = "crate::b64")]
        descriptor: Vec<u8>,
        clone_ids: Vec<u32>,
        page_server: String,
    },
    /// Stop this host's clones of a ticket.
    #[serde(rename = "peer_stop_clones")]
    StopClones { ticket: String, reason: String },
    /// (Clone host to origin) a clone ended.
    #[serde(rename = "peer_child_ended")]
    ChildEnded {
        ticket: String,
        clone_id: u32,
        state: crate::api::ChildState,
    },
    /// A user's `vm stop` forwarded to the host that runs the VM.
    VmStop { name: String },
    /// A user's `vm console` forwarded to the host that runs the VM.
    VmConsole { name: String },
    /// A user's `vm exec` forwarded to the host that runs the VM; the
    /// connection then relays [`crate::admin::ExecInput`] frames.
    Exec { name: String, argv: Vec<String> },
    /// A user's `stats` forwarded to the host that runs the VM.
    Stats { name: String },
}

impl PeerRequest {
    /// The forwardable form of a user's request naming a VM, if it is one.
    pub fn forward(req: &crate::admin::AdminRequest) -> Option<PeerRequest> {
        use crate::admin::AdminRequest as A;
        Some(match req {
            A::VmStop { name } => PeerRequest::VmStop { name: name.clone() },
            A::VmConsole { name } => PeerRequest::VmConsole { name: name.clone() },
            A::Exec { name, argv } => PeerRequest::Exec {
                name: name.clone(),
                argv: argv.clone(),
            },
            A::Stats { name } => PeerRequest::Stats { name: name.clone() },
            _ => return None,
        })
    }

    /// Name of the VM a forwarded request is about.
    pub fn vm_name(&self) -> Option<&str> {
        match self {
            PeerRequest::VmStop { name }
            | PeerRequest::VmConsole { name }
            | PeerRequest::Exec { name, .. }
            | PeerRequest::Stats { name } => Some(name),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::AdminRequest;

    #[test]
    fn wire_tags_are_the_ones_daemons_always_sent() {
        let cases = [
            (PeerRequest::Capacity, r#"{"op":"peer_capacity"}"#),
            (PeerRequest::VmListLocal, r#"{"op":"vm_list_local"}"#),
            (
                PeerRequest::StopClones {
                    ticket: "t-1".into(),
                    reason: "r".into(),
                },
                r#"{"op":"peer_stop_clones","ticket":"t-1","reason":"r"}"#,
            ),
            (
                PeerRequest::Stats { name: "a".into() },
                r#"{"op":"stats","name":"a"}"#,
            ),
        ];
        for (req, json) in cases {
            assert_eq!(serde_json::to_string(&req).unwrap(), json);
            assert_eq!(serde_json::from_str::<PeerRequest>(json).unwrap(), req);
        }
    }

    #[test]
    fn cli_only_requests_are_not_peer_requests() {
        for json in [
            r#"{"op":"shutdown"}"#,
            r#"{"op":"vm_start","name":"a","image":"/i","mem_mib":128,"vcpus":1,"accel":"tcg"}"#,
            r#"{"op":"vm_list"}"#,
        ] {
            assert!(serde_json::from_str::<PeerRequest>(json).is_err(), "{json}");
        }
        for json in [r#"{"op":"peer_capacity"}"#, r#"{"op":"vm_list_local"}"#] {
            assert!(
                serde_json::from_str::<AdminRequest>(json).is_err(),
                "{json}"
            );
        }
    }

    #[test]
    fn only_vm_requests_forward() {
        let exec = AdminRequest::Exec {
            name: "a".into(),
            argv: vec!["true".into()],
        };
        let f = PeerRequest::forward(&exec).unwrap();
        assert_eq!(f.vm_name(), Some("a"));
        // Same bytes on the wire as the user's request.
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            serde_json::to_string(&exec).unwrap()
        );
        assert!(PeerRequest::forward(&AdminRequest::Shutdown).is_none());
    }
}
