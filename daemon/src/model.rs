//! The persistent records of sessions, tasks and durable events.
//!
//! These are what the store reads and writes. The core wraps them with runtime state;
//! `ipc::convert` turns them into wire types. Nothing here is sent over the socket as is.

use std::time::{SystemTime, UNIX_EPOCH};

use dlsession_proto::{
    DurableEvent, ErrorInfo, Header, SessionConfig, TaskId, TaskSpec, TaskState, UnixMillis, UploadMethod,
};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> UnixMillis {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// The mode of handed-over files when the client did not say (protocol 1): 0o644.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

/// The rowid of a session in the database.
pub type SessionKey = i64;

#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub key: SessionKey,
    pub identifier: String,
    pub config: SessionConfig,
    /// The sequence number the next durable event gets (never reused).
    pub next_seq: u64,
    /// `finish_tasks_and_invalidate` (or `invalidate_and_cancel`) was called.
    pub invalidating: bool,
    /// `invalidate_and_cancel` was called: a task still unfinished at a start (it was
    /// stopping when the daemon stopped) is cancelled, not run again.
    pub cancelling: bool,
    /// `did_become_invalid` was emitted: only its pending events remain.
    pub invalid: bool,
    pub created_at: UnixMillis,
    /// When its tasks may run (metered network, battery, discretionary).
    pub policy: dlsession_proto::SessionPolicy,
}

/// The tasks a request sent `Once` created: `count` ids from `first` (a request's ids are
/// consecutive), kept a day under the client's key so the same request sent again after
/// its answer was lost is answered instead of creating twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creation {
    pub session: SessionKey,
    pub key: u128,
    pub first: TaskId,
    pub count: u64,
    pub created_at: UnixMillis,
}

/// How long a creation key is kept.
pub const CREATION_KEPT_MS: u64 = 24 * 3600 * 1000;
/// Creation keys kept at most, all sessions together: past it the oldest go first.
pub const CREATIONS_MOST: usize = 100_000;

/// Where a task stands in the finish protocol (docs/behaviour.md, "Durability").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Downloading into the partial file.
    Transfer,
    /// The partial file is complete and synced; it is being moved to its final location.
    Finishing,
}

/// `Debug` shows where the task stands, its URL redacted and without its headers or
/// resume secret (it ends up in logs and panic messages).
#[derive(Clone, PartialEq)]
pub struct TaskRecord {
    pub id: TaskId,
    pub session: SessionKey,
    // What was asked.
    pub url: String,
    pub headers: Vec<Header>,
    pub description: Option<String>,
    pub priority: f32,
    pub earliest_begin: Option<UnixMillis>,
    pub expected_sha256: Option<[u8; 32]>,
    pub destination: Option<String>,
    pub overwrite: bool,
    pub expected_size: Option<u64>,
    /// The mode the finished file is handed over with (from the creating client's umask).
    pub file_mode: u32,
    pub created_at: UnixMillis,
    // Where it stands. `Running` is never stored: a running task is stored as `Queued`.
    pub state: TaskState,
    pub phase: Phase,
    /// Bytes of the partial file that are synced to disk.
    pub committed_offset: u64,
    pub bytes_expected: Option<u64>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub final_url: Option<String>,
    pub response_status: Option<u16>,
    pub response_headers: Vec<Header>,
    pub attempts: u32,
    pub last_error: Option<ErrorInfo>,
    /// While `Waiting`: when the next attempt may start.
    pub retry_at: Option<UnixMillis>,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub resource_deadline: Option<UnixMillis>,
    /// The finished file, once committed.
    pub location: Option<String>,
    /// The completion error (only when `Completed`).
    pub error: Option<ErrorInfo>,
    /// Cancelled with resume data: the partial file is kept for a later task.
    pub resume_secret: Option<u64>,
    /// The completed event was acknowledged: the task is history.
    pub retired: bool,
    /// This task's own bandwidth limit (bytes per second), set by `dlsessionctl limit --task`.
    pub bandwidth_limit: Option<u64>,
    /// This task's own policy, over its session's (`SetTaskPolicy`).
    pub policy: dlsession_proto::TaskPolicy,
    /// Its finished file could not carry its mark although its mode allows one (the
    /// filesystem refused it): its finish was recorded before the move, and the file at
    /// the destination is recognised by its size alone (see `engine::files::MARK`).
    pub unmarked: bool,
    /// Whether `bytes_expected` is a length a server stated (else the app's hint, or the
    /// end of a range guessed from it); `None` in rows stored before that was recorded.
    pub total_known: Option<bool>,
    /// Its file, assembled from more than one response, failed its SHA-256 and was
    /// downloaded again from zero: a second mismatch completes the task.
    pub refetched: bool,
    /// Set for an upload: what it sends. Its response body is what it "downloads"
    /// (`location`, `committed_offset`, `response_*`).
    pub upload: Option<Upload>,
    /// The challenge the task waits on for its app's answer (state `Waiting`, no timer).
    pub challenge: Option<dlsession_proto::Challenge>,
}

