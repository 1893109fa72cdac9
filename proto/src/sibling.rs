//! `sf-exec`: running a command in a sibling VM of the same flock.
//!
//! MPI launchers start their remote daemons with an rsh-like command
//! (`LAUNCHER HOST CMD...`). `sf-exec` is that command. It never talks to
//! the network itself: it asks its own agent, which knows the flock's key,
//! and the agent of the sibling runs the command.
//!
//! ```text
//!  sf-exec (any user)       agent A (root)                  agent B (root), sibling
//!   |-- SiblingExec{host,--->|                                  |
//!   |   command, cwd}        | SO_PEERCRED -> uid, gid          |
//!   |   (API frame)          | host in A's flock? not A itself? |
//!   |                        |--- TCP to B:SIBLING_PORT ------->| source in B's flock?
//!   |                        |<== cluster-key handshake, ======>|  (auth.rs, flock key)
//!   |                        |--- Start{uid, gid, command, cwd}>|  /bin/sh -c COMMAND
//!   |<=========== relayed both ways, byte for byte ============>|  as uid:gid, own group
//!   |  Stdin / StdinEof / Signal                Started / Stdout / Stderr / Ping / Exit
//! ```
//!
//! After the `SiblingExec` request every frame on the connection, both
//! ways, is a [`ToRunner`] or [`FromRunner`] in the length-prefixed JSON of
//! [`crate::frame`]; data is base64. A refusal at any step (not a sibling,
//! no answer, wrong key, command not started) is one [`FromRunner::Refused`]
//! and the end of the connection.
//!
//! The *flock key* is 32 random bytes the parent's agent makes at its first
//! start and keeps in `/run/snowflock/flock.key` (root only, in RAM). A
//! clone is a copy of its parent's memory, so every VM of a flock holds the
//! same key and no other VM does; a user in a sibling who is not root
//! cannot read it, so cannot claim to be another user.
//!
//! The runner sends [`FromRunner::Ping`] every [`PING_INTERVAL`]; a client
//! that hears nothing for [`PEER_TIMEOUT`] decides the sibling is gone
//! (its VM was killed or lost) and says so, instead of hanging.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::time::Duration;

/// TCP port the agents listen on for their siblings, on the flock network.
pub const SIBLING_PORT: u16 = 7179;
/// Interval of the runner's keepalive frames.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// Silence after which a client gives the sibling up.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest command line accepted, in bytes.
pub const MAX_COMMAND: usize = 256 * 1024;
/// Exit status `sf-exec` uses for its own failures, as ssh does.
pub const EXIT_FAILURE: i32 = 255;

/// What the agent asks its sibling to run, after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// User and group the command runs as: the caller's, as the kernel
    /// reported them to the caller's agent.
    pub uid: u32,
    pub gid: u32,
    /// Run with `/bin/sh -c`, as ssh runs its command.
    pub command: String,
    /// Working directory; the user's home (then `/`) when it does not
    /// exist in the sibling.
    pub cwd: String,
}

/// Frames from `sf-exec` to the runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToRunner {
    Stdin {
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    StdinEof,
    /// Deliver this signal number to the command's process group.
    Signal {
        signo: i32,
    },
}

/// Frames from the runner (or the caller's agent, for `Refused`) to
/// `sf-exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum FromRunner {
    /// The command runs, as process `pid` in the sibling.
    Started { pid: u32 },
    Stdout {
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    Stderr {
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// Keepalive; carries nothing.
    Ping,
    /// The command ended: its exit code, or 128 + the signal that killed it.
    Exit { code: i32 },
    /// Nothing was run; the reason is for the user.
    Refused { message: String },
}

/// Why a host is not somewhere `sf-exec` may run a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(
        "{0:?} is not an IPv4 address (sf-exec takes a sibling's flock address, like 10.250.3.2)"
    )]
    NotAnAddress(String),
    #[error("this VM has no flock address yet, so it has no siblings")]
    NoFlock,
    #[error("{host} is not in this VM's flock network {net}")]
    OutsideFlock { host: String, net: String },
    #[error("{0} is this VM's own address")]
    Itself(String),
}

/// A VM's flock network, from its own `IP/PREFIX`.
struct FlockNet {
    own: Ipv4Addr,
    net: u32,
    mask: u32,
    prefix: u32,
}

