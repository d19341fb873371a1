//! One handler per client request.

use std::collections::HashSet;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::{After, AfterStop, Core, Session, Task};
use crate::engine::Progress;
use crate::engine::limiter::RateLimiter;
use crate::model::{DEFAULT_FILE_MODE, Phase, SessionKey, SessionRecord, TaskRecord, now_ms};
use crate::store::Op;
use crate::validate;
use dlsession_proto::{
    DaemonStatus, ErrorCode, ErrorInfo, Header, PROTOCOL_VERSION, Request, Response, SessionConfig, SessionInfo,
    SessionPage, SessionQuery, TaskAction, TaskCounts, TaskId, TaskPage, TaskQuery, TaskSpec, TaskState, WakeReason,
    WakeStatus, WatchFilter,
};

/// How a handler answered: now, or later (after a commit or a worker stop).
pub(super) enum Answer {
    Now(Response),
    Later,
}

type Handled = Result<Answer, ErrorInfo>;

/// The opaque blob behind `cancel_producing_resume_data`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ResumeData {
    pub magic: [u8; 4],
    pub url: String,
    pub headers: Vec<Header>,
    pub description: Option<String>,
    pub priority: f32,
    pub expected_sha256: Option<[u8; 32]>,
    pub destination: Option<String>,
    pub overwrite: bool,
    pub offset: u64,
    pub bytes_expected: Option<u64>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The kept partial file, by name, in the resume directory.
    pub file: Option<String>,
}

pub(super) const RESUME_MAGIC: [u8; 4] = *b"DLRD";

/// Largest page of `ListTasks`, and the byte budget that keeps it well under a frame.
const MAX_PAGE: usize = 1000;
const PAGE_BUDGET: usize = 512 << 10;

/// Whether the destinations of a task-creating request were checked on disk yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DiskCheck {
    Pending,
    Done,
}

/// Names the task of a batch an error is about.
fn in_batch(i: usize, n: usize, e: ErrorInfo) -> ErrorInfo {
    let prefix = if n > 1 { format!("task {} of the batch: ", i + 1) } else { String::new() };
    ErrorInfo { message: format!("{prefix}{}", e.message), ..e }
}

impl Core {
    pub(super) fn on_request(&mut self, conn: super::ConnId, id: u64, request: Request) {
        debug!(conn, id, request = request_name(&request), "request");
        self.handle_request(conn, id, request, DiskCheck::Pending);
    }

    /// Handles a request; `check` says whether its destinations were checked on disk.
    pub(super) fn handle_request(&mut self, conn: super::ConnId, id: u64, request: Request, check: DiskCheck) {
        let mutating = !matches!(
            request,
            Request::Status
                | Request::GetSession { .. }
                | Request::ListSessions
                | Request::ListSessionsPage(_)
                | Request::GetTask { .. }
                | Request::ListTasks(_)
                | Request::Watch(_)
                | Request::Unwatch
        );
        // Attaching writes only when it creates or reconfigures a session (it checks), and
        // detaching, waking and watching write nothing: an app can still collect its events.
        let writes = mutating
            && !matches!(
                request,
                Request::Attach { .. }
                    | Request::Detach { .. }
                    | Request::Wake { .. }
                    | Request::HandleWakes
                    | Request::ListSessionsPage(_)
            );
        let result = if mutating && self.shutting_down {
            Err(ErrorInfo::new(ErrorCode::Internal, "the daemon is shutting down; try again when it is back"))
        } else if let Some(e) = self.storage.as_ref().filter(|_| writes) {
            Err(e.clone())
        } else {
            self.dispatch(conn, id, request, check)
        };
        match result {
            Ok(Answer::Now(response)) => self.reply(conn, id, Ok(response)),
            Ok(Answer::Later) => {}
            Err(e) => self.reply(conn, id, Err(e)),
        }
    }

