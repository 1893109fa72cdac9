//! C ABI of `libsnowflock.so`; see `include/snowflock.h`.
//!
//! Every function catches panics (none are expected) so that no unwind
//! crosses the FFI boundary, checks its pointers, and on failure returns -1
//! and records a message that [`sf_last_error`] returns on the same thread.

use crate::client::{self, ChildState, SfError};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Size of `sf_ticket_t::id`, NUL included.
pub const SF_TICKET_MAX: usize = 80;

/// `sf_ticket_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SfTicket {
    pub id: [c_char; SF_TICKET_MAX],
    pub granted: c_int,
}

/// `sf_child_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SfChild {
    pub clone_id: c_int,
    /// 0 running, 1 exited, 2 killed, 3 lost.
    pub state: c_int,
    /// Exit code for state 1, else 0.
    pub code: c_int,
}

const _: () = assert!(std::mem::size_of::<SfTicket>() == SF_TICKET_MAX + 4);
const _: () = assert!(std::mem::size_of::<SfChild>() == 12);

pub const SF_CHILD_RUNNING: c_int = 0;
pub const SF_CHILD_EXITED: c_int = 1;
pub const SF_CHILD_KILLED: c_int = 2;
pub const SF_CHILD_LOST: c_int = 3;

/// `sf_request_ticket_ex`'s `independent`: the host's default.
pub const SF_INDEPENDENT_DEFAULT: c_int = -1;
/// Fetch only what the clones read.
pub const SF_INDEPENDENT_NO: c_int = 0;
/// Fetch the whole clone point in the background.
pub const SF_INDEPENDENT_YES: c_int = 1;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Why a C API call failed; its text is what `sf_last_error` returns.
#[derive(Debug, thiserror::Error)]
enum CapiError {
    #[error("Null ticket pointer")]
    NullTicket,
    #[error("Null output pointer")]
    NullOutput,
    #[error("Ticket id is not NUL-terminated")]
    TicketNotTerminated,
    #[error("Ticket id is not valid UTF-8")]
    TicketNotUtf8,
    #[error("Ticket id {0:?} does not fit in sf_ticket_t")]
    TicketTooLong(String),
    #[error("Clone count must be positive, got {0}")]
    BadCount(c_int),
    #[error("independent must be -1 (the host's default), 0 or 1, got {0}")]
    BadIndependent(c_int),
    #[error("Negative max {0}")]
    NegativeMax(c_int),
    #[error("Too many children")]
    TooManyChildren,
    #[error("Value {0} does not fit in an int")]
    TooLarge(u32),
    #[error(transparent)]
    Sf(#[from] SfError),
}

/// Runs `f`; maps `Err` and panics to -1 with the message recorded.
fn guard(f: impl FnOnce() -> Result<c_int, CapiError>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_error(&snowflock_proto::error::chain(&e));
            -1
        }
        Err(_) => {
            set_error("Internal error in libsnowflock");
            -1
        }
    }
}

fn to_int(v: u32) -> Result<c_int, CapiError> {
    c_int::try_from(v).map_err(|_| CapiError::TooLarge(v))
}

/// Reads the ticket id out of `t`.
///
/// # Safety
/// `t` must be null or point to a readable `sf_ticket_t`.
unsafe fn ticket_id(t: *const SfTicket) -> Result<String, CapiError> {
    if t.is_null() {
        return Err(CapiError::NullTicket);
    }
    // SAFETY: the caller guarantees `t` points to a readable sf_ticket_t.
    let id = unsafe { &(*t).id };
    let bytes: Vec<u8> = id
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    if bytes.len() == SF_TICKET_MAX {
        return Err(CapiError::TicketNotTerminated);
    }
    String::from_utf8(bytes).map_err(|_| CapiError::TicketNotUtf8)
}

