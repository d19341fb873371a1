//! Client requests: which may run now (shutdown and a full database refuse changes),
//! and the handler of each, by family: `sessions` (attach, open, invalidate, wake),
//! `tasks` (create, from resume data), `control` (resume, suspend, cancel, acknowledge),
//! `queries` (status, get, list, watch). docs/protocol.md lists every request.

mod control;
mod limits;
mod queries;
mod sessions;
mod tasks;

use tracing::{debug, warn};

use super::Core;
use super::disk::{Adoption, Checked};
use crate::conn::ConnId;
use dlsession_proto::{ErrorCode, ErrorInfo, Request, Response, TaskId, WakeReason};

/// How a handler answered: now, or later (after a commit or a worker stop).
pub(super) enum Answer {
    Now(Response),
    Later,
}

pub(super) type Handled = Result<Answer, ErrorInfo>;

/// Whether a task-creating request's disk phase (destinations, a kept file) ran yet.
#[derive(Debug)]
pub(super) enum DiskCheck {
    Pending,
    Done(super::disk::Prepared),
}

impl Core {
    pub(super) fn on_request(&mut self, conn: ConnId, id: u64, request: Request) {
        debug!(conn, id, request = request.name(), "request");
        self.admit_request(conn, id, request);
    }

    /// `Ok` to a request asking for what memory holds already. That may be there only
    /// because another request's change is on its way to the database: answered once what
    /// is on its way is durable (at once when nothing is). While the database refuses
    /// writes, at once: an app attaching as before must not wait for the disk.
    pub(super) fn ok_unchanged(&mut self, conn: ConnId, id: u64) -> Handled {
        if self.life.commits_in_flight == 0 || self.life.storage.is_some() {
            return Ok(Answer::Now(Response::Ok));
        }
        self.commit_after_pending(Vec::new(), vec![super::After::Reply { conn, id, response: Response::Ok }]);
        Ok(Answer::Later)
    }

    /// A request's disk phase is over: handle it again with what it found.
    pub(super) fn on_disk_checked(&mut self, conn: ConnId, token: u64, request: Request, result: Checked) {
        // Given up already (it timed out, or its connection closed, as the requests held
        // behind it did: nothing would be answered, and its files would lose the creator's
        // file mode): it goes.
        let awaited = self.held.back_from_disk(conn, token);
        if awaited.is_none() {
            debug!(conn, token, request = request.name(), "a disk phase given up came back; dropped");
        }
        match (result, awaited) {
            (Ok(prepared), _) => {
                let adopted = match &prepared.resume {
                    Some((_, Adoption::Adopted { kept, part })) => Some((part.clone(), kept.clone())),
                    _ => None,
                };
                // Dropped, or refused after all (the session went, the daemon is stopping):
                // the kept file goes back where the resume data says it is.
                let handled =
                    awaited.is_some_and(|id| self.handle_request(conn, id, request, DiskCheck::Done(prepared)));
                if !handled && let Some((part, kept)) = adopted {
                    self.disk.unadopt(part, kept);
                }
            }
            (Err(e), Some(id)) => self.reply(conn, id, Err(e)),
            (Err(_), None) => {}
        }
        if awaited.is_some() {
            // What the connection sent meanwhile goes on.
            self.release_held(conn);
        }
    }

    /// A disk phase took too long (a hung mount): its request is answered with
    /// `file_error` and its connection goes on; what the check finds later is dropped.
    pub(super) fn on_disk_check_timed_out(&mut self, conn: ConnId, token: u64) {
        let Some((id, paths)) = self.held.timed_out(conn, token) else { return };
        self.held.hangs_on(conn, token, super::disk::mounts_of(&paths));
        let after = self.cfg.timing.disk_check_timeout;
        warn!(conn, id, ?after, "a disk check did not finish in time (a hung mount?); its request fails");
        let error = ErrorInfo::new(
            ErrorCode::FileError,
            format!(
                "checking the files on disk took longer than {} s (a hung or very slow mount?); nothing was changed",
                after.as_secs_f64()
            ),
        );
        self.reply(conn, id, Err(error));
        self.release_held(conn);
    }

    /// Handles a request; false if it was refused.
    pub(super) fn handle_request(&mut self, conn: ConnId, id: u64, request: Request, check: DiskCheck) -> bool {
        // Its tasks exist: answered even while the daemon stops or cannot write.
        if let Request::Once { key, request: inner } = &request
            && self.answer_created(conn, id, *key, inner.identifier(), &check)
        {
            return true;
        }
        let access = access(&request);
        let (mutating, writes) = (access != Access::Read, access == Access::Write);
        let result = if mutating && self.life.shutting_down {
            Err(crate::core::life::shutting_down())
        } else if let Some(e) = self.life.storage.as_ref().filter(|_| writes) {
            Err(e.clone())
        } else {
            self.dispatch(conn, id, request, check)
        };
        match result {
            Ok(Answer::Now(response)) => self.reply(conn, id, Ok(response)),
            Ok(Answer::Later) => {}
            Err(e) => {
                self.reply(conn, id, Err(e));
                return false;
            }
        }
        true
    }

