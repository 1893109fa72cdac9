//! A cluster channel in memory: each peer is a handler the test installs
//! (often another daemon's peer front end), or down.

use super::{Duplex, PeerChannel, PeerError};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use snowflock_proto::admin::AdminResponse;
use snowflock_proto::peer::PeerRequest;
use std::sync::Arc;
use std::time::Duration;

pub type Handler = Arc<dyn Fn(PeerRequest) -> BoxFuture<'static, AdminResponse> + Send + Sync>;

#[derive(Default)]
pub struct FakePeers {
    /// (host, handler or `None` when the host is down), in order.
    pub hosts: Mutex<Vec<(String, Option<Handler>)>>,
    /// Every request sent, with its host.
    pub sent: Mutex<Vec<(String, PeerRequest)>>,
}

impl FakePeers {
    pub fn set(&self, host: &str, h: Option<Handler>) {
        let mut hosts = self.hosts.lock();
        match hosts.iter_mut().find(|(n, _)| n == host) {
            Some(e) => e.1 = h,
            None => hosts.push((host.to_string(), h)),
        }
    }

    fn handler(&self, host: &str) -> Result<Option<Handler>, PeerError> {
        self.hosts
            .lock()
            .iter()
            .find(|(n, _)| n == host)
            .map(|(_, h)| h.clone())
            .ok_or_else(|| PeerError::UnknownHost(host.to_string()))
    }
}

impl PeerChannel for FakePeers {
    fn peers(&self) -> Vec<String> {
        self.hosts.lock().iter().map(|(n, _)| n.clone()).collect()
    }

    fn call<'a>(
        &'a self,
        host: &'a str,
        req: &'a PeerRequest,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<AdminResponse, PeerError>> {
        Box::pin(async move {
            self.sent.lock().push((host.to_string(), req.clone()));
            match self.handler(host)? {
                Some(h) => Ok(h(req.clone()).await),
                None => Err(PeerError::Timeout { host: host.into() }),
            }
        })
    }

    fn forward<'a>(
        &'a self,
        host: &'a str,
        req: &'a PeerRequest,
        mut client: &'a mut dyn Duplex,
    ) -> BoxFuture<'a, Result<(), PeerError>> {
        Box::pin(async move {
            let resp = self.call(host, req, Duration::from_secs(5)).await?;
            snowflock_proto::frame::tokio_io::write_frame(&mut client, &resp)
                .await
                .map_err(PeerError::protocol(host))
        })
    }
}
