//! Durable events: appending them, delivering them in order to the attached client,
//! acknowledgements (which retire tasks and free cached files), and invalidation.

use std::time::Duration;

use tracing::info;

use super::{After, ConnId, Core};
use crate::model::{EventRecord, SessionKey, now_ms};
use crate::store::Op;
use dlsession_proto::{DetachReason, DurableEvent, ErrorCode, ErrorInfo, Event, Response, TaskState, WakeStatus};

impl Core {
    /// Appends a durable event (committed with `ops`) and returns its sequence number.
    pub(super) fn emit(&mut self, key: SessionKey, event: DurableEvent, ops: &mut Vec<Op>) -> u64 {
        let Some(s) = self.sessions.get_mut(&key) else { return 0 };
        let seq = s.next_seq();
        let rec = EventRecord { session: key, seq, event, created_at: now_ms() };
        s.push_event(rec.clone());
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

    /// Sends the attached connection the committed events it has not had yet, as many as
    /// its outgoing queue has room for (the rest when it drains: `on_drained`).
    fn deliver(&mut self, key: SessionKey) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        let (Some(conn), false) = (s.attached, s.replaying) else { return };
        let Some(c) = self.conns.get(&conn) else { return };
        // Nothing committed since the last delivery, and no replay to end: nothing to say
        // (a drain notice or a repeated commit notice must not bring a `finished_events`).
        if s.delivered >= s.committed && !s.replay_tail {
            return;
        }
        loop {
            let mut room = c.handle.out.room();
            let mut sent = None;
            let mut credit = s.credit;
            for (seq, ev) in s.undelivered() {
                if room < 2 || credit == Some(0) {
                    break;
                }
                // Progress that is still coalescing goes out before the task's events, except
                // before a resume: what follows it is the progress of the attempt it announces.
                if let Some(task) = ev.task()
                    && !matches!(ev.event, DurableEvent::ResumedAtOffset { .. })
                    && let Some(p) = c.handle.mailbox.take_progress(task)
                {
                    c.handle.send(p);
                    room -= 1;
                }
                let identifier = s.rec.identifier.clone();
                c.handle.event(Event::Durable { identifier, seq: *seq, event: ev.event.clone() });
                room -= 1;
                sent = Some(*seq);
                credit = credit.map(|c| c.saturating_sub(1));
            }
            s.credit = credit;
            s.delivered = sent.unwrap_or(s.delivered);
            if s.undelivered().next().is_none() {
                break;
            }
            // The client asks for more once it has caught up (`replay_from`).
            if s.credit == Some(0) {
                return;
            }
            if !c.handle.out.hold() {
                return;
            }
        }
        s.delivered = s.delivered.max(s.committed);
        // A replay ends with `finished_events`. So does a delivery after which the session's
        // last task is done and every event it emitted is committed and out: the attached app
        // hears it may rest. (Protocol 1 promised `finished_events` only after a replay.)
        let replayed = std::mem::take(&mut s.replay_tail);
        let resting = s.counts.active() == 0 && s.committed.saturating_add(1) >= s.rec.next_seq;
        if replayed || (resting && c.handle.protocol >= 2) {
            c.handle.event(Event::FinishedEvents { identifier: s.rec.identifier.clone() });
        }
    }

    /// A connection's outgoing queue drained: the events held back go on.
    pub(super) fn on_drained(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else { return };
        for key in c.attached.iter().copied().collect::<Vec<_>>() {
            self.deliver(key);
        }
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
        s.replay_tail = true;
        s.credit = None;
        self.deliver(key);
    }

