//! `sf-memtest`: hold a patterned buffer across a clone; see `snowflock::memtest`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "sf-memtest",
    version,
    about = "Hold a patterned buffer across a VM clone"
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
    /// Send one command (`verify`, `fill N`, `seed`) and print the answer.
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
