//! `libsnowflock_mpi_shim.so`, preloaded by `sfmpirun` into MPICH jobs.
//!
//! Debian 12's MPICH (4.0.2, `ch4:ucx`) ends `MPI_Finalize` by closing
//! every UCX endpoint with `ucp_disconnect_nb` (a flush close) and
//! progressing until all closes complete, then waits in a PMI barrier.
//! Over UCX's TCP transport (1.13) a flush close sends an empty PUT and
//! waits for the peer to acknowledge it, which needs the peer to make
//! progress. A peer whose own closes completed first is already blocked in
//! the PMI barrier and never answers: the job hangs with every rank in
//! `MPI_Finalize` and one spinning. Measured on three hosts: 4 of 6 runs of
//! a 4-rank ring hung. (MPICH 4.2 moves the barrier before the closes and
//! destroys the worker right after, which turns the hang into an error.)
//!
//! This shim answers `ucp_disconnect_nb` with "done" without closing:
//! `MPI_Finalize` goes straight to its barrier, and `ucp_worker_destroy`
//! then closes every endpoint. By the time a correct MPI program calls
//! `MPI_Finalize` its communication has completed, so nothing is lost;
//! with the shim the same ring ran 10 of 10 times. `ucp_disconnect_nb` is
//! UCX's deprecated close call; in MPICH it serves only `MPI_Finalize` and
//! `MPI_Comm_disconnect` (whose endpoints then stay open until the end).
//! Nothing else is touched, and a process that never loads UCX never calls
//! it.

use std::ffi::c_void;

/// Interposes UCX's `ucp_disconnect_nb(ep)`: returns `UCS_OK` (a null
/// status pointer: complete, no request to wait for) and leaves the
/// endpoint to `ucp_worker_destroy`.
#[no_mangle]
pub extern "C" fn ucp_disconnect_nb(_ep: *mut c_void) -> *mut c_void {
    std::ptr::null_mut()
}

#[cfg(test)]
mod tests {
    #[test]
    fn disconnect_is_complete_at_once() {
        let mut ep = 0u8;
        assert!(super::ucp_disconnect_nb((&mut ep as *mut u8).cast()).is_null());
    }
}