/// A credential the daemon holds: for a session's protection space (`task: None`) or one
/// task. `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct HeldCredential {
    pub task: Option<TaskId>,
    /// Where it goes: `scheme://host:port` (the proxy's, for a proxy credential).
    pub origin: String,
    pub proxy: bool,
    /// The header it is sent as (`Authorization`, `Proxy-Authorization`, or the app's own).
    pub name: String,
    pub value: String,
    /// Stored in the database (else in memory only).
    pub kept: bool,
}

impl std::fmt::Debug for HeldCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldCredential")
            .field("task", &self.task)
            .field("origin", &self.origin)
            .field("proxy", &self.proxy)
            .field("name", &self.name)
            .field("kept", &self.kept)
            .finish_non_exhaustive()
    }
}

/// What an upload task sends, as recorded when it was submitted. `Debug` never shows
/// the upload resource's URL (whoever holds it can write to the upload).
#[derive(Clone, PartialEq)]
pub struct Upload {
    pub method: UploadMethod,
    pub file: String,
    /// The file's size and modification time at submission: the body is the file as it
    /// was then, and a file changed since fails the upload instead of sending a mix.
    pub size: u64,
    pub mtime_ns: i64,
    pub idempotent: bool,
    /// The upload resource the server offered (a `104` with `Location`, the resumable
    /// uploads draft): a retry asks it for its offset and sends only the rest.
    pub resume_url: Option<String>,
    /// The response body was longer than `UPLOAD_RESPONSE_BODY_LIMIT`; the file holds its start.
    pub truncated: bool,
    /// An attempt that must not be repeated (`!retry_safe`) was under way: committed before
    /// its first byte goes out, cleared when it ends without having sent the whole body.
    /// Found set at start, the daemon stopped mid-attempt, and the request is not sent again.
    pub in_flight: bool,
}

impl Upload {
    /// Sending it again cannot do harm: a PUT, an idempotent POST, or one the server lets
    /// us resume.
    pub fn retry_safe(&self) -> bool {
        self.method == UploadMethod::Put || self.idempotent || self.resume_url.is_some()
    }
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("method", &self.method)
            .field("file", &self.file)
            .field("size", &self.size)
            .field("idempotent", &self.idempotent)
            .field("resumable", &self.resume_url.is_some())
            .finish_non_exhaustive()
    }
}

impl TaskRecord {
    /// A new task, suspended, as `spec` asks for it.
    pub fn new(id: TaskId, session: SessionKey, spec: TaskSpec, now: UnixMillis, file_mode: u32) -> TaskRecord {
        TaskRecord {
            id,
            session,
            file_mode,
            url: spec.url,
            headers: spec.headers,
            description: spec.description,
            priority: spec.priority,
            earliest_begin: spec.earliest_begin,
            expected_sha256: spec.expected_sha256,
            destination: spec.destination,
            overwrite: spec.overwrite,
            expected_size: spec.expected_size,
            created_at: now,
            state: TaskState::Suspended,
            phase: Phase::Transfer,
            committed_offset: 0,
            bytes_expected: spec.expected_size,
            etag: None,
            last_modified: None,
            final_url: None,
            response_status: None,
            response_headers: Vec::new(),
            attempts: 0,
            last_error: None,
            retry_at: None,
            started_at: None,
            finished_at: None,
            resource_deadline: None,
            location: None,
            error: None,
            resume_secret: None,
            retired: false,
            bandwidth_limit: None,
            policy: dlsession_proto::TaskPolicy::default(),
            unmarked: false,
            total_known: Some(false),
            refetched: false,
            upload: None,
            challenge: None,
        }
    }
}

impl std::fmt::Debug for TaskRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskRecord")
            .field("id", &self.id)
            .field("session", &self.session)
            .field("url", &dlsession_proto::redact::url(&self.url))
            .field("state", &self.state)
            .field("phase", &self.phase)
            .field("committed_offset", &self.committed_offset)
            .field("bytes_expected", &self.bytes_expected)
            .field("attempts", &self.attempts)
            .field("last_error", &self.last_error)
            .field("retry_at", &self.retry_at)
            .field("location", &self.location)
            .field("error", &self.error)
            .field("retired", &self.retired)
            .field("upload", &self.upload)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub session: SessionKey,
    pub seq: u64,
    pub event: DurableEvent,
    pub created_at: UnixMillis,
}

impl EventRecord {
    pub fn task(&self) -> Option<TaskId> {
        self.event.task()
    }
}
