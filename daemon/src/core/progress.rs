//! Progress and task updates to attached clients and watchers (coalesced in each
//! connection's mailbox, never durable).

use super::Core;
use super::conns::Conn;
use crate::conn::Direction;
use dlsession_proto::TaskId;

impl Core {
    /// Hands `delta` new bytes of a running task to its session's client and watchers.
    pub(super) fn push_progress(&self, id: TaskId, delta: u64) {
        let Some(t) = self.tasks.get(&id) else { return };
        let Some(s) = self.sessions.get(&t.rec.session) else { return };
        let total = t.progress.received();
        let expected = t.progress.expected();
        let direction = if t.rec.upload.is_some() { Direction::Sending } else { Direction::Receiving };
        let send = |conn: &Conn| {
            conn.handle.mailbox.add_progress(&s.rec.identifier, id, (delta, total, expected), direction);
        };
        // While an attach replays the events it missed, progress would overtake them (the
        // totals are absolute: the next report after the replay says it all). The replay
        // lasts until its `finished_events` is out, which a slow reader may hold back.
        if let Some(c) = s.attached.filter(|_| !s.replaying && !s.replay_tail).and_then(|c| self.conns.get(&c)) {
            send(c);
        }
        for c in self.conns.values() {
            if Some(c.handle.id) != s.attached && c.watches(t.rec.session, id) {
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
        self.stats.bytes_downloaded += delta;
        self.report_progress(id, delta);
    }

    /// Passes `delta` new bytes on, or keeps them while the attempt's progress is held.
    pub(super) fn report_progress(&mut self, id: TaskId, delta: u64) {
        let Some(run) = self.tasks.run_mut(&id) else { return };
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
        let Some(run) = self.tasks.run_mut(&id) else { return };
        if run.generation == generation {
            run.progress_held = false;
            self.report_progress(id, 0);
        }
    }

    /// Tells watchers about a task's new state.
    pub(super) fn notify_watchers(&self, id: TaskId) {
        let Some(t) = self.tasks.get(&id) else { return };
        let mut info = None;
        for c in self.conns.values() {
            if c.watches(t.rec.session, id) {
                let i = info.get_or_insert_with(|| self.task_info(t));
                c.handle.mailbox.put_update(i.clone());
            }
        }
    }
}
