//! The `local` and `run` commands.
//!
//! `run` goes through the [`Flock`] trait so that tests can stand in for the
//! SnowFlock agent; [`Agent`] is the real API ([`snowflock::client`]).
//!
//! Result protocol (TCP, one connection per clone): the clone sends one JSON
//! line, a [`WorkerReport`], and shuts its sending side; the parent answers
//! `ok` (or `error: ...`) and closes. The clone only calls `sf_exit` after
//! the `ok`, so its result is never lost with its VM.

use crate::cli::{DataArgs, RunArgs};
use crate::data::{generate_db, generate_query, Protein};
use crate::net::parent_addr;
use crate::search::{merge_top, search, share_cells, Hit};
use serde::{Deserialize, Serialize};
use snowflock::client::{self, ChildStatus, Identity, Ticket};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The SnowFlock calls the demo makes. Errors are messages.
pub trait Flock {
    fn request_ticket(&self, n: u32) -> Result<Ticket, String>;
    fn clone(&self, ticket: &str) -> Result<u32, String>;
    /// Ends this clone. The real call never returns on success.
    fn exit(&self, status: i32) -> Result<(), String>;
    fn join(&self, ticket: &str) -> Result<Vec<ChildStatus>, String>;
    fn kill(&self, ticket: &str) -> Result<Vec<ChildStatus>, String>;
    fn id(&self) -> Result<Identity, String>;
}

/// The real API, through the agent socket.
pub struct Agent;

fn msg(e: client::SfError) -> String {
    snowflock_proto::error::chain(&e)
}

impl Flock for Agent {
    fn request_ticket(&self, n: u32) -> Result<Ticket, String> {
        client::request_ticket(n).map_err(msg)
    }
    fn clone(&self, ticket: &str) -> Result<u32, String> {
        client::clone(ticket).map_err(msg)
    }
    fn exit(&self, status: i32) -> Result<(), String> {
        match client::exit(status) {
            Ok(never) => match never {},
            Err(e) => Err(msg(e)),
        }
    }
    fn join(&self, ticket: &str) -> Result<Vec<ChildStatus>, String> {
        client::join(ticket).map_err(msg)
    }
    fn kill(&self, ticket: &str) -> Result<Vec<ChildStatus>, String> {
        client::kill(ticket).map_err(msg)
    }
    fn id(&self) -> Result<Identity, String> {
        client::id().map_err(msg)
    }
}

/// Progress lines on stderr: `[   1234 ms] WHO: MESSAGE`, the time counted
/// from the start of the program (clones inherit the start).
#[derive(Debug, Clone)]
pub struct Log {
    t0: Instant,
    who: String,
}

impl Log {
    pub fn new() -> Self {
        Log {
            t0: Instant::now(),
            who: "sf-swdemo".into(),
        }
    }

    /// The same clock under another name.
    pub fn as_who(&self, who: impl Into<String>) -> Self {
        Log {
            t0: self.t0,
            who: who.into(),
        }
    }

    pub fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    pub fn line(&self, m: impl std::fmt::Display) {
        eprintln!("[{:>7} ms] {}: {m}", self.ms(), self.who);
    }
}

impl Default for Log {
    fn default() -> Self {
        Self::new()
    }
}

/// The query and database of a [`DataArgs`].
#[derive(Debug, Clone)]
pub struct Dataset {
    pub query: Vec<u8>,
    pub db: Vec<Protein>,
}

impl Dataset {
    pub fn generate(d: &DataArgs) -> Self {
        let query = generate_query(d.seed, d.qlen);
        let db = generate_db(d.seed, d.count, d.len.min, d.len.max, &query);
        Dataset { query, db }
    }

    pub fn residues(&self) -> u64 {
        self.db.iter().map(|p| p.seq.len() as u64).sum()
    }
}

/// Output of `local`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalOutput {
    pub hits: Vec<Hit>,
}

