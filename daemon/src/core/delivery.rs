//! Durable events, acknowledgements, invalidation, wake and relaunch, progress fan-out.

use std::time::Duration;

use tracing::{info, warn};

use super::backoff::Backoff;
use super::timers::{Timer, wall_after};
use super::{After, ConnId, Core};
use crate::launcher;
use crate::model::{EventRecord, SessionKey, now_ms};
use crate::store::Op;
use dlsession_proto::{
    DetachReason, DurableEvent, ErrorCode, ErrorInfo, Event, Response, TaskId, TaskState, WakeOutcome, WakeReason,
    WakeStatus,
};

impl Core {
    /// Appends a durable event (committed with `ops`) and returns its sequence number.
    pub(super) fn emit(&mut self, key: SessionKey, event: DurableEvent, ops: &mut Vec<Op>) -> u64 {
        let Some(s) = self.sessions.get_mut(&key) else { return 0 };
        let seq = s.rec.next_seq;
        s.rec.next_seq += 1;
        let rec = EventRecord { session: key, seq, event, created_at: now_ms() };
        if let Some(task) = rec.task() {
            *s.pending_by_task.entry(task).or_default() += 1;
        }
        s.events.insert(seq, rec.clone());
        ops.push(Op::InsertEvent(rec));
        self.ensure_housekeeping();
        seq
    }

