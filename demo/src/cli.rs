//! The `sf-swdemo` command line.

use clap::{Args, Parser, Subcommand};
use std::str::FromStr;

#[derive(Debug, Parser)]
#[command(
    name = "sf-swdemo",
    version,
    about = "Smith-Waterman protein search that parallelises itself by cloning its VM with SnowFlock",
    long_about = "Smith-Waterman protein search that parallelises itself by cloning its VM with SnowFlock.\n\n\
                  `local` computes the answer in one process; `run` (inside a SnowFlock VM) clones the VM \
                  and splits the database between the parent and its clones. Both print the top hits as \
                  JSON on stdout; progress goes to stderr."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Search the whole database in this process and print {"hits":[...]}.
    Local(DataArgs),
    /// Clone this VM and search in parallel (inside a SnowFlock VM).
    Run(RunArgs),
    /// Search share INDEX of OF shares and print its top hits,
    /// {"hits":[...]}: one rank's work in the MPI version of the demo.
    Share(ShareArgs),
    /// Read {"hits":[...]} lines on stdin and print the top hits of them
    /// all, {"hits":[...]}.
    Merge {
        /// Number of hits to report.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ShareArgs {
    /// This share, 0-based.
    #[arg(long)]
    pub index: usize,
    /// Number of shares (1 or more, above INDEX).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub of: u64,
    #[command(flatten)]
    pub data: DataArgs,
}

/// The data set and how many hits to report. Every worker derives the same
/// data from these.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct DataArgs {
    /// Seed of the database and the query.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of database sequences.
    #[arg(long, default_value_t = 600)]
    pub count: usize,
    /// Database sequence lengths, `MIN-MAX` (or one length).
    #[arg(long, default_value = "150-350", value_name = "MIN-MAX")]
    pub len: LenRange,
    /// Query length.
    #[arg(long, default_value_t = 120)]
    pub qlen: usize,
    /// Number of hits to report.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct RunArgs {
    /// Clones to ask for (the host may grant fewer).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clones: u32,
    #[command(flatten)]
    pub data: DataArgs,
    /// TCP port the parent collects results on (bound after the clone).
    #[arg(long, default_value_t = 7000)]
    pub port: u16,
    /// Seconds to wait for the clones' results (and for a clone to reach
    /// its parent).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

/// An inclusive length range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LenRange {
    pub min: usize,
    pub max: usize,
}

/// A `--len` value that is not a length range.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LenRangeError {
    #[error("Expected MIN-MAX or LEN, got {0:?}")]
    Syntax(String),
    #[error("Lengths must satisfy 1 <= MIN <= MAX, got {0:?}")]
    Order(String),
}

impl FromStr for LenRange {
    type Err = LenRangeError;

    fn from_str(s: &str) -> Result<Self, LenRangeError> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| LenRangeError::Syntax(s.to_string()))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if min == 0 || min > max {
            return Err(LenRangeError::Order(s.to_string()));
        }
        Ok(LenRange { min, max })
    }
}

impl std::fmt::Display for LenRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_defaults_and_options() {
        let c = Cli::try_parse_from(["sf-swdemo", "local"]).unwrap();
        let Command::Local(d) = c.command else {
            panic!()
        };
        assert_eq!(
            d,
            DataArgs {
                seed: 1,
                count: 600,
                len: LenRange { min: 150, max: 350 },
                qlen: 120,
                top: 10
            }
        );
        let c = Cli::try_parse_from([
            "sf-swdemo",
            "run",
            "--clones",
            "4",
            "--seed",
            "9",
            "--len",
            "10-20",
            "--top",
            "3",
            "--port",
            "7100",
            "--timeout",
            "5",
        ])
        .unwrap();
        let Command::Run(r) = c.command else { panic!() };
        assert_eq!((r.clones, r.port, r.timeout), (4, 7100, 5));
        assert_eq!(
            (r.data.seed, r.data.len, r.data.top),
            (9, LenRange { min: 10, max: 20 }, 3)
        );
        assert!(Cli::try_parse_from(["sf-swdemo", "run"]).is_err());
        assert!(Cli::try_parse_from(["sf-swdemo", "run", "--clones", "0"]).is_err());
        assert!(
            Cli::try_parse_from(["sf-swdemo", "run", "--clones", "2", "--timeout", "0"]).is_err()
        );
    }

    #[test]
    fn length_ranges() {
        assert_eq!(
            "150-350".parse::<LenRange>().unwrap(),
            LenRange { min: 150, max: 350 }
        );
        assert_eq!(
            "40".parse::<LenRange>().unwrap(),
            LenRange { min: 40, max: 40 }
        );
        for bad in ["", "0-5", "9-3", "a-b", "5-", "-5", "1-2-3"] {
            assert!(bad.parse::<LenRange>().is_err(), "{bad}");
        }
    }
}
