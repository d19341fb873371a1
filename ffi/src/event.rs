//! Events for C: the `dls_event` struct, the callback type, and the [`SessionDelegate`]
//! that turns each delegate call into one callback.

use std::cell::Cell;
use std::ffi::{CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use dlsession::{
    Challenge, ChallengeAnswer, DetachReason, DownloadTask, Handled, Session, SessionDelegate, TaskError,
    UploadResponse,
};

use crate::error::{c_string, dls_code};

/// What a `dls_event` reports.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum dls_event_kind {
    /// Bytes arrived: `bytes_written` since the last progress event of the task,
    /// `total_bytes_written` so far, `total_bytes_expected` (-1 if unknown). Coalesced: at
    /// most one per task per progress interval, plus one at the end.
    DLS_EVENT_PROGRESS = 1,
    /// A transfer (re)started at `offset` (0: it had to start over); `total_bytes_expected`
    /// is the file's size (-1 if unknown).
    DLS_EVENT_RESUMED = 2,
    /// The file is complete at `location`. Move it before the callback returns if the task
    /// had no destination: afterwards the daemon deletes what is left in its cache.
    DLS_EVENT_FINISHED_DOWNLOADING = 3,
    /// The task's last event: `error_code` is `DLS_OK` on success, else why it failed (with
    /// `error_message`, and `http_status` for `DLS_HTTP_STATUS`).
    DLS_EVENT_COMPLETED = 4,
    /// Every event delivered in this attachment is handled and acknowledged (after
    /// rejoining, or when the session's last task completed): the app may rest or exit.
    DLS_EVENT_FINISHED_EVENTS = 5,
    /// The session was invalidated (`error_code`/`error_message` say why, if it was not the
    /// app's own request).
    DLS_EVENT_BECAME_INVALID = 6,
    /// This process is no longer attached: `error_message` is the reason ("taken_over",
    /// with `error_code` `DLS_SESSION_IN_USE`; "invalidated"). A daemon that stops is not a
    /// detach: the app gets CONNECTION_LOST, then RECONNECTED once it is back.
    DLS_EVENT_DETACHED = 7,
    /// The connection to the daemon broke (`error_message` says why); the library connects
    /// again by itself and events not yet acknowledged come again.
    DLS_EVENT_CONNECTION_LOST = 8,
    /// Connected again and rejoined.
    DLS_EVENT_RECONNECTED = 9,
    /// An upload's body is going out: `bytes_written` sent since the task's last SENT
    /// event, `total_bytes_written` so far, `total_bytes_expected` the file's size.
    /// Coalesced like PROGRESS.
    DLS_EVENT_SENT = 10,
    /// An upload's final response: `http_status` its status, `response_headers` its headers,
    /// `location` a file holding its body (at most 1 MiB of it; `body_truncated` 1 if the
    /// body was longer). Read the file before the callback returns: afterwards the daemon
    /// deletes it. COMPLETED follows (with `DLS_HTTP_STATUS` unless the status was 2xx).
    DLS_EVENT_UPLOAD_RESPONSE = 11,
    /// A server (or proxy) asks for credentials, in a session that answers challenges
    /// (`dls_config_set_answers_challenges`): `challenge_scheme`, `challenge_realm` (may be
    /// NULL), `challenge_origin` (`scheme://host:port` of who asks), `challenge_proxy`,
    /// `challenge_round`. The task waits: answer with `dls_task_answer_challenge`, in the
    /// callback or later. Unanswered, the event comes again at the next attach.
    DLS_EVENT_CHALLENGE = 12,
}

