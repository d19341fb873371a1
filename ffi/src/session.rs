//! `dls_session`: attaching, downloading, controlling tasks, waiting, detaching — each a
//! blocking call on [`dlsession::blocking::Session`].

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use dlsession::blocking::{DownloadTask, Session};
use dlsession::{ChallengeAnswer, Credential, CredentialScope, DownloadRequest, UploadMethod, UploadRequest};

use crate::args;
use crate::config::dls_config;
use crate::error::{Failure, call, call_new, dls_code, dls_error, guard};
use crate::event::{Delegate, Gate, dls_event_fn};

/// An attached background session. Its functions may be called from any thread, also at
/// the same time (except `dls_session_free`); each blocks until the daemon has answered.
#[derive(Debug)]
pub struct dls_session {
    session: Session,
    gate: Arc<Gate>,
}

/// Connects to the daemon (starting it if nothing listens and `DLSESSION_NO_AUTOSTART` is
/// not set) and attaches to the session of `config`, creating it or rejoining it. Events
/// queued while the app was away are delivered right after, maybe before this returns.
/// `config` is copied: free it when you like.
///
/// `on_event` may be NULL (no events; then give each download a destination, since a file
/// without one is deleted once finished). `user_data` is passed to every `on_event` call
/// and must stay valid until `dls_session_free` returns (see `dls_event_fn`).
///
/// Returns NULL on failure (`*err` says why: `DLS_INTERNAL` with "dlsessiond is not
/// running ..." when it cannot be reached, `DLS_SESSION_IN_USE` when another process is
/// attached, ...).
///
/// # Safety
///
/// `config` is NULL or a live configuration; `on_event` and `user_data` keep the rules of
/// `dls_event_fn`; `err` is NULL or points to a `dls_error*` to set on failure.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_session_attach(
    config: *const dls_config,
    on_event: dls_event_fn,
    user_data: *mut c_void,
    err: *mut *mut dls_error,
) -> *mut dls_session {
    call_new(err, || {
        // SAFETY: the caller's contract above.
        let config = unsafe { args::object(config, "config") }?;
        let hears_challenges = config.hears_challenges && on_event.is_some();
        let gate = Arc::new(Gate::new(on_event, user_data));
        let session = Session::attach(config.inner.clone(), Delegate { gate: gate.clone(), hears_challenges })?;
        Ok(Box::new(dls_session { session, gate }))
    })
}

/// Detaches and frees the session (NULL is fine). The daemon goes on with its tasks and
/// keeps the events not yet delivered for the next attach. Waits for a callback that is
/// running; no callback runs after this returns.
///
/// # Safety
///
/// `session` is NULL or a session from `dls_session_attach`, freed only once, not in use
/// by another thread, and not freed from its own callback.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_session_free(session: *mut dls_session) {
    if session.is_null() {
        return;
    }
    guard((), || {
        // SAFETY: a live session from `dls_session_attach` (the caller's contract). Only its
        // gate is read while a callback may still be calling functions with the session.
        let gate = unsafe { (*session).gate.clone() };
        // Freed once no callback runs, so none can be using the session as it goes; events
        // that were about to be delivered stay unacknowledged and come again.
        gate.close_and(|| {
            // SAFETY: a pointer from `Box::into_raw` in `dls_session_attach`, given back once.
            drop(unsafe { Box::from_raw(session) });
        });
    });
}

/// With `dls_download`: replace a file that already exists at the destination. Without
/// it, a file there already is `DLS_FILE_ERROR` at once, and one that appears while the task
/// runs keeps the finished download waiting (`destination_unavailable`, retried) rather
/// than being replaced.
pub const DLS_DOWNLOAD_OVERWRITE: u32 = 1;