    fn dispatch(&mut self, conn: super::ConnId, id: u64, request: Request, check: DiskCheck) -> Handled {
        match request {
            Request::Status => Ok(Answer::Now(Response::Status(self.status()))),
            Request::Attach { identifier, config, takeover } => self.attach(conn, id, identifier, config, takeover),
            Request::Detach { identifier } => self.detach(conn, &identifier),
            Request::OpenSession { identifier, config } => self.open_session(conn, id, identifier, config),
            Request::GetSession { identifier } => {
                let key = self.session_by_identifier(&identifier)?;
                Ok(Answer::Now(Response::Session(self.session_info(key)?)))
            }
            Request::ListSessions => {
                // Protocol 1 has no pages: everything, or an error if it does not fit a frame.
                let infos = self.by_identifier.values().filter_map(|k| self.session_info(*k).ok()).collect();
                Ok(Answer::Now(Response::Sessions(infos)))
            }
            Request::ListSessionsPage(query) => Ok(Answer::Now(Response::SessionsPage(self.list_sessions(query)))),
            Request::HandleWakes => {
                let app_id = self.conns.get_mut(&conn).and_then(|c| {
                    c.handles_wakes = true;
                    c.handle.app_id.clone()
                });
                if let Some(app_id) = app_id {
                    self.wake_for_new_app(&app_id, conn);
                }
                Ok(Answer::Now(Response::Ok))
            }
            Request::CreateTasks { identifier, tasks, resume } => {
                self.create_tasks(conn, id, identifier, tasks, resume, check)
            }
            Request::CreateTaskFromResumeData { identifier, resume_data, resume } => {
                self.create_from_resume_data(conn, id, identifier, resume_data, resume, check)
            }
            Request::ControlTask { task, action } => self.control_task(conn, id, task, action),
            Request::GetTask { task } => self.get_task(conn, id, task),
            Request::ListTasks(query) => self.list_tasks(query),
            Request::AckEvents { identifier, seqs } => {
                let key = self.session_by_identifier(&identifier)?;
                self.acknowledge(conn, id, key, seqs);
                Ok(Answer::Later)
            }
            Request::AcknowledgeTasks { tasks } => self.acknowledge_tasks(conn, id, tasks),
            Request::FinishTasksAndInvalidate { identifier } => {
                self.finish_and_invalidate(conn, id, &identifier, false)
            }
            Request::InvalidateAndCancel { identifier } => self.finish_and_invalidate(conn, id, &identifier, true),
            Request::Wake { identifier } => {
                let key = self.session_by_identifier(&identifier)?;
                Ok(Answer::Now(Response::Wake(self.wake_now(key, WakeReason::Requested)?)))
            }
            Request::Watch(filter) => self.watch(conn, filter),
            Request::Unwatch => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.watch = None;
                }
                Ok(Answer::Now(Response::Ok))
            }
        }
    }

    fn status(&self) -> DaemonStatus {
        let now = now_ms();
        DaemonStatus {
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
            started_at: self.started_at,
            uptime_ms: now.saturating_sub(self.started_at),
            socket: self.cfg.socket.display().to_string(),
            state_dir: self.cfg.state_dir.display().to_string(),
            cache_dir: self.cfg.cache_dir.display().to_string(),
            database: self.cfg.database_path().display().to_string(),
            tasks: self.counts,
            sessions: self.sessions.len() as u64,
            connections: self.conns.len() as u64,
            download_rate: self.download_rate,
            bytes_downloaded: self.bytes_downloaded,
            max_concurrent_downloads: self.cfg.limits.max_concurrent_downloads,
            storage: self.storage.clone(),
        }
    }

    fn attach(
        &mut self,
        conn: super::ConnId,
        id: u64,
        identifier: String,
        config: SessionConfig,
        takeover: bool,
    ) -> Handled {
        dlsession_proto::validate::identifier(&identifier)?;
        validate::session_config(&config, &self.cfg.limits)?;
        if let Some(e) = &self.storage {
            // Only an attach that writes nothing can be served while the disk refuses writes.
            let writes = self
                .by_identifier
                .get(&identifier)
                .and_then(|k| self.sessions.get(k))
                .is_none_or(|s| !s.rec.invalid && s.rec.config != config);
            if writes {
                return Err(e.clone());
            }
        }
        let mut ops = Vec::new();
        let key = match self.by_identifier.get(&identifier).copied() {
            Some(key) => {
                let other = self.sessions.get(&key).and_then(|s| s.attached).filter(|&c| c != conn);
                if let Some(other) = other {
                    if !takeover {
                        let who = self
                            .conns
                            .get(&other)
                            .map(|c| match c.handle.pid {
                                Some(pid) => format!("{} (pid {pid})", c.handle.client_name),
                                None => c.handle.client_name.clone(),
                            })
                            .unwrap_or_else(|| "another client".into());
                        return Err(ErrorInfo::new(
                            ErrorCode::SessionInUse,
                            format!("session {identifier:?} is attached by {who}; attach with takeover to replace it"),
                        ));
                    }
                    self.detach_conn(other, key, dlsession_proto::DetachReason::TakenOver);
                }
                if let Some(s) = self.sessions.get_mut(&key)
                    && !s.rec.invalid
                    && s.rec.config != config
                {
                    set_config(s, config);
                    ops.push(Op::UpdateSession(s.rec.clone()));
                }
                key
            }
            None => self.create_session(identifier, config, &mut ops),
        };
        // Attached: nothing to wake. The wake backoff stays until the events are
        // acknowledged: an app that attaches and crashes is not relaunched any sooner.
        self.cancel_wakes(key);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.attached = Some(conn);
            s.replaying = true;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.attached.insert(key);
        }
        info!(conn, session = %self.identifier(key), "attached");
        self.commit(ops, vec![After::Replay { conn, id, session: key }]);
        Ok(Answer::Later)
    }

    /// Detaches `conn` from `key`, telling it why.
    pub(super) fn detach_conn(&mut self, conn: super::ConnId, key: SessionKey, reason: dlsession_proto::DetachReason) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        if s.attached == Some(conn) {
            s.attached = None;
            s.replaying = false;
        }
        let identifier = s.rec.identifier.clone();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.attached.remove(&key);
            c.handle.event(dlsession_proto::Event::Detached { identifier, reason });
        }
    }

    fn detach(&mut self, conn: super::ConnId, identifier: &str) -> Handled {
        let key = self.session_by_identifier(identifier)?;
        if let Some(s) = self.sessions.get_mut(&key)
            && s.attached == Some(conn)
        {
            s.attached = None;
            s.replaying = false;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.attached.remove(&key);
        }
        self.check_wake(key, self.cfg.timing.wake_initial);
        Ok(Answer::Now(Response::Ok))
    }

    fn create_session(&mut self, identifier: String, config: SessionConfig, ops: &mut Vec<Op>) -> SessionKey {
        let key = self.next_session_key;
        self.next_session_key += 1;
        info!(session = %identifier, "session created");
        let rec = SessionRecord {
            key,
            identifier: identifier.clone(),
            config,
            next_seq: self.seq_floor.max(1),
            invalidating: false,
            invalid: false,
            created_at: now_ms(),
        };
        ops.push(Op::InsertSession(rec.clone()));
        self.sessions.insert(key, new_session(rec));
        self.by_identifier.insert(identifier, key);
        key
    }

    fn open_session(
        &mut self,
        conn: super::ConnId,
        id: u64,
        identifier: String,
        config: Option<SessionConfig>,
    ) -> Handled {
        dlsession_proto::validate::identifier(&identifier)?;
        if let Some(c) = &config {
            validate::session_config(c, &self.cfg.limits)?;
        }
        let mut ops = Vec::new();
        let key = match self.by_identifier.get(&identifier).copied() {
            Some(key) => {
                if let (Some(s), Some(config)) = (self.sessions.get_mut(&key), config)
                    && !s.rec.invalid
                    && s.rec.config != config
                {
                    set_config(s, config);
                    ops.push(Op::UpdateSession(s.rec.clone()));
                }
                key
            }
            None => self.create_session(identifier, config.unwrap_or_default(), &mut ops),
        };
        let info = self.session_info(key)?;
        self.commit(ops, vec![After::Reply { conn, id, response: Response::Session(info) }]);
        // A changed app_id or launch spec may make a pending wake possible.
        self.check_wake(key, std::time::Duration::ZERO);
        Ok(Answer::Later)
    }

    fn open_for_tasks(&self, identifier: &str) -> Result<SessionKey, ErrorInfo> {
        let key = self.session_by_identifier(identifier)?;
        let s = self.sessions.get(&key).ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchSession, "no such session"))?;
        if s.rec.invalidating || s.rec.invalid {
            return Err(ErrorInfo::new(
                ErrorCode::SessionInvalidated,
                format!("session {identifier:?} is being invalidated and accepts no new tasks"),
            ));
        }
        Ok(key)
    }

    /// Checks `dests` (index in the batch, path, overwrite) on a blocking thread, then
    /// handles `request` again with `DiskCheck::Done`: a destination on a hung network
    /// mount must not stall the core.
    fn check_destinations(&self, conn: super::ConnId, id: u64, request: Request, dests: Vec<(usize, String, bool)>) {
        let n = match &request {
            Request::CreateTasks { tasks, .. } => tasks.len(),
            _ => 1,
        };
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            crate::failpoint::hit("destination-check");
            let result = dests.into_iter().try_for_each(|(i, dest, overwrite)| {
                validate::destination_on_disk(&dest, overwrite).map_err(|e| in_batch(i, n, e))
            });
            let _ = tx.send(super::CoreMsg::DestinationsChecked { conn, id, request: Box::new(request), result });
        });
    }

    fn create_tasks(
        &mut self,
        conn: super::ConnId,
        id: u64,
        identifier: String,
        specs: Vec<TaskSpec>,
        resume: bool,
        check: DiskCheck,
    ) -> Handled {
        let key = self.open_for_tasks(&identifier)?;
        let max = self.cfg.limits.max_tasks_per_batch as usize;
        if specs.len() > max {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!("{} tasks in one batch; the limit is {max}", specs.len()),
            ));
        }
        let mut hosts = Vec::with_capacity(specs.len());
        let mut destinations = HashSet::new();
        for (i, spec) in specs.iter().enumerate() {
            let url =
                validate::task(spec, &self.cfg.limits, &self.cfg.cache_dir).map_err(|e| in_batch(i, specs.len(), e))?;
            if let Some(d) = &spec.destination
                && !destinations.insert(d.as_str())
            {
                return Err(ErrorInfo::new(
                    ErrorCode::InvalidRequest,
                    format!("destination {d:?} is given to more than one task of the batch"),
                ));
            }
            hosts.push(host_key(&url));
        }
        if check == DiskCheck::Pending {
            let dests: Vec<(usize, String, bool)> = specs
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.destination.clone().map(|d| (i, d, s.overwrite)))
                .collect();
            if !dests.is_empty() {
                self.check_destinations(conn, id, Request::CreateTasks { identifier, tasks: specs, resume }, dests);
                return Ok(Answer::Later);
            }
        }
        let now = now_ms();
        let file_mode = self.conns.get(&conn).map_or(DEFAULT_FILE_MODE, |c| c.handle.file_mode);
        let mut ops = Vec::with_capacity(specs.len() + 1);
        let mut ids = Vec::with_capacity(specs.len());
        for (spec, host) in specs.into_iter().zip(hosts) {
            let id = self.next_task_id;
            self.next_task_id += 1;
            let rec = new_record(id, key, spec, now, file_mode);
            self.insert_task(rec, host);
            if resume {
                self.make_queued(id, now);
            }
            if let Some(t) = self.tasks.get(&id) {
                ops.push(Op::InsertTask(Box::new(t.rec.clone())));
            }
            ids.push(id);
        }
        ops.push(Op::SetNextTaskId(self.next_task_id));
        debug!(session = %self.identifier(key), count = ids.len(), "tasks created");
        self.commit(ops, vec![After::Reply { conn, id, response: Response::TasksCreated(ids) }]);
        self.schedule();
        Ok(Answer::Later)
    }

    /// Adds a task (in the state its record says) to the in-memory indexes.
    pub(super) fn insert_task(&mut self, rec: TaskRecord, host: String) {
        let id = rec.id;
        let key = rec.session;
        let state = rec.state;
        let progress = Arc::new(Progress::new(rec.committed_offset, rec.bytes_expected.or(rec.expected_size)));
        let sampled = rec.committed_offset;
        self.tasks.insert(
            id,
            Box::new(Task {
                rec,
                state,
                host,
                progress,
                run: None,
                timer: None,
                failures: 0,
                move_failures: 0,
                unsaved: false,
                speed: 0,
                sampled,
                waiting_replies: Vec::new(),
            }),
        );
        self.counts.add(state);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.tasks.insert(id);
            s.counts.add(state);
        }
    }

    /// Suspended → queued: starts the resource clock on first resume.
    pub(super) fn make_queued(&mut self, id: TaskId, now: u64) {
        let budget = self
            .tasks
            .get(&id)
            .and_then(|t| self.sessions.get(&t.rec.session))
            .map(|s| s.rec.config.timeout_for_resource_ms)
            .unwrap_or(SessionConfig::DEFAULT_TIMEOUT_FOR_RESOURCE_MS);
        if let Some(t) = self.tasks.get_mut(&id) {
            t.rec.resource_deadline.get_or_insert(now.saturating_add(budget));
            t.rec.retry_at = None;
        }
        self.set_state(id, TaskState::Queued);
        self.enqueue(id);
    }

    fn create_from_resume_data(
        &mut self,
        conn: super::ConnId,
        id: u64,
        identifier: String,
        blob: Vec<u8>,
        resume: bool,
        check: DiskCheck,
    ) -> Handled {
        let key = self.open_for_tasks(&identifier)?;
        let bad =
            || ErrorInfo::new(ErrorCode::InvalidRequest, "the resume data is not valid (not produced by dlsessiond?)");
        let data: ResumeData = dlsession_proto::codec::decode(&blob).map_err(|_| bad())?;
        if data.magic != RESUME_MAGIC {
            return Err(bad());
        }
        let spec = TaskSpec {
            url: data.url,
            headers: data.headers,
            description: data.description,
            priority: data.priority,
            earliest_begin: None,
            expected_sha256: data.expected_sha256,
            destination: data.destination,
            overwrite: data.overwrite,
            expected_size: data.bytes_expected,
        };
        let url = validate::task(&spec, &self.cfg.limits, &self.cfg.cache_dir)?;
        if check == DiskCheck::Pending
            && let Some(dest) = spec.destination.clone()
        {
            let request = Request::CreateTaskFromResumeData { identifier, resume_data: blob, resume };
            self.check_destinations(conn, id, request, vec![(0, dest, spec.overwrite)]);
            return Ok(Answer::Later);
        }
        let now = now_ms();
        let task_id = self.next_task_id;
        self.next_task_id += 1;
        let file_mode = self.conns.get(&conn).map_or(DEFAULT_FILE_MODE, |c| c.handle.file_mode);
        let mut rec = new_record(task_id, key, spec, now, file_mode);
        // Adopt the kept partial file, if it is still there. It is linked, not moved: the
        // kept name goes only once the new task is durable, so a crash before that leaves
        // the resume data usable (start-up removes the unknown task's link).
        let kept = data.file.filter(|f| !f.contains('/') && !f.starts_with('.')).map(|f| self.resume_dir().join(f));
        let mut adopted = None;
        if let Some(kept) = kept {
            let part = self.part_path(&rec);
            let private = |d: &std::path::Path| {
                std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700).create(d)
            };
            let linked = part.parent().map(private).transpose().and_then(|_| {
                std::fs::hard_link(&kept, &part)
                    .map(|()| true)
                    .or_else(|_| std::fs::rename(&kept, &part).map(|()| false))
            });
            match linked {
                Ok(is_link) => {
                    if is_link {
                        adopted = Some(kept);
                    }
                    rec.committed_offset = data.offset;
                    rec.etag = data.etag;
                    rec.last_modified = data.last_modified;
                    rec.bytes_expected = data.bytes_expected;
                }
                Err(e) => info!(error = %e, "resume data's partial file is gone; the new task starts from zero"),
            }
        }
        self.insert_task(rec, host_key(&url));
        if resume {
            self.make_queued(task_id, now);
        }
        let mut ops = Vec::new();
        if let Some(t) = self.tasks.get(&task_id) {
            ops.push(Op::InsertTask(Box::new(t.rec.clone())));
        }
        ops.push(Op::SetNextTaskId(self.next_task_id));
        let mut after = vec![After::Reply { conn, id, response: Response::TasksCreated(vec![task_id]) }];
        after.extend(adopted.map(|kept| After::RemoveFiles(vec![kept])));
        self.commit(ops, after);
        self.schedule();
        Ok(Answer::Later)
    }

    fn no_such_task(task: TaskId) -> ErrorInfo {
        ErrorInfo::new(
            ErrorCode::NoSuchTask,
            format!("no live task {task} (it may have completed and been acknowledged, or never existed)"),
        )
    }

    fn control_task(&mut self, conn: super::ConnId, id: u64, task: TaskId, action: TaskAction) -> Handled {
        let t = self.tasks.get_mut(&task).ok_or_else(|| Self::no_such_task(task))?;
        let state = t.state;
        if state == TaskState::Completed {
            return Err(ErrorInfo::new(ErrorCode::InvalidRequest, format!("task {task} has already completed")));
        }
        let stopping_for = t.run.as_ref().and_then(|r| r.after_stop);
        // The body is in and the file is being synced and moved: too late to stop it.
        let finishing = t.run.as_ref().is_some_and(|r| !r.holds_slot);
        if finishing && action != TaskAction::Resume {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!("task {task} has received all its data and is finishing; it can no longer be stopped"),
            ));
        }
        match action {
            TaskAction::Resume => match state {
                TaskState::Suspended => {
                    self.make_queued(task, now_ms());
                    self.save_task(task, vec![After::Reply { conn, id, response: Response::Ok }]);
                    self.schedule();
                    Ok(Answer::Later)
                }
                TaskState::Running if stopping_for == Some(AfterStop::Suspend) => {
                    if let Some(run) = t.run.as_mut() {
                        run.after_stop = Some(AfterStop::Requeue);
                    }
                    Ok(Answer::Now(Response::Ok))
                }
                // Backing off (or waiting to move its file): try now. The backoff itself is
                // kept: a resume is a nudge, not a promise that the problem is gone.
                TaskState::Waiting => {
                    info!(task, "resumed while waiting: retrying now");
                    self.unqueue(task);
                    self.set_state(task, TaskState::Queued);
                    self.enqueue(task);
                    self.save_task(task, vec![After::Reply { conn, id, response: Response::Ok }]);
                    self.schedule();
                    Ok(Answer::Later)
                }
                _ => Ok(Answer::Now(Response::Ok)),
            },
            TaskAction::Suspend => match state {
                TaskState::Suspended => Ok(Answer::Now(Response::Ok)),
                TaskState::Running => {
                    t.waiting_replies.push((conn, id));
                    self.stop_worker(task, AfterStop::Suspend);
                    Ok(Answer::Later)
                }
                _ => {
                    self.unqueue(task);
                    self.set_state(task, TaskState::Suspended);
                    self.save_task(task, vec![After::Reply { conn, id, response: Response::Ok }]);
                    Ok(Answer::Later)
                }
            },
            TaskAction::Cancel | TaskAction::CancelProducingResumeData => {
                let with_data = action == TaskAction::CancelProducingResumeData;
                if state == TaskState::Running {
                    t.waiting_replies.push((conn, id));
                    let how = if with_data { AfterStop::CancelProducingResumeData } else { AfterStop::Cancel };
                    self.stop_worker(task, how);
                    return Ok(Answer::Later);
                }
                self.unqueue(task);
                let response = if with_data { Response::ResumeData(self.keep_for_resume(task)) } else { Response::Ok };
                let mut ops = Vec::new();
                let mut after = Vec::new();
                self.complete(task, Some(cancelled()), &mut ops, &mut after);
                after.push(After::Reply { conn, id, response });
                self.commit(ops, after);
                Ok(Answer::Later)
            }
        }
    }

    /// Moves the partial file aside and returns the resume-data blob for it.
    pub(super) fn keep_for_resume(&mut self, task: TaskId) -> Vec<u8> {
        let Some(t) = self.tasks.get(&task) else { return Vec::new() };
        let rec = &t.rec;
        let part = self.part_path(rec);
        let resumable = rec.committed_offset > 0
            && (rec.etag.as_deref().is_some_and(crate::engine::http::is_strong_etag) || rec.last_modified.is_some());
        let mut file = None;
        if resumable {
            let name = format!("{:016x}.part", super::secret());
            let dir = self.resume_dir();
            let kept_path = dir.join(&name);
            // Durable before the blob is handed out (both directory entries), and dated now:
            // retention counts from the cancel, not from the last byte written. Rare enough
            // for these syncs to run here rather than on a blocking thread.
            let kept = std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                .create(&dir)
                .and_then(|_| std::fs::rename(&part, &kept_path))
                .and_then(|_| {
                    std::fs::File::options().write(true).open(&kept_path)?.set_modified(std::time::SystemTime::now())
                })
                .and_then(|_| crate::engine::files::sync_parent(&kept_path))
                .and_then(|_| crate::engine::files::sync_parent(&part));
            match kept {
                Ok(()) => file = Some(name),
                Err(e) => info!(task, error = %e, "cannot keep the partial file; resume data will restart from zero"),
            }
        }
        let data = ResumeData {
            magic: RESUME_MAGIC,
            url: rec.url.clone(),
            headers: rec.headers.clone(),
            description: rec.description.clone(),
            priority: rec.priority,
            expected_sha256: rec.expected_sha256,
            destination: rec.destination.clone(),
            overwrite: rec.overwrite,
            offset: if file.is_some() { rec.committed_offset } else { 0 },
            bytes_expected: rec.bytes_expected,
            etag: rec.etag.clone(),
            last_modified: rec.last_modified.clone(),
            file,
        };
        if data.file.is_some() {
            self.kept_resume_file();
        }
        dlsession_proto::codec::encode(&data).unwrap_or_default()
    }

    fn get_task(&mut self, conn: super::ConnId, id: u64, task: TaskId) -> Handled {
        if let Some(t) = self.tasks.get(&task) {
            return Ok(Answer::Now(Response::Task(self.task_detail(t))));
        }
        // Not live: it may be history in the database.
        let store = self.store.clone();
        let out = self.conns.get(&conn).map(|c| c.handle.clone());
        let names: std::collections::HashMap<SessionKey, String> =
            self.sessions.iter().map(|(k, s)| (*k, s.rec.identifier.clone())).collect();
        let downloads = self.cfg.downloads_dir();
        tokio::spawn(async move {
            let result = match store.load_task(task).await {
                Ok(Some(rec)) => {
                    let name = names.get(&rec.session).cloned().unwrap_or_else(|| "(invalidated session)".into());
                    Ok(Response::Task(super::convert::history_detail(rec, name, &downloads)))
                }
                Ok(None) => Err(Self::no_such_task(task)),
                Err(e) => Err(ErrorInfo::new(ErrorCode::Internal, format!("cannot read task {task}: {e}"))),
            };
            if let Some(out) = out {
                out.send(dlsession_proto::ServerMessage::Response { id, result });
            }
        });
        Ok(Answer::Later)
    }

    /// One page of sessions after `query.after`, in identifier order, within the byte budget.
    fn list_sessions(&self, query: SessionQuery) -> SessionPage {
        let limit = match query.limit as usize {
            0 => MAX_PAGE,
            n => n.min(MAX_PAGE),
        };
        let range = match &query.after {
            Some(after) => self.by_identifier.range::<str, _>((Bound::Excluded(after.as_str()), Bound::Unbounded)),
            None => self.by_identifier.range::<str, _>(..),
        };
        let mut sessions = Vec::new();
        let mut budget = PAGE_BUDGET;
        let mut next_after = None;
        for key in range.map(|(_, key)| key) {
            let Ok(info) = self.session_info(*key) else { continue };
            let cost = session_cost(&info);
            if sessions.len() == limit || cost > budget {
                next_after = sessions.last().map(|i: &SessionInfo| i.identifier.clone());
                break;
            }
            budget -= cost;
            sessions.push(info);
        }
        SessionPage { sessions, next_after }
    }

    fn list_tasks(&self, query: TaskQuery) -> Handled {
        let limit = match query.limit as usize {
            0 => MAX_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = query.after.map_or(0, |a| a.saturating_add(1));
        let session_ids =
            match &query.session {
                Some(name) => {
                    Some(&self.sessions.get(&self.session_by_identifier(name)?).map(|s| &s.tasks).ok_or_else(|| {
                        ErrorInfo::new(ErrorCode::NoSuchSession, format!("no session named {name:?}"))
                    })?)
                }
                None => None,
            };
        let ids: Box<dyn Iterator<Item = TaskId>> = match session_ids {
            Some(set) => Box::new(set.range(after..).copied()),
            None => Box::new(self.tasks.range(after..).map(|(id, _)| *id)),
        };
        let mut tasks = Vec::new();
        let mut budget = PAGE_BUDGET;
        let mut next_after = None;
        for id in ids {
            let Some(t) = self.tasks.get(&id) else { continue };
            if !query.states.is_empty() && !query.states.contains(&t.state) {
                continue;
            }
            let info = self.task_info(t);
            let cost = task_cost(&info);
            if tasks.len() == limit || (cost > budget && !tasks.is_empty()) {
                next_after = tasks.last().map(|i: &dlsession_proto::TaskInfo| i.id);
                break;
            }
            budget = budget.saturating_sub(cost);
            tasks.push(info);
        }
        Ok(Answer::Now(Response::Tasks(TaskPage { tasks, next_after })))
    }

    fn acknowledge_tasks(&mut self, conn: super::ConnId, id: u64, tasks: Vec<TaskId>) -> Handled {
        // The tasks per session first, then one pass over each session's events: a pass per
        // task made acknowledging 1,000 tasks cost 1,000 passes over 2,000 events.
        let mut wanted: std::collections::BTreeMap<SessionKey, std::collections::HashSet<TaskId>> = Default::default();
        for task in tasks {
            let t = self.tasks.get(&task).ok_or_else(|| Self::no_such_task(task))?;
            if t.state != TaskState::Completed {
                return Err(ErrorInfo::new(ErrorCode::InvalidRequest, format!("task {task} has not completed")));
            }
            wanted.entry(t.rec.session).or_default().insert(task);
        }
        let mut by_session: std::collections::BTreeMap<SessionKey, Vec<u64>> = Default::default();
        for (key, ids) in wanted {
            let Some(s) = self.sessions.get(&key) else { continue };
            let seqs: Vec<u64> = s
                .events
                .iter()
                .filter(|(_, e)| e.task().is_some_and(|t| ids.contains(&t)))
                .map(|(seq, _)| *seq)
                .collect();
            by_session.insert(key, seqs);
        }
        let last = by_session.len();
        if last == 0 {
            return Ok(Answer::Now(Response::Ok));
        }
        for (i, (key, seqs)) in by_session.into_iter().enumerate() {
            if i + 1 == last {
                self.acknowledge(conn, id, key, seqs);
            } else {
                self.acknowledge_quietly(key, seqs);
            }
        }
        Ok(Answer::Later)
    }

    fn finish_and_invalidate(&mut self, conn: super::ConnId, id: u64, identifier: &str, cancel: bool) -> Handled {
        let key = self.session_by_identifier(identifier)?;
        let mut ops = Vec::new();
        let mut after = Vec::new();
        if let Some(s) = self.sessions.get_mut(&key) {
            if s.rec.invalid {
                return Err(ErrorInfo::new(
                    ErrorCode::SessionInvalidated,
                    format!("session {identifier:?} is already invalid"),
                ));
            }
            if !s.rec.invalidating {
                s.rec.invalidating = true;
                ops.push(Op::UpdateSession(s.rec.clone()));
            }
        }
        if cancel {
            let ids: Vec<TaskId> =
                self.sessions.get(&key).map(|s| s.tasks.iter().copied().collect()).unwrap_or_default();
            for task in ids {
                let Some(t) = self.tasks.get(&task) else { continue };
                match t.state {
                    TaskState::Completed => {}
                    TaskState::Running => self.stop_worker(task, AfterStop::Cancel),
                    _ => {
                        self.unqueue(task);
                        self.complete(task, Some(cancelled()), &mut ops, &mut after);
                    }
                }
            }
        }
        after.push(After::Reply { conn, id, response: Response::Ok });
        self.check_invalidation(key, &mut ops, &mut after);
        self.commit(ops, after);
        Ok(Answer::Later)
    }

    fn watch(&mut self, conn: super::ConnId, filter: WatchFilter) -> Handled {
        let session = match &filter.session {
            Some(name) => Some(self.session_by_identifier(name)?),
            None => None,
        };
        // Start the watcher with the current state of what it asked about.
        let infos: Vec<dlsession_proto::TaskInfo> = if filter.tasks.is_empty() {
            self.tasks
                .values()
                .filter(|t| session.is_none_or(|k| t.rec.session == k) && t.state != TaskState::Completed)
                .map(|t| self.task_info(t))
                .collect()
        } else {
            filter.tasks.iter().filter_map(|id| self.tasks.get(id)).map(|t| self.task_info(t)).collect()
        };
        let c = self.conns.get_mut(&conn).ok_or_else(|| ErrorInfo::new(ErrorCode::Internal, "connection gone"))?;
        c.watch = Some(super::Watch { session, tasks: filter.tasks.into_iter().collect() });
        for info in infos {
            c.handle.mailbox.put_update(info);
        }
        Ok(Answer::Now(Response::Ok))
    }

    /// Persists a task's record; `after` runs once it is durable.
    pub(super) fn save_task(&mut self, task: TaskId, after: Vec<After>) {
        let ops = self.tasks.get(&task).map(|t| vec![Op::UpdateTask(Box::new(t.rec.clone()))]).unwrap_or_default();
        self.commit(ops, after);
    }
}

