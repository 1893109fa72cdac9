//! The demo job, end to end: its distributed answer must equal a
//! single-process computation of the same search.

use serde_json::Value;
use snowflock_tests::*;
use std::path::Path;
use std::process::Command;

/// `snowflock demo ARGS --json --image IMG`, aimed at a daemon socket that
/// does not exist (so the demo starts what it needs); asserts success and
/// that the socket is gone again. Returns the JSON and the demo's stderr.
fn run_demo(img: &TestImage, args: &[&str]) -> (Value, String) {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("demo.sock");
    let out = Command::new(bin("snowflock"))
        .arg("--socket")
        .arg(&sock)
        .arg("demo")
        .args(args)
        .args(["--json", "--image", img.path()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "demo {args:?} failed: {stderr}");
    assert!(!sock.exists());
    let v = serde_json::from_slice(&out.stdout).expect("demo --json");
    (v, stderr)
}

/// The same search in one process on the host (`sf-swdemo local`).
fn local_search() -> Value {
    let swdemo = bin_dir().join("../x86_64-unknown-linux-gnu/release/sf-swdemo");
    let local = Command::new(&swdemo)
        .arg("local")
        .output()
        .expect("run sf-swdemo local on the host");
    assert!(local.status.success());
    serde_json::from_slice(&local.stdout).unwrap()
}

#[test]
fn demo_finds_what_one_process_finds() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let (v, _) = run_demo(&img, &["--clones", "2"]);
    let local = local_search();

    assert_eq!(
        v["result"]["hits"], local["hits"],
        "distributed search must match the local one"
    );
    assert_eq!(v["result"]["clones"], 2);
    assert_eq!(v["result"]["workers"].as_array().map(|w| w.len()), Some(3));
    let join: Vec<&str> = v["result"]["join"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(join, ["1 exited 0", "2 exited 0"]);
    assert_eq!(v["clone"]["clones"], 2);
    assert!(v["clone"]["descriptor_bytes"].as_u64().unwrap() > 0);
    // The demo removed the daemon and namespace it started (run_demo
    // checked its socket).
    assert!(!Path::new("/run/netns/sfdemo-h0").exists());
}

/// `snowflock demo --slurm`: the demo's local cluster runs its own Slurm,
/// which grants the ticket (one node per clone); the answer is the same,
/// and Slurm's accounting has the allocation, completed.
#[test]
fn demo_with_slurm_gets_its_clones_from_slurm() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let (v, _) = run_demo(&img, &["--slurm", "--hosts", "3", "--clones", "2"]);
    assert_eq!(v["result"]["clones"], 2);
    let ticket = v["clone"]["ticket"].as_str().expect("ticket");
    let bill = v["slurm"].as_str().expect("sacct's record");
    let line = bill
        .lines()
        .find(|l| l.contains(&format!("snowflock-{ticket}")))
        .unwrap_or_else(|| panic!("no allocation for {ticket} in\n{bill}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f[2], "COMPLETED", "{line}");
    assert_eq!(f[3], "2", "one node per clone: {line}");
    // Everything the demo started is gone, Slurm's daemons too.
    assert!(!Path::new("/run/snowflock/sfdemo").exists());
    assert!(processes_with("/run/snowflock/sfdemo/").is_empty());
}

/// `snowflock demo --mpi`: the same search as an MPI program, run with
/// `sfmpirun` on clones spread over the demo's local cluster, finds the
/// same hits as one process, and prints sfmpirun's timeline.
#[test]
fn demo_mpi_finds_what_one_process_finds() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::debian();
    let (v, stderr) = run_demo(&img, &["--mpi", "--clones", "2"]);
    let local = local_search();
    assert_eq!(
        v["result"]["hits"], local["hits"],
        "the MPI search must match the local one"
    );
    let phases: Vec<&str> = v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p[1].as_str())
        .collect();
    assert!(
        phases.iter().any(|p| p.contains("started on 3 VMs")),
        "{phases:?}"
    );
    assert!(phases.iter().any(|p| p == &"clones ended"), "{phases:?}");
    assert_eq!(v["clone"]["clones"], 2);
    assert!(stderr.contains("merged the hits of 3 ranks"), "{stderr}");
}