impl FlockNet {
    fn parse(own_cidr: Option<&str>) -> Result<FlockNet, TargetError> {
        let own = own_cidr.ok_or(TargetError::NoFlock)?;
        let (ip, prefix) = own.split_once('/').unwrap_or((own, "24"));
        let (Ok(own), Ok(prefix)) = (ip.parse::<Ipv4Addr>(), prefix.parse::<u32>()) else {
            return Err(TargetError::NoFlock);
        };
        if !(1..=30).contains(&prefix) {
            return Err(TargetError::NoFlock);
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(FlockNet {
            own,
            net: u32::from(own) & mask,
            mask,
            prefix,
        })
    }

    /// A host address of the network: inside it, neither its network nor
    /// its broadcast address.
    fn holds(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        a & self.mask == self.net && a != self.net && a != self.net | !self.mask
    }
}

/// Checks that `host` is a sibling address in the flock of a VM whose own
/// address is `own_cidr` (`10.250.F.k/24`): same network, not the network
/// or broadcast address, not the VM itself.
pub fn check_target(host: &str, own_cidr: Option<&str>) -> Result<Ipv4Addr, TargetError> {
    let target: Ipv4Addr = host
        .parse()
        .map_err(|_| TargetError::NotAnAddress(host.to_string()))?;
    let f = FlockNet::parse(own_cidr)?;
    if !f.holds(target) {
        return Err(TargetError::OutsideFlock {
            host: host.to_string(),
            net: format!("{}/{}", Ipv4Addr::from(f.net), f.prefix),
        });
    }
    if target == f.own {
        return Err(TargetError::Itself(host.to_string()));
    }
    Ok(target)
}

/// True when `peer` is a host of the network of `own_cidr`: what a runner
/// checks of the address a connection comes from.
pub fn same_flock(peer: std::net::IpAddr, own_cidr: Option<&str>) -> bool {
    match peer {
        std::net::IpAddr::V4(p) => FlockNet::parse(own_cidr).is_ok_and(|f| f.holds(p)),
        std::net::IpAddr::V6(_) => false,
    }
}

/// Joins a command's words the way ssh does: with single spaces, no
/// quoting (the launchers quote what they need themselves).
pub fn join_command(words: &[String]) -> String {
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    #[test]
    fn targets_must_be_siblings() {
        let own = Some("10.250.3.1/24");
        assert_eq!(
            check_target("10.250.3.2", own).unwrap().to_string(),
            "10.250.3.2"
        );
        assert!(matches!(
            check_target("10.250.3.1", own),
            Err(TargetError::Itself(_))
        ));
        for bad in [
            "10.250.4.2",
            "10.250.3.0",
            "10.250.3.255",
            "127.0.0.1",
            "8.8.8.8",
        ] {
            let e = check_target(bad, own).unwrap_err();
            assert!(matches!(e, TargetError::OutsideFlock { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("10.250.3.0/24"), "{e}");
        }
        for bad in ["host", "", "10.250.3", "::1", "10.250.3.2; rm -rf /"] {
            assert!(
                matches!(check_target(bad, own), Err(TargetError::NotAnAddress(_))),
                "{bad}"
            );
        }
        assert_eq!(check_target("10.250.3.2", None), Err(TargetError::NoFlock));
        assert_eq!(
            check_target("10.250.3.2", Some("junk")),
            Err(TargetError::NoFlock)
        );
    }

    #[test]
    fn peers_are_checked_against_the_flock() {
        let own = Some("10.250.3.4/24");
        assert!(same_flock("10.250.3.1".parse().unwrap(), own));
        assert!(same_flock("10.250.3.4".parse().unwrap(), own));
        assert!(!same_flock("10.250.2.1".parse().unwrap(), own));
        assert!(!same_flock("::1".parse().unwrap(), own));
        assert!(!same_flock("10.250.3.1".parse().unwrap(), None));
    }

    #[test]
    fn frames_round_trip_and_junk_is_an_error() {
        let msgs = vec![
            FromRunner::Started { pid: 7 },
            FromRunner::Stdout {
                data: vec![0, 1, 255, b'\n'],
            },
            FromRunner::Exit { code: 3 },
            FromRunner::Refused {
                message: "no".into(),
            },
        ];
        for m in msgs {
            let enc = frame::encode(&m);
            let back: FromRunner = frame::decode(&enc[4..]).unwrap();
            assert_eq!(back, m);
        }
        assert_eq!(
            String::from_utf8(frame::encode(&ToRunner::Signal { signo: 2 })[4..].to_vec()).unwrap(),
            r#"{"t":"signal","signo":2}"#
        );
        assert!(frame::decode::<ToRunner>(br#"{"t":"stdin","data":"%%"}"#).is_err());
        assert!(frame::decode::<Start>(br#"{"uid":0}"#).is_err());
    }
}
