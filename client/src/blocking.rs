//! The library for programs without an async runtime: the same sessions and tasks, with
//! methods that block until the daemon has answered.
//!
//! A [`Session`] here owns a small runtime (one I/O thread) that keeps the connection to
//! the daemon; the delegate runs on the session's own thread as with the async API. Do
//! not call these methods from inside an async runtime (use [`crate::Session`] there).
//!
//! The delegate is the same [`crate::SessionDelegate`]: its callbacks are handed the async
//! [`crate::Session`] and [`crate::DownloadTask`] (write their full paths when this module's
//! `Session` is imported). Inside a callback, read what the event says and move files; do
//! not call back into the session and wait (the callback would wait for itself).
//!
//! ```no_run
//! use dlsession::blocking::Session;
//! use dlsession::{DownloadRequest, SessionConfiguration, SessionDelegate};
//!
//! struct Quiet;
//! impl SessionDelegate for Quiet {}
//!
//! fn main() -> dlsession::Result<()> {
//!     let session = Session::attach(SessionConfiguration::background("org.example.tool"), Quiet)?;
//!     let request = DownloadRequest::new("http://127.0.0.1:8080/file.iso").destination("/tmp/file.iso");
//!     session.download_tasks(vec![request], true)?;
//!     session.wait_idle()?;
//!     Ok(())
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::config::{DownloadRequest, SessionConfiguration, UploadRequest};
use crate::delegate::SessionDelegate;
use crate::error::{Error, Result};
use crate::stream::SessionEvent;
use dlsession_proto::{
    Challenge, ChallengeAnswer, ErrorCode, ErrorInfo, SessionInfo, TaskId, TaskInfo, TaskPolicy, TaskPolicyInfo,
};

/// An attached background session, with blocking methods (see the [module](self)).
///
/// Dropping it detaches; the daemon goes on with the tasks. The drop waits (up to five
/// seconds) for a delegate callback that is running to return; past that it returns, and
/// what the callback handled is still acknowledged when it does.
#[derive(Debug)]
pub struct Session {
    inner: Option<crate::Session>,
    runtime: Arc<tokio::runtime::Runtime>,
}

/// How long dropping a session waits for its delegate's thread to end.
const DISPATCHER_END: Duration = Duration::from_secs(5);

impl Drop for Session {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else { return };
        let done = inner.shared.signals.dispatcher_done.lock().ok().and_then(|mut d| d.take());
        // Dropped from inside a callback (which the C API forbids): that thread goes on once
        // the callback returns; waiting here would be waiting for itself.
        let inside = inner.shared.signals.dispatcher.get() == Some(&std::thread::current().id());
        // Detaching ends the delegate's thread; the runtime it uses must outlive it.
        drop(inner);
        let Some(done) = done else { return };
        if inside || matches!(done.recv_timeout(DISPATCHER_END), Err(std::sync::mpsc::RecvTimeoutError::Timeout)) {
            // A callback still runs: after it, the thread acknowledges and detaches on this
            // runtime, so the runtime is kept (on a thread of its own) until the thread ends.
            // Shut down under it, that thread panicked and its events came again.
            let runtime = Arc::clone(&self.runtime);
            let kept = std::thread::Builder::new().name("dlsession-end".into()).spawn(move || {
                let _ = done.recv();
                drop(runtime);
            });
            if let Err(e) = kept {
                tracing::warn!(error = %e, "cannot keep the runtime for a delegate callback still running");
            }
        }
    }
}

