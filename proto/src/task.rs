//! Tasks on the wire: what a client asks for (`TaskSpec`), and what it is told about a
//! task (`TaskInfo`, `TaskDetail`, why it waits, counts by state). `Debug` of these types
//! shows URLs and credential headers redacted (see [`crate::redact`]). The evolution
//! rule of [`crate::message`] applies.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{ErrorInfo, redact};

/// Task ids are unique across the daemon and never reused.
pub type TaskId = u64;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// A header name and value. `Debug` hides the values of credential-carrying headers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

impl Header {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Header {
        Header { name: name.into(), value: value.into() }
    }

    /// True for headers whose value is a secret and must never be logged or printed.
    pub fn is_sensitive(&self) -> bool {
        redact::is_sensitive_header(&self.name)
    }

    /// The value, or `REDACTED` for credentials (see [`crate::redact`]).
    pub fn display_value(&self) -> &str {
        redact::header_value(&self.name, &self.value)
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.display_value())
    }
}

/// How a download task is created. `Debug` shows the URL redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// `http` or `https` only.
    pub url: String,
    pub headers: Vec<Header>,
    /// Free text kept with the task (like `taskDescription`).
    pub description: Option<String>,
    /// 0.0 (lowest) to 1.0 (highest); 0.5 by default.
    pub priority: f32,
    /// Do not start before this time.
    pub earliest_begin: Option<UnixMillis>,
    pub expected_sha256: Option<[u8; 32]>,
    /// Absolute path the finished file is moved to (else it stays in the cache).
    pub destination: Option<String>,
    /// Replace an existing file at `destination` instead of failing.
    pub overwrite: bool,
    /// Size hint, used for progress until the server says otherwise.
    pub expected_size: Option<u64>,
}

impl TaskSpec {
    /// A GET of `url` with every option at its default.
    pub fn get(url: impl Into<String>) -> TaskSpec {
        TaskSpec {
            url: url.into(),
            headers: Vec::new(),
            description: None,
            priority: 0.5,
            earliest_begin: None,
            expected_sha256: None,
            destination: None,
            overwrite: false,
            expected_size: None,
        }
    }
}

impl fmt::Debug for TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskSpec")
            .field("url", &redact::Shown(&self.url))
            .field("headers", &self.headers)
            .field("description", &self.description)
            .field("priority", &self.priority)
            .field("earliest_begin", &self.earliest_begin)
            .field("expected_sha256", &self.expected_sha256)
            .field("destination", &self.destination)
            .field("overwrite", &self.overwrite)
            .field("expected_size", &self.expected_size)
            .finish()
    }
}

/// How an upload sends its file (protocol 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UploadMethod {
    /// Retried after transient failures: sending the same body again is the same request.
    Put,
    /// Retried only when marked idempotent, when the server offered to resume it, or when it
    /// failed before a byte of its body went out.
    Post,
}

impl UploadMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            UploadMethod::Put => "PUT",
            UploadMethod::Post => "POST",
        }
    }

    /// `PUT` or `POST`, in any case.
    pub fn from_name(name: &str) -> Option<UploadMethod> {
        [UploadMethod::Put, UploadMethod::Post].into_iter().find(|m| m.as_str().eq_ignore_ascii_case(name))
    }
}

/// How an upload task is created (protocol 4). `Debug` shows the URL redacted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadSpec {
    /// URL, headers (`Content-Type` among them), description, priority and earliest begin.
    /// Its download-only fields (`expected_sha256`, `destination`, `overwrite`,
    /// `expected_size`) must be unset.
    pub request: TaskSpec,
    pub method: UploadMethod,
    /// Absolute path of the regular file whose bytes are the body. Its size and
    /// modification time are recorded at submission: a file changed afterwards fails the
    /// upload (`file_error`, saying so) instead of sending a mix.
    pub file: String,
    /// A POST the server treats as one however often it arrives: retried like a PUT.
    pub idempotent: bool,
}

/// What a task sends, when it is an upload (protocol 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadInfo {
    pub method: UploadMethod,
    pub file: String,
    /// The file's size: the body's length.
    pub bytes_total: u64,
    /// Bytes of the body handed to the connection in the current attempt, or known to be
    /// at the server (a resumed upload starts from the server's offset).
    pub bytes_sent: u64,
    pub idempotent: bool,
    /// The server offered resumption (the resumable uploads draft): a retry asks it for its
    /// offset and sends only the rest.
    pub resumable: bool,
}

/// The response bodies of uploads are kept up to this many bytes; the rest is read and
/// dropped, and the event says so (`body_truncated`).
pub const UPLOAD_RESPONSE_BODY_LIMIT: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskState {
    Suspended,
    Queued,
    Running,
    Waiting,
    Completed,
}