/// `int sf_request_ticket(int n, sf_ticket_t *out)`: the granted count.
///
/// # Safety
/// `out` must be null or point to a writable `sf_ticket_t`.
#[no_mangle]
pub unsafe extern "C" fn sf_request_ticket(n: c_int, out: *mut SfTicket) -> c_int {
    // SAFETY: the caller's guarantee on `out` is the one required here.
    unsafe { sf_request_ticket_ex(n, SF_INDEPENDENT_DEFAULT, out) }
}

/// `int sf_request_ticket_ex(int n, int independent, sf_ticket_t *out)`:
/// the granted count; `independent` is one of `SF_INDEPENDENT_*`.
///
/// # Safety
/// `out` must be null or point to a writable `sf_ticket_t`.
#[no_mangle]
pub unsafe extern "C" fn sf_request_ticket_ex(
    n: c_int,
    independent: c_int,
    out: *mut SfTicket,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(CapiError::NullOutput);
        }
        let n = u32::try_from(n).map_err(|_| CapiError::BadCount(n))?;
        let independent = match independent {
            SF_INDEPENDENT_DEFAULT => None,
            SF_INDEPENDENT_NO => Some(false),
            SF_INDEPENDENT_YES => Some(true),
            other => return Err(CapiError::BadIndependent(other)),
        };
        let t = client::request_ticket_with(n, client::TicketOptions { independent })?;
        if t.id.len() >= SF_TICKET_MAX || t.id.as_bytes().contains(&0) {
            return Err(CapiError::TicketTooLong(t.id));
        }
        let mut ticket = SfTicket {
            id: [0; SF_TICKET_MAX],
            granted: to_int(t.granted)?,
        };
        for (d, s) in ticket.id.iter_mut().zip(t.id.bytes()) {
            *d = s as c_char;
        }
        // SAFETY: `out` is non-null and the caller guarantees it is writable.
        unsafe { out.write(ticket) };
        Ok(ticket.granted)
    })
}

/// `int sf_clone(const sf_ticket_t *t)`: 0 in the parent, the clone ID in clones.
///
/// # Safety
/// `t` must be null or point to a readable `sf_ticket_t`.
#[no_mangle]
pub unsafe extern "C" fn sf_clone(t: *const SfTicket) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let id = unsafe { ticket_id(t) }?;
        to_int(client::clone(&id)?)
    })
}

/// `void sf_exit(int status)`: ends this clone. Returns only on failure (for
/// example when called in the parent), with [`sf_last_error`] set.
#[no_mangle]
pub extern "C" fn sf_exit(status: c_int) {
    guard(|| match client::exit(status) {
        Ok(never) => match never {},
        Err(e) => Err(e.into()),
    });
}

fn child_of(c: &client::ChildStatus) -> Result<SfChild, CapiError> {
    let (state, code) = match &c.state {
        ChildState::Running => (SF_CHILD_RUNNING, 0),
        ChildState::Exited { code } => (SF_CHILD_EXITED, *code),
        ChildState::Killed => (SF_CHILD_KILLED, 0),
        ChildState::Lost { .. } => (SF_CHILD_LOST, 0),
    };
    Ok(SfChild {
        clone_id: to_int(c.clone_id)?,
        state,
        code,
    })
}

/// `int sf_join(const sf_ticket_t *t, sf_child_t *out, int max)`: waits for
/// every child; fills at most `max` entries of `out` and returns the number
/// of children (which may exceed `max`). `out` may be null when `max` is 0.
///
/// # Safety
/// `t` must be null or readable; `out` must be null or point to `max`
/// writable `sf_child_t`.
#[no_mangle]
pub unsafe extern "C" fn sf_join(t: *const SfTicket, out: *mut SfChild, max: c_int) -> c_int {
    // SAFETY: forwarded caller guarantee.
    guard(|| unsafe { children_call(t, out, max, client::join) })
}

/// `int sf_status(const sf_ticket_t *t, sf_child_t *out, int max)`: the
/// children now, without waiting; fills and returns like [`sf_join`]. The
/// ticket is kept.
///
/// # Safety
/// As for [`sf_join`].
#[no_mangle]
pub unsafe extern "C" fn sf_status(t: *const SfTicket, out: *mut SfChild, max: c_int) -> c_int {
    // SAFETY: forwarded caller guarantee.
    guard(|| unsafe { children_call(t, out, max, |id| Ok(client::status(id)?.1)) })
}

