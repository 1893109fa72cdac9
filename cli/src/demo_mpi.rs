//! `snowflock demo --mpi`: the demo's protein search as an MPI program,
//! run with `sfmpirun` on clones of a Debian VM.
//!
//! The program ([`SWDEMO_MPI_C`]) is compiled in the VM with `mpicc`. Each
//! rank scores its share of the database with `sf-swdemo share`; rank 0
//! gathers the shares' hits (`MPI_Gatherv`) and merges them with
//! `sf-swdemo merge`. `sfmpirun -v` prints its phases, which make the
//! timeline together with the daemon's clone report.

use crate::client::Client;
use crate::vm_cmd;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// The MPI program: `swdemo-mpi [SF-SWDEMO DATA ARGS]`.
pub const SWDEMO_MPI_C: &str = r#"
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

static char line[1 << 20];

int main(int argc, char **argv) {
    int rank, size, i, len, total = 0;
    int *lens = NULL, *offs = NULL;
    char cmd[1024], *all = NULL;
    size_t n = 0;
    FILE *p;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    snprintf(cmd, sizeof cmd, "sf-swdemo share --index %d --of %d %s",
             rank, size, argc > 1 ? argv[1] : "");
    p = popen(cmd, "r");
    if (p) {
        n = fread(line, 1, sizeof line - 1, p);
        if (pclose(p) != 0) n = 0;
    }
    len = (int)n;
    if (rank == 0) {
        lens = malloc(size * sizeof *lens);
        offs = malloc(size * sizeof *offs);
    }
    MPI_Gather(&len, 1, MPI_INT, lens, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        for (i = 0; i < size; i++) { offs[i] = total; total += lens[i]; }
        all = malloc(total + 1);
    }
    MPI_Gatherv(line, len, MPI_CHAR, all, lens, offs, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        for (i = 0; i < size; i++)
            if (lens[i] == 0) { fprintf(stderr, "swdemo-mpi: rank %d found nothing\n", i); MPI_Abort(MPI_COMM_WORLD, 1); }
        p = popen("sf-swdemo merge", "w");
        fwrite(all, 1, total, p);
        if (pclose(p) != 0) MPI_Abort(MPI_COMM_WORLD, 1);
        fprintf(stderr, "swdemo-mpi: merged the hits of %d ranks\n", size);
    }
    MPI_Finalize();
    return 0;
}
"#;

/// The demo's Debian image with MPICH and `sf-swdemo`, built (or found up
/// to date) in the cache.
pub fn image() -> Result<PathBuf> {
    let out = snowflock_image::default_cache_dir().join("image-debian-mpi");
    let swdemo = crate::image_cmd::default_guest_bin_dir().join("sf-swdemo");
    if !swdemo.is_file() {
        bail!(
            "{} is missing: build the guest binaries first (make build)",
            swdemo.display()
        );
    }
    crate::image_debian::build(crate::image_debian::DebianArgs {
        out,
        add: vec![format!("{}:/usr/local/bin/sf-swdemo", swdemo.display())],
        packages: snowflock_image::MPI_PACKAGES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        size_bytes: snowflock_image::DEFAULT_DISK_SIZE,
        guest_bin_dir: None,
    })
}

/// What the job printed.
pub struct JobOutput {
    pub result: serde_json::Value,
    /// `sfmpirun -v`'s phases, `(seconds, what)`.
    pub phases: Vec<(f64, String)>,
}

/// Compiles the program in `vm` and runs it on `ranks` ranks with
/// `sfmpirun`; the guest's stderr is shown as it was.
pub fn run_job(c: &Client, vm: &str, ranks: u32) -> Result<JobOutput> {
    let script = format!(
        "set -e; mkdir -p /root/swdemo && cd /root/swdemo && cat > swdemo-mpi.c <<'EOF'\n{SWDEMO_MPI_C}\nEOF\n\
         mpicc.mpich -O2 -o swdemo-mpi swdemo-mpi.c && \
         sfmpirun -v --mpi mpich -np {ranks} ./swdemo-mpi"
    );
    let out = vm_cmd::exec(c, vm, &["sh".into(), "-c".into(), script], true)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut phases = Vec::new();
    for l in stderr.lines() {
        eprintln!("  guest| {l}");
        if let Some(p) = parse_phase(l) {
            phases.push(p);
        }
    }
    if out.code != 0 {
        bail!("the MPI job failed with exit code {}", out.code);
    }
    let result: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the MPI job printed no JSON result")?;
    Ok(JobOutput { result, phases })
}

/// `sfmpirun: [  1.234 s] what` -> `(1.234, what)`.
pub fn parse_phase(line: &str) -> Option<(f64, String)> {
    let rest = line.strip_prefix("sfmpirun: [")?;
    let (t, what) = rest.split_once(" s] ")?;
    Some((t.trim().parse().ok()?, what.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_read_from_sfmpirun_lines() {
        assert_eq!(
            parse_phase("sfmpirun: [  1.250 s] cloned"),
            Some((1.25, "cloned".into()))
        );
        assert_eq!(parse_phase("share 1 of 4: 10 cells"), None);
        assert_eq!(parse_phase("sfmpirun: [junk s] x"), None);
    }

    #[test]
    fn the_program_uses_the_demo_binary_and_collectives() {
        for needle in ["sf-swdemo share", "sf-swdemo merge", "MPI_Gatherv"] {
            assert!(SWDEMO_MPI_C.contains(needle), "{needle}");
        }
    }
}
