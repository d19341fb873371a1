//! Rebuilding state at start: sessions, tasks, undelivered events; finishing what a crash
//! interrupted; removing files nothing refers to.

use std::collections::{HashMap, HashSet};

use tracing::info;

use super::disk::Garbage;
use super::sched::host_key;
use super::timers::millis;
use super::{After, Core, Timer};
use crate::engine::files::Leftovers;
use crate::model::{Phase, now_ms};
use crate::store::{Op, Snapshot, StoreError};
use dlsession_proto::{DurableEvent, TaskId, TaskState};

impl Core {
    pub(super) fn restore(&mut self, snapshot: Snapshot) {
        self.sessions.keys_from(snapshot.next_session_key);
        for rec in snapshot.sessions {
            self.sessions.restore(rec);
        }
        self.restore_cookies(snapshot.cookie_jars);
        self.restore_auth(snapshot.session_challenges, snapshot.credentials);
        self.restore_client_certs(snapshot.client_certs);
        for c in snapshot.creations {
            self.creations.add(c);
        }
        for (key, proxy) in snapshot.session_proxies {
            if let Some(s) = self.sessions.get_mut(&key) {
                s.proxy = Some(proxy);
            }
        }
        for ev in snapshot.events {
            if let Some(s) = self.sessions.get_mut(&ev.session) {
                s.committed = s.committed.max(ev.seq);
                s.push_event(ev);
            }
        }
        // Suspended tasks stay on disk, counted, until something touches their session.
        for (key, n) in snapshot.dormant {
            if let Some(s) = self.sessions.get_mut(&key) {
                s.dormant = n;
                s.counts.suspended += n;
                self.tasks.add_dormant(n);
            }
        }
        let mut finishing = Vec::new();
        // A retry is never further away than the longest wait the daemon itself sets (the
        // wall clock may have been set back while it was stopped).
        let longest = self.cfg.timing.retry_max.max(self.cfg.timing.retry_after_max);
        let mut cancel = Vec::new();
        for rec in snapshot.tasks {
            let (id, state, phase, retry_at) = (rec.id, rec.state, rec.phase, rec.retry_at);
            let challenged = rec.challenge.is_some();
            let cancelling = self.sessions.get(&rec.session).is_some_and(|s| s.rec.cancelling && !s.rec.invalid);
            // A marked file's move is recorded only with its completion: it may be in place.
            let maybe_moved = super::finish::marked_in_place(&rec) && rec.upload.is_none() && !challenged;
            self.restore_task(rec);
            match state {
                // `invalidate_and_cancel` was answered while it was stopping: cancelled, not
                // run again. One that may have moved its file into place just before the
                // stop waits, in no lane, for the start's look (`look_in_place_at_start`):
                // found, it completes as it would have; not found, it is cancelled
                // (`on_not_in_place`). A task finishing its file finishes.
                TaskState::Queued | TaskState::Running | TaskState::Waiting | TaskState::Suspended
                    if cancelling && phase == Phase::Transfer =>
                {
                    if maybe_moved && state != TaskState::Suspended {
                        if let Some(t) = self.tasks.get_mut(&id) {
                            t.off_lanes = Some(super::task::OffLanes::Cancelling);
                        }
                    } else {
                        cancel.push(id)
                    }
                }
                // Cut short between "data complete" and "finished committed": the move is
                // finished (or found done, or found lost) by a worker, like any other.
                // Before this process moved anything, copies named by its pid are leftovers too.
                TaskState::Queued | TaskState::Running if phase == Phase::Finishing => {
                    finishing.push((id, Leftovers::Any))
                }
                TaskState::Queued | TaskState::Running => self.enqueue(id),
                // Waits for its app's answer, until its resource deadline.
                TaskState::Waiting if challenged => self.arm_challenge_deadline(id),
                TaskState::Waiting => {
                    let wait = retry_at.map_or(0, |at| at.saturating_sub(now_ms())).min(millis(longest));
                    let at = self.timers.after(std::time::Duration::from_millis(wait));
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.timer = Some(at);
                    }
                    self.set_timer(at, Timer::Retry(id));
                }
                TaskState::Suspended | TaskState::Completed => {}
            }
        }
        self.cancel_at_start(cancel);
        info!(
            sessions = self.sessions.len(),
            tasks = self.tasks.len(),
            dormant = self.tasks.dormant(),
            "state restored"
        );
        // Nothing is moved, deleted, downloaded or launched before the database passed
        // its check: this read runs only after it, so its answer says it passed.
        self.life.start = Some(super::start::StartWork { finishing, garbage: self.garbage(), new_apps: Vec::new() });
        let tx = self.tx.clone();
        self.store.dormant_ids(move |ids| {
            let _ = tx.send(super::CoreMsg::Checked(ids));
        });
    }

    /// Completes `cancelled` the tasks an `invalidate_and_cancel` answered before the
    /// daemon stopped had not ended yet (committed once the start's check passed, like
    /// every write).
    pub(super) fn cancel_at_start(&mut self, ids: Vec<TaskId>) {
        if ids.is_empty() {
            return;
        }
        info!(tasks = ids.len(), "cancelling what invalidate_and_cancel left running before the stop");
        let by = "invalidate_and_cancel (the daemon stopped before the task had)";
        let (mut ops, mut after) = (Vec::new(), Vec::new());
        for id in ids {
            // A request that must not go twice and may have reached its server says so
            // (`network`), rather than `cancelled`, which would say it did not happen.
            if self.upload_interrupted(id) {
                continue;
            }
            self.complete(id, Some(super::transitions::cancelled(by)), &mut ops, &mut after);
        }
        self.commit(ops, after);
    }

    /// Adds a task read from the database (at start, or dormant until now).
    pub(super) fn restore_task(&mut self, rec: crate::model::TaskRecord) {
        let host = url::Url::parse(&rec.url).map(|u| host_key(&u)).unwrap_or_default();
        if let Some(c) = &rec.challenge {
            // Its rounds go on where they were (and its replayed event still matches).
            self.seed_auth_rounds(rec.id, c.round);
        }
        let unfinished = rec.state != TaskState::Completed && rec.upload.is_none();
        let id = rec.id;
        self.insert_task(rec, host);
        if let Some(t) = self.tasks.get_mut(&id) {
            t.restored = unfinished;
        }
    }

    /// The database passed its check (`ids`: every dormant task, for the sweep): the
    /// start's work may begin.
    pub(super) fn on_checked(&mut self, ids: Result<Vec<(TaskId, crate::model::SessionKey)>, StoreError>) {
        // A daemon that is stopping (a failed check stops it) starts nothing.
        if self.life.shutting_down {
            return;
        }
        if let Err(StoreError::Closed) = ids {
            let e = "the database thread stopped before the start's check answered; refusing to go on".to_owned();
            tracing::error!("{e}");
            self.life.fatal = Some(e);
            self.begin_shutdown();
            return;
        }
        self.life.checked = true;
        self.life.checked_at = Some(std::time::Instant::now());
        let Some(start) = self.life.start.take() else { return };
        for (id, leftovers) in start.finishing {
            self.start_move(id, leftovers);
        }
        match ids {
            Ok(ids) => {
                let mut garbage = start.garbage;
                garbage.unfinished.extend(ids);
                self.disk.collect_garbage(garbage);
            }
            // Nothing is swept rather than something live.
            Err(e) => tracing::error!(error = %e, "cannot list suspended tasks; the cache is not swept this time"),
        }
        self.clean_resume_dir();
        self.look_in_place_at_start();
        // The first wake after a start waits `wake_initial`: the app may come back by
        // itself, and a daemon restarting in a loop must not relaunch it every time (the
        // wake backoff lives in memory).
        let keys: Vec<_> = self.sessions.keys().collect();
        for key in keys {
            if let Some(s) = self.sessions.get_mut(&key) {
                s.waited_at_start = !s.events.is_empty();
            }
            self.check_wake(key, self.cfg.timing.wake_initial);
        }
        for (conn, app_id) in start.new_apps {
            self.wake_for_new_app(&app_id, conn);
        }
        self.schedule();
        self.release_checked();
    }

    /// The file is in place: commit `finished_downloading` and `completed`.
    pub(super) fn mark_finished(&mut self, id: TaskId, location: String) {
        let now = now_ms();
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.rec.phase = Phase::Transfer;
        t.rec.location = Some(location.clone());
        t.rec.finished_at = Some(now);
        t.rec.last_error = None;
        t.rec.retry_at = None;
        let key = t.rec.session;
        self.set_state(id, TaskState::Completed);
        let mut ops = Vec::new();
        self.forget_task_auth(id, key, &mut ops);
        self.emit(key, DurableEvent::FinishedDownloading { task: id, location }, &mut ops);
        let seq = self.emit(key, DurableEvent::Completed { task: id, error: None }, &mut ops);
        if let Some(t) = self.tasks.get(&id) {
            ops.push(Op::UpdateTask(Box::new(t.rec.clone())));
        }
        let mut after = vec![After::Events { session: key, seq }];
        self.check_invalidation(key, &mut ops, &mut after);
        self.commit(ops, after);
    }

    /// What the sweep of the cache directory keeps, as of the start (dormant tasks are
    /// added when they are listed): files that no live task refers to are removed.
    fn garbage(&self) -> Garbage {
        // The collection runs while tasks go on: an unfinished task may write its partial
        // file or finish into the cache at any moment, so both its names are kept. Only a
        // completed task is settled: just its delivered file stays.
        let (mut unfinished, mut locations) = (HashMap::new(), HashSet::new());
        for t in self.tasks.values() {
            if t.state != TaskState::Completed {
                unfinished.insert(t.rec.id, t.rec.session);
            }
            if let Some(location) = &t.rec.location {
                locations.insert(super::disk::cache_tail(std::path::Path::new(location)));
            }
        }
        // A file an unacknowledged event names stays, though its task may be retired (an
        // app that acknowledged `completed` first).
        for s in self.sessions.values() {
            for ev in s.events.values() {
                if let DurableEvent::FinishedDownloading { location, .. }
                | DurableEvent::UploadResponse { body: location, .. } = &ev.event
                {
                    locations.insert(super::disk::cache_tail(std::path::Path::new(location)));
                }
            }
        }
        Garbage {
            downloads: self.cfg.downloads_dir(),
            sessions: self.sessions.keys().collect(),
            first_new_session: self.sessions.next_key(),
            unfinished,
            locations,
            first_new_id: self.tasks.next_id(),
        }
    }
}
