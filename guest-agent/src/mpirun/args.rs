//! `sfmpirun`'s command line.

use std::ffi::OsString;

/// Which MPI's launcher runs the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mpi {
    /// MPICH's Hydra (`mpiexec.hydra`).
    Mpich,
    /// Open MPI's ORTE (`mpirun.openmpi`).
    OpenMpi,
}

impl Mpi {
    pub fn name(self) -> &'static str {
        match self {
            Mpi::Mpich => "mpich",
            Mpi::OpenMpi => "openmpi",
        }
    }
}

/// What the user asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    /// Ranks in the job.
    pub np: u32,
    /// `None`: whichever `mpiexec` points to.
    pub mpi: Option<Mpi>,
    /// Run more ranks per VM when the ticket grants fewer clones.
    pub oversubscribe: bool,
    /// Print each phase and its time to stderr.
    pub verbose: bool,
    /// Run on the running clones of this ticket instead of cloning, and
    /// leave them running.
    pub ticket: Option<String>,
    /// The program and its arguments.
    pub program: Vec<OsString>,
}

pub const USAGE: &str =
    "usage: sfmpirun -np N [--mpi mpich|openmpi] [--oversubscribe] [--ticket T] [-v] [--] PROGRAM [ARGS...]";

/// Parses the arguments after the program name.
pub fn parse(args: &[OsString]) -> Result<Args, String> {
    let mut np = None;
    let mut mpi = None;
    let mut oversubscribe = false;
    let mut verbose = false;
    let mut ticket = None;
    let mut i = 0;
    let value = |i: usize, opt: &str| -> Result<String, String> {
        args.get(i + 1)
            .and_then(|v| v.to_str())
            .map(str::to_string)
            .ok_or_else(|| format!("{opt} needs a value\n{USAGE}"))
    };
    while i < args.len() {
        let a = args[i].to_string_lossy();
        match a.as_ref() {
            "-np" | "-n" | "--np" | "-c" => {
                let v = value(i, &a)?;
                let n: u32 = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=4096).contains(n))
                    .ok_or_else(|| {
                        format!("{a}: the number of ranks must be 1 to 4096, got {v:?}")
                    })?;
                np = Some(n);
                i += 2;
            }
            "--mpi" => {
                let v = value(i, "--mpi")?;
                mpi = Some(match v.as_str() {
                    "mpich" => Mpi::Mpich,
                    "openmpi" | "open-mpi" | "ompi" => Mpi::OpenMpi,
                    other => return Err(format!("--mpi: {other:?} is neither mpich nor openmpi")),
                });
                i += 2;
            }
            "--oversubscribe" => {
                oversubscribe = true;
                i += 1;
            }
            "--ticket" => {
                let v = value(i, "--ticket")?;
                if !snowflock_proto::api::valid_ticket_syntax(&v) {
                    return Err(format!("--ticket: {v:?} is not a ticket (t-HEX)"));
                }
                ticket = Some(v);
                i += 2;
            }
            "-v" | "--verbose" => {
                verbose = true;
                i += 1;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            "--" => {
                i += 1;
                break;
            }
            _ if a.starts_with('-') => return Err(format!("unknown option {a}\n{USAGE}")),
            _ => break,
        }
    }
    let np = np.ok_or_else(|| format!("-np N is required\n{USAGE}"))?;
    let program = args[i..].to_vec();
    if program.is_empty() {
        return Err(format!("no program to run\n{USAGE}"));
    }
    Ok(Args {
        np,
        mpi,
        oversubscribe,
        verbose,
        ticket,
        program,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<Args, String> {
        parse(&a.iter().map(OsString::from).collect::<Vec<_>>())
    }

    #[test]
    fn parses_what_mpiexec_users_type() {
        let a = p(&["-np", "4", "./ring", "-x", "1"]).unwrap();
        assert_eq!(a.np, 4);
        assert_eq!(a.mpi, None);
        assert_eq!(a.program, ["./ring", "-x", "1"].map(OsString::from));
        let a = p(&[
            "--mpi",
            "openmpi",
            "-n",
            "2",
            "--oversubscribe",
            "--",
            "-weird",
        ])
        .unwrap();
        assert_eq!(
            (a.np, a.mpi, a.oversubscribe),
            (2, Some(Mpi::OpenMpi), true)
        );
        assert_eq!(a.program, [OsString::from("-weird")]);
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        assert!(p(&["./ring"]).unwrap_err().contains("-np N is required"));
        assert!(p(&["-np", "0", "x"]).unwrap_err().contains("1 to 4096"));
        assert!(p(&["-np", "many", "x"]).unwrap_err().contains("\"many\""));
        assert!(p(&["-np"]).unwrap_err().contains("needs a value"));
        assert!(p(&["-np", "2"]).unwrap_err().contains("no program"));
        assert!(p(&["--mpi", "lam", "-np", "2", "x"])
            .unwrap_err()
            .contains("neither"));
        assert!(p(&["--frobnicate", "x"])
            .unwrap_err()
            .contains("unknown option"));
        assert!(p(&["--ticket", "nope", "-np", "2", "x"])
            .unwrap_err()
            .contains("not a ticket"));
        let a = p(&["--ticket", "t-12ab", "-np", "2", "x"]).unwrap();
        assert_eq!(a.ticket.as_deref(), Some("t-12ab"));
    }
}
