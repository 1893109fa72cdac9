//! Origin side: freezing a paused VM's RAM file into a memory *generation*.
//!
//! A generation is an immutable copy of the RAM file, made hole-aware so
//! that pages the guest never touched (or returned through free page
//! reporting) are neither copied nor later fetched. The result,
//! [`Frozen`], carries the generation's hole map, which travels with the
//! clone descriptor to other hosts. Clones on the same host map the
//! generation privately (`MAP_PRIVATE`, QEMU `share=off`); other hosts get
//! its pages from the [page server](crate::server).
//!
//! * `extents.rs`: where a file holds data (`SEEK_DATA`/`SEEK_HOLE`);
//! * `precopy.rs`: the two-phase copy ([`Precopy`], [`freeze_generation`]);
//! * `written.rs`: which pages a VMM wrote through a private mapping of a
//!   generation ([`written_pages`], from `/proc/PID/pagemap`), and moving
//!   pages between such a mapping and a file;
//! * `layer.rs`: a generation that is its base file plus a layer of the
//!   pages that differ ([`Layer`], [`frozen_layered`]).
//!
//! May import: `sys` and the crate root (`PAGE_SIZE`). Nothing
//! here knows about the network, the page server or memtap.

mod extents;
mod layer;
mod precopy;
mod written;

pub use extents::data_extents;
pub use layer::{frozen_layered, load_map, save_map, Layer, TOP, TOP_MAP};
pub use precopy::{freeze_generation, frozen_in_place, Precopy};
pub use written::{
    copy_written, discarded_pages, punch_pages, write_into_process, written_pages, WrittenError,
};

use bitvec::prelude::*;
use std::io;

/// Errors of freezing a generation.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The source RAM file could not be opened or inspected.
    #[error("Cannot read guest RAM file {path}")]
    Source {
        path: String,
        #[source]
        err: io::Error,
    },
    /// The generation file could not be created or written.
    #[error("Cannot write memory generation {path}")]
    Dest {
        path: String,
        #[source]
        err: io::Error,
    },
    /// The RAM file size is not a multiple of the page size.
    #[error("Guest RAM file size {0} is not a multiple of 4 KiB")]
    Size(u64),
}

/// Result of freezing a generation.
#[derive(Debug, Clone)]
pub struct Frozen {
    /// Guest RAM size in bytes.
    pub size: u64,
    /// Bytes of the generation that hold data (not holes).
    pub copied: u64,
    /// Bytes copied while the VM was paused (changed since the precopy).
    pub fixed: u64,
    /// One bit per page, set where the page is a hole (reads as zeros).
    pub holes: BitVec<u64, Lsb0>,
}

impl Frozen {
    /// Number of hole pages.
    pub fn hole_pages(&self) -> u64 {
        self.holes.count_ones() as u64
    }
}
