//! The `sf-swdemo` binary against a fake SnowFlock agent socket: the parent
//! side of `run` end to end, with this test playing the clones.

use snowflock_demo::app::{Log, WorkerReport};
use snowflock_demo::{generate_db, generate_query, merge_top, search};
use snowflock_proto::api::{ApiRequest, ApiResponse, ChildState, ChildStatus};
use snowflock_proto::frame;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sf-swdemo");
const DATA: [&str; 8] = [
    "--seed", "4", "--count", "150", "--len", "60-120", "--qlen", "70",
];

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sf-swdemo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Serves the agent socket: a parent VM granted `granted` clones.
fn fake_agent(sock: &PathBuf, granted: u32) -> Arc<Mutex<Vec<ApiRequest>>> {
    let l = UnixListener::bind(sock).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        let children = |state: ChildState| -> Vec<ChildStatus> {
            (1..=granted)
                .map(|k| ChildStatus {
                    clone_id: k,
                    vm: format!("vm-c{k}"),
                    ip: None,
                    state: state.clone(),
                })
                .collect()
        };
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let req: ApiRequest = frame::read_frame(&mut c).unwrap();
            s2.lock().unwrap().push(req.clone());
            let resp = match req {
                ApiRequest::RequestTicket { .. } => ApiResponse::Ticket {
                    ticket: "t-5a".into(),
                    granted,
                },
                ApiRequest::Clone { ticket } => ApiResponse::Cloned {
                    clone_id: 0,
                    ticket,
                },
                ApiRequest::Join { .. } => ApiResponse::Joined {
                    children: children(ChildState::Exited { code: 0 }),
                },
                ApiRequest::Kill { .. } => ApiResponse::Killed {
                    children: children(ChildState::Killed),
                },
                ApiRequest::Id => ApiResponse::Identity {
                    vm: "vm".into(),
                    clone_id: 0,
                    ticket: None,
                    ip: None,
                },
                ApiRequest::Exit { .. } => ApiResponse::Error {
                    code: snowflock_proto::api::ApiErrorCode::WrongRole,
                    message: "not a clone".into(),
                },
                ApiRequest::Status { .. } | ApiRequest::SiblingExec { .. } => ApiResponse::Error {
                    code: snowflock_proto::api::ApiErrorCode::BadRequest,
                    message: "not used by the demo".into(),
                },
            };
            frame::write_frame(&mut c, &resp).unwrap();
        }
    });
    seen
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn local_hits() -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("local")
        .args(DATA)
        .args(["--top", "5"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["hits"].clone()
}

#[test]
fn local_prints_the_top_hits() {
    let hits = local_hits();
    let q = generate_query(4, 70);
    let db = generate_db(4, 150, 60, 120, &q);
    let expected = merge_top(search(&db, &q, (0, 1)), 5);
    assert_eq!(hits, serde_json::to_value(&expected).unwrap());
}

#[test]
fn parent_collects_merges_and_joins() {
    let dir = tmpdir("ok");
    let sock = dir.join("agent.sock");
    let seen = fake_agent(&sock, 2);
    let port = free_port();
    let child = Command::new(BIN)
        .args([
            "run",
            "--clones",
            "3",
            "--top",
            "5",
            "--port",
            &port.to_string(),
            "--timeout",
            "20",
        ])
        .args(DATA)
        .env("SNOWFLOCK_AGENT_SOCKET", &sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Play clones 1 and 2 of 3 workers.
    let q = generate_query(4, 70);
    let db = generate_db(4, 150, 60, 120, &q);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    for k in 1..=2u32 {
        let hits = merge_top(search(&db, &q, (k as usize, 3)), 5);
        let r = WorkerReport {
            clone_id: k,
            hits,
            cells: 100 * k as u64,
            ms: k as u64,
        };
        snowflock_demo::app::send_report(addr, &r, deadline, &Log::new()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["clones"], 2);
    assert_eq!(v["hits"], local_hits());
    assert_eq!(v["join"], serde_json::json!(["1 exited 0", "2 exited 0"]));
    let w = v["workers"].as_array().unwrap();
    assert_eq!(w.len(), 3);
    assert_eq!(
        w[1],
        serde_json::json!({"clone_id": 1, "ms": 1, "cells": 100, "hits": 5})
    );
    assert_eq!(w[0]["clone_id"], 0);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            ApiRequest::RequestTicket {
                n: 3,
                independent: None
            },
            ApiRequest::Clone {
                ticket: "t-5a".into()
            },
            ApiRequest::Join {
                ticket: "t-5a".into()
            },
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn parent_kills_when_a_clone_is_missing() {
    let dir = tmpdir("missing");
    let sock = dir.join("agent.sock");
    let seen = fake_agent(&sock, 2);
    let port = free_port();
    let out = Command::new(BIN)
        .args([
            "run",
            "--clones",
            "2",
            "--port",
            &port.to_string(),
            "--timeout",
            "1",
        ])
        .args(DATA)
        .env("SNOWFLOCK_AGENT_SOCKET", &sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sf-swdemo: error: Clone(s) 1, 2 did not report within 1 s; killed the ticket's children: 1 killed, 2 killed"),
        "{err}"
    );
    assert_eq!(
        seen.lock().unwrap().last(),
        Some(&ApiRequest::Kill {
            ticket: "t-5a".into()
        })
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn api_errors_exit_1() {
    let dir = tmpdir("noagent");
    let out = Command::new(BIN)
        .args(["run", "--clones", "2", "--count", "10"])
        .env("SNOWFLOCK_AGENT_SOCKET", dir.join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sf-swdemo: error: sf_request_ticket: Cannot reach the snowflock agent at"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
