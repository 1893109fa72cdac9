//! What the Slurm allocator says to Slurm's commands and reads back from
//! them: `salloc`'s arguments and its holder command, the holder's report
//! of the grant, `salloc`'s messages, and `squeue` listings. Pure text, so
//! every case is tested here without Slurm.

use super::AllocError;
use crate::host::config::Slurm;

/// The command `salloc` runs for the allocation's lifetime, on the origin
/// host: it reports the job and its nodes (expanded by Slurm's own
/// `scontrol`), then waits for its standard input to close. The daemon
/// holds that pipe, so the allocation ends when the daemon closes it (the
/// job then completes normally) or when the daemon dies.
pub const HOLDER: &str = "echo \"job $SLURM_JOB_ID\"; \
     scontrol show hostnames \"$SLURM_JOB_NODELIST\" || exit 1; \
     echo end; exec cat >/dev/null";

/// The Slurm job name of a ticket's allocation (what `squeue` shows).
pub fn job_name(ticket: &str) -> String {
    format!("snowflock-{ticket}")
}

/// The job comment that marks an allocation as this host's.
pub fn comment(origin: &str, vm: &str) -> String {
    format!("snowflock origin={origin} vm={vm}")
}

/// `salloc`'s arguments for up to `max_nodes` whole nodes for `ticket`.
pub fn salloc_args(
    cfg: &Slurm,
    origin: &str,
    ticket: &str,
    vm: &str,
    max_nodes: u32,
) -> Vec<String> {
    let mut a = vec![
        format!("--nodes=1-{}", max_nodes.max(1)),
        // A clone host is a whole node: no other job shares its CPUs.
        "--exclusive".to_string(),
        format!("--job-name={}", job_name(ticket)),
        format!("--comment={}", comment(origin, vm)),
        // Not `--quiet`: "Pending job allocation N" tells a queued request
        // (no capacity) from one the controller never took.
        format!("--immediate={}", cfg.wait.as_secs().max(1)),
    ];
    for (flag, v) in [
        ("--partition", &cfg.partition),
        ("--account", &cfg.account),
        ("--qos", &cfg.qos),
        ("--time", &cfg.time_limit),
    ] {
        if let Some(v) = v {
            a.push(format!("{flag}={v}"));
        }
    }
    a.extend(["--".into(), "/bin/sh".into(), "-c".into(), HOLDER.into()]);
    a
}

/// The holder's report: the job ID and its nodes, once `end` was read.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub job: Option<String>,
    pub nodes: Vec<String>,
    pub done: bool,
}

impl Report {
    /// Takes one line of the holder's output.
    pub fn line(&mut self, line: &str) {
        let line = line.trim();
        if self.done || line.is_empty() {
            return;
        }
        if line == "end" {
            self.done = self.job.is_some();
        } else if let Some(j) = line.strip_prefix("job ") {
            if valid_job_id(j) {
                self.job = Some(j.to_string());
            }
        } else if self.job.is_some() && valid_node(line) {
            self.nodes.push(line.to_string());
        }
    }
}

fn valid_job_id(j: &str) -> bool {
    !j.is_empty() && j.len() <= 20 && j.bytes().all(|b| b.is_ascii_digit())
}

fn valid_node(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The job ID in one of `salloc`'s messages ("Pending job allocation 12",
/// "Granted job allocation 12", "job 12 queued and waiting for resources").
pub fn job_in_message(line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    for w in words.windows(2) {
        if (w[0] == "allocation" || w[0] == "job") && valid_job_id(w[1].trim_end_matches(':')) {
            return Some(w[1].trim_end_matches(':').to_string());
        }
    }
    None
}

/// Why `salloc` granted nothing, from what it printed (its `error:` lines
/// first); `waited` is the wait it was given.
pub fn failure(stderr: &[String], waited: u64) -> AllocError {
    let errors: Vec<&str> = stderr
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.contains("error:") || l.contains("Unable"))
        .collect();
    let said = if errors.is_empty() {
        stderr.last().map(|s| s.trim()).unwrap_or("nothing")
    } else {
        errors[errors.len() - 1]
    }
    .trim_start_matches("salloc: ")
    .trim_start_matches("error: ")
    .to_string();
    let all = errors.join(" ").to_lowercase();
    let has = |w: &[&str]| w.iter().any(|x| all.contains(x));
    // The controller took the request and queued it: it was only waiting
    // for nodes when `--immediate` ran out.
    let queued = stderr
        .iter()
        .any(|l| l.contains("queued and waiting") || l.contains("Pending job allocation"));
    if queued {
        AllocError::NoCapacity(format!(
            "Slurm granted no node within {waited} s (every node it may give is busy): {said}"
        ))
    } else if has(&[
        "unable to contact slurm controller",
        "connection refused",
        "socket timed out",
        "zero bytes were transmitted",
        "communication connection failure",
        "munge",
        "authentication",
    ]) {
        AllocError::Unavailable(format!("Slurm's controller cannot be reached: {said}"))
    } else if has(&[
        "immediate execution impossible",
        "resources are busy",
        "nodes are busy",
        "unable to allocate resources: requested nodes",
        "revoked",
        "insufficient resources",
        "no resources available",
    ]) {
        AllocError::NoCapacity(format!("Slurm granted no node within {waited} s: {said}"))
    } else if has(&[
        "invalid",
        "not available",
        "limit",
        "permission",
        "denied",
        "qos",
        "account",
    ]) {
        AllocError::Refused(format!("Slurm refused the allocation: {said}"))
    } else {
        AllocError::Refused(format!("salloc granted nothing: {said}"))
    }
}

/// One of this host's allocations in a `squeue -o '%i|%j|%k'` listing.
#[derive(Debug, PartialEq)]
pub struct Listed {
    pub job: String,
    /// The ticket it was made for (from the job name).
    pub ticket: String,
}