/// The body of the calls that answer with children: checks `out` and
/// `max` before `call` (which may wait), then writes at most `max`
/// children to `out` and returns how many there are.
///
/// # Safety
/// `t` must be null or readable; `out` must be null or point to `max`
/// writable `sf_child_t`.
unsafe fn children_call(
    t: *const SfTicket,
    out: *mut SfChild,
    max: c_int,
    call: impl FnOnce(&str) -> Result<Vec<client::ChildStatus>, client::SfError>,
) -> Result<c_int, CapiError> {
    if max < 0 {
        return Err(CapiError::NegativeMax(max));
    }
    if out.is_null() && max > 0 {
        return Err(CapiError::NullOutput);
    }
    // SAFETY: forwarded caller guarantee.
    let id = unsafe { ticket_id(t) }?;
    let children = call(&id)?;
    for (i, c) in children.iter().take(max as usize).enumerate() {
        let v = child_of(c)?;
        // SAFETY: i < max and the caller guarantees `max` writable entries.
        unsafe { out.add(i).write(v) };
    }
    c_int::try_from(children.len()).map_err(|_| CapiError::TooManyChildren)
}

/// `int sf_kill(const sf_ticket_t *t)`: ends every child now; returns the
/// number of children the kill ended (state killed).
///
/// # Safety
/// `t` must be null or point to a readable `sf_ticket_t`.
#[no_mangle]
pub unsafe extern "C" fn sf_kill(t: *const SfTicket) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let id = unsafe { ticket_id(t) }?;
        let children = client::kill(&id)?;
        let n = children
            .iter()
            .filter(|c| c.state == ChildState::Killed)
            .count();
        c_int::try_from(n).map_err(|_| CapiError::TooManyChildren)
    })
}

/// `int sf_id(void)`: this VM's clone ID.
#[no_mangle]
pub extern "C" fn sf_id() -> c_int {
    guard(|| to_int(client::id()?.clone_id))
}

/// `const char *sf_last_error(void)`: the message of this thread's last
/// error, "" if none. Valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn sf_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: sf_last_error returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(sf_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn null_pointers_are_errors() {
        // SAFETY: null pointers are explicitly allowed.
        unsafe {
            assert_eq!(sf_request_ticket(1, std::ptr::null_mut()), -1);
            assert_eq!(last(), "Null output pointer");
            assert_eq!(sf_clone(std::ptr::null()), -1);
            assert_eq!(last(), "Null ticket pointer");
            assert_eq!(sf_kill(std::ptr::null()), -1);
            let mut c = [SfChild::default(); 2];
            assert_eq!(sf_join(std::ptr::null(), c.as_mut_ptr(), 2), -1);
            assert_eq!(last(), "Null ticket pointer");
            let t = SfTicket {
                id: [b'a' as c_char; SF_TICKET_MAX],
                granted: 0,
            };
            assert_eq!(sf_join(&t, std::ptr::null_mut(), 1), -1);
            assert_eq!(last(), "Null output pointer");
            assert_eq!(sf_clone(&t), -1);
            assert_eq!(last(), "Ticket id is not NUL-terminated");
            assert_eq!(sf_request_ticket(-3, &mut { t }), -1);
            assert_eq!(last(), "Clone count must be positive, got -3");
            assert_eq!(sf_request_ticket_ex(1, 1, std::ptr::null_mut()), -1);
            assert_eq!(last(), "Null output pointer");
            assert_eq!(sf_request_ticket_ex(1, 2, &mut { t }), -1);
            assert_eq!(
                last(),
                "independent must be -1 (the host's default), 0 or 1, got 2"
            );
        }
    }

    #[test]
    fn last_error_is_per_thread() {
        set_error("mine");
        std::thread::spawn(|| assert_eq!(last(), ""))
            .join()
            .unwrap();
        assert_eq!(last(), "mine");
    }
}