/// A task of a blocking [`Session`].
#[derive(Debug, Clone)]
pub struct DownloadTask {
    inner: crate::DownloadTask,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Session {
    /// Connects to the daemon (starting it if allowed) and attaches to the session, as
    /// [`crate::Session::attach`].
    pub fn attach(config: SessionConfiguration, delegate: impl SessionDelegate) -> Result<Session> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dlsession-io")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::Invalid(ErrorInfo::new(
                    ErrorCode::Internal,
                    format!("cannot start the library's I/O thread: {e}"),
                ))
            })?;
        let inner = runtime.block_on(crate::Session::attach(config, delegate))?;
        Ok(Session { inner: Some(inner), runtime: Arc::new(runtime) })
    }

    /// The async session underneath (for the few calls this facade does not wrap).
    pub fn as_async(&self) -> &crate::Session {
        self.inner()
    }

    fn inner(&self) -> &crate::Session {
        // Taken only by `drop`.
        match &self.inner {
            Some(inner) => inner,
            None => unreachable!("a blocking::Session is used after drop"),
        }
    }

    /// The session's identifier.
    pub fn identifier(&self) -> &str {
        self.inner().identifier()
    }

    /// Creates a suspended task ([`DownloadTask::resume`] starts it).
    pub fn download_task(&self, request: DownloadRequest) -> Result<DownloadTask> {
        let inner = self.runtime.block_on(self.inner().download_task(request))?;
        Ok(self.wrap(inner))
    }

    /// Creates many tasks, started at once if `resume`.
    pub fn download_tasks(&self, requests: Vec<DownloadRequest>, resume: bool) -> Result<Vec<DownloadTask>> {
        let tasks = self.runtime.block_on(self.inner().download_tasks(requests, resume))?;
        Ok(tasks.into_iter().map(|t| self.wrap(t)).collect())
    }

    /// Creates upload tasks, started at once if `resume` ([`crate::Session::upload_tasks`]).
    pub fn upload_tasks(&self, requests: Vec<UploadRequest>, resume: bool) -> Result<Vec<DownloadTask>> {
        let tasks = self.runtime.block_on(self.inner().upload_tasks(requests, resume))?;
        Ok(tasks.into_iter().map(|t| self.wrap(t)).collect())
    }

    /// Creates a task continuing from resume data.
    pub fn download_task_with_resume_data(&self, resume_data: &[u8]) -> Result<DownloadTask> {
        let inner = self.runtime.block_on(self.inner().download_task_with_resume_data(resume_data))?;
        Ok(self.wrap(inner))
    }

    /// Every task of the session not yet acknowledged as completed.
    pub fn tasks(&self) -> Result<Vec<TaskInfo>> {
        self.runtime.block_on(self.inner().tasks())
    }

    /// The session as the daemon sees it.
    pub fn info(&self) -> Result<SessionInfo> {
        self.runtime.block_on(self.inner().info())
    }

    /// Blocks until the session is idle ([`crate::Session::wait_idle`]).
    pub fn wait_idle(&self) -> Result<()> {
        self.runtime.block_on(self.inner().wait_idle())
    }

    /// Like [`Session::wait_idle`], waiting at most `timeout`: `Ok(false)` if it was not
    /// idle by then. A look at the daemon under way is finished first (it takes a round
    /// trip, bounded by the request timeout), so a zero timeout asks whether it is idle now.
    pub fn wait_idle_for(&self, timeout: Duration) -> Result<bool> {
        self.runtime.block_on(async {
            // A timeout beyond what the clock can count waits for as long as it takes.
            self.inner().wait_idle_until(tokio::time::Instant::now().checked_add(timeout)).await
        })
    }

    /// The session's events, one at a time ([`crate::Session::events`]); the iterator
    /// ends with the attachment.
    pub fn events(&self) -> impl Iterator<Item = SessionEvent> + use<> {
        let mut events = self.inner().events();
        let runtime = self.runtime.clone();
        std::iter::from_fn(move || runtime.block_on(events.recv()))
    }

    /// No new tasks; the session ends when its last task completes.
    pub fn finish_tasks_and_invalidate(&self) -> Result<()> {
        self.runtime.block_on(self.inner().finish_tasks_and_invalidate())
    }

    /// Cancels every task and ends the session.
    pub fn invalidate_and_cancel(&self) -> Result<()> {
        self.runtime.block_on(self.inner().invalidate_and_cancel())
    }

    /// Stops receiving events; the tasks go on.
    pub fn detach(&self) -> Result<()> {
        self.runtime.block_on(self.inner().detach())
    }

    /// A handle for a task of this session, from its id (say, from [`Session::tasks`] or
    /// a delegate callback).
    pub fn task(&self, id: TaskId) -> Result<DownloadTask> {
        let info = self.runtime.block_on(self.inner().task_info(id))?;
        Ok(self.wrap(self.inner().task_handle(id, info.url, info.description)))
    }

    fn wrap(&self, inner: crate::DownloadTask) -> DownloadTask {
        DownloadTask { inner, runtime: self.runtime.clone() }
    }
}

impl DownloadTask {
    /// Unique across the daemon, never reused.
    pub fn id(&self) -> TaskId {
        self.inner.id()
    }

    /// The URL the task downloads.
    pub fn url(&self) -> &str {
        self.inner.url()
    }

    /// Starts (or continues) the task.
    pub fn resume(&self) -> Result<()> {
        self.runtime.block_on(self.inner.resume())
    }

    /// Pauses the task, keeping its data.
    pub fn suspend(&self) -> Result<()> {
        self.runtime.block_on(self.inner.suspend())
    }

    /// Cancels the task (it completes with `cancelled`).
    pub fn cancel(&self) -> Result<()> {
        self.runtime.block_on(self.inner.cancel())
    }

    /// Cancels and returns resume data for [`Session::download_task_with_resume_data`].
    pub fn cancel_producing_resume_data(&self) -> Result<Vec<u8>> {
        self.runtime.block_on(self.inner.cancel_producing_resume_data())
    }

    /// State and counters, now.
    pub fn info(&self) -> Result<TaskInfo> {
        self.runtime.block_on(self.inner.info())
    }

    /// Gives the task its own policy (see [`crate::DownloadTask::set_policy`]).
    pub fn set_policy(&self, policy: TaskPolicy) -> Result<()> {
        self.runtime.block_on(self.inner.set_policy(policy))
    }

    /// The task's own policy, and the one it runs under.
    pub fn policy(&self) -> Result<TaskPolicyInfo> {
        self.runtime.block_on(self.inner.policy())
    }

    /// Answers `challenge`, which the task waits on ([`crate::DownloadTask::answer_challenge`]).
    pub fn answer_challenge(&self, challenge: &Challenge, answer: ChallengeAnswer) -> Result<()> {
        self.runtime.block_on(self.inner.answer_challenge(challenge, answer))
    }

    /// Answers the task's challenge of `round` ([`crate::DownloadTask::answer_challenge_round`]).
    pub fn answer_challenge_round(&self, round: u32, answer: ChallengeAnswer) -> Result<()> {
        self.runtime.block_on(self.inner.answer_challenge_round(round, answer))
    }
}
