//! How a clone's result reaches the parent (TCP, one connection per clone):
//! the clone sends one JSON line, a [`WorkerReport`], and shuts its sending
//! side; the parent answers `ok` (or `error: ...`) and closes. The clone
//! only calls `sf_exit` after the `ok`, so its result is never lost with
//! its VM.
//!
//! [`collect`] is the parent's end, [`send_report`] the clone's.

use crate::log::Log;
use crate::search::Hit;
use serde::{Deserialize, Serialize};
use snowflock_proto::error::chain;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// One worker's result, sent by a clone to the parent as one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    pub clone_id: u32,
    /// The worker's top hits (at most `--top`).
    pub hits: Vec<Hit>,
    /// Dynamic-programming cells computed.
    pub cells: u64,
    /// Search time.
    pub ms: u64,
}

/// A result that did not get through. The parent sends the first four back
/// to the clone as `error: MESSAGE`, so their text is part of the protocol
/// (lower case, the cause inside the message).
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A socket call failed; worth retrying when sending.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("reading")]
    Read(#[source] std::io::Error),
    #[error("not a result line ({0})")]
    NotAReport(serde_json::Error),
    #[error("clone ID {id} is not one of 1..={m}")]
    BadCloneId { id: u32, m: u32 },
    #[error(transparent)]
    Encode(serde_json::Error),
    /// Worth retrying: the parent may not have been listening yet.
    #[error("The parent closed without an answer")]
    NoAnswer,
    #[error("The parent at {addr} refused the result: {answer}")]
    Refused { addr: SocketAddr, answer: String },
    #[error("Could not deliver the result to {addr} in time ({attempts} attempts)")]
    Undelivered {
        addr: SocketAddr,
        attempts: u32,
        /// Why the last attempt failed.
        #[source]
        last: Box<ReportError>,
    },
}

fn clamp(d: Duration, lo: Duration, hi: Duration) -> Duration {
    d.max(lo).min(hi)
}

