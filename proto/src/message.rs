//! Requests, responses and events.
//!
//! These are the types of the current protocol version ([`crate::PROTOCOL_VERSION`]).
//! Evolution rule: new enum variants and new request kinds go at the end; nothing is
//! reordered or removed. A struct that gains a field, or an enum that gains a variant a
//! daemon may send, needs a new protocol version, with the earlier shape frozen in its
//! own module (see [`crate::v1`]) so the daemon keeps serving clients of every version it
//! supports. No serde attribute that bincode cannot honour (`flatten`, `untagged`, `tag`,
//! `skip_serializing_if`) is used here.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{ErrorInfo, redact};

/// Task ids are unique across the daemon and never reused.
pub type TaskId = u64;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// One request from a client, tagged with an id the response echoes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    pub request: Request,
}

/// Everything the daemon sends after the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    Response { id: u64, result: Result<Response, ErrorInfo> },
    Event(Event),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// → [`Response::Status`]
    Status,
    /// Attach this connection to a session, creating it if needed (the configuration
    /// replaces the stored one). Without `takeover`, fails with `session_in_use` if another
    /// connection is attached; with it, that connection receives `Detached { TakenOver }`.
    /// → [`Response::Session`], then every undelivered durable event, then `FinishedEvents`.
    Attach { identifier: String, config: SessionConfig, takeover: bool },
    /// → [`Response::Ok`]
    Detach { identifier: String },
    /// Create the session if it does not exist; replace its configuration if one is given.
    /// Does not attach. → [`Response::Session`]
    OpenSession { identifier: String, config: Option<SessionConfig> },
    /// → [`Response::Session`]
    GetSession { identifier: String },
    /// → [`Response::Sessions`]
    ListSessions,
    /// Create tasks in one batch (one transaction). Tasks start `suspended` unless
    /// `resume` is set. → [`Response::TasksCreated`], ids in request order.
    CreateTasks { identifier: String, tasks: Vec<TaskSpec>, resume: bool },
    /// Create a task continuing from an opaque blob produced by `CancelProducingResumeData`.
    /// → [`Response::TasksCreated`] with one id.
    CreateTaskFromResumeData { identifier: String, resume_data: Vec<u8>, resume: bool },
    /// → [`Response::Ok`], or [`Response::ResumeData`] for `CancelProducingResumeData`.
    ControlTask { task: TaskId, action: TaskAction },
    /// → [`Response::Task`]
    GetTask { task: TaskId },
    /// → [`Response::Tasks`] (one page; follow `next_after`).
    ListTasks(TaskQuery),
    /// Acknowledge durable events once the app has handled them. → [`Response::Ok`]
    AckEvents { identifier: String, seqs: Vec<u64> },
    /// No new tasks; the session becomes invalid when its last task completes. → [`Response::Ok`]
    FinishTasksAndInvalidate { identifier: String },
    /// Cancel every task and invalidate now. → [`Response::Ok`]
    InvalidateAndCancel { identifier: String },
    /// Wake or relaunch the session's app now. → [`Response::Wake`]
    Wake { identifier: String },
    /// Receive `TaskUpdate` and `Progress` events for matching tasks. → [`Response::Ok`]
    Watch(WatchFilter),
    /// → [`Response::Ok`]
    Unwatch,
    /// Acknowledge every durable event of these completed tasks (for tools that watched
    /// them finish without attaching). → [`Response::Ok`]
    AcknowledgeTasks { tasks: Vec<TaskId> },
    // Protocol 2.
    /// One page of sessions in identifier order. → [`Response::SessionsPage`]
    ListSessionsPage(SessionQuery),
    /// This connection rejoins sessions when it receives `Wake` (the client library sends
    /// it when the app registers a wake handler). Without it, a connection that announced
    /// an `app_id` still gets `Wake`, but the daemon relaunches the app if the session is
    /// not attached soon after. → [`Response::Ok`]
    HandleWakes,
}

impl Request {
    /// A short name for logs and errors (a request can be large, and carry header values).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Attach { .. } => "attach",
            Request::Detach { .. } => "detach",
            Request::OpenSession { .. } => "open_session",
            Request::GetSession { .. } => "get_session",
            Request::ListSessions => "list_sessions",
            Request::CreateTasks { .. } => "create_tasks",
            Request::CreateTaskFromResumeData { .. } => "create_task_from_resume_data",
            Request::ControlTask { .. } => "control_task",
            Request::GetTask { .. } => "get_task",
            Request::ListTasks(_) => "list_tasks",
            Request::AckEvents { .. } => "ack_events",
            Request::FinishTasksAndInvalidate { .. } => "finish_tasks_and_invalidate",
            Request::InvalidateAndCancel { .. } => "invalidate_and_cancel",
            Request::Wake { .. } => "wake",
            Request::Watch(_) => "watch",
            Request::Unwatch => "unwatch",
            Request::AcknowledgeTasks { .. } => "acknowledge_tasks",
            Request::ListSessionsPage(_) => "list_sessions_page",
            Request::HandleWakes => "handle_wakes",
        }
    }
}

