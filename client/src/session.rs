//! Sessions and their tasks as an app holds them: creating, listing and controlling
//! tasks, invalidating, detaching (attaching and the delegate are `dispatch`'s).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{DownloadRequest, UploadRequest};
use crate::connection::Client;
use crate::error::{Error, Result};
use crate::stream::{SessionEvents, Subscribers};
use dlsession_proto::{
    DetachReason, ErrorCode, ErrorInfo, Request, Response, SessionInfo, TaskAction, TaskId, TaskInfo, TaskPolicy,
    TaskPolicyInfo, TaskSpec, TaskState, WaitReason,
};

/// The first reason a request cannot be given to the daemon (a path that is not UTF-8),
/// as an error: none of the batch is created.
fn refuse_unusable<'a>(mut refused: impl Iterator<Item = &'a Option<String>>) -> Result<()> {
    match refused.find_map(Option::as_ref) {
        Some(why) => Err(Error::Invalid(ErrorInfo::new(ErrorCode::InvalidRequest, why.clone()))),
        None => Ok(()),
    }
}

/// An error a task completed with (its [`ErrorInfo::code`] is one of the codes in docs/protocol.md).
pub type TaskError = ErrorInfo;

#[derive(Debug)]
pub(crate) struct SessionShared {
    pub(crate) client: Client,
    pub(crate) identifier: String,
    /// Ownership of the client's route for `identifier`.
    pub(crate) route: u64,
    pub(crate) tasks: Mutex<HashMap<TaskId, DownloadTask>>,
    /// Tasks whose completion was handed over lately: a handle the creating thread records
    /// after that (the task failed at once, its creator was descheduled) would stay for
    /// the session's life.
    pub(crate) forgotten: Mutex<Forgotten>,
    /// What the dispatcher tells the app's other threads (idle waiters, event streams).
    pub(crate) signals: Signals,
    /// Who sends the `Detach` when the app drops the session.
    pub(crate) detach: Arc<DetachDuty>,
}

/// Who sends a dropped session's `Detach`: its delivery thread while that runs, after the
/// acknowledgements of what the delegate handled (else the daemon took the session for
/// unattached with those events pending, and a process attaching next, or the relaunch it
/// starts, was handed them again, their files moved already); otherwise the drop itself.
#[derive(Debug, Default)]
pub(crate) struct DetachDuty(AtomicU8);

impl DetachDuty {
    const DROP_SENDS: u8 = 0;
    const THREAD_RUNS: u8 = 1;
    const THREAD_OWES: u8 = 2;

    /// The delivery thread starts: a drop from now on leaves the detach to it.
    pub(crate) fn thread_runs(&self) {
        self.0.store(Self::THREAD_RUNS, Ordering::Release);
    }

    /// At the drop: true when the delivery thread will send the detach.
    fn leave_to_thread(&self) -> bool {
        self.0.compare_exchange(Self::THREAD_RUNS, Self::THREAD_OWES, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The delivery thread ends: true when it owes the detach (a drop later sends its own).
    pub(crate) fn thread_ends(&self) -> bool {
        self.0.swap(Self::DROP_SENDS, Ordering::AcqRel) == Self::THREAD_OWES
    }
}

/// Set by the session's dispatcher, read by [`Session::wait_idle`] and event streams.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    /// Bumped each time the dispatcher has handled `finished_events` (or the attachment
    /// changed): idle waiters look again.
    pub(crate) idle: tokio::sync::watch::Sender<u64>,
    /// Events were handed to the delegate since the last `finished_events` (or a replay
    /// is on its way): not at rest yet.
    pub(crate) unsettled: AtomicBool,
    /// Events of this attachment the delegate kept unacknowledged ([`crate::Handled::Later`]):
    /// at rest, that many may stay pending.
    pub(crate) kept_events: AtomicU64,
    /// Of those, challenges the delegate left for later: their tasks wait for the app, and
    /// nothing more happens to them while it is away.
    pub(crate) kept_challenges: AtomicU64,
    /// Why this attachment ended, once it has.
    pub(crate) ended: Mutex<Option<Ended>>,
    pub(crate) streams: Subscribers,
    /// Disconnected when the dispatcher's thread ends (see `blocking::Session`'s drop).
    pub(crate) dispatcher_done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// That thread, once started: a drop from inside a callback does not wait for itself.
    pub(crate) dispatcher: std::sync::OnceLock<std::thread::ThreadId>,
}

/// How an attachment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The daemon detached it.
    Daemon(DetachReason),
    /// This process did (`detach`, dropping the session, or a panicking delegate).
    Here(&'static str),
}

impl Signals {
    pub(crate) fn poke(&self) {
        self.idle.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records the end (the first one counts), ends the streams, wakes idle waiters.
    pub(crate) fn end(&self, how: Ended) {
        if let Ok(mut ended) = self.ended.lock() {
            ended.get_or_insert(how);
        }
        self.streams.close();
        self.poke();
    }
}

impl Drop for SessionShared {
    /// Dropping the last handle detaches: the daemon keeps the tasks going and keeps
    /// undelivered events for the next attach.
    fn drop(&mut self) {
        // Only while still attached: a later session of the same identifier on this
        // connection owns the route (and the attachment) now.
        if self.client.unroute(&self.identifier, self.route) && !self.detach.leave_to_thread() {
            let _ = self.client.send_request(Request::Detach { identifier: self.identifier.clone() });
        }
    }
}

/// An attached background session.
#[derive(Debug, Clone)]
pub struct Session {
    pub(crate) shared: Arc<SessionShared>,
}

/// How often [`Session::wait_idle`] looks again without being told (acknowledgements
/// answered after the last `finished_events` are not announced).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

impl Session {
    /// The session's identifier.
    pub fn identifier(&self) -> &str {
        &self.shared.identifier
    }