/// One event of a session, as the callback receives it. Fields that do not apply to the
/// kind are 0 (the byte counts and `task_id`), -1 (`total_bytes_expected`) or NULL.
///
/// Every pointer in it, and the struct itself, is valid only during the callback: copy
/// what you keep.
#[repr(C)]
#[derive(Debug)]
pub struct dls_event {
    /// What happened.
    pub kind: dls_event_kind,
    /// The task (0 for session events: FINISHED_EVENTS, BECAME_INVALID, DETACHED,
    /// CONNECTION_LOST, RECONNECTED).
    pub task_id: u64,
    /// PROGRESS: bytes since the task's last progress event; SENT: bytes sent since its
    /// last SENT event.
    pub bytes_written: i64,
    /// PROGRESS: bytes of the file so far; SENT: bytes of the upload's body sent so far.
    pub total_bytes_written: i64,
    /// PROGRESS, RESUMED: the file's size (-1 if unknown); SENT: the upload's size.
    pub total_bytes_expected: i64,
    /// RESUMED: where the transfer continues.
    pub offset: i64,
    /// FINISHED_DOWNLOADING: the finished file (its destination, if the task had one);
    /// UPLOAD_RESPONSE: the file holding the response's body; else NULL.
    pub location: *const c_char,
    /// A `dls_code`: `DLS_OK`, or the error of COMPLETED, BECAME_INVALID, DETACHED.
    pub error_code: c_int,
    /// The HTTP status when `error_code` is `DLS_HTTP_STATUS`; UPLOAD_RESPONSE: the
    /// response's status; else 0.
    pub http_status: c_int,
    /// The error's message, or the reason of DETACHED and CONNECTION_LOST; NULL if none.
    pub error_message: *const c_char,
    /// The session's identifier.
    pub session_identifier: *const c_char,
    /// UPLOAD_RESPONSE: 1 if the body was longer than its file holds, else 0.
    pub body_truncated: c_int,
    /// UPLOAD_RESPONSE: the response's headers, one `name: value` per line (`\n`; names
    /// lower-case); else NULL.
    pub response_headers: *const c_char,
    /// CHALLENGE: the scheme asked for (`Basic`, `Bearer`, …); else NULL.
    pub challenge_scheme: *const c_char,
    /// CHALLENGE: its realm; NULL if none.
    pub challenge_realm: *const c_char,
    /// CHALLENGE: who asks, `scheme://host:port`; else NULL.
    pub challenge_origin: *const c_char,
    /// CHALLENGE: 1 if a proxy asks (407), 0 if the server (401).
    pub challenge_proxy: c_int,
    /// CHALLENGE: 1 for the task's first; name it when answering.
    pub challenge_round: u32,
}

/// The event callback given to `dls_session_attach`.
///
/// - Callbacks run one at a time, in event order, on the session's own thread (never the
///   thread that called into the library). They may block (moving a large file is fine),
///   but the session's later events wait meanwhile.
/// - `event` and every string in it are valid only during the call: copy what you keep.
/// - FINISHED_DOWNLOADING: move the file before returning (if the task had no
///   destination); afterwards the daemon deletes it, unless the callback called
///   `dls_event_keep` (it could not move it): then it stays and comes again.
/// - It must return normally: throwing a C++ exception or `longjmp`ing out of it is
///   undefined behaviour.
/// - An event is acknowledged to the daemon after its callback returns; a process that
///   dies first gets it again on its next attach, so handle events idempotently.
/// - The callback may call `dls_download`, `dls_upload` and the `dls_task_*` functions
///   (`dls_task_answer_challenge` too), but must not
///   call `dls_session_free` on its own session. `dls_session_wait_idle` on its own
///   session fails with `DLS_INVALID_ARGUMENT` there (it cannot become idle while its
///   callback waits).
/// - `user_data` is passed back untouched; it must stay valid until `dls_session_free`
///   returns.
pub type dls_event_fn = Option<unsafe extern "C" fn(event: *const dls_event, user_data: *mut c_void)>;

/// The app's callback and its `user_data`.
#[derive(Debug)]
struct Callback {
    f: unsafe extern "C" fn(*const dls_event, *mut c_void),
    user_data: *mut c_void,
}

// SAFETY: the pointer is only handed back to the app's callback, which the app wrote to
// run on the session's thread (documented at `dls_event_fn`); Rust never dereferences it.
unsafe impl Send for Callback {}
// SAFETY: as above; the callback is only ever called under `Gate::running`, one at a time.
unsafe impl Sync for Callback {}

/// Lets callbacks through until the session is freed; freeing waits for a running one.
#[derive(Debug)]
pub(crate) struct Gate {
    callback: Option<Callback>,
    closed: AtomicBool,
    /// Held while a callback runs.
    running: Mutex<()>,
}

thread_local! {
    /// The gate whose callback this thread is running, if any: `close` from inside it must
    /// not wait for itself.
    static INSIDE: Cell<*const Gate> = const { Cell::new(ptr::null()) };
    /// While a FINISHED_DOWNLOADING or UPLOAD_RESPONSE callback runs on this thread: whether
    /// it called `dls_event_keep`.
    static KEEP: Cell<Option<bool>> = const { Cell::new(None) };
}

