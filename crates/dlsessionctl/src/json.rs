//! JSON output: dedicated structs whose field names are the stable contract of
//! `--json` (docs/cli.md, "JSON output"). Wire types are converted here, never serialized directly.
//! Times are milliseconds since the Unix epoch; URLs are redacted.

use dlsession_proto::redact;
use std::io::Write;

use serde::Serialize;

use dlsession_proto::{
    DaemonStatus, ErrorInfo, Header, LaunchSpec, SessionInfo, TaskCounts, TaskDetail, TaskInfo, UploadInfo, WaitReason,
};

use crate::error::Result;

/// Writes one JSON document followed by a newline.
pub fn print<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct ErrorJson {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
}

impl From<&ErrorInfo> for ErrorJson {
    fn from(e: &ErrorInfo) -> ErrorJson {
        ErrorJson { code: e.code.as_str(), message: e.message.clone(), http_status: e.http_status }
    }
}

pub fn error(e: Option<&ErrorInfo>) -> Option<ErrorJson> {
    e.map(ErrorJson::from)
}

#[derive(Debug, Serialize)]
pub struct TaskCountsJson {
    pub suspended: u64,
    pub queued: u64,
    pub running: u64,
    pub waiting: u64,
    pub completed: u64,
}

impl From<&TaskCounts> for TaskCountsJson {
    fn from(c: &TaskCounts) -> TaskCountsJson {
        TaskCountsJson {
            suspended: c.suspended,
            queued: c.queued,
            running: c.running,
            waiting: c.waiting,
            completed: c.completed,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StatusJson {
    pub daemon_version: String,
    pub protocol_version: u16,
    pub pid: u32,
    pub started_at: u64,
    pub uptime_ms: u64,
    pub socket: String,
    pub state_dir: String,
    pub cache_dir: String,
    pub database: String,
    pub tasks: TaskCountsJson,
    pub sessions: u64,
    pub connections: u64,
    pub download_rate: u64,
    pub bytes_downloaded: u64,
    pub max_concurrent_downloads: u32,
    /// `null`, or why the daemon cannot write its database (changes are refused until it can).
    pub storage: Option<ErrorJson>,
    pub network: NetworkJson,
    pub power: PowerJson,
}

#[derive(Debug, Serialize)]
pub struct NetworkJson {
    pub online: bool,
    pub metered: bool,
    /// Where the facts come from (`rtnetlink+NetworkManager`, …).
    pub source: String,
}

#[derive(Debug, Serialize)]
pub struct PowerJson {
    pub on_battery: bool,
    pub battery_percent: Option<u8>,
    /// `UPower`, or why it could not be asked.
    pub source: String,
}

impl StatusJson {
    pub fn new(s: &DaemonStatus, c: &dlsession_proto::Conditions) -> StatusJson {
        StatusJson {
            network: NetworkJson { online: c.online, metered: c.metered, source: c.network_source.clone() },
            power: PowerJson {
                on_battery: c.on_battery,
                battery_percent: c.battery_percent,
                source: c.power_source.clone(),
            },
            daemon_version: s.daemon_version.clone(),
            protocol_version: s.protocol_version,
            pid: s.pid,
            started_at: s.started_at,
            uptime_ms: s.uptime_ms,
            socket: s.socket.clone(),
            state_dir: s.state_dir.clone(),
            cache_dir: s.cache_dir.clone(),
            database: s.database.clone(),
            tasks: TaskCountsJson::from(&s.tasks),
            storage: s.storage.as_ref().map(ErrorJson::from),
            sessions: s.sessions,
            connections: s.connections,
            download_rate: s.download_rate,
            bytes_downloaded: s.bytes_downloaded,
            max_concurrent_downloads: s.max_concurrent_downloads,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LaunchJson {
    Command { argv: Vec<String> },
    SystemdUnit { unit: String },
    DesktopApp { app_id: String },
}

impl From<&LaunchSpec> for LaunchJson {
    fn from(l: &LaunchSpec) -> LaunchJson {
        match l {
            LaunchSpec::Command { argv } => LaunchJson::Command { argv: argv.clone() },
            LaunchSpec::SystemdUnit { unit } => LaunchJson::SystemdUnit { unit: unit.clone() },
            LaunchSpec::DesktopApp { app_id } => LaunchJson::DesktopApp { app_id: app_id.clone() },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SessionJson {
    pub identifier: String,
    pub app_id: Option<String>,
    pub attached: bool,
    pub pending_events: u64,
    pub tasks: TaskCountsJson,
    /// When the app is woken next (ms), if a wake is scheduled.
    pub next_wake: Option<u64>,
    pub wake_attempts: u32,
    pub last_wake: Option<u64>,
    pub wake_error: Option<ErrorJson>,
    pub invalidating: bool,
    pub launch: Option<LaunchJson>,
    pub created_at: u64,
}

impl From<&SessionInfo> for SessionJson {
    fn from(s: &SessionInfo) -> SessionJson {
        SessionJson {
            identifier: s.identifier.clone(),
            app_id: s.config.app_id.clone(),
            attached: s.attached,
            pending_events: s.pending_events,
            tasks: TaskCountsJson::from(&s.tasks),
            next_wake: s.wake.next_wake,
            wake_attempts: s.wake.attempts,
            last_wake: s.wake.last_wake,
            wake_error: error(s.wake.last_error.as_ref()),
            invalidating: s.invalidating,
            launch: s.config.launch.as_ref().map(LaunchJson::from),
            created_at: s.created_at,
        }
    }
}

/// Why a task is not running: `{"reason": "backoff", "until": …, …}`.
#[derive(Debug, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum WaitJson {
    Suspended,
    GlobalLimit { limit: u32 },
    HostLimit { host: String, limit: u32 },
    SessionLimit { limit: u32 },
    EarliestBegin { at: u64 },
    Backoff { until: u64, attempt: u32, last_error: ErrorJson },
    EventsPending { next_wake: Option<u64> },
    DestinationUnavailable { error: ErrorJson, attempt: u32, next_try: Option<u64> },
    StorageFull { error: ErrorJson },
    NoNetwork { since: u64 },
    MeteredNetwork,
    OnBattery,
    Discretionary,
    AuthRequired { scheme: String, realm: Option<String>, origin: String, proxy: bool, round: u32 },
}

impl From<&WaitReason> for WaitJson {
    fn from(w: &WaitReason) -> WaitJson {
        match w {
            WaitReason::Suspended => WaitJson::Suspended,
            WaitReason::GlobalLimit { limit } => WaitJson::GlobalLimit { limit: *limit },
            WaitReason::HostLimit { host, limit } => WaitJson::HostLimit { host: host.clone(), limit: *limit },
            WaitReason::SessionLimit { limit } => WaitJson::SessionLimit { limit: *limit },
            WaitReason::EarliestBegin { at } => WaitJson::EarliestBegin { at: *at },
            WaitReason::Backoff { until, attempt, last_error } => {
                WaitJson::Backoff { until: *until, attempt: *attempt, last_error: ErrorJson::from(last_error) }
            }
            WaitReason::EventsPending { next_wake } => WaitJson::EventsPending { next_wake: *next_wake },
            WaitReason::DestinationUnavailable { error, attempt, next_try } => WaitJson::DestinationUnavailable {
                error: ErrorJson::from(error),
                attempt: *attempt,
                next_try: *next_try,
            },
            WaitReason::StorageFull { error } => WaitJson::StorageFull { error: ErrorJson::from(error) },
            WaitReason::NoNetwork { since } => WaitJson::NoNetwork { since: *since },
            WaitReason::MeteredNetwork => WaitJson::MeteredNetwork,
            WaitReason::OnBattery => WaitJson::OnBattery,
            WaitReason::Discretionary => WaitJson::Discretionary,
            WaitReason::AuthRequired { challenge: c } => WaitJson::AuthRequired {
                scheme: c.scheme.clone(),
                realm: c.realm.clone(),
                origin: c.origin.clone(),
                proxy: c.proxy,
                round: c.round,
            },
        }
    }
}

/// One task, as `tasks`, `show` and `watch` print it.
#[derive(Debug, Serialize)]
pub struct TaskJson {
    pub id: u64,
    pub session: String,
    pub state: &'static str,
    pub url: String,
    pub bytes_received: u64,
    pub bytes_expected: Option<u64>,
    pub location: Option<String>,
    pub error: Option<ErrorJson>,
    pub description: Option<String>,
    pub priority: f32,
    /// Bytes per second.
    pub speed: u64,
    pub created_at: u64,
    pub wait: Option<WaitJson>,
    /// Set for an upload (its `bytes_received` count the response body).
    pub upload: Option<UploadJson>,
}

/// What an upload sends.
#[derive(Debug, Serialize)]
pub struct UploadJson {
    pub method: &'static str,
    pub file: String,
    pub bytes_sent: u64,
    pub bytes_total: u64,
    pub idempotent: bool,
    /// The server offered to resume it.
    pub resumable: bool,
}

impl From<&UploadInfo> for UploadJson {
    fn from(u: &UploadInfo) -> UploadJson {
        UploadJson {
            method: u.method.as_str(),
            file: u.file.clone(),
            bytes_sent: u.bytes_sent,
            bytes_total: u.bytes_total,
            idempotent: u.idempotent,
            resumable: u.resumable,
        }
    }
}

impl From<&TaskInfo> for TaskJson {
    fn from(t: &TaskInfo) -> TaskJson {
        TaskJson {
            id: t.id,
            session: t.session.clone(),
            state: t.state.as_str(),
            url: redact::url(&t.url),
            bytes_received: t.bytes_received,
            bytes_expected: t.bytes_expected,
            location: t.location.clone(),
            error: error(t.error.as_ref()),
            description: t.description.clone(),
            priority: t.priority,
            speed: t.speed,
            created_at: t.created_at,
            wait: t.wait.as_ref().map(WaitJson::from),
            upload: t.upload.as_ref().map(UploadJson::from),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct HeaderJson {
    pub name: String,
    /// `REDACTED` for credentials (`Authorization`, `Cookie`…).
    pub value: String,
}

fn headers(h: &[Header]) -> Vec<HeaderJson> {
    h.iter().map(|h| HeaderJson { name: h.name.clone(), value: h.display_value().to_owned() }).collect()
}

/// Everything about one task (`show --json`): the task fields plus the details.
#[derive(Debug, Serialize)]
pub struct TaskDetailJson {
    #[serde(flatten)]
    pub task: TaskJson,
    pub final_url: Option<String>,
    pub request_headers: Vec<HeaderJson>,
    pub response_status: Option<u16>,
    pub response_headers: Vec<HeaderJson>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub expected_sha256: Option<String>,
    pub committed_offset: u64,
    pub resumable: bool,
    pub attempts: u32,
    pub last_error: Option<ErrorJson>,
    pub destination: Option<String>,
    pub partial_path: Option<String>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub resource_deadline: Option<u64>,
    pub retired: bool,
    /// The task's own bandwidth limit in bytes per second (live tasks).
    pub bandwidth_limit: Option<u64>,
    /// What the task sets itself over its session's policy (live tasks; `null` fields
    /// follow the session).
    pub own_policy: Option<TaskPolicyJson>,
}

/// A task's own policy: `null` follows its session.
#[derive(Debug, Serialize)]
pub struct TaskPolicyJson {
    pub allows_metered: Option<bool>,
    pub allows_battery: Option<bool>,
    pub discretionary: Option<bool>,
    pub waits_for_connectivity: Option<bool>,
}

impl From<dlsession_proto::TaskPolicy> for TaskPolicyJson {
    fn from(p: dlsession_proto::TaskPolicy) -> TaskPolicyJson {
        TaskPolicyJson {
            allows_metered: p.allows_metered,
            allows_battery: p.allows_battery,
            discretionary: p.discretionary,
            waits_for_connectivity: p.waits_for_connectivity,
        }
    }
}

impl From<&TaskDetail> for TaskDetailJson {
    fn from(d: &TaskDetail) -> TaskDetailJson {
        TaskDetailJson {
            task: TaskJson::from(&d.info),
            final_url: d.final_url.as_deref().map(redact::url),
            request_headers: headers(&d.request_headers),
            response_status: d.response_status,
            response_headers: headers(&d.response_headers),
            etag: d.etag.clone(),
            last_modified: d.last_modified.clone(),
            expected_sha256: d.expected_sha256.map(|h| dlsession_proto::validate::to_hex(&h)),
            committed_offset: d.committed_offset,
            resumable: d.resumable,
            attempts: d.attempts,
            last_error: error(d.last_error.as_ref()),
            destination: d.destination.clone(),
            partial_path: d.partial_path.clone(),
            started_at: d.started_at,
            finished_at: d.finished_at,
            resource_deadline: d.resource_deadline,
            retired: d.retired,
            bandwidth_limit: None,
            own_policy: None,
        }
    }
}

/// `get --json`: one line per created task.
#[derive(Debug, Serialize)]
pub struct CreatedJson<'a> {
    pub task: u64,
    pub session: &'a str,
    pub url: String,
    pub destination: &'a str,
}

/// `get --json --wait`: one line per finished task.
#[derive(Debug, Serialize)]
pub struct FinishedJson<'a> {
    pub task: u64,
    pub session: &'a str,
    pub state: &'static str,
    pub location: Option<&'a str>,
    pub bytes_received: u64,
    pub error: Option<ErrorJson>,
    /// An upload's response body (UTF-8, invalid sequences replaced): its file goes once
    /// the command acknowledges the task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
}

/// `pause`, `resume`, `cancel`.
#[derive(Debug, Serialize)]
pub struct ControlJson {
    pub task: u64,
    pub action: &'static str,
    pub ok: bool,
}

/// `invalidate` of a session its app emptied before the command could look at it.
#[derive(Debug, Serialize)]
pub struct RemovedJson<'a> {
    pub identifier: &'a str,
    pub removed: bool,
}

/// `wake`.
#[derive(Debug, Serialize)]
pub struct WakeJson<'a> {
    pub session: &'a str,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
}

/// `watch --json`: JSON lines of task updates and progress.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WatchJson<'a> {
    Task(TaskJson),
    Progress {
        task: u64,
        session: &'a str,
        bytes_written: u64,
        total_bytes_written: u64,
        total_bytes_expected: Option<u64>,
    },
    /// An upload's body going out.
    SendProgress {
        task: u64,
        session: &'a str,
        bytes_sent: u64,
        total_bytes_sent: u64,
        total_bytes_expected_to_send: u64,
    },
}

/// `attach --json`: one line per delivered event.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AttachEventJson {
    ResumedAtOffset {
        task: u64,
        offset: u64,
        expected_total: Option<u64>,
    },
    FinishedDownloading {
        task: u64,
        /// Where the file is now (after `--move-to`, its new path).
        location: String,
        /// Where dlsessiond put it, when it was moved.
        #[serde(skip_serializing_if = "Option::is_none")]
        moved_from: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        move_error: Option<ErrorJson>,
    },
    /// An upload's final response; `body` is where its body file is now.
    UploadResponse {
        task: u64,
        status: u16,
        body: String,
        body_truncated: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        move_error: Option<ErrorJson>,
    },
    Completed {
        task: u64,
        error: Option<ErrorJson>,
    },
    DidBecomeInvalid {
        error: Option<ErrorJson>,
    },
    FinishedEvents {
        session: String,
    },
    Detached {
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlsession_proto::{ErrorCode, TaskState};
    use serde_json::json;

    fn info() -> TaskInfo {
        TaskInfo {
            id: 12,
            session: "s".into(),
            state: TaskState::Waiting,
            url: "https://u:p@h/a.bin?token=t".into(),
            description: None,
            priority: 0.5,
            bytes_received: 10,
            bytes_expected: Some(100),
            speed: 0,
            location: None,
            error: None,
            created_at: 5,
            upload: None,
            wait: Some(WaitReason::Backoff {
                until: 9,
                attempt: 3,
                last_error: ErrorInfo::new(ErrorCode::Network, "reset"),
            }),
        }
    }

    #[test]
    fn task_fields() {
        let v = serde_json::to_value(TaskJson::from(&info())).unwrap();
        assert_eq!(v["id"], 12);
        assert_eq!(v["state"], "waiting");
        assert_eq!(v["url"], "https://h/a.bin?token=REDACTED");
        assert_eq!(v["error"], serde_json::Value::Null);
        assert_eq!(
            v["wait"],
            json!({"reason": "backoff", "until": 9, "attempt": 3, "last_error": {"code": "network", "message": "reset"}})
        );
        for key in ["session", "bytes_received", "bytes_expected", "location"] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn errors_carry_http_status_only_when_present() {
        let e = serde_json::to_value(ErrorJson::from(&ErrorInfo::http(404, "not found"))).unwrap();
        assert_eq!(e, json!({"code": "http_status", "message": "not found", "http_status": 404}));
        let e = serde_json::to_value(ErrorJson::from(&ErrorInfo::new(ErrorCode::Cancelled, "x"))).unwrap();
        assert_eq!(e, json!({"code": "cancelled", "message": "x"}));
    }

    #[test]
    fn event_lines_are_tagged() {
        let v = serde_json::to_value(AttachEventJson::Completed { task: 3, error: None }).unwrap();
        assert_eq!(v, json!({"event": "completed", "task": 3, "error": null}));
        let v = serde_json::to_value(WatchJson::Task(TaskJson::from(&info()))).unwrap();
        assert_eq!(v["event"], "task");
        assert_eq!(v["id"], 12);
    }
}
