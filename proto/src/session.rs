//! Sessions and the daemon on the wire: a session's configuration and how its app is
//! brought back, what a client is told about a session, and the daemon's status. The
//! evolution rule of [`crate::message`] applies.

use serde::{Deserialize, Serialize};

use crate::{ErrorInfo, Header, TaskCounts, UnixMillis};

/// How to bring the app back when its session has finished events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaunchSpec {
    /// An argv run directly (no shell), detached, with the `DLSESSION_*` environment.
    Command { argv: Vec<String> },
    /// `systemctl --user start UNIT`; a template (`app@.service`) gets the escaped identifier.
    SystemdUnit { unit: String },
    /// A desktop application (protocol 2): its `org.freedesktop.Application`
    /// `ActivateAction("dlsession-events", [identifier])` on the session bus, which
    /// D-Bus-activates it from its `.desktop` file (`DBusActivatable=true`); else the
    /// `.desktop` file's `Exec` line.
    DesktopApp { app_id: String },
}

/// The action a desktop application is activated with when its session has events; its
/// parameter is the session identifier.
pub const DESKTOP_ACTION: &str = "dlsession-events";

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
