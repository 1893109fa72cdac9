//! `snowflock`: the command-line tool. Parses arguments and maps errors to
//! exit codes: 0 success, 1 error, 2 usage, 3 daemon not running; `vm exec`
//! exits with the guest command's code.

mod bench;
mod client;
mod daemon_ctl;
mod demo;
mod image_cmd;
mod vm_cmd;

use clap::{Parser, Subcommand};
use client::{Client, ClientError};
use snowflock_proto::admin::Accel;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "snowflock", version, about = "VM fork for clusters")]
struct Cli {
    /// The daemon's admin socket.
    #[arg(long, global = true, env = "SNOWFLOCK_SOCKET", default_value = snowflock_proto::DAEMON_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage the local daemon.
    Daemon {
        #[command(subcommand)]
        cmd: DaemonCmd,
    },
    /// Guest images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Run the demo: a protein search that clones its VM.
    Demo {
        /// Clones to ask for.
        #[arg(long, default_value_t = 3)]
        clones: u32,
        /// Image directory (built if missing).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long, default_value = "256M", value_parser = vm_cmd::parse_mem)]
        mem: u32,
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks (figures, not tests).
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

#[derive(Subcommand)]
enum DaemonCmd {
    /// Start snowflockd in the background.
    Start {
        /// Run it inside this network namespace (created if missing, removed on stop).
        #[arg(long)]
        netns: Option<String>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        max_vms: Option<u32>,
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Stop every VM and the daemon.
    Stop,
    /// Show the daemon's status.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build a guest image (kernel + initramfs with busybox, agent, sf, libsnowflock).
    Build {
        #[arg(long)]
        out: Option<PathBuf>,
        /// Extra file or directory, SRC:DEST (repeatable).
        #[arg(long = "add")]
        add: Vec<String>,
        /// Kernel cache directory (vmlinux + modules).
        #[arg(long)]
        kernel_dir: Option<PathBuf>,
        /// Directory with the static guest binaries.
        #[arg(long)]
        guest_bin_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a VM and wait for its agent.
    Start {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value = "256M", value_parser = vm_cmd::parse_mem)]
        mem: u32,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, value_enum, default_value = "auto")]
        accel: AccelArg,
        #[arg(long)]
        json: bool,
    },
    /// List VMs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Run a command in the guest (stdin forwarded; exits with its code).
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Print the serial console log.
    Console { name: String },
    /// Stop a VM (a parent's clones go with it).
    Stop { name: String },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Clone figures per clone count, medians over runs.
    Clone {
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        clones: Vec<u32>,
        #[arg(long, default_value_t = 3)]
        runs: u32,
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long, default_value = "256M", value_parser = vm_cmd::parse_mem)]
        mem: u32,
        /// MiB of memory the guest fills before cloning.
        #[arg(long, default_value_t = 0)]
        touch_mib: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AccelArg {
    Auto,
    Tcg,
    Kvm,
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let c = Client::new(&cli.socket);
    match cli.cmd {
        Cmd::Daemon { cmd } => match cmd {
            DaemonCmd::Start { netns, state_dir, host, max_vms, log } => {
                daemon_ctl::start(&c, daemon_ctl::StartOpts { netns, state_dir, host, max_vms, log })?
            }
            DaemonCmd::Stop => daemon_ctl::stop(&c)?,
            DaemonCmd::Status { json } => daemon_ctl::status(&c, json)?,
        },
        Cmd::Image { cmd: ImageCmd::Build { out, add, kernel_dir, guest_bin_dir } } => {
            image_cmd::build(image_cmd::BuildArgs { out, add, kernel_dir, guest_bin_dir })?;
        }
        Cmd::Vm { cmd } => match cmd {
            VmCmd::Start { name, image, mem, vcpus, accel, json } => {
                let accel = match accel {
                    AccelArg::Auto => Accel::Auto,
                    AccelArg::Tcg => Accel::Tcg,
                    AccelArg::Kvm => Accel::Kvm,
                };
                vm_cmd::start(&c, &name, &image, mem, vcpus, accel, json)?
            }
            VmCmd::List { json } => vm_cmd::list(&c, json)?,
            VmCmd::Exec { name, cmd } => {
                let out = vm_cmd::exec(&c, &name, &cmd, false)?;
                return Ok(ExitCode::from(out.code.clamp(0, 255) as u8));
            }
            VmCmd::Console { name } => vm_cmd::console(&c, &name)?,
            VmCmd::Stop { name } => vm_cmd::stop(&c, &name)?,
        },
        Cmd::Demo { clones, image, mem, json } => demo::run(&c, demo::DemoArgs { clones, image, mem_mib: mem, json })?,
        Cmd::Bench { cmd: BenchCmd::Clone { clones, runs, image, mem, touch_mib, json } } => {
            if runs == 0 || clones.is_empty() || clones.contains(&0) {
                anyhow::bail!("--runs and every --clones value must be at least 1");
            }
            let image = image.unwrap_or_else(image_cmd::default_out).display().to_string();
            bench::run(&c, bench::BenchArgs { clones, runs, image, mem_mib: mem, touch_mib, json })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(": ");
                msg.push_str(&cause.to_string());
            }
            eprintln!("snowflock: error: {msg}");
            let not_running = e.chain().any(|c| matches!(c.downcast_ref::<ClientError>(), Some(ClientError::NotRunning { .. })));
            ExitCode::from(if not_running { 3 } else { 1 })
        }
    }
}
