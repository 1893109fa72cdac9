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

/// The launcher command for `np` ranks of `program` over `flock`.
pub fn command(
    mpi: Mpi,
    sf_exec: &Path,
    hostfile: &Path,
    np: u32,
    flock: &Flock,
    as_root: bool,
    program: &[OsString],
) -> Launch {
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
            Mpi::Mpich,
            Path::new("/usr/bin/sf-exec"),
            Path::new("/tmp/h"),
            4,
            &flock(),
            true,
            &prog,
        );
        assert_eq!(l.program, "mpiexec.hydra");
        assert_eq!(
            words(&l),
            "-launcher rsh -launcher-exec /usr/bin/sf-exec -f /tmp/h -iface eth0 -n 4 ./ring 7"
        );
        assert!(l.env.contains(&("UCX_TLS".into(), "tcp,self".into())));
        let l = command(
            Mpi::OpenMpi,
            Path::new("/usr/bin/sf-exec"),
            Path::new("/tmp/h"),
            4,
            &flock(),
            true,
            &prog,
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
            Mpi::OpenMpi,
            Path::new("/x"),
            Path::new("/h"),
            1,
            &flock(),
            false,
            &prog,
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
    }
}