    fn dispatch(&mut self, conn: ConnId, id: u64, request: Request, check: DiskCheck) -> Handled {
        match request {
            Request::Status => Ok(Answer::Now(Response::Status(self.status()))),
            Request::Attach { identifier, config, takeover } => self.attach(conn, id, identifier, config, takeover),
            Request::Detach { identifier } => self.detach(conn, &identifier),
            Request::OpenSession { identifier, config } => self.open_session(conn, id, identifier, config),
            Request::GetSession { identifier } => {
                let key = self.sessions.key_of(&identifier)?;
                Ok(Answer::Now(Response::Session(self.session_info(key)?)))
            }
            Request::ListSessions => Ok(Answer::Now(Response::Sessions(self.all_sessions()))),
            Request::ListSessionsPage(query) => Ok(Answer::Now(Response::SessionsPage(self.list_sessions(query)))),
            Request::HandleWakes => self.handle_wakes(conn),
            Request::CreateTasks { identifier, tasks, resume } => {
                self.create_tasks(conn, id, identifier, tasks, Creating { resume, once: None }, check)
            }
            Request::CreateUploads { identifier, uploads, resume } => {
                self.create_uploads(conn, id, identifier, uploads, Creating { resume, once: None }, check)
            }
            Request::Once { key, request } => self.create_once(conn, id, key, request, check),
            Request::SetSessionChallenges { identifier, answers } => {
                self.set_session_challenges(conn, id, &identifier, answers)
            }
            Request::GetSessionChallenges { identifier } => {
                Ok(Answer::Now(Response::SessionChallenges(self.session_challenges(&identifier)?)))
            }
            Request::AnswerChallenge { task, round, answer } => self.answer_challenge(conn, id, task, round, answer),
            Request::SetSessionClientCert { identifier, cert } => {
                self.set_session_client_cert(conn, id, identifier, cert, check)
            }
            Request::GetSessionClientCert { identifier } => {
                Ok(Answer::Now(Response::SessionClientCert(self.session_client_cert(&identifier)?)))
            }
            Request::CreateTaskFromResumeData { identifier, resume_data, resume } => {
                self.create_from_resume_data(conn, id, identifier, resume_data, Creating { resume, once: None }, check)
            }
            Request::ControlTask { task, action } => self.control_task(conn, id, task, action),
            Request::ResumeTasks { tasks } => self.resume_tasks(conn, id, &tasks),
            Request::GetTask { task } => self.get_task(conn, id, task),
            Request::ListTasks(query) => self.list_tasks(query),
            Request::AckEvents { identifier, seqs } => {
                let key = self.sessions.key_of(&identifier)?;
                self.acknowledge(conn, id, key, seqs);
                Ok(Answer::Later)
            }
            Request::ReplayEvents { identifier, from_seq, room } => {
                let key = self.sessions.key_of(&identifier)?;
                self.replay_from(conn, id, key, from_seq, room);
                Ok(Answer::Later)
            }
            Request::AcknowledgeTasks { tasks } => self.acknowledge_tasks(conn, id, tasks),
            Request::FinishTasksAndInvalidate { identifier } => {
                self.finish_and_invalidate(conn, id, &identifier, false)
            }
            Request::InvalidateAndCancel { identifier } => self.finish_and_invalidate(conn, id, &identifier, true),
            Request::Wake { identifier } => {
                let key = self.sessions.key_of(&identifier)?;
                Ok(match self.wake_now(key, WakeReason::Requested, Some((conn, id)))? {
                    Some(outcome) => Answer::Now(Response::Wake(outcome)),
                    None => Answer::Later,
                })
            }
            Request::Watch(filter) => self.watch(conn, filter),
            Request::SetBandwidthLimit { target, bytes_per_second } => {
                self.set_bandwidth_limit(conn, id, target, bytes_per_second)
            }
            Request::GetBandwidthLimits => Ok(Answer::Now(Response::BandwidthLimits(self.bandwidth_limits()))),
            Request::GetConditions => Ok(Answer::Now(Response::Conditions(self.conditions()))),
            Request::SetSessionPolicy { identifier, policy } => self.set_session_policy(conn, id, &identifier, policy),
            Request::GetSessionPolicy { identifier } => {
                let key = self.sessions.key_of(&identifier)?;
                let policy = self.sessions.get(&key).map(|s| s.rec.policy).unwrap_or_default();
                Ok(Answer::Now(Response::SessionPolicy(policy)))
            }
            Request::SetTaskPolicy { tasks, policy } => self.set_task_policy(conn, id, &tasks, policy),
            Request::GetTaskPolicy { task } => Ok(Answer::Now(Response::TaskPolicy(self.task_policy(task)?))),
            Request::SetSessionCookies { identifier, enabled } => {
                self.set_session_cookies(conn, id, &identifier, enabled)
            }
            Request::SetSessionProxy { identifier, proxy } => self.set_session_proxy(conn, id, &identifier, proxy),
            Request::GetSessionProxy { identifier } => {
                let key = self.sessions.key_of(&identifier)?;
                let proxy = self.sessions.get(&key).and_then(|s| s.proxy.clone()).map(|p| {
                    dlsession_proto::SessionProxy { url: p.url.as_deref().map(dlsession_proto::redact::url), ..p }
                });
                Ok(Answer::Now(Response::SessionProxy(proxy)))
            }
            Request::GetSessionCookies { identifier } => {
                Ok(Answer::Now(Response::SessionCookies(self.session_cookies(&identifier)?)))
            }
            Request::Unwatch => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.watch = None;
                }
                Ok(Answer::Now(Response::Ok))
            }
        }
    }
}

