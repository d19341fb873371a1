//! Stable error codes (docs/protocol.md, "Error codes") and the errors of the wire layer itself.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A stable, snake_case error code shared by the API, events and the CLI.
///
/// Encoded on the wire by position: only ever append new codes at the end.
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
    // Protocol 2.
    /// The daemon's state directory refuses writes (full disk, I/O error): reads are
    /// answered, changes are refused until it recovers by itself.
    StorageFull,
    /// A finished download could not be moved to its destination; the data is kept.
    DestinationUnavailable,
    /// No route to the server, and the session does not wait for connectivity.
    NotConnected,
    // Protocol 7.
    /// The daemon is shutting down: the request was refused, not run, and may be sent
    /// again once the daemon is back (the client library does so by itself). Only ever a
    /// request's answer.
    ShuttingDown,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 25] = [
        ErrorCode::InvalidUrl,
        ErrorCode::UnsupportedScheme,
        ErrorCode::InvalidIdentifier,
        ErrorCode::InvalidRequest,
        ErrorCode::SessionInUse,
        ErrorCode::NoSuchSession,
        ErrorCode::NoSuchTask,
        ErrorCode::SessionInvalidated,
        ErrorCode::HttpStatus,
        ErrorCode::Network,
        ErrorCode::Tls,
        ErrorCode::TimedOut,
        ErrorCode::TooManyRedirects,
        ErrorCode::CannotResume,
        ErrorCode::ChecksumMismatch,
        ErrorCode::InsufficientSpace,
        ErrorCode::FileError,
        ErrorCode::Cancelled,
        ErrorCode::ProtocolVersion,
        ErrorCode::PermissionDenied,
        ErrorCode::Internal,
        ErrorCode::StorageFull,
        ErrorCode::DestinationUnavailable,
        ErrorCode::NotConnected,
        ErrorCode::ShuttingDown,
    ];

    /// The stable snake_case name, as used in JSON output and CLI messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidUrl => "invalid_url",
            ErrorCode::UnsupportedScheme => "unsupported_scheme",
            ErrorCode::InvalidIdentifier => "invalid_identifier",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::SessionInUse => "session_in_use",
            ErrorCode::NoSuchSession => "no_such_session",
            ErrorCode::NoSuchTask => "no_such_task",
            ErrorCode::SessionInvalidated => "session_invalidated",
            ErrorCode::HttpStatus => "http_status",
            ErrorCode::Network => "network",
            ErrorCode::Tls => "tls",
            ErrorCode::TimedOut => "timed_out",
            ErrorCode::TooManyRedirects => "too_many_redirects",
            ErrorCode::CannotResume => "cannot_resume",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::InsufficientSpace => "insufficient_space",
            ErrorCode::FileError => "file_error",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::ProtocolVersion => "protocol_version",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Internal => "internal",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::DestinationUnavailable => "destination_unavailable",
            ErrorCode::NotConnected => "not_connected",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }

    /// Parses a snake_case name back into a code.
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it travels on the wire: a code, a human message, and the HTTP status
/// where the code is [`ErrorCode::HttpStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    pub http_status: Option<u16>,
}

/// The longest message an [`ErrorInfo`] made by `new` or `http` carries, in bytes. A
/// message may quote what a server sent (a redirect's location, a header): unbounded, one
/// stored error could outgrow a frame and make its task's events undeliverable.
pub const MAX_ERROR_MESSAGE: usize = 4096;

impl ErrorInfo {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorInfo {
        ErrorInfo { code, message: bounded(message.into()), http_status: None }
    }

    pub fn http(status: u16, message: impl Into<String>) -> ErrorInfo {
        ErrorInfo { code: ErrorCode::HttpStatus, message: bounded(message.into()), http_status: Some(status) }
    }
}

/// `message` cut to [`MAX_ERROR_MESSAGE`] bytes (on a character boundary, ending in "…").
fn bounded(mut message: String) -> String {
    if message.len() > MAX_ERROR_MESSAGE {
        let ellipsis = '…';
        let mut cut = MAX_ERROR_MESSAGE - ellipsis.len_utf8();
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push(ellipsis);
    }
    message
}

impl fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorInfo {}

/// What can go wrong while framing, encoding or decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("message could not be encoded: {0}")]
    Encode(String),
    #[error("{trailing} unexpected bytes after the message")]
    TrailingBytes { trailing: usize },
    #[error("peer is not a dlsessiond endpoint (bad magic)")]
    BadMagic,
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_bounded_on_a_character_boundary() {
        let long = ErrorInfo::new(ErrorCode::InvalidUrl, "é".repeat(450_000));
        assert!(long.message.len() <= MAX_ERROR_MESSAGE && long.message.ends_with('…'), "{}", long.message.len());
        assert!(ErrorInfo::http(404, "x".repeat(MAX_ERROR_MESSAGE + 1)).message.len() <= MAX_ERROR_MESSAGE);
        let exact = "y".repeat(MAX_ERROR_MESSAGE);
        assert_eq!(ErrorInfo::new(ErrorCode::Internal, exact.clone()).message, exact, "at the limit: untouched");
    }
}
