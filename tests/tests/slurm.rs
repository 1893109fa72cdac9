//! Slurm as the ticket allocator: a local cluster of three namespace hosts
//! with a real Slurm (munged, MariaDB + slurmdbd, slurmctld on h0, one
//! slurmd per host), real VMs, and Slurm's own tools to check what the
//! daemons did: each ticket is one allocation named after it, on exactly
//! the hosts its clones run on, released whatever ends the ticket.
//!
//! One cluster serves every case, in order, since each needs the same
//! parts and a Slurm start is most of a cluster's start-up.

use serde_json::Value;
use snowflock_tests::*;
use std::process::Command;
use std::time::Duration;

/// Slurm's tools, run on the head node with the cluster's `SLURM_CONF`.
struct Slurm<'a> {
    c: &'a Cluster,
    conf: String,
}

impl Slurm<'_> {
    fn run(&self, argv: &[&str]) -> (bool, String, String) {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.c.netns(0)])
            .args(argv)
            .env("SLURM_CONF", &self.conf)
            .output()
            .expect("run a Slurm tool");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    fn ok(&self, argv: &[&str]) -> String {
        let (ok, out, err) = self.run(argv);
        assert!(ok, "{argv:?} failed: {out}{err}");
        out
    }

    /// The ticket's allocation in `squeue`: (job, state, nodes).
    fn allocation(&self, ticket: &str) -> Option<(String, String, Vec<String>)> {
        let out = self.ok(&["squeue", "-h", "-o", "%i|%j|%T|%N"]);
        let line = out
            .lines()
            .find(|l| l.split('|').nth(1) == Some(&format!("snowflock-{ticket}")))?;
        let f: Vec<&str> = line.split('|').collect();
        let nodes = self.ok(&["scontrol", "show", "hostnames", f[3]]);
        let mut nodes: Vec<String> = nodes.lines().map(str::to_string).collect();
        nodes.sort();
        Some((f[0].to_string(), f[2].to_string(), nodes))
    }

    /// Waits until the ticket's allocation is gone from `squeue`; returns
    /// its state in `sacct`.
    fn released(&self, ticket: &str, job: &str) -> String {
        let gone = wait_until(Duration::from_secs(40), || {
            self.allocation(ticket).is_none().then_some(())
        });
        assert!(
            gone.is_some(),
            "allocation {job} of {ticket} still held: {}",
            self.ok(&["squeue"])
        );
        // slurmdbd records the end a moment after the controller.
        wait_until(Duration::from_secs(20), || {
            let st = self.ok(&["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"]);
            let st = st.trim().to_string();
            (!st.is_empty() && st != "RUNNING").then_some(st)
        })
        .unwrap_or_else(|| panic!("sacct never recorded the end of job {job}"))
    }

    /// Another user's job holding `nodes` nodes (`-w` names them).
    fn hog(&self, name: &str, args: &[&str]) -> String {
        let mut argv = vec!["salloc", "--no-shell", "-J", name];
        argv.extend(args);
        let (ok, out, err) = self.run(&argv);
        assert!(ok, "hog failed: {out}{err}");
        format!("{out}{err}")
            .split_whitespace()
            .last()
            .expect("job id")
            .to_string()
    }
}