    /// The connection this session uses.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Creates a task (suspended, as in `URLSession`: call [`DownloadTask::resume`]).
    pub async fn download_task(&self, request: DownloadRequest) -> Result<DownloadTask> {
        let mut tasks = self.create(vec![request], false).await?;
        tasks.pop().ok_or(Error::UnexpectedResponse { expected: "one task id", got: "none" })
    }

    /// Creates an upload task (suspended: call [`DownloadTask::resume`]). The daemon checks
    /// the file first: a missing, unreadable or directory path is refused here.
    pub async fn upload_task(&self, request: UploadRequest) -> Result<DownloadTask> {
        let mut tasks = self.upload_tasks(vec![request], false).await?;
        tasks.pop().ok_or(Error::UnexpectedResponse { expected: "one task id", got: "none" })
    }

    /// Creates upload tasks, all or none (in requests of up to 1,000, like
    /// [`Session::download_tasks`]); `resume` starts them.
    pub async fn upload_tasks(&self, requests: Vec<UploadRequest>, resume: bool) -> Result<Vec<DownloadTask>> {
        refuse_unusable(requests.iter().map(|r| &r.refused))?;
        let metas: Vec<(String, Option<String>)> =
            requests.iter().map(|r| (r.spec.request.url.clone(), r.spec.request.description.clone())).collect();
        let uploads = requests.into_iter().map(|r| r.spec).collect();
        let ids = self.shared.client.create_uploads(&self.shared.identifier, uploads, resume).await?;
        Ok(self.remember(ids, metas))
    }

    /// Handles for new tasks, known to the session from now on (events name them).
    fn remember(&self, ids: Vec<TaskId>, metas: Vec<(String, Option<String>)>) -> Vec<DownloadTask> {
        let tasks: Vec<DownloadTask> =
            ids.into_iter().zip(metas).map(|(id, (url, description))| self.task_handle(id, url, description)).collect();
        self.record(tasks.iter().map(|t| (t.id, || t.clone())));
        tasks
    }

    /// Keeps handles (each made only if kept) the session does not hold yet, but for tasks
    /// whose completion was handed over already (see `SessionShared::forgotten`).
    fn record<F: FnOnce() -> DownloadTask>(&self, handles: impl IntoIterator<Item = (TaskId, F)>) {
        let forgotten = self.shared.forgotten.lock().ok();
        if let Ok(mut known) = self.shared.tasks.lock() {
            for (id, make) in handles.into_iter().filter(|(id, _)| !forgotten.as_ref().is_some_and(|f| f.has(*id))) {
                known.entry(id).or_insert_with(make);
            }
        }
    }