/// Accepts results from clones `1..=m` until all are in or `deadline`.
pub fn collect(
    listener: &TcpListener,
    m: u32,
    deadline: Instant,
    log: &Log,
) -> BTreeMap<u32, WorkerReport> {
    let mut got = BTreeMap::new();
    if let Err(e) = listener.set_nonblocking(true) {
        log.line(format_args!("cannot make the listener non-blocking: {e}"));
        return got;
    }
    while (got.len() as u32) < m {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match listener.accept() {
            Ok((s, peer)) => match receive(s, m, deadline) {
                Ok(r) => {
                    let k = r.clone_id;
                    if got.contains_key(&k) {
                        log.line(format_args!(
                            "duplicate result from clone {k} ({peer}) ignored"
                        ));
                    } else {
                        log.line(format_args!(
                            "result from clone {k} ({peer}): {} hits, {} cells in {} ms [{}/{m}]",
                            r.hits.len(),
                            r.cells,
                            r.ms,
                            got.len() + 1
                        ));
                        got.insert(k, r);
                    }
                }
                Err(e) => log.line(format_args!(
                    "bad result connection from {peer}: {}",
                    chain(&e)
                )),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => {
                log.line(format_args!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    got
}

/// Longest result line accepted.
const MAX_LINE: u64 = 4 << 20;

fn receive(s: TcpStream, m: u32, deadline: Instant) -> Result<WorkerReport, ReportError> {
    let wait = clamp(
        deadline.saturating_duration_since(Instant::now()),
        Duration::from_millis(200),
        Duration::from_secs(30),
    );
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(wait))?;
    s.set_write_timeout(Some(wait))?;
    let mut line = String::new();
    BufReader::new((&s).take(MAX_LINE))
        .read_line(&mut line)
        .map_err(ReportError::Read)?;
    let parsed = serde_json::from_str(line.trim())
        .map_err(ReportError::NotAReport)
        .and_then(|r: WorkerReport| {
            if (1..=m).contains(&r.clone_id) {
                Ok(r)
            } else {
                Err(ReportError::BadCloneId { id: r.clone_id, m })
            }
        });
    let answer = match &parsed {
        Ok(_) => "ok\n".to_string(),
        Err(e) => format!("error: {}\n", chain(e)),
    };
    // A lost answer only makes the clone retry; the result is kept.
    let _ = (&s).write_all(answer.as_bytes());
    let _ = s.shutdown(Shutdown::Both);
    parsed
}

/// Sends `report` to the parent at `addr`, retrying every 100 ms until
/// `deadline`. Returns the number of attempts.
pub fn send_report(
    addr: SocketAddr,
    report: &WorkerReport,
    deadline: Instant,
    log: &Log,
) -> Result<u32, ReportError> {
    let mut line = serde_json::to_string(report).map_err(ReportError::Encode)?;
    line.push('\n');
    let mut attempts = 0;
    let mut last_text = String::new();
    loop {
        attempts += 1;
        let last = match try_send(addr, &line, deadline) {
            Ok(()) => return Ok(attempts),
            Err(e @ ReportError::Refused { .. }) => return Err(e),
            Err(e) => e,
        };
        let text = chain(&last);
        if text != last_text {
            log.line(format_args!(
                "attempt {attempts} to reach {addr}: {text}; retrying every 100 ms"
            ));
            last_text = text;
        }
        if Instant::now() + Duration::from_millis(100) > deadline {
            return Err(ReportError::Undelivered {
                addr,
                attempts,
                last: Box::new(last),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One attempt; only [`ReportError::Refused`] is final.
fn try_send(addr: SocketAddr, line: &str, deadline: Instant) -> Result<(), ReportError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let s = TcpStream::connect_timeout(
        &addr,
        clamp(left, Duration::from_millis(50), Duration::from_secs(2)),
    )?;
    let wait = clamp(left, Duration::from_secs(1), Duration::from_secs(30));
    s.set_read_timeout(Some(wait))?;
    s.set_write_timeout(Some(wait))?;
    (&s).write_all(line.as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    (&s).take(4096).read_to_string(&mut answer)?;
    match answer.trim() {
        "ok" => Ok(()),
        "" => Err(ReportError::NoAnswer),
        other => Err(ReportError::Refused {
            addr,
            answer: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_rejects_bad_reports_and_keeps_good_ones() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let log = Log::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = std::thread::scope(|s| {
            let h = s.spawn(|| collect(&l, 2, deadline, &log));
            let send_raw = |line: &str| {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(line.as_bytes()).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                let mut a = String::new();
                c.read_to_string(&mut a).unwrap();
                a
            };
            assert!(send_raw("garbage\n").starts_with("error: not a result line"));
            let r = |k| WorkerReport {
                clone_id: k,
                hits: vec![],
                cells: 1,
                ms: 2,
            };
            let bad = serde_json::to_string(&r(7)).unwrap() + "\n";
            assert_eq!(send_raw(&bad), "error: clone ID 7 is not one of 1..=2\n");
            let e = chain(&send_report(addr, &r(5), deadline, &log).unwrap_err());
            assert!(e.contains("refused the result: error: clone ID 5"), "{e}");
            assert_eq!(send_report(addr, &r(2), deadline, &log).unwrap(), 1);
            assert_eq!(send_report(addr, &r(2), deadline, &log).unwrap(), 1);
            assert_eq!(send_report(addr, &r(1), deadline, &log).unwrap(), 1);
            h.join().unwrap()
        });
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn undelivered_names_the_last_failure() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let r = WorkerReport {
            clone_id: 1,
            hits: vec![],
            cells: 0,
            ms: 0,
        };
        let deadline = Instant::now() + Duration::from_millis(300);
        let e = send_report(addr, &r, deadline, &Log::new()).unwrap_err();
        let text = chain(&e);
        let ReportError::Undelivered { attempts, last, .. } = e else {
            panic!("{text}")
        };
        assert!(
            text.starts_with(&format!(
                "Could not deliver the result to {addr} in time ({attempts} attempts): "
            )),
            "{text}"
        );
        assert!(text.ends_with(&chain(&*last)), "{text}");
    }

    #[test]
    fn report_line_format() {
        let r = WorkerReport {
            clone_id: 2,
            hits: vec![Hit {
                id: 4,
                name: "SFP00004".into(),
                score: 77,
            }],
            cells: 10,
            ms: 3,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"clone_id":2,"hits":[{"id":4,"name":"SFP00004","score":77}],"cells":10,"ms":3}"#
        );
    }
}
