//! Requests of any size: task batches, acknowledgements and listings split into requests
//! that each stay well under the frame limit.

use std::collections::HashSet;

use dlsession_proto::{
    Request, Response, SessionInfo, SessionQuery, TaskAction, TaskId, TaskInfo, TaskPolicy, TaskQuery, TaskSpec,
    TaskState, UploadSpec, validate,
};
use tracing::warn;

use crate::connection::Client;
use crate::error::{Error, Result};

impl Client {
    /// Creates tasks in as many requests as it takes to keep each well under the frame
    /// limit (each request is one transaction); returns the ids in order. All or nothing:
    /// a batch split into several requests is created suspended and resumed (when
    /// `resume`) only once every part exists, and if a part is refused, the tasks of the
    /// parts before it are cancelled and retired again, their events never seen by the
    /// app, before the error is returned.
    pub async fn create_tasks(&self, identifier: &str, specs: Vec<TaskSpec>, resume: bool) -> Result<Vec<TaskId>> {
        fits_a_request(specs.iter().map(|s| (spec_size(s), s.url.len())))?;
        let batches = split(specs, spec_size);
        // Each request is checked by the daemon; across requests only the whole can be.
        if batches.len() > 1 {
            validate::distinct_destinations(batches.iter().flatten().filter_map(|s| s.destination.as_deref()))
                .map_err(Error::Invalid)?;
        }
        let identifier = identifier.to_owned();
        self.create_batches(identifier.clone(), batches, resume, move |tasks, resume| Request::CreateTasks {
            identifier: identifier.clone(),
            tasks,
            resume,
        })
        .await
    }

    /// Creates upload tasks like [`Client::create_tasks`]: split into requests well under
    /// the frame limit, all or nothing.
    pub async fn create_uploads(
        &self,
        identifier: &str,
        uploads: Vec<UploadSpec>,
        resume: bool,
    ) -> Result<Vec<TaskId>> {
        fits_a_request(uploads.iter().map(|u| (spec_size(&u.request) + u.file.len(), u.request.url.len())))?;
        let batches = split(uploads, |u| spec_size(&u.request) + u.file.len());
        let identifier = identifier.to_owned();
        self.create_batches(identifier.clone(), batches, resume, move |uploads, resume| Request::CreateUploads {
            identifier: identifier.clone(),
            uploads,
            resume,
        })
        .await
    }

