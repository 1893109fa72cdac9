//! The stock launcher's command line for a flock (pure: no I/O).
//!
//! Both launchers start their per-host daemons with an rsh-like program;
//! `sf-exec` is that program. What each needs, and why:
//!
//! * **MPICH (Hydra)**: `-launcher rsh -launcher-exec sf-exec` starts
//!   `hydra_pmi_proxy` on each other VM; `-f` gives the host file
//!   (`IP:SLOTS`). `-iface IFACE` makes the proxies call back to the
//!   parent's flock address, not to what its hostname resolves to (every
//!   clone inherits the parent's `/etc/hosts`). Debian builds MPICH on
//!   UCX, and UCX decides that two processes share a machine by their
//!   `boot_id`, which every clone inherits from its parent: it would try
//!   shared memory between VMs. `UCX_TLS=tcp,self` (ranks in one VM still
//!   use MPICH's own shared memory) and `UCX_NET_DEVICES=IFACE` keep UCX on
//!   the flock network. Hydra passes the environment on to every rank.
//!   `LD_PRELOAD` of `libsnowflock_mpi_shim.so` keeps `MPI_Finalize` from
//!   deadlocking over UCX's TCP transport (see `mpi-shim/src/lib.rs`).
//! * **Open MPI**: `--mca plm_rsh_agent sf-exec` starts `orted` on each
//!   other VM; `--hostfile` (`IP slots=N`). `btl_tcp_if_include` and
//!   `oob_tcp_if_include` keep both the job's messages and ORTE's own on
//!   the flock network (every clone has the same other NICs). Tree spawn
//!   is off so every `orted` is started from the parent. The UCX PML is
//!   left out (`--mca pml ob1`, `btl self,vader,tcp`) for the same
//!   `boot_id` reason. `--allow-run-as-root` when the user is root.
//!
//! In both, `SLURM_*` and `PBS_*` variables are removed: they would make
//! the launcher pick that scheduler instead of the host file.

use super::args::Mpi;
use std::ffi::OsString;
use std::path::Path;

/// What the launcher is run with.
#[derive(Debug, PartialEq, Eq)]
pub struct Launch {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Set for the launcher (and so, with Hydra, for every rank).
    pub env: Vec<(String, String)>,
    /// Removed from the launcher's environment.
    pub env_remove_prefixes: Vec<&'static str>,
}

/// The flock's VMs for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flock {
    /// Flock addresses, the parent's first.
    pub hosts: Vec<String>,
    /// Ranks per VM.
    pub slots: u32,
    /// The parent's address with its prefix, e.g. `10.250.3.1/24`.
    pub cidr: String,
    /// The network interface of the flock (`eth0`).
    pub iface: String,
}

/// The host file in the launcher's format.
pub fn hostfile(mpi: Mpi, f: &Flock) -> String {
    f.hosts
        .iter()
        .map(|h| match mpi {
            Mpi::Mpich => format!("{h}:{}\n", f.slots),
            Mpi::OpenMpi => format!("{h} slots={}\n", f.slots),
        })
        .collect()
}

/// The network of a CIDR (`10.250.3.7/24` -> `10.250.3.0/24`).
pub fn network_of(cidr: &str) -> String {
    let (ip, prefix) = cidr.split_once('/').unwrap_or((cidr, "24"));
    let (Ok(ip), Ok(p)) = (ip.parse::<std::net::Ipv4Addr>(), prefix.parse::<u32>()) else {
        return cidr.to_string();
    };
    let mask = if p == 0 {
        0
    } else {
        u32::MAX << (32 - p.min(32))
    };
    format!("{}/{p}", std::net::Ipv4Addr::from(u32::from(ip) & mask))
}

/// What the user's job needs from the launcher.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub mpi: Mpi,
    pub sf_exec: &'a Path,
    pub hostfile: &'a Path,
    pub np: u32,
    pub as_root: bool,
    /// The MPICH shim to preload, when installed.
    pub mpi_shim: Option<&'a Path>,
    pub program: &'a [OsString],
}

/// The launcher command for `job` over `flock`.
pub fn command(job: &Job<'_>, flock: &Flock) -> Launch {
    let Job {
        mpi,
        sf_exec,
        hostfile,
        np,
        as_root,
        mpi_shim,
        program,
    } = *job;
    let s = |x: &str| OsString::from(x);
    let mut args: Vec<OsString> = Vec::new();
    let mut env = Vec::new();
    let exe = match mpi {
        Mpi::Mpich => {
            args.extend([s("-launcher"), s("rsh"), s("-launcher-exec")]);
            args.push(sf_exec.into());
            args.extend([s("-f"), hostfile.into()]);
            args.extend([s("-iface"), s(&flock.iface)]);
            args.extend([s("-n"), s(&np.to_string())]);
            env.push(("UCX_TLS".into(), "tcp,self".into()));
            env.push(("UCX_NET_DEVICES".into(), flock.iface.clone()));
            if let Some(shim) = mpi_shim {
                let preload = match std::env::var("LD_PRELOAD") {
                    Ok(p) if !p.is_empty() => format!("{} {p}", shim.display()),
                    _ => shim.display().to_string(),
                };
                env.push(("LD_PRELOAD".into(), preload));
            }
            "mpiexec.hydra"
        }
        Mpi::OpenMpi => {
            let net = network_of(&flock.cidr);
            for (k, v) in [
                ("plm_rsh_agent", sf_exec.display().to_string()),
                ("plm_rsh_no_tree_spawn", "1".into()),
                ("btl_tcp_if_include", net.clone()),
                ("oob_tcp_if_include", net),
                ("pml", "ob1".into()),
                ("btl", "self,vader,tcp".into()),
            ] {
                args.extend([s("--mca"), s(k), s(&v)]);
            }
            args.extend([s("--hostfile"), hostfile.into()]);
            args.extend([s("-np"), s(&np.to_string())]);
            if as_root {
                args.push(s("--allow-run-as-root"));
            }
            "mpirun.openmpi"
        }
    };
    args.extend(program.iter().cloned());
    Launch {
        program: s(exe),
        args,
        env,
        env_remove_prefixes: vec!["SLURM_", "PBS_"],
    }
}

