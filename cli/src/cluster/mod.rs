//! `snowflock cluster up|down|status`: a local test cluster on this machine.
//!
//! N "physical hosts" `h0`..`h{N-1}`, each a network namespace `NAME-hI`
//! with its own `snowflockd`, joined by a bridge `fab` in the fabric
//! namespace `NAME-fab`. Every host gets one veth (`hI` on the bridge,
//! `fab0` with `10.249.0.(I+1)/24` in the host). Nothing in the root
//! namespace gets an address or a route into them.
//!
//! Files: `/run/snowflock/NAME/` holds `cluster.json`, the cluster `key` and
//! per host `hI/host.toml`, `hI/snowflockd.sock`, `hI/snowflockd.log`;
//! state directories are `/dev/shm/snowflock-NAME/hI`. `host.toml` is the
//! daemon's own configuration format (see docs/deploy.md): a local cluster
//! is N real host configurations, only the network is simulated.
//!
//! One job per file: `layout` (names, paths, `cluster.json`), `host_config`
//! (`host.toml`), `key` (the cluster key), `fabric` (namespaces, bridge,
//! veths), `daemon` (one `snowflockd` per host), `slurm` (the cluster's
//! own Slurm, with `--slurm`), and `up`, `down` and `status` (the three
//! commands).

mod daemon;
mod down;
mod fabric;
mod host_config;
mod key;
mod layout;
mod slurm;
mod status;
mod up;

pub use down::down;
// For benches that build a fabric of their own (no daemons): `bench mcdist`.
pub(crate) use down::teardown;
pub(crate) use fabric::{connect_host, create as create_fabric, existing_netns, HOST_LINK};
pub use host_config::{Settings, SlurmSettings};
pub use layout::{first_host_client, host_client, HostInfo, Layout};
pub use slurm::bill as slurm_bill;
pub use status::status;
pub use up::{up, UpOpts};

/// Cluster name when none is given.
pub const DEFAULT_NAME: &str = "sfc";
/// Most hosts of a local cluster.
pub const MAX_HOSTS: u32 = 32;
/// Hosts when `--hosts` is not given.
pub const DEFAULT_HOSTS: u32 = 4;
/// Daemon-to-daemon control channel port.
pub const CONTROL_PORT: u16 = 7170;
/// Memory page server port.
pub const PAGE_PORT: u16 = 7171;
/// MTU of the fabric links: room for VXLAN (50 bytes) around 1500-byte frames.
pub const FABRIC_MTU: u32 = 1600;