/// A FINISHED_DOWNLOADING or UPLOAD_RESPONSE callback on its way: `dls_event_keep` may be
/// called until it is dropped (also when the delivery unwinds).
struct Asking;

impl Asking {
    fn start() -> Asking {
        KEEP.with(|keep| keep.set(Some(false)));
        Asking
    }

    fn kept(self) -> bool {
        KEEP.with(Cell::get) == Some(true)
    }
}

impl Drop for Asking {
    fn drop(&mut self) {
        KEEP.with(|keep| keep.set(None));
    }
}

/// Keeps the file of the FINISHED_DOWNLOADING event (or the response body of the
/// UPLOAD_RESPONSE event) being delivered: called from its callback when the file could not
/// be moved (`rename` failed with `EXDEV`, `ENOSPC`, `EACCES`…). The event is then not
/// acknowledged: the file stays in the daemon's cache and the event (with the task's later
/// ones) comes again on the next attach. Anywhere else (another event's callback, outside a
/// callback) it is `DLS_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `event` is NULL or the event passed to the running callback; `err` as for
/// `dls_session_attach`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_event_keep(event: *const dls_event, err: *mut *mut crate::error::dls_error) -> dls_code {
    crate::error::call(err, || {
        // SAFETY: the caller's contract.
        let event = unsafe { crate::args::object(event, "event") }?;
        let keepable = matches!(
            event.kind,
            dls_event_kind::DLS_EVENT_FINISHED_DOWNLOADING | dls_event_kind::DLS_EVENT_UPLOAD_RESPONSE
        );
        if !keepable || KEEP.with(Cell::get).is_none() {
            return Err(crate::error::Failure::invalid(
                "dls_event_keep: only from the callback of a FINISHED_DOWNLOADING or UPLOAD_RESPONSE event",
            ));
        }
        KEEP.with(|keep| keep.set(Some(true)));
        Ok(())
    })
}

impl Gate {
    pub(crate) fn new(f: dls_event_fn, user_data: *mut c_void) -> Gate {
        Gate { callback: f.map(|f| Callback { f, user_data }), closed: AtomicBool::new(false), running: Mutex::new(()) }
    }

    /// Calls the callback with `event`; false if the gate is closed (nothing was called).
    fn deliver(&self, event: &Event) -> bool {
        // A poisoned lock only means an earlier event's Rust code panicked: still usable.
        let _running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let Some(callback) = &self.callback else { return true };
        let raw = event.raw();
        INSIDE.with(|inside| inside.set(self));
        // SAFETY: `f` is the app's callback with the signature it declared; `raw` and the
        // strings it points to live until after the call; `user_data` is the app's own.
        unsafe { (callback.f)(&raw, callback.user_data) };
        INSIDE.with(|inside| inside.set(ptr::null()));
        true
    }

    /// Whether this thread is running this gate's callback right now.
    pub(crate) fn is_inside(&self) -> bool {
        INSIDE.with(|inside| ptr::eq(inside.get(), self))
    }

    /// Closes the gate, then runs `then` (freeing the session): a callback that is running
    /// is waited for first, and none starts afterwards (one about to start finds the gate
    /// closed). `then` runs outside the lock: freeing a session waits for the thread that
    /// delivers its events, which may be waiting for the lock to find the gate closed (held,
    /// that wait lasted the session's 5 s shutdown timeout). A callback closing its own gate
    /// is not waited for (it would wait for itself).
    pub(crate) fn close_and(&self, then: impl FnOnce()) {
        {
            let _running = (!self.is_inside()).then(|| self.running.lock().unwrap_or_else(PoisonError::into_inner));
            self.closed.store(true, Ordering::Release);
        }
        then();
    }
}

/// An event being built, owning its strings.
#[derive(Debug)]
struct Event {
    kind: dls_event_kind,
    task_id: u64,
    bytes_written: i64,
    total_bytes_written: i64,
    total_bytes_expected: i64,
    offset: i64,
    location: Option<CString>,
    error_code: dls_code,
    http_status: c_int,
    error_message: Option<CString>,
    session_identifier: CString,
    body_truncated: bool,
    response_headers: Option<CString>,
    challenge: Option<ChallengeText>,
}

