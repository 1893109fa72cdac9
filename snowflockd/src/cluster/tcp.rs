//! The cluster channel over TCP: each daemon listens on `listen`; a
//! connection starts with the cluster-key handshake of
//! [`snowflock_proto::auth`] (both sides prove they hold the key; nothing
//! else is read before that) and then carries one
//! [`PeerRequest`] and its answers. Holding the cluster key is therefore
//! cluster-admin power, as root on a host is.

use super::{Duplex, PeerChannel, PeerError};
use crate::host::config::Cluster;
use futures::future::BoxFuture;
use snowflock_proto::admin::AdminResponse;
use snowflock_proto::auth::{self, ClusterKey};
use snowflock_proto::frame::tokio_io::{read_frame, write_frame};
use snowflock_proto::peer::PeerRequest;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Time a peer gets to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to open a connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The other hosts of this host's cluster, reached over TCP.
pub struct TcpPeers {
    cluster: Option<(Cluster, Arc<ClusterKey>)>,
}

impl TcpPeers {
    /// Peers of a cluster host.
    pub fn new(cluster: Cluster, key: Arc<ClusterKey>) -> TcpPeers {
        TcpPeers {
            cluster: Some((cluster, key)),
        }
    }

    /// A stand-alone host: no peers; every call fails with `NoCluster`.
    pub fn none() -> TcpPeers {
        TcpPeers { cluster: None }
    }

    /// Opens an authenticated control connection to `host`.
    async fn connect(&self, host: &str) -> Result<TcpStream, PeerError> {
        let (c, key) = self.cluster.as_ref().ok_or(PeerError::NoCluster)?;
        let addr = c
            .peer(host)
            .ok_or_else(|| PeerError::UnknownHost(host.into()))?
            .addr;
        let mut s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => {
                return Err(PeerError::Connect {
                    host: host.into(),
                    addr,
                    err,
                })
            }
            Err(_) => return Err(PeerError::Timeout { host: host.into() }),
        };
        let _ = s.set_nodelay(true);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, auth::client_async(&mut s, key)).await {
            Ok(Ok(())) => Ok(s),
            Ok(Err(err)) => Err(PeerError::Auth {
                host: host.into(),
                addr,
                err,
            }),
            Err(_) => Err(PeerError::Timeout { host: host.into() }),
        }
    }

    async fn send(&self, host: &str, req: &PeerRequest) -> Result<TcpStream, PeerError> {
        let mut s = self.connect(host).await?;
        write_frame(&mut s, req)
            .await
            .map_err(PeerError::protocol(host))?;
        Ok(s)
    }
}

impl PeerChannel for TcpPeers {
    fn peers(&self) -> Vec<String> {
        self.cluster
            .as_ref()
            .map(|(c, _)| c.peers.iter().map(|p| p.name.clone()).collect())
            .unwrap_or_default()
    }

    fn call<'a>(
        &'a self,
        host: &'a str,
        req: &'a PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<AdminResponse, PeerError>> {
        Box::pin(async move {
            let work = async {
                let mut s = self.send(host, req).await?;
                read_frame::<_, AdminResponse>(&mut s)
                    .await
                    .map_err(PeerError::protocol(host))
            };
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| PeerError::Timeout { host: host.into() })?
        })
    }

    fn forward<'a>(
        &'a self,
        host: &'a str,
        req: &'a PeerRequest,
        mut client: &'a mut dyn Duplex,
    ) -> BoxFuture<'a, Result<(), PeerError>> {
        Box::pin(async move {
            let mut s = self.send(host, req).await?;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut s).await;
            Ok(())
        })
    }
}