    async fn create_batches<T: Send + 'static>(
        &self,
        identifier: String,
        batches: Vec<Vec<T>>,
        resume: bool,
        request: impl Fn(Vec<T>, bool) -> Request + Send + Sync + 'static,
    ) -> Result<Vec<TaskId>> {
        // One request is one transaction; several are resumed only once all succeeded, and
        // carried to their end even if the caller stops waiting, else the parts made so far
        // would stay suspended, unknown to the app.
        if batches.len() <= 1 {
            return self.create_parts(&identifier, batches, resume, request).await;
        }
        let client = self.clone();
        run_to_end(async move { client.create_parts(&identifier, batches, resume, request).await }).await
    }

    async fn create_parts<T>(
        &self,
        identifier: &str,
        batches: Vec<Vec<T>>,
        resume: bool,
        request: impl Fn(Vec<T>, bool) -> Request,
    ) -> Result<Vec<TaskId>> {
        let mut ids = Vec::with_capacity(batches.iter().map(Vec::len).sum());
        let at_once = batches.len() <= 1;
        let created = async {
            for batch in batches {
                let want = batch.len();
                match self.request_once(request(batch, resume && at_once)).await? {
                    Response::TasksCreated(got) if got.len() == want => ids.extend(got),
                    other => return Err(Error::UnexpectedResponse { expected: "tasks_created", got: other.kind() }),
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = created {
            if !ids.is_empty() {
                warn!(created = ids.len(), error = %e, "a batch was refused; cancelling the tasks created before it");
                self.withdraw(&ids).await;
            }
            return Err(e);
        }
        if resume && !at_once {
            self.start_batch(identifier, &ids).await?;
        }
        Ok(ids)
    }

    /// Starts tasks of session `identifier` created suspended, a part at a time; a part
    /// that fails is tried once more. If it still fails, the tasks still suspended (as the
    /// daemon lists them: a part whose answer was lost may have started) are taken back;
    /// what started runs on, and the app hears of it through its delegate as of tasks made
    /// elsewhere (its events are never swallowed).
    pub(crate) async fn start_batch(&self, identifier: &str, ids: &[TaskId]) -> Result<()> {
        let resume = |part: &[TaskId]| self.request_ok(Request::ResumeTasks { tasks: part.to_vec() });
        for (n, part) in ids.chunks(BATCH_TASKS).enumerate() {
            let started = match resume(part).await {
                Err(first) => {
                    warn!(error = %first, "starting part of a batch failed; trying once more");
                    resume(part).await
                }
                ok => ok,
            };
            if let Err(e) = started {
                let rest = ids.get(n * BATCH_TASKS..).unwrap_or_default();
                match self.list_session_tasks(identifier, vec![TaskState::Suspended]).await {
                    Ok(suspended) => {
                        let suspended: HashSet<TaskId> = suspended.iter().map(|t| t.id).collect();
                        let idle: Vec<TaskId> = rest.iter().copied().filter(|t| suspended.contains(t)).collect();
                        warn!(error = %e, withdrawn = idle.len(), running = ids.len() - idle.len(), "cannot start a batch whole");
                        self.withdraw(&idle).await;
                    }
                    Err(list) => warn!(error = %e, %list, "cannot start a batch whole, nor tell which of it started"),
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// The live tasks of session `identifier` in `states` (empty: all), fetched a page at
    /// a time.
    pub(crate) async fn list_session_tasks(&self, identifier: &str, states: Vec<TaskState>) -> Result<Vec<TaskInfo>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let query = TaskQuery { session: Some(identifier.to_owned()), states: states.clone(), after, limit: 1000 };
            let page = match self.request(Request::ListTasks(query)).await? {
                Response::Tasks(page) => page,
                other => return Err(Error::UnexpectedResponse { expected: "tasks", got: other.kind() }),
            };
            all.extend(page.tasks);
            match page.next_after {
                // A cursor that does not advance would loop for ever.
                Some(next) if after.is_none_or(|prev| next > prev) => after = Some(next),
                _ => return Ok(all),
            }
        }
    }

    /// Takes back tasks the app never got and that never started (suspended): cancels
    /// every one and retires those cancelled, their events acknowledged unseen by any
    /// session of this client. A link that broke is waited for (up to the request timeout).
    pub(crate) async fn withdraw(&self, tasks: &[TaskId]) {
        if let Err(e) = self.connected().await {
            warn!(error = %e, tasks = tasks.len(), "cannot take back the tasks of a refused batch; they stay, suspended");
            return;
        }
        // Marked first: a cancelled task's event may come before its cancel's answer.
        self.mark_withdrawn(tasks);
        let (mut completed, mut kept) = (Vec::with_capacity(tasks.len()), Vec::new());
        let limit = self.request_timeout();
        for window in tasks.chunks(PIPELINE) {
            // One deadline per window: a daemon that stops answering costs one timeout.
            let deadline = crate::deadline::after_tokio(limit);
            let mut answers = Vec::with_capacity(window.len());
            for &task in window {
                match self.send_request(Request::ControlTask { task, action: TaskAction::Cancel }) {
                    Ok(rx) => answers.push((task, rx)),
                    Err(e) => {
                        warn!(task, error = %e, "cannot cancel a task of a refused batch; it stays");
                        kept.push(task);
                    }
                }
            }
            for (task, rx) in answers {
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(Ok(_))) => completed.push(task),
                    Ok(Ok(Err(e))) => {
                        warn!(task, error = %e, "cancelling a task of a refused batch failed; it stays");
                        kept.push(task);
                    }
                    Ok(Err(_)) | Err(_) => {
                        warn!(task, "no answer to cancelling a task of a refused batch; it stays");
                        kept.push(task);
                    }
                }
            }
        }
        // What was not cancelled stays, suspended, and is the app's to find: its events
        // (none while suspended) must reach it.
        self.unmark_withdrawn(&kept);
        if let Err(e) = self.acknowledge_tasks(&completed).await {
            warn!(error = %e, "retiring the tasks of a refused batch failed");
        }
    }

    /// Acknowledges every durable event of these completed tasks, in requests of a
    /// bounded size.
    pub async fn acknowledge_tasks(&self, tasks: &[TaskId]) -> Result<()> {
        for chunk in tasks.chunks(BATCH_IDS) {
            match self.request(Request::AcknowledgeTasks { tasks: chunk.to_vec() }).await? {
                Response::Ok => {}
                other => return Err(Error::UnexpectedResponse { expected: "ok", got: other.kind() }),
            }
        }
        Ok(())
    }

    /// Gives these tasks their own policy (each field set overrides their session's), in
    /// requests of a bounded size. Each request is all or nothing.
    pub async fn set_task_policy(&self, tasks: &[TaskId], policy: TaskPolicy) -> Result<()> {
        for chunk in tasks.chunks(BATCH_TASKS) {
            match self.request(Request::SetTaskPolicy { tasks: chunk.to_vec(), policy }).await? {
                Response::Ok => {}
                other => return Err(Error::UnexpectedResponse { expected: "ok", got: other.kind() }),
            }
        }
        Ok(())
    }

    /// Every session, in identifier order, fetched a page at a time.
    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let query = SessionQuery { after: after.clone(), limit: 1000 };
            let page = match self.request(Request::ListSessionsPage(query)).await? {
                Response::SessionsPage(page) => page,
                other => return Err(Error::UnexpectedResponse { expected: "sessions_page", got: other.kind() }),
            };
            all.extend(page.sessions);
            match page.next_after {
                // A cursor that does not advance would loop for ever.
                Some(next) if after.as_ref().is_none_or(|prev| next > *prev) => after = Some(next),
                _ => return Ok(all),
            }
        }
    }
}

