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
    Ticket {
        n: u32,
        /// The clones' hosts fetch the whole memory (and disk) of the clone
        /// point in the background, so the clones stop depending on this
        /// host once it is there [default: the host's setting].
        #[arg(long, conflicts_with = "no_independent")]
        independent: bool,
        /// The clones' hosts fetch only what the clones read, whatever the
        /// host's default.
        #[arg(long)]
        no_independent: bool,
    },
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
        Cmd::Ticket {
            n,
            independent,
            no_independent,
        } => {
            let opts = client::TicketOptions {
                independent: independent_flag(independent, no_independent),
            };
            let t = client::request_ticket_with(n, opts)?;
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

/// `--independent` / `--no-independent` / neither (the host's default).
fn independent_flag(yes: bool, no: bool) -> Option<bool> {
    match (yes, no) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(args: &[&str]) -> Result<Option<bool>, clap::Error> {
        let a = Args::try_parse_from([&["sf", "ticket"], args].concat())?;
        match a.cmd {
            Cmd::Ticket {
                independent,
                no_independent,
                ..
            } => Ok(independent_flag(independent, no_independent)),
            _ => panic!("not a ticket command"),
        }
    }

    #[test]
    fn the_independence_flags() {
        assert_eq!(ticket(&["3"]).unwrap(), None);
        assert_eq!(ticket(&["--independent", "3"]).unwrap(), Some(true));
        assert_eq!(ticket(&["3", "--no-independent"]).unwrap(), Some(false));
        assert!(ticket(&["--independent", "--no-independent", "3"]).is_err());
    }
}