/// A page of sessions: identifiers greater than `after`, at most `limit` of them (the
/// daemon may return fewer to keep the frame small).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionQuery {
    pub after: Option<String>,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPage {
    pub sessions: Vec<SessionInfo>,
    /// Pass as `after` to get the next page; `None` when this was the last.
    pub next_after: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskAction {
    Resume,
    Suspend,
    Cancel,
    CancelProducingResumeData,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskQuery {
    pub session: Option<String>,
    /// Empty means every state.
    pub states: Vec<TaskState>,
    /// Return tasks with ids greater than this (paging cursor).
    pub after: Option<TaskId>,
    /// At most this many tasks; the daemon may return fewer to keep the frame small.
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchFilter {
    /// Only tasks of this session (all sessions if `None`).
    pub session: Option<String>,
    /// Only these tasks (all if empty).
    pub tasks: Vec<TaskId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    Status(DaemonStatus),
    Session(SessionInfo),
    Sessions(Vec<SessionInfo>),
    TasksCreated(Vec<TaskId>),
    ResumeData(Vec<u8>),
    Task(TaskDetail),
    Tasks(TaskPage),
    Wake(WakeOutcome),
    // Protocol 2.
    SessionsPage(SessionPage),
}

impl Response {
    /// The variant's name, for "unexpected response" errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Ok => "ok",
            Response::Status(_) => "status",
            Response::Session(_) => "session",
            Response::Sessions(_) => "sessions",
            Response::TasksCreated(_) => "tasks_created",
            Response::ResumeData(_) => "resume_data",
            Response::Task(_) => "task",
            Response::Tasks(_) => "tasks",
            Response::Wake(_) => "wake",
            Response::SessionsPage(_) => "sessions_page",
        }
    }
}

/// What `Request::Wake` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WakeOutcome {
    /// The session is attached: events are delivered live, nothing to wake.
    Attached,
    /// A `wake` message went to this many connections that announced the session's `app_id`.
    Woken { connections: u32 },
    /// The relaunch command was started.
    Launched { pid: u32 },
    /// `systemctl --user start UNIT` was run.
    UnitStarted { unit: String },
    /// No connection has the session's `app_id` and the session has no launch spec.
    NoTarget,
}

/// Events arrive on a connection that attached a session, watches tasks, or announced an
/// `app_id` (for `Wake`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A durable event: delivered in `seq` order, at least once, until acknowledged.
    Durable { identifier: String, seq: u64, event: DurableEvent },
    /// Coalesced progress; `bytes_written` counts bytes since the previous progress event
    /// this connection received for the task.
    Progress {
        identifier: String,
        task: TaskId,
        bytes_written: u64,
        total_bytes_written: u64,
        total_bytes_expected: Option<u64>,
    },
    /// Every undelivered event of the session has been sent.
    FinishedEvents { identifier: String },
    /// This connection is no longer attached to the session.
    Detached { identifier: String, reason: DetachReason },
    /// The session has events waiting: attach to it to receive them.
    Wake { identifier: String, reason: WakeReason },
    /// A watched task changed state (or progress, for watchers).
    TaskUpdate(TaskInfo),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DurableEvent {
    /// A transfer (re)started at `offset` (0 means it restarted from scratch).
    ResumedAtOffset { task: TaskId, offset: u64, expected_total: Option<u64> },
    /// The file is complete at `location`; move it before acknowledging.
    FinishedDownloading { task: TaskId, location: String },
    /// Always the last event of a task; `error` is `None` on success.
    Completed { task: TaskId, error: Option<ErrorInfo> },
    /// The session ended; its identifier may be reused.
    DidBecomeInvalid { error: Option<ErrorInfo> },
}

impl DurableEvent {
    pub fn task(&self) -> Option<TaskId> {
        match self {
            DurableEvent::ResumedAtOffset { task, .. }
            | DurableEvent::FinishedDownloading { task, .. }
            | DurableEvent::Completed { task, .. } => Some(*task),
            DurableEvent::DidBecomeInvalid { .. } => None,
        }
    }

