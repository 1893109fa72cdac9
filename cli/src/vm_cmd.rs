//! `snowflock vm ...`.
//!
//! Messages about progress and outcome go to stderr; data (JSON, tables,
//! command output) to stdout, so `--json` output can be piped as is.

use crate::client::{Client, ClientError};
use anyhow::{bail, Result};
use snowflock_proto::admin::{Accel, AdminRequest, AdminResponse, ExecInput, VmInfo};
use snowflock_proto::channel::Stream;
use snowflock_proto::frame::{read_frame, write_frame};
use std::io::{Read, Write};

/// A `--mem` value that is not a size.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid memory size {0:?} (use e.g. 256M or 1G)")]
pub struct BadMemSize(String);

/// Parses `256M`, `1G`, `512` (MiB) into MiB.
pub fn parse_mem(s: &str) -> Result<u32, BadMemSize> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('M' | 'm') => (&s[..s.len() - 1], 1),
        Some('G' | 'g') => (&s[..s.len() - 1], 1024),
        _ => (s, 1),
    };
    num.parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| BadMemSize(s.to_string()))
}

/// What a VM boots besides its image: a disk of the user's own, and a
/// kernel and initrd that replace the image's.
#[derive(Debug, Default)]
pub struct BootArgs {
    pub disk: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
}

pub fn start(
    c: &Client,
    name: &str,
    image: &str,
    mem_mib: u32,
    vcpus: u32,
    accel: Accel,
    json: bool,
) -> Result<()> {
    start_with(
        c,
        name,
        image,
        &BootArgs::default(),
        (mem_mib, vcpus, accel),
        json,
    )
}

/// `vm start` with every option. Paths are made absolute here: the daemon
/// runs elsewhere.
pub fn start_with(
    c: &Client,
    name: &str,
    image: &str,
    boot: &BootArgs,
    (mem_mib, vcpus, accel): (u32, u32, Accel),
    json: bool,
) -> Result<()> {
    let abs = |p: &str| {
        std::fs::canonicalize(p)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| p.to_string())
    };
    let image = if image.is_empty() {
        String::new()
    } else {
        abs(image)
    };
    eprintln!("Starting VM {name} ({mem_mib} MiB, {vcpus} vCPU) and waiting for its agent...");
    match c.call(&AdminRequest::VmStart {
        name: name.into(),
        image,
        mem_mib,
        vcpus,
        accel,
        disk: boot.disk.as_deref().map(abs),
        kernel: boot.kernel.as_deref().map(abs),
        initrd: boot.initrd.as_deref().map(abs),
    })? {
        AdminResponse::Vm(v) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                eprintln!(
                    "VM {} running: ip {}, accel {}, pid {}",
                    v.name,
                    v.ip,
                    v.accel,
                    v.pid.unwrap_or(0)
                );
            }
            Ok(())
        }
        other => bail!("Unexpected answer: {other:?}"),
    }
}

pub fn list_vms(c: &Client) -> Result<Vec<VmInfo>> {
    match c.call(&AdminRequest::VmList)? {
        AdminResponse::VmList { vms, unreachable } => {
            for u in unreachable {
                eprintln!("snowflock: warning: host not listed: {u}");
            }
            Ok(vms)
        }
        other => bail!("Unexpected answer: {other:?}"),
    }
}

pub fn list(c: &Client, json: bool) -> Result<()> {
    let vms = list_vms(c)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:<9} {:<20} {:>8} {:<16} {:>11} {:>10}",
        "NAME", "HOST", "STATE", "TICKET", "CLONE_ID", "IP", "PRIVATE_MIB", "SHARED_MIB"
    );
    for v in vms {
        let m = v.memory.unwrap_or_default();
        println!(
            "{:<24} {:<10} {:<9} {:<20} {:>8} {:<16} {:>11.1} {:>10.1}",
            v.name,
            v.host,
            format!("{:?}", v.state).to_lowercase(),
            v.ticket.as_deref().unwrap_or("-"),
            v.clone_id,
            v.ip,
            m.private_bytes as f64 / (1 << 20) as f64,
            (m.shared_bytes + m.generations_bytes) as f64 / (1 << 20) as f64,
        );
    }
    Ok(())
}

pub fn stop(c: &Client, name: &str) -> Result<()> {
    c.call(&AdminRequest::VmStop { name: name.into() })?;
    eprintln!("VM {name} stopped");
    Ok(())
}

pub fn console(c: &Client, name: &str) -> Result<()> {
    match c.call(&AdminRequest::VmConsole { name: name.into() })? {
        AdminResponse::Console { data } => {
            std::io::stdout().write_all(&data)?;
            Ok(())
        }
        other => bail!("Unexpected answer: {other:?}"),
    }
}

