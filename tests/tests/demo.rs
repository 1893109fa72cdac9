//! The demo job, end to end: its distributed answer must equal a
//! single-process computation of the same search.

use serde_json::Value;
use snowflock_tests::*;
use std::path::Path;
use std::process::Command;

#[test]
fn demo_finds_what_one_process_finds() {
    if !vm_prereqs() {
        return;
    }
    let img = TestImage::build(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("demo.sock");
    let out = Command::new(bin("snowflock"))
        .arg("--socket")
        .arg(&sock)
        .args(["demo", "--clones", "2", "--json", "--image", img.path()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("demo --json");

    let swdemo = bin_dir().join("../x86_64-unknown-linux-gnu/release/sf-swdemo");
    let local = Command::new(&swdemo)
        .arg("local")
        .output()
        .expect("run sf-swdemo local on the host");
    assert!(local.status.success());
    let local: Value = serde_json::from_slice(&local.stdout).unwrap();

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
    // The demo removed the daemon and namespace it started.
    assert!(!sock.exists());
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
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("demo.sock");
    let out = Command::new(bin("snowflock"))
        .arg("--socket")
        .arg(&sock)
        .args([
            "demo",
            "--slurm",
            "--hosts",
            "3",
            "--clones",
            "2",
            "--json",
            "--image",
            img.path(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("demo --json");
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
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("demo.sock");
    let out = Command::new(bin("snowflock"))
        .arg("--socket")
        .arg(&sock)
        .args([
            "demo",
            "--mpi",
            "--clones",
            "2",
            "--json",
            "--image",
            img.path(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo --mpi failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("demo --json");
    let swdemo = bin_dir().join("../x86_64-unknown-linux-gnu/release/sf-swdemo");
    let local = Command::new(&swdemo).arg("local").output().unwrap();
    assert!(local.status.success());
    let local: Value = serde_json::from_slice(&local.stdout).unwrap();
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("merged the hits of 3 ranks"), "{stderr}");
    assert!(!sock.exists());
}
