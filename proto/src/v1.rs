//! Protocol 1, frozen: the shapes of every message that changed since, and the
//! conversions a daemon uses to keep serving protocol-1 clients.
//!
//! Apps link the client library statically, so an app built against protocol 1 keeps
//! talking protocol 1 to every later daemon. The daemon decodes its requests with the
//! current [`crate::Request`] (protocol 2 only appended variants, so the bytes of every
//! protocol-1 request mean the same), decodes its hello as [`ClientHello`] here, and sends
//! it [`ServerMessage`]s converted with [`downgrade`]: whatever protocol 1 cannot express
//! becomes the nearest thing it can (a new error code becomes `internal` or `file_error`
//! with the code's name in the message; a new wait reason becomes `backoff`).
//!
//! Nothing here may change: `tests/golden/v1` holds the bytes these types must produce.

use serde::{Deserialize, Serialize};

use crate::{DetachReason, Header, TaskCounts, TaskId, TaskState, UnixMillis, WakeOutcome, WakeReason};

/// Protocol 1's hello: no `umask`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    pub client_name: String,
    pub client_version: String,
    pub app_id: Option<String>,
}

impl From<ClientHello> for crate::ClientHello {
    fn from(h: ClientHello) -> crate::ClientHello {
        crate::ClientHello {
            client_name: h.client_name,
            client_version: h.client_version,
            app_id: h.app_id,
            umask: None,
        }
    }
}