/// A challenge's strings for C.
#[derive(Debug)]
struct ChallengeText {
    scheme: CString,
    realm: Option<CString>,
    origin: CString,
    proxy: bool,
    round: u32,
}

/// Byte counts for C: `i64`, saturating (no file is 8 EiB).
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn expected(n: Option<u64>) -> i64 {
    n.map_or(-1, count)
}

impl Event {
    fn new(kind: dls_event_kind, session: &Session, task: Option<&DownloadTask>) -> Event {
        Event {
            kind,
            task_id: task.map_or(0, DownloadTask::id),
            bytes_written: 0,
            total_bytes_written: 0,
            total_bytes_expected: -1,
            offset: 0,
            location: None,
            error_code: dls_code::DLS_OK,
            http_status: 0,
            error_message: None,
            session_identifier: c_string(session.identifier()),
            body_truncated: false,
            response_headers: None,
            challenge: None,
        }
    }

    fn error(mut self, error: Option<&TaskError>) -> Event {
        if let Some(e) = error {
            self.error_code = dls_code::from_error_code(e.code);
            self.http_status = e.http_status.map_or(0, c_int::from);
            self.error_message = Some(c_string(&e.message));
        }
        self
    }

    fn raw(&self) -> dls_event {
        let ptr = |s: &Option<CString>| s.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        dls_event {
            kind: self.kind,
            task_id: self.task_id,
            bytes_written: self.bytes_written,
            total_bytes_written: self.total_bytes_written,
            total_bytes_expected: self.total_bytes_expected,
            offset: self.offset,
            location: ptr(&self.location),
            error_code: self.error_code as c_int,
            http_status: self.http_status,
            error_message: ptr(&self.error_message),
            session_identifier: self.session_identifier.as_ptr(),
            body_truncated: c_int::from(self.body_truncated),
            response_headers: ptr(&self.response_headers),
            challenge_scheme: self.challenge.as_ref().map_or(ptr::null(), |c| c.scheme.as_ptr()),
            challenge_realm: self.challenge.as_ref().map_or(ptr::null(), |c| ptr(&c.realm)),
            challenge_origin: self.challenge.as_ref().map_or(ptr::null(), |c| c.origin.as_ptr()),
            challenge_proxy: self.challenge.as_ref().map_or(0, |c| c_int::from(c.proxy)),
            challenge_round: self.challenge.as_ref().map_or(0, |c| c.round),
        }
    }
}

/// The session delegate of a C app: every call becomes one `dls_event`.
#[derive(Debug)]
pub(crate) struct Delegate {
    pub(crate) gate: std::sync::Arc<Gate>,
    /// The app said it answers challenges (and has a callback): else they are answered
    /// `Fail` here, unseen.
    pub(crate) hears_challenges: bool,
}

impl Delegate {
    /// Delivers a durable event. Once the session is being freed the app cannot see it,
    /// so it must not be acknowledged: unwinding out of the callback makes the library
    /// leave it (and what follows) for the next attach, and detach. `resume_unwind` runs
    /// no panic hook: nothing is printed.
    fn durable(&self, e: &Event) {
        if !self.gate.deliver(e) {
            std::panic::resume_unwind(Box::new("the session is being freed"));
        }
    }
}

impl SessionDelegate for Delegate {
    fn did_write_data(
        &self,
        session: &Session,
        task: &DownloadTask,
        bytes_written: u64,
        total_bytes_written: u64,
        total_bytes_expected: Option<u64>,
    ) {
        let mut e = Event::new(dls_event_kind::DLS_EVENT_PROGRESS, session, Some(task));
        e.bytes_written = count(bytes_written);
        e.total_bytes_written = count(total_bytes_written);
        e.total_bytes_expected = expected(total_bytes_expected);
        self.gate.deliver(&e);
    }

    fn did_send_body_data(
        &self,
        session: &Session,
        task: &DownloadTask,
        bytes_sent: u64,
        total_bytes_sent: u64,
        total_bytes_expected_to_send: u64,
    ) {
        let mut e = Event::new(dls_event_kind::DLS_EVENT_SENT, session, Some(task));
        e.bytes_written = count(bytes_sent);
        e.total_bytes_written = count(total_bytes_sent);
        e.total_bytes_expected = count(total_bytes_expected_to_send);
        self.gate.deliver(&e);
    }