    /// The attached client has the events before `from_seq` and room for `room` more (its
    /// queue was full, and it dropped the rest): answered, then the unacknowledged events
    /// from `from_seq` on, `room` at most, then, once every one is out, `finished_events`.
    /// From then on it gets `room` events each time it asks: a replay of everything (another
    /// attach) filled a slow app's queue again each time, sending its whole backlog again
    /// for every queue it could take.
    pub(super) fn replay_from(&mut self, conn: ConnId, id: u64, key: SessionKey, from_seq: u64, room: u32) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        if s.attached != Some(conn) {
            let e =
                ErrorInfo::new(ErrorCode::SessionInUse, "this connection is not attached to the session; attach first");
            return self.reply(conn, id, Err(e));
        }
        // An attach's replay on its way sends everything anyway.
        if !s.replaying {
            s.delivered = s.delivered.min(from_seq.saturating_sub(1));
            s.replay_tail = true;
            s.credit = Some(u64::from(room));
        }
        self.reply(conn, id, Ok(Response::Ok));
        self.deliver(key);
    }

    /// Acknowledges events and replies `Ok` to (`conn`, `id`) once that is durable.
    pub(super) fn acknowledge(&mut self, conn: ConnId, id: u64, key: SessionKey, seqs: Vec<u64>) {
        let (ops, mut after) = self.ack_ops(key, seqs);
        after.push(After::Reply { conn, id, response: Response::Ok });
        // Events acknowledged already (by a request whose commit is on its way): answered
        // once that is durable.
        self.commit_after_pending(ops, after);
    }

    pub(super) fn acknowledge_quietly(&mut self, key: SessionKey, seqs: Vec<u64>) {
        let (ops, after) = self.ack_ops(key, seqs);
        self.commit(ops, after);
    }

    pub(super) fn ack_ops(&mut self, key: SessionKey, seqs: Vec<u64>) -> (Vec<Op>, Vec<After>) {
        let mut ops = Vec::new();
        let mut after = Vec::new();
        let downloads = self.cfg.downloads_dir();
        let Some(s) = self.sessions.get_mut(&key) else { return (ops, after) };
        let mut acked = Vec::new();
        let mut files = Vec::new();
        let mut retire = Vec::new();
        let mut challenges = Vec::new();
        for seq in seqs {
            // Unknown seqs were acknowledged before. An event whose insert is still queued
            // may be acknowledged too: the store applies the delete after the insert.
            let Some(ev) = s.take_event(seq) else { continue };
            acked.push(seq);
            match ev.event {
                DurableEvent::FinishedDownloading { location, .. }
                | DurableEvent::UploadResponse { body: location, .. } => {
                    // Whatever the app left in our cache goes; a destination is the app's.
                    let path = std::path::PathBuf::from(location);
                    if path.starts_with(&downloads) {
                        files.push(path);
                    }
                }
                DurableEvent::Completed { task, .. } => retire.push(task),
                DurableEvent::Challenge { task, challenge } => challenges.push((task, challenge.round)),
                DurableEvent::ResumedAtOffset { .. } | DurableEvent::DidBecomeInvalid { .. } => {}
            }
        }
        if acked.is_empty() {
            return (ops, after);
        }
        ops.push(Op::DeleteEvents { session: key, seqs: acked });
        let invalid = s.rec.invalid;
        for (task, round) in challenges {
            self.challenge_acknowledged(task, round, &mut ops, &mut after);
        }
        let all_acked = self.sessions.get(&key).is_some_and(|s| s.events.is_empty());
        if !retire.is_empty() {
            ops.push(Op::RetireTasks(retire.clone()));
            self.prune_history(retire.len(), &mut ops);
            for task in retire {
                if self.tasks.get(&task).is_some_and(|t| t.state == TaskState::Completed) {
                    self.tasks.remove(task);
                    if let Some(s) = self.sessions.get_mut(&key) {
                        s.tasks.remove(&task);
                        s.counts.remove(TaskState::Completed);
                        if s.dormant > 0 {
                            s.left.insert(task);
                        }
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
                s.waited_at_start = false;
            }
        }
        if invalid && all_acked {
            self.delete_session(key, &mut ops, &mut after);
        }
        (ops, after)
    }

    /// Removes an invalidated session whose every event was acknowledged.
    fn delete_session(&mut self, key: SessionKey, ops: &mut Vec<Op>, after: &mut Vec<After>) {
        let Some((s, seq_floor)) = self.sessions.remove(key) else { return };
        self.clear_timer(s.launch_slot_timer, super::Timer::LaunchSlot(key));
        self.launches.forget(key);
        self.forget_session_auth(key);
        // A `wake` request waiting for this session's relaunch gets its answer, once the
        // removal is durable (so does the attached connection's detach, below).
        for (conn, id) in s.launch_replies.iter().copied() {
            let error = ErrorInfo::new(
                ErrorCode::NoSuchSession,
                "the session was removed while this wake waited for its relaunch",
            );
            after.push(After::Refuse { conn, id, error });
        }
        self.start_waiting_launches();
        for task in &s.tasks {
            self.tasks.remove(*task);
        }
        if let Some(conn) = s.attached
            && let Some(c) = self.conns.get_mut(&conn)
        {
            c.attached.remove(&key);
            let event = Event::Detached { identifier: s.rec.identifier.clone(), reason: DetachReason::Invalidated };
            after.push(After::Tell { conn, event });
        }
        ops.push(Op::DeleteSession(key));
        // A later session with this identifier numbers its events after this one's.
        ops.push(Op::SetSeqFloor(seq_floor));
        after.push(After::RemoveDir(self.session_dir(key)));
        // Its app's launch logs go with it (they would pile up, one pair per identifier).
        let logs = crate::launcher::log_paths(&self.cfg.launch_log_dir(), &s.rec.identifier);
        after.push(After::RemoveFiles(logs.to_vec()));
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
}
