//! Error answers on the admin and cluster channels.

use crate::lifecycle::DaemonError;
use snowflock_proto::admin::{AdminErrorCode as C, AdminResponse};
use snowflock_proto::error::chain;

pub fn err(code: C, e: impl std::fmt::Display) -> AdminResponse {
    AdminResponse::Error {
        code,
        message: e.to_string(),
    }
}

/// The admin answer for a failed VM operation.
pub fn daemon_err(e: DaemonError) -> AdminResponse {
    let code = match &e {
        DaemonError::NoSuchVm(_) => C::NotFound,
        DaemonError::VmExists(_) => C::AlreadyExists,
        DaemonError::BadRequest(_) => C::BadRequest,
        DaemonError::Image(_) => C::BadImage,
        DaemonError::NoCapacity(_) => C::Unavailable,
        _ => C::Failed,
    };
    err(code, chain(&e))
}
