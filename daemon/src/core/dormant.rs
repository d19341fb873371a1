//! Dormant tasks: suspended tasks stay in the database after a start, counted per session
//! but not read, until a request touches their session (or names one of them). Reading
//! 100,000 suspended tasks at start kept the first answer waiting for 400 ms; an app that
//! comes back needs its own session's tasks only.
//!
//! A request that needs dormant tasks waits while the database thread reads them (see
//! [`Core::dormant_wanted`] for which requests do); its connection's later requests wait
//! behind it, so each connection's requests still act in the order sent. The same queue
//! holds requests that may change something until the start's database check passed. A session's rows
//! are taken only while it is still dormant: once loaded, a task lives in memory only, and
//! the daemon writes a dormant row only after loading it, so the rows read are current.
//!
//! Invariant: a session's `counts` and the daemon's include its dormant tasks (as
//! suspended), `Session::dormant` and `Tasks::dormant` say how many are still on disk.

use std::collections::{BTreeSet, HashSet};

use tracing::{debug, error};

use super::Core;
use super::held::{CHECK, HeldRequest};
use super::life::shutting_down;
use super::requests::DiskCheck;
use crate::conn::ConnId;
use crate::model::SessionKey;
use crate::store::{Dormant, Woken};
use dlsession_proto::{ErrorCode, ErrorInfo, LimitTarget, Request, TaskId, TaskState};

/// Before the start's database check passed, only requests that change nothing on disk or
/// elsewhere run: reads, and attaching or detaching (an app coming back gets its events at
/// once; what attaching commits waits for the check like every write).
fn may_run_before_the_check(request: &Request) -> bool {
    matches!(request, Request::Attach { .. } | Request::Detach { .. }) || super::requests::reads_only(request)
}

impl Core {
    /// A request from a client: handled now, or held until the dormant tasks it may touch
    /// are read.
    pub(super) fn admit_request(&mut self, conn: ConnId, id: u64, request: Request) {
        if self.held.holds(conn) {
            // Nothing that is held would be answered once the core stops.
            if self.life.shutting_down {
                return self.reply(conn, id, Err(shutting_down()));
            }
            self.held.push_back(conn, HeldRequest { id, request, ticket: None });
            return;
        }
        match self.hold_for(&request) {
            // Nothing that is held would be answered once the core stops.
            Some(_) if self.life.shutting_down => self.reply(conn, id, Err(shutting_down())),
            Some(ticket) => {
                self.held.push_back(conn, HeldRequest { id, request, ticket: Some(ticket) });
            }
            None => {
                self.handle_request(conn, id, request, DiskCheck::Pending);
            }
        }
    }

    /// What `request` must wait for, if anything: the start's database check (a request
    /// that may change something, but attaching and detaching), or a read of dormant tasks
    /// (started here). Returns the ticket to wait for.
    fn hold_for(&mut self, request: &Request) -> Option<u64> {
        if !self.life.checked && !may_run_before_the_check(request) {
            return Some(CHECK);
        }
        let which = self.dormant_wanted(request)?;
        Some(self.read_dormant(which))
    }

    /// The database passed its start check: the requests that waited for it go on.
    pub(super) fn release_checked(&mut self) {
        for conn in self.held.waiting_for(CHECK) {
            self.release_held(conn);
        }
    }

    /// Which dormant tasks `request` may touch, if any are still on disk. Every request is
    /// named: a new one must be placed.
    fn dormant_wanted(&self, request: &Request) -> Option<Dormant> {
        if self.tasks.dormant() == 0 {
            return None;
        }
        let session = |identifier: &str| {
            let key = self.sessions.key_of(identifier).ok()?;
            (self.sessions.get(&key)?.dormant > 0).then(|| Dormant::Sessions(vec![key]))
        };
        // Each id once (a frame may repeat one a million times: a query each on the database
        // thread, which every commit waits behind).
        let tasks = |ids: &[TaskId]| {
            let unknown: BTreeSet<TaskId> =
                ids.iter().copied().filter(|id| *id < self.tasks.next_id() && self.tasks.get(id).is_none()).collect();
            (!unknown.is_empty()).then(|| Dormant::OfTasks(unknown.into_iter().collect()))
        };
        // A batch the request refuses anyway (past `max_tasks_per_batch`, counted as
        // `ResumeTasks` counts it) reads nothing first.
        let batch = |ids: &[TaskId]| {
            if ids.len() > self.cfg.limits.max_tasks_per_batch as usize { None } else { tasks(ids) }
        };
        match request {
            // Counts include dormant tasks; new tasks and events touch no old task.
            Request::Status
            | Request::Detach { .. }
            | Request::GetSession { .. }
            | Request::ListSessions
            | Request::ListSessionsPage(_)
            | Request::HandleWakes
            | Request::GetConditions
            | Request::Unwatch
            | Request::AckEvents { .. }
            | Request::ReplayEvents { .. }
            | Request::Wake { .. }
            | Request::CreateTasks { .. }
            | Request::CreateUploads { .. }
            | Request::CreateTaskFromResumeData { .. }
            | Request::Once { .. }
            | Request::GetSessionClientCert { .. }
            | Request::GetSessionPolicy { .. }
            | Request::GetSessionProxy { .. }
            | Request::GetSessionCookies { .. } => None,
            // Session settings that no suspended task holds anything of (each is read when a
            // task starts), and an invalidation that counts them: reading a million dormant
            // tasks would hold every commit for seconds and keep them in memory for good.
            Request::FinishTasksAndInvalidate { .. }
            | Request::SetSessionPolicy { .. }
            | Request::SetSessionCookies { .. }
            | Request::SetSessionProxy { .. }
            | Request::SetSessionClientCert { .. } => None,
            // The app (or a change to its session's tasks) touches the session's tasks.
            Request::Attach { identifier, .. }
            | Request::OpenSession { identifier, .. }
            | Request::InvalidateAndCancel { identifier }
            // Drops what its tasks hold for answering challenges.
            | Request::SetSessionChallenges { identifier, .. }
            // Counts the credentials its tasks keep.
            | Request::GetSessionChallenges { identifier } => session(identifier),
            Request::ControlTask { task, .. }
            | Request::GetTask { task }
            | Request::GetTaskPolicy { task }
            | Request::AnswerChallenge { task, .. }
            | Request::SetBandwidthLimit { target: LimitTarget::Task { task }, .. } => tasks(&[*task]),
            Request::SetBandwidthLimit { .. } => None,
            // (`SetTaskPolicy` counts a task named twice once: its limit is checked after.)
            Request::AcknowledgeTasks { tasks: ids } | Request::SetTaskPolicy { tasks: ids, .. } => tasks(ids),
            Request::ResumeTasks { tasks: ids } => batch(ids),
            Request::GetBandwidthLimits => Some(Dormant::All),
            Request::ListTasks(query) => {
                if !query.states.is_empty() && !query.states.contains(&TaskState::Suspended) {
                    None
                } else {
                    match &query.session {
                        Some(identifier) => session(identifier),
                        None => Some(Dormant::All),
                    }
                }
            }
            Request::Watch(filter) => match (&filter.session, filter.tasks.is_empty()) {
                (_, false) => tasks(&filter.tasks),
                (Some(identifier), true) => session(identifier),
                (None, true) => Some(Dormant::All),
            },
        }
    }