    /// Creates many tasks, all or none; `resume` starts them. Up to 1,000 go in one request,
    /// one transaction in the daemon. A larger batch takes several requests: its tasks are
    /// created suspended and started only once all exist, and if one request is refused,
    /// the tasks of the others are withdrawn unseen before the error is returned. (Only
    /// if starting them fails partway, twice, do the parts already started go on: the
    /// delegate then hears of them as of tasks made elsewhere.) A request whose answer is
    /// lost to a broken connection (the daemon restarted) is sent again under the same
    /// creation key once it is back: tasks it had created are answered, never made twice.
    /// A batch in several requests, or one with task policies, is carried to its end even
    /// if this future is dropped (a timeout around it, say): made whole and started, its
    /// tasks then reach the delegate as tasks made elsewhere.
    pub async fn download_tasks(&self, requests: Vec<DownloadRequest>, resume: bool) -> Result<Vec<DownloadTask>> {
        self.create(requests, resume).await
    }

    async fn create(&self, requests: Vec<DownloadRequest>, resume: bool) -> Result<Vec<DownloadTask>> {
        refuse_unusable(requests.iter().map(|r| &r.refused))?;
        let policies: Vec<TaskPolicy> = requests.iter().map(DownloadRequest::policy).collect();
        let with_policy = policies.iter().any(|p| !p.is_empty());
        let specs: Vec<TaskSpec> = requests.into_iter().map(DownloadRequest::into_spec).collect();
        let metas: Vec<(String, Option<String>)> =
            specs.iter().map(|s| (s.url.clone(), s.description.clone())).collect();
        let ids = if with_policy {
            // To their end even if the caller stops waiting: created suspended, they would
            // stay so, unknown to the app. Not holding the session: an app that drops it
            // meanwhile detaches at once.
            let (client, identifier) = (self.shared.client.clone(), self.shared.identifier.clone());
            crate::batches::run_to_end(async move {
                create_with_policies(&client, &identifier, specs, policies, resume).await
            })
            .await?
        } else {
            self.shared.client.create_tasks(&self.shared.identifier, specs, resume).await?
        };
        Ok(self.remember(ids, metas))
    }

    /// Creates a task continuing a download cancelled with
    /// [`DownloadTask::cancel_producing_resume_data`].
    pub async fn download_task_with_resume_data(&self, resume_data: &[u8]) -> Result<DownloadTask> {
        let response = self
            .shared
            .client
            .request_once(Request::CreateTaskFromResumeData {
                identifier: self.shared.identifier.clone(),
                resume_data: resume_data.to_vec(),
                resume: false,
            })
            .await?;
        let Response::TasksCreated(ids) = response else {
            return Err(Error::UnexpectedResponse { expected: "tasks_created", got: response.kind() });
        };
        let id = ids.first().copied().ok_or(Error::UnexpectedResponse { expected: "one task id", got: "none" })?;
        let info = self.task_info(id).await?;
        let task = self.task_handle(id, info.url, info.description);
        self.record([(id, || task.clone())]);
        Ok(task)
    }

    /// Every task of the session not yet acknowledged as completed, with state and
    /// counters: what a relaunched app rebuilds its view from.
    pub async fn get_all_tasks(&self) -> Result<Vec<TaskInfo>> {
        let all = self.shared.client.list_session_tasks(&self.shared.identifier, Vec::new()).await?;
        self.record(all.iter().map(|i| (i.id, || self.task_handle(i.id, i.url.clone(), i.description.clone()))));
        Ok(all)
    }

    /// Every task of the session not yet acknowledged as completed (the same as
    /// [`Session::get_all_tasks`], the name `URLSession` uses).
    pub async fn tasks(&self) -> Result<Vec<TaskInfo>> {
        self.get_all_tasks().await
    }

    /// Waits until the session is idle: no task queued, running or waiting (suspended
    /// tasks do not count: they wait for the app, and so do tasks waiting for credentials
    /// the delegate left for later), and every event delivered to the
    /// delegate and acknowledged (or kept with [`crate::Handled::Later`]). Returns at
    /// once if it is idle already, and `Ok` too once the session was invalidated and is
    /// gone. Fails ([`Error::Detached`], [`Error::NotAttached`]) once this attachment has
    /// ended: another process took the session over, or this one detached (or its
    /// delegate panicked). Do not call it from a delegate callback: the callback would
    /// wait for itself.
    ///
    /// ```no_run
    /// # async fn run(session: dlsession::Session) -> dlsession::Result<()> {
    /// session.wait_idle().await?;
    /// // Every file was handed to the delegate: the app may exit.
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_idle(&self) -> Result<()> {
        self.wait_idle_until(None).await.map(drop)
    }