/// About how many bytes a task takes in a frame (an upper estimate: every string it
/// carries, plus room for its numbers).
fn task_cost(t: &dlsession_proto::TaskInfo) -> usize {
    use dlsession_proto::WaitReason as W;
    let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let wait = match &t.wait {
        Some(W::HostLimit { host, .. }) => host.len(),
        Some(
            W::Backoff { last_error: e, .. } | W::DestinationUnavailable { error: e, .. } | W::StorageFull { error: e },
        ) => e.message.len(),
        _ => 0,
    };
    let error = t.error.as_ref().map_or(0, |e| e.message.len());
    160 + t.session.len() + t.url.len() + len(&t.description) + len(&t.location) + error + wait
}

/// About how many bytes a session takes in a frame (an upper estimate).
fn session_cost(info: &SessionInfo) -> usize {
    let c = &info.config;
    let launch = match &c.launch {
        Some(dlsession_proto::LaunchSpec::Command { argv }) => argv.iter().map(|a| a.len() + 4).sum(),
        Some(dlsession_proto::LaunchSpec::SystemdUnit { unit }) => unit.len(),
        None => 0,
    };
    let headers: usize = c.http_headers.iter().map(|h| h.name.len() + h.value.len() + 8).sum();
    let error = info.wake.last_error.as_ref().map_or(0, |e| e.message.len());
    256 + info.identifier.len() + c.app_id.as_ref().map_or(0, String::len) + launch + headers + error
}

