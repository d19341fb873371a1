//! Result codes, the error object, and the wrapper every exported function runs in (no
//! panic crosses into C; a failure lands in `*err`).

use std::ffi::{CStr, CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;

use dlsession::ErrorCode;

/// What a call returns: `DLS_OK` (0) or why it failed.
///
/// The numbers are stable. 1 to 99 are the daemon's error codes (docs/protocol.md,
/// "Error codes"), in the order of the protocol plus one: new codes are only ever added
/// at the end. 100 and up are this library's own.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum dls_code {
    /// Success.
    DLS_OK = 0,
    /// invalid_url: the URL does not parse.
    DLS_INVALID_URL = 1,
    /// unsupported_scheme: only http and https are downloaded.
    DLS_UNSUPPORTED_SCHEME = 2,
    /// invalid_identifier: a session identifier the daemon refuses.
    DLS_INVALID_IDENTIFIER = 3,
    /// invalid_request: the daemon refused the request (say, a relative destination).
    DLS_INVALID_REQUEST = 4,
    /// session_in_use: another process is attached to the session.
    DLS_SESSION_IN_USE = 5,
    /// no_such_session.
    DLS_NO_SUCH_SESSION = 6,
    /// no_such_task.
    DLS_NO_SUCH_TASK = 7,
    /// session_invalidated: the session takes no new tasks.
    DLS_SESSION_INVALIDATED = 8,
    /// http_status: the server answered with an error status (see `http_status`).
    DLS_HTTP_STATUS = 9,
    /// network: connecting or reading failed.
    DLS_NETWORK = 10,
    /// tls: the TLS handshake or certificate check failed.
    DLS_TLS = 11,
    /// timed_out.
    DLS_TIMED_OUT = 12,
    /// too_many_redirects.
    DLS_TOO_MANY_REDIRECTS = 13,
    /// cannot_resume: the server changed the file or refused the range.
    DLS_CANNOT_RESUME = 14,
    /// checksum_mismatch: the file does not have the expected SHA-256.
    DLS_CHECKSUM_MISMATCH = 15,
    /// insufficient_space.
    DLS_INSUFFICIENT_SPACE = 16,
    /// file_error: writing or moving the file failed.
    DLS_FILE_ERROR = 17,
    /// cancelled.
    DLS_CANCELLED = 18,
    /// protocol_version: the daemon speaks another protocol version.
    DLS_PROTOCOL_VERSION = 19,
    /// permission_denied.
    DLS_PERMISSION_DENIED = 20,
    /// internal: a bug, or the daemon could not be reached (see the message).
    DLS_INTERNAL = 21,
    /// storage_full: the daemon's state directory refuses writes for now.
    DLS_STORAGE_FULL = 22,
    /// destination_unavailable: the finished file could not be moved; the data is kept.
    DLS_DESTINATION_UNAVAILABLE = 23,
    /// not_connected: no route to the server, and the session does not wait for one.
    DLS_NOT_CONNECTED = 24,
    /// shutting_down: the daemon was stopping and did not come back within the request
    /// timeout; the request was not run (the library sends it again when it comes back).
    DLS_SHUTTING_DOWN = 25,
    /// A bad argument from the caller: NULL where a value is needed, a string that is
    /// not UTF-8. Nothing was sent to the daemon.
    DLS_INVALID_ARGUMENT = 100,
}

impl dls_code {
    /// Every code, `DLS_OK` first.
    pub(crate) const ALL: [dls_code; 27] = [
        dls_code::DLS_OK,
        dls_code::DLS_INVALID_URL,
        dls_code::DLS_UNSUPPORTED_SCHEME,
        dls_code::DLS_INVALID_IDENTIFIER,
        dls_code::DLS_INVALID_REQUEST,
        dls_code::DLS_SESSION_IN_USE,
        dls_code::DLS_NO_SUCH_SESSION,
        dls_code::DLS_NO_SUCH_TASK,
        dls_code::DLS_SESSION_INVALIDATED,
        dls_code::DLS_HTTP_STATUS,
        dls_code::DLS_NETWORK,
        dls_code::DLS_TLS,
        dls_code::DLS_TIMED_OUT,
        dls_code::DLS_TOO_MANY_REDIRECTS,
        dls_code::DLS_CANNOT_RESUME,
        dls_code::DLS_CHECKSUM_MISMATCH,
        dls_code::DLS_INSUFFICIENT_SPACE,
        dls_code::DLS_FILE_ERROR,
        dls_code::DLS_CANCELLED,
        dls_code::DLS_PROTOCOL_VERSION,
        dls_code::DLS_PERMISSION_DENIED,
        dls_code::DLS_INTERNAL,
        dls_code::DLS_STORAGE_FULL,
        dls_code::DLS_DESTINATION_UNAVAILABLE,
        dls_code::DLS_NOT_CONNECTED,
        dls_code::DLS_SHUTTING_DOWN,
        dls_code::DLS_INVALID_ARGUMENT,
    ];