impl TaskState {
    pub const ALL: [TaskState; 5] =
        [TaskState::Suspended, TaskState::Queued, TaskState::Running, TaskState::Waiting, TaskState::Completed];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Suspended => "suspended",
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Waiting => "waiting",
            TaskState::Completed => "completed",
        }
    }

    pub fn from_name(name: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Queued, running or waiting: the daemon still has work to do.
    pub fn is_active(self) -> bool {
        matches!(self, TaskState::Queued | TaskState::Running | TaskState::Waiting)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a task that is not running is not running, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReason {
    /// Created and not yet resumed, or suspended by a client.
    Suspended,
    /// Queued behind the daemon-wide limit of concurrent downloads.
    GlobalLimit { limit: u32 },
    /// Queued behind the session's per-host connection limit.
    HostLimit { host: String, limit: u32 },
    /// Queued behind the session's `max_concurrent_tasks`.
    SessionLimit { limit: u32 },
    /// Not before `earliest_begin`.
    EarliestBegin { at: UnixMillis },
    /// Backing off after a transient failure.
    Backoff { until: UnixMillis, attempt: u32, last_error: ErrorInfo },
    /// Completed; its events wait for the app to collect them.
    EventsPending { next_wake: Option<UnixMillis> },
    // Protocol 2.
    /// Downloaded, but the file could not be moved to its destination (`error` says why).
    /// The data is kept; the move is tried again at `next_try`, or at once on `resume`.
    DestinationUnavailable { error: ErrorInfo, attempt: u32, next_try: Option<UnixMillis> },
    /// Held at its last durable checkpoint while the daemon's state directory refuses
    /// writes; it goes on by itself when the directory works again.
    StorageFull { error: ErrorInfo },
    /// No route to the server since `since`: it goes on as soon as one appears, without
    /// spending attempts meanwhile.
    NoNetwork { since: UnixMillis },
    /// Queued: the network is metered and the session does not allow it.
    MeteredNetwork,
    /// Queued: the machine runs on battery and the session does not allow it.
    OnBattery,
    /// Queued: the session is discretionary and conditions are not good enough (metered, or
    /// on battery below the documented level).
    Discretionary,
    // Protocol 4.
    /// The server (or proxy) asked for credentials; the session answers challenges, and the
    /// task waits for the app's answer (`AnswerChallenge`).
    AuthRequired { challenge: Challenge },
}

/// A server's request for credentials (`WWW-Authenticate` with a 401, or
/// `Proxy-Authenticate` with a 407), as the app is told of it: never a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The scheme the server named first (`Basic`, `Bearer`, `Digest`…).
    pub scheme: String,
    /// Its `realm` parameter, if it gave one.
    pub realm: Option<String>,
    /// Who asks: `scheme://host:port` of the response (a proxy's for a 407).
    pub origin: String,
    /// A proxy asked (407), not the server.
    pub proxy: bool,
    /// 1 for the task's first challenge; each rejected answer adds one (the daemon gives up
    /// after [`MAX_AUTH_ROUNDS`] answers).
    pub round: u32,
}

/// Answers a task may give to challenges before it fails with the server's 401 (or 407).
pub const MAX_AUTH_ROUNDS: u32 = 3;

/// A credential an app answers a challenge with. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credential {
    /// `Authorization: Basic` (`Proxy-Authorization` for a proxy).
    Basic { user: String, password: String },
    /// `Authorization: Bearer`.
    Bearer { token: String },
    /// Any header (say `X-Api-Key`).
    Header { name: String, value: String },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { user, .. } => write!(f, "Basic({user}, {})", redact::REDACTED),
            Credential::Bearer { .. } => write!(f, "Bearer({})", redact::REDACTED),
            Credential::Header { name, .. } => write!(f, "Header({name}: {})", redact::REDACTED),
        }
    }
}

/// Which requests a credential goes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CredentialScope {
    /// This task's requests to the challenge's origin.
    Task,
    /// Every task of the session, to the challenge's origin (its protection space), from
    /// their first request on.
    ProtectionSpace,
}

/// How an app answers a challenge (`URLSession`'s challenge dispositions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChallengeAnswer {
    /// Try again with this credential. `keep`: stored in the daemon's database (else in its
    /// memory only, gone with a restart).
    Use { credential: Credential, scope: CredentialScope, keep: bool },
    /// Cancel the task (`cancelled`).
    Cancel,
    /// No credential: the task completes with the server's status (`http_status`), as if the
    /// session did not answer challenges.
    Fail,
}

/// `Debug` shows the URL redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub id: TaskId,
    pub session: String,
    pub state: TaskState,
    pub url: String,
    pub description: Option<String>,
    pub priority: f32,
    pub bytes_received: u64,
    pub bytes_expected: Option<u64>,
    /// Current download speed in bytes per second (0 unless running).
    pub speed: u64,
    /// Where the finished file is (set once `finished_downloading` was committed).
    pub location: Option<String>,
    /// Set once completed with an error.
    pub error: Option<ErrorInfo>,
    pub created_at: UnixMillis,
    pub wait: Option<WaitReason>,
    // Protocol 4.
    /// Set for an upload task: `bytes_received`/`bytes_expected` then count its response.
    pub upload: Option<UploadInfo>,
}