/// This host's allocations (marked with [`comment`] for `origin`) in a
/// `squeue -h -o '%i|%j|%k'` listing; other lines are skipped.
pub fn ours(listing: &str, origin: &str) -> Vec<Listed> {
    let mark = format!("snowflock origin={origin} ");
    listing
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            let (job, name, comment) = (f.next()?, f.next()?, f.next()?);
            let ticket = name.strip_prefix("snowflock-")?;
            (valid_job_id(job) && format!("{comment} ").starts_with(&mark)).then(|| Listed {
                job: job.to_string(),
                ticket: ticket.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> Slurm {
        Slurm {
            partition: Some("vms".into()),
            account: None,
            qos: Some("short".into()),
            time_limit: None,
            wait: Duration::from_secs(7),
            slots_per_node: None,
            slurm_conf: None,
            nodes: Default::default(),
        }
    }

    #[test]
    fn salloc_asks_for_whole_nodes_named_after_the_ticket() {
        let a = salloc_args(&cfg(), "h0", "t-0a1b2c3d", "p", 3);
        for want in [
            "--nodes=1-3",
            "--exclusive",
            "--job-name=snowflock-t-0a1b2c3d",
            "--comment=snowflock origin=h0 vm=p",
            "--immediate=7",
            "--partition=vms",
            "--qos=short",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("--account")));
        let dash = a.iter().position(|x| x == "--").unwrap();
        assert_eq!(&a[dash + 1..], ["/bin/sh", "-c", HOLDER]);
        assert_eq!(salloc_args(&cfg(), "h0", "t", "p", 0)[0], "--nodes=1-1");
    }

    #[test]
    fn the_holders_report_is_read_line_by_line() {
        let mut r = Report::default();
        for l in ["job 42", "h1", "h2", "end", "h9"] {
            r.line(l);
        }
        assert_eq!(
            r,
            Report {
                job: Some("42".into()),
                nodes: vec!["h1".into(), "h2".into()],
                done: true
            }
        );
        // Nodes before the job line, junk and bad IDs are not taken.
        let mut r = Report::default();
        for l in ["h1", "job x1", "job 7", "bad node;rm", "", "n-1.x", "end"] {
            r.line(l);
        }
        assert_eq!(r.job.as_deref(), Some("7"));
        assert_eq!(r.nodes, ["n-1.x"]);
        assert!(r.done);
        // `end` without a job is not a grant.
        let mut r = Report::default();
        r.line("end");
        assert!(!r.done);
    }

    #[test]
    fn job_ids_in_salloc_messages() {
        assert_eq!(
            job_in_message("salloc: Pending job allocation 12").as_deref(),
            Some("12")
        );
        assert_eq!(
            job_in_message("salloc: Granted job allocation 9").as_deref(),
            Some("9")
        );
        assert_eq!(
            job_in_message("salloc: job 31 queued and waiting for resources").as_deref(),
            Some("31")
        );
        assert_eq!(
            job_in_message("salloc: error: Unable to allocate resources"),
            None
        );
    }

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn failures_are_told_apart() {
        let e = failure(
            &lines(&["salloc: error: Unable to allocate resources: Unable to contact slurm controller (connect failure)"]),
            5,
        );
        assert!(matches!(e, AllocError::Unavailable(_)), "{e:?}");
        assert!(e.to_string().contains("connect failure"), "{e}");
        let e = failure(
            &lines(&[
                "salloc: Pending job allocation 5",
                "salloc: job 5 queued and waiting for resources",
                "salloc: error: Unable to allocate resources: Connection timed out",
                "salloc: Job allocation 5 has been revoked.",
            ]),
            5,
        );
        assert!(matches!(e, AllocError::NoCapacity(_)), "{e:?}");
        assert!(e.to_string().contains("within 5 s"), "{e}");
        let e = failure(
            &lines(&["salloc: error: Job submit/allocate failed: Invalid account or account/partition combination specified"]),
            5,
        );
        assert!(matches!(e, AllocError::Refused(_)), "{e:?}");
        let e = failure(&[], 5);
        assert!(e.to_string().contains("nothing"), "{e}");
    }

    proptest::proptest! {
        /// Whatever Slurm's tools print, reading it never panics, and a
        /// node or job taken from it is a plain name or number.
        #[test]
        fn any_output_is_read_safely(lines in proptest::collection::vec(".{0,80}", 0..20)) {
            let mut r = Report::default();
            for l in &lines {
                r.line(l);
                let _ = job_in_message(l);
            }
            for n in &r.nodes {
                proptest::prop_assert!(valid_node(n));
            }
            if let Some(j) = &r.job {
                proptest::prop_assert!(valid_job_id(j));
            }
            let _ = failure(&lines, 3);
            for l in ours(&lines.join("\n"), "h0") {
                proptest::prop_assert!(valid_job_id(&l.job));
            }
        }
    }

    #[test]
    fn only_this_hosts_allocations_are_listed() {
        let listing = "\
12|snowflock-t-aa|snowflock origin=h0 vm=p
13|snowflock-t-bb|snowflock origin=h01 vm=p
14|hog|(null)
15|snowflock-t-cc|snowflock origin=h0 vm=q
x|snowflock-t-dd|snowflock origin=h0 vm=q
16|other|snowflock origin=h0 vm=q
";
        assert_eq!(
            ours(listing, "h0"),
            vec![
                Listed {
                    job: "12".into(),
                    ticket: "t-aa".into()
                },
                Listed {
                    job: "15".into(),
                    ticket: "t-cc".into()
                }
            ]
        );
        assert!(ours("", "h0").is_empty());
    }
}
