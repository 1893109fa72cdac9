//! `sf-swdemo`: a small bioinformatics job that parallelises itself by
//! cloning its VM with SnowFlock.
//!
//! The job searches a synthetic protein database for the sequences most
//! similar to a query, scoring every database sequence with Smith-Waterman
//! local alignment (BLOSUM62, affine gaps). Everything is deterministic in a
//! seed, so a run on the host (`sf-swdemo local`) gives the expected answer
//! of a run inside a VM (`sf-swdemo run --clones C`).
//!
//! * [`sw`]: the Smith-Waterman scorer (Gotoh, O(query length) memory).
//! * [`data`]: deterministic database and query generation.
//! * [`search`]: scoring a share of the database and merging top hits.
//! * [`net`]: where a clone finds its parent on the flock network.
//! * [`flock`]: the SnowFlock calls the demo makes ([`flock::Flock`]).
//! * [`report`]: how a clone's result reaches the parent.
//! * [`log`]: progress lines on stderr.
//! * [`app`]: the `local` and `run` commands, over the [`flock::Flock`] API.
//! * [`cli`]: the command line.

pub mod app;
pub mod cli;
pub mod data;
pub mod flock;
pub mod log;
pub mod net;
pub mod report;
pub mod search;
pub mod sw;

pub use data::{generate_db, generate_query, Protein};
pub use search::{merge_top, search, Hit};
pub use sw::sw_score;
