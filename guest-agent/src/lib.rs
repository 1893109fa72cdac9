//! The guest side of snowflock.
//!
//! * [`client`]: the SnowFlock API for Rust programs (`sf_request_ticket`,
//!   `sf_clone`, `sf_exit`, `sf_join`, `sf_kill`, plus `id`). It talks to the
//!   agent's Unix socket with the framing of [`snowflock_proto::frame`].
//! * [`capi`]: the same API as a C ABI (`libsnowflock.so`, header
//!   `include/snowflock.h`).
//! * [`agent`]: `snowflock-agent`, started at boot. It serves the API socket,
//!   forwards calls to the host daemon over the virtio-serial channel
//!   ([`snowflock_proto::channel`]), applies a clone's identity and runs
//!   `snowflock vm exec` commands.
//! * [`sibling_exec`]: `sf-exec HOST COMMAND`, the rsh that MPI launchers
//!   use to start their daemons in sibling VMs.
//! * [`mpirun`]: `sfmpirun -np N PROGRAM`, an MPI job on clones made for
//!   it, started by the stock MPICH or Open MPI launcher over `sf-exec`.
//! * [`memtest`]: `sf-memtest`, a helper that holds a patterned buffer across
//!   a clone so tests can check that process memory survived.
//!
//! The binaries (`snowflock-agent`, `sf`, `sf-memtest`) are thin wrappers.

pub mod agent;
pub mod capi;
pub mod client;
pub mod memtest;
pub mod mpirun;
pub mod sibling_exec;