/// Result of an exec when captured (used by demo and bench).
pub struct Captured {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `argv` in the guest. With `capture`, output is collected instead of
/// printed and stdin is empty; otherwise this process's stdin is forwarded.
pub fn exec(
    c: &Client,
    name: &str,
    argv: &[String],
    capture: bool,
) -> Result<Captured, ClientError> {
    let mut s = c.connect()?;
    write_frame(
        &mut s,
        &AdminRequest::Exec {
            name: name.into(),
            argv: argv.to_vec(),
        },
    )?;
    let mut w = s.try_clone().map_err(|e| ClientError::Frame(e.into()))?;
    if capture {
        write_frame(
            &mut w,
            &ExecInput {
                data: vec![],
                eof: true,
            },
        )?;
    } else {
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = write_frame(
                            &mut w,
                            &ExecInput {
                                data: vec![],
                                eof: true,
                            },
                        );
                        return;
                    }
                    Ok(n) => {
                        if write_frame(
                            &mut w,
                            &ExecInput {
                                data: buf[..n].to_vec(),
                                eof: false,
                            },
                        )
                        .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    }
    let mut out = Captured {
        code: 0,
        stdout: vec![],
        stderr: vec![],
    };
    loop {
        match read_frame(&mut s)? {
            AdminResponse::ExecOutput { stream, data } => match (capture, stream) {
                (true, Stream::Stdout) => out.stdout.extend_from_slice(&data),
                (true, Stream::Stderr) => out.stderr.extend_from_slice(&data),
                (false, Stream::Stdout) => {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(&data);
                    let _ = o.flush();
                }
                (false, Stream::Stderr) => {
                    let _ = std::io::stderr().write_all(&data);
                }
            },
            AdminResponse::ExecExit { code } => {
                out.code = code;
                return Ok(out);
            }
            AdminResponse::Error { code, message } => {
                return Err(ClientError::Daemon { code, message })
            }
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// `snowflock stats VM`: memory-on-demand figures of one VM.
/// Bytes as MiB with one decimal.
fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// A fraction (0..=1) as a percentage with one decimal, never rounded up
/// to 100 % before it is whole.
fn percent(f: f64) -> String {
    let p = (f.clamp(0.0, 1.0) * 1000.0).floor() / 10.0;
    format!("{p:.1} %")
}

pub fn stats(c: &Client, name: &str, json: bool) -> Result<()> {
    match c.call(&AdminRequest::Stats { name: name.into() })? {
        AdminResponse::Stats(s) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!(
                "VM {} on {}: memory {}{}",
                s.vm,
                s.host,
                s.memory,
                s.origin
                    .as_deref()
                    .map(|o| format!(" from {o}"))
                    .unwrap_or_default()
            );
            let f = &s.fetch;
            let rows = [
                ("faults", f.faults),
                ("bytes_fetched", f.bytes_fetched),
                ("pages_fetched", f.pages_fetched),
                ("zero_pages", f.zero_pages),
                ("cache_hits", f.cache_hits),
                ("prefetch_hits", f.prefetch_hits),
                ("fetch_errors", f.fetch_errors),
                ("latency_p50_us", f.latency_p50_us),
                ("latency_p99_us", f.latency_p99_us),
                ("prefetch_wasted_bytes", f.prefetch_wasted_bytes),
                ("mcast_pages", f.mcast_pages),
                ("mcast_dropped", f.mcast_dropped),
                ("coalesced", f.coalesced),
                ("rerequests", f.rerequests),
            ];
            for (k, v) in rows {
                println!("  {k:<21} {v}");
            }
            println!("  {:<21} {}", "completion", percent(s.completion));
            println!(
                "  {:<21} {}",
                "independent",
                if s.independent { "yes" } else { "no" }
            );
            let m = &s.mem;
            println!(
                "  host memory: private {}, shared {}, older generations {}",
                mib(m.private_bytes),
                mib(m.shared_bytes),
                mib(m.generations_bytes)
            );
            let g = &s.disk;
            if *g != Default::default() {
                println!(
                    "  disk (read on demand from {})",
                    s.origin.as_deref().unwrap_or("?")
                );
                let rows = [
                    ("disk_blocks_read", g.disk_blocks_read),
                    ("disk_bytes_fetched", g.disk_bytes_fetched),
                    ("disk_blocks_fetched", g.disk_blocks_fetched),
                    ("disk_zero_blocks", g.disk_zero_blocks),
                    ("disk_cache_hits", g.disk_cache_hits),
                    ("disk_fetch_errors", g.disk_fetch_errors),
                    ("disk_read_p50_us", g.disk_read_p50_us),
                    ("disk_read_p99_us", g.disk_read_p99_us),
                ];
                for (k, v) in rows {
                    println!("  {k:<20} {v}");
                }
            }
            Ok(())
        }
        other => bail!("Unexpected answer: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages() {
        assert_eq!(percent(1.0), "100.0 %");
        assert_eq!(percent(0.0), "0.0 %");
        assert_eq!(percent(0.9999), "99.9 %");
        assert_eq!(percent(0.25), "25.0 %");
    }

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem("256M"), Ok(256));
        assert_eq!(parse_mem("1G"), Ok(1024));
        assert_eq!(parse_mem("512"), Ok(512));
        assert_eq!(
            parse_mem(" lots").unwrap_err().to_string(),
            "invalid memory size \"lots\" (use e.g. 256M or 1G)"
        );
        assert!(parse_mem("9999999G").is_err());
    }
}