/// Creates a download of `url` and starts it. `destination` (may be NULL) is where the
/// finished file goes; a relative path is taken from the current directory (leading `..`
/// climb from it; a `..` after a name is `DLS_INVALID_REQUEST`, as in any path). Without one,
/// the file is handed to the FINISHED_DOWNLOADING event to move. `flags`: 0, or
/// `DLS_DOWNLOAD_OVERWRITE`; other bits are `DLS_INVALID_ARGUMENT`. The new task's id goes
/// to `*task_id_out` (may be NULL).
///
/// # Safety
///
/// `session` is NULL or a live session; `url` and `destination` are NULL or NUL-terminated
/// strings; `task_id_out` is NULL or writable; `err` as for `dls_session_attach`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_download(
    session: *mut dls_session,
    url: *const c_char,
    destination: *const c_char,
    flags: u32,
    task_id_out: *mut u64,
    err: *mut *mut dls_error,
) -> dls_code {
    call(err, || {
        if flags & !DLS_DOWNLOAD_OVERWRITE != 0 {
            return Err(Failure::invalid(format!("flags {flags:#x}: only DLS_DOWNLOAD_OVERWRITE (1) is known")));
        }
        // SAFETY: the caller's contract above.
        let (session, url, destination) = unsafe {
            (
                args::object(session, "session")?,
                args::string(url, "url")?,
                args::optional_string(destination, "destination")?,
            )
        };
        let mut request = DownloadRequest::new(url);
        if let Some(destination) = destination {
            let absolute = args::absolute(destination, "destination")?;
            request = request.destination(absolute).overwrite(flags & DLS_DOWNLOAD_OVERWRITE != 0);
        }
        let id = only_id(&session.session.download_tasks(vec![request], true)?)?;
        // SAFETY: the caller's contract above.
        unsafe { args::put(task_id_out, id) };
        Ok(())
    })
}

/// The id of the one task a request of one created.
fn only_id(tasks: &[DownloadTask]) -> Result<u64, Failure> {
    tasks.first().map(DownloadTask::id).ok_or_else(|| Failure::internal("the daemon created no task"))
}

/// `flags` of `dls_upload`: the server takes a repeated POST as one, so a POST whose whole
/// body went out may be sent again after a failure (a PUT always may).
pub const DLS_UPLOAD_IDEMPOTENT: u32 = 1;

/// Creates an upload of the file at `path` to `url` and starts it: the file is the body of
/// a `PUT` (`method` NULL or "PUT") or a `POST` ("POST"; either in any case), with
/// `content_type` (may be NULL) as its `Content-Type`. The daemon records the file's size and modification time now: a
/// missing, unreadable or directory path is `DLS_FILE_ERROR` here, and a file changed
/// before it is sent fails the task. A relative path is taken from the current directory
/// (leading `..` climb from it).
/// `flags`: 0, or `DLS_UPLOAD_IDEMPOTENT`; other bits are `DLS_INVALID_ARGUMENT`. Events:
/// SENT while the body goes, UPLOAD_RESPONSE with the server's answer, then COMPLETED. The
/// new task's id goes to `*task_id_out` (may be NULL).
///
/// # Safety
///
/// `session` is NULL or a live session; `url`, `path`, `method` and `content_type` are NULL
/// or NUL-terminated strings; `task_id_out` is NULL or writable; `err` as for
/// `dls_session_attach`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_upload(
    session: *mut dls_session,
    url: *const c_char,
    path: *const c_char,
    method: *const c_char,
    content_type: *const c_char,
    flags: u32,
    task_id_out: *mut u64,
    err: *mut *mut dls_error,
) -> dls_code {
    call(err, || {
        if flags & !DLS_UPLOAD_IDEMPOTENT != 0 {
            return Err(Failure::invalid(format!("flags {flags:#x}: only DLS_UPLOAD_IDEMPOTENT (1) is known")));
        }
        // SAFETY: the caller's contract above.
        let (session, url, path, method, content_type) = unsafe {
            (
                args::object(session, "session")?,
                args::string(url, "url")?,
                args::string(path, "path")?,
                args::optional_string(method, "method")?,
                args::optional_string(content_type, "content_type")?,
            )
        };
        let method = match method.map(str::to_ascii_uppercase).as_deref() {
            None | Some("PUT") => UploadMethod::Put,
            Some("POST") => UploadMethod::Post,
            Some(other) => return Err(Failure::invalid(format!("method {other:?}: PUT or POST"))),
        };
        let file = args::absolute(path, "path")?;
        let mut request = UploadRequest::new(url, file).method(method).idempotent(flags & DLS_UPLOAD_IDEMPOTENT != 0);
        if let Some(content_type) = content_type {
            request = request.content_type(content_type);
        }
        let id = only_id(&session.session.upload_tasks(vec![request], true)?)?;
        // SAFETY: the caller's contract above.
        unsafe { args::put(task_id_out, id) };
        Ok(())
    })
}

