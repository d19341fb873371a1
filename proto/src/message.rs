//! Requests, responses and events.
//!
//! These are the types of the current protocol version ([`crate::PROTOCOL_VERSION`]).
//! Evolution rule: new enum variants and new request kinds go at the end; nothing is
//! reordered or removed. A struct that gains a field, or an enum that gains a variant a
//! daemon may send, needs a new protocol version, with the earlier shape frozen in its
//! own module (see [`crate::v1`]) so the daemon keeps serving clients of every version it
//! supports. No serde attribute that bincode cannot honour (`flatten`, `untagged`, `tag`,
//! `skip_serializing_if`) is used here.

use serde::{Deserialize, Serialize};

use crate::{
    Challenge, ChallengeAnswer, DaemonStatus, ErrorInfo, Header, SessionConfig, SessionInfo, TaskDetail, TaskId,
    TaskInfo, TaskPage, TaskSpec, TaskState, UploadSpec,
};

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
    /// it when the app registers a wake handler). Only such connections (and protocol-1
    /// clients that announced an `app_id`, which cannot say) are sent `Wake`; if none
    /// rejoins the session within `wake_answer_ms`, the app is relaunched. → [`Response::Ok`]
    HandleWakes,
    /// Sets (or with `None` lifts) a bandwidth limit, in bytes per second: daemon-wide, of a
    /// session, or of one task. Takes effect on running downloads at once and is stored.
    /// → [`Response::Ok`]
    SetBandwidthLimit { target: LimitTarget, bytes_per_second: Option<u64> },
    /// → [`Response::BandwidthLimits`]
    GetBandwidthLimits,
    /// The network and power as the daemon sees them. → [`Response::Conditions`]
    GetConditions,
    /// When the session's tasks may run: on a metered network, on battery, only in good
    /// conditions. Stored with the session; running tasks follow at once. → [`Response::Ok`]
    SetSessionPolicy { identifier: String, policy: SessionPolicy },
    /// → [`Response::SessionPolicy`]
    GetSessionPolicy { identifier: String },
    /// Gives tasks their own policy: each field that is set overrides the session's (all
    /// or none of the tasks: an unknown or completed one refuses the whole request). Stored
    /// with the tasks; running ones follow at once. → [`Response::Ok`]
    SetTaskPolicy { tasks: Vec<TaskId>, policy: TaskPolicy },
    /// → [`Response::TaskPolicy`]
    GetTaskPolicy { task: TaskId },
    /// Whether the session keeps cookies (it does by default): off, it sends and keeps
    /// none, and the ones it held are deleted. → [`Response::Ok`]
    SetSessionCookies { identifier: String, enabled: bool },
    /// → [`Response::SessionCookies`] (never the cookies themselves: they are credentials).
    GetSessionCookies { identifier: String },
    /// Gives the session its own proxy, replacing the daemon's environment for its
    /// downloads (`None`: the environment's again). Stored; applies to attempts that start
    /// from now on. → [`Response::Ok`]
    SetSessionProxy { identifier: String, proxy: Option<SessionProxy> },
    /// → [`Response::SessionProxy`] (a password in the URL redacted).
    GetSessionProxy { identifier: String },
    // Protocol 4.
    /// Create upload tasks in one batch, like `CreateTasks` (each file is checked, and its
    /// size and modification time recorded, before any task exists). → [`Response::TasksCreated`]
    CreateUploads { identifier: String, uploads: Vec<UploadSpec>, resume: bool },
    /// Whether the session's tasks stop at a server's request for credentials and ask the
    /// app (a `Challenge` event), instead of failing with the 401 (the default). Off, the
    /// credentials it held are forgotten. → [`Response::Ok`]
    SetSessionChallenges { identifier: String, answers: bool },
    /// → [`Response::SessionChallenges`] (never a credential).
    GetSessionChallenges { identifier: String },
    /// Answers the challenge a task waits on (`WaitReason::AuthRequired`): the one of this
    /// `round` (an answer to an earlier challenge of the task, which may have come from
    /// another origin, is refused), or `None`: whichever it waits on now (a person at
    /// `dlsessionctl`). → [`Response::Ok`]
    AnswerChallenge { task: TaskId, round: Option<u32>, answer: ChallengeAnswer },
    /// The client certificate the session's downloads present to servers that ask for one
    /// (mutual TLS), read from files now (`None`: none). Stored; attempts that start from
    /// now on use it. → [`Response::Ok`]
    SetSessionClientCert { identifier: String, cert: Option<ClientCertificate> },
    /// → [`Response::SessionClientCert`] (the files, never the key).
    GetSessionClientCert { identifier: String },
    // Protocol 5.
    /// Resumes many tasks, each as `ControlTask { Resume }` would (a suspended task is
    /// queued, all in one commit; a waiting one retried now; a queued or running one is
    /// left as it is). All or nothing: an unknown or completed task refuses the whole
    /// request.
    /// → [`Response::Ok`]
    ResumeTasks { tasks: Vec<TaskId> },
    // Protocol 6.
    /// `request` at most once per `key` in its session: if the session already created
    /// tasks under `key`, the answer is those tasks' ids and nothing is created. A client
    /// sends a request again under the same key when its answer was lost (the connection
    /// broke), so a creation the daemon had committed is not made twice. Keys are kept a
    /// day. → the inner request's answer ([`Response::TasksCreated`]).
    Once { key: u128, request: CreateRequest },
    // Protocol 8.
    /// Paced delivery, for a client whose queue overflowed: the session attached on this
    /// connection has its unacknowledged events sent again from `from_seq` on (the client
    /// has those before it), in order after the answer, at most `room` of them; after
    /// `room` durable events the daemon holds the rest until the client asks again (from
    /// the seq after the last it took). `finished_events` follows once every event is out.
    /// Pacing lasts until the next attach. `session_in_use` when this connection is not the
    /// one attached. → [`Response::Ok`]
    ReplayEvents { identifier: String, from_seq: u64, room: u32 },
}

