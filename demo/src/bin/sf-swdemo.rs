//! `sf-swdemo`: see the `snowflock_demo` library.

use clap::Parser;
use snowflock_demo::app;
use snowflock_demo::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    std::process::exit(match &cli.command {
        Command::Local(d) => app::local_main(d),
        Command::Run(r) => app::run_main(&app::Agent, r),
        Command::Share(a) => app::share_main(a),
        Command::Merge { top } => app::merge_main(std::io::stdin().lock(), *top),
    })
}
