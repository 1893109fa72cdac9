//! `snowflock demo`: a parallel protein search by cloning one VM.

use crate::client::Client;
use crate::cluster;
use crate::daemon_ctl;
use crate::vm_cmd;
use anyhow::{bail, Context, Result};
use snowflock_proto::admin::{Accel, AdminRequest, AdminResponse};
use std::path::PathBuf;

/// The local cluster the demo starts when no daemon answers.
pub const DEMO_CLUSTER: &str = "sfdemo";

pub struct DemoArgs {
    pub clones: u32,
    /// Hosts of that cluster; 1 starts a single daemon instead.
    pub hosts: u32,
    pub image: Option<PathBuf>,
    pub mem_mib: u32,
    pub json: bool,
    /// The MPI version: `sfmpirun -np clones+1` on a Debian VM.
    pub mpi: bool,
    /// The local cluster's own Slurm grants the ticket.
    pub slurm: bool,
}

/// Stops what the demo started, also on error.
struct Cleanup {
    c: Client,
    vm: Option<String>,
    daemon: bool,
    cluster: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            eprintln!("demo: stopping VM {vm}");
            let _ = vm_cmd::stop(&self.c, &vm);
        }
        if self.daemon {
            eprintln!("demo: stopping the daemon it started");
            let _ = daemon_ctl::stop(&self.c);
        }
        if let Some(name) = self.cluster.take() {
            eprintln!("demo: removing the local cluster `{name}` it started");
            if let Err(e) = cluster::down(&name) {
                eprintln!("demo: {e:#}");
            }
        }
    }
}

pub fn run(c: Client, a: DemoArgs) -> Result<()> {
    let image = match (&a.image, a.mpi) {
        (Some(i), _) => i.clone(),
        (None, false) => crate::image_cmd::default_out(),
        (None, true) => {
            eprintln!(
                "demo: the MPI demo runs in a Debian VM with MPICH (built once, then cached)"
            );
            crate::demo_mpi::image()?
        }
    };
    if snowflock_image::Image::open(&image).is_err() {
        eprintln!("demo: no usable image at {}, building one", image.display());
        crate::image_cmd::build(crate::image_cmd::BuildArgs {
            out: Some(image.clone()),
            add: vec![],
            kernel_dir: None,
            guest_bin_dir: None,
        })?;
    }
    let mut guard = Cleanup {
        c,
        vm: None,
        daemon: false,
        cluster: None,
    };
    if guard.c.call(&AdminRequest::Status).is_ok() {
        // A daemon answers: use it as it is.
        if a.slurm {
            eprintln!("demo: a daemon already answers; --slurm applies only to the cluster the demo starts");
        }
    } else if a.hosts > 1 || a.slurm {
        eprintln!(
            "demo: starting a local cluster `{DEMO_CLUSTER}` of {} hosts",
            a.hosts
        );
        let up = cluster::up(&cluster::UpOpts {
            name: DEMO_CLUSTER.into(),
            hosts: Some(a.hosts),
            settings: cluster::Settings {
                // One clone per node, as SnowFlock places them.
                slurm: a.slurm.then_some(cluster::SlurmSettings {
                    wait_s: 30,
                    slots_per_node: Some(1),
                }),
                ..cluster::Settings::default()
            },
        })?;
        if up.started {
            guard.cluster = Some(DEMO_CLUSTER.into());
        }
        guard.c = cluster::host_client(DEMO_CLUSTER, "h0")?;
        eprintln!(
            "demo: the VM runs on h0; its clones may land on any of the {} hosts",
            a.hosts
        );
    } else {
        eprintln!("demo: starting snowflockd in network namespace sfdemo-h0");
        daemon_ctl::start(
            &guard.c,
            daemon_ctl::StartOpts {
                netns: Some("sfdemo-h0".into()),
                state_dir: Some("/dev/shm/snowflock-demo".into()),
                host: Some("h0".into()),
                max_vms: None,
                log: None,
            },
        )?;
        guard.daemon = true;
    }
    let c = &guard.c;
    let vm = format!("demo{}", std::process::id());
    vm_cmd::start(
        c,
        &vm,
        &image.display().to_string(),
        a.mem_mib,
        1,
        Accel::Auto,
        false,
    )?;
    guard.vm = Some(vm.clone());
    if a.mpi {
        return mpi_job(c, &vm, &a);
    }
    eprintln!(
        "demo: running sf-swdemo in {vm}; it will clone the VM {} time(s)",
        a.clones
    );
    let out = vm_cmd::exec(
        c,
        &vm,
        &[
            "sf-swdemo".into(),
            "run".into(),
            "--clones".into(),
            a.clones.to_string(),
        ],
        true,
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stderr.lines() {
        eprintln!("  guest| {l}");
    }
    if out.code != 0 {
        bail!("sf-swdemo failed with exit code {}", out.code);
    }
    let result: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("sf-swdemo printed no JSON result")?;
    let report = last_report(c, &vm)?;
    // Slurm's record of the ticket's allocation: the bill.
    let bill = match (&guard.cluster, &report) {
        (Some(name), Some(r)) if a.slurm => Some(cluster::slurm_bill(name, &r.ticket)?),
        _ => None,
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "result": result, "clone": report, "slurm": bill })
            )?
        );
        return Ok(());
    }
    println!(
        "\nTop hits (merged from {} workers):",
        result["workers"].as_array().map_or(0, |w| w.len())
    );
    print_hits(&result);
    print_report(report.as_ref());
    if let Some(b) = bill {
        println!("\nSlurm's accounting of the ticket's allocation (sacct):");
        for l in b.lines() {
            println!("  {l}");
        }
    }
    Ok(())
}