/// `sf-swdemo local`: the top hits of the whole database, in this process.
pub fn local(d: &DataArgs, log: &Log) -> LocalOutput {
    let data = Dataset::generate(d);
    log.line(format_args!(
        "generated {} sequences ({} residues), query of {}",
        data.db.len(),
        data.residues(),
        data.query.len()
    ));
    let w = work(&data, (0, 1), d.top);
    log.line(format_args!("searched {} cells in {} ms", w.cells, w.ms));
    LocalOutput { hits: w.hits }
}

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

/// A worker in the final output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSummary {
    pub clone_id: u32,
    pub ms: u64,
    pub cells: u64,
    /// Number of hits it reported.
    pub hits: usize,
}

/// Output of `run` in the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Clones granted (workers = clones + 1).
    pub clones: u32,
    pub hits: Vec<Hit>,
    /// The parent (clone 0) and every clone, by clone ID.
    pub workers: Vec<WorkerSummary>,
    /// `sf_join`'s answer, one `ID STATE [CODE|REASON]` per child.
    pub join: Vec<String>,
}

struct Work {
    hits: Vec<Hit>,
    cells: u64,
    ms: u64,
}

fn work(data: &Dataset, share: (usize, usize), top: usize) -> Work {
    let t = Instant::now();
    let hits = merge_top(search(&data.db, &data.query, share), top);
    Work {
        hits,
        cells: share_cells(&data.db, data.query.len(), share),
        ms: t.elapsed().as_millis() as u64,
    }
}

/// How `run` ended in this VM.
#[derive(Debug)]
pub enum Finished {
    /// The parent, with the merged answer.
    Parent(Summary),
    /// A clone, before its `sf_exit`: whether its result was delivered.
    Clone {
        clone_id: u32,
        result: Result<(), String>,
    },
}

/// Why `run` failed in the parent.
#[derive(Debug, PartialEq, Eq)]
pub enum RunError {
    /// A SnowFlock call or the network failed.
    Failed(String),
    /// Some clones never reported; the ticket's children were killed.
    Missing {
        missing: Vec<u32>,
        timeout: u64,
        kill: Result<Vec<String>, String>,
    },
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Failed(m) => f.write_str(m),
            RunError::Missing {
                missing,
                timeout,
                kill,
            } => {
                let ids: Vec<String> = missing.iter().map(u32::to_string).collect();
                write!(
                    f,
                    "Clone(s) {} did not report within {timeout} s; ",
                    ids.join(", ")
                )?;
                match kill {
                    Ok(children) => {
                        write!(f, "killed the ticket's children: {}", children.join(", "))
                    }
                    Err(e) => write!(f, "killing the ticket's children failed too: {e}"),
                }
            }
        }
    }
}

fn clamp(d: Duration, lo: Duration, hi: Duration) -> Duration {
    d.max(lo).min(hi)
}

/// `sf-swdemo run`: generate the data, clone, search a share; the parent
/// collects and merges, a clone sends its result. A clone returns before
/// calling `sf_exit` (see [`run_main`]).
pub fn run(api: &dyn Flock, args: &RunArgs, log: &Log) -> Result<Finished, RunError> {
    let d = &args.data;
    let data = Dataset::generate(d);
    log.line(format_args!(
        "generated {} sequences ({} residues, {} cells against a query of {}) in memory",
        data.db.len(),
        data.residues(),
        data.residues() * data.query.len() as u64,
        data.query.len()
    ));
    let ticket = api
        .request_ticket(args.clones)
        .map_err(|e| RunError::Failed(format!("sf_request_ticket: {e}")))?;
    let m = ticket.granted;
    log.line(format_args!(
        "ticket {}: {m} of {} clones granted",
        ticket.id, args.clones
    ));
    if m == 0 {
        return Err(RunError::Failed(format!(
            "Ticket {} grants no clones",
            ticket.id
        )));
    }
    let clone_id = api
        .clone(&ticket.id)
        .map_err(|e| RunError::Failed(format!("sf_clone: {e}")))?;
    let total = m as usize + 1;
    if clone_id > 0 {
        let log = log.as_who(format!("clone {clone_id}"));
        log.line(format_args!("sf_clone returned {clone_id}"));
        let result = clone_side(api, args, &data, clone_id, total, &log);
        return Ok(Finished::Clone { clone_id, result });
    }
    let log = log.as_who("parent");
    log.line(format_args!(
        "sf_clone returned 0: {m} clones, {total} workers"
    ));
    parent_side(api, args, &data, &ticket.id, m, &log)
        .map(Finished::Parent)
        .map_err(|e| match e {
            RunError::Failed(f) => {
                // Do not leave clones waiting for a parent that gave up.
                match api.kill(&ticket.id) {
                    Ok(_) => RunError::Failed(format!("{f} (killed the clones)")),
                    Err(k) => RunError::Failed(format!("{f} (killing the clones failed: {k})")),
                }
            }
            missing => missing,
        })
}