    /// [`Session::wait_idle`] that stops waiting at `deadline`: `Ok(false)` if the session
    /// was not idle by then. The deadline bounds the waits between looks, never a look:
    /// each look at the daemon (bounded by the request timeout) is finished, so a deadline
    /// already past still gives a true answer about now.
    pub(crate) async fn wait_idle_until(&self, deadline: Option<tokio::time::Instant>) -> Result<bool> {
        let signals = &self.shared.signals;
        let mut changes = signals.idle.subscribe();
        // Everything acknowledged but `finished_events` not handled yet: it comes at once
        // unless nothing asks for it (a task suspended last); give it one look.
        let mut quiet_once = false;
        // Past the deadline, the second look a quiet session needs is taken once, at once.
        let mut looked_again = false;
        loop {
            changes.borrow_and_update();
            let ended = signals.ended.lock().ok().and_then(|d| *d);
            match ended {
                Some(Ended::Daemon(DetachReason::Invalidated)) => return Ok(true),
                Some(Ended::Daemon(reason)) => return Err(Error::Detached { reason }),
                Some(Ended::Here(why)) => return Err(Error::NotAttached { why }),
                None => {}
            }
            let info = match self.info().await {
                Ok(info) => info,
                Err(e) if e.code() == ErrorCode::NoSuchSession => return Ok(true),
                Err(e) => return Err(e),
            };
            let at_rest = !signals.unsettled.load(Ordering::Acquire);
            let kept = signals.kept_events.load(Ordering::Acquire);
            let deferred = signals.kept_challenges.load(Ordering::Acquire);
            if info.tasks.active() == 0 {
                if at_rest && info.pending_events <= kept {
                    return Ok(true);
                }
                if info.pending_events == 0 && std::mem::replace(&mut quiet_once, true) {
                    return Ok(true);
                }
            } else if info.tasks.active() <= deferred
                && info.pending_events <= kept
                && std::mem::replace(&mut quiet_once, true)
            {
                // Only tasks waiting for credentials the app left for later remain: they wait
                // for the app, not for time (the daemon says no `finished_events` for them).
                // As the daemon sees them: one the app answered meanwhile (later, or from
                // inside the callback) runs again and does not count.
                if info.tasks.active() <= self.awaiting_answers().await? {
                    return Ok(true);
                }
                quiet_once = false;
            } else if info.tasks.active() > deferred {
                quiet_once = false;
            }
            let wait = match deadline {
                None => IDLE_RECHECK,
                Some(deadline) => match deadline.saturating_duration_since(tokio::time::Instant::now()) {
                    left if left.is_zero() && quiet_once && !std::mem::replace(&mut looked_again, true) => continue,
                    left if left.is_zero() => return Ok(false),
                    left => left.min(IDLE_RECHECK),
                },
            };
            let _ = tokio::time::timeout(wait, changes.changed()).await;
        }
    }

    /// How many of the session's tasks wait for an answer to a challenge, as the daemon says.
    async fn awaiting_answers(&self) -> Result<u64> {
        let waiting = self.shared.client.list_session_tasks(&self.shared.identifier, vec![TaskState::Waiting]).await?;
        Ok(waiting.iter().filter(|t| matches!(t.wait, Some(WaitReason::AuthRequired { .. }))).count() as u64)
    }

    /// The session's events as a [`futures_core::Stream`], beside the delegate: each
    /// event is sent after the delegate's callback for it has returned (a finished file
    /// has been handled by then). Progress is coalesced as for the delegate. A stream
    /// not read fast enough loses events and gets [`SessionEvent::Lagged`] in their
    /// place (at the latest once it is read to the end, also when nothing follows); the
    /// delegate never does. The stream ends when the attachment does.
    ///
    /// [`SessionEvent::Lagged`]: crate::SessionEvent::Lagged
    pub fn events(&self) -> SessionEvents {
        self.shared.signals.streams.subscribe()
    }

    /// The session as the daemon sees it (configuration, counts, pending events).
    pub async fn info(&self) -> Result<SessionInfo> {
        let response =
            self.shared.client.request(Request::GetSession { identifier: self.shared.identifier.clone() }).await?;
        match response {
            Response::Session(info) => Ok(info),
            other => Err(Error::UnexpectedResponse { expected: "session", got: other.kind() }),
        }
    }

