//! The caller's side of `sf-exec`: an API connection that asked for
//! `SiblingExec` becomes a relay to the sibling's runner
//! ([`snowflock_proto::sibling`], [`super::sibling`]).
//!
//! The agent, not `sf-exec`, holds the flock key and vouches for who the
//! caller is: the uid and gid come from the kernel (`SO_PEERCRED`), never
//! from the request. After the handshake and the `Start` frame the agent
//! copies bytes both ways and takes no further part: `sf-exec` and the
//! runner speak frames to each other.

use super::{sibling, Agent};
use nix::sys::socket::{getsockopt, sockopt};
use snowflock_proto::auth::ClusterKey;
use snowflock_proto::frame;
use snowflock_proto::sibling::{check_target, FromRunner, Start};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Time allowed to reach a sibling and finish the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one `SiblingExec` on the API connection `app`; returns when the
/// command is over (or refused).
pub fn run(agent: &Agent, mut app: UnixStream, host: String, command: String, cwd: String) {
    match connect(agent, &app, &host, command, cwd) {
        Ok(remote) => splice(app, remote),
        Err(message) => {
            tracing::info!("sf-exec to {host} refused: {message}");
            let _ = frame::write_frame(&mut app, &FromRunner::Refused { message });
        }
    }
}

fn connect(
    agent: &Agent,
    app: &UnixStream,
    host: &str,
    command: String,
    cwd: String,
) -> Result<TcpStream, String> {
    let cred = getsockopt(app, sockopt::PeerCredentials)
        .map_err(|e| format!("cannot tell who is calling: {}", e.desc()))?;
    let ip = check_target(host, agent.ident().ip_cidr().as_deref()).map_err(|e| e.to_string())?;
    let key: &ClusterKey = agent
        .flock_key
        .as_ref()
        .ok_or("this VM's agent has no flock key (see its log)")?;
    let addr = SocketAddr::from((ip, agent.cfg.sibling_port));
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
        format!(
            "cannot reach {host}: {e} (is it a running VM of this flock, with snowflock-agent {}?)",
            super::AGENT_VERSION
        )
    })?;
    sibling::keepalive(&s);
    let _ = s.set_read_timeout(Some(CONNECT_TIMEOUT));
    let _ = s.set_write_timeout(Some(CONNECT_TIMEOUT));
    snowflock_proto::auth::client_blocking(&mut s, key).map_err(|e| {
        format!(
            "{host} did not accept this VM as a sibling: {}",
            snowflock_proto::error::chain(&e).trim_end()
        )
    })?;
    let start = Start {
        uid: cred.uid(),
        gid: cred.gid(),
        command,
        cwd,
    };
    frame::write_frame(&mut s, &start).map_err(|e| format!("{host}: {e}"))?;
    let _ = s.set_read_timeout(None);
    let _ = s.set_write_timeout(None);
    tracing::info!("sf-exec: uid {} runs a command on {host}", start.uid);
    Ok(s)
}

/// Copies both ways until both directions are closed.
fn splice(app: UnixStream, remote: TcpStream) {
    let _ = app.set_read_timeout(None);
    let _ = app.set_write_timeout(None);
    let (Ok(mut app_r), Ok(mut remote_w)) = (app.try_clone(), remote.try_clone()) else {
        return;
    };
    let up = std::thread::Builder::new()
        .name("relay-up".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            let _ = std::io::copy(&mut app_r, &mut remote_w);
            let _ = remote_w.shutdown(Shutdown::Write);
        });
    let (mut remote_r, mut app_w) = (remote, app);
    let _ = std::io::copy(&mut remote_r, &mut app_w);
    // The runner is done (or gone): end both sides so the other thread
    // ends too.
    let _ = app_w.shutdown(Shutdown::Both);
    let _ = remote_r.shutdown(Shutdown::Both);
    if let Ok(h) = up {
        let _ = h.join();
    }
}