fn parent_side(
    api: &dyn Flock,
    args: &RunArgs,
    data: &Dataset,
    ticket: &str,
    m: u32,
    log: &Log,
) -> Result<Summary, RunError> {
    let listener = TcpListener::bind(SocketAddrV4::new([0, 0, 0, 0].into(), args.port))
        .map_err(|e| RunError::Failed(format!("Cannot listen on port {}: {e}", args.port)))?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    log.line(format_args!(
        "listening on 0.0.0.0:{} for {m} results (timeout {} s)",
        args.port, args.timeout
    ));
    let (own, reports) = std::thread::scope(|s| {
        let collector = s.spawn(|| collect(&listener, m, deadline, log));
        let own = work(data, (0, m as usize + 1), args.data.top);
        log.line(format_args!(
            "own share searched: {} cells in {} ms",
            own.cells, own.ms
        ));
        (own, collector.join().expect("collector thread panicked"))
    });
    let missing: Vec<u32> = (1..=m).filter(|k| !reports.contains_key(k)).collect();
    if !missing.is_empty() {
        log.line(format_args!(
            "missing results from clone(s) {missing:?}; killing the ticket's children"
        ));
        let kill = api
            .kill(ticket)
            .map(|c| c.iter().map(client::format_child).collect());
        return Err(RunError::Missing {
            missing,
            timeout: args.timeout,
            kill,
        });
    }
    log.line(format_args!("all {m} results in; joining"));
    let children = api
        .join(ticket)
        .map_err(|e| RunError::Failed(format!("sf_join: {e}")))?;
    let join: Vec<String> = children.iter().map(client::format_child).collect();
    log.line(format_args!("joined: {}", join.join(", ")));
    let mut workers = vec![WorkerSummary {
        clone_id: 0,
        ms: own.ms,
        cells: own.cells,
        hits: own.hits.len(),
    }];
    workers.extend(reports.values().map(|r| WorkerSummary {
        clone_id: r.clone_id,
        ms: r.ms,
        cells: r.cells,
        hits: r.hits.len(),
    }));
    let hits = merge_top(
        own.hits
            .into_iter()
            .chain(reports.into_values().flat_map(|r| r.hits)),
        args.data.top,
    );
    Ok(Summary {
        clones: m,
        hits,
        workers,
        join,
    })
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
                Err(e) => log.line(format_args!("bad result connection from {peer}: {e}")),
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

fn receive(s: TcpStream, m: u32, deadline: Instant) -> Result<WorkerReport, String> {
    let wait = clamp(
        deadline.saturating_duration_since(Instant::now()),
        Duration::from_millis(200),
        Duration::from_secs(30),
    );
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new((&s).take(MAX_LINE))
        .read_line(&mut line)
        .map_err(|e| format!("reading: {e}"))?;
    let parsed: Result<WorkerReport, String> = serde_json::from_str(line.trim())
        .map_err(|e| format!("not a result line ({e})"))
        .and_then(|r: WorkerReport| {
            if (1..=m).contains(&r.clone_id) {
                Ok(r)
            } else {
                Err(format!("clone ID {} is not one of 1..={m}", r.clone_id))
            }
        });
    let answer = match &parsed {
        Ok(_) => "ok\n".to_string(),
        Err(e) => format!("error: {e}\n"),
    };
    // A lost answer only makes the clone retry; the result is kept.
    let _ = (&s).write_all(answer.as_bytes());
    let _ = s.shutdown(Shutdown::Both);
    parsed
}

fn clone_side(
    api: &dyn Flock,
    args: &RunArgs,
    data: &Dataset,
    clone_id: u32,
    total: usize,
    log: &Log,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    // The agent applies the clone's address as part of becoming a clone;
    // wait for it if it is not known yet.
    let ip = loop {
        let ident = api.id().map_err(|e| format!("id: {e}"))?;
        if let Some(ip) = ident.ip {
            break ip;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "This clone has no IP address after {} s",
                args.timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let parent = SocketAddr::from((parent_addr(&ip).map_err(|e| e.to_string())?, args.port));
    log.line(format_args!(
        "my address {ip}, parent at {parent}; searching share {clone_id}/{total}"
    ));
    let w = work(data, (clone_id as usize, total), args.data.top);
    log.line(format_args!(
        "share searched: {} cells in {} ms",
        w.cells, w.ms
    ));
    let report = WorkerReport {
        clone_id,
        hits: w.hits,
        cells: w.cells,
        ms: w.ms,
    };
    let tries = send_report(parent, &report, deadline, log)?;
    log.line(format_args!(
        "result delivered to {parent} (attempt {tries})"
    ));
    Ok(())
}

enum SendError {
    /// Worth retrying (parent not listening yet, connection broke).
    Transient(String),
    /// The parent refused the result.
    Refused(String),
}

/// Sends `report` to the parent at `addr`, retrying every 100 ms until
/// `deadline`. Returns the number of attempts.
pub fn send_report(
    addr: SocketAddr,
    report: &WorkerReport,
    deadline: Instant,
    log: &Log,
) -> Result<u32, String> {
    let mut line = serde_json::to_string(report).map_err(|e| e.to_string())?;
    line.push('\n');
    let mut attempt = 0;
    let mut last = String::new();
    loop {
        attempt += 1;
        match try_send(addr, &line, deadline) {
            Ok(()) => return Ok(attempt),
            Err(SendError::Refused(e)) => {
                return Err(format!("The parent at {addr} refused the result: {e}"))
            }
            Err(SendError::Transient(e)) => {
                if e != last {
                    log.line(format_args!(
                        "attempt {attempt} to reach {addr}: {e}; retrying every 100 ms"
                    ));
                    last = e;
                }
            }
        }
        if Instant::now() + Duration::from_millis(100) > deadline {
            return Err(format!(
                "Could not deliver the result to {addr} in time ({attempt} attempts): {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn try_send(addr: SocketAddr, line: &str, deadline: Instant) -> Result<(), SendError> {
    let t = |e: std::io::Error| SendError::Transient(e.to_string());
    let left = deadline.saturating_duration_since(Instant::now());
    let s = TcpStream::connect_timeout(
        &addr,
        clamp(left, Duration::from_millis(50), Duration::from_secs(2)),
    )
    .map_err(t)?;
    let wait = clamp(left, Duration::from_secs(1), Duration::from_secs(30));
    s.set_read_timeout(Some(wait)).map_err(t)?;
    s.set_write_timeout(Some(wait)).map_err(t)?;
    (&s).write_all(line.as_bytes()).map_err(t)?;
    s.shutdown(Shutdown::Write).map_err(t)?;
    let mut answer = String::new();
    (&s).take(4096).read_to_string(&mut answer).map_err(t)?;
    match answer.trim() {
        "ok" => Ok(()),
        "" => Err(SendError::Transient(
            "The parent closed without an answer".into(),
        )),
        other => Err(SendError::Refused(other.to_string())),
    }
}

/// `sf-swdemo run` with its output: the summary JSON on stdout in the
/// parent, errors as `sf-swdemo: error: ...` on stderr; a clone ends with
/// `sf_exit(0)` (or 1 on failure). Returns the exit status, when the
/// process is still there to have one.
pub fn run_main(api: &dyn Flock, args: &RunArgs) -> i32 {
    let log = Log::new();
    match run(api, args, &log) {
        Ok(Finished::Parent(summary)) => {
            log.as_who("parent")
                .line(format_args!("done: top {} hits merged", summary.hits.len()));
            println!(
                "{}",
                serde_json::to_string(&summary).expect("summary serialises")
            );
            0
        }
        Ok(Finished::Clone { clone_id, result }) => {
            let code = match result {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("sf-swdemo: error: clone {clone_id}: {e}");
                    1
                }
            };
            log.as_who(format!("clone {clone_id}"))
                .line(format_args!("sf_exit({code})"));
            match api.exit(code) {
                Ok(()) => code,
                Err(e) => {
                    eprintln!("sf-swdemo: error: clone {clone_id}: sf_exit: {e}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("sf-swdemo: error: {e}");
            1
        }
    }
}

/// `sf-swdemo local` with its output: `{"hits":[...]}` on stdout.
pub fn local_main(d: &DataArgs) -> i32 {
    let log = Log::new();
    let out = local(d, &log);
    println!("{}", serde_json::to_string(&out).expect("hits serialise"));
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::LenRange;
    use snowflock::client::ChildState;
    use std::sync::Mutex;

    /// Stands in for the agent of one VM.
    struct Fake {
        clone_id: u32,
        granted: u32,
        ip: Option<String>,
        children: Vec<ChildStatus>,
        calls: Mutex<Vec<String>>,
    }

    impl Fake {
        fn new(clone_id: u32, granted: u32) -> Self {
            let children = (1..=granted)
                .map(|k| ChildStatus {
                    clone_id: k,
                    vm: format!("vm-c{k}"),
                    state: ChildState::Exited { code: 0 },
                })
                .collect();
            Fake {
                clone_id,
                granted,
                ip: Some(format!("127.0.0.{}/8", clone_id + 1)),
                children,
                calls: Mutex::new(Vec::new()),
            }
        }
        fn record(&self, c: String) {
            self.calls.lock().unwrap().push(c);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Flock for Fake {
        fn request_ticket(&self, n: u32) -> Result<Ticket, String> {
            self.record(format!("request_ticket {n}"));
            Ok(Ticket {
                id: "t-ab".into(),
                granted: self.granted,
            })
        }
        fn clone(&self, ticket: &str) -> Result<u32, String> {
            self.record(format!("clone {ticket}"));
            Ok(self.clone_id)
        }
        fn exit(&self, status: i32) -> Result<(), String> {
            self.record(format!("exit {status}"));
            Ok(())
        }
        fn join(&self, ticket: &str) -> Result<Vec<ChildStatus>, String> {
            self.record(format!("join {ticket}"));
            Ok(self.children.clone())
        }
        fn kill(&self, ticket: &str) -> Result<Vec<ChildStatus>, String> {
            self.record(format!("kill {ticket}"));
            Ok(self
                .children
                .iter()
                .map(|c| ChildStatus {
                    state: ChildState::Killed,
                    ..c.clone()
                })
                .collect())
        }
        fn id(&self) -> Result<Identity, String> {
            self.record("id".into());
            Ok(Identity {
                vm: "vm".into(),
                clone_id: self.clone_id,
                ticket: Some("t-ab".into()),
                ip: self.ip.clone(),
            })
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn args(clones: u32, port: u16, timeout: u64) -> RunArgs {
        RunArgs {
            clones,
            data: DataArgs {
                seed: 3,
                count: 120,
                len: LenRange { min: 40, max: 90 },
                qlen: 50,
                top: 6,
            },
            port,
            timeout,
        }
    }

    #[test]
    fn parent_and_clones_agree_with_local() {
        let a = args(5, free_port(), 30);
        let log = Log::new();
        let expected = local(&a.data, &log).hits;
        let parent = Fake::new(0, 3);
        let clones: Vec<Fake> = (1..=3).map(|k| Fake::new(k, 3)).collect();
        let out = std::thread::scope(|s| {
            let p = s.spawn(|| run(&parent, &a, &log));
            // Clones start before the parent listens: they must retry.
            for c in &clones {
                s.spawn(|| match run(c, &a, &log).unwrap() {
                    Finished::Clone { clone_id, result } => {
                        assert_eq!(clone_id, c.clone_id);
                        result.unwrap();
                    }
                    Finished::Parent(_) => panic!("a clone finished as the parent"),
                });
            }
            p.join().unwrap()
        });
        let Finished::Parent(sum) = out.unwrap() else {
            panic!("parent finished as a clone")
        };
        assert_eq!(sum.clones, 3);
        assert_eq!(sum.hits, expected);
        assert_eq!(
            sum.workers.iter().map(|w| w.clone_id).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        let data = Dataset::generate(&a.data);
        assert_eq!(
            sum.workers.iter().map(|w| w.cells).sum::<u64>(),
            data.residues() * data.query.len() as u64
        );
        assert!(sum.workers.iter().all(|w| w.hits == 6));
        assert_eq!(sum.join, vec!["1 exited 0", "2 exited 0", "3 exited 0"]);
        assert_eq!(
            parent.calls(),
            vec!["request_ticket 5", "clone t-ab", "join t-ab"]
        );
        for c in &clones {
            assert_eq!(c.calls(), vec!["request_ticket 5", "clone t-ab", "id"]);
        }
        // The output format.
        let v: serde_json::Value = serde_json::to_value(&sum).unwrap();
        assert_eq!(v["clones"], 3);
        assert_eq!(v["workers"][1]["clone_id"], 1);
        assert!(v["workers"][1]["ms"].is_u64() && v["workers"][1]["cells"].is_u64());
        assert_eq!(
            v["hits"][0].as_object().unwrap().keys().collect::<Vec<_>>(),
            vec!["id", "name", "score"]
        );
    }

    #[test]
    fn missing_clone_is_killed_and_reported() {
        let a = args(2, free_port(), 1);
        let log = Log::new();
        let parent = Fake::new(0, 2);
        let one = Fake::new(1, 2);
        let out = std::thread::scope(|s| {
            let p = s.spawn(|| run(&parent, &a, &log));
            s.spawn(|| run(&one, &a, &log).unwrap());
            p.join().unwrap()
        });
        let e = out.unwrap_err();
        assert_eq!(
            e,
            RunError::Missing {
                missing: vec![2],
                timeout: 1,
                kill: Ok(vec!["1 killed".into(), "2 killed".into()])
            }
        );
        assert_eq!(e.to_string(), "Clone(s) 2 did not report within 1 s; killed the ticket's children: 1 killed, 2 killed");
        assert_eq!(
            parent.calls(),
            vec!["request_ticket 2", "clone t-ab", "kill t-ab"]
        );
    }

    #[test]
    fn clone_gives_up_without_a_parent() {
        let a = args(1, free_port(), 1);
        let log = Log::new();
        let c = Fake::new(1, 1);
        let t = Instant::now();
        let Finished::Clone { result, .. } = run(&c, &a, &log).unwrap() else {
            panic!()
        };
        let e = result.unwrap_err();
        assert!(
            e.starts_with("Could not deliver the result to 127.0.0.1:"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        // run_main ends the clone with sf_exit(1).
        let c = Fake::new(1, 1);
        assert_eq!(run_main(&c, &a), 1);
        assert_eq!(c.calls().last().unwrap(), "exit 1");
    }

    #[test]
    fn clone_without_an_address_fails() {
        let a = args(1, free_port(), 1);
        let mut c = Fake::new(1, 1);
        c.ip = None;
        let Finished::Clone { result, .. } = run(&c, &a, &Log::new()).unwrap() else {
            panic!()
        };
        assert_eq!(
            result.unwrap_err(),
            "This clone has no IP address after 1 s"
        );
    }

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
            let e = send_report(addr, &r(5), deadline, &log).unwrap_err();
            assert!(e.contains("refused the result: error: clone ID 5"), "{e}");
            assert_eq!(send_report(addr, &r(2), deadline, &log), Ok(1));
            assert_eq!(send_report(addr, &r(2), deadline, &log), Ok(1));
            assert_eq!(send_report(addr, &r(1), deadline, &log), Ok(1));
            h.join().unwrap()
        });
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
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
        let out = LocalOutput {
            hits: r.hits.clone(),
        };
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"hits":[{"id":4,"name":"SFP00004","score":77}]}"#
        );
    }
}
