//! `sf-exec HOST [--] COMMAND...`: runs COMMAND in the sibling VM whose
//! flock address is HOST, through the agents, and behaves like
//! `ssh HOST COMMAND` does for the MPI launchers that call it:
//!
//! * the words of COMMAND are joined with spaces and run by `/bin/sh -c`
//!   on HOST, as the caller's user, in the caller's working directory (or
//!   the user's home when it does not exist there);
//! * stdin, stdout and stderr are forwarded; `-n` reads stdin from
//!   `/dev/null`, as ssh's `-n`;
//! * SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to
//!   `sf-exec` are delivered to the command's process group on HOST;
//! * the exit status is the command's (128 + N for a signal), or 255 when
//!   `sf-exec` itself failed: HOST is not a sibling, cannot be reached, or
//!   stopped answering (its VM was killed or lost), with one line on
//!   stderr saying which.
//!
//! ssh options the launchers may add (`-x`, `-T`, `-q`, `-n`, `-o OPT`,
//! `-p PORT`, `-l USER` for the caller's own user) are accepted; nothing
//! else. See [`snowflock_proto::sibling`] for the protocol.

use crate::client;
use snowflock_proto::api::ApiRequest;
use snowflock_proto::frame::{self, FrameError};
use snowflock_proto::sibling::{join_command, FromRunner, ToRunner, EXIT_FAILURE, PEER_TIMEOUT};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

/// The command line, parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    pub host: String,
    pub command: Vec<String>,
    /// `-n`: no stdin.
    pub null_stdin: bool,
}

const USAGE: &str = "usage: sf-exec [-n] HOST [--] COMMAND...";

/// Parses `sf-exec`'s arguments (without the program name).
pub fn parse(args: &[String]) -> Result<Invocation, String> {
    let mut null_stdin = false;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "-n" => null_stdin = true,
            "-x" | "-T" | "-q" | "-a" | "-4" => {}
            "-o" | "-p" => i += 1,
            "-l" => {
                i += 1;
                let me = nix::unistd::User::from_uid(nix::unistd::getuid())
                    .ok()
                    .flatten()
                    .map(|u| u.name);
                if args.get(i).map(String::as_str) != me.as_deref() {
                    return Err("-l: commands run as the calling user only".into());
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            "--" => {
                i += 1;
                break;
            }
            _ if a.starts_with('-') => return Err(format!("unknown option {a}\n{USAGE}")),
            _ => break,
        }
        i += 1;
    }
    let host = args.get(i).ok_or(USAGE)?.clone();
    let mut rest = &args[i + 1..];
    if rest.first().map(String::as_str) == Some("--") {
        rest = &rest[1..];
    }
    if rest.is_empty() {
        return Err(format!(
            "no command: sf-exec runs commands, not interactive sessions\n{USAGE}"
        ));
    }
    Ok(Invocation {
        host,
        command: rest.to_vec(),
        null_stdin,
    })
}

/// Signals forwarded to the remote command.
const FORWARDED: [nix::sys::signal::Signal; 6] = {
    use nix::sys::signal::Signal::*;
    [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2]
};

