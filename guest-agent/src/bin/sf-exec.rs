//! `sf-exec HOST [--] COMMAND...`: run COMMAND in a sibling VM of this
//! flock, like `ssh HOST COMMAND` (see `snowflock::sibling_exec`).

fn main() -> std::process::ExitCode {
    snowflock::sibling_exec::main()
}
