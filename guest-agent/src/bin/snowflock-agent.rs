//! `snowflock-agent`: started (and respawned) by the guest's init.

fn main() -> std::process::ExitCode {
    snowflock::agent::main()
}