/// Protocol 1's error codes (21 of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    InvalidUrl,
    UnsupportedScheme,
    InvalidIdentifier,
    InvalidRequest,
    SessionInUse,
    NoSuchSession,
    NoSuchTask,
    SessionInvalidated,
    HttpStatus,
    Network,
    Tls,
    TimedOut,
    TooManyRedirects,
    CannotResume,
    ChecksumMismatch,
    InsufficientSpace,
    FileError,
    Cancelled,
    ProtocolVersion,
    PermissionDenied,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    pub http_status: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    Response { id: u64, result: Result<Response, ErrorInfo> },
    Event(Event),
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    Durable {
        identifier: String,
        seq: u64,
        event: DurableEvent,
    },
    Progress {
        identifier: String,
        task: TaskId,
        bytes_written: u64,
        total_bytes_written: u64,
        total_bytes_expected: Option<u64>,
    },
    FinishedEvents {
        identifier: String,
    },
    Detached {
        identifier: String,
        reason: DetachReason,
    },
    Wake {
        identifier: String,
        reason: WakeReason,
    },
    TaskUpdate(TaskInfo),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DurableEvent {
    ResumedAtOffset { task: TaskId, offset: u64, expected_total: Option<u64> },
    FinishedDownloading { task: TaskId, location: String },
    Completed { task: TaskId, error: Option<ErrorInfo> },
    DidBecomeInvalid { error: Option<ErrorInfo> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReason {
    Suspended,
    GlobalLimit { limit: u32 },
    HostLimit { host: String, limit: u32 },
    SessionLimit { limit: u32 },
    EarliestBegin { at: UnixMillis },
    Backoff { until: UnixMillis, attempt: u32, last_error: ErrorInfo },
    EventsPending { next_wake: Option<UnixMillis> },
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
    pub speed: u64,
    pub location: Option<String>,
    pub error: Option<ErrorInfo>,
    pub created_at: UnixMillis,
    pub wait: Option<WaitReason>,
}

/// `Debug` shows URLs redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDetail {
    pub info: TaskInfo,
    pub request_headers: Vec<Header>,
    pub expected_sha256: Option<[u8; 32]>,
    pub destination: Option<String>,
    pub partial_path: Option<String>,
    pub final_url: Option<String>,
    pub response_status: Option<u16>,
    pub response_headers: Vec<Header>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub committed_offset: u64,
    pub resumable: bool,
    pub attempts: u32,
    pub last_error: Option<ErrorInfo>,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub resource_deadline: Option<UnixMillis>,
    pub retired: bool,
}

impl std::fmt::Debug for TaskInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskInfo")
            .field("id", &self.id)
            .field("session", &self.session)
            .field("state", &self.state)
            .field("url", &crate::redact::Shown(&self.url))
            .field("bytes_received", &self.bytes_received)
            .field("bytes_expected", &self.bytes_expected)
            .field("error", &self.error)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TaskDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskDetail")
            .field("info", &self.info)
            .field("request_headers", &self.request_headers)
            .field("final_url", &self.final_url.as_deref().map(crate::redact::Shown))
            .field("response_status", &self.response_status)
            .field("committed_offset", &self.committed_offset)
            .field("attempts", &self.attempts)
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskPage {
    pub tasks: Vec<TaskInfo>,
    pub next_after: Option<TaskId>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeStatus {
    pub attempts: u32,
    pub last_wake: Option<UnixMillis>,
    pub next_wake: Option<UnixMillis>,
    pub last_error: Option<ErrorInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub identifier: String,
    pub config: crate::SessionConfig,
    pub attached: bool,
    pub tasks: TaskCounts,
    pub pending_events: u64,
    pub wake: WakeStatus,
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
    pub download_rate: u64,
    pub bytes_downloaded: u64,
    pub max_concurrent_downloads: u32,
}

/// A message of the current protocol in protocol 1's shapes.
pub fn downgrade(msg: crate::ServerMessage) -> ServerMessage {
    match msg {
        crate::ServerMessage::Response { id, result } => {
            ServerMessage::Response { id, result: result.map(response).map_err(error) }
        }
        crate::ServerMessage::Event(e) => ServerMessage::Event(event(e)),
    }
}

fn code(c: crate::ErrorCode) -> ErrorCode {
    use crate::ErrorCode as C;
    match c {
        C::InvalidUrl => ErrorCode::InvalidUrl,
        C::UnsupportedScheme => ErrorCode::UnsupportedScheme,
        C::InvalidIdentifier => ErrorCode::InvalidIdentifier,
        C::InvalidRequest => ErrorCode::InvalidRequest,
        C::SessionInUse => ErrorCode::SessionInUse,
        C::NoSuchSession => ErrorCode::NoSuchSession,
        C::NoSuchTask => ErrorCode::NoSuchTask,
        C::SessionInvalidated => ErrorCode::SessionInvalidated,
        C::HttpStatus => ErrorCode::HttpStatus,
        C::Network => ErrorCode::Network,
        C::Tls => ErrorCode::Tls,
        C::TimedOut => ErrorCode::TimedOut,
        C::TooManyRedirects => ErrorCode::TooManyRedirects,
        C::CannotResume => ErrorCode::CannotResume,
        C::ChecksumMismatch => ErrorCode::ChecksumMismatch,
        C::InsufficientSpace => ErrorCode::InsufficientSpace,
        C::FileError => ErrorCode::FileError,
        C::Cancelled => ErrorCode::Cancelled,
        C::ProtocolVersion => ErrorCode::ProtocolVersion,
        C::PermissionDenied => ErrorCode::PermissionDenied,
        C::Internal | C::StorageFull | C::ShuttingDown => ErrorCode::Internal,
        C::DestinationUnavailable => ErrorCode::FileError,
        C::NotConnected => ErrorCode::Network,
    }
}

/// An error in protocol 1: a code it lacks keeps its name in the message.
pub fn error(e: crate::ErrorInfo) -> ErrorInfo {
    let message = match e.code {
        crate::ErrorCode::StorageFull | crate::ErrorCode::DestinationUnavailable | crate::ErrorCode::NotConnected => {
            format!("{}: {}", e.code.as_str(), e.message)
        }
        _ => e.message,
    };
    ErrorInfo { code: code(e.code), message, http_status: e.http_status }
}

fn response(r: crate::Response) -> Response {
    use crate::Response as R;
    match r {
        R::Ok => Response::Ok,
        R::Status(s) => Response::Status(status(s)),
        R::Session(s) => Response::Session(session(s)),
        R::Sessions(v) => Response::Sessions(v.into_iter().map(session).collect()),
        R::TasksCreated(ids) => Response::TasksCreated(ids),
        R::ResumeData(d) => Response::ResumeData(d),
        R::Task(d) => Response::Task(detail(d)),
        R::Tasks(p) => {
            Response::Tasks(TaskPage { tasks: p.tasks.into_iter().map(task).collect(), next_after: p.next_after })
        }
        // Protocol 1 has no `Activated`: the app was started, as a unit would be.
        R::Wake(crate::WakeOutcome::Activated { app_id }) => {
            Response::Wake(crate::WakeOutcome::UnitStarted { unit: app_id })
        }
        R::Wake(w) => Response::Wake(w),
        // Only sent in answer to a protocol-2 request.
        R::SessionsPage(p) => Response::Sessions(p.sessions.into_iter().map(session).collect()),
        R::BandwidthLimits(_)
        | R::Conditions(_)
        | R::SessionPolicy(_)
        | R::TaskPolicy(_)
        | R::SessionCookies(_)
        | R::SessionProxy(_)
        | R::SessionChallenges(_)
        | R::SessionClientCert(_) => Response::Ok,
    }
}

fn event(e: crate::Event) -> Event {
    use crate::Event as E;
    match e {
        E::Durable { identifier, seq, event } => Event::Durable { identifier, seq, event: durable(event) },
        E::Progress { identifier, task, bytes_written, total_bytes_written, total_bytes_expected } => {
            Event::Progress { identifier, task, bytes_written, total_bytes_written, total_bytes_expected }
        }
        E::FinishedEvents { identifier } => Event::FinishedEvents { identifier },
        E::Detached { identifier, reason } => Event::Detached { identifier, reason },
        E::Wake { identifier, reason } => Event::Wake { identifier, reason },
        E::TaskUpdate(info) => Event::TaskUpdate(task(info)),
        // Bytes sent read as bytes written, as protocol 3 has them.
        E::SendProgress { identifier, task, bytes_sent, total_bytes_sent, total_bytes_expected_to_send } => {
            Event::Progress {
                identifier,
                task,
                bytes_written: bytes_sent,
                total_bytes_written: total_bytes_sent,
                total_bytes_expected: Some(total_bytes_expected_to_send),
            }
        }
    }
}

fn durable(e: crate::DurableEvent) -> DurableEvent {
    use crate::DurableEvent as D;
    match e {
        D::ResumedAtOffset { task, offset, expected_total } => {
            DurableEvent::ResumedAtOffset { task, offset, expected_total }
        }
        D::FinishedDownloading { task, location } => DurableEvent::FinishedDownloading { task, location },
        D::Completed { task, error: e } => DurableEvent::Completed { task, error: e.map(error) },
        D::DidBecomeInvalid { error: e } => DurableEvent::DidBecomeInvalid { error: e.map(error) },
        D::UploadResponse { task, body, .. } => DurableEvent::FinishedDownloading { task, location: body },
        // As protocol 3 gets it (`v3::durable`).
        D::Challenge { task, .. } => DurableEvent::ResumedAtOffset { task, offset: 0, expected_total: None },
    }
}

fn wait(w: crate::WaitReason) -> WaitReason {
    use crate::WaitReason as W;
    match w {
        W::Suspended => WaitReason::Suspended,
        W::GlobalLimit { limit } => WaitReason::GlobalLimit { limit },
        W::HostLimit { host, limit } => WaitReason::HostLimit { host, limit },
        W::SessionLimit { limit } => WaitReason::SessionLimit { limit },
        W::EarliestBegin { at } => WaitReason::EarliestBegin { at },
        W::Backoff { until, attempt, last_error } => {
            WaitReason::Backoff { until, attempt, last_error: error(last_error) }
        }
        W::EventsPending { next_wake } => WaitReason::EventsPending { next_wake },
        W::DestinationUnavailable { error: e, attempt, next_try } => {
            WaitReason::Backoff { until: next_try.unwrap_or(0), attempt, last_error: error(e) }
        }
        W::StorageFull { error: e } => WaitReason::Backoff { until: 0, attempt: 0, last_error: error(e) },
        // Protocol 1 knows no such wait: it reads as a backoff with no end, after a network error.
        // Protocol 1 knows no policy waits: they read as a queue behind a limit.
        W::MeteredNetwork | W::OnBattery | W::Discretionary => WaitReason::GlobalLimit { limit: 0 },
        // Waiting for someone to act, as a suspended task does.
        W::AuthRequired { .. } => WaitReason::Suspended,
        W::NoNetwork { .. } => WaitReason::Backoff {
            until: 0,
            attempt: 0,
            last_error: error(crate::ErrorInfo::new(crate::ErrorCode::Network, "no route to the server")),
        },
    }
}

fn task(t: crate::TaskInfo) -> TaskInfo {
    TaskInfo {
        id: t.id,
        session: t.session,
        state: t.state,
        url: t.url,
        description: t.description,
        priority: t.priority,
        bytes_received: t.bytes_received,
        bytes_expected: t.bytes_expected,
        speed: t.speed,
        location: t.location,
        error: t.error.map(error),
        created_at: t.created_at,
        wait: t.wait.map(wait),
    }
}

fn detail(d: crate::TaskDetail) -> TaskDetail {
    TaskDetail {
        info: task(d.info),
        request_headers: d.request_headers,
        expected_sha256: d.expected_sha256,
        destination: d.destination,
        partial_path: d.partial_path,
        final_url: d.final_url,
        response_status: d.response_status,
        response_headers: d.response_headers,
        etag: d.etag,
        last_modified: d.last_modified,
        committed_offset: d.committed_offset,
        resumable: d.resumable,
        attempts: d.attempts,
        last_error: d.last_error.map(error),
        started_at: d.started_at,
        finished_at: d.finished_at,
        resource_deadline: d.resource_deadline,
        retired: d.retired,
    }
}

fn session(s: crate::SessionInfo) -> SessionInfo {
    SessionInfo {
        identifier: s.identifier,
        // Protocol 1 knows commands and units only.
        config: crate::SessionConfig {
            launch: s.config.launch.filter(|l| !matches!(l, crate::LaunchSpec::DesktopApp { .. })),
            ..s.config
        },
        attached: s.attached,
        tasks: s.tasks,
        pending_events: s.pending_events,
        wake: WakeStatus {
            attempts: s.wake.attempts,
            last_wake: s.wake.last_wake,
            next_wake: s.wake.next_wake,
            last_error: s.wake.last_error.map(error),
        },
        invalidating: s.invalidating,
        created_at: s.created_at,
    }
}

fn status(s: crate::DaemonStatus) -> DaemonStatus {
    DaemonStatus {
        daemon_version: s.daemon_version,
        protocol_version: s.protocol_version,
        pid: s.pid,
        started_at: s.started_at,
        uptime_ms: s.uptime_ms,
        socket: s.socket,
        state_dir: s.state_dir,
        cache_dir: s.cache_dir,
        database: s.database,
        tasks: s.tasks,
        sessions: s.sessions,
        connections: s.connections,
        download_rate: s.download_rate,
        bytes_downloaded: s.bytes_downloaded,
        max_concurrent_downloads: s.max_concurrent_downloads,
    }
}
