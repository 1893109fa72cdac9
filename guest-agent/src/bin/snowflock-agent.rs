//! `snowflock-agent`: started (and respawned) by the guest's init, or by
//! systemd as `snowflock-agent --boot-identity` (`snowflock-agent.service`).

fn main() -> std::process::ExitCode {
    snowflock::agent::main()
}
