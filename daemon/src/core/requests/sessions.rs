//! Session requests: attach and detach, open, invalidate, wake handling.

use tracing::info;

use super::{Answer, Handled};
use crate::conn::ConnId;
use crate::core::task::AfterStop;
use crate::core::transitions::cancelled;
use crate::core::{After, Core};
use crate::model::{SessionKey, now_ms};
use crate::store::Op;
use crate::validate;
use dlsession_proto::{DetachReason, ErrorCode, ErrorInfo, Event, Response, SessionConfig, TaskId, TaskState};

impl Core {
    pub(super) fn attach(
        &mut self,
        conn: ConnId,
        id: u64,
        identifier: String,
        config: SessionConfig,
        takeover: bool,
    ) -> Handled {
        dlsession_proto::validate::identifier(&identifier)?;
        let existing = self.sessions.find(&identifier);
        // The stored configuration sent back unchanged (a rejoin) is not checked again: one
        // stored before a rule was added would keep its app out for good.
        if existing.and_then(|k| self.sessions.get(&k)).is_none_or(|s| s.rec.config != config) {
            validate::session_config(&config, &self.cfg.limits)?;
        }
        if let Some(e) = &self.life.storage {
            // Only an attach that writes nothing can be served while the disk refuses writes.
            let writes =
                existing.and_then(|k| self.sessions.get(&k)).is_none_or(|s| !s.rec.invalid && s.rec.config != config);
            if writes {
                return Err(e.clone());
            }
        }
        let mut ops = Vec::new();
        let key = match existing {
            Some(key) => {
                let other = self.sessions.get(&key).and_then(|s| s.attached).filter(|&c| c != conn);
                if let Some(other) = other {
                    if !takeover {
                        let who = self.conns.describe(other);
                        return Err(ErrorInfo::new(
                            ErrorCode::SessionInUse,
                            format!("session {identifier:?} is attached by {who}; attach with takeover to replace it"),
                        ));
                    }
                    self.detach_conn(other, key, DetachReason::TakenOver);
                }
                self.reconfigure(key, config, &mut ops);
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
            // A relaunched process that attached is the app at work, not a hung one: later
            // wakes may start the app again (a single-instance app hands over to itself).
            s.launched_process = None;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.attached.insert(key);
        }
        // Logged before the slot is given on: a launch's span in the log (its `Launched` line
        // to this one) then lies within the slot it held (the relaunch-storm benchmark counts
        // them).
        info!(conn, session = %self.sessions.identifier(key), "attached");
        // A relaunched app that attached is launched: its slot goes to the next in line.
        self.release_launch_slot(key, None);
        self.commit(ops, vec![After::Replay { conn, id, session: key }]);
        Ok(Answer::Later)
    }

    /// Detaches `conn` from `key`, telling it why.
    fn detach_conn(&mut self, conn: ConnId, key: SessionKey, reason: DetachReason) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        s.detach(conn);
        let identifier = s.rec.identifier.clone();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.attached.remove(&key);
            c.handle.event(Event::Detached { identifier, reason });
        }
    }

    pub(super) fn detach(&mut self, conn: ConnId, identifier: &str) -> Handled {
        let key = self.sessions.key_of(identifier)?;
        if let Some(s) = self.sessions.get_mut(&key) {
            s.detach(conn);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.attached.remove(&key);
        }
        self.check_wake(key, self.cfg.timing.wake_initial);
        self.sessions_left([key]);
        Ok(Answer::Now(Response::Ok))
    }

    fn create_session(&mut self, identifier: String, config: SessionConfig, ops: &mut Vec<Op>) -> SessionKey {
        info!(session = %identifier, "session created");
        let rec = self.sessions.create(identifier, config, now_ms());
        let key = rec.key;
        ops.push(Op::InsertSession(rec));
        self.give_jar(key);
        key
    }

    /// Gives a session a new configuration (stored if it changed).
    fn reconfigure(&mut self, key: SessionKey, config: SessionConfig, ops: &mut Vec<Op>) {
        if let Some(s) = self.sessions.get_mut(&key)
            && s.reconfigure(config)
        {
            ops.push(Op::UpdateSession(s.rec.clone()));
            // Raised limits let queued tasks start now, not at the next event that happens
            // to look at the queue.
            self.schedule();
        }
    }

    pub(super) fn open_session(
        &mut self,
        conn: ConnId,
        id: u64,
        identifier: String,
        config: Option<SessionConfig>,
    ) -> Handled {
        dlsession_proto::validate::identifier(&identifier)?;
        if let Some(c) = &config {
            validate::session_config(c, &self.cfg.limits)?;
        }
        let mut ops = Vec::new();
        let key = match self.sessions.find(&identifier) {
            Some(key) => {
                if let Some(config) = config {
                    self.reconfigure(key, config, &mut ops);
                }
                key
            }
            None => self.create_session(identifier, config.unwrap_or_default(), &mut ops),
        };
        let info = self.session_info(key)?;
        // The session may exist only in memory yet (another request made it): the answer
        // says it exists, so it waits until that is durable.
        self.commit_after_pending(ops, vec![After::Reply { conn, id, response: Response::Session(info) }]);
        // A changed app_id or launch spec may make a pending wake possible.
        self.check_wake(key, std::time::Duration::ZERO);
        Ok(Answer::Later)
    }

    /// The session named `identifier`, if it still takes new tasks.
    pub(super) fn open_for_tasks(&self, identifier: &str) -> Result<SessionKey, ErrorInfo> {
        let key = self.sessions.key_of(identifier)?;
        let s = self.sessions.get(&key).ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchSession, "no such session"))?;
        if s.rec.invalidating || s.rec.invalid {
            return Err(ErrorInfo::new(
                ErrorCode::SessionInvalidated,
                format!("session {identifier:?} is being invalidated and accepts no new tasks"),
            ));
        }
        Ok(key)
    }

    pub(super) fn finish_and_invalidate(&mut self, conn: ConnId, id: u64, identifier: &str, cancel: bool) -> Handled {
        let key = self.sessions.key_of(identifier)?;
        let mut ops = Vec::new();
        let mut after = Vec::new();
        if let Some(s) = self.sessions.get_mut(&key) {
            if s.rec.invalid {
                // Maybe by a request whose commit is still on its way: refused once durable.
                let error =
                    ErrorInfo::new(ErrorCode::SessionInvalidated, format!("session {identifier:?} is already invalid"));
                self.commit_after_pending(Vec::new(), vec![After::Refuse { conn, id, error }]);
                return Ok(Answer::Later);
            }
            if !s.rec.invalidating || (cancel && !s.rec.cancelling) {
                s.rec.invalidating = true;
                // Stored with the answer: tasks still stopping when it goes are cancelled
                // at the next start if the daemon stops first.
                s.rec.cancelling |= cancel;
                ops.push(Op::UpdateSession(s.rec.clone()));
            }
        }
        if cancel {
            let by = format!("{} (invalidate_and_cancel)", self.conns.describe(conn));
            let ids: Vec<TaskId> =
                self.sessions.get(&key).map(|s| s.tasks.iter().copied().collect()).unwrap_or_default();
            for task in ids {
                let Some(t) = self.tasks.get_mut(&task) else { continue };
                // Held at start until its file is looked for: the look cancels it, or
                // completes it if its file was delivered before the stop.
                if t.off_lanes == Some(crate::core::task::OffLanes::Cancelling) {
                    continue;
                }
                match t.state {
                    TaskState::Completed => {}
                    TaskState::Running => {
                        t.cancelled_by = Some(by.clone());
                        self.stop_worker(task, AfterStop::Cancel);
                    }
                    _ => {
                        self.unqueue(task);
                        self.complete(task, Some(cancelled(&by)), &mut ops, &mut after);
                    }
                }
            }
        }
        after.push(After::Reply { conn, id, response: Response::Ok });
        self.check_invalidation(key, &mut ops, &mut after);
        // A second invalidation repeats the first: answered once that is durable.
        self.commit_after_pending(ops, after);
        Ok(Answer::Later)
    }

    /// The connection handles `Wake`s: its app's sessions that wait for it are woken.
    pub(super) fn handle_wakes(&mut self, conn: ConnId) -> Handled {
        let app_id = self.conns.get_mut(&conn).and_then(|c| {
            c.handles_wakes = true;
            c.handle.app_id.clone()
        });
        if let Some(app_id) = app_id {
            self.wake_for_new_app(&app_id, conn);
        }
        Ok(Answer::Now(Response::Ok))
    }
}