/// A short name for logs (requests can be large, and carry header values).
fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Status => "status",
        Request::Attach { .. } => "attach",
        Request::Detach { .. } => "detach",
        Request::OpenSession { .. } => "open_session",
        Request::GetSession { .. } => "get_session",
        Request::ListSessions => "list_sessions",
        Request::CreateTasks { .. } => "create_tasks",
        Request::CreateTaskFromResumeData { .. } => "create_task_from_resume_data",
        Request::ControlTask { .. } => "control_task",
        Request::GetTask { .. } => "get_task",
        Request::ListTasks(_) => "list_tasks",
        Request::AckEvents { .. } => "ack_events",
        Request::FinishTasksAndInvalidate { .. } => "finish_tasks_and_invalidate",
        Request::InvalidateAndCancel { .. } => "invalidate_and_cancel",
        Request::Wake { .. } => "wake",
        Request::Watch(_) => "watch",
        Request::Unwatch => "unwatch",
        Request::AcknowledgeTasks { .. } => "acknowledge_tasks",
        Request::ListSessionsPage(_) => "list_sessions_page",
        Request::HandleWakes => "handle_wakes",
    }
}

pub(super) fn cancelled() -> ErrorInfo {
    ErrorInfo::new(ErrorCode::Cancelled, "cancelled")
}