/// Which MPI a program's `ldd` output shows it linked with.
pub fn mpi_of_libraries(ldd: &str) -> Option<Mpi> {
    if ldd.contains("libmpich.so") {
        Some(Mpi::Mpich)
    } else if ldd.contains("libmpi.so") {
        Some(Mpi::OpenMpi)
    } else {
        None
    }
}

/// Which MPI `mpiexec --version` describes.
pub fn detect(version_output: &str) -> Option<Mpi> {
    if version_output.contains("HYDRA") || version_output.contains("MPICH") {
        Some(Mpi::Mpich)
    } else if version_output.contains("Open MPI") || version_output.contains("OpenRTE") {
        Some(Mpi::OpenMpi)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flock() -> Flock {
        Flock {
            hosts: vec!["10.250.3.1".into(), "10.250.3.2".into()],
            slots: 2,
            cidr: "10.250.3.1/24".into(),
            iface: "eth0".into(),
        }
    }

    fn words(l: &Launch) -> String {
        l.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn host_files_in_each_format() {
        assert_eq!(
            hostfile(Mpi::Mpich, &flock()),
            "10.250.3.1:2\n10.250.3.2:2\n"
        );
        assert_eq!(
            hostfile(Mpi::OpenMpi, &flock()),
            "10.250.3.1 slots=2\n10.250.3.2 slots=2\n"
        );
        assert_eq!(network_of("10.250.3.7/24"), "10.250.3.0/24");
        assert_eq!(network_of("junk"), "junk");
    }

    #[test]
    fn launcher_commands_use_sf_exec_and_the_flock_network() {
        let prog = [OsString::from("./ring"), OsString::from("7")];
        let l = command(
            &Job {
                mpi: Mpi::Mpich,
                sf_exec: Path::new("/usr/bin/sf-exec"),
                hostfile: Path::new("/tmp/h"),
                np: 4,
                as_root: true,
                mpi_shim: Some(Path::new("/usr/lib/shim.so")),
                program: &prog,
            },
            &flock(),
        );
        assert_eq!(l.program, "mpiexec.hydra");
        assert!(l
            .env
            .iter()
            .any(|(k, v)| k == "LD_PRELOAD" && v.starts_with("/usr/lib/shim.so")));
        assert_eq!(
            words(&l),
            "-launcher rsh -launcher-exec /usr/bin/sf-exec -f /tmp/h -iface eth0 -n 4 ./ring 7"
        );
        assert!(l.env.contains(&("UCX_TLS".into(), "tcp,self".into())));
        let l = command(
            &Job {
                mpi: Mpi::OpenMpi,
                sf_exec: Path::new("/usr/bin/sf-exec"),
                hostfile: Path::new("/tmp/h"),
                np: 4,
                as_root: true,
                mpi_shim: None,
                program: &prog,
            },
            &flock(),
        );
        assert_eq!(l.program, "mpirun.openmpi");
        let w = words(&l);
        assert!(w.contains("--mca plm_rsh_agent /usr/bin/sf-exec"), "{w}");
        assert!(w.contains("--mca btl_tcp_if_include 10.250.3.0/24"), "{w}");
        assert!(w.contains("--mca oob_tcp_if_include 10.250.3.0/24"), "{w}");
        assert!(
            w.ends_with("--hostfile /tmp/h -np 4 --allow-run-as-root ./ring 7"),
            "{w}"
        );
        let l = command(
            &Job {
                mpi: Mpi::OpenMpi,
                sf_exec: Path::new("/x"),
                hostfile: Path::new("/h"),
                np: 1,
                as_root: false,
                mpi_shim: None,
                program: &prog,
            },
            &flock(),
        );
        assert!(!words(&l).contains("allow-run-as-root"));
    }

    #[test]
    fn detects_the_mpi_behind_mpiexec() {
        assert_eq!(
            detect("HYDRA build details:\n    Version: 4.0.2"),
            Some(Mpi::Mpich)
        );
        assert_eq!(detect("mpiexec (OpenRTE) 4.1.4\n"), Some(Mpi::OpenMpi));
        assert_eq!(detect("something else"), None);
        let mpich = "\tlibmpich.so.12 => /lib/x86_64-linux-gnu/libmpich.so.12 (0x7f)\n";
        let ompi = "\tlibmpi.so.40 => /lib/x86_64-linux-gnu/libmpi.so.40 (0x7f)\n";
        assert_eq!(mpi_of_libraries(mpich), Some(Mpi::Mpich));
        assert_eq!(mpi_of_libraries(ompi), Some(Mpi::OpenMpi));
        assert_eq!(mpi_of_libraries("\tlibc.so.6 => /lib/libc.so.6\n"), None);
    }
}
