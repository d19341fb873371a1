//! Durable events, acknowledgements, invalidation, wake and relaunch, progress fan-out.

use std::time::Duration;

use tracing::{info, warn};

use super::{After, ConnId, Core, Timer};
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
        s.events.insert(seq, rec.clone());
        ops.push(Op::InsertEvent(rec));
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
            let timer = self.sessions.get_mut(&key).and_then(|s| {
                let t = s.wake.next_wake;
                s.wake = WakeStatus::default();
                t
            });
            self.clear_timer(timer, Timer::Wake(key));
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
            || s.rec.config.app_id.as_ref().is_some_and(|a| self.app_connections(a).next().is_some())
    }

    fn app_connections<'a>(&'a self, app_id: &'a str) -> impl Iterator<Item = ConnId> + 'a {
        self.conns.values().filter(move |c| c.handle.app_id.as_deref() == Some(app_id)).map(|c| c.handle.id)
    }

    /// Schedules a wake `delay` from now if the session has finished events and none is due.
    pub(super) fn check_wake(&mut self, key: SessionKey, delay: Duration) {
        if !self.has_finished_events(key) {
            let timer = self.sessions.get_mut(&key).and_then(|s| s.wake.next_wake.take());
            self.clear_timer(timer, Timer::Wake(key));
            return;
        }
        if !self.can_wake(key) || self.sessions.get(&key).is_none_or(|s| s.wake.next_wake.is_some()) {
            return;
        }
        let at = now_ms() + delay.as_millis() as u64;
        if let Some(s) = self.sessions.get_mut(&key) {
            s.wake.next_wake = Some(at);
        }
        self.set_timer(at, Timer::Wake(key));
    }

    pub(super) fn on_wake_timer(&mut self, key: SessionKey) {
        if let Some(s) = self.sessions.get_mut(&key) {
            s.wake.next_wake = None;
        }
        if self.has_finished_events(key)
            && let Err(e) = self.wake_now(key, WakeReason::FinishedEvents)
        {
            warn!(session = %self.identifier(key), error = %e, "wake failed");
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
            Some(app) => self.app_connections(app).collect(),
            None => Vec::new(),
        };
        let launch = s.rec.config.launch.clone();
        let outcome = if !targets.is_empty() {
            for conn in &targets {
                if let Some(c) = self.conns.get(conn) {
                    c.handle.event(Event::Wake { identifier: identifier.clone(), reason });
                }
            }
            Ok(WakeOutcome::Woken { connections: targets.len() as u32 })
        } else if let Some(spec) = launch {
            let tx = self.tx.clone();
            let ctx = launcher::Context {
                identifier: &identifier,
                socket: &self.cfg.socket,
                log_dir: &self.cfg.launch_log_dir(),
                reason: reason.as_str(),
            };
            let launched = launcher::launch(&spec, &ctx, move |result| {
                let _ = tx.send(super::CoreMsg::LaunchFinished { session: key, result });
            });
            if launched.is_ok() {
                self.launches_running += 1;
            }
            launched
                .map(|l| match l {
                    launcher::Launched::Process(pid) => WakeOutcome::Launched { pid },
                    launcher::Launched::Unit(unit) => WakeOutcome::UnitStarted { unit },
                })
                .map_err(|e| ErrorInfo::new(ErrorCode::Internal, format!("cannot relaunch the app: {e}")))
        } else {
            Ok(WakeOutcome::NoTarget)
        };
        let now = now_ms();
        let initial = self.cfg.timing.wake_initial.as_millis() as u64;
        let max = self.cfg.timing.wake_max.as_millis() as u64;
        let woke = outcome.is_ok() && outcome != Ok(WakeOutcome::NoTarget);
        let failed = outcome.is_err();
        let again = (woke || failed) && self.has_finished_events(key);
        let Some(s) = self.sessions.get_mut(&key) else { return outcome };
        if woke || failed {
            s.wake.attempts += 1;
            s.wake.last_wake = Some(now);
        }
        s.wake.last_error = outcome.as_ref().err().cloned();
        info!(session = %identifier, ?outcome, attempt = s.wake.attempts, "wake");
        // Backoff: initial, doubling, capped; repeated until the events are acknowledged.
        if again {
            let delay = initial.saturating_mul(1u64 << s.wake.attempts.saturating_sub(1).min(30)).min(max);
            let at = now + delay;
            let old = s.wake.next_wake.replace(at);
            self.clear_timer(old, Timer::Wake(key));
            self.set_timer(at, Timer::Wake(key));
        }
        outcome
    }

    /// A process announced `app_id`: wake its sessions that wait for it.
    pub(super) fn wake_for_new_app(&mut self, app_id: &str) {
        let keys: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.rec.config.app_id.as_deref() == Some(app_id))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if self.has_finished_events(key) {
                let timer = self.sessions.get_mut(&key).and_then(|s| s.wake.next_wake.take());
                self.clear_timer(timer, Timer::Wake(key));
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