/// `answer` of `dls_task_answer_challenge`: Basic credentials (`first` the user, `second`
/// the password).
pub const DLS_ANSWER_BASIC: c_int = 1;
/// A bearer token (`first`).
pub const DLS_ANSWER_BEARER: c_int = 2;
/// Any header (`first` its name, `second` its value; a `Proxy-*` header for a proxy).
pub const DLS_ANSWER_HEADER: c_int = 3;
/// Cancel the task (it completes with `DLS_CANCELLED`).
pub const DLS_ANSWER_CANCEL: c_int = 4;
/// No credentials: the task completes with the server's status (`DLS_HTTP_STATUS`).
pub const DLS_ANSWER_FAIL: c_int = 5;
/// `flags` of `dls_task_answer_challenge`: the credential serves every task of the session
/// asking that origin (its protection space), from their first request on; without it,
/// this task only.
pub const DLS_ANSWER_PROTECTION_SPACE: u32 = 1;
/// `flags`: the daemon keeps the credential in its database (else in memory only, gone
/// with a restart).
pub const DLS_ANSWER_KEEP: u32 = 2;

/// Answers the challenge `round` (from its `DLS_EVENT_CHALLENGE`) that task `task_id`
/// waits on, with `answer` (a `DLS_ANSWER_*`); `first` and `second` as each answer says
/// (NULL where it takes none), `flags` `DLS_ANSWER_PROTECTION_SPACE` and
/// `DLS_ANSWER_KEEP` for credentials (0 otherwise). May be called from the callback. An
/// answer to another round than the task's current one is `DLS_INVALID_REQUEST`; the
/// strings are copied, and the daemon never shows or logs them.
///
/// # Safety
///
/// `session` is NULL or a live session; `first` and `second` are NULL or NUL-terminated
/// strings; `err` as for `dls_session_attach`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn dls_task_answer_challenge(
    session: *mut dls_session,
    task_id: u64,
    round: u32,
    answer: c_int,
    first: *const c_char,
    second: *const c_char,
    flags: u32,
    err: *mut *mut dls_error,
) -> dls_code {
    call(err, || {
        if flags & !(DLS_ANSWER_PROTECTION_SPACE | DLS_ANSWER_KEEP) != 0 {
            return Err(Failure::invalid(format!(
                "flags {flags:#x}: only DLS_ANSWER_PROTECTION_SPACE (1) and DLS_ANSWER_KEEP (2) are known"
            )));
        }
        // SAFETY: the caller's contract above.
        let (session, first, second) = unsafe {
            (
                args::object(session, "session")?,
                args::optional_string(first, "first")?,
                args::optional_string(second, "second")?,
            )
        };
        let need = |s: Option<&str>, what: &str| {
            s.map(str::to_owned).ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
        };
        let credential = match answer {
            DLS_ANSWER_BASIC => {
                Some(Credential::Basic { user: need(first, "the user")?, password: need(second, "the password")? })
            }
            DLS_ANSWER_BEARER => Some(Credential::Bearer { token: need(first, "the token")? }),
            DLS_ANSWER_HEADER => Some(Credential::Header {
                name: need(first, "the header's name")?,
                value: need(second, "the header's value")?,
            }),
            DLS_ANSWER_CANCEL | DLS_ANSWER_FAIL => None,
            other => return Err(Failure::invalid(format!("answer {other}: not a DLS_ANSWER_* (1 to 5)"))),
        };
        let answer = match (credential, answer) {
            (Some(credential), _) => {
                let scope = if flags & DLS_ANSWER_PROTECTION_SPACE != 0 {
                    CredentialScope::ProtectionSpace
                } else {
                    CredentialScope::Task
                };
                ChallengeAnswer::Use { credential, scope, keep: flags & DLS_ANSWER_KEEP != 0 }
            }
            (None, _) if flags != 0 => {
                return Err(Failure::invalid(format!("flags {flags:#x}: only credentials take flags")));
            }
            (None, DLS_ANSWER_CANCEL) => ChallengeAnswer::Cancel,
            (None, _) => ChallengeAnswer::Fail,
        };
        session.session.task(task_id)?.answer_challenge_round(round, answer)?;
        Ok(())
    })
}

/// Runs `action` on task `task_id` of `session`.
///
/// # Safety
///
/// As `dls_task_resume`.
unsafe fn control(
    session: *mut dls_session,
    task_id: u64,
    err: *mut *mut dls_error,
    action: impl FnOnce(&DownloadTask) -> dlsession::Result<()>,
) -> dls_code {
    call(err, || {
        // SAFETY: the caller's contract.
        let session = unsafe { args::object(session, "session") }?;
        action(&session.session.task(task_id)?)?;
        Ok(())
    })
}

/// Starts (or continues) a suspended task.
///
/// # Safety
///
/// `session` is NULL or a live session; `err` as for `dls_session_attach`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_task_resume(
    session: *mut dls_session,
    task_id: u64,
    err: *mut *mut dls_error,
) -> dls_code {
    // SAFETY: the same contract.
    unsafe { control(session, task_id, err, DownloadTask::resume) }
}