/// Everything about one task, for `dlsessionctl show`. `Debug` shows URLs redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDetail {
    pub info: TaskInfo,
    pub request_headers: Vec<Header>,
    pub expected_sha256: Option<[u8; 32]>,
    pub destination: Option<String>,
    /// The partial file in the cache directory while the task is unfinished.
    pub partial_path: Option<String>,
    /// The URL after redirects, as of the last response.
    pub final_url: Option<String>,
    pub response_status: Option<u16>,
    pub response_headers: Vec<Header>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// Bytes up to which data is synced to disk and committed.
    pub committed_offset: u64,
    /// Whether a retry can continue where it stopped (validators known).
    pub resumable: bool,
    pub attempts: u32,
    pub last_error: Option<ErrorInfo>,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    /// When `timeout_for_resource` runs out.
    pub resource_deadline: Option<UnixMillis>,
    /// The task's completed event has been acknowledged; it is history.
    pub retired: bool,
}

impl fmt::Debug for TaskInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskInfo")
            .field("id", &self.id)
            .field("session", &self.session)
            .field("state", &self.state)
            .field("url", &redact::Shown(&self.url))
            .field("description", &self.description)
            .field("priority", &self.priority)
            .field("bytes_received", &self.bytes_received)
            .field("bytes_expected", &self.bytes_expected)
            .field("speed", &self.speed)
            .field("location", &self.location)
            .field("error", &self.error)
            .field("created_at", &self.created_at)
            .field("wait", &self.wait)
            .field("upload", &self.upload)
            .finish()
    }
}

impl fmt::Debug for TaskDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskDetail")
            .field("info", &self.info)
            .field("request_headers", &self.request_headers)
            .field("expected_sha256", &self.expected_sha256)
            .field("destination", &self.destination)
            .field("partial_path", &self.partial_path)
            .field("final_url", &self.final_url.as_deref().map(redact::Shown))
            .field("response_status", &self.response_status)
            .field("response_headers", &self.response_headers)
            .field("etag", &self.etag)
            .field("last_modified", &self.last_modified)
            .field("committed_offset", &self.committed_offset)
            .field("resumable", &self.resumable)
            .field("attempts", &self.attempts)
            .field("last_error", &self.last_error)
            .field("started_at", &self.started_at)
            .field("finished_at", &self.finished_at)
            .field("resource_deadline", &self.resource_deadline)
            .field("retired", &self.retired)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskPage {
    pub tasks: Vec<TaskInfo>,
    /// Pass as `after` to get the next page; `None` when this was the last.
    pub next_after: Option<TaskId>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    pub suspended: u64,
    pub queued: u64,
    pub running: u64,
    pub waiting: u64,
    pub completed: u64,
}

impl TaskCounts {
    pub fn add(&mut self, state: TaskState) {
        *self.slot(state) += 1;
    }

    pub fn get(&self, state: TaskState) -> u64 {
        match state {
            TaskState::Suspended => self.suspended,
            TaskState::Queued => self.queued,
            TaskState::Running => self.running,
            TaskState::Waiting => self.waiting,
            TaskState::Completed => self.completed,
        }
    }

    fn slot(&mut self, state: TaskState) -> &mut u64 {
        match state {
            TaskState::Suspended => &mut self.suspended,
            TaskState::Queued => &mut self.queued,
            TaskState::Running => &mut self.running,
            TaskState::Waiting => &mut self.waiting,
            TaskState::Completed => &mut self.completed,
        }
    }

    pub fn remove(&mut self, state: TaskState) {
        let slot = self.slot(state);
        *slot = slot.saturating_sub(1);
    }

    /// Saturating: counts come from the wire, and a client must not panic on them.
    pub fn total(&self) -> u64 {
        [self.suspended, self.queued, self.running, self.waiting, self.completed]
            .into_iter()
            .fold(0, u64::saturating_add)
    }

    /// Saturating, as `total`.
    pub fn active(&self) -> u64 {
        [self.queued, self.running, self.waiting].into_iter().fold(0, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::TaskCounts;

    /// Counts a daemon sends are summed without overflowing (a panic in a debug build, a
    /// wrapped "idle" in a release one).
    #[test]
    fn counts_from_the_wire_sum_without_overflow() {
        let counts = TaskCounts { suspended: 1, queued: u64::MAX, running: 2, waiting: 0, completed: 3 };
        assert_eq!(counts.active(), u64::MAX);
        assert_eq!(counts.total(), u64::MAX);
    }
}