/// A request that creates tasks, as [`Request::Once`] carries it: its own type, not a
/// `Request`, so that requests cannot nest (decoding a nest would recurse as deep as a
/// frame allows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CreateRequest {
    /// As [`Request::CreateTasks`].
    Tasks { identifier: String, tasks: Vec<TaskSpec>, resume: bool },
    /// As [`Request::CreateUploads`].
    Uploads { identifier: String, uploads: Vec<UploadSpec>, resume: bool },
    /// As [`Request::CreateTaskFromResumeData`].
    FromResumeData { identifier: String, resume_data: Vec<u8>, resume: bool },
}

impl CreateRequest {
    /// `request` if it creates tasks, else `request` back.
    pub fn from_request(request: Request) -> Result<CreateRequest, Box<Request>> {
        match request {
            Request::CreateTasks { identifier, tasks, resume } => {
                Ok(CreateRequest::Tasks { identifier, tasks, resume })
            }
            Request::CreateUploads { identifier, uploads, resume } => {
                Ok(CreateRequest::Uploads { identifier, uploads, resume })
            }
            Request::CreateTaskFromResumeData { identifier, resume_data, resume } => {
                Ok(CreateRequest::FromResumeData { identifier, resume_data, resume })
            }
            other => Err(Box::new(other)),
        }
    }

    /// The request it stands for.
    pub fn into_request(self) -> Request {
        match self {
            CreateRequest::Tasks { identifier, tasks, resume } => Request::CreateTasks { identifier, tasks, resume },
            CreateRequest::Uploads { identifier, uploads, resume } => {
                Request::CreateUploads { identifier, uploads, resume }
            }
            CreateRequest::FromResumeData { identifier, resume_data, resume } => {
                Request::CreateTaskFromResumeData { identifier, resume_data, resume }
            }
        }
    }

    /// The session it creates tasks in.
    pub fn identifier(&self) -> &str {
        match self {
            CreateRequest::Tasks { identifier, .. }
            | CreateRequest::Uploads { identifier, .. }
            | CreateRequest::FromResumeData { identifier, .. } => identifier,
        }
    }

    /// As [`Request::name`] of the request it stands for.
    pub fn name(&self) -> &'static str {
        match self {
            CreateRequest::Tasks { .. } => "create_tasks",
            CreateRequest::Uploads { .. } => "create_uploads",
            CreateRequest::FromResumeData { .. } => "create_task_from_resume_data",
        }
    }
}

/// A session's client certificate: PEM files the daemon reads (the certificate, followed by
/// any intermediates, and the private key: PKCS#8, PKCS#1 or SEC1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientCertificate {
    pub cert_file: String,
    pub key_file: String,
}

/// When a session's tasks may run (like `URLSession`'s `allowsExpensiveNetworkAccess`,
/// `allowsConstrainedNetworkAccess` and `isDiscretionary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPolicy {
    /// May download over a metered network (NetworkManager's `Metered` yes or guess-yes).
    pub allows_metered: bool,
    /// May download while the machine runs on battery.
    pub allows_battery: bool,
    /// Only in good conditions: an unmetered network, and AC power or a battery at
    /// [`DISCRETIONARY_BATTERY_PERCENT`] or above.
    pub discretionary: bool,
    /// Wait for a route to the server when there is none (`no_network`); `false` completes
    /// the task with `not_connected` instead (`URLSession`'s `waitsForConnectivity`).
    pub waits_for_connectivity: bool,
    /// When the session's downloads are done and its app is not running, show a desktop
    /// notification (one per session, updated rather than repeated) whose action relaunches
    /// the app.
    pub notify: bool,
}