    /// No wildcard arm: a new `ErrorCode` does not compile until it has a number here.
    pub(crate) fn from_error_code(code: ErrorCode) -> dls_code {
        match code {
            ErrorCode::InvalidUrl => dls_code::DLS_INVALID_URL,
            ErrorCode::UnsupportedScheme => dls_code::DLS_UNSUPPORTED_SCHEME,
            ErrorCode::InvalidIdentifier => dls_code::DLS_INVALID_IDENTIFIER,
            ErrorCode::InvalidRequest => dls_code::DLS_INVALID_REQUEST,
            ErrorCode::SessionInUse => dls_code::DLS_SESSION_IN_USE,
            ErrorCode::NoSuchSession => dls_code::DLS_NO_SUCH_SESSION,
            ErrorCode::NoSuchTask => dls_code::DLS_NO_SUCH_TASK,
            ErrorCode::SessionInvalidated => dls_code::DLS_SESSION_INVALIDATED,
            ErrorCode::HttpStatus => dls_code::DLS_HTTP_STATUS,
            ErrorCode::Network => dls_code::DLS_NETWORK,
            ErrorCode::Tls => dls_code::DLS_TLS,
            ErrorCode::TimedOut => dls_code::DLS_TIMED_OUT,
            ErrorCode::TooManyRedirects => dls_code::DLS_TOO_MANY_REDIRECTS,
            ErrorCode::CannotResume => dls_code::DLS_CANNOT_RESUME,
            ErrorCode::ChecksumMismatch => dls_code::DLS_CHECKSUM_MISMATCH,
            ErrorCode::InsufficientSpace => dls_code::DLS_INSUFFICIENT_SPACE,
            ErrorCode::FileError => dls_code::DLS_FILE_ERROR,
            ErrorCode::Cancelled => dls_code::DLS_CANCELLED,
            ErrorCode::ProtocolVersion => dls_code::DLS_PROTOCOL_VERSION,
            ErrorCode::PermissionDenied => dls_code::DLS_PERMISSION_DENIED,
            ErrorCode::Internal => dls_code::DLS_INTERNAL,
            ErrorCode::StorageFull => dls_code::DLS_STORAGE_FULL,
            ErrorCode::DestinationUnavailable => dls_code::DLS_DESTINATION_UNAVAILABLE,
            ErrorCode::NotConnected => dls_code::DLS_NOT_CONNECTED,
            ErrorCode::ShuttingDown => dls_code::DLS_SHUTTING_DOWN,
        }
    }

    /// The stable snake_case name (the daemon's own for its codes).
    pub(crate) fn name(self) -> &'static CStr {
        match self {
            dls_code::DLS_OK => c"ok",
            dls_code::DLS_INVALID_URL => c"invalid_url",
            dls_code::DLS_UNSUPPORTED_SCHEME => c"unsupported_scheme",
            dls_code::DLS_INVALID_IDENTIFIER => c"invalid_identifier",
            dls_code::DLS_INVALID_REQUEST => c"invalid_request",
            dls_code::DLS_SESSION_IN_USE => c"session_in_use",
            dls_code::DLS_NO_SUCH_SESSION => c"no_such_session",
            dls_code::DLS_NO_SUCH_TASK => c"no_such_task",
            dls_code::DLS_SESSION_INVALIDATED => c"session_invalidated",
            dls_code::DLS_HTTP_STATUS => c"http_status",
            dls_code::DLS_NETWORK => c"network",
            dls_code::DLS_TLS => c"tls",
            dls_code::DLS_TIMED_OUT => c"timed_out",
            dls_code::DLS_TOO_MANY_REDIRECTS => c"too_many_redirects",
            dls_code::DLS_CANNOT_RESUME => c"cannot_resume",
            dls_code::DLS_CHECKSUM_MISMATCH => c"checksum_mismatch",
            dls_code::DLS_INSUFFICIENT_SPACE => c"insufficient_space",
            dls_code::DLS_FILE_ERROR => c"file_error",
            dls_code::DLS_CANCELLED => c"cancelled",
            dls_code::DLS_PROTOCOL_VERSION => c"protocol_version",
            dls_code::DLS_PERMISSION_DENIED => c"permission_denied",
            dls_code::DLS_INTERNAL => c"internal",
            dls_code::DLS_STORAGE_FULL => c"storage_full",
            dls_code::DLS_DESTINATION_UNAVAILABLE => c"destination_unavailable",
            dls_code::DLS_NOT_CONNECTED => c"not_connected",
            dls_code::DLS_SHUTTING_DOWN => c"shutting_down",
            dls_code::DLS_INVALID_ARGUMENT => c"invalid_argument",
        }
    }
}

