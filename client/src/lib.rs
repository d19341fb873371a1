//! `dlsession`: background downloads through `dlsessiond`, the way `URLSession`
//! background sessions work on Apple platforms.
//!
//! An app attaches to a session by identifier, creates download tasks and may then exit:
//! the daemon keeps downloading, survives crashes and reboots, and when the session's
//! work is done it wakes the app (or relaunches it with a registered command). The app
//! rejoins the session by the same identifier and its [`SessionDelegate`] receives what
//! happened while it was away.
//!
//! ```no_run
//! use std::path::Path;
//! use dlsession::{DownloadRequest, DownloadTask, Session, SessionConfiguration, SessionDelegate, TaskError};
//!
//! struct Delegate;
//!
//! impl SessionDelegate for Delegate {
//!     fn did_finish_downloading_to(&self, _: &Session, task: &DownloadTask, location: &Path) {
//!         // Move the file before returning: afterwards the daemon deletes what is left.
//!         let _ = std::fs::rename(location, format!("/tmp/download-{}", task.id()));
//!     }
//!     fn did_complete_with_error(&self, _: &Session, task: &DownloadTask, error: Option<&TaskError>) {
//!         match error {
//!             None => println!("task {} done", task.id()),
//!             Some(e) => eprintln!("task {} failed: {e}", task.id()),
//!         }
//!     }
//! }
//!
//! # async fn run() -> dlsession::Result<()> {
//! let config = SessionConfiguration::background("org.example.fetcher")
//!     .app_id("org.example.fetcher")
//!     .launch_command(["/usr/bin/fetcher", "--background"]);
//! let session = Session::attach(config, Delegate).await?;
//! let task = session.download_task(DownloadRequest::new("https://example.org/big.iso")).await?;
//! task.resume().await?;
//! // The app may exit now; the daemon finishes the download and relaunches it.
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

/// The README's examples compile.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;

pub mod autostart;
mod batches;
pub mod blocking;
mod config;
mod connection;
mod deadline;
mod delegate;
mod dispatch;
mod error;
mod events;
mod link;
mod session;
mod stream;

pub use config::{DownloadRequest, SessionConfiguration, UploadRequest};
pub use connection::{Client, ClientOptions};
pub use delegate::{Handled, SessionDelegate, UploadResponse, WakeHandler};
pub use error::{Error, Result};
pub use events::EventReceiver;
pub use session::{DownloadTask, Session, TaskError};
pub use stream::{SessionEvent, SessionEvents};

/// The session identifier a desktop application is activated for, if `action` is the one
/// dlsessiond sends (`dlsession-events`, see [`SessionConfiguration::desktop_app`]): call it
/// from the app's `org.freedesktop.Application` `ActivateAction` handler, then attach to
/// that session.
///
/// ```
/// assert_eq!(dlsession::session_of_action("dlsession-events", Some("org.example.photos")), Some("org.example.photos"));
/// assert_eq!(dlsession::session_of_action("quit", None), None);
/// ```
pub fn session_of_action<'a>(action: &str, parameter: Option<&'a str>) -> Option<&'a str> {
    (action == dlsession_proto::DESKTOP_ACTION).then_some(parameter).flatten()
}

/// The wire types, for tools that talk to the daemon directly (like `dlsessionctl`).
pub use dlsession_proto as proto;

/// Hooks for the project's own tests: not part of the API.
#[doc(hidden)]
pub mod test_hooks {
    /// Holds every rejoin after a reconnect for `pause` before it starts (process-wide).
    pub fn pause_rejoins(pause: std::time::Duration) {
        crate::connection::pause_rejoins(pause);
    }
}
pub use dlsession_proto::{
    Challenge, ChallengeAnswer, Credential, CredentialScope, DetachReason, ErrorCode, ErrorInfo, Header, LaunchSpec,
    SessionConfig, SessionInfo, SessionPolicy, SessionProxy, TaskCounts, TaskId, TaskInfo, TaskPolicy, TaskPolicyInfo,
    TaskState, UploadInfo, UploadMethod, WaitReason, WakeReason, WakeStatus,
};