/// Runs `work` on its own task and waits for it: dropping the wait does not stop the work
/// half-way (a batch made in parts, a policy given before the start).
pub(crate) async fn run_to_end<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work).await.unwrap_or_else(|e| {
        Err(Error::Invalid(dlsession_proto::ErrorInfo::new(
            dlsession_proto::ErrorCode::Internal,
            format!("creating the tasks stopped: {e}"),
        )))
    })
}

/// Refuses a spec too large for any request (its encoding would fail as `internal`): a URL
/// that long is `invalid_url` (the daemon's own limit is far lower), anything else
/// `invalid_request`. `specs`: each spec's size and its URL's length.
fn fits_a_request(specs: impl Iterator<Item = (usize, usize)>) -> Result<()> {
    for (i, (size, url)) in specs.enumerate() {
        if size <= SPEC_MAX {
            continue;
        }
        let (code, what) = if url > SPEC_MAX / 2 {
            (dlsession_proto::ErrorCode::InvalidUrl, format!("its URL is {url} bytes long"))
        } else {
            (dlsession_proto::ErrorCode::InvalidRequest, format!("it takes {size} bytes"))
        };
        let message = format!("task {} of the batch is too large for a request: {what} (at most {SPEC_MAX})", i + 1);
        return Err(Error::Invalid(dlsession_proto::ErrorInfo::new(code, message)));
    }
    Ok(())
}

/// Specs in requests of at most [`BATCH_TASKS`] and about [`BATCH_BYTES`] each (a spec
/// larger than that goes alone; the daemon refuses it).
fn split<T>(specs: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut batches = Vec::new();
    let mut specs = specs.into_iter().peekable();
    while specs.peek().is_some() {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(spec) =
            specs.next_if(|s| batch.is_empty() || (batch.len() < BATCH_TASKS && bytes + size(s) <= BATCH_BYTES))
        {
            bytes += size(&spec);
            batch.push(spec);
        }
        batches.push(batch);
    }
    batches
}

/// Cancels on their way at once when a refused batch is taken back.
const PIPELINE: usize = 256;
/// Tasks per `CreateTasks` request, and the bytes of specs (well under the frame limit).
const BATCH_TASKS: usize = 1000;
const BATCH_BYTES: usize = 512 << 10;
/// The largest spec sent (alone in its request): a frame less room for the request around it.
const SPEC_MAX: usize = dlsession_proto::MAX_FRAME - (64 << 10);
/// Task ids per acknowledgement request.
const BATCH_IDS: usize = 10_000;

/// About how many bytes a task spec takes on the wire (an upper estimate).
fn spec_size(s: &TaskSpec) -> usize {
    let headers: usize = s.headers.iter().map(|h| h.name.len() + h.value.len() + 4).sum();
    64 + s.url.len()
        + headers
        + s.description.as_ref().map_or(0, String::len)
        + s.destination.as_ref().map_or(0, String::len)
}