/// Names the task of a batch an error is about.
fn in_batch(i: usize, n: usize, e: ErrorInfo) -> ErrorInfo {
    let prefix = if n > 1 { format!("task {} of the batch: ", i + 1) } else { String::new() };
    ErrorInfo { message: format!("{prefix}{}", e.message), ..e }
}

pub(super) fn no_such_task(task: TaskId) -> ErrorInfo {
    ErrorInfo::new(
        ErrorCode::NoSuchTask,
        format!("no live task {task} (it may have completed and been acknowledged, or never existed)"),
    )
}

/// What a request may do, which decides whether it is served while the daemon shuts
/// down or its database refuses writes. Every request is named: a new one must be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Reads only: always served.
    Read,
    /// Changes live state but writes nothing itself (attaching checks for itself when it
    /// creates or reconfigures a session): an app can still collect its events while the
    /// database refuses writes.
    Live,
    /// Writes the database.
    Write,
}

/// The request only reads (served even while shutting down or refusing writes).
pub(super) fn reads_only(request: &Request) -> bool {
    access(request) == Access::Read
}

fn access(request: &Request) -> Access {
    match request {
        Request::Status
        | Request::GetSession { .. }
        | Request::ListSessions
        | Request::ListSessionsPage(_)
        | Request::GetTask { .. }
        | Request::ListTasks(_)
        | Request::Watch(_)
        | Request::Unwatch
        | Request::GetBandwidthLimits
        | Request::GetConditions
        | Request::GetSessionPolicy { .. }
        | Request::GetTaskPolicy { .. }
        | Request::GetSessionCookies { .. }
        | Request::GetSessionProxy { .. }
        | Request::GetSessionChallenges { .. }
        | Request::GetSessionClientCert { .. }
        | Request::ReplayEvents { .. } => Access::Read,
        // These check for themselves: they write only when something changes.
        Request::Attach { .. }
        | Request::Detach { .. }
        | Request::Wake { .. }
        | Request::HandleWakes
        | Request::SetSessionCookies { .. }
        | Request::SetSessionProxy { .. }
        | Request::SetSessionChallenges { .. }
        | Request::SetSessionClientCert { .. } => Access::Live,
        // A key already used is answered before this is asked (`answer_created`).
        Request::Once { .. }
        | Request::OpenSession { .. }
        | Request::CreateTasks { .. }
        | Request::CreateUploads { .. }
        | Request::AnswerChallenge { .. }
        | Request::CreateTaskFromResumeData { .. }
        | Request::ControlTask { .. }
        | Request::ResumeTasks { .. }
        | Request::AckEvents { .. }
        | Request::FinishTasksAndInvalidate { .. }
        | Request::InvalidateAndCancel { .. }
        | Request::AcknowledgeTasks { .. }
        | Request::SetBandwidthLimit { .. }
        | Request::SetSessionPolicy { .. }
        | Request::SetTaskPolicy { .. } => Access::Write,
    }
}

/// How a creating request asked for its tasks: queued at once (`resume`), and the creation
/// key it came under (`Request::Once`), if any.
#[derive(Debug, Clone, Copy)]
pub(super) struct Creating {
    pub resume: bool,
    pub once: Option<u128>,
}

impl Creating {
    /// `request` (its disk phase's copy) as it came: under its key, if it had one.
    pub(super) fn request(self, request: Request) -> Request {
        match self.once {
            Some(key) => match dlsession_proto::CreateRequest::from_request(request) {
                Ok(create) => Request::Once { key, request: create },
                Err(other) => *other,
            },
            None => request,
        }
    }
}
