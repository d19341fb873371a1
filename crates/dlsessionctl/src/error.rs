//! What a command can fail with, how it is reported, and the exit status it maps to.

use std::io::{self, Write};
use std::process::ExitCode;

use dlsession_proto::{ErrorCode, ErrorInfo};

/// Exit statuses (docs/cli.md, "Exit status").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything worked.
    Success = 0,
    /// The operation or a task failed.
    Failed = 1,
    /// The command line was wrong.
    Usage = 2,
    /// dlsessiond could not be reached.
    Unreachable = 3,
    /// Interrupted by Ctrl-C (128 + SIGINT, as shells report it).
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// A command's failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A bad command line or bad flag combination (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Talking to the daemon failed, or the daemon refused the request.
    #[error(transparent)]
    Client(#[from] dlsession::Error),
    /// Something failed on this side (reading a URL list, moving a file…).
    #[error("{0}")]
    Local(ErrorInfo),
    /// Writing our own output failed (a closed pipe is not reported).
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::Usage(message.into())
    }

    pub fn local(code: ErrorCode, message: impl Into<String>) -> CliError {
        CliError::Local(ErrorInfo::new(code, message))
    }

    /// An error about a file, naming the file.
    pub fn file(what: &str, path: &std::path::Path, e: &io::Error) -> CliError {
        let code = match e.kind() {
            io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
            io::ErrorKind::StorageFull => ErrorCode::InsufficientSpace,
            _ => ErrorCode::FileError,
        };
        CliError::local(code, format!("{what} {}: {e}", path.display()))
    }

    /// The response to a request was not the one expected.
    pub fn unexpected(expected: &'static str, got: &dlsession_proto::Response) -> CliError {
        CliError::Client(dlsession::Error::UnexpectedResponse { expected, got: got.kind() })
    }

    /// The error code (docs/protocol.md, "Error codes"), where there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CliError::Usage(_) => None,
            CliError::Client(e) => Some(e.code()),
            CliError::Local(e) => Some(e.code),
            CliError::Output(_) => Some(ErrorCode::Internal),
        }
    }

    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Client(e) if e.is_unreachable() || e.code() == ErrorCode::ShuttingDown => Exit::Unreachable,
            CliError::Client(_) | CliError::Local(_) => Exit::Failed,
            CliError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe => Exit::Success,
            CliError::Output(_) => Exit::Failed,
        }
    }

    /// The lines printed on stderr for this error (without trailing newlines).
    pub fn lines(&self) -> Vec<String> {
        match self {
            CliError::Usage(m) => vec![format!("error: {m}"), "hint: see 'dlsessionctl --help'".into()],
            CliError::Client(dlsession::Error::NotRunning { path, source }) => {
                let why = match source.kind() {
                    io::ErrorKind::NotFound => format!("no socket at {}", path.display()),
                    io::ErrorKind::ConnectionRefused => format!("nothing listens on {}", path.display()),
                    _ => format!("cannot connect to {}: {source}", path.display()),
                };
                // A daemon started bare listens on the default socket, not on this one.
                let default = dlsession_proto::paths::defaults().is_ok_and(|d| d.socket == *path);
                let hint = if default {
                    "hint: start it with 'dlsessiond &' or 'systemctl --user start dlsessiond'".to_owned()
                } else {
                    let quoted = shell_words::quote(&path.to_string_lossy()).into_owned();
                    format!("hint: start one there with 'dlsessiond --socket {quoted} &'")
                };
                vec![format!("error: dlsessiond is not running ({why})"), hint]
            }
            CliError::Client(dlsession::Error::Disconnected { reason }) => {
                let mut line = "error: lost the connection to dlsessiond".to_owned();
                if let Some(r) = reason {
                    line.push_str(": ");
                    line.push_str(r);
                }
                vec![line, "hint: tasks already created go on when dlsessiond is back".into()]
            }
            CliError::Client(e) => {
                let mut lines = vec![format!("error: {e}")];
                if e.code() == ErrorCode::SessionInUse {
                    lines.push("hint: another process is attached; --takeover takes the session over".into());
                }
                if e.code() == ErrorCode::ShuttingDown {
                    lines.push(
                        "hint: the refused request was not run; run the command again once dlsessiond is back".into(),
                    );
                }
                lines
            }
            CliError::Local(e) => vec![format!("error: {e}")],
            CliError::Output(e) => vec![format!("error: internal: cannot write output: {e}")],
        }
    }

    /// Prints the error (unless it is a closed output pipe) and returns the exit status.
    pub fn report(&self) -> Exit {
        let silent = matches!(self, CliError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe);
        if !silent {
            let mut err = io::stderr().lock();
            for line in self.lines() {
                let _ = writeln!(err, "{line}");
            }
        }
        self.exit()
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(CliError::usage("x").exit(), Exit::Usage);
        let nr = dlsession::Error::NotRunning {
            path: "/tmp/none.sock".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "nope"),
        };
        let e = CliError::from(nr);
        assert_eq!(e.exit(), Exit::Unreachable);
        assert_eq!(e.lines()[0], "error: dlsessiond is not running (no socket at /tmp/none.sock)");
        // Not the default socket: the hint names it.
        assert_eq!(e.lines()[1], "hint: start one there with 'dlsessiond --socket /tmp/none.sock &'");
        let d = CliError::from(dlsession::Error::Daemon(ErrorInfo::new(
            ErrorCode::UnsupportedScheme,
            "only http and https URLs are supported (got \"file\")",
        )));
        assert_eq!(d.exit(), Exit::Failed);
        assert_eq!(d.lines()[0], "error: unsupported_scheme: only http and https URLs are supported (got \"file\")");
        assert_eq!(CliError::Output(io::Error::from(io::ErrorKind::BrokenPipe)).exit(), Exit::Success);
        // Refused while the daemon stopped: nothing was run, it is not there to run it.
        let stopping = CliError::from(dlsession::Error::Daemon(ErrorInfo::new(ErrorCode::ShuttingDown, "stopping")));
        assert_eq!(stopping.exit(), Exit::Unreachable);
        assert!(stopping.lines()[1].starts_with("hint: the refused request was not run"), "{:?}", stopping.lines());
    }
}
