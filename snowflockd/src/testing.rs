//! Test harness: a whole daemon on fakes (no QEMU, no host networking, no
//! other hosts), with a real state directory, real agent sockets and the
//! real guest channel, so the daemon's logic runs in milliseconds.

use crate::cluster::fake::{FakePeers, Handler};
use crate::host::config::Config;
use crate::host::fake_vmm::{FakeProc, FakeVmm};
use crate::host::net::fake::FakeNet;
use crate::lifecycle::daemon::{Daemon, Parts};
use crate::ops::vm_start::{vm_start, StartRequest};
use crate::state::vm::Vm;
use snowflock_proto::admin::{Accel, AdminResponse};
use snowflock_proto::api::{ApiRequest, ApiResponse};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct Harness {
    pub d: Arc<Daemon>,
    pub vmm: Arc<FakeVmm>,
    pub net: Arc<FakeNet>,
    pub peers: Arc<FakePeers>,
    pub image: PathBuf,
    _dir: tempfile::TempDir,
}

/// A directory `Image::open` accepts.
fn fake_image(dir: &std::path::Path) -> PathBuf {
    let img = dir.join("image");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::write(img.join("vmlinux"), b"\x7fELF fake kernel").unwrap();
    std::fs::write(img.join("initramfs.cpio"), b"fake").unwrap();
    let manifest = snowflock_image::Manifest::new(
        snowflock_image::ImageKind::Initramfs,
        "fake".into(),
        "console=ttyS0",
    );
    std::fs::write(
        img.join("image.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    img
}

impl Harness {
    /// A stand-alone host `h0`: at most 8 VMs, a quota of 4 clones per VM.
    pub fn new() -> Harness {
        Harness::build(|_| {}, false)
    }

    /// Host `h0` of a cluster whose other hosts are [`FakePeers`] entries,
    /// with a real page server on loopback.
    pub fn cluster() -> Harness {
        Harness::build(|_| {}, true)
    }

    pub fn build(tune: impl FnOnce(&mut Config), cluster: bool) -> Harness {
        Harness::build_with(tune, cluster, None)
    }

    /// Like [`Harness::build`], with `alloc` granting tickets instead of
    /// the static allocator.
    pub fn build_with(
        tune: impl FnOnce(&mut Config),
        cluster: bool,
        alloc: Option<Arc<dyn crate::alloc::Allocator>>,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            host: "h0".into(),
            socket: dir.path().join("admin.sock"),
            state_dir: dir.path().join("state"),
            net_prefix: "t".into(),
            max_vms: 8,
            quota_per_ticket: 4,
            boot_timeout_s: 10,
            clone_timeout_s: 10,
            ..Config::default()
        };
        tune(&mut cfg);
        let vmm = Arc::new(FakeVmm::default());
        let net = Arc::new(FakeNet::default());
        let peers = Arc::new(FakePeers::default());
        let mut parts = Parts {
            vmm: vmm.clone(),
            net: net.clone(),
            peers: peers.clone(),
            alloc: alloc
                .unwrap_or_else(|| Arc::new(crate::alloc::fixed::FixedSlots::new(peers.clone()))),
            guest_link: crate::frontends::guest::link,
            key: None,
            memtap: None,
            pages: None,
        };
        if cluster {
            let key = Arc::new(snowflock_proto::auth::ClusterKey::generate());
            parts.pages = Some(
                dom0_memtap::server::PageServer::start("127.0.0.1:0".parse().unwrap(), key.clone())
                    .unwrap(),
            );
            parts.key = Some(key);
        }
        let image = fake_image(dir.path());
        Harness {
            d: Daemon::new(cfg, parts),
            vmm,
            net,
            peers,
            image,
            _dir: dir,
        }
    }

    /// Boots an original VM through `vm start`.
    pub async fn start(&self, name: &str) -> (Arc<Vm>, Arc<FakeProc>) {
        let req = StartRequest {
            name: name.into(),
            image: self.image.display().to_string(),
            mem_mib: 64,
            vcpus: 1,
            accel: Accel::Tcg,
            disk: None,
            kernel: None,
            initrd: None,
        };
        let vm = vm_start(&self.d, req).await.expect("vm start");
        let p = self.vmm.proc(name).expect("its process");
        (vm, p)
    }

    /// The running process of VM `name`.
    pub fn proc(&self, name: &str) -> Arc<FakeProc> {
        self.vmm
            .proc(name)
            .unwrap_or_else(|| panic!("no process for {name}"))
    }

    /// A peer host answering with `f`.
    pub fn peer(
        &self,
        host: &str,
        f: impl Fn(snowflock_proto::peer::PeerRequest) -> AdminResponse + Send + Sync + 'static,
    ) {
        let f = Arc::new(f);
        let h: Handler = Arc::new(move |req| {
            let f = f.clone();
            Box::pin(async move { f(req) })
        });
        self.peers.set(host, Some(h));
    }

    /// Waits (bounded) until `f` holds.
    pub async fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    /// Asks for a ticket of `n` and clones with it; returns the ticket.
    pub async fn ticket_and_clone(&self, parent: &FakeProc, n: u32) -> String {
        self.ticket_and_clone_with(parent, n, None).await
    }

    /// [`ticket_and_clone`](Self::ticket_and_clone) with the ticket's
    /// independence flag.
    pub async fn ticket_and_clone_with(
        &self,
        parent: &FakeProc,
        n: u32,
        independent: Option<bool>,
    ) -> String {
        let ticket = match parent
            .call(1, ApiRequest::RequestTicket { n, independent })
            .await
        {
            ApiResponse::Ticket { ticket, .. } => ticket,
            other => panic!("{other:?}"),
        };
        match parent
            .call(
                2,
                ApiRequest::Clone {
                    ticket: ticket.clone(),
                },
            )
            .await
        {
            ApiResponse::Cloned { clone_id: 0, .. } => ticket,
            other => panic!("{other:?}"),
        }
    }
}