/// The MPI version of the job, in `vm`.
fn mpi_job(c: &Client, vm: &str, a: &DemoArgs) -> Result<()> {
    let ranks = a.clones + 1;
    eprintln!("demo: compiling the MPI search in {vm} and running it with sfmpirun -np {ranks}");
    let job = crate::demo_mpi::run_job(c, vm, ranks)?;
    let report = last_report(c, vm)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "result": job.result,
                "phases": job.phases,
                "clone": report,
            }))?
        );
        return Ok(());
    }
    println!("\nTop hits (MPI, {ranks} ranks, one per VM):");
    print_hits(&job.result);
    println!("\nsfmpirun timeline:");
    for (t, what) in &job.phases {
        println!("  {:>9.1} ms  {what}", t * 1000.0);
    }
    print_report(report.as_ref());
    Ok(())
}

/// The daemon's report of `vm`'s latest clone.
fn last_report(c: &Client, vm: &str) -> Result<Option<snowflock_proto::admin::CloneReport>> {
    Ok(match c.call(&AdminRequest::CloneReports)? {
        AdminResponse::CloneReports { reports } => {
            reports.into_iter().rev().find(|r| r.parent == vm)
        }
        _ => None,
    })
}

fn print_hits(result: &serde_json::Value) {
    for h in result["hits"].as_array().into_iter().flatten() {
        println!(
            "  {:>6}  {:<16} score {}",
            h["id"],
            h["name"].as_str().unwrap_or("?"),
            h["score"]
        );
    }
}

fn print_report(report: Option<&snowflock_proto::admin::CloneReport>) {
    if let Some(r) = report {
        println!(
            "\nClone timeline ({} clones, ticket {}):",
            r.clones, r.ticket
        );
        for (what, ms) in &r.timeline {
            println!("  {ms:>9.1} ms  {what}");
        }
        println!("\nFigures:");
        println!("  parent pause        {:>9.1} ms", r.parent_pause_ms);
        println!(
            "  descriptor          {:>9} bytes ({} device state)",
            r.descriptor_bytes, r.device_state_bytes
        );
        println!(
            "  memory frozen       {:>9.1} MiB of {} MiB guest RAM ({:.2} MiB copied while paused)",
            r.frozen_bytes as f64 / 1048576.0,
            r.guest_ram_bytes >> 20,
            r.paused_copy_bytes as f64 / 1048576.0
        );
        println!(
            "  all clones returned {:>9.1} ms after sf_clone",
            r.all_ready_ms
        );
    }
}