    fn upload_response(&self, session: &Session, task: &DownloadTask, response: &UploadResponse) -> Handled {
        let mut e = Event::new(dls_event_kind::DLS_EVENT_UPLOAD_RESPONSE, session, Some(task));
        e.http_status = c_int::from(response.status);
        e.location = Some(c_string(&response.body.to_string_lossy()));
        e.body_truncated = response.body_truncated;
        let headers: Vec<String> = response.headers.iter().map(|h| format!("{}: {}", h.name, h.value)).collect();
        e.response_headers = Some(c_string(&headers.join("\n")));
        let asking = Asking::start();
        self.durable(&e);
        if asking.kept() { Handled::Later } else { Handled::Done }
    }

    fn did_resume_at_offset(&self, session: &Session, task: &DownloadTask, offset: u64, expected_total: Option<u64>) {
        let mut e = Event::new(dls_event_kind::DLS_EVENT_RESUMED, session, Some(task));
        e.offset = count(offset);
        e.total_bytes_expected = expected(expected_total);
        self.durable(&e);
    }

    fn finish_downloading(&self, session: &Session, task: &DownloadTask, location: &Path) -> Handled {
        let mut e = Event::new(dls_event_kind::DLS_EVENT_FINISHED_DOWNLOADING, session, Some(task));
        e.location = Some(c_string(&location.to_string_lossy()));
        // Not shown to the app (the session is being freed): the event and its file stay
        // for the next attach.
        let asking = Asking::start();
        self.durable(&e);
        if asking.kept() { Handled::Later } else { Handled::Done }
    }

    /// The app answers with `dls_task_answer_challenge` (in the callback or later): the
    /// library sends nothing here, and an answer withdraws the event. An app that did not
    /// say it answers challenges never sees one: `Fail`, as before it could.
    fn did_receive_challenge(
        &self,
        session: &Session,
        task: &DownloadTask,
        challenge: &Challenge,
    ) -> Option<ChallengeAnswer> {
        if !self.hears_challenges {
            return Some(ChallengeAnswer::Fail);
        }
        let mut e = Event::new(dls_event_kind::DLS_EVENT_CHALLENGE, session, Some(task));
        e.challenge = Some(ChallengeText {
            scheme: c_string(&challenge.scheme),
            realm: challenge.realm.as_deref().map(c_string),
            origin: c_string(&challenge.origin),
            proxy: challenge.proxy,
            round: challenge.round,
        });
        self.gate.deliver(&e);
        None
    }

    fn did_complete_with_error(&self, session: &Session, task: &DownloadTask, error: Option<&TaskError>) {
        let e = Event::new(dls_event_kind::DLS_EVENT_COMPLETED, session, Some(task)).error(error);
        self.durable(&e);
    }

    fn did_finish_events_for_background_session(&self, session: &Session) {
        self.gate.deliver(&Event::new(dls_event_kind::DLS_EVENT_FINISHED_EVENTS, session, None));
    }

    fn did_become_invalid(&self, session: &Session, error: Option<&TaskError>) {
        self.durable(&Event::new(dls_event_kind::DLS_EVENT_BECAME_INVALID, session, None).error(error));
    }

    fn did_detach(&self, session: &Session, reason: DetachReason) {
        let mut e = Event::new(dls_event_kind::DLS_EVENT_DETACHED, session, None);
        if reason == DetachReason::TakenOver {
            e.error_code = dls_code::DLS_SESSION_IN_USE;
        }
        e.error_message = Some(c_string(reason.as_str()));
        self.gate.deliver(&e);
    }

    fn did_lose_connection(&self, session: &Session, reason: &str) {
        let mut e = Event::new(dls_event_kind::DLS_EVENT_CONNECTION_LOST, session, None);
        e.error_message = Some(c_string(reason));
        self.gate.deliver(&e);
    }