/// The stable snake_case name of a `dls_code` ("ok", "http_status", "invalid_argument",
/// ...), or "unknown" for a number that is none. The string is static: never free it.
#[unsafe(no_mangle)]
pub extern "C" fn dls_code_name(code: c_int) -> *const c_char {
    let name = guard(None, || dls_code::ALL.into_iter().find(|c| *c as c_int == code).map(dls_code::name));
    name.unwrap_or(c"unknown").as_ptr()
}

/// An error: its code and a message for people. Created by a failing call through its
/// `dls_error** err` argument; free it with `dls_error_free`.
#[derive(Debug)]
pub struct dls_error {
    code: dls_code,
    message: CString,
}

/// The `dls_code` of `error` (`DLS_INVALID_ARGUMENT` if `error` is NULL).
///
/// # Safety
///
/// `error` is NULL or an error from this library not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_error_code(error: *const dls_error) -> c_int {
    guard(dls_code::DLS_INTERNAL as c_int, || {
        // SAFETY: the caller passes NULL or a live error made by `Failure::store`.
        let code = unsafe { error.as_ref() }.map_or(dls_code::DLS_INVALID_ARGUMENT, |e| e.code);
        code as c_int
    })
}

/// The message of `error` (say, "http_status: 404 Not Found"), valid until the error is
/// freed; NULL if `error` is NULL.
///
/// # Safety
///
/// `error` is NULL or an error from this library not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_error_message(error: *const dls_error) -> *const c_char {
    guard(ptr::null(), || {
        // SAFETY: the caller passes NULL or a live error made by `Failure::store`.
        unsafe { error.as_ref() }.map_or(ptr::null(), |e| e.message.as_ptr())
    })
}

/// Frees an error (NULL is fine).
///
/// # Safety
///
/// `error` is NULL or an error from this library, freed only once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_error_free(error: *mut dls_error) {
    if error.is_null() {
        return;
    }
    guard((), || {
        // SAFETY: the caller gives back a pointer from `Box::into_raw` in `Failure::store`,
        // once.
        drop(unsafe { Box::from_raw(error) });
    });
}

/// Why a call failed, before it becomes a `dls_error`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: dls_code,
    pub(crate) message: String,
}

impl Failure {
    /// Bad input from C.
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure { code: dls_code::DLS_INVALID_ARGUMENT, message: message.into() }
    }

    pub(crate) fn internal(message: impl Into<String>) -> Failure {
        Failure { code: dls_code::DLS_INTERNAL, message: message.into() }
    }

    /// Hands the failure to C through `err` (when it is not NULL) and returns its code.
    fn store(self, err: *mut *mut dls_error) -> dls_code {
        if !err.is_null() {
            let error = Box::new(dls_error { code: self.code, message: c_string(&self.message) });
            // SAFETY: `err` is not NULL, and the caller promises it points to a writable
            // `dls_error*`.
            unsafe { err.write(Box::into_raw(error)) };
        }
        self.code
    }
}

impl From<dlsession::Error> for Failure {
    fn from(e: dlsession::Error) -> Failure {
        Failure { code: dls_code::from_error_code(e.code()), message: e.to_string() }
    }
}