/// Pauses a task, keeping its data.
///
/// # Safety
///
/// As `dls_task_resume`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_task_suspend(
    session: *mut dls_session,
    task_id: u64,
    err: *mut *mut dls_error,
) -> dls_code {
    // SAFETY: the same contract.
    unsafe { control(session, task_id, err, DownloadTask::suspend) }
}

/// Cancels a task: it completes with `DLS_CANCELLED`.
///
/// # Safety
///
/// As `dls_task_resume`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_task_cancel(
    session: *mut dls_session,
    task_id: u64,
    err: *mut *mut dls_error,
) -> dls_code {
    // SAFETY: the same contract.
    unsafe { control(session, task_id, err, DownloadTask::cancel) }
}

/// Waits until the session is idle: no task queued, running or waiting to retry or for an
/// answer to its challenge (suspended ones do not count), and every event delivered to the
/// callback and acknowledged. A task whose challenge is left unanswered does not count (it
/// waits for the app, not for time); once answered, in the callback or later, it counts until
/// it is done. `timeout_ms` < 0 waits for as long as it takes; it bounds the waiting, not a
/// look at the daemon under way (a round trip, bounded by the request timeout), so 0 asks
/// whether the session is idle now. `*idle_out` (may be NULL)
/// is true if it became idle, false if the time ran out (which is not an error).
///
/// # Safety
///
/// `session` is NULL or a live session; `idle_out` is NULL or writable; `err` as for
/// `dls_session_attach`. From the session's own callback it fails with
/// `DLS_INVALID_ARGUMENT` (it would wait for itself).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_session_wait_idle(
    session: *mut dls_session,
    timeout_ms: i64,
    idle_out: *mut bool,
    err: *mut *mut dls_error,
) -> dls_code {
    call(err, || {
        // SAFETY: the caller's contract above.
        let session = unsafe { args::object(session, "session") }?;
        if session.gate.is_inside() {
            // The session cannot become idle while its callback waits for it to.
            return Err(Failure::invalid("dls_session_wait_idle called from the session's own callback"));
        }
        let idle = match u64::try_from(timeout_ms) {
            Ok(ms) => session.session.wait_idle_for(Duration::from_millis(ms))?,
            Err(_) => session.session.wait_idle().map(|()| true)?,
        };
        // SAFETY: the caller's contract above.
        unsafe { args::put(idle_out, idle) };
        Ok(())
    })
}

const VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
    Ok(version) => version,
    Err(_) => c"unknown",
};

/// This library's version, e.g. "0.1.0" (a static string: never free it).
#[unsafe(no_mangle)]
pub extern "C" fn dls_version() -> *const c_char {
    guard(c"unknown", || VERSION).as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{dls_error_code, dls_error_free, dls_error_message};
    use std::ffi::c_int;
    use std::ptr;

    #[test]
    fn null_arguments_are_reported_not_crashed_on() {
        // SAFETY: every pointer is NULL or valid, as the contracts allow.
        unsafe {
            let mut err = ptr::null_mut();
            assert!(dls_session_attach(ptr::null(), None, ptr::null_mut(), &mut err).is_null());
            assert_eq!(dls_error_code(err), dls_code::DLS_INVALID_ARGUMENT as c_int);
            assert_eq!(CStr::from_ptr(dls_error_message(err)).to_str().unwrap(), "config is NULL");
            dls_error_free(err);

            let mut id = 42;
            let mut err = ptr::null_mut();
            let code = dls_download(ptr::null_mut(), c"http://127.0.0.1/".as_ptr(), ptr::null(), 0, &mut id, &mut err);
            assert_eq!(code, dls_code::DLS_INVALID_ARGUMENT);
            assert_eq!(CStr::from_ptr(dls_error_message(err)).to_str().unwrap(), "session is NULL");
            assert_eq!(id, 42, "nothing written on failure");
            dls_error_free(err);

            for code in [
                dls_task_resume(ptr::null_mut(), 1, ptr::null_mut()),
                dls_task_suspend(ptr::null_mut(), 1, ptr::null_mut()),
                dls_task_cancel(ptr::null_mut(), 1, ptr::null_mut()),
                dls_session_wait_idle(ptr::null_mut(), 0, ptr::null_mut(), ptr::null_mut()),
            ] {
                assert_eq!(code, dls_code::DLS_INVALID_ARGUMENT);
            }
            dls_session_free(ptr::null_mut());
        }
    }

    #[test]
    fn version_is_the_crate_version() {
        // SAFETY: a static NUL-terminated string.
        let version = unsafe { CStr::from_ptr(dls_version()) };
        assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }
}
