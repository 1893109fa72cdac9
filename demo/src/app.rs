//! The `local` and `run` commands.
//!
//! `run` goes through the [`Flock`] trait so that tests can stand in for the
//! SnowFlock agent; [`Agent`] is the real API. A clone sends its result to
//! the parent over the protocol of [`crate::report`].

use crate::cli::{DataArgs, RunArgs};
use crate::data::{generate_db, generate_query, Protein};
use crate::net::{parent_addr, AddrError};
use crate::report::ReportError;
use crate::search::{merge_top, search, share_cells, Hit};
use serde::{Deserialize, Serialize};
use snowflock::client;
use snowflock_proto::error::chain;
use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

pub use crate::flock::{Agent, Flock, FlockError};
pub use crate::log::Log;
pub use crate::report::{collect, send_report, WorkerReport};

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
        result: Result<(), RunError>,
    },
}

/// Why `run` failed, in the parent or in a clone.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("sf_request_ticket")]
    RequestTicket(#[source] FlockError),
    #[error("Ticket {0} grants no clones")]
    NoClones(String),
    #[error("sf_clone")]
    Clone(#[source] FlockError),
    #[error("Cannot listen on port {port}")]
    Listen {
        port: u16,
        #[source]
        err: std::io::Error,
    },
    #[error("sf_join")]
    Join(#[source] FlockError),
    /// Some clones never reported; the ticket's children were killed.
    #[error(
        "Clone(s) {} did not report within {timeout} s; {}",
        ids(missing),
        kill_outcome(kill)
    )]
    Missing {
        missing: Vec<u32>,
        timeout: u64,
        /// `sf_kill`'s answer, one `ID STATE` per child.
        kill: Result<Vec<String>, FlockError>,
    },
    /// The parent failed and killed its clones, so they do not wait for
    /// it. (The note follows the failure, so it is not a `#[source]`.)
    #[error("{} (killed the clones)", chain(&**.0))]
    KilledClones(Box<RunError>),
    #[error("{} (killing the clones failed: {})", chain(&**.failed), chain(.kill))]
    KillFailed {
        failed: Box<RunError>,
        kill: FlockError,
    },
    #[error("id")]
    Id(#[source] FlockError),
    #[error("This clone has no IP address after {0} s")]
    NoAddress(u64),
    #[error(transparent)]
    ParentAddr(#[from] AddrError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("sf_exit")]
    Exit(#[source] FlockError),
}

fn ids(missing: &[u32]) -> String {
    let ids: Vec<String> = missing.iter().map(u32::to_string).collect();
    ids.join(", ")
}

fn kill_outcome(kill: &Result<Vec<String>, FlockError>) -> String {
    match kill {
        Ok(children) => format!("killed the ticket's children: {}", children.join(", ")),
        Err(e) => format!("killing the ticket's children failed too: {}", chain(e)),
    }
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
        .map_err(RunError::RequestTicket)?;
    let m = ticket.granted;
    log.line(format_args!(
        "ticket {}: {m} of {} clones granted",
        ticket.id, args.clones
    ));
    if m == 0 {
        return Err(RunError::NoClones(ticket.id));
    }
    let clone_id = api.clone(&ticket.id).map_err(RunError::Clone)?;
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
            missing @ RunError::Missing { .. } => missing,
            // Do not leave clones waiting for a parent that gave up.
            failed => match api.kill(&ticket.id) {
                Ok(_) => RunError::KilledClones(Box::new(failed)),
                Err(kill) => RunError::KillFailed {
                    failed: Box::new(failed),
                    kill,
                },
            },
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
    let listener =
        TcpListener::bind(SocketAddrV4::new([0, 0, 0, 0].into(), args.port)).map_err(|err| {
            RunError::Listen {
                port: args.port,
                err,
            }
        })?;
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
    let children = api.join(ticket).map_err(RunError::Join)?;
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

fn clone_side(
    api: &dyn Flock,
    args: &RunArgs,
    data: &Dataset,
    clone_id: u32,
    total: usize,
    log: &Log,
) -> Result<(), RunError> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    // The agent applies the clone's address as part of becoming a clone;
    // wait for it if it is not known yet.
    let ip = loop {
        let ident = api.id().map_err(RunError::Id)?;
        if let Some(ip) = ident.ip {
            break ip;
        }
        if Instant::now() >= deadline {
            return Err(RunError::NoAddress(args.timeout));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let parent = SocketAddr::from((parent_addr(&ip)?, args.port));
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
                    eprintln!("sf-swdemo: error: clone {clone_id}: {}", chain(&e));
                    1
                }
            };
            log.as_who(format!("clone {clone_id}"))
                .line(format_args!("sf_exit({code})"));
            match api.exit(code) {
                Ok(()) => code,
                Err(e) => {
                    let e = RunError::Exit(e);
                    eprintln!("sf-swdemo: error: clone {clone_id}: {}", chain(&e));
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("sf-swdemo: error: {}", chain(&e));
            1
        }
    }
}

/// `sf-swdemo share`: the top hits of one share, `{"hits":[...]}`.
pub fn share_main(a: &crate::cli::ShareArgs) -> i32 {
    let total = a.of as usize;
    if a.index >= total {
        eprintln!(
            "sf-swdemo: error: share {} of {total} does not exist",
            a.index
        );
        return 2;
    }
    let log = Log::new();
    let data = Dataset::generate(&a.data);
    let w = work(&data, (a.index, total), a.data.top);
    log.line(format_args!(
        "share {} of {total}: {} cells in {} ms",
        a.index, w.cells, w.ms
    ));
    let out = LocalOutput { hits: w.hits };
    println!("{}", serde_json::to_string(&out).expect("hits serialise"));
    0
}

/// `sf-swdemo merge`: `{"hits":[...]}` lines in, their top `top` out.
pub fn merge_main(input: impl std::io::BufRead, top: usize) -> i32 {
    let mut all = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                eprintln!("sf-swdemo: error: reading input: {e}");
                return 1;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<LocalOutput>(&line) {
            Ok(o) => all.extend(o.hits),
            Err(e) => {
                eprintln!(
                    "sf-swdemo: error: line {} is not a share's hits: {e}",
                    i + 1
                );
                return 1;
            }
        }
    }
    let out = LocalOutput {
        hits: merge_top(all, top),
    };
    println!("{}", serde_json::to_string(&out).expect("hits serialise"));
    0
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
    use snowflock::client::{ChildState, ChildStatus, Identity, Ticket};
    use std::sync::Mutex;

    /// Stands in for the agent of one VM.
    struct Fake {
        clone_id: u32,
        granted: u32,
        ip: Option<String>,
        children: Vec<ChildStatus>,
        /// `sf_kill` fails with this protocol error.
        kill_fails: Option<&'static str>,
        calls: Mutex<Vec<String>>,
    }

    impl Fake {
        fn new(clone_id: u32, granted: u32) -> Self {
            let children = (1..=granted)
                .map(|k| ChildStatus {
                    clone_id: k,
                    vm: format!("vm-c{k}"),
                    ip: None,
                    state: ChildState::Exited { code: 0 },
                })
                .collect();
            Fake {
                clone_id,
                granted,
                ip: Some(format!("127.0.0.{}/8", clone_id + 1)),
                children,
                kill_fails: None,
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
        fn request_ticket(&self, n: u32) -> Result<Ticket, FlockError> {
            self.record(format!("request_ticket {n}"));
            Ok(Ticket {
                id: "t-ab".into(),
                granted: self.granted,
            })
        }
        fn clone(&self, ticket: &str) -> Result<u32, FlockError> {
            self.record(format!("clone {ticket}"));
            Ok(self.clone_id)
        }
        fn exit(&self, status: i32) -> Result<(), FlockError> {
            self.record(format!("exit {status}"));
            Ok(())
        }
        fn join(&self, ticket: &str) -> Result<Vec<ChildStatus>, FlockError> {
            self.record(format!("join {ticket}"));
            Ok(self.children.clone())
        }
        fn kill(&self, ticket: &str) -> Result<Vec<ChildStatus>, FlockError> {
            self.record(format!("kill {ticket}"));
            if let Some(m) = self.kill_fails {
                return Err(client::SfError::Protocol(m.into()).into());
            }
            Ok(self
                .children
                .iter()
                .map(|c| ChildStatus {
                    state: ChildState::Killed,
                    ..c.clone()
                })
                .collect())
        }
        fn id(&self) -> Result<Identity, FlockError> {
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
        match &e {
            RunError::Missing {
                missing,
                timeout: 1,
                kill: Ok(kill),
            } => {
                assert_eq!(missing, &[2]);
                assert_eq!(kill, &["1 killed", "2 killed"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(chain(&e), "Clone(s) 2 did not report within 1 s; killed the ticket's children: 1 killed, 2 killed");
        assert_eq!(
            parent.calls(),
            vec!["request_ticket 2", "clone t-ab", "kill t-ab"]
        );
    }

    #[test]
    fn a_failed_parent_kills_its_clones() {
        // Something else holds the port.
        let busy = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let a = args(2, port, 1);
        let parent = Fake::new(0, 2);
        let e = run(&parent, &a, &Log::new()).unwrap_err();
        let text = chain(&e);
        assert!(
            text.starts_with(&format!("Cannot listen on port {port}: ")),
            "{text}"
        );
        assert!(text.ends_with(" (killed the clones)"), "{text}");
        assert_eq!(
            parent.calls(),
            vec!["request_ticket 2", "clone t-ab", "kill t-ab"]
        );
        let mut parent = Fake::new(0, 2);
        parent.kill_fails = Some("gone");
        let e = run(&parent, &a, &Log::new()).unwrap_err();
        let text = chain(&e);
        assert!(text.starts_with("Cannot listen on port"), "{text}");
        assert!(
            text.ends_with(
                " (killing the clones failed: Protocol error talking to the snowflock agent: gone)"
            ),
            "{text}"
        );
    }

    #[test]
    fn missing_clone_with_a_failed_kill() {
        let e = RunError::Missing {
            missing: vec![1, 3],
            timeout: 5,
            kill: Err(client::SfError::Protocol("gone".into()).into()),
        };
        assert_eq!(
            chain(&e),
            "Clone(s) 1, 3 did not report within 5 s; killing the ticket's children failed too: Protocol error talking to the snowflock agent: gone"
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
        let e = chain(&result.unwrap_err());
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
            chain(&result.unwrap_err()),
            "This clone has no IP address after 1 s"
        );
    }

    #[test]
    fn local_output_format() {
        let out = LocalOutput {
            hits: vec![Hit {
                id: 4,
                name: "SFP00004".into(),
                score: 77,
            }],
        };
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"hits":[{"id":4,"name":"SFP00004","score":77}]}"#
        );
    }

    #[test]
    fn shares_merged_agree_with_local() {
        let a = args(5, 0, 30);
        let expected = local(&a.data, &Log::new()).hits;
        let data = Dataset::generate(&a.data);
        let lines: String = (0..3)
            .map(|i| {
                let w = work(&data, (i, 3), a.data.top);
                serde_json::to_string(&LocalOutput { hits: w.hits }).unwrap() + "\n"
            })
            .collect();
        assert_eq!(merge_main(lines.as_bytes(), a.data.top), 0);
        let merged = merge_top(
            lines
                .lines()
                .flat_map(|l| serde_json::from_str::<LocalOutput>(l).unwrap().hits),
            a.data.top,
        );
        assert_eq!(merged, expected);
        assert_eq!(merge_main("not json\n".as_bytes(), 3), 1);
    }
}
