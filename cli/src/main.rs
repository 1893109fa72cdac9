//! `snowflock`: the command-line tool. Parses arguments and maps errors to
//! exit codes: 0 success, 1 error, 2 usage, 3 daemon not running; `vm exec`
//! exits with the guest command's code.

mod bench;
mod bench_disk;
mod bench_hosts;
mod bench_mcdist;
mod bench_mpi;
mod bench_peers;
mod bench_ticket;
mod client;
mod cluster;
mod daemon_ctl;
mod demo;
mod demo_mpi;
mod image_cmd;
mod image_debian;
mod qemu_copy;
mod sys;
mod vm_cmd;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use client::{Client, ClientError};
use snowflock_proto::admin::Accel;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "snowflock", version, about = "VM fork for clusters")]
struct Cli {
    /// The daemon's admin socket [default: /run/snowflock/snowflockd.sock; when
    /// nothing answers there, host h0 of the local cluster, if there is one].
    #[arg(long, global = true, env = "SNOWFLOCK_SOCKET")]
    socket: Option<PathBuf>,
    /// Address this host's daemon of the local cluster (see --cluster). On the
    /// command line it excludes --socket; from the environment it beats
    /// SNOWFLOCK_SOCKET. For `daemon start`: the new daemon's host name.
    #[arg(long, global = true, env = "SNOWFLOCK_HOST", value_name = "NAME")]
    host: Option<String>,
    /// The local cluster (`snowflock cluster up`) that --host refers to.
    #[arg(long, global = true, env = "SNOWFLOCK_CLUSTER", default_value = cluster::DEFAULT_NAME, value_name = "NAME")]
    cluster: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Memory-on-demand figures of a VM (faults, bytes fetched, zero pages, latency).
    Stats {
        name: String,
        #[arg(long)]
        json: bool,
    },
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
    /// A local test cluster: N hosts in network namespaces on this machine.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Run the demo: a protein search that clones its VM.
    Demo {
        /// Clones to ask for.
        #[arg(long, default_value_t = 3)]
        clones: u32,
        /// Hosts of the local cluster `sfdemo` the demo starts when no daemon
        /// answers (1: a single daemon, no cluster).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=cluster::MAX_HOSTS as i64))]
        hosts: u32,
        /// Image directory (built if missing).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Guest memory (the MPI demo's Debian VM takes at least 512M).
        #[arg(long, default_value = "256M", value_parser = vm_cmd::parse_mem)]
        mem: u32,
        #[arg(long)]
        json: bool,
        /// The MPI version: the search as an MPI program run with
        /// `sfmpirun -np CLONES+1` in a Debian VM with MPICH (the image is
        /// built the first time, a few minutes).
        #[arg(long)]
        mpi: bool,
        /// Start the local cluster with its own Slurm, which grants the
        /// demo's ticket (one node per clone); prints Slurm's accounting
        /// record of it (docs/slurm.md).
        #[arg(long)]
        slurm: bool,
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
enum ClusterCmd {
    /// Create the cluster and start its daemons (exits 0 if it is already up).
    Up {
        /// Number of hosts, h0..h{N-1} [default: 4; an existing cluster of any size will do].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=cluster::MAX_HOSTS as i64))]
        hosts: Option<u32>,
        /// Cluster name, 1-8 of a-z0-9 [default: --cluster, i.e. SNOWFLOCK_CLUSTER or sfc].
        #[arg(long)]
        name: Option<String>,
        /// Most VMs per host.
        #[arg(long, default_value_t = 16)]
        max_vms: u32,
        /// Most clones one VM may hold at once.
        #[arg(long, default_value_t = 32)]
        quota_per_vm: u32,
        /// Deadline for fetching one page from another host.
        #[arg(long, default_value_t = 10_000)]
        fetch_timeout_ms: u64,
        /// Extra pages fetched with each remote miss.
        #[arg(long, default_value_t = 0)]
        prefetch_pages: u32,
        /// Seconds an unused ticket keeps its capacity.
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(5..=86_400))]
        ticket_ttl_s: u64,
        /// Multicast page distribution between the hosts (`mcast` in host.toml).
        #[arg(long, value_enum, default_value = "on")]
        mcast: OnOffArg,
        /// Most MiB memtap caches of one generation per host [default: no bound].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        memcache_limit_mib: Option<u64>,
        /// Tickets fetch their whole generation in the background unless
        /// the guest says otherwise (`independent` in host.toml).
        #[arg(long)]
        independent: bool,
        /// Every host's memtap writes the fault trace of each clone there
        /// when it ends (`fault_trace_dir`; for `bench mcdist --trace`).
        #[arg(long)]
        fault_trace_dir: Option<PathBuf>,
        /// Also start a Slurm cluster (munged, slurmdbd, slurmctld on h0, one
        /// slurmd per host) and let it grant tickets (docs/slurm.md).
        #[arg(long)]
        slurm: bool,
        /// With --slurm: seconds a ticket request waits for Slurm.
        #[arg(long, default_value_t = 30, requires = "slurm", value_parser = clap::value_parser!(u64).range(1..=600))]
        slurm_wait_s: u64,
        /// With --slurm: clones per granted node [default: the node's free VM slots].
        #[arg(long, requires = "slurm", value_parser = clap::value_parser!(u32).range(1..=1024))]
        slots_per_node: Option<u32>,
        /// Print the cluster description (cluster.json) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemons and remove namespaces, mounts and directories (idempotent).
    Down {
        /// [default: --cluster]
        #[arg(long)]
        name: Option<String>,
    },
    /// Each host and its daemon's status.
    Status {
        /// [default: --cluster]
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build a guest image: `initramfs` (kernel + initramfs with busybox,
    /// agent, sf, libsnowflock; fast to boot) or `debian` (a Debian disk
    /// with systemd and the snowflock-guest package).
    Build {
        #[arg(long, value_enum, default_value = "initramfs")]
        kind: KindArg,
        /// Output directory (default: <cache>/image, or <cache>/image-debian).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Debian packages to install besides the base set (comma-separated).
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// Size of the Debian image's disk (sparse).
        #[arg(long, default_value = "4G", value_parser = image_debian::parse_size)]
        size: u64,
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
    /// Build the guest package snowflock-guest_<version>_amd64.deb (agent, sf,
    /// libsnowflock, systemd unit; docs/guest-install.md) and print its path.
    Deb {
        /// Output directory [default: the current directory].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Directory with the static guest binaries.
        #[arg(long, visible_alias = "guest-bins")]
        guest_bin_dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Initramfs,
    Debian,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a VM and wait for its agent.
    Start {
        name: String,
        /// Image directory: kernel, initrd, command line, and (for a Debian
        /// image) the disk the VM boots from behind a private overlay.
        #[arg(long, default_value = "")]
        image: String,
        /// A raw or qcow2 disk of your own with snowflock-guest installed;
        /// the VM writes to it in place.
        #[arg(long)]
        disk: Option<String>,
        /// Kernel to boot instead of the image's (a bzImage or ELF).
        #[arg(long, requires = "initrd")]
        kernel: Option<String>,
        /// Initrd to boot instead of the image's.
        #[arg(long, requires = "kernel")]
        initrd: Option<String>,
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
        /// MiB of memory the guest fills before cloning, one fresh VM per
        /// value, side by side (with --hosts: one value, the pattern every
        /// clone reads; default 16 there).
        #[arg(long, value_delimiter = ',')]
        touch_mib: Vec<u32>,
        /// Spread the clones over a local cluster of this many hosts
        /// (created as `sfbench` and removed afterwards), memory on demand.
        #[arg(long)]
        hosts: Option<u32>,
        /// With --hosts: MiB of fresh memory each clone fills (and the
        /// parent filled and freed before the clone).
        #[arg(long, default_value_t = 32)]
        fill_mib: u32,
        /// With `--image debian`: MiB of a file the parent writes and a clone
        /// on another host reads from disk.
        #[arg(long, default_value_t = 64)]
        read_mib: u32,
        /// With --hosts: avoidance heuristics on, off, or both side by side.
        #[arg(long, value_enum, default_value = "both")]
        avoidance: ModesArg,
        /// With --hosts: multicast page distribution on, off, or both side
        /// by side (a cluster per mode).
        #[arg(long, value_enum, default_value = "both")]
        mcast: ModesArg,
        #[arg(long)]
        json: bool,
    },
    /// A ticket request with the static allocator and with Slurm, side by side.
    Ticket {
        /// Hosts of the local cluster `sfbench` (made twice: static, then --slurm).
        #[arg(long, default_value_t = 3)]
        hosts: u32,
        /// Clones each ticket asks for.
        #[arg(long, default_value_t = 2)]
        clones: u32,
        #[arg(long, default_value_t = 5)]
        runs: u32,
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// One MPI job three ways: sfmpirun, VMs already idle, VMs booted first.
    Mpi {
        /// Ranks (one per VM).
        #[arg(long, default_value_t = 4)]
        ranks: u32,
        /// Hosts of the local cluster `sfbench`.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=cluster::MAX_HOSTS as i64))]
        hosts: u32,
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// A Debian image with MPICH (default: the MPI demo's, built if missing).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Intervals of the pi integration the job computes.
        #[arg(long, default_value_t = 20_000_000)]
        work: u64,
        #[arg(long)]
        json: bool,
    },
    /// A clone against booting, save/restore and live migration, side by
    /// side: the original VM's pause and the time to a running worker.
    Peers(PeersOpts),
    /// Multicast page distribution at scale, without VMs: a fault trace
    /// replayed from many simulated clone hosts against one page server.
    Mcdist(bench_mcdist::Opts),
    /// One simulated clone host of `bench mcdist` (the bench runs it).
    #[command(hide = true)]
    McdistHost(bench_mcdist::HostOpts),
    /// The origin of `bench mcdist` (the bench runs it).
    #[command(hide = true)]
    McdistOrigin(bench_mcdist::OriginOpts),
    /// One simulated clone of `bench mcdist` (its host runs it).
    #[command(hide = true)]
    McdistClone(bench_mcdist::CloneOpts),
}

#[derive(clap::Args)]
struct PeersOpts {
    /// Hosts of the local cluster `sfbench` (the parent on h0; boot,
    /// remote clone and migration to h1).
    #[arg(long, default_value_t = 2)]
    hosts: u32,
    #[arg(long, default_value_t = 3)]
    runs: u32,
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long, default_value = "1G", value_parser = vm_cmd::parse_mem)]
    mem: u32,
    /// MiB of the guest's memory filled (and held) before measuring.
    #[arg(long, default_value_t = 512)]
    touch_mib: u32,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModesArg {
    On,
    Off,
    Both,
}

impl ModesArg {
    /// The modes to measure, side by side: on first.
    fn modes(self) -> Vec<bool> {
        match self {
            ModesArg::On => vec![true],
            ModesArg::Off => vec![false],
            ModesArg::Both => vec![true, false],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOffArg {
    On,
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AccelArg {
    Auto,
    Tcg,
    Kvm,
}

/// Fails like a clap usage error (exit code 2).
fn usage_error(msg: &str) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ArgumentConflict, msg)
        .exit()
}

/// The daemon a command talks to: `--host` of the local cluster, else
/// `--socket`, else the default socket, or (with `fallback`, when nothing
/// listens there) host h0 of the local cluster `--cluster` if it exists.
fn target(cli: &Cli, m: &ArgMatches, fallback: bool) -> anyhow::Result<Client> {
    let from_cli = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    if from_cli("host") && from_cli("socket") {
        usage_error("--host and --socket both name a daemon: give one of them");
    }
    if let Some(h) = &cli.host {
        if !from_cli("socket") {
            return cluster::host_client(&cli.cluster, h);
        }
    }
    if let Some(s) = &cli.socket {
        return Ok(Client::new(s));
    }
    let default = Path::new(snowflock_proto::DAEMON_SOCKET);
    if fallback && std::os::unix::net::UnixStream::connect(default).is_err() {
        if let Some((c, h)) = cluster::first_host_client(&cli.cluster) {
            eprintln!(
                "snowflock: nothing answers on {}; using host {h} of the local cluster `{}`",
                default.display(),
                cli.cluster
            );
            return Ok(c);
        }
    }
    Ok(Client::new(default))
}

fn run(cli: Cli, m: &ArgMatches) -> anyhow::Result<ExitCode> {
    if let Cmd::Cluster { cmd } = &cli.cmd {
        cluster_cmd(&cli, cmd)?;
        return Ok(ExitCode::SUCCESS);
    }
    let c = match &cli.cmd {
        // `daemon start` creates the daemon at --socket; its --host is a name.
        Cmd::Daemon {
            cmd: DaemonCmd::Start { .. },
        } => Client::new(
            cli.socket
                .as_deref()
                .unwrap_or(Path::new(snowflock_proto::DAEMON_SOCKET)),
        ),
        Cmd::Image { .. }
        | Cmd::Bench {
            cmd:
                BenchCmd::Mcdist(_)
                | BenchCmd::McdistHost(_)
                | BenchCmd::McdistOrigin(_)
                | BenchCmd::McdistClone(_),
        } => Client::new(Path::new(snowflock_proto::DAEMON_SOCKET)), // unused
        Cmd::Daemon {
            cmd: DaemonCmd::Stop,
        }
        | Cmd::Demo { .. } => target(&cli, m, false)?,
        _ => target(&cli, m, true)?,
    };
    let host = cli.host.clone();
    match cli.cmd {
        Cmd::Cluster { .. } => unreachable!("handled above"),
        Cmd::Stats { name, json } => vm_cmd::stats(&c, &name, json)?,
        Cmd::Daemon { cmd } => match cmd {
            DaemonCmd::Start {
                netns,
                state_dir,
                max_vms,
                log,
            } => daemon_ctl::start(
                &c,
                daemon_ctl::StartOpts {
                    netns,
                    state_dir,
                    host,
                    max_vms,
                    log,
                },
            )?,
            DaemonCmd::Stop => daemon_ctl::stop(&c)?,
            DaemonCmd::Status { json } => daemon_ctl::status(&c, json)?,
        },
        Cmd::Image {
            cmd:
                ImageCmd::Build {
                    kind: KindArg::Debian,
                    out,
                    packages,
                    size,
                    add,
                    guest_bin_dir,
                    ..
                },
        } => {
            let out =
                out.unwrap_or_else(|| snowflock_image::default_cache_dir().join("image-debian"));
            image_debian::build(image_debian::DebianArgs {
                out,
                add,
                packages,
                size_bytes: size,
                guest_bin_dir,
            })?;
        }
        Cmd::Image {
            cmd:
                ImageCmd::Build {
                    kind: KindArg::Initramfs,
                    out,
                    packages,
                    add,
                    kernel_dir,
                    guest_bin_dir,
                    ..
                },
        } => {
            if !packages.is_empty() {
                anyhow::bail!("--packages is for --kind debian");
            }
            image_cmd::build(image_cmd::BuildArgs {
                out,
                add,
                kernel_dir,
                guest_bin_dir,
            })?;
        }
        Cmd::Image {
            cmd: ImageCmd::Deb { out, guest_bin_dir },
        } => println!("{}", image_cmd::deb(out, guest_bin_dir)?.display()),
        Cmd::Vm { cmd } => match cmd {
            VmCmd::Start {
                name,
                image,
                disk,
                kernel,
                initrd,
                mem,
                vcpus,
                accel,
                json,
            } => {
                let accel = match accel {
                    AccelArg::Auto => Accel::Auto,
                    AccelArg::Tcg => Accel::Tcg,
                    AccelArg::Kvm => Accel::Kvm,
                };
                let boot = vm_cmd::BootArgs {
                    disk,
                    kernel,
                    initrd,
                };
                vm_cmd::start_with(&c, &name, &image, &boot, (mem, vcpus, accel), json)?
            }
            VmCmd::List { json } => vm_cmd::list(&c, json)?,
            VmCmd::Exec { name, cmd } => {
                let out = vm_cmd::exec(&c, &name, &cmd, false)?;
                return Ok(ExitCode::from(out.code.clamp(0, 255) as u8));
            }
            VmCmd::Console { name } => vm_cmd::console(&c, &name)?,
            VmCmd::Stop { name } => vm_cmd::stop(&c, &name)?,
        },
        Cmd::Demo {
            clones,
            hosts,
            image,
            mem,
            json,
            mpi,
            slurm,
        } => demo::run(
            c,
            demo::DemoArgs {
                clones,
                hosts,
                image,
                mem_mib: if mpi { mem.max(512) } else { mem },
                json,
                mpi,
                slurm,
            },
        )?,
        Cmd::Bench {
            cmd:
                BenchCmd::Ticket {
                    hosts,
                    clones,
                    runs,
                    image,
                    json,
                },
        } => {
            bench_ticket::run(bench_ticket::TicketArgs {
                hosts,
                clones,
                runs,
                image: image
                    .unwrap_or_else(image_cmd::default_out)
                    .display()
                    .to_string(),
                json,
            })?;
        }
        Cmd::Bench {
            cmd: BenchCmd::Mcdist(o),
        } => {
            bench_mcdist::run(o)?;
        }
        Cmd::Bench {
            cmd: BenchCmd::McdistHost(o),
        } => bench_mcdist::run_host(o)?,
        Cmd::Bench {
            cmd: BenchCmd::McdistOrigin(o),
        } => bench_mcdist::run_origin(o)?,
        Cmd::Bench {
            cmd: BenchCmd::McdistClone(o),
        } => bench_mcdist::run_clone(o)?,
        Cmd::Bench {
            cmd: BenchCmd::Peers(o),
        } => {
            bench_peers::run(bench_peers::PeersArgs {
                hosts: o.hosts,
                runs: o.runs,
                image: o
                    .image
                    .unwrap_or_else(image_cmd::default_out)
                    .display()
                    .to_string(),
                mem_mib: o.mem,
                touch_mib: o.touch_mib,
                json: o.json,
            })?;
        }
        Cmd::Bench {
            cmd:
                BenchCmd::Mpi {
                    ranks,
                    hosts,
                    runs,
                    image,
                    work,
                    json,
                },
        } => {
            if runs == 0 {
                anyhow::bail!("--runs must be at least 1");
            }
            bench_mpi::run(bench_mpi::MpiBenchArgs {
                ranks,
                hosts,
                runs,
                image,
                work,
                json,
            })?
        }
        Cmd::Bench {
            cmd:
                BenchCmd::Clone {
                    clones,
                    runs,
                    image,
                    mem,
                    touch_mib,
                    hosts,
                    fill_mib,
                    avoidance,
                    mcast,
                    read_mib,
                    json,
                },
        } => {
            if runs == 0 || clones.is_empty() || clones.contains(&0) {
                anyhow::bail!("--runs and every --clones value must be at least 1");
            }
            // `--image debian`: the Debian disk image (built if missing).
            if image.as_deref() == Some(std::path::Path::new("debian")) {
                let out = snowflock_image::default_cache_dir().join("image-debian");
                image_debian::build(image_debian::DebianArgs {
                    out: out.clone(),
                    add: Vec::new(),
                    packages: Vec::new(),
                    size_bytes: snowflock_image::DEFAULT_DISK_SIZE,
                    guest_bin_dir: None,
                })?;
                bench_disk::run(bench_disk::DiskBenchArgs {
                    image: out.display().to_string(),
                    runs,
                    mem_mib: mem,
                    read_mib,
                    json,
                })?;
                return Ok(ExitCode::SUCCESS);
            }
            let image = image
                .unwrap_or_else(image_cmd::default_out)
                .display()
                .to_string();
            match hosts {
                Some(h) if !(2..=32).contains(&h) => anyhow::bail!("--hosts must be 2 to 32"),
                Some(hosts) => {
                    let modes = avoidance.modes();
                    bench_hosts::run(bench_hosts::HostsArgs {
                        hosts,
                        clones,
                        runs,
                        image,
                        mem_mib: mem,
                        touch_mib: match touch_mib[..] {
                            [] => 16,
                            [t] => t,
                            _ => anyhow::bail!("with --hosts, --touch-mib takes one value"),
                        },
                        fill_mib,
                        modes,
                        mcast: mcast.modes(),
                        json,
                    })?;
                }
                None => {
                    let touch_mib = if touch_mib.is_empty() {
                        vec![0]
                    } else {
                        touch_mib
                    };
                    bench::run(
                        &c,
                        bench::BenchArgs {
                            clones,
                            runs,
                            image,
                            mem_mib: mem,
                            touch_mib,
                            json,
                        },
                    )?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cluster_cmd(cli: &Cli, cmd: &ClusterCmd) -> anyhow::Result<()> {
    let name_or_default = |n: &Option<String>| n.clone().unwrap_or_else(|| cli.cluster.clone());
    match cmd {
        ClusterCmd::Up {
            hosts,
            name,
            max_vms,
            quota_per_vm,
            fetch_timeout_ms,
            prefetch_pages,
            ticket_ttl_s,
            mcast,
            memcache_limit_mib,
            independent,
            fault_trace_dir,
            slurm,
            slurm_wait_s,
            slots_per_node,
            json,
        } => {
            let settings = cluster::Settings {
                max_vms: *max_vms,
                quota_per_vm: *quota_per_vm,
                fetch_timeout_ms: *fetch_timeout_ms,
                prefetch_pages: *prefetch_pages,
                ticket_ttl_s: *ticket_ttl_s,
                mcast: *mcast == OnOffArg::On,
                memcache_limit_mib: *memcache_limit_mib,
                independent: *independent,
                fault_trace_dir: fault_trace_dir.clone(),
                slurm: slurm.then_some(cluster::SlurmSettings {
                    wait_s: *slurm_wait_s,
                    slots_per_node: *slots_per_node,
                }),
            };
            let name = name_or_default(name);
            let up = cluster::up(&cluster::UpOpts {
                name: name.clone(),
                hosts: *hosts,
                settings,
            })?;
            if up.started {
                let flag = if name == cluster::DEFAULT_NAME {
                    String::new()
                } else {
                    format!("--cluster {name} ")
                };
                eprintln!(
                    "local cluster `{name}` up: {} host(s) h0..h{}; e.g. `snowflock {flag}--host h0 vm list`",
                    up.info.hosts.len(),
                    up.info.hosts.len().saturating_sub(1)
                );
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&up.info)?);
            }
        }
        ClusterCmd::Down { name } => cluster::down(&name_or_default(name))?,
        ClusterCmd::Status { name, json } => cluster::status(&name_or_default(name), *json)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let m = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit());
    match run(cli, &m) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(": ");
                msg.push_str(&cause.to_string());
            }
            eprintln!("snowflock: error: {msg}");
            let not_running = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<ClientError>(),
                    Some(ClientError::NotRunning { .. })
                )
            });
            ExitCode::from(if not_running { 3 } else { 1 })
        }
    }
}