    fn did_reconnect(&self, session: &Session) {
        self.gate.deliver(&Event::new(dls_event_kind::DLS_EVENT_RECONNECTED, session, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    /// What the test callback saw: (kind, task, message).
    type Seen = Mutex<Vec<(dls_event_kind, u64, Option<String>, String)>>;

    unsafe extern "C" fn record(event: *const dls_event, user_data: *mut c_void) {
        // SAFETY: the gate passes a live event and the `Seen` the test gave as user_data.
        let (event, seen) = unsafe { (&*event, &*(user_data as *const Seen)) };
        // SAFETY: strings in the event are NULL or NUL-terminated for the call.
        let message = unsafe { event.error_message.as_ref().map(|m| CStr::from_ptr(m).to_string_lossy().into_owned()) };
        // SAFETY: as above, never NULL.
        let identifier = unsafe { CStr::from_ptr(event.session_identifier) }.to_string_lossy().into_owned();
        seen.lock().unwrap().push((event.kind, event.task_id, message, identifier));
    }

    fn event(kind: dls_event_kind, task_id: u64, message: Option<&str>) -> Event {
        Event {
            kind,
            task_id,
            bytes_written: 0,
            total_bytes_written: 0,
            total_bytes_expected: -1,
            offset: 0,
            location: None,
            error_code: dls_code::DLS_OK,
            http_status: 0,
            error_message: message.map(c_string),
            session_identifier: c_string("org.example.test"),
            body_truncated: false,
            response_headers: None,
            challenge: None,
        }
    }

    #[test]
    fn callbacks_stop_once_the_gate_is_closed() {
        let seen: Seen = Mutex::default();
        let gate = Gate::new(Some(record), &seen as *const Seen as *mut c_void);
        assert!(gate.deliver(&event(dls_event_kind::DLS_EVENT_COMPLETED, 7, Some("http_status"))));
        gate.close_and(|| ());
        assert!(!gate.deliver(&event(dls_event_kind::DLS_EVENT_PROGRESS, 8, None)), "closed: nothing is called");
        let seen = seen.into_inner().unwrap();
        assert_eq!(
            seen,
            vec![(dls_event_kind::DLS_EVENT_COMPLETED, 7, Some("http_status".into()), "org.example.test".into())]
        );
    }

    /// Freeing waits for the delivering thread to end, and that thread, between two
    /// events, waits for the gate: closing must not hold the gate while it frees.
    #[test]
    fn freeing_does_not_hold_the_gate_the_delivering_thread_waits_for() {
        unsafe extern "C" fn slow(_: *const dls_event, _: *mut c_void) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let gate = std::sync::Arc::new(Gate::new(Some(slow), ptr::null_mut()));
        let (ended_tx, ended) = std::sync::mpsc::channel();
        let theirs = gate.clone();
        // The session's delivering thread: events until the gate is closed.
        let thread = std::thread::spawn(move || {
            while theirs.deliver(&event(dls_event_kind::DLS_EVENT_PROGRESS, 1, None)) {}
            let _ = ended_tx.send(());
        });
        std::thread::sleep(std::time::Duration::from_millis(120));
        let began = std::time::Instant::now();
        // Freeing the session waits (up to 5 s) for that thread to end.
        gate.close_and(|| {
            ended.recv_timeout(std::time::Duration::from_secs(5)).expect("the delivering thread ended");
        });
        assert!(began.elapsed() < std::time::Duration::from_secs(1), "freeing took {:?}", began.elapsed());
        thread.join().unwrap();
    }

    #[test]
    fn no_callback_is_fine() {
        let gate = Gate::new(None, ptr::null_mut());
        assert!(gate.deliver(&event(dls_event_kind::DLS_EVENT_RECONNECTED, 0, None)));
        gate.close_and(|| ());
    }

    #[test]
    fn closing_from_inside_the_callback_does_not_wait_for_itself() {
        unsafe extern "C" fn close_own(_: *const dls_event, user_data: *mut c_void) {
            // SAFETY: the test passes its gate as user_data.
            unsafe { &*(user_data as *const Gate) }.close_and(|| ());
        }
        let mut gate = Box::new(Gate::new(None, ptr::null_mut()));
        // The callback gets its own gate as user_data (the box does not move).
        let this = &*gate as *const Gate as *mut c_void;
        gate.callback = Some(Callback { f: close_own, user_data: this });
        // Would deadlock if `close` waited for the callback it is called from.
        assert!(gate.deliver(&event(dls_event_kind::DLS_EVENT_COMPLETED, 1, None)));
        assert!(!gate.deliver(&event(dls_event_kind::DLS_EVENT_COMPLETED, 2, None)), "closed from inside");
    }

    #[test]
    fn counts_saturate_and_unknown_is_minus_one() {
        assert_eq!(count(u64::MAX), i64::MAX);
        assert_eq!(expected(None), -1);
        assert_eq!(expected(Some(5)), 5);
    }
}
