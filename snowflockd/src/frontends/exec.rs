//! `vm exec` sessions: the client's frames are stdin, the daemon's are
//! output, until the command exits or either side goes. Serves both a local
//! CLI and a session forwarded by another host.

use super::reply::{daemon_err, err};
use crate::lifecycle::daemon::wait_until;
use crate::lifecycle::Daemon;
use crate::state::vm::{ExecEvent, EXEC_QUEUE};
use snowflock_proto::admin::{AdminErrorCode as C, AdminResponse, ExecInput};
use snowflock_proto::channel::{HostMsg, MAX_CHUNK};
use snowflock_proto::frame::tokio_io::{read_frame, write_frame};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Streams one `vm exec`: client frames are stdin, daemon frames output.
pub async fn exec<S>(d: Arc<Daemon>, s: S, name: String, argv: Vec<String>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(s);
    let vm = match d.vm(&name) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = write_frame(&mut wr, &daemon_err(e)).await;
            return;
        }
    };
    if argv.is_empty() {
        let _ = write_frame(&mut wr, &err(C::BadRequest, "No command given")).await;
        return;
    }
    if let Err(e) = d.wait_agent(&vm, Duration::from_secs(10)).await {
        let _ = write_frame(&mut wr, &daemon_err(e)).await;
        return;
    }
    let exec_id = d.with(|r| r.exec_id());
    let (tx, mut rx) = tokio::sync::mpsc::channel(EXEC_QUEUE);
    vm.execs.lock().insert(exec_id, tx);
    vm.send(HostMsg::ExecStart {
        exec: exec_id,
        argv,
        env: vec![],
    });
    // Stdin frames are read by their own task: read_frame is not cancel-safe.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<ExecInput>>(4);
    let reader = tokio::spawn(async move {
        loop {
            match read_frame::<_, ExecInput>(&mut rd).await {
                Ok(i) => {
                    if in_tx.send(Some(i)).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = in_tx.send(None).await;
                    return;
                }
            }
        }
    });
    let mut stdin_open = true;
    let mut ended = vm.life.subscribe();
    loop {
        tokio::select! {
            _ = wait_until(&mut ended, |l| l.is_ended()) => {
                // The monitor may have drained the sessions before ours was
                // registered: answer here rather than wait forever.
                let _ = write_frame(&mut wr, &err(C::Failed, format!("VM {} ended", vm.name()))).await;
                break;
            }
            ev = rx.recv() => {
                let (resp, done) = match ev {
                    Some(ExecEvent::Output(stream, data)) => (AdminResponse::ExecOutput { stream, data }, false),
                    Some(ExecEvent::Exit(code)) => (AdminResponse::ExecExit { code }, true),
                    Some(ExecEvent::Error(m)) => (err(C::Failed, m), true),
                    None => (err(C::Failed, "The command's output outran this client; the command was killed"), true),
                };
                if write_frame(&mut wr, &resp).await.is_err() {
                    vm.send(HostMsg::ExecKill { exec: exec_id });
                    break;
                }
                if done { break; }
            }
            // Polled after stdin's EOF too, to notice the client leaving.
            i = in_rx.recv() => match i {
                Some(Some(_)) if !stdin_open => {}
                Some(Some(input)) => {
                    let eof = input.eof;
                    for (n, chunk) in input.data.chunks(MAX_CHUNK).enumerate() {
                        let last = (n + 1) * MAX_CHUNK >= input.data.len();
                        vm.send(HostMsg::ExecStdin { exec: exec_id, data: chunk.to_vec(), eof: eof && last });
                    }
                    if input.data.is_empty() {
                        vm.send(HostMsg::ExecStdin { exec: exec_id, data: vec![], eof });
                    }
                    if eof { stdin_open = false; }
                }
                _ => {
                    // Client went away: end the process.
                    vm.send(HostMsg::ExecKill { exec: exec_id });
                    break;
                }
            },
        }
    }
    vm.execs.lock().remove(&exec_id);
    reader.abort();
}