/// A C string of `s`; an interior NUL (never expected in what the daemon sends, but the
/// text is not ours) becomes U+FFFD rather than cutting the string or failing.
pub(crate) fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{FFFD}")).unwrap_or_default()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("unknown panic");
    format!("internal: dlsession panicked: {what}")
}

/// Runs the body of a function that cannot report errors: `fallback` if it panics. Even
/// bodies that cannot panic run under it, so the rule has no exceptions to check.
pub(crate) fn guard<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// Runs the body of a function that returns a `dls_code`: a failure or a panic is stored
/// in `err` and returned as its code.
pub(crate) fn call(err: *mut *mut dls_error, body: impl FnOnce() -> Result<(), Failure>) -> dls_code {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => dls_code::DLS_OK,
        Ok(Err(failure)) => failure.store(err),
        Err(panic) => Failure::internal(panic_message(&*panic)).store(err),
    }
}

/// Runs the body of a function that returns a new object: NULL on failure or panic (stored
/// in `err`).
pub(crate) fn call_new<T>(err: *mut *mut dls_error, body: impl FnOnce() -> Result<Box<T>, Failure>) -> *mut T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(object)) => Box::into_raw(object),
        Ok(Err(failure)) => {
            failure.store(err);
            ptr::null_mut()
        }
        Err(panic) => {
            Failure::internal(panic_message(&*panic)).store(err);
            ptr::null_mut()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_protocol_order_and_names() {
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            let ours = dls_code::from_error_code(code);
            assert_eq!(ours as usize, i + 1, "{code} is number {} plus one", i);
            assert_eq!(ours.name().to_str().unwrap(), code.as_str());
            // SAFETY: dls_code_name returns a static NUL-terminated string.
            let by_number = unsafe { CStr::from_ptr(dls_code_name(ours as c_int)) };
            assert_eq!(by_number.to_str().unwrap(), code.as_str());
        }
        assert_eq!(dls_code::ALL.len(), ErrorCode::ALL.len() + 2, "every daemon code, OK and INVALID_ARGUMENT");
        assert!(dls_code::ALL.iter().all(|c| (*c as i32) < 100 || *c == dls_code::DLS_INVALID_ARGUMENT));
        // SAFETY: static strings, as above.
        let (ok, unknown) = unsafe { (CStr::from_ptr(dls_code_name(0)), CStr::from_ptr(dls_code_name(-7))) };
        assert_eq!((ok.to_str().unwrap(), unknown.to_str().unwrap()), ("ok", "unknown"));
    }

    #[test]
    fn client_errors_keep_their_code_and_message() {
        let e = dlsession::Error::Daemon(dlsession::ErrorInfo::http(404, "404 Not Found"));
        let failure = Failure::from(e);
        assert_eq!(failure.code, dls_code::DLS_HTTP_STATUS);
        assert_eq!(failure.message, "http_status: 404 Not Found");
    }

    #[test]
    fn a_failure_reaches_c_and_is_freed() {
        let mut err: *mut dls_error = ptr::null_mut();
        let code = call(&mut err, || Err(Failure::invalid("bad\0input")));
        assert_eq!(code, dls_code::DLS_INVALID_ARGUMENT);
        // SAFETY: `err` was just set to a live error.
        unsafe {
            assert_eq!(dls_error_code(err), dls_code::DLS_INVALID_ARGUMENT as c_int);
            assert_eq!(CStr::from_ptr(dls_error_message(err)).to_str().unwrap(), "bad\u{FFFD}input");
            dls_error_free(err);
            dls_error_free(ptr::null_mut());
            assert_eq!(dls_error_code(ptr::null()), dls_code::DLS_INVALID_ARGUMENT as c_int);
            assert!(dls_error_message(ptr::null()).is_null());
        }
        // A NULL `err` is fine: only the code comes back.
        assert_eq!(call(ptr::null_mut(), || Err(Failure::internal("x"))), dls_code::DLS_INTERNAL);
    }

    #[test]
    fn a_panic_becomes_internal() {
        let mut err: *mut dls_error = ptr::null_mut();
        let code = call(&mut err, || panic!("boom"));
        assert_eq!(code, dls_code::DLS_INTERNAL);
        // SAFETY: `err` was just set to a live error.
        unsafe {
            let message = CStr::from_ptr(dls_error_message(err)).to_str().unwrap().to_owned();
            assert!(message.contains("boom"), "{message}");
            dls_error_free(err);
        }
    }
}