/// The battery level above which a discretionary session may run on battery.
pub const DISCRETIONARY_BATTERY_PERCENT: u8 = 50;

impl Default for SessionPolicy {
    fn default() -> SessionPolicy {
        SessionPolicy {
            allows_metered: true,
            allows_battery: true,
            discretionary: false,
            waits_for_connectivity: true,
            notify: false,
        }
    }
}

/// A task's own policy (like `URLRequest`'s `allowsExpensiveNetworkAccess`): each field
/// that is set overrides its session's [`SessionPolicy`]; an unset one follows the session,
/// also when the session's policy changes later. Notifications stay the session's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct TaskPolicy {
    pub allows_metered: Option<bool>,
    pub allows_battery: Option<bool>,
    pub discretionary: Option<bool>,
    pub waits_for_connectivity: Option<bool>,
}

impl TaskPolicy {
    /// The policy a task of a session with `session`'s policy runs under.
    pub fn over(self, session: SessionPolicy) -> SessionPolicy {
        SessionPolicy {
            allows_metered: self.allows_metered.unwrap_or(session.allows_metered),
            allows_battery: self.allows_battery.unwrap_or(session.allows_battery),
            discretionary: self.discretionary.unwrap_or(session.discretionary),
            waits_for_connectivity: self.waits_for_connectivity.unwrap_or(session.waits_for_connectivity),
            notify: session.notify,
        }
    }

    /// Nothing overridden: the task follows its session.
    pub fn is_empty(&self) -> bool {
        *self == TaskPolicy::default()
    }
}

/// A task's policy: its own overrides and what it runs under with its session's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPolicyInfo {
    pub own: TaskPolicy,
    pub effective: SessionPolicy,
}

/// A session's own proxy. `Debug` shows the URL redacted.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionProxy {
    /// Every download through this proxy (`http://`, `https://` (TLS to the proxy), `socks5h://`, `socks5://`,
    /// `socks4a://`, `socks4://`, credentials as `user:password@`), or `None`: direct.
    pub url: Option<String>,
    /// Hosts reached directly, as in `NO_PROXY` (names, addresses, CIDR blocks, `*`, any
    /// of them with `:port`).
    pub no_proxy: String,
}

impl std::fmt::Debug for SessionProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionProxy")
            .field("url", &self.url.as_deref().map(crate::redact::url))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// A session's cookie jar, as far as it may be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCookies {
    pub enabled: bool,
    /// Cookies held that have not expired.
    pub stored: u32,
}

/// The machine's network and power, as the daemon last saw them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Conditions {
    /// A route beyond the local networks exists (rtnetlink), and NetworkManager, when it
    /// runs, says neither that it is disconnected nor that connectivity is none, behind a
    /// portal or limited.
    pub online: bool,
    /// NetworkManager says the primary connection is metered (yes or guess-yes).
    pub metered: bool,
    pub on_battery: bool,
    /// The display device's charge, when UPower knows one.
    pub battery_percent: Option<u8>,
    /// Where the network facts come from: `rtnetlink`, `rtnetlink+NetworkManager`, or why
    /// NetworkManager could not be asked.
    pub network_source: String,
    /// `UPower`, or why it could not be asked (then: on AC is assumed).
    pub power_source: String,
}

/// Which bandwidth limit [`Request::SetBandwidthLimit`] changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitTarget {
    /// Every download of the daemon together.
    Global,
    /// The downloads of one session together (its `bandwidth_limit`).
    Session { identifier: String },
    /// One task.
    Task { task: TaskId },
}

