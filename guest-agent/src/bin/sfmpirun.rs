//! `sfmpirun -np N PROGRAM...`: an MPI job on clones of this VM (see
//! `snowflock::mpirun`).

fn main() -> std::process::ExitCode {
    snowflock::mpirun::main()
}
