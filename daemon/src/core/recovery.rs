//! Rebuilding state at start: sessions, tasks, undelivered events; finishing what a crash
//! interrupted; removing files nothing refers to.

use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};

use super::requests::{host_key, new_session};
use super::timers::millis;
use super::{After, Core, Timer};
use crate::engine::files::{CompleteError, Leftovers, complete_move};
use crate::model::{Phase, now_ms};
use crate::store::{Op, Snapshot};
use dlsession_proto::{DurableEvent, ErrorCode, ErrorInfo, TaskId, TaskState};

impl Core {
    pub(super) fn restore(&mut self, snapshot: Snapshot) {
        for rec in snapshot.sessions {
            self.next_session_key = self.next_session_key.max(rec.key + 1);
            self.by_identifier.insert(rec.identifier.clone(), rec.key);
            self.sessions.insert(rec.key, new_session(rec));
        }
        for ev in snapshot.events {
            if let Some(s) = self.sessions.get_mut(&ev.session) {
                s.committed = s.committed.max(ev.seq);
                if let Some(task) = ev.task() {
                    *s.pending_by_task.entry(task).or_default() += 1;
                }
                s.events.insert(ev.seq, ev);
            }
        }
        let mut finishing = Vec::new();
        // A retry is never further away than the longest wait the daemon itself sets (the
        // wall clock may have been set back while it was stopped).
        let longest = self.cfg.timing.retry_max.max(self.cfg.timing.retry_after_max);
        for rec in snapshot.tasks {
            let id = rec.id;
            let host = url::Url::parse(&rec.url).map(|u| host_key(&u)).unwrap_or_default();
            let (state, phase, retry_at) = (rec.state, rec.phase, rec.retry_at);
            self.insert_task(rec, host);
            match state {
                // Cut short between "data complete" and "finished committed".
                TaskState::Queued | TaskState::Running if phase == Phase::Finishing => finishing.push(id),
                TaskState::Queued | TaskState::Running => self.enqueue(id),
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
        let live = self.tasks.len();
        for id in finishing {
            self.recover_finish(id);
        }
        self.collect_garbage();
        let keys: Vec<_> = self.sessions.keys().copied().collect();
        for key in keys {
            self.check_wake(key, Duration::ZERO);
        }
        info!(sessions = self.sessions.len(), tasks = live, "state restored");
    }

    /// A crash hit between "data complete" and "finished committed": finish it now.
    fn recover_finish(&mut self, id: TaskId) {
        let Some(t) = self.tasks.get(&id) else { return };
        let finish = self.finish_of(t);
        let to = finish.to.clone();
        // Before this process moved anything: copies named by its pid are leftovers too.
        match complete_move(&finish, Leftovers::Any) {
            Ok(()) => {
                info!(task = id, "finished a download interrupted while moving into place");
                self.mark_finished(id, to.to_string_lossy().into_owned());
            }
            Err(CompleteError::Lost) => {
                warn!(task = id, "finished file lost before it was committed; downloading again");
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.rec.phase = Phase::Transfer;
                    t.rec.committed_offset = 0;
                }
                self.set_state(id, TaskState::Queued);
                self.enqueue(id);
                self.save_task(id, Vec::new());
            }
            Err(CompleteError::Move(e)) => {
                // The data is kept; the move is tried again with backoff.
                let error = ErrorInfo::new(ErrorCode::DestinationUnavailable, format!("{e}; the download is kept"));
                self.hold_for_move(id, error);
            }
        }
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
        self.emit(key, DurableEvent::FinishedDownloading { task: id, location }, &mut ops);
        let seq = self.emit(key, DurableEvent::Completed { task: id, error: None }, &mut ops);
        if let Some(t) = self.tasks.get(&id) {
            ops.push(Op::UpdateTask(Box::new(t.rec.clone())));
        }
        let mut after = vec![After::Events { session: key, seq }];
        self.check_invalidation(key, &mut ops, &mut after);
        self.commit(ops, after);
    }

    /// Removes files under the downloads directory that no live task refers to.
    fn collect_garbage(&mut self) {
        let downloads = self.cfg.downloads_dir();
        let Ok(entries) = std::fs::read_dir(&downloads) else { return };
        let mut removed = 0usize;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "resume" {
                removed += self.clean_resume_dir();
                continue;
            }
            let key = name.strip_prefix('s').and_then(|k| k.parse::<i64>().ok());
            match key {
                Some(key) if self.sessions.contains_key(&key) => removed += self.clean_session_dir(&path),
                Some(_) if std::fs::remove_dir_all(&path).is_ok() => removed += 1,
                _ => {}
            }
        }
        if removed > 0 {
            info!(removed, "removed stray files from the cache directory");
        }
    }

    fn clean_session_dir(&self, dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = match name.split_once('.') {
                Some((id, "part")) => id
                    .parse::<TaskId>()
                    .ok()
                    .and_then(|id| self.tasks.get(&id))
                    .is_some_and(|t| t.state != TaskState::Completed),
                Some((id, "download")) => id
                    .parse::<TaskId>()
                    .ok()
                    .and_then(|id| self.tasks.get(&id))
                    .is_some_and(|t| t.rec.location.as_deref() == path.to_str()),
                _ => false,
            };
            if !keep && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}
