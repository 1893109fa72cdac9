//! The cluster channel, client side: how this daemon asks other hosts'
//! daemons for capacity, starts and stops clones there, reports clones
//! that ended, and forwards a user's request. [`PeerChannel`] is the seam:
//! [`tcp::TcpPeers`] is the authenticated TCP channel, [`fake::FakePeers`]
//! routes calls to handlers in tests. The server side is
//! `frontends::peer`.
//!
//! May import: `host` (configuration), `snowflock_proto`. Never `state`,
//! `lifecycle`, `ops` or `frontends`.

#[cfg(test)]
pub mod fake;
pub mod tcp;

use futures::future::BoxFuture;
use snowflock_proto::admin::AdminResponse;
use snowflock_proto::peer::PeerRequest;
use std::net::SocketAddr;
use std::time::Duration;

/// Errors talking to another host.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("host {0:?} is not in this host's cluster configuration")]
    UnknownHost(String),
    #[error("this host is not part of a cluster")]
    NoCluster,
    #[error("cannot reach host {host} at {addr}")]
    Connect {
        host: String,
        addr: SocketAddr,
        #[source]
        err: std::io::Error,
    },
    #[error("host {host} at {addr} failed the cluster-key handshake")]
    Auth {
        host: String,
        addr: SocketAddr,
        #[source]
        err: snowflock_proto::auth::AuthError,
    },
    #[error("host {host} did not answer in time")]
    Timeout { host: String },
    #[error("host {host} broke the control protocol")]
    Protocol {
        host: String,
        #[source]
        err: snowflock_proto::frame::FrameError,
    },
}

impl PeerError {
    /// Wraps a framing error on the connection to `host`.
    pub fn protocol(
        host: &str,
    ) -> impl FnOnce(snowflock_proto::frame::FrameError) -> PeerError + '_ {
        move |err| PeerError::Protocol {
            host: host.into(),
            err,
        }
    }
}

/// A byte stream a user's admin connection arrives on.
pub trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

/// The channel to the other hosts of the cluster.
pub trait PeerChannel: Send + Sync + 'static {
    /// Names of the other hosts, in configuration order.
    fn peers(&self) -> Vec<String>;

    /// Sends one request to `host` and reads one answer, within `timeout`.
    fn call<'a>(
        &'a self,
        host: &'a str,
        req: &'a PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<AdminResponse, PeerError>>;

    /// Hands a user's connection to `host`: sends `req` there and relays
    /// bytes both ways until either side closes.
    fn forward<'a>(
        &'a self,
        host: &'a str,
        req: &'a PeerRequest,
        client: &'a mut dyn Duplex,
    ) -> BoxFuture<'a, Result<(), PeerError>>;
}

/// Sends `req` to every other host at once; one answer per peer, in
/// configuration order.
pub async fn call_all(
    peers: &dyn PeerChannel,
    req: &PeerRequest,
    timeout: Duration,
) -> Vec<(String, Result<AdminResponse, PeerError>)> {
    let names = peers.peers();
    let answers =
        futures::future::join_all(names.iter().map(|p| peers.call(p, req, timeout))).await;
    names.into_iter().zip(answers).collect()
}