    /// No new tasks; the session becomes invalid when its last task completes.
    pub async fn finish_tasks_and_invalidate(&self) -> Result<()> {
        self.ok(Request::FinishTasksAndInvalidate { identifier: self.shared.identifier.clone() }).await
    }

    /// Cancels every task and invalidates the session.
    pub async fn invalidate_and_cancel(&self) -> Result<()> {
        self.ok(Request::InvalidateAndCancel { identifier: self.shared.identifier.clone() }).await
    }

    /// Stops receiving events; tasks go on.
    pub async fn detach(&self) -> Result<()> {
        // The route goes first: a rejoin under way then skips the session instead of
        // attaching it again after this detach.
        self.shared.client.unroute(&self.shared.identifier, self.shared.route);
        self.ok(Request::Detach { identifier: self.shared.identifier.clone() }).await
    }

    async fn ok(&self, request: Request) -> Result<()> {
        self.shared.client.request_ok(request).await
    }

    /// A task of this session: one of another session is `no_such_task` here (an id taken
    /// from the app's input must not reach, or answer the challenge of, another app's task).
    pub(crate) async fn task_info(&self, id: TaskId) -> Result<TaskInfo> {
        match self.shared.client.request(Request::GetTask { task: id }).await? {
            Response::Task(detail) if detail.info.session == self.shared.identifier => Ok(detail.info),
            Response::Task(_) => Err(Error::Invalid(ErrorInfo::new(
                ErrorCode::NoSuchTask,
                format!("task {id} is not of session {}", self.shared.identifier),
            ))),
            other => Err(Error::UnexpectedResponse { expected: "task", got: other.kind() }),
        }
    }

    pub(crate) fn task_handle(&self, id: TaskId, url: String, description: Option<String>) -> DownloadTask {
        DownloadTask { id, url, description, client: self.shared.client.clone() }
    }

    pub(crate) fn known_task(&self, id: TaskId) -> Option<DownloadTask> {
        self.shared.tasks.lock().ok()?.get(&id).cloned()
    }

    /// Forgets a completed task's handle.
    pub(crate) fn forget_task(&self, id: TaskId) {
        if let Ok(mut known) = self.shared.tasks.lock() {
            known.remove(&id);
        }
        if let Ok(mut forgotten) = self.shared.forgotten.lock() {
            forgotten.add(id);
        }
    }
}

/// The last [`Forgotten::KEPT`] task ids whose completion was handed over.
#[derive(Debug, Default)]
pub(crate) struct Forgotten {
    order: std::collections::VecDeque<TaskId>,
    ids: std::collections::HashSet<TaskId>,
}

impl Forgotten {
    /// Far more than can complete between a creation's answer and its handles' recording.
    const KEPT: usize = 1024;

    fn add(&mut self, id: TaskId) {
        if self.ids.insert(id) {
            self.order.push_back(id);
        }
        if self.order.len() > Self::KEPT
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
    }

