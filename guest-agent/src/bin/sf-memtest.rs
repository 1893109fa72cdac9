//! `sf-memtest`: check process memory across a clone (a held pattern, or a
//! self-checking writer); see `snowflock::memtest`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "sf-memtest",
    version,
    about = "Check process memory across a VM clone: hold a pattern, or run a self-checking writer"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Allocate and fill a buffer, then serve commands on a Unix socket.
    Hold {
        #[arg(long)]
        mib: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        sock: PathBuf,
    },
    /// Run a writer that checks each word still holds what it wrote there one
    /// pass earlier, forever; serve `status` on a Unix socket.
    Scribble {
        /// Buffer size in MiB (n = MiB * 131072 words)
        #[arg(long)]
        mib: usize,
        /// Unix socket that answers `status`
        #[arg(long)]
        sock: PathBuf,
    },
    /// Send one command (`verify`, `fill N`, `seed` to `hold`; `status` to
    /// `scribble`) and print the answer. Exits 0 only for a good answer
    /// (`ok ...`, `filled ...`, a seed).
    Ctl {
        #[arg(long)]
        sock: PathBuf,
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let r = match Args::parse().cmd {
        Cmd::Hold { mib, seed, sock } => snowflock::memtest::hold(mib, seed, &sock).map(|()| true),
        Cmd::Scribble { mib, sock } => snowflock::memtest::scribble(mib, &sock).map(|()| true),
        Cmd::Ctl { sock, command } => snowflock::memtest::ctl(&sock, &command.join(" ")).map(|a| {
            println!("{a}");
            snowflock::memtest::answer_ok(&a)
        }),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sf-memtest: error: {e}");
            ExitCode::FAILURE
        }
    }
}