/// The bandwidth limits in force, in bytes per second (absent: none).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BandwidthLimits {
    pub global: Option<u64>,
    /// Sessions with a limit, by identifier.
    pub sessions: Vec<(String, u64)>,
    /// Live tasks with a limit of their own.
    pub tasks: Vec<(TaskId, u64)>,
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
            Request::SetBandwidthLimit { .. } => "set_bandwidth_limit",
            Request::GetBandwidthLimits => "get_bandwidth_limits",
            Request::GetConditions => "get_conditions",
            Request::SetSessionPolicy { .. } => "set_session_policy",
            Request::GetSessionPolicy { .. } => "get_session_policy",
            Request::SetTaskPolicy { .. } => "set_task_policy",
            Request::GetTaskPolicy { .. } => "get_task_policy",
            Request::SetSessionCookies { .. } => "set_session_cookies",
            Request::GetSessionCookies { .. } => "get_session_cookies",
            Request::SetSessionProxy { .. } => "set_session_proxy",
            Request::GetSessionProxy { .. } => "get_session_proxy",
            Request::CreateUploads { .. } => "create_uploads",
            Request::SetSessionChallenges { .. } => "set_session_challenges",
            Request::GetSessionChallenges { .. } => "get_session_challenges",
            Request::AnswerChallenge { .. } => "answer_challenge",
            Request::SetSessionClientCert { .. } => "set_session_client_cert",
            Request::GetSessionClientCert { .. } => "get_session_client_cert",
            Request::ResumeTasks { .. } => "resume_tasks",
            Request::Once { request, .. } => request.name(),
            Request::ReplayEvents { .. } => "replay_events",
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
    BandwidthLimits(BandwidthLimits),
    Conditions(Conditions),
    SessionPolicy(SessionPolicy),
    TaskPolicy(TaskPolicyInfo),
    SessionCookies(SessionCookies),
    /// `None`: the daemon's environment.
    SessionProxy(Option<SessionProxy>),
    // Protocol 4.
    SessionChallenges(SessionChallenges),
    SessionClientCert(Option<ClientCertificate>),
}

/// Whether a session answers challenges, and how many credentials it holds (never which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionChallenges {
    pub answers: bool,
    /// Credentials held for its protection spaces (kept or in memory) and for its tasks.
    pub credentials: u32,
    /// Of those, the ones stored in the database.
    pub kept: u32,
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
            Response::BandwidthLimits(_) => "bandwidth_limits",
            Response::Conditions(_) => "conditions",
            Response::SessionPolicy(_) => "session_policy",
            Response::TaskPolicy(_) => "task_policy",
            Response::SessionCookies(_) => "session_cookies",
            Response::SessionProxy(_) => "session_proxy",
            Response::SessionChallenges(_) => "session_challenges",
            Response::SessionClientCert(_) => "session_client_cert",
        }
    }
}

/// What `Request::Wake` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WakeOutcome {
    /// The session is attached: events are delivered live, nothing to wake.
    Attached,
    /// A `wake` message went to this many connections of the session's `app_id` that
    /// handle wakes.
    Woken { connections: u32 },
    /// The relaunch command was started.
    Launched { pid: u32 },
    /// `systemctl --user start UNIT` was run.
    UnitStarted { unit: String },
    /// No connection of the session's `app_id` handles wakes and the session has no
    /// launch spec.
    NoTarget,
    // Protocol 2.
    /// The desktop application was activated over D-Bus (or its `.desktop` `Exec` line run:
    /// then `Launched`). (Protocol 2.)
    Activated { app_id: String },
}

/// Events arrive on a connection that attached a session, watches tasks, or handles wakes
/// for its `app_id` (`Request::HandleWakes`).
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
    // Protocol 4.
    /// Coalesced progress of an upload's body (`URLSession`'s `didSendBodyData`).
    SendProgress {
        identifier: String,
        task: TaskId,
        bytes_sent: u64,
        total_bytes_sent: u64,
        total_bytes_expected_to_send: u64,
    },
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
    // Protocol 4.
    /// An upload's final response: its status, headers, and body in a file at `body` (at
    /// most [`crate::UPLOAD_RESPONSE_BODY_LIMIT`] bytes of it; `body_truncated` when there
    /// was more). Comes before `Completed`, also when the status makes the task fail.
    UploadResponse { task: TaskId, status: u16, headers: Vec<Header>, body: String, body_truncated: bool },
    /// The server asked for credentials; the task waits (`AuthRequired`) for the app's
    /// `AnswerChallenge`. Acknowledged without an answer, it fails the task as `Fail` would.
    Challenge { task: TaskId, challenge: Challenge },
}

impl DurableEvent {
    pub fn task(&self) -> Option<TaskId> {
        match self {
            DurableEvent::ResumedAtOffset { task, .. }
            | DurableEvent::FinishedDownloading { task, .. }
            | DurableEvent::Completed { task, .. }
            | DurableEvent::UploadResponse { task, .. }
            | DurableEvent::Challenge { task, .. } => Some(*task),
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
            DurableEvent::UploadResponse { .. } => "upload_response",
            DurableEvent::Challenge { .. } => "challenge",
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