/// Entry point of the `sf-exec` binary.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let inv = match parse(&args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("sf-exec: {e}");
            return ExitCode::from(EXIT_FAILURE as u8);
        }
    };
    let code = match run(&inv) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sf-exec: {}: {e}", inv.host);
            EXIT_FAILURE
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// Runs the invocation; returns the exit status to exit with.
pub fn run(inv: &Invocation) -> Result<i32, String> {
    // Blocked before any thread starts, so only the forwarding thread
    // takes them.
    let mut set = nix::sys::signal::SigSet::empty();
    FORWARDED.iter().for_each(|s| set.add(*s));
    let _ = set.thread_block();

    let path = client::socket_path();
    let mut s = UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the snowflock agent at {}: {e}",
            path.display()
        )
    })?;
    let cwd = std::env::current_dir()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/".into());
    frame::write_frame(
        &mut s,
        &ApiRequest::SiblingExec {
            host: inv.host.clone(),
            command: join_command(&inv.command),
            cwd,
        },
    )
    .map_err(|e| format!("cannot talk to the agent: {e}"))?;
    let _ = s.set_read_timeout(Some(PEER_TIMEOUT));
    let writer = Arc::new(Mutex::new(
        s.try_clone().map_err(|e| format!("socket: {e}"))?,
    ));
    let mut started = false;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    loop {
        let msg = match frame::read_frame::<_, FromRunner>(&mut s) {
            Ok(m) => m,
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no word from it for {} s: its VM was stopped or lost",
                    PEER_TIMEOUT.as_secs()
                ))
            }
            Err(FrameError::Closed) if started => {
                return Err("the connection closed before the command ended".into())
            }
            Err(FrameError::Closed) => return Err("the agent closed the connection".into()),
            Err(e) => return Err(snowflock_proto::error::chain(&e).trim_end().to_string()),
        };
        match msg {
            FromRunner::Started { .. } if !started => {
                started = true;
                forward_signals(set, writer.clone());
                if inv.null_stdin {
                    send(&writer, &ToRunner::StdinEof);
                } else {
                    forward_stdin(writer.clone());
                }
            }
            FromRunner::Started { .. } | FromRunner::Ping => {}
            FromRunner::Stdout { data } => {
                let _ = out.write_all(&data).and_then(|_| out.flush());
            }
            FromRunner::Stderr { data } => {
                let _ = err.write_all(&data).and_then(|_| err.flush());
            }
            FromRunner::Exit { code } => return Ok(code),
            FromRunner::Refused { message } => return Err(message),
        }
    }
}

fn send(w: &Mutex<UnixStream>, msg: &ToRunner) -> bool {
    let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
    frame::write_frame(&mut *s, msg).is_ok()
}

fn forward_stdin(w: Arc<Mutex<UnixStream>>) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; snowflock_proto::channel::MAX_CHUNK];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if !send(
                            &w,
                            &ToRunner::Stdin {
                                data: buf[..n].to_vec(),
                            },
                        ) {
                            return;
                        }
                    }
                }
            }
            send(&w, &ToRunner::StdinEof);
        });
}

fn forward_signals(set: nix::sys::signal::SigSet, w: Arc<Mutex<UnixStream>>) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                if !send(&w, &ToRunner::Signal { signo: sig as i32 }) {
                    return;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<Invocation, String> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_like_an_rsh() {
        let i = p(&["10.250.3.2", "--", "hostname", "-f"]).unwrap();
        assert_eq!(i.host, "10.250.3.2");
        assert_eq!(i.command, ["hostname", "-f"]);
        assert!(!i.null_stdin);
        let i = p(&[
            "-x",
            "-n",
            "-o",
            "BatchMode=yes",
            "10.250.3.2",
            "orted",
            "-mca",
            "x",
        ])
        .unwrap();
        assert_eq!(i.command, ["orted", "-mca", "x"]);
        assert!(i.null_stdin);
        let i = p(&[
            "--",
            "10.250.3.2",
            "\"/usr/bin/hydra_pmi_proxy\"",
            "--control-port",
            "a:1",
        ])
        .unwrap();
        assert_eq!(i.host, "10.250.3.2");
        assert_eq!(i.command[0], "\"/usr/bin/hydra_pmi_proxy\"");
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        assert!(p(&[]).unwrap_err().contains("usage"));
        assert!(p(&["10.250.3.2"]).unwrap_err().contains("no command"));
        assert!(p(&["10.250.3.2", "--"]).unwrap_err().contains("no command"));
        assert!(p(&["-L", "1:2", "h", "x"])
            .unwrap_err()
            .contains("unknown option -L"));
        assert!(p(&["-l", "someone-else-xyz", "h", "x"])
            .unwrap_err()
            .contains("calling user"));
    }
}
