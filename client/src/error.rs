//! What can go wrong for a client of the daemon: one error type, each daemon-reported
//! error carrying its stable code.

use std::path::PathBuf;

use dlsession_proto::{ErrorCode, ErrorInfo, ProtoError};

/// Everything that can go wrong talking to the daemon.
///
/// Errors the daemon reports carry their stable code (docs/protocol.md, "Error codes"); see [`Error::code`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing listens on the socket.
    #[error(
        "dlsessiond is not running (cannot connect to {path}: {source}); start it with `dlsessiond &` \
         or `systemctl --user start dlsessiond`"
    )]
    NotRunning {
        /// The socket tried.
        path: PathBuf,
        /// What connecting said.
        source: std::io::Error,
    },
    /// The daemon speaks another protocol version.
    #[error("protocol_version: this client speaks protocol {ours}, dlsessiond speaks {theirs}; upgrade the older one")]
    VersionMismatch {
        /// This library's protocol version.
        ours: u16,
        /// The daemon's.
        theirs: u16,
    },
    /// The daemon refused the connection during the handshake.
    #[error("{}: dlsessiond refused the connection: {reason}", code.as_str())]
    Refused {
        /// Why, as a stable code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// The daemon answered the request with an error.
    #[error("{0}")]
    Daemon(ErrorInfo),
    /// The daemon answered with a response of the wrong kind.
    #[error("internal: unexpected response from dlsessiond (expected {expected}, got {got})")]
    UnexpectedResponse {
        /// The kind of response the request calls for.
        expected: &'static str,
        /// The kind that came.
        got: &'static str,
    },
    /// The connection closed.
    #[error("internal: the connection to dlsessiond was lost{}", .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Disconnected {
        /// Why, when known.
        reason: Option<String>,
    },
    /// A frame from the daemon could not be read.
    #[error("internal: protocol error talking to dlsessiond: {0}")]
    Protocol(#[from] ProtoError),
    /// A value given to this library is invalid (checked before it is sent).
    #[error("{0}")]
    Invalid(ErrorInfo),
    /// This attachment of the session ended: another process took it over.
    #[error("session_in_use: this session was {reason} (attach again with takeover to take it back)", reason = .reason.as_str().replace('_', " "))]
    Detached {
        /// How the attachment ended.
        reason: dlsession_proto::DetachReason,
    },
    /// This `Session` is no longer attached: this process detached it (or its delegate
    /// panicked, which detaches).
    #[error("invalid_request: this session is no longer attached ({why}); attach again")]
    NotAttached {
        /// What ended the attachment.
        why: &'static str,
    },
    /// Where the daemon's socket is could not be determined.
    #[error("internal: cannot determine where dlsessiond's socket is: {0}")]
    NoSocketPath(#[from] dlsession_proto::paths::NoHomeDir),
    /// Nothing listened, and starting the daemon on demand failed.
    #[error("dlsessiond is not running and could not be started: {reason}")]
    StartFailed {
        /// What went wrong starting it.
        reason: String,
    },
    /// The daemon did not answer a request in time (`ClientOptions::request_timeout`). The
    /// request may still take effect: the daemon answers only once its change is durable.
    #[error("timed_out: dlsessiond did not answer {request} within {} s", .after.as_secs_f64())]
    TimedOut {
        /// The kind of request.
        request: &'static str,
        /// How long it waited.
        after: std::time::Duration,
    },
}

impl Error {
    /// The stable code of this error (docs/protocol.md, "Error codes").
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Daemon(e) | Error::Invalid(e) => e.code,
            Error::VersionMismatch { .. } => ErrorCode::ProtocolVersion,
            Error::TimedOut { .. } => ErrorCode::TimedOut,
            Error::Refused { code, .. } => *code,
            Error::Detached { .. } => ErrorCode::SessionInUse,
            Error::NotAttached { .. } => ErrorCode::InvalidRequest,
            Error::NotRunning { .. }
            | Error::UnexpectedResponse { .. }
            | Error::Disconnected { .. }
            | Error::Protocol(_)
            | Error::NoSocketPath(_)
            | Error::StartFailed { .. } => ErrorCode::Internal,
        }
    }

    /// The daemon's error details, when it reported one.
    pub fn info(&self) -> Option<&ErrorInfo> {
        match self {
            Error::Daemon(e) | Error::Invalid(e) => Some(e),
            _ => None,
        }
    }

    /// True when the daemon could not be reached at all (not running, or gone).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::NotRunning { .. } | Error::Disconnected { .. } | Error::StartFailed { .. })
    }
}

/// The result of the library's calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