/// Hosts of a ticket's clones, sorted.
fn clone_hosts(h: &ClusterHost, ticket: &str) -> Vec<String> {
    let mut v: Vec<String> = clones_of(&h.vms(), ticket)
        .iter()
        .map(|c| c["host"].as_str().unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

/// A ticket for `n` clones, cloned; clones sleep. Returns the ticket.
fn clone_sleepers(h: &ClusterHost, n: u32) -> String {
    h.sh_ok(
        "p",
        &format!("T=$(sf ticket {n}) || exit 1; ID=$(sf clone $T) || exit 2; if [ $ID != 0 ]; then sleep 100000; fi; echo $T"),
    )
    .trim()
    .to_string()
}

#[test]
fn slurm_grants_and_releases_one_allocation_per_ticket() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let c = Cluster::up(
        3,
        &[
            "--slurm",
            "--slots-per-node",
            "1",
            "--slurm-wait-s",
            "4",
            "--ticket-ttl-s",
            "10",
        ],
    );
    let st = c.status();
    let conf = st["slurm_conf"].as_str().expect("slurm_conf").to_string();
    assert!(std::path::Path::new(&conf).exists(), "{conf}");
    let s = Slurm { c: &c, conf };
    let sinfo = s.ok(&["sinfo", "-h", "-N", "-o", "%N %t"]);
    assert_eq!(sinfo.lines().count(), 3, "{sinfo}");
    let h0 = c.host(0);
    h0.start_vm("p", &img, "256M");

    // 1. A ticket is one allocation, on exactly the clones' hosts; the last
    // clone's exit releases it and sacct has it completed; join reports.
    let t = clone_sleepers(h0, 2);
    let (job, state, nodes) = s.allocation(&t).expect("the ticket's allocation");
    assert_eq!(state, "RUNNING");
    assert_eq!(nodes, clone_hosts(h0, &t), "allocation {job}");
    assert_eq!(nodes.len(), 2);
    let ds: Value = serde_json::from_str(&h0.ok(&["daemon", "status", "--json"])).unwrap();
    assert_eq!(ds["allocator"], "slurm");
    assert_eq!(
        ds["allocations"],
        serde_json::json!([{ "ticket": t, "job": job }])
    );
    for k in clones_of(&h0.vms(), &t) {
        h0.sh_ok(
            k["name"].as_str().unwrap(),
            "(sleep 0.2; sf exit 3) >/dev/null 2>&1 &",
        );
    }
    let out = h0.sh_ok("p", &format!("sf join {t}"));
    assert!(
        out.contains("1 exited 3") && out.contains("2 exited 3"),
        "{out}"
    );
    assert_eq!(s.released(&t, &job), "COMPLETED");

    // 2. sf kill releases it.
    let t = clone_sleepers(h0, 2);
    let (job, _, _) = s.allocation(&t).expect("allocation");
    h0.sh_ok("p", &format!("sf kill {t}"));
    assert_eq!(s.released(&t, &job), "COMPLETED");

    // An allocation that ends under a live ticket (an administrator's
    // scancel, a time limit) ends the ticket's clones, reported lost.
    let t = clone_sleepers(h0, 2);
    let (job, _, _) = s.allocation(&t).expect("allocation");
    s.ok(&["scancel", &job]);
    let st = wait_until(Duration::from_secs(30), || {
        let st = h0.sh_ok("p", &format!("sf status {t}"));
        (st.matches(" lost ").count() == 2).then_some(st)
    })
    .unwrap_or_else(|| panic!("clones of {t} not reported lost:\n{}", h0.log_tail()));
    assert!(
        st.contains(&format!("Slurm allocation {job} ended")),
        "{st}"
    );
    let gone = wait_until(Duration::from_secs(30), || {
        clones_of(&h0.vms(), &t).is_empty().then_some(())
    });
    assert!(gone.is_some(), "the clones of {t} must stop");
    h0.sh_ok("p", &format!("sf join {t}"));

    // 3. The parent's end releases it.
    let t = clone_sleepers(h0, 1);
    let (job, _, nodes) = s.allocation(&t).expect("allocation");
    assert_eq!(nodes.len(), 1);
    h0.ok(&["vm", "stop", "p"]);
    assert_eq!(s.released(&t, &job), "COMPLETED");
    h0.start_vm("p", &img, "256M");

    // 4. An unused ticket expires (ticket_ttl_s = 10), and so does its allocation.
    let t = h0.sh_ok("p", "sf ticket 1").trim().to_string();
    let (job, state, _) = s.allocation(&t).expect("allocation of an unused ticket");
    assert_eq!(state, "RUNNING");
    assert_eq!(s.released(&t, &job), "COMPLETED");

    // 5. Another job holds every node: no capacity after wait_s, and the
    // parent is untouched. Then one node is held: fewer clones.
    let hog = s.hog("hog", &["-N", "3"]);
    let (code, _, err) = h0.sh("p", "sf ticket 2");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Slurm granted no node within 4 s"), "{err}");
    assert!(s
        .ok(&["squeue", "-h", "-o", "%j"])
        .lines()
        .all(|j| j == "hog"));
    assert!(h0.sh_ok("p", "sf id").contains("clone_id=0"));
    s.ok(&["scancel", &hog]);
    let hog = s.hog("hog1", &["-N", "1", "-w", "h1"]);
    let (code, out, err) = h0.sh("p", "T=$(sf ticket 3) && sf clone $T >/dev/null && echo $T");
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("granted 2 of 3"), "{err}");
    let t = out.lines().last().unwrap_or_default().trim().to_string();
    let (job, _, nodes) = s.allocation(&t).expect("allocation");
    assert_eq!(nodes, ["h0", "h2"]);
    assert_eq!(clone_hosts(h0, &t), nodes);
    h0.sh_ok("p", &format!("sf kill {t}"));
    s.released(&t, &job);

    // 6. A granted node whose daemon is gone: its clone is lost, the other runs.
    let h2 = c.host(2).daemon_pid().expect("h2's pid");
    signal(h2, libc::SIGKILL);
    let (code, out, err) = h0.sh(
        "p",
        "T=$(sf ticket 2) && ID=$(sf clone $T) && if [ $ID != 0 ]; then sleep 100000; fi; echo $T",
    );
    assert_eq!(code, 0, "{out}{err}");
    let t = out.trim().to_string();
    let (job, _, nodes) = s.allocation(&t).expect("allocation");
    assert_eq!(nodes, ["h0", "h2"]);
    let st = h0.sh_ok("p", &format!("sf status {t}"));
    assert!(st.contains("lost") && st.contains("running"), "{st}");
    h0.sh_ok("p", &format!("sf kill {t}"));
    s.released(&t, &job);
    s.ok(&["scancel", &hog]);

    // 7. The origin's daemon dies holding an allocation, and its salloc with
    // it: the restarted daemon finds the allocation and releases it.
    let t = clone_sleepers(h0, 1);
    let (job, _, _) = s.allocation(&t).expect("allocation");
    let d0 = h0.daemon_pid().expect("h0's pid");
    let salloc: Vec<u32> = children_of(d0)
        .into_iter()
        .filter(|p| comm(*p) == "salloc")
        .collect();
    assert_eq!(salloc.len(), 1, "one salloc holds the ticket");
    signal(salloc[0], libc::SIGKILL);
    signal(d0, libc::SIGKILL);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        s.allocation(&t).is_some(),
        "with salloc killed, the allocation outlives the daemon"
    );
    c.restart_daemon(0);
    assert_eq!(s.released(&t, &job), "CANCELLED by 0");
    h0.start_vm("p", &img, "256M");

    // 8. slurmctld is down: a clear error, no hang, the parent untouched.
    let ctld = slurm_pid(&c, "slurmctld");
    signal(ctld, libc::SIGTERM);
    let stopped = wait_until(Duration::from_secs(20), || (!pid_alive(ctld)).then_some(()));
    assert!(stopped.is_some(), "slurmctld did not stop");
    let (code, _, err) = h0.sh("p", "sf ticket 1");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Slurm's controller cannot be reached"),
        "{err}"
    );
    assert!(h0.sh_ok("p", "sf id").contains("clone_id=0"));

    // Nothing of the cluster's Slurm is left: no daemon, no salloc.
    let mark = format!("/run/snowflock/{}/", c.name);
    drop(c);
    let left = wait_until(Duration::from_secs(10), || {
        let left = live_with_env(&mark);
        left.is_empty().then_some(()).or_else(|| {
            std::thread::sleep(Duration::from_millis(300));
            None
        })
    });
    assert!(left.is_some(), "left behind: {:?}", live_with_env(&mark));
}

/// Live processes (not zombies) whose command line or environment
/// mentions `needle`, with their names.
fn live_with_env(needle: &str) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next());
        if matches!(state, None | Some('Z' | 'X')) || pid == std::process::id() {
            continue;
        }
        let mut text = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        text.extend(std::fs::read(e.path().join("environ")).unwrap_or_default());
        if String::from_utf8_lossy(&text).contains(needle) {
            v.push((pid, comm(pid)));
        }
    }
    v
}

/// Pid of one of the cluster's Slurm daemons, from cluster.json.
fn slurm_pid(c: &Cluster, what: &str) -> u32 {
    let v: Value = serde_json::from_slice(
        &std::fs::read(c.config_dir().join("cluster.json")).expect("cluster.json"),
    )
    .expect("cluster.json");
    v["slurm"]["procs"]
        .as_array()
        .expect("slurm procs")
        .iter()
        .find(|p| p["what"] == what)
        .and_then(|p| p["pid"].as_u64())
        .expect("pid") as u32
}

/// Children of `pid` (of all its threads).
fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        v.extend(
            kids.split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok()),
        );
    }
    v
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}