    pub(super) fn on_events_committed(&mut self, key: SessionKey, seq: u64) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        s.committed = s.committed.max(seq);
        self.deliver(key);
        self.check_wake(key, Duration::ZERO);
    }

    /// Sends the attached connection every committed event it has not had yet.
    fn deliver(&mut self, key: SessionKey) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        let (Some(conn), false) = (s.attached, s.replaying) else { return };
        let Some(c) = self.conns.get(&conn) else { return };
        let from = s.delivered.saturating_add(1);
        if from > s.committed {
            return;
        }
        for (seq, ev) in s.events.range(from..=s.committed) {
            // Progress that is still coalescing goes out before the task's events, except
            // before a resume: what follows it is the progress of the attempt it announces.
            if let Some(task) = ev.task()
                && !matches!(ev.event, DurableEvent::ResumedAtOffset { .. })
                && let Some(p) = c.handle.mailbox.take_progress(task)
            {
                c.handle.send(p);
            }
            c.handle.event(Event::Durable { identifier: s.rec.identifier.clone(), seq: *seq, event: ev.event.clone() });
        }
        s.delivered = s.committed;
    }

    /// Completes an attach once its changes are durable: reply, replay, `finished_events`.
    pub(super) fn replay(&mut self, conn: ConnId, id: u64, key: SessionKey) {
        let info = self.session_info(key);
        self.reply(conn, id, info.map(Response::Session));
        let Some(s) = self.sessions.get_mut(&key) else { return };
        if s.attached != Some(conn) {
            return;
        }
        s.replaying = false;
        s.delivered = 0;
        let identifier = s.rec.identifier.clone();
        self.deliver(key);
        if let Some(c) = self.conns.get(&conn) {
            c.handle.event(Event::FinishedEvents { identifier });
        }
    }

    /// Acknowledges events and replies `Ok` to (`conn`, `id`) once that is durable.
    pub(super) fn acknowledge(&mut self, conn: ConnId, id: u64, key: SessionKey, seqs: Vec<u64>) {
        let (ops, mut after) = self.ack_ops(key, seqs);
        after.push(After::Reply { conn, id, response: Response::Ok });
        self.commit(ops, after);
    }

    pub(super) fn acknowledge_quietly(&mut self, key: SessionKey, seqs: Vec<u64>) {
        let (ops, after) = self.ack_ops(key, seqs);
        self.commit(ops, after);
    }

    fn ack_ops(&mut self, key: SessionKey, seqs: Vec<u64>) -> (Vec<Op>, Vec<After>) {
        let mut ops = Vec::new();
        let mut after = Vec::new();
        let downloads = self.cfg.downloads_dir();
        let Some(s) = self.sessions.get_mut(&key) else { return (ops, after) };
        let mut acked = Vec::new();
        let mut files = Vec::new();
        let mut retire = Vec::new();
        for seq in seqs {
            // Unknown seqs were acknowledged before. An event whose insert is still queued
            // may be acknowledged too: the store applies the delete after the insert.
            let Some(ev) = s.events.remove(&seq) else { continue };
            if let Some(task) = ev.task()
                && let Some(n) = s.pending_by_task.get_mut(&task)
            {
                *n -= 1;
                if *n == 0 {
                    s.pending_by_task.remove(&task);
                }
            }
            acked.push(seq);
            match ev.event {
                DurableEvent::FinishedDownloading { location, .. } => {
                    // Whatever the app left in our cache goes; a destination is the app's.
                    let path = std::path::PathBuf::from(location);
                    if path.starts_with(&downloads) {
                        files.push(path);
                    }
                }
                DurableEvent::Completed { task, .. } => retire.push(task),
                DurableEvent::ResumedAtOffset { .. } | DurableEvent::DidBecomeInvalid { .. } => {}
            }
        }
        if acked.is_empty() {
            return (ops, after);
        }
        ops.push(Op::DeleteEvents { session: key, seqs: acked });
        let all_acked = s.events.is_empty();
        let invalid = s.rec.invalid;
        if !retire.is_empty() {
            ops.push(Op::RetireTasks(retire.clone()));
            self.prune_history(&mut ops);
            for task in retire {
                if self.tasks.get(&task).is_some_and(|t| t.state == TaskState::Completed) {
                    self.tasks.remove(&task);
                    self.counts.remove(TaskState::Completed);
                    if let Some(s) = self.sessions.get_mut(&key) {
                        s.tasks.remove(&task);
                        s.counts.remove(TaskState::Completed);
                    }
                }
            }
        }
        after.push(After::RemoveFiles(files));
        if all_acked {
            // Everything collected: the app works; the next wake starts a fresh backoff.
            self.cancel_wakes(key);
            if let Some(s) = self.sessions.get_mut(&key) {
                s.wake = WakeStatus::default();
            }
        }
        if invalid && all_acked {
            self.delete_session(key, &mut ops, &mut after);
        }
        (ops, after)
    }

    /// Removes an invalidated session whose every event was acknowledged.
    fn delete_session(&mut self, key: SessionKey, ops: &mut Vec<Op>, after: &mut Vec<After>) {
        let Some(s) = self.sessions.remove(&key) else { return };
        self.by_identifier.remove(&s.rec.identifier);
        for task in &s.tasks {
            if let Some(t) = self.tasks.remove(task) {
                self.counts.remove(t.state);
            }
        }
        if let Some(conn) = s.attached
            && let Some(c) = self.conns.get_mut(&conn)
        {
            c.attached.remove(&key);
            c.handle.event(Event::Detached { identifier: s.rec.identifier.clone(), reason: DetachReason::Invalidated });
        }
        ops.push(Op::DeleteSession(key));
        // A later session with this identifier numbers its events after this one's.
        self.seq_floor = self.seq_floor.max(s.rec.next_seq);
        ops.push(Op::SetSeqFloor(self.seq_floor));
        after.push(After::RemoveDir(self.session_dir(key)));
        info!(session = %s.rec.identifier, "session invalidated and removed");
    }

    /// Emits `did_become_invalid` once an invalidating session has no unfinished task.
    pub(super) fn check_invalidation(&mut self, key: SessionKey, ops: &mut Vec<Op>, after: &mut Vec<After>) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        if !s.rec.invalidating || s.rec.invalid || s.counts.total() != s.counts.completed {
            return;
        }
        s.rec.invalid = true;
        let seq = self.emit(key, DurableEvent::DidBecomeInvalid { error: None }, ops);
        if let Some(s) = self.sessions.get(&key) {
            ops.push(Op::UpdateSession(s.rec.clone()));
        }
        after.push(After::Events { session: key, seq });
    }

    /// SPEC §6: undelivered events, nothing active, nobody attached.
    fn has_finished_events(&self, key: SessionKey) -> bool {
        self.sessions.get(&key).is_some_and(|s| {
            s.attached.is_none() && s.events.range(..=s.committed).next().is_some() && s.counts.active() == 0
        })
    }

    fn can_wake(&self, key: SessionKey) -> bool {
        let Some(s) = self.sessions.get(&key) else { return false };
        s.rec.config.launch.is_some()
            || s.rec.config.app_id.as_ref().is_some_and(|a| self.wake_targets(a).next().is_some())
    }

    /// Connections that rejoin a session of `app_id` when told to: those that registered
    /// a wake handler, and protocol-1 clients that announced the app (they cannot say).
    fn wake_targets<'a>(&'a self, app_id: &'a str) -> impl Iterator<Item = ConnId> + 'a {
        self.conns
            .values()
            .filter(move |c| c.handle.app_id.as_deref() == Some(app_id) && (c.handles_wakes || c.handle.protocol == 1))
            .map(|c| c.handle.id)
    }

    /// The wait before the next wake of a session woken `attempts` times without an
    /// acknowledgement: nothing before the first, then `wake_initial` doubling up to
    /// `wake_max`. Attaching does not reset it (an app that crashes on every relaunch is
    /// relaunched less and less often); acknowledging every event does.
    fn wake_backoff(&self, attempts: u32) -> Duration {
        if attempts == 0 {
            return Duration::ZERO;
        }
        Backoff { initial: self.cfg.timing.wake_initial, max: self.cfg.timing.wake_max }.base(attempts)
    }

    /// Schedules a wake if the session has finished events and none is due: at the
    /// backoff, or `at_least` from now if that is later.
    pub(super) fn check_wake(&mut self, key: SessionKey, at_least: Duration) {
        if !self.has_finished_events(key) {
            self.cancel_wakes(key);
            return;
        }
        let Some(s) = self.sessions.get(&key) else { return };
        if s.wake_timer.is_some() || !self.can_wake(key) {
            return;
        }
        let delay = self.wake_backoff(s.wake.attempts).max(at_least);
        let at = self.timers.after(delay);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.wake_timer = Some(at);
            s.wake.next_wake = Some(wall_after(delay));
        }
        self.set_timer(at, Timer::Wake(key));
    }

    /// Forgets the wakes due for a session (it is attached, or has nothing to deliver).
    pub(super) fn cancel_wakes(&mut self, key: SessionKey) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        let (timer, unanswered) = (s.wake_timer.take(), s.wake_unanswered.take());
        s.wake.next_wake = None;
        self.clear_timer(timer, Timer::Wake(key));
        self.clear_timer(unanswered, Timer::WakeUnanswered(key));
    }

    pub(super) fn on_wake_timer(&mut self, key: SessionKey) {
        if let Some(s) = self.sessions.get_mut(&key) {
            s.wake_timer = None;
            s.wake.next_wake = None;
        }
        if self.has_finished_events(key)
            && let Err(e) = self.wake_now(key, WakeReason::FinishedEvents)
        {
            warn!(session = %self.identifier(key), error = %e, "wake failed");
        }
    }

    /// A running app was sent `wake` and has not rejoined the session: relaunch it.
    pub(super) fn on_wake_unanswered(&mut self, key: SessionKey) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        s.wake_unanswered = None;
        if !self.has_finished_events(key) {
            return;
        }
        let answer = self.cfg.timing.wake_answer;
        info!(session = %self.identifier(key), ?answer, "the running app did not rejoin after wake; relaunching it");
        if let Err(e) = self.relaunch(key, WakeReason::FinishedEvents) {
            warn!(session = %self.identifier(key), error = %e, "relaunch failed");
        }
    }

    /// Wakes or relaunches the session's app now and schedules the next try with backoff.
    pub(super) fn wake_now(&mut self, key: SessionKey, reason: WakeReason) -> Result<WakeOutcome, ErrorInfo> {
        let s = self.sessions.get(&key).ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchSession, "no such session"))?;
        if s.attached.is_some() {
            return Ok(WakeOutcome::Attached);
        }
        let identifier = s.rec.identifier.clone();
        let targets: Vec<ConnId> = match &s.rec.config.app_id {
            Some(app) => self.wake_targets(app).collect(),
            None => Vec::new(),
        };
        if targets.is_empty() {
            return self.relaunch(key, reason);
        }
        for conn in &targets {
            if let Some(c) = self.conns.get(conn) {
                c.handle.event(Event::Wake { identifier: identifier.clone(), reason });
            }
        }
        let outcome = WakeOutcome::Woken { connections: u32::try_from(targets.len()).unwrap_or(u32::MAX) };
        // If nobody rejoins in time, the app's running process cannot or will not: relaunch.
        if self.sessions.get(&key).is_some_and(|s| s.rec.config.launch.is_some() && s.wake_unanswered.is_none()) {
            let at = self.timers.after(self.cfg.timing.wake_answer);
            if let Some(s) = self.sessions.get_mut(&key) {
                s.wake_unanswered = Some(at);
            }
            self.set_timer(at, Timer::WakeUnanswered(key));
        }
        self.woke(key, &Ok(outcome.clone()));
        Ok(outcome)
    }

    /// Relaunches the session's app (if it has a launch spec) and schedules the next try.
    fn relaunch(&mut self, key: SessionKey, reason: WakeReason) -> Result<WakeOutcome, ErrorInfo> {
        let s = self.sessions.get(&key).ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchSession, "no such session"))?;
        let Some(spec) = s.rec.config.launch.clone() else {
            return Ok(WakeOutcome::NoTarget);
        };
        let identifier = s.rec.identifier.clone();
        let tx = self.tx.clone();
        let ctx = launcher::Context {
            identifier: &identifier,
            socket: &self.cfg.socket,
            log_dir: &self.cfg.launch_log_dir(),
            reason: reason.as_str(),
            scope: self.launch_scope,
        };
        let launched = launcher::launch(&spec, &ctx, move |result| {
            let _ = tx.send(super::CoreMsg::LaunchFinished { session: key, result });
        });
        if launched.is_ok() {
            self.launches_running += 1;
        }
        let outcome = launched
            .map(|l| match l {
                launcher::Launched::Process(pid) => WakeOutcome::Launched { pid },
                launcher::Launched::Unit(unit) => WakeOutcome::UnitStarted { unit },
            })
            .map_err(|e| ErrorInfo::new(ErrorCode::Internal, format!("cannot relaunch the app: {e}")));
        self.woke(key, &outcome);
        outcome
    }

    /// Records a wake or relaunch (one log line) and schedules the next with backoff.
    fn woke(&mut self, key: SessionKey, outcome: &Result<WakeOutcome, ErrorInfo>) {
        let again = self.has_finished_events(key);
        let Some(s) = self.sessions.get_mut(&key) else { return };
        s.wake.attempts = s.wake.attempts.saturating_add(1);
        s.wake.last_wake = Some(now_ms());
        s.wake.last_error = outcome.as_ref().err().cloned();
        let attempts = s.wake.attempts;
        match outcome {
            Ok(o) => info!(session = %s.rec.identifier, outcome = ?o, attempt = attempts, "wake"),
            Err(e) => warn!(session = %s.rec.identifier, error = %e, attempt = attempts, "wake failed"),
        }
        let old = s.wake_timer.take();
        s.wake.next_wake = None;
        self.clear_timer(old, Timer::Wake(key));
        if again {
            self.check_wake(key, Duration::ZERO);
        }
    }

    /// A process announced `app_id`: wake its sessions that wait for it, if it rejoins.
    pub(super) fn wake_for_new_app(&mut self, app_id: &str, conn: ConnId) {
        if !self.conns.get(&conn).is_some_and(|c| c.handles_wakes || c.handle.protocol == 1) {
            return;
        }
        let keys: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.rec.config.app_id.as_deref() == Some(app_id))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if self.has_finished_events(key) {
                let _ = self.wake_now(key, WakeReason::FinishedEvents);
            }
        }
    }

    pub(super) fn on_launch_finished(&mut self, key: SessionKey, result: Result<(), String>) {
        self.launches_running = self.launches_running.saturating_sub(1);
        if let (Err(e), Some(s)) = (result, self.sessions.get_mut(&key)) {
            warn!(session = %s.rec.identifier, error = %e, "relaunch failed; will retry with backoff");
            s.wake.last_error = Some(ErrorInfo::new(ErrorCode::Internal, format!("relaunch failed: {e}")));
        }
    }

    /// Hands `delta` new bytes of a running task to its session's client and watchers.
    pub(super) fn push_progress(&self, id: TaskId, delta: u64) {
        let Some(t) = self.tasks.get(&id) else { return };
        let Some(s) = self.sessions.get(&t.rec.session) else { return };
        let total = t.progress.received();
        let expected = t.progress.expected();
        let send = |conn: &super::Conn| {
            conn.handle.mailbox.add_progress(&s.rec.identifier, id, delta, total, expected);
        };
        // While an attach replays the events it missed, progress would overtake them (the
        // totals are absolute: the next report after the replay says it all).
        if let Some(c) = s.attached.filter(|_| !s.replaying).and_then(|c| self.conns.get(&c)) {
            send(c);
        }
        for c in self.conns.values() {
            if Some(c.handle.id) != s.attached && self.watches(c, t.rec.session, id) {
                send(c);
            }
        }
    }

    /// Pushes the last bytes of a finishing task, so progress ends at 100 %.
    pub(super) fn flush_progress(&mut self, id: TaskId) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let received = t.progress.received();
        let delta = received.saturating_sub(t.sampled);
        t.sampled = received;
        self.bytes_downloaded += delta;
        self.report_progress(id, delta);
    }

    /// Passes `delta` new bytes on, or keeps them while the attempt's progress is held.
    pub(super) fn report_progress(&mut self, id: TaskId, delta: u64) {
        let Some(run) = self.tasks.get_mut(&id).and_then(|t| t.run.as_mut()) else { return };
        if run.progress_held {
            run.held_bytes += delta;
            return;
        }
        let delta = delta + std::mem::take(&mut run.held_bytes);
        if delta > 0 {
            self.push_progress(id, delta);
        }
    }

    /// Lets attempt `generation`'s progress go out, with what was held meanwhile.
    pub(super) fn release_progress(&mut self, id: TaskId, generation: u64) {
        let Some(run) = self.tasks.get_mut(&id).and_then(|t| t.run.as_mut()) else { return };
        if run.generation == generation {
            run.progress_held = false;
            self.report_progress(id, 0);
        }
    }

    fn watches(&self, c: &super::Conn, key: SessionKey, id: TaskId) -> bool {
        let Some(w) = &c.watch else { return false };
        w.session.is_none_or(|s| s == key) && (w.tasks.is_empty() || w.tasks.contains(&id))
    }

    /// Tells watchers about a task's new state.
    pub(super) fn notify_watchers(&self, id: TaskId) {
        let Some(t) = self.tasks.get(&id) else { return };
        let mut info = None;
        for c in self.conns.values() {
            if self.watches(c, t.rec.session, id) {
                let i = info.get_or_insert_with(|| self.task_info(t));
                c.handle.mailbox.put_update(i.clone());
            }
        }
    }
}