    /// Asks the database thread for dormant tasks; returns the ticket its answer carries.
    fn read_dormant(&mut self, which: Dormant) -> u64 {
        let ticket = self.held.ticket();
        debug!(ticket, ?which, "reading dormant tasks");
        let tx = self.tx.clone();
        self.store.load_dormant(which, move |result| {
            let _ = tx.send(super::CoreMsg::Woken { ticket, result: result.map_err(|e| e.to_string()) });
        });
        ticket
    }

    /// Dormant tasks were read: they join the live ones, and the requests that waited go on.
    pub(super) fn on_woken(&mut self, ticket: u64, result: Result<Woken, String>) {
        let failed = match result {
            Ok(woken) => {
                self.take_dormant(woken);
                None
            }
            Err(e) => {
                error!(error = %e, "cannot read suspended tasks from the database");
                Some(ErrorInfo::new(
                    ErrorCode::Internal,
                    format!("cannot read suspended tasks from the database ({e}); try again"),
                ))
            }
        };
        for conn in self.held.waiting_for(ticket) {
            // The request whose read this was goes on with what was found (a task that
            // was not dormant after all gets its ordinary answer).
            if let Some(first) = self.held.pop_front(conn) {
                match &failed {
                    Some(e) => self.reply(conn, first.id, Err(e.clone())),
                    None => {
                        self.handle_request(conn, first.id, first.request, DiskCheck::Pending);
                    }
                }
            }
            self.release_held(conn);
        }
    }

    /// Handles a connection's held requests in order until one must wait again (for a
    /// read, or in its disk phase).
    pub(super) fn release_held(&mut self, conn: ConnId) {
        while !self.held.on_disk(conn)
            && let Some(next) = self.held.pop_front(conn)
        {
            if let Some(ticket) = self.hold_for(&next.request) {
                self.held.push_front(conn, HeldRequest { ticket: Some(ticket), ..next });
                return;
            }
            self.handle_request(conn, next.id, next.request, DiskCheck::Pending);
        }
    }

    /// Inserts the tasks read, for the sessions still dormant (a session read meanwhile
    /// by another request holds newer state in memory).
    fn take_dormant(&mut self, woken: Woken) {
        let keys: Vec<SessionKey> = match woken.sessions {
            Some(keys) => keys,
            None => self.sessions.keys().collect(),
        };
        let mut taking = HashSet::new();
        for key in keys {
            let Some(s) = self.sessions.get_mut(&key) else { continue };
            if s.dormant == 0 {
                continue;
            }
            s.counts.suspended = s.counts.suspended.saturating_sub(s.dormant);
            self.tasks.take_dormant(s.dormant);
            s.dormant = 0;
            taking.insert(key);
        }
        let mut n = 0usize;
        for rec in woken.tasks {
            // Not in memory, and not a task that left it since (retired, its row maybe not
            // yet written): only a row that was dormant all along.
            let left = self.sessions.get(&rec.session).is_some_and(|s| s.left.contains(&rec.id));
            if taking.contains(&rec.session) && self.tasks.get(&rec.id).is_none() && !left {
                self.restore_task(rec);
                n += 1;
            }
        }
        for key in &taking {
            if let Some(s) = self.sessions.get_mut(key) {
                s.left = HashSet::new();
            }
        }
        debug!(sessions = taking.len(), tasks = n, left = self.tasks.dormant(), "dormant tasks read");
    }

    /// The daemon is stopping: held requests get its refusal.
    pub(super) fn refuse_held(&mut self) {
        for (conn, held) in self.held.take_all() {
            self.reply(conn, held.id, Err(shutting_down()));
        }
    }

    /// The shutdown's grace is over: requests still in their disk phase are refused (what
    /// their checks find is never looked at).
    pub(super) fn give_up_disk_phases(&mut self) {
        for (conn, id) in self.held.give_up_disk() {
            self.reply(conn, id, Err(shutting_down()));
        }
    }

    /// A connection closed: its held requests go with it.
    pub(super) fn forget_held(&mut self, conn: ConnId) {
        self.held.forget(conn);
    }
}
