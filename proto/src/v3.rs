//! Protocol 3, frozen where protocol 4 changed it: tasks gained `upload` (so every message
//! that carries a `TaskInfo` has a new shape), and an upload's events are new variants.
//! A protocol-3 (or 2) client is sent these shapes ([`downgrade`]); what it cannot express
//! becomes the nearest thing it can (docs/protocol.md, "Older clients"):
//!
//! - a task's `upload` is dropped (its response still counts in `bytes_received`);
//! - `SendProgress` → `Progress` with the bytes sent;
//! - `UploadResponse` → `FinishedDownloading` with the response body's file;
//! - `Challenge` → `ResumedAtOffset { offset: 0 }` (acknowledging it fails the task with the
//!   server's 401, as before), the wait `AuthRequired` → `Suspended`;
//! - the answer to `GetSessionChallenges` (which such a client cannot send) → `Ok`.
//!
//! Nothing here may change: `tests/golden/v3` holds the bytes these types must produce.

use serde::{Deserialize, Serialize};

use crate::{
    BandwidthLimits, Conditions, DaemonStatus, DetachReason, DurableEvent, ErrorInfo, Header, SessionCookies,
    SessionInfo, SessionPage, SessionPolicy, SessionProxy, TaskId, TaskPolicyInfo, TaskState, UnixMillis, WaitReason,
    WakeOutcome, WakeReason, redact,
};

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
    SessionsPage(SessionPage),
    BandwidthLimits(BandwidthLimits),
    Conditions(Conditions),
    SessionPolicy(SessionPolicy),
    TaskPolicy(TaskPolicyInfo),
    SessionCookies(SessionCookies),
    SessionProxy(Option<SessionProxy>),
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskPage {
    pub tasks: Vec<TaskInfo>,
    pub next_after: Option<TaskId>,
}

impl std::fmt::Debug for TaskInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskInfo")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("url", &redact::Shown(&self.url))
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TaskDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskDetail").field("info", &self.info).finish_non_exhaustive()
    }
}

/// A message of the current protocol in protocol 3's shapes.
pub fn downgrade(msg: crate::ServerMessage) -> ServerMessage {
    match msg {
        crate::ServerMessage::Response { id, result } => ServerMessage::Response { id, result: result.map(response) },
        crate::ServerMessage::Event(e) => ServerMessage::Event(event(e)),
    }
}

fn response(r: crate::Response) -> Response {
    use crate::Response as R;
    match r {
        R::Ok => Response::Ok,
        R::Status(s) => Response::Status(s),
        R::Session(s) => Response::Session(s),
        R::Sessions(v) => Response::Sessions(v),
        R::TasksCreated(ids) => Response::TasksCreated(ids),
        R::ResumeData(d) => Response::ResumeData(d),
        R::Task(d) => Response::Task(detail(d)),
        R::Tasks(p) => {
            Response::Tasks(TaskPage { tasks: p.tasks.into_iter().map(task).collect(), next_after: p.next_after })
        }
        R::Wake(w) => Response::Wake(w),
        R::SessionsPage(p) => Response::SessionsPage(p),
        R::BandwidthLimits(b) => Response::BandwidthLimits(b),
        R::Conditions(c) => Response::Conditions(c),
        R::SessionPolicy(p) => Response::SessionPolicy(p),
        R::TaskPolicy(p) => Response::TaskPolicy(p),
        R::SessionCookies(c) => Response::SessionCookies(c),
        R::SessionProxy(p) => Response::SessionProxy(p),
        // Only sent in answer to a protocol-4 request.
        R::SessionChallenges(_) | R::SessionClientCert(_) => Response::Ok,
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

/// A durable event in protocol 3's variants.
pub fn durable(e: DurableEvent) -> DurableEvent {
    match e {
        // The response body is a file the app takes, as a download's is.
        DurableEvent::UploadResponse { task, body, .. } => DurableEvent::FinishedDownloading { task, location: body },
        // An app that cannot answer acknowledges it, which fails the task with the server's
        // 401 as before protocol 4; meanwhile the event is harmless news of an attempt.
        DurableEvent::Challenge { task, .. } => DurableEvent::ResumedAtOffset { task, offset: 0, expected_total: None },
        other => other,
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
        error: t.error,
        created_at: t.created_at,
        wait: t.wait.map(|w| match w {
            WaitReason::AuthRequired { .. } => WaitReason::Suspended,
            other => other,
        }),
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
        last_error: d.last_error,
        started_at: d.started_at,
        finished_at: d.finished_at,
        resource_deadline: d.resource_deadline,
        retired: d.retired,
    }
}
