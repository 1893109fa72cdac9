//! Protocol types shared by every side of snowflock.
//!
//! Four protocols live here, each with types that all sides import:
//!
//! * [`api`]: application <-> guest agent, over the guest Unix socket
//!   `/run/snowflock/agent.sock` (length-prefixed JSON, see [`frame`]).
//! * [`channel`]: guest agent <-> host daemon, over the virtio-serial port
//!   `org.snowflock.agent` (newline-delimited JSON, see [`channel`] for why).
//! * [`admin`]: `snowflock` CLI <-> `snowflockd`, over the daemon's Unix
//!   socket (length-prefixed JSON, see [`frame`]).
//! * [`peer`]: `snowflockd` <-> `snowflockd`, over the authenticated cluster
//!   control channel (length-prefixed JSON).
//!
//! [`error::chain`] is the one error printer every crate uses.
//!
//! [`host_config`] is the shape of `host.toml`: the daemon reads it, the CLI writes it.
//!
//! [`sibling`] is what `sf-exec` and the agents speak to run a command in
//! a sibling VM (MPI's remote start).
//!
//! [`auth`] holds the cluster-key handshake that host-to-host TCP
//! connections (page server, daemon control channel) start with.

pub mod admin;
pub mod api;
pub mod auth;
pub mod channel;
pub mod error;
pub mod frame;
pub mod host_config;
pub mod peer;
pub mod sibling;

/// Version of the guest channel protocol. Both sides accept N and N-1.
pub const CHANNEL_VERSION: u32 = 1;
/// Version of the admin protocol.
pub const ADMIN_VERSION: u32 = 1;

/// Name of the virtio-serial port that carries the guest channel.
pub const AGENT_PORT_NAME: &str = "org.snowflock.agent";
/// Path of the agent's API socket inside the guest.
pub const AGENT_SOCKET: &str = "/run/snowflock/agent.sock";
/// Default path of the host daemon's admin socket.
pub const DAEMON_SOCKET: &str = "/run/snowflock/snowflockd.sock";

/// A seeded xorshift64 generator for the decoders' random-input tests.
#[cfg(test)]
pub(crate) fn test_rng(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Serde helper: `Vec<u8>` as base64 text, so binary payloads stay compact
/// and JSON lines never contain raw newlines.
pub mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}
