//! `sf`: the SnowFlock API from the shell. Errors print `sf: error: ...`
//! and exit 1; usage errors exit 2.

use clap::{Parser, Subcommand};
use snowflock::client;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "sf", version, about = "SnowFlock VM fork API")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ask for N clones; prints the ticket (stdout) and `granted M of N` (stderr).
    Ticket { n: u32 },
    /// Clone this VM; prints 0 in the parent and the clone ID in each clone.
    Clone { ticket: String },
    /// End this clone with STATUS (default 0). Does not return.
    Exit {
        #[arg(default_value_t = 0, allow_negative_numbers = true)]
        status: i32,
    },
    /// Wait for every child of TICKET; prints `ID STATE [CODE|REASON]` per child.
    Join { ticket: String },
    /// End every child of TICKET now; prints the children like `join`.
    Kill { ticket: String },
    /// Print `clone_id=K ticket=T vm=NAME ip=IP` (`-` when unset).
    Id,
    /// Print TICKET's state, then its children like `join`, with each
    /// child's flock address; does not wait.
    Status { ticket: String },
}

fn run(cmd: Cmd) -> Result<(), client::SfError> {
    match cmd {
        Cmd::Ticket { n } => {
            let t = client::request_ticket(n)?;
            println!("{}", t.id);
            eprintln!("granted {} of {n}", t.granted);
        }
        Cmd::Clone { ticket } => println!("{}", client::clone(&ticket)?),
        Cmd::Exit { status } => match client::exit(status)? {},
        Cmd::Join { ticket } => client::join(&ticket)?
            .iter()
            .for_each(|c| println!("{}", client::format_child(c))),
        Cmd::Kill { ticket } => client::kill(&ticket)?
            .iter()
            .for_each(|c| println!("{}", client::format_child(c))),
        Cmd::Id => println!("{}", client::format_identity(&client::id()?)),
        Cmd::Status { ticket } => {
            let (state, children) = client::status(&ticket)?;
            println!("{state}");
            for c in &children {
                let ip = c.ip.as_deref().unwrap_or("-");
                println!("{} {ip}", client::format_child(c));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sf: error: {e}");
            ExitCode::FAILURE
        }
    }
}