pub(super) fn new_session(rec: SessionRecord) -> Session {
    let limiter = rec.config.bandwidth_limit.map(|r| Arc::new(RateLimiter::new(r)));
    Session {
        rec,
        attached: None,
        replaying: false,
        delivered: 0,
        committed: 0,
        events: Default::default(),
        pending_by_task: Default::default(),
        tasks: Default::default(),
        counts: TaskCounts::default(),
        running: 0,
        wake: WakeStatus::default(),
        wake_timer: None,
        wake_unanswered: None,
        limiter,
    }
}

fn set_config(s: &mut Session, config: SessionConfig) {
    if s.rec.config.bandwidth_limit != config.bandwidth_limit {
        s.limiter = config.bandwidth_limit.map(|r| Arc::new(RateLimiter::new(r)));
    }
    s.rec.config = config;
}

/// The scheduling key of a URL: host and port.
pub(super) fn host_key(url: &url::Url) -> String {
    format!("{}:{}", url.host_str().unwrap_or(""), url.port_or_known_default().unwrap_or(0))
}

fn new_record(id: TaskId, session: SessionKey, spec: TaskSpec, now: u64, file_mode: u32) -> TaskRecord {
    TaskRecord {
        id,
        session,
        file_mode,
        url: spec.url,
        headers: spec.headers,
        description: spec.description,
        priority: spec.priority,
        earliest_begin: spec.earliest_begin,
        expected_sha256: spec.expected_sha256,
        destination: spec.destination,
        overwrite: spec.overwrite,
        expected_size: spec.expected_size,
        created_at: now,
        state: TaskState::Suspended,
        phase: Phase::Transfer,
        committed_offset: 0,
        bytes_expected: spec.expected_size,
        etag: None,
        last_modified: None,
        final_url: None,
        response_status: None,
        response_headers: Vec::new(),
        attempts: 0,
        last_error: None,
        retry_at: None,
        started_at: None,
        finished_at: None,
        resource_deadline: None,
        location: None,
        error: None,
        resume_secret: None,
        retired: false,
    }
}

#[allow(dead_code)]
fn _assert_paths(_: PathBuf) {}