    /// The stable snake_case name used in JSON output.
    pub fn name(&self) -> &'static str {
        match self {
            DurableEvent::ResumedAtOffset { .. } => "resumed_at_offset",
            DurableEvent::FinishedDownloading { .. } => "finished_downloading",
            DurableEvent::Completed { .. } => "completed",
            DurableEvent::DidBecomeInvalid { .. } => "did_become_invalid",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DetachReason {
    /// Another connection attached with `takeover`.
    TakenOver,
    /// The session was invalidated.
    Invalidated,
    /// The daemon is shutting down.
    DaemonShutdown,
}

impl DetachReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DetachReason::TakenOver => "taken_over",
            DetachReason::Invalidated => "invalidated",
            DetachReason::DaemonShutdown => "daemon_shutdown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WakeReason {
    FinishedEvents,
    Requested,
}

impl WakeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            WakeReason::FinishedEvents => "finished_events",
            WakeReason::Requested => "requested",
        }
    }
}

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

/// A URL inside a `Debug` dump, shown the way [`redact::url`] shows it.
struct ShownUrl<'a>(&'a str);

impl fmt::Debug for ShownUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact::url(self.0), f)
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
            .field("url", &ShownUrl(&self.url))
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
            .field("url", &ShownUrl(&self.url))
            .field("description", &self.description)
            .field("priority", &self.priority)
            .field("bytes_received", &self.bytes_received)
            .field("bytes_expected", &self.bytes_expected)
            .field("speed", &self.speed)
            .field("location", &self.location)
            .field("error", &self.error)
            .field("created_at", &self.created_at)
            .field("wait", &self.wait)
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
            .field("final_url", &self.final_url.as_deref().map(ShownUrl))
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

/// How to bring the app back when its session has finished events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaunchSpec {
    /// An argv run directly (no shell), detached, with the `DLSESSION_*` environment.
    Command { argv: Vec<String> },
    /// `systemctl --user start UNIT`; a template (`app@.service`) gets the escaped identifier.
    SystemdUnit { unit: String },
}

/// A session's stored configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionConfig {
    /// Who to wake when the session has finished events.
    pub app_id: Option<String>,
    pub launch: Option<LaunchSpec>,
    /// Added to every request of the session.
    pub http_headers: Vec<Header>,
    /// Idle timeout: no byte for this long fails the attempt (transiently).
    pub timeout_for_request_ms: u64,
    /// Whole-task budget including retries.
    pub timeout_for_resource_ms: u64,
    pub max_connections_per_host: u32,
    pub max_concurrent_tasks: Option<u32>,
    /// Bytes per second for the whole session.
    pub bandwidth_limit: Option<u64>,
}

impl SessionConfig {
    pub const DEFAULT_TIMEOUT_FOR_REQUEST_MS: u64 = 60_000;
    pub const DEFAULT_TIMEOUT_FOR_RESOURCE_MS: u64 = 7 * 24 * 3600 * 1000;
    pub const DEFAULT_MAX_CONNECTIONS_PER_HOST: u32 = 6;
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        SessionConfig {
            app_id: None,
            launch: None,
            http_headers: Vec::new(),
            timeout_for_request_ms: SessionConfig::DEFAULT_TIMEOUT_FOR_REQUEST_MS,
            timeout_for_resource_ms: SessionConfig::DEFAULT_TIMEOUT_FOR_RESOURCE_MS,
            max_connections_per_host: SessionConfig::DEFAULT_MAX_CONNECTIONS_PER_HOST,
            max_concurrent_tasks: None,
            bandwidth_limit: None,
        }
    }
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

    pub fn total(&self) -> u64 {
        self.suspended + self.queued + self.running + self.waiting + self.completed
    }

    pub fn active(&self) -> u64 {
        self.queued + self.running + self.waiting
    }
}

/// The wake state machine of a session that has finished events and no attached client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeStatus {
    /// Wakes or launches attempted since the app last attached.
    pub attempts: u32,
    pub last_wake: Option<UnixMillis>,
    pub next_wake: Option<UnixMillis>,
    pub last_error: Option<ErrorInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub identifier: String,
    pub config: SessionConfig,
    pub attached: bool,
    pub tasks: TaskCounts,
    /// Durable events not yet acknowledged.
    pub pending_events: u64,
    pub wake: WakeStatus,
    /// `finish_tasks_and_invalidate` was called; no new tasks are accepted.
    pub invalidating: bool,
    pub created_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub daemon_version: String,
    pub protocol_version: u16,
    pub pid: u32,
    pub started_at: UnixMillis,
    pub uptime_ms: u64,
    pub socket: String,
    pub state_dir: String,
    pub cache_dir: String,
    pub database: String,
    pub tasks: TaskCounts,
    pub sessions: u64,
    pub connections: u64,
    /// Current aggregate download rate, bytes per second.
    pub download_rate: u64,
    /// Bytes received since the daemon started.
    pub bytes_downloaded: u64,
    pub max_concurrent_downloads: u32,
    /// Set while the state directory refuses writes (changes are refused with
    /// `storage_full` until it works again).
    pub storage: Option<ErrorInfo>,
}