    fn has(&self, id: TaskId) -> bool {
        self.ids.contains(&id)
    }
}

/// A task of an attached session. `Debug` shows its URL redacted.
#[derive(Clone)]
pub struct DownloadTask {
    id: TaskId,
    url: String,
    description: Option<String>,
    client: Client,
}

impl std::fmt::Debug for DownloadTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownloadTask")
            .field("id", &self.id)
            .field("url", &dlsession_proto::redact::Shown(&self.url))
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl DownloadTask {
    /// Unique across the daemon, never reused.
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The URL it downloads.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The description given at creation, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Starts the task, or continues it after `suspend` (from where it was, when the
    /// server allows ranges).
    pub async fn resume(&self) -> Result<()> {
        self.control(TaskAction::Resume).await.map(|_| ())
    }

    /// Pauses it, keeping the data: it stays `suspended` until resumed.
    pub async fn suspend(&self) -> Result<()> {
        self.control(TaskAction::Suspend).await.map(|_| ())
    }

    /// Cancels it: it completes with `cancelled` and its data is deleted.
    pub async fn cancel(&self) -> Result<()> {
        self.control(TaskAction::Cancel).await.map(|_| ())
    }

    /// Cancels and returns an opaque blob for [`Session::download_task_with_resume_data`].
    pub async fn cancel_producing_resume_data(&self) -> Result<Vec<u8>> {
        match self.control(TaskAction::CancelProducingResumeData).await? {
            Response::ResumeData(data) => Ok(data),
            other => Err(Error::UnexpectedResponse { expected: "resume_data", got: other.kind() }),
        }
    }

    /// Gives the task its own policy: each field set overrides its session's, the others
    /// follow it. A running task that the policy refuses in today's conditions stops and
    /// waits (keeping its data); fails for a completed task.
    pub async fn set_policy(&self, policy: TaskPolicy) -> Result<()> {
        self.client.set_task_policy(&[self.id], policy).await
    }

    /// The task's own policy, and the one it runs under with its session's.
    pub async fn policy(&self) -> Result<TaskPolicyInfo> {
        match self.client.request(Request::GetTaskPolicy { task: self.id }).await? {
            Response::TaskPolicy(info) => Ok(info),
            other => Err(Error::UnexpectedResponse { expected: "task_policy", got: other.kind() }),
        }
    }

    /// Answers `challenge`, which the task waits on (see
    /// [`crate::SessionDelegate::did_receive_challenge`]), from anywhere, at any time. An
    /// answer to a challenge the task no longer waits on is refused (`invalid_request`).
    pub async fn answer_challenge(
        &self,
        challenge: &dlsession_proto::Challenge,
        answer: dlsession_proto::ChallengeAnswer,
    ) -> Result<()> {
        self.answer_challenge_round(challenge.round, answer).await
    }

    /// Answers the task's challenge of `round` ([`dlsession_proto::Challenge::round`]): what
    /// [`DownloadTask::answer_challenge`] does, for an app that kept only the round.
    pub async fn answer_challenge_round(&self, round: u32, answer: dlsession_proto::ChallengeAnswer) -> Result<()> {
        self.client.request_ok(Request::AnswerChallenge { task: self.id, round: Some(round), answer }).await
    }

    /// State and counters, now.
    pub async fn info(&self) -> Result<TaskInfo> {
        match self.client.request(Request::GetTask { task: self.id }).await? {
            Response::Task(detail) => Ok(detail.info),
            other => Err(Error::UnexpectedResponse { expected: "task", got: other.kind() }),
        }
    }

    async fn control(&self, action: TaskAction) -> Result<Response> {
        self.client.request(Request::ControlTask { task: self.id, action }).await
    }
}

/// Tasks with their own policy are created suspended, given it, and only then resumed:
/// none starts under the session's policy first.
async fn create_with_policies(
    client: &Client,
    identifier: &str,
    specs: Vec<TaskSpec>,
    policies: Vec<TaskPolicy>,
    resume: bool,
) -> Result<Vec<TaskId>> {
    let ids = client.create_tasks(identifier, specs, false).await?;
    if let Err(e) = apply_policies(client, &ids, &policies).await {
        client.withdraw(&ids).await;
        return Err(e);
    }
    // Started only once every task has its policy (see `Client::start_batch`).
    if resume {
        client.start_batch(identifier, &ids).await?;
    }
    Ok(ids)
}

/// Gives each task its policy, a request per distinct policy (each all or nothing).
async fn apply_policies(client: &Client, ids: &[TaskId], policies: &[TaskPolicy]) -> Result<()> {
    let mut groups: Vec<(TaskPolicy, Vec<TaskId>)> = Vec::new();
    for (&id, &policy) in ids.iter().zip(policies).filter(|(_, p)| !p.is_empty()) {
        match groups.iter_mut().find(|(p, _)| *p == policy) {
            Some((_, group)) => group.push(id),
            None => groups.push((policy, vec![id])),
        }
    }
    for (policy, group) in &groups {
        client.set_task_policy(group, *policy).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Forgotten;

    /// Recently completed tasks are remembered as such, the oldest dropped past the bound.
    #[test]
    fn forgotten_tasks_are_bounded() {
        let mut f = Forgotten::default();
        for id in 0..=Forgotten::KEPT as u64 {
            f.add(id);
        }
        assert!(!f.has(0), "the oldest went");
        assert!(f.has(1) && f.has(Forgotten::KEPT as u64));
        assert_eq!(f.order.len(), Forgotten::KEPT);
        f.add(5);
        assert_eq!(f.order.len(), Forgotten::KEPT, "one already there is not added twice");
    }
}
